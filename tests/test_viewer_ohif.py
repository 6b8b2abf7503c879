"""Our SEG and SR in the OHIF Viewer, in a real browser: what a radiologist would open.

Orthanc with its DICOMweb plugin holds a phantom study and our results
(binary SEG, LABELMAP SEG, TID 1500 SR); the prebuilt OHIF Viewer 3.13
(``tests/browser/fetch-ohif.sh``) is served on loopback and opened in headless
Debian Chromium by ``tests/browser/ohif_check.js`` (playwright-core). A clean
console proves nothing about placement, so the label images OHIF built from
each SEG are compared, CT image by CT image and pixel by pixel, with the
label map we wrote; then the segment names and the colours OHIF paints with.

Run alone::

    make browser-deps   # npm ci in tests/browser + the OHIF build
    PYTHONPATH=$PWD .venv/bin/python -m pytest -q tests/test_viewer_ohif.py

Screenshots go to ``tests/browser/artifacts/`` (printed by the test).
"""
from __future__ import annotations

import base64
import json
import shutil
import subprocess
import time
from pathlib import Path

import highdicom as hd
import numpy as np
import pydicom
import pytest
import SimpleITK as sitk

from inference.vocabulary import REGIONS
from node.cli import main
from node.dicom.files import find_dicom_files
from node.dicom.volume import load_series_volume
from node.results.seg import build_seg, segment_numbers_by_key
from tests.node_peers import Orthanc
from tests.output_fixtures import MODEL
from tests.ohif_viewer import BROWSER_DIR, ViewerServer, chromium, dicomweb_settings, node_driver

pytestmark = pytest.mark.integration

ARTIFACTS = BROWSER_DIR / "artifacts"
#: CIELab -> RGB in OHIF (dcmjs) and in highdicom round differently.
COLOUR_TOLERANCE = 3


def _segment(source: Path, out: Path, seg_type: str, sr: bool) -> Path:
    """``lobevol segment`` with the bundled model; returns the study's result folder."""
    arguments = ["segment", str(source), "--out", str(out), "--seg", seg_type, "--threads", "1", "--no-tta",
                 "--no-pdf", "--no-overlays"]
    assert main(arguments + ([] if sr else ["--no-sr"])) == 0
    (folder,) = [p for p in out.iterdir() if p.is_dir()]
    return folder


@pytest.fixture(scope="module")
def study(tmp_path_factory):
    """A small phantom (128 x 128, 3 mm slices) and our results on it, binary and LABELMAP."""
    root = tmp_path_factory.mktemp("viewer")
    assert main(["phantom", "--out", str(root / "phantom"), "--matrix", "128", "--pixel-spacing", "1.8",
                 "--slice-thickness", "3", "--seed", "5"]) == 0
    ct = root / "phantom" / "case_0000" / "dicom"
    binary = _segment(ct, root / "binary", "binary", sr=True)
    labelmap = _segment(ct, root / "labelmap", "labelmap", sr=False)
    return {"ct": sorted(ct.iterdir()), "binary": binary, "labelmap": labelmap, "root": root,
            "shifted": _shifted_seg(ct, binary, root / "shifted")}


def _shifted_seg(ct: Path, result: Path, out: Path) -> Path:
    """A negative control: a binary SEG of the same labels, each frame on the next CT image.

    ``out`` gets that SEG and the true ``labels.nii.gz``: OHIF shows such a SEG
    without a word, so only the pixel comparison can catch it.
    """
    volume = load_series_volume(find_dicom_files(ct))
    label_slices = volume.labels_on_source_slices(sitk.ReadImage(str(result / "labels.nii.gz")))
    out.mkdir()
    build_seg(volume, np.roll(label_slices, 1, axis=0), MODEL).save_as(out / "seg.dcm")
    shutil.copy(result / "labels.nii.gz", out / "labels.nii.gz")
    return out


def expected_label_images(result: Path, ct_files) -> dict[str, np.ndarray]:
    """SOP Instance UID -> the SEG's segment number at every pixel of that CT image, from labels.nii.gz."""
    volume = load_series_volume(find_dicom_files(ct_files[0].parent))
    label_slices = volume.labels_on_source_slices(sitk.ReadImage(str(result / "labels.nii.gz")))
    seg = pydicom.dcmread(result / "seg.dcm", stop_before_pixels=True)
    lookup = np.zeros(len(REGIONS) + 1, dtype=np.uint8)
    for region in REGIONS:
        lookup[region.value] = segment_numbers_by_key(seg).get(region.key, 0)
    return {str(ds.SOPInstanceUID): lookup[labels] for ds, labels in zip(volume.datasets, label_slices)}


@pytest.fixture(scope="module")
def ohif(study, tmp_path_factory):
    """Everything loaded into Orthanc, opened in OHIF; the driver's result per item."""
    node, driver = node_driver()
    folder = tmp_path_factory.mktemp("ohif")
    started = time.monotonic()
    orthanc = Orthanc(folder / "orthanc", extra=dicomweb_settings()).start()
    try:
        for path in [*study["ct"], study["binary"] / "seg.dcm", study["binary"] / "sr.dcm",
                     study["labelmap"] / "seg.dcm", study["shifted"] / "seg.dcm"]:
            orthanc.upload(path)
        series = {name: str(pydicom.dcmread(study[key] / f"{kind}.dcm", stop_before_pixels=True).SeriesInstanceUID)
                  for name, key, kind in (("binary-seg", "binary", "seg"), ("labelmap-seg", "labelmap", "seg"),
                                          ("sr", "binary", "sr"), ("shifted-seg", "shifted", "seg"))}
        with ViewerServer(orthanc.url("")) as viewer:
            spec = {
                "viewer": viewer.url, "chromium": chromium(), "artifacts": str(ARTIFACTS),
                "study": str(pydicom.dcmread(study["ct"][0], stop_before_pixels=True).StudyInstanceUID),
                "items": [{"name": name, "series": uid, "kind": name.split("-")[-1]} for name, uid in series.items()],
            }
            (folder / "spec.json").write_text(json.dumps(spec))
            completed = subprocess.run([node, str(driver), str(folder / "spec.json"), str(folder / "result.json")],
                                       capture_output=True, text=True, timeout=240, cwd=BROWSER_DIR)
        assert completed.returncode == 0, f"browser driver failed:\n{completed.stdout}\n{completed.stderr}"
    finally:
        orthanc.stop()
    result = json.loads((folder / "result.json").read_text())
    print(f"\nOHIF screenshots in {ARTIFACTS} (browser part {time.monotonic() - started:.0f} s)")
    return {item["name"]: item for item in result["items"]}


def pixels_of(slice_: dict) -> np.ndarray:
    data = np.frombuffer(base64.b64decode(slice_["pixels"]), dtype=np.uint8)
    return data.reshape(slice_["rows"], slice_["columns"])


def check_segmentation(item: dict, result: Path, ct_files) -> None:
    assert item["errors"] == [], "\n".join(item["errors"])
    assert item["count"] == 1
    expected = expected_label_images(result, ct_files)
    assert sorted(item["slices"]) == sorted(expected), "OHIF's label images are not on our CT images"
    for uid, labels in expected.items():
        shown = pixels_of(item["slices"][uid])
        wrong = int((shown != labels).sum())
        assert wrong == 0, f"CT image {uid}: {wrong} pixels differ between OHIF's label image and our label map"
    seg = pydicom.dcmread(result / "seg.dcm", stop_before_pixels=True)
    ours = {int(s.SegmentNumber): (str(s.SegmentLabel),
                                   hd.color.CIELabColor.from_dicom_value(s.RecommendedDisplayCIELabValue).to_rgb())
            for s in seg.SegmentSequence}
    shown = {segment["index"]: segment for segment in item["segments"]}
    assert sorted(shown) == sorted(ours)
    for number, (label, rgb) in ours.items():
        assert shown[number]["label"] == label
        difference = np.abs(np.array(shown[number]["color"][:3]) - np.array(rgb)).max()
        assert difference <= COLOUR_TOLERANCE, f"segment {number} {label}: OHIF paints {shown[number]['color']}, we wrote {rgb}"


def test_binary_seg_in_ohif_matches_our_label_map(ohif, study):
    check_segmentation(ohif["binary-seg"], study["binary"], study["ct"])


def test_labelmap_seg_in_ohif_matches_our_label_map_and_colours(ohif, study):
    check_segmentation(ohif["labelmap-seg"], study["labelmap"], study["ct"])


def test_a_seg_one_slice_off_is_caught_though_ohif_shows_it_silently(ohif, study):
    item = ohif["shifted-seg"]
    assert item["errors"] == [], "\n".join(item["errors"])
    with pytest.raises(AssertionError, match="pixels differ"):
        check_segmentation(item, study["shifted"], study["ct"])


@pytest.mark.xfail(strict=True, raises=AssertionError, reason=(
    "OHIF 3.13.2 reads a measurement group's place only from a SCOORD/SCOORD3D in it; a TID 1411 group "
    "that references a SEG segment (and a TID 1501 group, e.g. the total) has none, and OHIF then fails with "
    "TypeError: Cannot read properties of undefined (reading 'ReferencedSOPSequence') "
    "(see README, 'Viewing the results in OHIF'). Strict: when OHIF copes, this passes and must be un-marked."))
def test_sr_opens_in_ohif_without_error(ohif):
    item = ohif["sr"]
    assert [m["TrackingIdentifier"] for m in item["measurements"]][:1] == ["Right frontal lobe"]  # OHIF read it
    assert item["errors"] == [], "\n".join(item["errors"])


def test_sr_failure_in_ohif_is_the_documented_one(ohif):
    """What the README says of OHIF and our SR is what OHIF does (so the README cannot go stale silently)."""
    errors = "\n".join(ohif["sr"]["errors"])
    assert "Cannot read properties of undefined (reading 'ReferencedSOPSequence')" in errors, errors
    assert "_checkIfCanAddMeasurementsToDisplaySet" in errors, errors
