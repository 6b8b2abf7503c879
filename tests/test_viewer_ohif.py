"""Our SEG and SR in the OHIF Viewer, in a real browser: what a radiologist would open.

Orthanc with its DICOMweb plugin holds a phantom study and our results
(binary SEG, LABELMAP SEG, TID 1500 SR, Encapsulated PDF); the prebuilt OHIF Viewer 3.13
(``tests/browser/fetch-ohif.sh``) is served on loopback and opened in headless
Debian Chromium by ``tests/browser/ohif_check.js`` (playwright-core). A clean
console proves nothing about placement, so the label images OHIF built from
each SEG are compared, CT image by CT image and pixel by pixel, with the
label map we wrote; then the segment names and the colours OHIF paints with.
The SR must open without an error and list every region with the volume we
wrote; the PDF must reach OHIF's PDF viewport whole.

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
from pydicom.sr.codedict import codes

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


def _segment(source: Path, out: Path, seg_type: str, reports: bool) -> Path:
    """``lobevol segment`` with the bundled model (with the SR and PDF if ``reports``); returns the result folder."""
    arguments = ["segment", str(source), "--out", str(out), "--seg", seg_type, "--threads", "1", "--no-tta",
                 "--no-overlays"]
    assert main(arguments + ([] if reports else ["--no-sr", "--no-pdf"])) == 0
    (folder,) = [p for p in out.iterdir() if p.is_dir()]
    return folder


@pytest.fixture(scope="module")
def study(tmp_path_factory):
    """A small phantom (128 x 128, 3 mm slices) and our results on it, binary and LABELMAP."""
    root = tmp_path_factory.mktemp("viewer")
    assert main(["phantom", "--out", str(root / "phantom"), "--matrix", "128", "--pixel-spacing", "1.8",
                 "--slice-thickness", "3", "--seed", "5"]) == 0
    ct = root / "phantom" / "case_0000" / "dicom"
    binary = _segment(ct, root / "binary", "binary", reports=True)
    labelmap = _segment(ct, root / "labelmap", "labelmap", reports=False)
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
                     study["binary"] / "report.dcm", study["labelmap"] / "seg.dcm", study["shifted"] / "seg.dcm"]:
            orthanc.upload(path)
        series = {name: str(pydicom.dcmread(study[key] / f"{kind}.dcm", stop_before_pixels=True).SeriesInstanceUID)
                  for name, key, kind in (("binary-seg", "binary", "seg"), ("labelmap-seg", "labelmap", "seg"),
                                          ("sr", "binary", "sr"), ("report-pdf", "binary", "report"),
                                          ("shifted-seg", "shifted", "seg"))}
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


def _volumes_in_sr(path: Path) -> dict[str, float]:
    """Region name -> the volume (cm3) our SR holds, read back with highdicom."""
    report = hd.sr.MeasurementReport.from_sequence([pydicom.dcmread(path)])
    volumes = {}
    for group in report.get_volumetric_roi_measurement_groups() + report.get_image_measurement_groups():
        for measurement in group.get_measurements(name=codes.SCT.Volume):
            volumes[group.tracking_identifier] = measurement.value
    return volumes


def test_sr_opens_in_ohif_and_lists_every_region_with_its_volume(ohif, study):
    item = ohif["sr"]
    assert item["errors"] == [], "\n".join(item["errors"])
    shown = {m["TrackingIdentifier"]: m for m in item["measurements"]}
    assert {r.name for r in REGIONS} <= set(shown), f"OHIF lists {sorted(shown)}"
    assert "Total of the 10 regions" in shown
    for name, volume in _volumes_in_sr(study["binary"] / "sr.dcm").items():
        labels = {label["label"]: label["value"] for label in shown[name]["labels"]}
        # OHIF prints a NUM as its value to 2 decimals and the unit's code value.
        assert labels.get("Volume") == f"{volume:.2f} cm3", f"{name}: OHIF shows {shown[name]['labels']}"
    # As the README says: OHIF shows them in the SR viewport only; none of its tools claims them for its
    # measurement panel ("not compatible with this application"). When this fails, update the README.
    assert item["rehydratable"] is False


def test_pdf_report_opens_in_ohif_pdf_viewport(ohif, study):
    item = ohif["report-pdf"]
    assert item["errors"] == [], "\n".join(item["errors"])
    document = pydicom.dcmread(study["binary"] / "report.dcm").EncapsulatedDocument
    assert item["pdf"]["magic"] == "%PDF-"
    # The whole document (DICOM pads an odd length with one NUL byte, which a server may drop).
    assert len(document) - 1 <= item["pdf"]["bytes"] <= len(document), item["pdf"]
