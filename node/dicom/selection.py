"""Pick the series to analyse in a study, and say why every other one was not chosen.

A scanner or PACS sends a whole study: localizers, thick and thin
reconstructions, soft-tissue and bone kernels, dose reports, screen
captures. :func:`select_series` keeps the eligible series and ranks them.

Eligible (all of):
- CT Image Storage, Enhanced CT or Legacy Converted Enhanced CT;
- ORIGINAL images, not LOCALIZER, not DERIVED/SECONDARY;
- axial: the slice normal within ``max_axial_angle_deg`` of the patient's
  head-feet axis (a gantry tilt of 20-30 deg is still axial);
- a head: a head keyword in BodyPartExamined, StudyDescription,
  SeriesDescription, ProtocolName or the Anatomic Region code meaning; or,
  when none has one and no header names another body part (BodyPartExamined
  and the Anatomic Region empty: anonymisers blank them), a skull enclosing
  brain-density tissue in the image (``node.dicom.anatomy``, three slices
  decoded, and only for a series that passes every other rule), with a note.
  A series whose header names another body part (ABDOMEN, CHEST, WHOLEBODY)
  is not a head whatever its image shows: the header contradicting the image
  means a mislabelled series, which must be fixed at its source, not
  reported on; a whole-body scan, whose first slices are a head, is no head
  volume either. A site whose scanners write their own word for a head adds
  it to ``head_keywords``;
- slices no thicker than ``max_slice_thickness_mm`` (default 5 mm);
- enough images to cover a head: at least ``min_slices`` images spanning at
  least ``min_coverage_mm`` along the slice normal.

Preference among eligible series:
1. soft-tissue over unknown over bone reconstruction. The first cue that
   speaks decides, in this order: the reconstruction kernel (vendor names
   matched by configurable regular expressions), the window centre (brain
   window vs bone window), the series description keywords;
2. then thinner slices;
3. then more coverage, then the lower series number (reproducible ties).

Every rule is configurable from the ``[selection]`` section of config.ini
(read by ``node.config``: lists comma-separated,
``soft_window_center_hu = 0, 100``).
"""
from __future__ import annotations

import re
from dataclasses import dataclass, field
from typing import Mapping, Sequence

import numpy as np
import pydicom

from node.dicom.geometry import functional_group_value, positions_along, slice_normal

CT_STORAGE_CLASSES = {
    "1.2.840.10008.5.1.4.1.1.2": "CT Image Storage",
    "1.2.840.10008.5.1.4.1.1.2.1": "Enhanced CT Image Storage",
    "1.2.840.10008.5.1.4.1.1.2.2": "Legacy Converted Enhanced CT Image Storage",
}

SOFT, UNKNOWN, BONE = "soft tissue", "unknown", "bone"
_TISSUE_RANK = {SOFT: 0, UNKNOWN: 1, BONE: 2}

# Reconstruction kernel names by vendor (matched whole, case-insensitive):
# GE STANDARD/SOFT/STD+ vs BONE/BONEPLUS/EDGE/LUNG/DETAIL; Philips UA-UC, A-C
# (brain and body standard) vs YA-YC, D-E, L (bone, sharp, lung); Siemens
# H/Hr/J/Br/Qr with strength < 50 (e.g. H31s, Hr38, J30s) vs >= 50 (H60s,
# Hr64, J70h); Canon FC0x-FC2x (brain, body) vs FC3x, FC5x, FC8x (bone, lung);
# United Imaging B_/H_SOFT vs B_/H_SHARP, BONE.
DEFAULT_SOFT_KERNELS = (
    r"STANDARD", r"STD\+?", r"SOFT.*", r"BRAIN.*", r"U[A-D]", r"[A-C]", r"H[RU]?[1-4]\d[SFHU]?\d?",
    r"[JBQ]R?[1-4]\d[SFHU]?\d?", r"FC[0-2]\d", r"[BH]_SOFT.*",
)
DEFAULT_BONE_KERNELS = (
    r"BONE.*", r"EDGE", r"LUNG", r"DETAIL", r"SHARP.*", r"Y[A-D]", r"[D-E]", r"E[A-C]", r"L",
    r"H[RU]?[5-9]\d[SFHU]?\d?", r"[JBQ]R?[5-9]\d[SFHU]?\d?", r"FC[3-9]\d", r"[BH]_SHARP.*",
)
DEFAULT_HEAD_KEYWORDS = ("HEAD", "BRAIN", "SKULL", "CRAN", "NEURO", "CEREBR", "KOPF", "SCHAEDEL", "SCHADEL",
                         "CRANE", "TETE", "CABEZA", "TESTA", "STROKE")
DEFAULT_SOFT_DESCRIPTIONS = ("BRAIN", "SOFT", "STD", "STANDARD", "CEREBRUM", "WEICHTEIL", "PARENCHYM")
DEFAULT_BONE_DESCRIPTIONS = ("BONE", "KNOCHEN", "OS", "SHARP", "LUNG", "INNER EAR", "FELSENBEIN")


@dataclass(frozen=True)
class SelectionRules:
    """Which series are eligible and which one is preferred.

    Attributes:
        head_keywords: words that mark a head study/series (upper case,
            matched as substrings of BodyPartExamined, descriptions,
            ProtocolName and Anatomic Region meaning).
        soft_kernels: regular expressions matching soft-tissue kernel names
            (whole name, case-insensitive).
        bone_kernels: regular expressions matching bone/sharp kernel names.
        soft_descriptions: series-description keywords of a soft-tissue
            reconstruction (used when kernel and window say nothing); a
            keyword matches at the start of a word ("WEICHTEIL" matches
            "WEICHTEILFENSTER", "OS" matches "OSSEOUS" but not "POST").
        bone_descriptions: series-description keywords of a bone reconstruction.
        soft_window_center_hu: (low, high) window centres of a brain /
            soft-tissue window (HU).
        bone_window_center_min_hu: window centres from this up are a bone window (HU).
        max_slice_thickness_mm: thicker slices are not eligible (mm).
        min_slices: fewer images are not a head volume.
        min_coverage_mm: the images must cover at least this along the slice
            normal (first to last slice centre plus one slice thickness, mm):
            about a young child's brain height.
        max_axial_angle_deg: largest angle between slice normal and the
            head-feet axis for an axial series (degrees).
    """

    head_keywords: tuple[str, ...] = DEFAULT_HEAD_KEYWORDS
    soft_kernels: tuple[str, ...] = DEFAULT_SOFT_KERNELS
    bone_kernels: tuple[str, ...] = DEFAULT_BONE_KERNELS
    soft_descriptions: tuple[str, ...] = DEFAULT_SOFT_DESCRIPTIONS
    bone_descriptions: tuple[str, ...] = DEFAULT_BONE_DESCRIPTIONS
    soft_window_center_hu: tuple[float, float] = (0.0, 100.0)
    bone_window_center_min_hu: float = 300.0
    max_slice_thickness_mm: float = 5.0
    min_slices: int = 10
    min_coverage_mm: float = 90.0
    max_axial_angle_deg: float = 35.0

    def __post_init__(self) -> None:
        for name in ("head_keywords", "soft_descriptions", "bone_descriptions"):
            values = tuple(str(v).strip().upper() for v in getattr(self, name) if str(v).strip())
            object.__setattr__(self, name, values)
        if not self.head_keywords:
            raise ValueError("head_keywords is empty: no series could ever be recognised as a head")
        for name in ("soft_kernels", "bone_kernels"):
            patterns = tuple(str(v).strip() for v in getattr(self, name) if str(v).strip())
            for pattern in patterns:
                try:
                    re.compile(pattern)
                except re.error as error:
                    raise ValueError(f"{name}: {pattern!r} is not a valid regular expression ({error})") from None
            object.__setattr__(self, name, patterns)
        low, high = (float(v) for v in self.soft_window_center_hu)
        object.__setattr__(self, "soft_window_center_hu", (low, high))
        if not low < high:
            raise ValueError(f"soft_window_center_hu must be (low, high) with low < high, got {self.soft_window_center_hu}")
        if not self.max_slice_thickness_mm > 0:
            raise ValueError(f"max_slice_thickness_mm must be positive, got {self.max_slice_thickness_mm}")
        if not int(self.min_slices) >= 2:
            raise ValueError(f"min_slices must be at least 2, got {self.min_slices}")
        if not self.min_coverage_mm >= 0:
            raise ValueError(f"min_coverage_mm must be zero or positive, got {self.min_coverage_mm}")
        if not 0 < self.max_axial_angle_deg < 90:
            raise ValueError(f"max_axial_angle_deg must be between 0 and 90, got {self.max_axial_angle_deg}")

    def kernel_tissue(self, kernel: str) -> str | None:
        """SOFT, BONE or None (not recognised) for a reconstruction kernel name."""
        if not kernel:
            return None
        if any(re.fullmatch(p, kernel, re.IGNORECASE) for p in self.soft_kernels):
            return SOFT
        if any(re.fullmatch(p, kernel, re.IGNORECASE) for p in self.bone_kernels):
            return BONE
        return None

    def window_tissue(self, center_hu: float | None) -> str | None:
        """SOFT, BONE or None for a window centre (HU)."""
        if center_hu is None:
            return None
        low, high = self.soft_window_center_hu
        if low <= center_hu <= high:
            return SOFT
        if center_hu >= self.bone_window_center_min_hu:
            return BONE
        return None

    def description_tissue(self, description: str) -> str | None:
        """SOFT, BONE or None from a series description (bone words win: 'BONE BRAIN' is bone)."""
        text = description.upper()
        if any(_starts_a_word(word, text) for word in self.bone_descriptions):
            return BONE
        if any(_starts_a_word(word, text) for word in self.soft_descriptions):
            return SOFT
        return None


def _starts_a_word(keyword: str, text: str) -> bool:
    """Whether ``keyword`` occurs in ``text`` at the start of a word."""
    return re.search(r"(?<![A-Z0-9])" + re.escape(keyword), text) is not None


@dataclass(frozen=True)
class SeriesFacts:
    """What selection needs to know about one series, read from its headers."""

    series_uid: str
    series_number: str
    description: str
    sop_class: str
    image_type: tuple[str, ...]
    head_text: str
    body_part: str
    kernel: str
    window_center_hu: float | None
    thickness_mm: float | None
    n_images: int
    coverage_mm: float
    normal_angle_deg: float | None

    @classmethod
    def from_headers(cls, series_uid: str, headers: Sequence) -> "SeriesFacts":
        first = headers[0].dataset
        n_images = sum(_frame_count(h.dataset) for h in headers)
        positions, normal = _positions_along_normal(headers)
        thickness = _first_number(_first_of(first, "SliceThickness", "PixelMeasuresSequence"))
        return cls(
            series_uid=series_uid,
            series_number=str(first.get("SeriesNumber", "") or "?"),
            description=_text(first, "SeriesDescription"),
            sop_class=str(headers[0].sop_class_uid),
            image_type=tuple(str(v).upper() for v in _values(first.get("ImageType"))),
            head_text=_head_text(first),
            body_part=_body_part(first),
            # Siemens writes the kernel and the iterative strength ("Hr38f\\3"): the first value is the kernel.
            kernel=str((_values(_first_of(first, "ConvolutionKernel", "CTReconstructionSequence")) or [""])[0]).strip(),
            window_center_hu=_first_number(_first_of(first, "WindowCenter", "FrameVOILUTSequence")),
            thickness_mm=thickness,
            n_images=n_images,
            coverage_mm=_coverage_mm(positions, thickness),
            normal_angle_deg=None if normal is None else float(np.degrees(np.arccos(min(1.0, abs(normal[2]))))),
        )

    def label(self) -> str:
        """'series 3 (BONE BRAIN 1MM)': how summaries name the series."""
        return f"series {self.series_number}" + (f" ({self.description})" if self.description else "")


@dataclass
class SeriesSelection:
    """The chosen series (None if no series is eligible) and a reason for every series.

    Attributes:
        chosen: SeriesInstanceUID of the series to analyse, or None.
        reasons: for every series UID, why it was chosen or not (plain language).
        labels: for every series UID, "series N (description)" for summaries.
        ranked: the eligible series, best first (``chosen`` is the first): the
            ones to fall back on when the chosen series cannot make a volume.
        notes: for eligible series, what the report should say about how they were
            judged (a head recognised from the image).
    """

    chosen: str | None
    reasons: dict[str, str]
    labels: dict[str, str] = field(default_factory=dict)
    ranked: list[str] = field(default_factory=list)
    notes: dict[str, str] = field(default_factory=dict)

    def summary(self) -> str:
        """One line: every series with its reason, the chosen one first."""
        order = sorted(self.reasons, key=lambda uid: uid != self.chosen)
        return "; ".join(f"{self.labels.get(uid, uid)}: {self.reasons[uid]}" for uid in order)


def select_series(series: Mapping[str, Sequence], rules: SelectionRules = SelectionRules()) -> SeriesSelection:
    """Choose the series to analyse among one study's series.

    Args:
        series: ``{series_uid: [InstanceHeader, ...]}`` of one study.
        rules: eligibility and preference rules.

    Returns:
        The selection; ``chosen`` is None when no series is eligible, and
        ``reasons`` then says what was wrong with each.
    """
    if not series:
        raise ValueError("no series given to choose from")
    reasons: dict[str, str] = {}
    labels: dict[str, str] = {}
    notes: dict[str, str] = {}
    eligible: list[tuple[SeriesFacts, str, str]] = []
    for uid, headers in series.items():
        if not headers:
            raise ValueError(f"series {uid} has no instances")
        facts = SeriesFacts.from_headers(uid, headers)
        labels[uid] = facts.label()
        problem = ineligibility(facts, rules, head=True)  # the cheap header rules first
        if not problem and not head_named(facts, rules):
            if facts.body_part:
                problem = (f"not a head examination (body part {facts.body_part}; the image is looked at only "
                           "when no header names the body part)")
            else:
                problem, notes[uid] = _head_from_image(facts, headers)
        if problem:
            notes.pop(uid, None)
            reasons[uid] = f"not eligible: {problem}"
            continue
        tissue, cue = tissue_class(facts, rules)
        eligible.append((facts, tissue, cue))
    if not eligible:
        return SeriesSelection(None, reasons, labels, notes=notes)
    eligible.sort(key=lambda item: (
        _TISSUE_RANK[item[1]], item[0].thickness_mm, -item[0].coverage_mm, _number_key(item[0].series_number),
        item[0].series_uid,
    ))
    best, best_tissue, best_cue = eligible[0]
    reasons[best.series_uid] = (
        f"chosen: {best_tissue} ({best_cue}), {best.thickness_mm:g} mm slices, {best.n_images} images, "
        f"{best.coverage_mm:.0f} mm coverage"
    )
    for facts, tissue, cue in eligible[1:]:
        if tissue != best_tissue:
            why = f"{tissue} reconstruction ({cue}), {best_tissue} preferred"
        elif facts.thickness_mm != best.thickness_mm:
            why = f"thicker slices ({facts.thickness_mm:g} mm) than the chosen series ({best.thickness_mm:g} mm)"
        else:
            why = f"same kind and slice thickness as the chosen series, which covers {best.coverage_mm:.0f} mm " \
                  f"(this one {facts.coverage_mm:.0f} mm) or comes first"
        reasons[facts.series_uid] = f"eligible, not preferred: {why}"
    return SeriesSelection(best.series_uid, reasons, labels, [facts.series_uid for facts, _, _ in eligible], notes)


NOT_NAMED_HEAD = "no head keyword in body part, descriptions or protocol"


def head_named(facts: SeriesFacts, rules: SelectionRules) -> bool:
    """Whether a header of the series calls it a head (a head keyword)."""
    return any(word in facts.head_text for word in rules.head_keywords)


def _head_from_image(facts: SeriesFacts, headers: Sequence) -> tuple[str, str]:
    """(problem or "", note): the image decides whether a series no header calls a head is one."""
    from node.dicom.anatomy import head_in_images

    if facts.sop_class != str(pydicom.uid.CTImageStorage):
        return f"not a head examination ({NOT_NAMED_HEAD}; multi-frame images are not looked at)", ""
    is_head, seen = head_in_images(headers)
    if not is_head:
        return f"not a head examination ({NOT_NAMED_HEAD}, and the image shows no skull around brain: {seen})", ""
    return "", f"{facts.label()} recognised as a head CT from the image ({NOT_NAMED_HEAD}): {seen}"


def ineligibility(facts: SeriesFacts, rules: SelectionRules, head: bool | None = None) -> str:
    """Why the series cannot be analysed, or "" if it is eligible.

    ``head``: whether the series is known to be a head (True: skip that rule);
    None: a head keyword in its headers decides.
    """
    if facts.sop_class not in CT_STORAGE_CLASSES:
        name = pydicom.uid.UID(facts.sop_class).name
        return f"not a CT image series ({name})"
    image_type = facts.image_type
    if "LOCALIZER" in image_type:
        return "localizer (scout) image"
    if image_type and image_type[0] != "ORIGINAL" or "SECONDARY" in image_type:
        return "not an original acquisition (ImageType " + "\\".join(image_type) + ")"
    if facts.normal_angle_deg is None:
        return "images without position and orientation (ImagePositionPatient / ImageOrientationPatient)"
    if facts.normal_angle_deg > rules.max_axial_angle_deg:
        return f"not axial (slices {facts.normal_angle_deg:.0f} deg from axial)"
    if not (head_named(facts, rules) if head is None else head):
        return f"not a head examination ({NOT_NAMED_HEAD})"
    if facts.thickness_mm is None:
        return "slice thickness unknown (no SliceThickness)"
    if facts.thickness_mm > rules.max_slice_thickness_mm:
        return f"slices too thick ({facts.thickness_mm:g} mm > {rules.max_slice_thickness_mm:g} mm)"
    if facts.n_images < rules.min_slices:
        return f"too few images to cover a head ({facts.n_images} < {rules.min_slices})"
    if facts.coverage_mm < rules.min_coverage_mm:
        return f"too short to cover a head ({facts.coverage_mm:.0f} mm < {rules.min_coverage_mm:g} mm)"
    return ""


def tissue_class(facts: SeriesFacts, rules: SelectionRules) -> tuple[str, str]:
    """(SOFT / BONE / UNKNOWN, the cue that decided): kernel, then window centre, then description."""
    by_kernel = rules.kernel_tissue(facts.kernel)
    if by_kernel:
        return by_kernel, f"kernel {facts.kernel}"
    by_window = rules.window_tissue(facts.window_center_hu)
    if by_window:
        return by_window, f"window centre {facts.window_center_hu:g} HU"
    by_description = rules.description_tissue(facts.description)
    if by_description:
        return by_description, f"description {facts.description!r}"
    return UNKNOWN, "kernel, window and description not recognised"


# ---------------------------------------------------------------- header helpers

def _text(ds: pydicom.Dataset, keyword: str) -> str:
    value = ds.get(keyword, None)
    return "" if value is None else str(value).strip()


def _head_text(ds: pydicom.Dataset) -> str:
    """Body part, descriptions, protocol and anatomic region meanings (Enhanced CT: Frame Anatomy), upper case."""
    texts = [_text(ds, k) for k in ("BodyPartExamined", "StudyDescription", "SeriesDescription", "ProtocolName")]
    texts += _region_meanings(ds)
    return " | ".join(texts).upper()


def _body_part(ds: pydicom.Dataset) -> str:
    """The body part the headers name (BodyPartExamined, else the anatomic region's meaning), upper case; "" if none."""
    named = [_text(ds, "BodyPartExamined"), *_region_meanings(ds)]
    return next((text.upper() for text in named if text.strip()), "")


def _region_meanings(ds: pydicom.Dataset) -> list[str]:
    regions = list(ds.get("AnatomicRegionSequence", []))
    for item in ds.get("SharedFunctionalGroupsSequence", [])[:1]:
        for anatomy in item.get("FrameAnatomySequence", [])[:1]:
            regions += list(anatomy.get("AnatomicRegionSequence", []))
    return [str(region.get("CodeMeaning", "")).strip() for region in regions]


def _values(value) -> list:
    if value is None or value == "":
        return []
    if isinstance(value, (list, tuple, pydicom.multival.MultiValue)):
        return list(value)
    return [value]


def _first_of(ds: pydicom.Dataset, keyword: str, functional_group: str):
    """A top-level attribute, else its value in the functional group (shared, else first frame's): Enhanced CT."""
    if keyword in ds and ds[keyword].value not in (None, ""):
        return ds[keyword].value
    for groups in ("SharedFunctionalGroupsSequence", "PerFrameFunctionalGroupsSequence"):
        for item in ds.get(groups, [])[:1]:
            for inner in item.get(functional_group, [])[:1]:
                if keyword in inner:
                    return inner[keyword].value
    return None


def _first_number(value) -> float | None:
    for item in _values(value):
        try:
            return float(item)
        except (TypeError, ValueError):
            return None
    return None


def _coverage_mm(positions: np.ndarray, thickness_mm: float | None) -> float:
    """Extent covered along the normal: first to last slice centre, plus one slice thickness (mm)."""
    if len(positions) == 0:
        return 0.0
    return float(positions.max() - positions.min()) + (thickness_mm or 0.0)


def _frame_count(ds: pydicom.Dataset) -> int:
    return int(ds.get("NumberOfFrames", 1) or 1)


def _positions_along_normal(headers: Sequence) -> tuple[np.ndarray, np.ndarray | None]:
    """Slice positions along the normal (mm) and the normal, from single- or multi-frame headers."""
    points, orientation = [], None
    for header in headers:
        ds = header.dataset
        if "PerFrameFunctionalGroupsSequence" in ds:
            shared = ds.get("SharedFunctionalGroupsSequence", [None])[0]
            for item in ds.PerFrameFunctionalGroupsSequence:
                position = functional_group_value(item, shared, "PlanePositionSequence", "ImagePositionPatient")
                orientation = orientation or functional_group_value(item, shared, "PlaneOrientationSequence",
                                                                    "ImageOrientationPatient")
                if position is not None:
                    points.append(position)
        elif "ImagePositionPatient" in ds and ds.ImagePositionPatient:
            points.append(ds.ImagePositionPatient)
            orientation = orientation or ds.get("ImageOrientationPatient")
    normal = slice_normal(orientation)
    if normal is None or not points:
        return np.zeros(0), None
    return positions_along(normal, points), normal


def _number_key(series_number: str) -> tuple[int, str]:
    try:
        return int(series_number), ""
    except ValueError:
        return 1 << 30, series_number
