"""Finding DICOM instances on disk: any nesting and names, non-DICOM and directory files ignored."""
from __future__ import annotations

from pathlib import Path

import numpy as np
import pydicom
import pytest
from pydicom.filebase import DicomBytesIO
from pydicom.filewriter import write_dataset

from node.dicom.files import find_dicom_files, group_by_study, read_header
from tests.output_fixtures import region_labels, write_ct_series


@pytest.fixture()
def study_folder(tmp_path) -> Path:
    root = tmp_path / "incoming"
    write_ct_series(root / "deep" / "nested" / "a", region_labels((4, 16, 16)), study_uid="1.2.3.4")
    write_ct_series(root / "b", region_labels((3, 16, 16)), study_uid="1.2.3.5")
    (root / "README.txt").write_text("not DICOM, ignored")
    (root / "picture.png").write_bytes(b"\x89PNG\r\n\x1a\n" + bytes(300))
    (root / "DICM_in_name_only").write_bytes(b"\x00" * 128 + b"DICX" + bytes(100))
    return root


def test_nested_folders_any_names_and_non_dicom_files(study_folder):
    headers = find_dicom_files(study_folder)
    assert len(headers) == 7
    studies = group_by_study(headers)
    assert sorted(studies) == ["1.2.3.4", "1.2.3.5"]
    assert [len(instances) for series in studies.values() for instances in series.values()] in ([4, 3], [3, 4])
    header = headers[0]
    assert header.sop_class_uid == pydicom.uid.CTImageStorage
    assert "PixelData" not in header.dataset  # headers only: the series volume reads the pixels
    assert header.dataset.SOPInstanceUID == header.sop_instance_uid


def test_renamed_files_without_extension_and_duplicates(study_folder, tmp_path):
    first = sorted(study_folder.rglob("IM1.dcm"))[0]
    (study_folder / "copy_of_first").write_bytes(first.read_bytes())  # same SOP Instance UID
    (study_folder / "X0001").write_bytes(first.read_bytes())
    assert len(find_dicom_files(study_folder)) == 7


def test_files_without_preamble_are_accepted(tmp_path):
    (path,) = write_ct_series(tmp_path / "src", region_labels((1, 8, 8)))
    data = path.read_bytes()
    no_preamble = tmp_path / "no_preamble"
    no_preamble.write_bytes(data[132:])  # file meta group, no preamble, no "DICM"
    ds = pydicom.dcmread(path)
    buffer = DicomBytesIO()  # dataset only, implicit VR little endian, as old archives hold it
    buffer.is_little_endian, buffer.is_implicit_VR = True, True
    write_dataset(buffer, pydicom.Dataset(ds))
    bare = tmp_path / "bare"
    bare.write_bytes(buffer.getvalue())
    assert bare.read_bytes()[:2] == b"\x08\x00"
    for candidate in (no_preamble, bare):
        header = read_header(candidate)
        assert header is not None, candidate
        assert header.sop_instance_uid == ds.SOPInstanceUID


def test_directory_files_and_datasets_without_uids_are_ignored(tmp_path, real_ct):
    dirfile = real_ct / "Philips" / "S21570" / "S2010" / "DIRFILE"
    assert pydicom.dcmread(dirfile).file_meta.MediaStorageSOPClassUID == "1.2.840.10008.1.3.10"
    assert read_header(dirfile) is None
    (path,) = write_ct_series(tmp_path / "src", region_labels((1, 8, 8)))
    ds = pydicom.dcmread(path)
    del ds.SeriesInstanceUID
    ds.save_as(tmp_path / "no_series_uid.dcm")
    assert read_header(tmp_path / "no_series_uid.dcm") is None
    assert read_header(tmp_path / "missing.dcm") is None
    rng = np.random.default_rng(0)
    for n, start in enumerate((b"\x08\x00", b"\x02\x00", b"\x00" * 128 + b"DICM")):  # look like DICOM, are not
        garbage = tmp_path / f"garbage{n}"
        garbage.write_bytes(start + rng.integers(0, 256, 2000, dtype=np.uint8).tobytes())
        assert read_header(garbage) is None


def test_real_philips_study(real_ct):
    headers = find_dicom_files(real_ct / "Philips")
    assert len(headers) == 1 + 28 + 140 + 140 + 6  # the five DIRFILEs are not instances
    studies = group_by_study(headers)
    assert len(studies) == 1
    (series,) = studies.values()
    assert sorted(len(v) for v in series.values()) == [1, 6, 28, 140, 140]


def test_missing_root_is_an_error(tmp_path):
    with pytest.raises(FileNotFoundError, match="does not exist"):
        find_dicom_files(tmp_path / "nowhere")
