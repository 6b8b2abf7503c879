"""Conventions shared by every derived object lobevol writes (SEG, SR, PDF, key images).

Every derived object goes into the source study (same StudyInstanceUID and
patient module) in a new series, and names this node as its manufacturer.
"""
from __future__ import annotations

import copy
import socket
from typing import Sequence

import pydicom

MANUFACTURER = "lobevol"

#: Patient and study attributes copied from the source into derived objects.
PATIENT_STUDY_KEYWORDS = (
    "PatientName", "PatientID", "IssuerOfPatientID", "PatientBirthDate", "PatientSex", "PatientAge",
    "OtherPatientIDsSequence", "StudyInstanceUID", "StudyDate", "StudyTime", "StudyID", "AccessionNumber",
    "ReferringPhysicianName", "StudyDescription", "PatientIdentityRemoved", "DeidentificationMethod",
    "DeidentificationMethodCodeSequence",
)
#: Type 2 patient and study attributes: present (possibly empty) in every derived object.
REQUIRED_PATIENT_STUDY_KEYWORDS = (
    "PatientName", "PatientID", "PatientBirthDate", "PatientSex", "StudyDate", "StudyTime", "StudyID",
    "AccessionNumber", "ReferringPhysicianName",
)


def device_serial_number() -> str:
    """This node's identity in Device Serial Number (the host name, at most 64 characters)."""
    return (socket.gethostname() or "unknown")[:64]


def with_required_patient_study(datasets: Sequence[pydicom.Dataset]) -> list[pydicom.Dataset]:
    """Shallow copies of source headers with missing Type 2 patient/study attributes added empty.

    Scanners omit some (the GE sample has no PatientSex or PatientBirthDate);
    highdicom copies them into derived objects and needs them present. A
    de-identified source that does not say how (PatientIdentityRemoved YES,
    empty DeidentificationMethod, which the standard requires) gets a method
    text saying so, rather than an invalid derived object. The source
    datasets themselves are not modified.
    """
    completed = []
    for dataset in datasets:
        missing = [k for k in REQUIRED_PATIENT_STUDY_KEYWORDS if k not in dataset]
        unstated_method = _deidentification_method_missing(dataset)
        if missing or unstated_method:
            dataset = copy.copy(dataset)
            for keyword in missing:
                setattr(dataset, keyword, None)
            if unstated_method:
                dataset.DeidentificationMethod = UNSTATED_DEIDENTIFICATION
        completed.append(dataset)
    return completed


UNSTATED_DEIDENTIFICATION = "not stated in the source images"


def _deidentification_method_missing(dataset: pydicom.Dataset) -> bool:
    return (
        str(dataset.get("PatientIdentityRemoved", "")).upper() == "YES"
        and not dataset.get("DeidentificationMethod")
        and not dataset.get("DeidentificationMethodCodeSequence")
    )
