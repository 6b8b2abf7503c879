"""Find the DICOM instances under a folder, as a scanner, a PACS or a CD leaves them.

:func:`find_dicom_files` walks any nesting of folders, whatever the file
names, and keeps every file that is a DICOM instance: Part 10 files with
their 128-byte preamble, and also bare datasets without preamble or file
meta information (some PACS exports and old archives write those).
Everything else is ignored: text files, images, DICOMDIR and Philips
``DIRFILE`` directory records (Media Storage Directory Storage), and
datasets that lack the UIDs needed to place them in a study and series.

Headers are read without pixel data (``stop_before_pixels``), so scanning a
study of thousands of images is quick; :mod:`node.dicom.volume` reads the
pixels of the one series chosen for analysis.
"""
from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Iterable

import pydicom
from tqdm import tqdm

log = logging.getLogger(__name__)

#: Media Storage Directory Storage: DICOMDIR and Philips DIRFILE, an index, not an instance.
MEDIA_STORAGE_DIRECTORY = "1.2.840.10008.1.3.10"
_REQUIRED_UIDS = ("SOPClassUID", "SOPInstanceUID", "StudyInstanceUID", "SeriesInstanceUID")
#: A dataset without preamble starts with a tag of group 0x0002 (file meta) or 0x0008
#: (identifying module), little endian; checking that keeps pydicom's ``force`` off random files.
_BARE_DATASET_STARTS = (b"\x02\x00", b"\x08\x00")


@dataclass(frozen=True, eq=False)
class InstanceHeader:
    """One DICOM instance on disk, with its header (no pixel data).

    Attributes:
        path: the file.
        study_uid: StudyInstanceUID.
        series_uid: SeriesInstanceUID.
        sop_class_uid: SOPClassUID (what kind of object it is).
        sop_instance_uid: SOPInstanceUID.
        dataset: the header, read with ``stop_before_pixels=True``.
    """

    path: Path
    study_uid: str
    series_uid: str
    sop_class_uid: str
    sop_instance_uid: str
    dataset: pydicom.Dataset

    @classmethod
    def from_dataset(cls, path: Path, dataset: pydicom.Dataset) -> "InstanceHeader":
        """Header of ``dataset`` read from ``path``; ValueError if a UID is missing."""
        missing = [keyword for keyword in _REQUIRED_UIDS if not str(dataset.get(keyword, "") or "").strip()]
        if missing:
            raise ValueError(f"{path}: DICOM dataset without {', '.join(missing)}")
        return cls(
            path=Path(path),
            study_uid=str(dataset.StudyInstanceUID),
            series_uid=str(dataset.SeriesInstanceUID),
            sop_class_uid=str(dataset.SOPClassUID),
            sop_instance_uid=str(dataset.SOPInstanceUID),
            dataset=dataset,
        )


def read_header(path: Path | str) -> InstanceHeader | None:
    """The header of one file, or None when the file is not a DICOM instance.

    Accepts Part 10 files and bare datasets without preamble; returns None
    for non-DICOM files, directory files (DICOMDIR, Philips DIRFILE) and
    datasets without study/series/instance UIDs.
    """
    path = Path(path)
    try:
        with open(path, "rb") as handle:
            start = handle.read(132)
    except OSError as error:
        log.debug("skipping unreadable %s: %s", path, error)
        return None
    has_preamble = start[128:132] == b"DICM"
    if not has_preamble and not start.startswith(_BARE_DATASET_STARTS):
        return None
    try:
        dataset = pydicom.dcmread(path, stop_before_pixels=True, force=not has_preamble)
        meta_class = getattr(dataset.get("file_meta"), "MediaStorageSOPClassUID", "")
        if str(dataset.get("SOPClassUID", "") or meta_class) == MEDIA_STORAGE_DIRECTORY \
                or "DirectoryRecordSequence" in dataset:
            return None
        return InstanceHeader.from_dataset(path, dataset)
    except Exception as error:  # values are parsed lazily: whatever fails to parse, the file is no instance
        log.debug("skipping %s, not a usable DICOM instance: %s", path, error)
        return None


def find_dicom_files(root: Path | str) -> list[InstanceHeader]:
    """Every DICOM instance under ``root`` (a folder, any nesting, or one file).

    Files are visited in sorted path order, so the result is reproducible.
    An instance found twice (same SOP Instance UID, e.g. a file copied into
    two folders) is kept once, from the first path.

    Raises:
        FileNotFoundError: ``root`` does not exist.
    """
    root = Path(root)
    if not root.exists():
        raise FileNotFoundError(f"{root} does not exist")
    paths = [root] if root.is_file() else sorted(p for p in root.rglob("*") if p.is_file())
    headers: list[InstanceHeader] = []
    seen: set[str] = set()
    duplicates = 0
    for path in tqdm(paths, desc="reading DICOM headers", unit="file", disable=None, leave=False):
        header = read_header(path)
        if header is None:
            continue
        if header.sop_instance_uid in seen:
            duplicates += 1
            continue
        seen.add(header.sop_instance_uid)
        headers.append(header)
    if duplicates:
        log.info("%d duplicate instance file(s) under %s ignored", duplicates, root)
    log.info("%d DICOM instance(s) among %d file(s) under %s", len(headers), len(paths), root)
    return headers


def group_by_study(headers: Iterable[InstanceHeader]) -> dict[str, dict[str, list[InstanceHeader]]]:
    """Instances grouped as ``{study_uid: {series_uid: [headers]}}``, in the order first met."""
    studies: dict[str, dict[str, list[InstanceHeader]]] = {}
    for header in headers:
        studies.setdefault(header.study_uid, {}).setdefault(header.series_uid, []).append(header)
    return studies
