"""``lobevol segment --method atlas``: every result object made from the registration's labels, and says so."""
from __future__ import annotations

import json
import subprocess

import numpy as np
import pydicom
import pytest
import SimpleITK as sitk

from node.cli import main

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def phantom_study(tmp_path_factory):
    from inference.phantoms.dicom_series import write_ct_series
    from inference.phantoms.generator import make_phantom

    phantom = make_phantom(910005, slice_thickness_mm=3.0, pixel_spacing_mm=1.6, matrix=150)
    folder = tmp_path_factory.mktemp("atlas-study")
    write_ct_series(phantom, folder)
    return phantom, folder


def test_segment_method_atlas_writes_every_result_from_the_atlas(phantom_study, tmp_path, capsys):
    from inference.metrics import dice_per_region

    phantom, folder = phantom_study
    status = main(["segment", str(folder), "--out", str(tmp_path), "--method", "atlas", "--threads", "2"])
    assert status == 0, capsys.readouterr()
    (study,) = [p for p in tmp_path.iterdir() if p.is_dir()]
    summary = json.loads((study / "volumes.json").read_text())
    assert summary["model"]["method"] == "atlas"
    labels = sitk.ReadImage(str(study / "labels.nii.gz"))
    assert np.mean(list(dice_per_region(labels, phantom.labels).values())) > 0.4  # the atlas's, not a stand-in
    seg = pydicom.dcmread(study / "seg.dcm")
    algorithm = seg.SegmentSequence[0].SegmentationAlgorithmIdentificationSequence[0]
    assert algorithm.AlgorithmFamilyCodeSequence[0].CodeMeaning == "Deformable Models"
    assert "method=atlas" in str(algorithm.AlgorithmParameters)
    assert "method=atlas" in str(pydicom.dcmread(study / "sr.dcm"))
    text = subprocess.run(["pdftotext", "-layout", str(study / "report.pdf"), "-"], capture_output=True, text=True,
                          check=True).stdout
    assert "Regions made by: atlas registration" in " ".join(text.split())


def test_config_method_is_checked(tmp_path):
    from node.config import load_config

    path = tmp_path / "config.ini"
    path.write_text("[inference]\nmethod = atlas\n")
    assert load_config(path).method == "atlas"
    path.write_text("[inference]\nmethod = registration\n")
    with pytest.raises(ValueError, match=r"\[inference\] method = 'registration': expected network or atlas"):
        load_config(path)
