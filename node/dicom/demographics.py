"""Patient sex and age at the scan, from the DICOM header, never guessed.

The normative comparison needs sex and age. They come from:
- sex: PatientSex ("M" or "F"; "O", empty or absent give no sex);
- age: PatientAge ("nnnD", "nnnW", "nnnM" or "nnnY"), else PatientBirthDate
  with the scan date: StudyDate, else AcquisitionDate, else SeriesDate.

What is missing or unusable is said in ``notes`` (plain language, for the
report), and the value stays None. When PatientAge and the dates disagree
by more than a month, the dates win (PatientAge is often rounded or typed
by hand) and the disagreement is reported.
"""
from __future__ import annotations

import re
from dataclasses import dataclass, field
from datetime import date

import pydicom

DAYS_PER_YEAR = 365.25
_AGE_UNITS_DAYS = {"D": 1.0, "W": 7.0, "M": DAYS_PER_YEAR / 12.0, "Y": DAYS_PER_YEAR}
_AGE_PATTERN = re.compile(r"^(\d{1,3})([DWMY])$")
_SCAN_DATE_KEYWORDS = ("StudyDate", "AcquisitionDate", "SeriesDate")
#: Ages and dates further apart than this (years) are reported as inconsistent.
_AGE_DISAGREEMENT_YEARS = 1.0 / 12.0


@dataclass
class Demographics:
    """Sex and age at scan of one patient.

    Attributes:
        sex: "M", "F" or None (unknown).
        age_years: age at the scan in years, or None (unknown).
        age_source: where the age came from ("PatientBirthDate and StudyDate",
            "PatientAge", ...), "" when unknown.
        notes: what was missing or inconsistent, in plain language.
    """

    sex: str | None
    age_years: float | None
    age_source: str = ""
    notes: list[str] = field(default_factory=list)

    def __post_init__(self) -> None:
        if self.sex not in ("M", "F", None):
            raise ValueError(f"sex must be 'M', 'F' or None, got {self.sex!r}")
        if self.age_years is not None and not self.age_years >= 0:
            raise ValueError(f"age must be zero or positive, got {self.age_years}")


def parse_patient_age(value: str) -> float:
    """Age in years from a DICOM Age String ("002Y", "018M", "030W", "200D").

    Raises:
        ValueError: the value is not of the form nnnD, nnnW, nnnM or nnnY.
    """
    match = _AGE_PATTERN.match(str(value).strip().upper())
    if match is None:
        raise ValueError(f"PatientAge {value!r} is not of the form nnnD, nnnW, nnnM or nnnY")
    number, unit = match.groups()
    return int(number) * _AGE_UNITS_DAYS[unit] / DAYS_PER_YEAR


def parse_dicom_date(value: str, keyword: str = "date") -> date:
    """A DICOM DA value (YYYYMMDD; the old YYYY.MM.DD form too) as a date.

    Raises:
        ValueError: the value is not a valid date.
    """
    text = str(value).strip().replace(".", "")
    try:
        if len(text) != 8 or not text.isdigit():
            raise ValueError
        return date(int(text[:4]), int(text[4:6]), int(text[6:]))
    except ValueError:
        raise ValueError(f"{keyword} {value!r} is not a valid date (YYYYMMDD)") from None


def age_between(birth: date, scan: date) -> float:
    """Age in years at ``scan`` of someone born on ``birth``."""
    return (scan - birth).days / DAYS_PER_YEAR


def demographics_from(ds: pydicom.Dataset) -> Demographics:
    """Sex and age at scan from a CT image header; missing values are reported in notes."""
    notes: list[str] = []
    sex = _sex(ds, notes)
    age, source = _age(ds, notes)
    return Demographics(sex, age, source, notes)


def _text(ds: pydicom.Dataset, keyword: str) -> str:
    value = ds.get(keyword, None)
    return "" if value is None else str(value).strip()


def _sex(ds: pydicom.Dataset, notes: list[str]) -> str | None:
    value = _text(ds, "PatientSex").upper()
    if value in ("M", "F"):
        return value
    if not value:
        notes.append("patient sex missing from the DICOM header (PatientSex empty or absent)")
    else:
        notes.append(f"patient sex {value!r} is neither M nor F: no sex-specific reference applies")
    return None


def _age(ds: pydicom.Dataset, notes: list[str]) -> tuple[float | None, str]:
    from_age = None
    patient_age = _text(ds, "PatientAge")
    if patient_age:
        try:
            from_age = parse_patient_age(patient_age)
        except ValueError as error:
            notes.append(f"{error}; ignored")
    from_dates, date_source = _age_from_dates(ds, notes if from_age is None else [])
    if from_dates is not None:
        if from_age is not None and not _consistent(from_age, patient_age, from_dates):
            notes.append(
                f"PatientAge ({from_age:.2f} y) disagrees with the birth and scan dates ({from_dates:.2f} y); "
                "the dates are used"
            )
        return from_dates, date_source
    if from_age is not None:
        return from_age, "PatientAge"
    if not patient_age:
        notes.append("patient age unknown: PatientAge is absent and PatientBirthDate with a scan date is not available")
    return None, ""


def _consistent(age_years: float, patient_age: str, from_dates: float) -> bool:
    """Whether the dates' age falls in the PatientAge interval ('002Y' means [2, 3) years), give or take a month."""
    resolution = _AGE_UNITS_DAYS[patient_age.strip().upper()[-1]] / DAYS_PER_YEAR
    return age_years - _AGE_DISAGREEMENT_YEARS <= from_dates < age_years + resolution + _AGE_DISAGREEMENT_YEARS


def _age_from_dates(ds: pydicom.Dataset, notes: list[str]) -> tuple[float | None, str]:
    birth_text = _text(ds, "PatientBirthDate")
    if not birth_text:
        return None, ""
    try:
        birth = parse_dicom_date(birth_text, "PatientBirthDate")
    except ValueError as error:
        notes.append(f"{error}; ignored")
        return None, ""
    for keyword in _SCAN_DATE_KEYWORDS:
        text = _text(ds, keyword)
        if not text:
            continue
        try:
            scan = parse_dicom_date(text, keyword)
        except ValueError as error:
            notes.append(f"{error}; ignored")
            continue
        if scan < birth:
            notes.append(f"{keyword} is before PatientBirthDate: age not computed")
            return None, ""
        return age_between(birth, scan), f"PatientBirthDate and {keyword}"
    notes.append("PatientBirthDate is given but no scan date (StudyDate, AcquisitionDate, SeriesDate)")
    return None, ""
