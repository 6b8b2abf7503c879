"""Conventions shared by every derived object lobevol writes (SEG, SR, PDF, key images).

Every derived object goes into the source study (same StudyInstanceUID and
patient module) in a new series, and names this node as its manufacturer.
"""
from __future__ import annotations

import copy
import re
import socket
import warnings
from contextlib import contextmanager
from typing import Iterator, Sequence

import highdicom as hd
import pydicom
from pydicom.datadict import dictionary_VM
from pydicom.multival import MultiValue

from inference.vocabulary import Method, __version__

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


#: Which method made the regions (``Segmentation.model["method"]``), as the results name it.
METHOD_DESCRIPTIONS = {
    Method.NETWORK: "3D ResU-Net",
    Method.ATLAS: "atlas registration (ANTs SyN of an adult CT template with the BLAST-CT lobar atlas)",
}


def segmentation_method(model) -> str:
    """"network" or "atlas": the method that made the regions (a model dict without "method" is the network's).

    Raises:
        ValueError: an unknown method.
    """
    method = str(model.get("method") or Method.NETWORK)
    if method not in METHOD_DESCRIPTIONS:
        raise ValueError(f"unknown segmentation method {method!r}; known: {', '.join(map(str, METHOD_DESCRIPTIONS))}")
    return Method(method)


def device_serial_number() -> str:
    """This node's identity in Device Serial Number (the host name, at most 64 characters)."""
    return (socket.gethostname() or "unknown")[:64]


def new_instance_arguments(series_number: int, *, instance_number: int = 1,
                           series_instance_uid: str | None = None) -> dict[str, object]:
    """The arguments every derived instance's highdicom constructor takes alike.

    New SOP Instance UID (and Series Instance UID unless given, for several
    instances of one series), the numbers, and this node as the equipment
    (General Equipment: manufacturer, model, software version, device serial
    number), so SEG, SR and key images identify their maker the same way.
    """
    return {
        "series_instance_uid": series_instance_uid or hd.UID(),
        "series_number": series_number,
        "sop_instance_uid": hd.UID(),
        "instance_number": instance_number,
        "manufacturer": MANUFACTURER,
        "manufacturer_model_name": MANUFACTURER,
        "software_versions": f"{MANUFACTURER} {__version__}",
        "device_serial_number": device_serial_number(),
    }


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


@contextmanager
def source_names_as_they_are() -> Iterator[None]:
    """Build a derived object (highdicom) from the source's names without highdicom's person-name warning.

    highdicom warns for a Person Name of one component ("REMOVED" from a
    de-identification, "ANONYMOUS", a family name alone), putting the name in
    the warning, hence in the node's log. Such a name is valid (PS3.5 6.2.1.2:
    trailing empty components may be left out) and a derived object must carry
    the source's patient name exactly, so the name is kept and only this
    warning is ignored, within this block only.
    """
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=r'The string ".*" is unlikely to represent the intended person name',
                                category=UserWarning)
        yield


def _deidentification_method_missing(dataset: pydicom.Dataset) -> bool:
    return (
        str(dataset.get("PatientIdentityRemoved", "")).upper() == "YES"
        and not dataset.get("DeidentificationMethod")
        and not dataset.get("DeidentificationMethodCodeSequence")
    )


#: Source attributes that reach derived objects or the report, cleaned by :func:`clean_source_text`.
CLEANED_KEYWORDS = (*PATIENT_STUDY_KEYWORDS, "InstitutionName", "SeriesDescription", "ProtocolName",
                    "BodyPartExamined", "Manufacturer", "ManufacturerModelName")
#: Longest value of each text VR (PS3.5 6.2), in characters; PN: per component group.
_MAX_CHARACTERS = {"AE": 16, "AS": 4, "CS": 16, "DA": 8, "DS": 16, "IS": 12, "LO": 64, "PN": 64, "SH": 16,
                   "TM": 14}
_CONTROL = re.compile("[\x00-\x1f\x7f-\x9f]")


def clean_source_text(datasets: Sequence[pydicom.Dataset]) -> tuple[list[pydicom.Dataset], list[str]]:
    """Source headers whose patient, study and series text is valid for its VR; notes on what was cleaned.

    Senders put anything in these: control bytes, several values where one is
    allowed (``Doe^John\\Smith^Jane``), 10,000 characters. Copied as they are,
    they make invalid derived objects (highdicom refuses them) and a report that
    does not fit its page. Each cleaned value: control characters removed, the
    first value kept where the attribute takes one (VM 1), cut to its VR's
    length. The notes name the attribute and what was done, never the value
    (they reach the log). The source datasets are not modified (shallow copies).
    """
    cleaned, notes = [], {}
    for dataset in datasets:
        changes = {}
        for keyword in CLEANED_KEYWORDS:
            element = dataset.get(keyword) if keyword in dataset else None
            if element is None or not isinstance(element, (str, pydicom.valuerep.PersonName, MultiValue)):
                continue
            value, what = _clean_value(keyword, dataset[keyword].VR, element)
            if what:
                changes[keyword] = value
                notes.setdefault(keyword, set()).update(what)
        if changes:
            dataset = copy.copy(dataset)
            for keyword, value in changes.items():
                setattr(dataset, keyword, value)
        cleaned.append(dataset)
    return cleaned, [f"{keyword} of the source cleaned for the results: {', '.join(sorted(what))}"
                     for keyword, what in notes.items()]


def _clean_value(keyword: str, vr: str, value) -> tuple[object, set[str]]:
    what = set()
    values = [str(v) for v in value] if isinstance(value, MultiValue) else [str(value)]
    if len(values) > 1 and dictionary_VM(keyword) == "1":
        values, what = values[:1], {f"{len(values)} values, the first kept"}
    limit = _MAX_CHARACTERS.get(vr)
    result = []
    for text in values:
        if _CONTROL.search(text):
            text = _CONTROL.sub("", text)
            what.add("control characters removed")
        if vr == "PN":
            groups = text.split("=")
            if any(len(group) > 64 for group in groups):
                text = "=".join(group[:64] for group in groups)
                what.add("shortened to 64 characters")
        elif limit is not None and len(text) > limit:
            text = text[:limit]
            what.add(f"shortened to {limit} characters")
        result.append(text.strip() if what else text)
    return (result if len(result) > 1 else result[0]), what
