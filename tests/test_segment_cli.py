"""``lobevol segment``: DICOM folders, image input, clear failures."""
from __future__ import annotations

import csv
from pathlib import Path

import numpy as np
import pytest
import SimpleITK as sitk

from inference.vocabulary import REGION_KEYS
from node.cli import main
from tests.node_peers import tiny_checkpoint
from tests.output_fixtures import PartitionSegmenter, region_labels, write_ct_series


@pytest.fixture()
def model_free(monkeypatch):
    """Run the command with the model-free PartitionSegmenter (deterministic regions, no weights)."""
    import node.cli.segment as segment_command

    monkeypatch.setattr(segment_command, "_segmenter", lambda args: PartitionSegmenter())


@pytest.fixture(scope="module")
def two_studies(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("incoming")
    for name in ("one", "two"):
        write_ct_series(root / name / "series", region_labels((20, 48, 48)), pixel_spacing_mm=3.5, slice_spacing_mm=5.0)
    (root / "DICOMDIR.txt").write_text("not DICOM")
    return root


def test_segment_two_studies_writes_results_and_one_csv(two_studies, model_free, tmp_path, capsys):
    status = main(["segment", str(two_studies), "--out", str(tmp_path)])
    out = capsys.readouterr().out
    assert status == 0, out
    study_dirs = [p for p in tmp_path.iterdir() if p.is_dir()]
    assert len(study_dirs) == 2
    for folder in study_dirs:
        assert {p.name for p in folder.iterdir()} == {
            "seg.dcm", "sr.dcm", "report.dcm", "report.pdf", "labels.nii.gz", "volumes.json", "volumes.csv",
            "key_axial.dcm", "key_coronal.dcm", "key_sagittal.dcm"}
    assert out.count(": done in") == 2 and "Test" not in out and "LV-TEST" not in out  # no patient identifiers
    with open(tmp_path / "volumes.csv") as handle:
        rows = list(csv.reader(handle))
    assert rows[0] == ["id", "sex", "age_years", *REGION_KEYS] and len(rows) == 3
    assert {row[0] for row in rows[1:]} == {p.name for p in study_dirs}  # one row per study, by study UID
    assert all(row[1] == "F" and float(row[2]) == pytest.approx(920 / 365.25, abs=1e-3) for row in rows[1:])


def test_segment_options_choose_the_outputs(two_studies, model_free, tmp_path, capsys):
    status = main(["segment", str(two_studies / "one"), "--out", str(tmp_path), "--seg", "labelmap", "--no-sr",
                   "--no-pdf", "--no-overlays"])
    assert status == 0, capsys.readouterr()
    (folder,) = tmp_path.iterdir()
    assert {p.name for p in folder.iterdir()} == {"seg.dcm", "labels.nii.gz", "volumes.json", "volumes.csv"}
    assert not (tmp_path / "volumes.csv").exists()  # one study: no combined CSV


def test_segment_image_input_writes_plain_files_and_pdf(model_free, tmp_path, capsys):
    labels = region_labels((24, 48, 48))
    hu = np.where(labels > 0, 30.0, -1000.0).astype(np.float32)
    image = sitk.GetImageFromArray(hu)
    image.SetSpacing((3.5, 3.5, 5.0))
    path = tmp_path / "scan.nii.gz"
    sitk.WriteImage(image, str(path))
    status = main(["segment", str(path), "--out", str(tmp_path / "out"), "--sex", "F", "--age", "2.1"])
    assert status == 0, capsys.readouterr()
    written = {p.name for p in (tmp_path / "out" / "scan").iterdir()}
    assert written == {"labels.nii.gz", "volumes.json", "volumes.csv", "report.pdf"}
    with open(tmp_path / "out" / "scan" / "volumes.csv") as handle:
        row = next(csv.DictReader(handle))
    assert (row["id"], row["sex"], row["age_years"]) == ("scan", "F", "2.100")


def test_segment_builds_the_segmenter_from_the_options(tmp_path):
    import argparse

    from node.cli.segment import _segmenter

    path = tiny_checkpoint(tmp_path / "tiny.pt")
    segmenter = _segmenter(argparse.Namespace(model=str(path), device="cpu", threads=1, tta=True,
                                              refine_surface=True))
    assert (segmenter.checkpoint, str(segmenter.device), segmenter.tta) == (path, "cpu", True)
    assert segmenter.model["name"] == "tiny" and segmenter.model["trained_on"] == "untrained (test)"
    # The loaded model runs on a CT and labels exactly the input grid.
    labels = region_labels((20, 40, 40))
    write_ct_series(tmp_path / "ct", labels, pixel_spacing_mm=4.0, slice_spacing_mm=5.0)
    from node.dicom.files import find_dicom_files
    from node.dicom.volume import load_series_volume

    volume = load_series_volume(find_dicom_files(tmp_path / "ct"))
    result = segmenter.segment(volume.image)
    assert result.labels.GetSize() == volume.image.GetSize() and set(result.volumes_cm3) == set(REGION_KEYS)


def test_segment_help_teaches_with_examples(capsys):
    with pytest.raises(SystemExit) as exit_info:
        main(["segment", "--help"])
    assert exit_info.value.code == 0
    text = capsys.readouterr().out
    assert "examples:" in text and "lobevol segment /media/cd/DICOM --out results" in text


@pytest.mark.parametrize(
    "arguments, message",
    [
        (["/nonexistent/folder"], "does not exist"),
        (["{tmp}/notes.txt"], "not an image"),
        (["{tmp}/empty"], "no DICOM files"),
        (["{tmp}/empty", "--sex", "F"], "--sex and --age apply to image input"),
        (["{tmp}/empty", "--seg", "none"], "no DICOM files"),
    ],
)
def test_segment_fails_clearly(arguments, message, tmp_path, capsys):
    (tmp_path / "notes.txt").write_text("hello")
    (tmp_path / "empty").mkdir()
    (tmp_path / "empty" / "readme.md").write_text("no DICOM here")
    argv = ["segment", *[a.format(tmp=tmp_path) for a in arguments], "--out", str(tmp_path / "out")]
    assert main(argv) == 1
    assert message in capsys.readouterr().err


def test_segment_names_each_study_when_none_can_be_analysed(tmp_path, capsys, monkeypatch):
    # Only Secondary Capture images: no series to analyse; the message says why, per study.
    import node.cli.segment as segment_command

    source = tmp_path / "ct"
    write_ct_series(source, region_labels((20, 32, 32)))  # 100 mm: covers a head
    monkeypatch.setattr(segment_command, "_segmenter", lambda args: PartitionSegmenter())
    assert main(["segment", str(source), "--out", str(tmp_path / "first"), "--seg", "none", "--no-pdf"]) == 0
    captures = tmp_path / "captures"
    captures.mkdir()
    for path in (tmp_path / "first").rglob("key_*.dcm"):
        (captures / path.name).write_bytes(path.read_bytes())
    capsys.readouterr()
    assert main(["segment", str(captures), "--out", str(tmp_path / "second")]) == 1
    error = capsys.readouterr().err
    assert "no study could be analysed" in error and "no suitable head CT series" in error


def test_segment_takes_selection_rules_from_a_config_file(two_studies, model_free, tmp_path, capsys):
    config = tmp_path / "config.ini"
    config.write_text("[selection]\nmax_slice_thickness_mm = 4\n\n[outputs]\noverlays = no\n")
    assert main(["segment", str(two_studies / "one"), "--out", str(tmp_path / "strict"), "--config", str(config)]) == 1
    assert "slices too thick (5 mm > 4 mm)" in capsys.readouterr().err
    config.write_text("[selection]\nmax_slice_thickness_mm = 6\n\n[outputs]\noverlays = no\n")
    assert main(["segment", str(two_studies / "one"), "--out", str(tmp_path / "ok"), "--config", str(config),
                 "--no-pdf"]) == 0
    (folder,) = (tmp_path / "ok").iterdir()
    assert {p.name for p in folder.iterdir()} == {"seg.dcm", "sr.dcm", "labels.nii.gz", "volumes.json", "volumes.csv"}


def test_segment_max_gap_factor_option(model_free, tmp_path, capsys):
    paths = write_ct_series(tmp_path / "ct", region_labels((24, 40, 40)))
    for path in paths[10:12]:  # a 15 mm gap in 5 mm slices: 3 x the spacing
        path.unlink()
    assert main(["segment", str(tmp_path / "ct"), "--out", str(tmp_path / "a")]) == 1
    assert "gap of 15.00 mm" in capsys.readouterr().err
    assert main(["segment", str(tmp_path / "ct"), "--out", str(tmp_path / "b"), "--max-gap-factor", "3.5"]) == 0


def test_segment_dry_run_lists_the_series_and_the_choice(real_ct, tmp_path, capsys):
    assert main(["segment", str(real_ct / "Philips"), "--dry-run"]) == 0
    out = capsys.readouterr().out.splitlines()
    assert out[0].endswith("would analyse series 202 (STD BRAIN 1MM, iDose)") and len(out) == 6
    assert any("series 203 (BONE BRAIN 1MM), 140 instance(s): eligible, not preferred: bone" in line for line in out)
    assert main(["segment", str(real_ct / "Philips" / "S21570" / "S4010"), "--dry-run"]) == 1
    assert "none of the 1 study(ies) has a series to analyse" in capsys.readouterr().err
    assert main(["segment", str(real_ct / "GE")]) == 1
    assert "--out DIR is required" in capsys.readouterr().err


def test_segment_of_a_study_with_hostile_patient_text_writes_its_results(model_free, tmp_path, capsys):
    import pydicom

    paths = write_ct_series(tmp_path / "in", region_labels((20, 40, 40)))
    for path in paths:
        ds = pydicom.dcmread(path)
        ds.PatientName = "Doe^John\\Smith^Jane"
        ds.PatientID = "ID\x1b[31m\x00"
        ds.InstitutionName = "Hospital\r\nforged" * 700
        ds.save_as(path)
    assert main(["segment", str(tmp_path / "in"), "--out", str(tmp_path / "out")]) == 0
    (folder,) = [p for p in (tmp_path / "out").iterdir() if p.is_dir()]
    assert {"seg.dcm", "sr.dcm", "report.dcm", "report.pdf"} <= {p.name for p in folder.iterdir()}
    seg = pydicom.dcmread(folder / "seg.dcm", stop_before_pixels=True)
    assert (str(seg.PatientName), seg.PatientID) == ("Doe^John", "ID[31m")
    assert "done" in capsys.readouterr().out
