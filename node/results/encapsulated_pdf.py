"""Encapsulated PDF Storage instance holding the report, in the source study.

highdicom has no Encapsulated PDF class, so the modules are written here:
Patient and General Study (copied from a source image), Encapsulated
Document Series (Modality DOC, new series), General Equipment, SC Equipment
(Conversion Type WSD: workstation), Encapsulated Document (Document Title,
MIME type application/pdf, the PDF, Source Instance Sequence naming the
analysed images) and SOP Common.
"""
from __future__ import annotations

from datetime import datetime
from typing import Sequence

import highdicom as hd
import pydicom
from pydicom.dataset import FileDataset, FileMetaDataset, validate_file_meta
from pydicom.uid import EncapsulatedPDFStorage, ExplicitVRLittleEndian

from inference.vocabulary import __version__
from node.results.derived import MANUFACTURER, PATIENT_STUDY_KEYWORDS, with_required_patient_study

PDF_SERIES_NUMBER = 9103
PDF_SERIES_DESCRIPTION = "lobevol report"
DOCUMENT_TITLE = "lobevol brain region volumetry report"

def build_encapsulated_pdf(
    pdf: bytes,
    source: pydicom.Dataset,
    *,
    source_instances: Sequence[pydicom.Dataset] = (),
    title: str = DOCUMENT_TITLE,
    series_number: int = PDF_SERIES_NUMBER,
    created: datetime | None = None,
) -> FileDataset:
    """Wrap a PDF as an Encapsulated PDF instance (file dataset, ready to save).

    Args:
        pdf: the PDF bytes (must start with ``%PDF``).
        source: one image of the analysed series (patient and study are copied from it).
        source_instances: the images the report was derived from (listed in
            Source Instance Sequence); default the ``source`` alone.
        title: Document Title.
        series_number: Series Number of the new series.
        created: content date and time (default now).
    """
    if not pdf.startswith(b"%PDF"):
        raise ValueError("the document to encapsulate is not a PDF (it does not start with %PDF)")
    if "StudyInstanceUID" not in source:
        raise ValueError("the source dataset has no StudyInstanceUID: cannot place the report in its study")
    now = created or datetime.now()
    ds = pydicom.Dataset()
    completed = with_required_patient_study([source])[0]
    for keyword in PATIENT_STUDY_KEYWORDS:
        if keyword in completed:
            setattr(ds, keyword, completed[keyword].value)
    ds.SOPClassUID = EncapsulatedPDFStorage
    ds.SOPInstanceUID = hd.UID()
    ds.Modality = "DOC"
    ds.SeriesInstanceUID = hd.UID()
    ds.SeriesNumber = series_number
    ds.SeriesDescription = PDF_SERIES_DESCRIPTION
    ds.Manufacturer = MANUFACTURER
    ds.SoftwareVersions = f"{MANUFACTURER} {__version__}"
    ds.ConversionType = "WSD"
    ds.InstanceNumber = 1
    ds.ContentDate, ds.ContentTime = now.strftime("%Y%m%d"), now.strftime("%H%M%S")
    ds.AcquisitionDateTime = now.strftime("%Y%m%d%H%M%S")
    ds.InstanceCreationDate, ds.InstanceCreationTime = ds.ContentDate, ds.ContentTime
    ds.BurnedInAnnotation = "YES"  # the PDF names the patient
    ds.DocumentTitle = title[:64]
    ds.ConceptNameCodeSequence = []
    ds.MIMETypeOfEncapsulatedDocument = "application/pdf"
    ds.SourceInstanceSequence = [_reference(item) for item in (source_instances or [source])]
    # OB values must have even length; PDF readers ignore a trailing NUL.
    ds.EncapsulatedDocument = pdf + b"\0" if len(pdf) % 2 else pdf
    ds.EncapsulatedDocumentLength = len(pdf)
    ds.SpecificCharacterSet = source.get("SpecificCharacterSet", "ISO_IR 100")
    return _as_file_dataset(ds)


def _as_file_dataset(ds: pydicom.Dataset) -> FileDataset:
    """Give the dataset a complete file meta group, so a plain ``save_as`` writes a valid Part 10 file."""
    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = ds.SOPClassUID
    meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID
    meta.TransferSyntaxUID = ExplicitVRLittleEndian
    validate_file_meta(meta, enforce_standard=True)  # adds version and implementation UID
    meta.FileMetaInformationGroupLength = 0  # present, so pydicom writes it with the right value
    return FileDataset(None, ds, file_meta=meta, preamble=b"\0" * 128)


def _reference(instance: pydicom.Dataset) -> pydicom.Dataset:
    item = pydicom.Dataset()
    item.ReferencedSOPClassUID = instance.SOPClassUID
    item.ReferencedSOPInstanceUID = instance.SOPInstanceUID
    return item


def pdf_from_encapsulated(ds: pydicom.Dataset) -> bytes:
    """The PDF inside an Encapsulated PDF instance (padding removed)."""
    document = bytes(ds.EncapsulatedDocument)
    length = int(ds.get("EncapsulatedDocumentLength", len(document)))
    return document[:length]
