"""Real normative results (bundled and site-fitted references) through the node's SR and PDF writers.

The writers' own tests use a hand-made NormativeResult; this checks that what
normative.compare really returns (long citations, asymmetry z-scores, missing total SD,
notes) is accepted and encoded, and that the SR stays valid for dciodvfy.
"""
from __future__ import annotations

import subprocess

import highdicom as hd
import pytest
import SimpleITK as sitk
from pydicom.sr.codedict import codes

from inference.vocabulary import REGION_KEYS
from node.results.key_images import render_key_views
from node.results.pdf_report import render_pdf_report
from node.results.seg import build_seg
from node.results.sr import build_sr
from normative.compare import compare
from normative.fit import fit_reference
from normative.simulate import simulate_cohort
from tests.dicom_validation import validate
from tests.output_fixtures import MODEL, ct_volume, region_labels, write_ct_series

EXPLAINED_WARNINGS = ("Unrecognized defined term = <99LOBEVOL>",)


@pytest.fixture(scope="module")
def study(tmp_path_factory):
    labels = region_labels((12, 40, 40))
    volume = ct_volume(write_ct_series(tmp_path_factory.mktemp("ct"), labels))
    label_image = sitk.GetImageFromArray(labels)
    label_image.CopyInformation(volume.image)
    return volume, build_seg(volume, labels, MODEL), render_key_views(volume.image, label_image, size_px=96)


@pytest.fixture(scope="module")
def fitted():
    return fit_reference(simulate_cohort(300, 21)).reference


def _paper_like_volumes() -> dict[str, float]:
    return dict(zip(REGION_KEYS, (190.2, 195.0, 80.1, 77.9, 52.0, 51.7, 90.3, 92.0, 121.5, 11.1)))


@pytest.mark.integration
@pytest.mark.parametrize("which", ["bundled", "fitted", "no age"])
def test_real_results_make_a_valid_sr_and_a_pdf(study, fitted, which, tmp_path):
    volume, seg, views = study
    volumes = _paper_like_volumes()
    reference = {"bundled": None, "fitted": fitted, "no age": None}[which]
    normative = compare(volumes, "F", None if which == "no age" else 2.1, reference)
    sr = build_sr(volume, seg, normative, MODEL)
    path = tmp_path / "sr.dcm"
    sr.save_as(path)
    verdict = validate(path)
    assert verdict.errors == [], verdict.output
    assert verdict.unexplained_warnings(EXPLAINED_WARNINGS) == [], verdict.output

    report = hd.sr.MeasurementReport.from_sequence([sr])
    groups = {g.tracking_identifier: g for g in report.get_volumetric_roi_measurement_groups()}
    (item,) = groups["Brainstem"].get_measurements(name=codes.SCT.Volume)
    z_items = [c for c in item[0].ContentSequence if c.ConceptNameCodeSequence[0].CodeValue == "121416"]
    if which == "no age":
        assert z_items == []
    else:
        assert float(z_items[0].MeasuredValueSequence[0].NumericValue) == pytest.approx(
            normative.region("brainstem").z_score, abs=1e-6)
    (tmp_path / "report.pdf").write_bytes(render_pdf_report(normative, MODEL, views, quality_notes=[]))
    text = subprocess.run(["pdftotext", str(tmp_path / "report.pdf"), "-"], capture_output=True, text=True,
                          check=True).stdout
    text = " ".join(text.split())
    assert normative.reference.name in text
    for note in normative.notes:
        assert note[:40] in text


def test_fitted_results_carry_asymmetry_z_and_total_z(fitted):
    normative = compare(_paper_like_volumes(), "F", 2.1, fitted)
    assert normative.total.z_score is not None
    assert all(a.flag in ("below", "within", "above") and a.reference_sd > 0 for a in normative.asymmetry)
    assert normative.region("brainstem").flag == "below"
