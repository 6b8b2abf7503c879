"""Per-study comparison: a child's 10 regional volumes against a normative reference.

This is the API the node calls::

    result = compare(volumes_cm3, sex="F", age_years=2.1)          # bundled reference
    result = compare(volumes_cm3, "M", 1.8, load_reference("site.json"), z_threshold=2.5)

For each region (and the total of the 10, and each lobe's asymmetry index
AI = (L - R) / ((L + R) / 2)) it gives the reference mean and SD used, the z-score
z = (value - mean) / SD, the percentile 100 * Phi(z) (normal CDF) and a flag
("below" / "within" / "above" normal limits at |z| > ``z_threshold``).

Applicability is explicit: a missing age or an age outside the reference's range gives
the volumes with no z-scores and a note saying why; an unknown sex with a sex-specific
reference falls back to the reference's pooled model and says so.
"""
from __future__ import annotations

import dataclasses
import math
import numbers
from dataclasses import dataclass
from typing import Any, Mapping, Optional

from scipy.stats import norm

from inference.vocabulary import LOBE_PAIRS, REGION_KEYS
from normative.reference import Reference, asymmetry_key, load_reference

__all__ = [
    "RegionResult", "AsymmetryResult", "ReferenceInfo", "NormativeResult",
    "compare", "load_reference", "normalise_sex", "asymmetry_index",
]

FLAGS = ("below", "within", "above")
#: Two methods whose volumes of a region differ by more than this many reference SDs make its
#: z-score uncertain: a normal child's spread is one SD, so a larger method error could be
#: read as atrophy or enlargement.
METHOD_DIFFERENCE_LIMIT_SD = 1.0


@dataclass(frozen=True)
class RegionResult:
    """One volume against the reference.

    Attributes:
        key: region key (inference.vocabulary.REGION_KEYS) or "total".
        volume_cm3: measured volume, cm3.
        reference_mean_cm3, reference_sd_cm3: expected volume and SD for this
            child, cm3 (None when the reference gives none or does not apply).
        z_score: (volume - mean) / SD, or None.
        percentile: 100 * normal CDF of z, in percent, or None.
        flag: "below", "within" or "above" normal limits, or None without z.
        other_method_volume_cm3: the second method's volume of the region (the cross-check), or None.
        method_difference_sd: (volume - other method's) in units of the reference SD, or None.
        z_range: (lowest, highest) z-score the two methods give, or None.
        uncertain: the two methods differ by more than :data:`METHOD_DIFFERENCE_LIMIT_SD`: the
            z-score may be a method error, not the child's anatomy.
    """

    key: str
    volume_cm3: float
    reference_mean_cm3: Optional[float]
    reference_sd_cm3: Optional[float]
    z_score: Optional[float]
    percentile: Optional[float]
    flag: Optional[str]
    other_method_volume_cm3: Optional[float] = None
    method_difference_sd: Optional[float] = None
    z_range: Optional[tuple[float, float]] = None
    uncertain: bool = False


@dataclass(frozen=True)
class AsymmetryResult:
    """Left-right asymmetry index of one lobe, AI = (L - R) / ((L + R) / 2) (no unit;
    positive = left larger), against the reference's AI when it has one."""

    structure: str
    right_key: str
    left_key: str
    index: float
    reference_mean: Optional[float]
    reference_sd: Optional[float]
    z_score: Optional[float]
    percentile: Optional[float]
    flag: Optional[str]


@dataclass(frozen=True)
class ReferenceInfo:
    """Which reference produced a result (for the SR, the PDF and volumes.json)."""

    name: str
    version: str
    citation: str
    population: str
    n: int
    age_range_years: tuple[float, float]
    kind: str

    @classmethod
    def of(cls, reference: Reference) -> "ReferenceInfo":
        return cls(reference.name, reference.version, reference.citation, reference.population,
                   reference.n, tuple(reference.age_range_years), reference.kind)


@dataclass(frozen=True)
class NormativeResult:
    """Everything a report says about one child's volumes against one reference.

    Attributes:
        regions: the 10 regions in DESIGN order.
        total: the total of the 10 regions (key "total").
        asymmetry: one result per lobe pair of inference.vocabulary.LOBE_PAIRS.
        reference: the reference used.
        sex: "M", "F" or None (as used; unknown values become None).
        age_years: age used, years, or None.
        z_threshold: |z| above which a value is flagged.
        applicable: False when the reference does not apply to this child
            (age missing or out of range): then no z-score is given at all.
        notes: plain-language notes (why no z-scores, fallbacks, the kind of reference).
    """

    regions: tuple[RegionResult, ...]
    total: RegionResult
    asymmetry: tuple[AsymmetryResult, ...]
    reference: ReferenceInfo
    sex: Optional[str]
    age_years: Optional[float]
    z_threshold: float
    applicable: bool
    notes: tuple[str, ...]

    @property
    def uncertain_regions(self) -> tuple[RegionResult, ...]:
        """Regions whose two methods differ by more than :data:`METHOD_DIFFERENCE_LIMIT_SD` (cross-check)."""
        return tuple(r for r in self.regions if r.uncertain)

    def region(self, key: str) -> RegionResult:
        """The result of one region key, or "total"."""
        for result in (*self.regions, self.total):
            if result.key == key:
                return result
        raise KeyError(f"no result for {key!r}")

    def to_dict(self) -> dict[str, Any]:
        """JSON-able form (lists for tuples)."""
        def plain(item) -> dict[str, Any]:
            return {name: getattr(item, name) for name in item.__dataclass_fields__}

        info = plain(self.reference)
        info["age_range_years"] = list(self.reference.age_range_years)
        return {
            "regions": [plain(r) for r in self.regions],
            "total": plain(self.total),
            "asymmetry": [plain(a) for a in self.asymmetry],
            "reference": info,
            "sex": self.sex,
            "age_years": self.age_years,
            "z_threshold": self.z_threshold,
            "applicable": self.applicable,
            "notes": list(self.notes),
        }


def normalise_sex(sex: Optional[str]) -> tuple[Optional[str], Optional[str]]:
    """``(sex, note)``: "M"/"F" (any case), or None for missing/other with a note for "O".

    Raises ValueError for anything else (so a typo is never read as "unknown").
    """
    if sex is None or str(sex).strip() == "":
        return None, None
    value = str(sex).strip().upper()
    if value in ("M", "F"):
        return value, None
    if value == "O":
        return None, "sex recorded as 'O' (other): treated as unknown"
    raise ValueError(f"sex must be 'M', 'F', 'O' or empty, got {sex!r}")


def asymmetry_index(left: float, right: float) -> float:
    """AI = (L - R) / ((L + R) / 2); no unit, positive when the left is larger."""
    if left + right <= 0:
        raise ValueError("asymmetry index needs a positive left + right volume")
    return (left - right) / ((left + right) / 2)


def compare(volumes: Mapping[str, float], sex: Optional[str], age_years: Optional[float],
            reference: Optional[Reference] = None, z_threshold: float = 2.0,
            other_method_volumes: Optional[Mapping[str, float]] = None) -> NormativeResult:
    """Compare a child's volumes with a reference.

    Args:
        volumes: region key -> volume in cm3, all 10 regions of inference.vocabulary.
        sex: "M", "F", "O" or None/"" (unknown).
        age_years: age in years, or None (unknown): then no z-scores.
        reference: a loaded :class:`Reference`; None = the bundled one.
        z_threshold: flag values with |z| above this (default 2).
        other_method_volumes: the same regions measured by a second method (the cross-check),
            cm3: each region then gets the difference in reference SDs, the range of z the two
            methods give and ``uncertain`` beyond :data:`METHOD_DIFFERENCE_LIMIT_SD`. The SD is
            the reference's for this child, or, where the reference does not apply (age unknown
            or out of range), its SD at its mean age: a normal child's spread is still the unit.

    Raises:
        ValueError: a region is missing or unknown, a volume is not a finite
            number >= 0, the age is negative, or the threshold is not positive.
    """
    checked = _check_volumes(volumes)
    if not (_is_number(z_threshold) and math.isfinite(z_threshold) and z_threshold > 0):
        raise ValueError(f"z threshold must be a positive number, got {z_threshold!r}")
    if age_years is not None and not (_is_number(age_years) and math.isfinite(age_years) and age_years >= 0):
        raise ValueError(f"age must be a finite number of years >= 0, got {age_years!r}")
    age_years = None if age_years is None else float(age_years)
    reference = load_reference() if reference is None else reference
    sex, sex_note = normalise_sex(sex)
    notes = [sex_note] if sex_note else []
    applicable = _applicability(reference, age_years, notes)

    values = dict(checked)
    values["total"] = sum(checked[key] for key in REGION_KEYS)
    # A lobe missing on both sides (a failed segmentation) has no asymmetry: say so, measure the rest.
    pairs = []
    for structure, right_key, left_key in LOBE_PAIRS:
        if checked[left_key] + checked[right_key] > 0:
            values[asymmetry_key(structure)] = asymmetry_index(checked[left_key], checked[right_key])
            pairs.append((structure, right_key, left_key))
        else:
            notes.append(f"no asymmetry index for the {structure}: both sides measured 0 cm3")

    used_pooled, without_sd, needs_sex, absent = [], [], [], []

    def score(key: str) -> tuple[Optional[float], Optional[float], Optional[float], Optional[float], Optional[str]]:
        """(mean, sd, z, percentile, flag) of one measure for this child."""
        if not applicable:
            return None, None, None, None, None
        expected = reference.expected(key, age_years, sex)
        if expected is None:
            (needs_sex if key in reference.measures else absent).append(key)
            return None, None, None, None, None
        if expected.pooled:
            used_pooled.append(key)
        if expected.sd is None:
            without_sd.append(key)
            return expected.mean, None, None, None, None
        z = (values[key] - expected.mean) / expected.sd
        return expected.mean, expected.sd, z, 100.0 * float(norm.cdf(z)), _flag(z, z_threshold)

    regions = tuple(RegionResult(key, values[key], *score(key)) for key in REGION_KEYS)
    if other_method_volumes is not None:
        others = _check_volumes(other_method_volumes)
        regions = tuple(_with_other_method(region, others[region.key], _spread(reference, region.key, age_years, sex))
                        for region in regions)
        uncertain = [f"{_label(r.key)} ({r.method_difference_sd:+.1f} SD)" for r in regions if r.uncertain]
        if uncertain:
            notes.append("uncertain z-score (marked ?): the two segmentation methods differ by more than "
                         f"{METHOD_DIFFERENCE_LIMIT_SD:g} reference SD for " + ", ".join(uncertain)
                         + ": read such a z-score with the range the two methods give, not as the child's anatomy")
    total = RegionResult("total", values["total"], *score("total"))
    asymmetry = tuple(
        AsymmetryResult(structure, right_key, left_key, values[asymmetry_key(structure)],
                        *score(asymmetry_key(structure)))
        for structure, right_key, left_key in pairs
    )
    if applicable:
        notes += _score_notes(reference, used_pooled, without_sd, needs_sex, absent)
    return NormativeResult(regions, total, asymmetry, ReferenceInfo.of(reference), sex, age_years,
                           float(z_threshold), applicable, tuple(notes))


def _spread(reference: Reference, key: str, age_years: Optional[float], sex: Optional[str]) -> Optional[float]:
    """The reference SD of ``key`` for this child, or at the reference's mean age where it does not apply."""
    low, high = reference.age_range_years
    age = age_years if age_years is not None and reference.covers_age(age_years) else (low + high) / 2
    expected = reference.expected(key, age, sex) or reference.expected(key, age, None)
    return None if expected is None else expected.sd


def _with_other_method(region: RegionResult, other_cm3: float, sd: Optional[float]) -> RegionResult:
    """``region`` with the second method's volume, the difference in SDs and the range of z."""
    if sd is None or sd <= 0:
        return dataclasses.replace(region, other_method_volume_cm3=other_cm3)
    difference = (region.volume_cm3 - other_cm3) / sd
    z_range = None
    if region.z_score is not None:
        other_z = (other_cm3 - region.reference_mean_cm3) / region.reference_sd_cm3
        z_range = (min(region.z_score, other_z), max(region.z_score, other_z))
    return dataclasses.replace(region, other_method_volume_cm3=other_cm3, method_difference_sd=difference,
                               z_range=z_range, uncertain=abs(difference) > METHOD_DIFFERENCE_LIMIT_SD)


def _check_volumes(volumes: Mapping[str, float]) -> dict[str, float]:
    if not isinstance(volumes, Mapping):
        raise ValueError("volumes must be a mapping of region key -> volume in cm3")
    unknown = [key for key in volumes if key not in REGION_KEYS]
    if unknown:
        raise ValueError(f"unknown region key(s) {', '.join(map(str, unknown))}; valid keys: {', '.join(REGION_KEYS)}")
    missing = [key for key in REGION_KEYS if key not in volumes]
    if missing:
        raise ValueError(f"missing volume(s) for {', '.join(missing)}")
    checked = {}
    for key in REGION_KEYS:
        value = volumes[key]
        if not _is_number(value) or not math.isfinite(value) or value < 0:
            raise ValueError(f"volume of {key} must be a finite number of cm3 >= 0, got {value!r}")
        checked[key] = float(value)
    return checked


def _is_number(value) -> bool:
    """Any real number (Python or numpy), but not a bool or a string."""
    return isinstance(value, numbers.Real) and not isinstance(value, bool)


def _applicability(reference: Reference, age_years: Optional[float], notes: list[str]) -> bool:
    low, high = reference.age_range_years
    if age_years is None:
        notes.append(f"no z-scores: the child's age is unknown and the reference covers only ages "
                     f"{low:g}-{high:g} years")
        return False
    if not reference.covers_age(age_years):
        notes.append(f"no z-scores: age {age_years:.2f} years is outside the reference's range "
                     f"{low:g}-{high:g} years")
        return False
    return True


def _score_notes(reference: Reference, used_pooled: list[str], without_sd: list[str],
                 needs_sex: list[str], absent: list[str]) -> list[str]:
    """Plain-language notes on how the z-scores of an applicable reference were made."""
    notes = []
    if not reference.sex_specific and not reference.age_specific:
        notes.append(f"reference is {reference.kind}: z-scores compare with all children of the reference "
                     f"population, not with children of the same age and sex")
    if used_pooled:
        notes.append("sex unknown: the pooled (both sexes) reference was used, so z-scores are not adjusted for sex")
    if needs_sex:
        notes.append("sex unknown and the reference has no pooled model: no z-score for "
                     + ", ".join(_label(k) for k in needs_sex))
    if without_sd:
        notes.append("the reference gives no SD for " + ", ".join(_label(k) for k in without_sd) + ": no z-score")
    absent_asymmetry = [k for k in absent if k.startswith("asymmetry_")]
    if absent_asymmetry:
        notes.append("the reference has no asymmetry-index values"
                     + ("" if len(absent_asymmetry) == len(LOBE_PAIRS)
                        else " for " + ", ".join(_label(k) for k in absent_asymmetry))
                     + ": asymmetry indices are given without z-scores")
    others = [k for k in absent if not k.startswith("asymmetry_")]
    if others:
        notes.append("the reference has no values for " + ", ".join(_label(k) for k in others) + ": no z-score")
    return notes


def _label(key: str) -> str:
    if key == "total":
        return "the total of the 10 regions"
    if key.startswith("asymmetry_"):
        return "the " + key[len("asymmetry_"):].replace("_", " ") + " asymmetry index"
    return key.replace("_", " ")


def _flag(z: float, threshold: float) -> str:
    return "below" if z < -threshold else "above" if z > threshold else "within"
