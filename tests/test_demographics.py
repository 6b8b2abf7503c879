"""Sex and age at scan from the header: every source, and missing values reported, never guessed."""
from __future__ import annotations

import pydicom
import pytest

from node.dicom.demographics import Demographics, demographics_from, parse_dicom_date, parse_patient_age


def header(**attributes) -> pydicom.Dataset:
    ds = pydicom.Dataset()
    for keyword, value in attributes.items():
        setattr(ds, keyword, value)
    return ds


@pytest.mark.parametrize("value, years", [("002Y", 2.0), ("018M", 1.5), ("052W", 52 * 7 / 365.25),
                                          ("200D", 200 / 365.25), ("2y", 2.0)])
def test_patient_age_units(value, years):
    assert parse_patient_age(value) == pytest.approx(years)


@pytest.mark.parametrize("value", ["2 years", "", "002", "1234Y", "-02Y"])
def test_bad_patient_age_is_refused(value):
    with pytest.raises(ValueError, match="nnnD, nnnW, nnnM or nnnY"):
        parse_patient_age(value)


def test_birth_date_and_study_date_give_the_exact_age():
    result = demographics_from(header(PatientSex="F", PatientBirthDate="20220310", StudyDate="20240915"))
    assert (result.sex, result.age_source, result.notes) == ("F", "PatientBirthDate and StudyDate", [])
    assert result.age_years == pytest.approx(920 / 365.25)


def test_dates_win_over_a_rounded_patient_age_and_agreement_is_silent():
    result = demographics_from(header(PatientSex="M", PatientAge="002Y", PatientBirthDate="20220310",
                                      StudyDate="20240915"))
    assert result.age_years == pytest.approx(920 / 365.25) and result.notes == []


def test_disagreeing_patient_age_is_reported():
    result = demographics_from(header(PatientSex="M", PatientAge="005Y", PatientBirthDate="20220310",
                                      StudyDate="20240915"))
    assert result.age_years == pytest.approx(920 / 365.25)
    assert any("disagrees" in note for note in result.notes)


def test_acquisition_date_then_series_date_when_study_date_is_missing():
    result = demographics_from(header(PatientSex="M", PatientBirthDate="20220310", StudyDate="",
                                      AcquisitionDate="20230310"))
    assert result.age_source == "PatientBirthDate and AcquisitionDate" and result.age_years == pytest.approx(1.0, abs=0.01)
    result = demographics_from(header(PatientSex="M", PatientBirthDate="20220310", SeriesDate="20240310"))
    assert result.age_source == "PatientBirthDate and SeriesDate" and result.age_years == pytest.approx(2.0, abs=0.01)


def test_patient_age_alone():
    result = demographics_from(header(PatientSex="F", PatientAge="030M"))
    assert (result.age_years, result.age_source) == (2.5, "PatientAge")


def test_missing_values_are_reported_never_guessed():
    result = demographics_from(header())
    assert (result.sex, result.age_years, result.age_source) == (None, None, "")
    assert any("sex missing" in note for note in result.notes)
    assert any("age unknown" in note for note in result.notes)


@pytest.mark.filterwarnings("ignore:Invalid value for VR")
@pytest.mark.parametrize(
    "attributes, fragment",
    [
        ({"PatientSex": "O"}, "neither M nor F"),
        ({"PatientSex": "M", "PatientAge": "two"}, "not of the form"),
        ({"PatientSex": "M", "PatientBirthDate": "20220310"}, "no scan date"),
        ({"PatientSex": "M", "PatientBirthDate": "20221310", "StudyDate": "20240101"}, "not a valid date"),
        ({"PatientSex": "M", "PatientBirthDate": "20240310", "StudyDate": "20220101"}, "before PatientBirthDate"),
    ],
)
def test_unusable_values_are_reported(attributes, fragment):
    result = demographics_from(header(**attributes))
    assert any(fragment in note for note in result.notes), result.notes
    assert result.age_years is None


def test_real_ge_sample_has_neither_sex_nor_age(real_ct):
    ds = pydicom.dcmread(next((real_ct / "GE").iterdir()), stop_before_pixels=True)
    result = demographics_from(ds)
    assert (result.sex, result.age_years) == (None, None) and len(result.notes) == 2


def test_old_style_dates_and_validation():
    assert parse_dicom_date("2024.09.15").isoformat() == "2024-09-15"
    with pytest.raises(ValueError, match="sex"):
        Demographics("X", None)
    with pytest.raises(ValueError, match="age"):
        Demographics("M", -1.0)
