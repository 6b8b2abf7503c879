"""Normative reference files: what a reference predicts for a child of a given age and sex.

A reference is a JSON file (the bundled one is ``normative/data/xi2025_whole_cohort.json``;
``lobevol normative fit`` writes site-fitted ones in the same format). It carries its
provenance (citation, population, scanner, method, n, sexes, ages, version) beside the
numbers, and one *measure* per quantity it describes:

- the 10 region keys of :mod:`inference.vocabulary` (volumes in cm3),
- ``total`` (sum of the 10 regions, cm3),
- ``asymmetry_<structure>`` per lobe pair (asymmetry index AI = (L - R) / ((L + R) / 2),
  no unit), see :func:`asymmetry_key`.

A measure's expected value and SD are linear models in the child's covariates::

    mean(age, sex) = intercept + age_years * age + sex * sex_code
    sd(age)        = intercept + age_years * age          (no sex term)

with ``sex_code`` from the file's ``sex_coding`` (the paper's coding: M = 1, F = 2). A term
absent from a model is zero, so a whole-cohort reference is ``{"mean": {"intercept": m},
"sd": {"intercept": s}}``. ``"sd": null`` says the source publishes no SD (no z-score).
A measure whose mean uses sex may carry a ``pooled`` model (both sexes together) used
when the child's sex is unknown.

File layout (format version 1)::

    {"format": "lobevol-normative-reference", "format_version": 1,
     "name", "version", "kind", "citation", "doi", "population", "scanner", "method",
     "n", "sexes": {"M": int, "F": int}, "age_range_years": [low, high],
     "sex_coding": {"M": 1, "F": 2}, "notes": [str], "provenance": {...},
     "measures": {key: {"mean": model, "sd": model | null, "pooled": {...}?, ...}}}

Other keys of a measure (``se``, ``r2``, ``n``, ``note``) are kept as provenance.
"""
from __future__ import annotations

import json
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Mapping, Optional

from inference.vocabulary import LOBE_PAIRS, REGION_KEYS

FORMAT = "lobevol-normative-reference"
FORMAT_VERSION = 1
BUNDLED_REFERENCE = Path(__file__).parent / "data" / "xi2025_whole_cohort.json"

#: Covariates a mean model may use; an SD model may use only the first two.
MEAN_TERMS = ("intercept", "age_years", "sex")
SD_TERMS = ("intercept", "age_years")
SEXES = ("M", "F")


def asymmetry_key(structure: str) -> str:
    """Measure key of a lobe's asymmetry index, e.g. ``asymmetry_frontal_lobe``."""
    return "asymmetry_" + structure.replace(" ", "_")


#: Every measure key a reference may hold, in report order.
MEASURE_KEYS: tuple[str, ...] = (*REGION_KEYS, "total", *(asymmetry_key(s) for s, _, _ in LOBE_PAIRS))


@dataclass(frozen=True)
class LinearModel:
    """``value = sum(coefficient * covariate)`` over the named terms (absent terms are zero).

    Attributes:
        coefficients: term name -> coefficient, terms from :data:`MEAN_TERMS`.
            Units: those of the measure (cm3 or none) per unit of the covariate
            (years for ``age_years``, one sex-code step for ``sex``).
    """

    coefficients: Mapping[str, float]

    def __post_init__(self) -> None:
        for term, value in self.coefficients.items():
            if term not in MEAN_TERMS:
                raise ValueError(f"unknown model term {term!r}; expected one of {', '.join(MEAN_TERMS)}")
            if not isinstance(value, (int, float)) or isinstance(value, bool) or not math.isfinite(value):
                raise ValueError(f"model term {term!r} must be a finite number, got {value!r}")

    @property
    def uses_sex(self) -> bool:
        return self.coefficients.get("sex", 0.0) != 0.0

    @property
    def uses_age(self) -> bool:
        return self.coefficients.get("age_years", 0.0) != 0.0

    def predict(self, age_years: float, sex_code: Optional[float]) -> float:
        """The model's value; ``sex_code`` may be None only if the model has no sex term."""
        if self.uses_sex and sex_code is None:
            raise ValueError("this model needs the sex of the child")
        c = self.coefficients
        return c.get("intercept", 0.0) + c.get("age_years", 0.0) * age_years + c.get("sex", 0.0) * (sex_code or 0.0)

    def to_dict(self) -> dict[str, float]:
        return {term: float(self.coefficients[term]) for term in MEAN_TERMS if term in self.coefficients}


@dataclass(frozen=True)
class MeasureModel:
    """Expected value and SD of one measure.

    Attributes:
        mean: model of the expected value.
        sd: model of the SD (``None``: the source gives no SD, so no z-score).
        pooled: the same for both sexes together, used when the sex is unknown
            and ``mean`` depends on sex (None: no fallback).
        extra: everything else the file says about the measure (SEs, R2, n, note).
    """

    mean: LinearModel
    sd: Optional[LinearModel]
    pooled: Optional["MeasureModel"] = None
    extra: Mapping[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if self.sd is not None and ("sex" in self.sd.coefficients):
            raise ValueError("an SD model may not depend on sex (terms: intercept, age_years)")

    @classmethod
    def from_dict(cls, data: Mapping[str, Any], where: str) -> "MeasureModel":
        if not isinstance(data, Mapping) or "mean" not in data or "sd" not in data:
            raise ValueError(f"{where}: a measure needs 'mean' and 'sd' (sd may be null)")
        pooled = None if data.get("pooled") is None else cls.from_dict(data["pooled"], f"{where}.pooled")
        if pooled is not None and pooled.mean.uses_sex:
            raise ValueError(f"{where}.pooled: a pooled model may not depend on sex")
        extra = {k: v for k, v in data.items() if k not in ("mean", "sd", "pooled")}
        try:
            mean = LinearModel(dict(data["mean"]))
            sd = None if data["sd"] is None else LinearModel(dict(data["sd"]))
            return cls(mean, sd, pooled, extra)
        except (TypeError, ValueError) as error:
            raise ValueError(f"{where}: {error}") from None

    def to_dict(self) -> dict[str, Any]:
        data: dict[str, Any] = {"mean": self.mean.to_dict(), "sd": None if self.sd is None else self.sd.to_dict()}
        if self.pooled is not None:
            data["pooled"] = self.pooled.to_dict()
        data.update(self.extra)
        return data


@dataclass(frozen=True)
class Expected:
    """What a reference expects for one child: mean and SD (None when it has no SD)."""

    mean: float
    sd: Optional[float]
    pooled: bool  # True when the sex-specific model was replaced by the pooled one


@dataclass(frozen=True)
class Reference:
    """A normative reference loaded from (or to be written to) a reference file.

    Attributes:
        name, version, kind, citation, population: as in ``ReferenceInfo``.
        n: number of children the reference was made from.
        age_range_years: (low, high) ages covered, in years; outside it the
            reference does not apply.
        sex_coding: code of each sex in the mean models (paper: M = 1, F = 2).
        measures: measure key -> model (keys from :data:`MEASURE_KEYS`).
        metadata: every other top-level field of the file (doi, scanner,
            method, sexes, notes, provenance ...), kept verbatim.
        path: the file it was read from (None for a reference built in memory).
    """

    name: str
    version: str
    kind: str
    citation: str
    population: str
    n: int
    age_range_years: tuple[float, float]
    sex_coding: Mapping[str, float]
    measures: Mapping[str, MeasureModel]
    metadata: Mapping[str, Any] = field(default_factory=dict)
    path: Optional[Path] = None

    def __post_init__(self) -> None:
        for attribute in ("name", "version", "kind", "citation", "population"):
            if not isinstance(getattr(self, attribute), str) or not getattr(self, attribute).strip():
                raise ValueError(f"reference field {attribute!r} must be a non-empty string")
        if not isinstance(self.n, int) or isinstance(self.n, bool) or self.n < 1:
            raise ValueError(f"reference field 'n' must be a positive integer, got {self.n!r}")
        low, high = self.age_range_years
        if not (0 <= low < high):
            raise ValueError(f"reference field 'age_range_years' must be [low, high] with 0 <= low < high, "
                             f"got {list(self.age_range_years)}")
        if sorted(self.sex_coding) != sorted(SEXES) or self.sex_coding["M"] == self.sex_coding["F"]:
            raise ValueError(f"reference field 'sex_coding' must give distinct codes for 'M' and 'F', "
                             f"got {dict(self.sex_coding)}")
        unknown = [key for key in self.measures if key not in MEASURE_KEYS]
        if unknown:
            raise ValueError(f"reference has unknown measure(s) {', '.join(unknown)}; "
                             f"valid keys: {', '.join(MEASURE_KEYS)}")
        missing = [key for key in REGION_KEYS if key not in self.measures]
        if missing:
            raise ValueError(f"reference lacks the region measure(s) {', '.join(missing)}")
        for key, measure in self.measures.items():
            self._check_sd_positive(key, measure)

    def _check_sd_positive(self, key: str, measure: MeasureModel) -> None:
        """An SD must be positive over the whole age range (an age-dependent SD could cross zero)."""
        for model in (measure, measure.pooled):
            if model is None or model.sd is None:
                continue
            for age in self.age_range_years:
                if not model.sd.predict(age, None) > 0:
                    raise ValueError(f"measure {key!r}: SD is not positive at age {age:g} years")

    @property
    def sex_specific(self) -> bool:
        """True when some measure's mean depends on sex."""
        return any(m.mean.uses_sex for m in self.measures.values())

    @property
    def age_specific(self) -> bool:
        """True when some measure's mean or SD depends on age."""
        return any(m.mean.uses_age or (m.sd is not None and m.sd.uses_age) for m in self.measures.values())

    def covers_age(self, age_years: float) -> bool:
        low, high = self.age_range_years
        return low <= age_years <= high

    def expected(self, key: str, age_years: float, sex: Optional[str]) -> Optional[Expected]:
        """Mean and SD of measure ``key`` for a child; None when the reference lacks the measure
        or when it depends on sex, the sex is unknown and no pooled model exists.

        Args:
            key: a measure key (:data:`MEASURE_KEYS`).
            age_years: the child's age in years (range checks are the caller's).
            sex: "M", "F" or None (unknown).
        """
        measure = self.measures.get(key)
        if measure is None:
            return None
        pooled = False
        if measure.mean.uses_sex and sex is None:
            if measure.pooled is None:
                return None
            measure, pooled = measure.pooled, True
        code = None if sex is None else float(self.sex_coding[sex])
        mean = measure.mean.predict(age_years, code)
        sd = None if measure.sd is None else measure.sd.predict(age_years, None)
        return Expected(mean, sd, pooled)

    def to_dict(self) -> dict[str, Any]:
        """The file's JSON content (provenance fields first, then the measures)."""
        data: dict[str, Any] = {
            "format": FORMAT, "format_version": FORMAT_VERSION,
            "name": self.name, "version": self.version, "kind": self.kind,
            "citation": self.citation, "population": self.population, "n": self.n,
            "age_range_years": [float(self.age_range_years[0]), float(self.age_range_years[1])],
        }
        data.update(self.metadata)
        data["sex_coding"] = dict(self.sex_coding)
        data["measures"] = {key: self.measures[key].to_dict() for key in MEASURE_KEYS if key in self.measures}
        return data

    def save(self, path: str | Path) -> Path:
        path = Path(path)
        path.write_text(json.dumps(self.to_dict(), indent=2) + "\n")
        return path

    @classmethod
    def from_dict(cls, data: Mapping[str, Any], path: Optional[Path] = None) -> "Reference":
        """Build and validate a reference from a file's JSON content."""
        where = str(path) if path else "reference"
        if not isinstance(data, Mapping):
            raise ValueError(f"{where}: a reference file holds a JSON object")
        if data.get("format") != FORMAT:
            raise ValueError(f"{where}: not a lobevol normative reference (field 'format' must be {FORMAT!r})")
        if data.get("format_version") != FORMAT_VERSION:
            raise ValueError(f"{where}: unsupported format_version {data.get('format_version')!r} "
                             f"(this lobevol reads version {FORMAT_VERSION})")
        required = ("name", "version", "kind", "citation", "population", "n", "age_range_years",
                    "sex_coding", "measures")
        missing = [name for name in required if name not in data]
        if missing:
            raise ValueError(f"{where}: missing field(s) {', '.join(missing)}")
        ages = data["age_range_years"]
        if not (isinstance(ages, (list, tuple)) and len(ages) == 2
                and all(isinstance(a, (int, float)) for a in ages)):
            raise ValueError(f"{where}: 'age_range_years' must be [low, high] in years, got {ages!r}")
        if not isinstance(data["measures"], Mapping):
            raise ValueError(f"{where}: 'measures' must be an object of measure key -> model")
        measures = {key: MeasureModel.from_dict(value, f"{where}: measure {key!r}")
                    for key, value in data["measures"].items()}
        skip = set(required) | {"format", "format_version"}
        metadata = {k: v for k, v in data.items() if k not in skip}
        try:
            return cls(
                name=data["name"], version=str(data["version"]), kind=data["kind"], citation=data["citation"],
                population=data["population"], n=data["n"], age_range_years=(float(ages[0]), float(ages[1])),
                sex_coding=dict(data["sex_coding"]), measures=measures, metadata=metadata, path=path,
            )
        except (TypeError, ValueError) as error:
            raise ValueError(f"{where}: {error}") from None


def load_reference(path: str | Path | None = None) -> Reference:
    """Read and validate a reference file; ``None`` = the bundled Xi et al. 2025 whole-cohort one."""
    path = BUNDLED_REFERENCE if path is None or str(path) == "" else Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"normative reference file not found: {path}")
    try:
        data = json.loads(path.read_text())
    except json.JSONDecodeError as error:
        raise ValueError(f"{path}: not valid JSON ({error})") from None
    return Reference.from_dict(data, path)
