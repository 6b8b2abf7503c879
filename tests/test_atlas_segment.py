"""``lobevol segment --method atlas``: every result object made from the registration's labels, and says so."""
from __future__ import annotations

import json
import subprocess

import numpy as np
import pydicom
import pytest
import SimpleITK as sitk

from inference.vocabulary import REGION_KEYS
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
    status = main(["segment", str(folder), "--out", str(tmp_path), "--method", "atlas", "--threads", "2",
                   "--cross-check", "--no-tta"])
    assert status == 0, capsys.readouterr()
    (study,) = [p for p in tmp_path.iterdir() if p.is_dir()]
    summary = json.loads((study / "volumes.json").read_text())
    assert summary["model"]["method"] == "atlas"
    # Cross-checked by the (phantom-trained) network: both found the phantom's regions.
    check = summary["cross_check"]
    assert (check["method"], check["other_method"]) == ("atlas", "network")
    assert set(check["regions"]) == set(REGION_KEYS) and 0.3 < check["mean_dice"] < 1.0
    assert check["message"] in summary["quality_notes"]
    labels = sitk.ReadImage(str(study / "labels.nii.gz"))
    assert np.mean(list(dice_per_region(labels, phantom.labels).values())) > 0.4  # the atlas's, not a stand-in
    seg = pydicom.dcmread(study / "seg.dcm")
    algorithm = seg.SegmentSequence[0].SegmentationAlgorithmIdentificationSequence[0]
    assert algorithm.AlgorithmFamilyCodeSequence[0].CodeMeaning == "Deformable Models"
    assert "method=atlas" in str(algorithm.AlgorithmParameters)
    sr_text = str(pydicom.dcmread(study / "sr.dcm"))
    assert "method=atlas" in sr_text and "Agreement of segmentation methods" in sr_text
    text = subprocess.run(["pdftotext", "-layout", str(study / "report.pdf"), "-"], capture_output=True, text=True,
                          check=True).stdout
    words = " ".join(text.split())
    assert "Regions made by: atlas registration" in words and "Cross-check: methods" in words
    assert "Dice atlas cm3 network cm3" in words


def test_config_method_is_checked(tmp_path):
    from node.config import load_config

    path = tmp_path / "config.ini"
    path.write_text("[inference]\nmethod = atlas\ncross_check = no\ncross_check_min_dice = 0.3\n")
    config = load_config(path)
    assert (config.inference.method, config.inference.cross_check, config.inference.cross_check_min_dice) == ("atlas", False, 0.3)
    path.write_text("[inference]\ncross_check_min_dice = 2\n")
    with pytest.raises(ValueError, match="cross_check_min_dice"):
        load_config(path)
    path.write_text("[inference]\nmethod = registration\n")
    with pytest.raises(ValueError, match=r"\[inference\] method = 'registration': expected network or atlas"):
        load_config(path)


def test_cross_check_says_plainly_when_methods_disagree():
    from inference.cross_check import CrossCheckedSegmenter, compare_segmentations
    from inference.predict import Segmentation, measure_volumes

    labels = np.zeros((20, 20, 20), np.uint8)
    for value in range(1, 11):
        labels[:, :, 2 * (value - 1):2 * value] = value
    shifted = np.roll(labels, 1, axis=2)
    images = [sitk.GetImageFromArray(a) for a in (labels, shifted)]
    check = compare_segmentations(images[0], images[0], measure_volumes(images[0]), measure_volumes(images[0]),
                                  method="network", other_method="atlas")
    assert check.agrees and check.mean_dice == 1.0 and check.message.startswith("methods agree")
    check = compare_segmentations(images[0], images[1], measure_volumes(images[0]), measure_volumes(images[1]),
                                  method="network", other_method="atlas", min_dice=0.6)
    assert not check.agrees and check.message.startswith("methods disagree: review the regions")
    assert check.to_dict()["regions"]["right_frontal_lobe"]["dice"] == pytest.approx(2 * 1 / 4)

    class Fixed:
        def __init__(self, image, method):
            self.image, self.method = image, method

        @property
        def model(self):
            return {"method": self.method}

        def segment(self, image):
            return Segmentation(self.image, measure_volumes(self.image), self.model, {"total": 1.0})

    result = CrossCheckedSegmenter(Fixed(images[0], "network"), Fixed(images[1], "atlas"), 0.6).segment(images[0])
    assert result.model == {"method": "network"} and not result.cross_check.agrees
    assert "cross_check" in result.timings_s
    with pytest.raises(ValueError, match="Dice within 0..1"):
        CrossCheckedSegmenter(None, None, 1.5)

    class Failing(Fixed):
        def segment(self, image):
            raise ValueError("no skull found")

    result = CrossCheckedSegmenter(Fixed(images[0], "network"), Failing(images[0], "atlas")).segment(images[0])
    assert result.cross_check is None and result.model["cross_check_error"] == "no skull found"


def test_cross_check_judged_in_reference_sds_names_the_regions_and_by_how_much():
    from inference.cross_check import compare_segmentations
    from inference.predict import measure_volumes

    labels = np.zeros((20, 20, 20), np.uint8)
    for value in range(1, 11):
        labels[:, :, 2 * (value - 1):2 * value] = value
    image = sitk.GetImageFromArray(labels)
    check = compare_segmentations(image, image, measure_volumes(image), measure_volumes(image),
                                  method="network", other_method="atlas")
    differences = {key: 0.2 for key in REGION_KEYS}
    differences.update(right_parietal_lobe=-3.4, brainstem=1.2)
    judged = check.judged(differences, {key: abs(value) > 1.0 for key, value in differences.items()})
    # Every Dice is 1: only the volume differences in SDs make them disagree.
    assert check.agrees and not judged.agrees
    assert judged.message.startswith("methods disagree: review the regions: right parietal lobe volumes 3.4 SD apart")
    assert "brainstem volumes 1.2 SD apart" in judged.message and "frontal" not in judged.message.split("(")[0]
    regions = judged.to_dict()["regions"]
    assert regions["right_parietal_lobe"]["volume_difference_sd"] == -3.4 and not regions["right_parietal_lobe"]["agrees"]
    assert regions["left_frontal_lobe"]["agrees"]
    within = check.judged(dict.fromkeys(REGION_KEYS, 0.4), dict.fromkeys(REGION_KEYS, False))
    assert within.agrees and "within one reference SD (largest" in within.message


def test_cross_check_runs_both_methods_at_once_and_compares_them_as_on_the_whole_grid():
    import threading

    import torch

    from inference.cross_check import CrossCheckedSegmenter, compare_segmentations
    from inference.predict import Segmentation, measure_volumes

    rng = np.random.default_rng(3)
    arrays = [np.zeros((30, 40, 50), np.uint8) for _ in range(2)]
    arrays[0][5:20, 8:30, 10:40] = rng.integers(0, 11, (15, 22, 30))
    arrays[1][7:24, 6:28, 12:45] = rng.integers(0, 11, (17, 22, 33))
    images = [sitk.GetImageFromArray(a) for a in arrays]
    for image in images:
        image.SetSpacing((0.5, 0.6, 1.2))
        image.SetOrigin((10.0, -20.0, 30.0))
    both_running = threading.Barrier(2, timeout=20)

    class AtOnce:
        """Returns its labels only once the other method is running too."""

        def __init__(self, image, method):
            self.image, self.method = image, method

        @property
        def model(self):
            return {"method": self.method}

        def segment(self, image):
            both_running.wait()
            return Segmentation(self.image, measure_volumes(self.image), self.model, {"total": 1.0})

    threads = torch.get_num_threads(), sitk.ProcessObject.GetGlobalDefaultNumberOfThreads()
    result = CrossCheckedSegmenter(AtOnce(images[0], "network"), AtOnce(images[1], "atlas")).segment(images[0])
    assert (torch.get_num_threads(), sitk.ProcessObject.GetGlobalDefaultNumberOfThreads()) == threads
    whole = compare_segmentations(images[0], images[1], measure_volumes(images[0]), measure_volumes(images[1]),
                                  method="network", other_method="atlas", seconds=result.cross_check.seconds)
    assert result.cross_check == whole
