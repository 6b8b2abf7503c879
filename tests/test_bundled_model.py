"""The bundled model on phantoms it never saw, through the node's whole DICOM path.

A phantom is written as a CT series, ``analyse_study`` segments it with the
shipped checkpoint, and the SEG it writes is read back with highdicom onto the
source slices and compared with the phantom's true labels: the figures the
model card promises (mean Dice per region, total volume) must hold on what a
viewer would display. Training seeds are 1000..1087; these are among the held-out seeds
(900000-999999), which training refuses.
"""
from __future__ import annotations

import highdicom as hd
import numpy as np
import pydicom
import pytest

from inference.vocabulary import REGIONS
from inference.metrics import dice_per_region
from node.dicom.files import find_dicom_files
from node.pipeline import analyse_study
from node.results.seg import segment_numbers_by_key
from tests.conftest import phantom_truth_on_source_slices

# (seed, slice thickness mm, gantry tilt deg, lowest Dice of any region, lowest mean Dice,
# largest total volume error). Floors well under what any bundled model since issue 19 has
# measured on held-out phantoms (MODEL_CARD.md), so that a broken model or a SEG whose frames
# land on the wrong planes fails, not a model a little worse. The project's targets are not
# met by this model; MODEL_CARD.md has where it stands.
HELD_OUT = [
    (910001, 1.25, 0.0, 0.65, 0.78, 0.10),
    (910002, 5.0, 15.0, 0.62, 0.76, 0.10),
]


@pytest.fixture(scope="module")
def bundled_segmenter():
    from inference.predict import Segmenter

    return Segmenter(device="cpu", threads=2, progress=False)


def _seg_labels(seg_path, datasets) -> np.ndarray:
    """The SEG's regions as one label map (k, row, column) on ``datasets``' planes."""
    seg = hd.seg.Segmentation.from_dataset(pydicom.dcmread(seg_path))
    numbers = segment_numbers_by_key(seg)
    combined = seg.get_pixels_by_source_instance(
        source_sop_instance_uids=[str(ds.SOPInstanceUID) for ds in datasets],
        segment_numbers=list(numbers.values()), combine_segments=True, skip_overlap_checks=True,
    )
    labels = np.zeros(combined.shape, np.uint8)
    for region in REGIONS:
        if region.key in numbers:
            labels[combined == numbers[region.key]] = region.value
    return labels


@pytest.mark.slow
@pytest.mark.parametrize("seed, thickness_mm, tilt_deg, min_dice, min_mean_dice, max_total_error", HELD_OUT)
def test_seg_read_back_matches_the_phantom_truth(seed, thickness_mm, tilt_deg, min_dice, min_mean_dice,
                                                 max_total_error, bundled_segmenter, tmp_path):
    from inference.phantoms.generator import make_phantom
    from inference.phantoms.dicom_series import write_ct_series

    phantom = make_phantom(seed, slice_thickness_mm=thickness_mm, tilt_deg=tilt_deg)
    write_ct_series(phantom, tmp_path / "in")
    instances = find_dicom_files(tmp_path / "in")
    outcome = analyse_study(instances, tmp_path / "out", bundled_segmenter)
    assert outcome.status == "done", outcome.reason

    (seg_path,) = [p for p in outcome.result_files if pydicom.dcmread(p, stop_before_pixels=True).Modality == "SEG"]
    by_uid = {h.sop_instance_uid: h.path for h in instances}
    datasets = [pydicom.dcmread(by_uid[str(item.ReferencedSOPInstanceUID)], stop_before_pixels=True)
                for item in pydicom.dcmread(seg_path).ReferencedSeriesSequence[0].ReferencedInstanceSequence]
    assert len(datasets) == len(instances)  # every source image is referenced
    truth = phantom_truth_on_source_slices(phantom, datasets)
    predicted = _seg_labels(seg_path, datasets)
    dice = dice_per_region(predicted, truth)
    assert min(dice.values()) >= min_dice, dice
    assert np.mean(list(dice.values())) >= min_mean_dice, dice

    true_total = sum(phantom.meta["volumes_cm3"][region.key] for region in REGIONS)
    measured_total = sum(float(outcome.volumes_row[region.key]) for region in REGIONS)
    assert abs(measured_total / true_total - 1) <= max_total_error, (measured_total, true_total)


@pytest.mark.slow
@pytest.mark.integration
def test_real_scans_with_the_bundled_model(real_ct, bundled_segmenter, tmp_path):
    """The GE head (tilted, uneven) gives valid objects on its own 28 images; the Philips
    head phantom (an air-filled skull shell) fails visibly instead of getting brain volumes."""
    from tests.dicom_validation import validate
    from tests.test_pipeline import EXPLAINED_WARNINGS

    ge = analyse_study(find_dicom_files(real_ct / "GE"), tmp_path / "ge", bundled_segmenter)
    assert ge.status == "done", ge.reason
    (seg_path,) = [p for p in ge.result_files if p.name == "seg.dcm"]
    references = pydicom.dcmread(seg_path).ReferencedSeriesSequence[0].ReferencedInstanceSequence
    assert len(references) == 28
    for path in ge.result_files:
        result = validate(path)
        assert result.errors == [] and result.unexplained_warnings(EXPLAINED_WARNINGS) == [], result.output

    philips = analyse_study(find_dicom_files(real_ct / "Philips"), tmp_path / "philips", bundled_segmenter)
    assert philips.status == "failed" and "no brain to segment" in philips.reason
    assert philips.result_files == []


@pytest.mark.slow
@pytest.mark.integration
def test_real_head_regions_lie_where_a_brain_has_them(real_ct, bundled_segmenter):
    """On the real GE head (a test scan, never trained on) the bundled network's regions keep
    every anatomical relation of ``inference.anatomy_checks``: each lobe on its own side of
    the midline (at most 5 % across), frontal before parietal before occipital, temporal below
    parietal, cerebellum below the occipital lobes with the brainstem in front of it, both on
    the midline, and a cerebellum of 7-18 % of the brain. The model before issue 19 failed 5 of
    the 28 (frontal lobes 15-26 % across the midline, a cerebellum of 11 cm3, 1 % of the brain);
    the figures against the atlas labels are in MODEL_CARD.md (benchmarks/real_head.py)."""
    from inference.anatomy_checks import anatomical_relations, format_relations
    from node.dicom.volume import load_series_volume

    volume = load_series_volume(find_dicom_files(real_ct / "GE"))   # one series of 28 tilted images
    labels = bundled_segmenter.segment(volume.image).labels
    checks = anatomical_relations(labels)
    failed = [check for check in checks if not check.passed]
    assert len(checks) == 28 and failed == [], format_relations(checks)
