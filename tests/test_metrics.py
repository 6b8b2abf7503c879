"""Dice per region and volume errors."""
from __future__ import annotations

import numpy as np
import pytest
import SimpleITK as sitk

from inference.vocabulary import REGION_KEYS
from inference.metrics import TOTAL_KEY, dice_per_region, hemisphere_agreement, volume_errors


def test_dice_known_overlaps():
    truth = np.zeros((4, 10, 10), np.uint8)
    prediction = np.zeros_like(truth)
    truth[:, :5, :] = 1        # 200 voxels
    prediction[:, :4, :] = 1   # 160 voxels, all inside truth
    truth[:, 8:, :] = 9        # 80 voxels, predicted as 10 instead
    prediction[:, 8:, :] = 10
    scores = dice_per_region(prediction, truth)
    assert set(scores) == set(REGION_KEYS)
    assert scores["right_frontal_lobe"] == pytest.approx(2 * 160 / (200 + 160))
    assert scores["cerebellum"] == 0.0
    assert scores["brainstem"] == 0.0
    assert scores["left_frontal_lobe"] == 1.0  # absent in both
    assert dice_per_region(truth, truth) == {key: 1.0 for key in REGION_KEYS}


def test_dice_on_images_checks_the_grid():
    array = np.random.default_rng(0).integers(0, 11, (6, 7, 8)).astype(np.uint8)
    a, b = sitk.GetImageFromArray(array), sitk.GetImageFromArray(array)
    assert dice_per_region(a, b) == {key: 1.0 for key in REGION_KEYS}
    b.SetSpacing((1.0, 1.0, 2.0))
    with pytest.raises(ValueError, match="different grids: spacing"):
        dice_per_region(a, b)
    with pytest.raises(ValueError, match="shape"):
        dice_per_region(array, array[:-1])
    with pytest.raises(ValueError, match="integers"):
        dice_per_region(array.astype(float), array)


def test_volume_errors_per_region_and_total():
    true = {key: 10.0 for key in REGION_KEYS}
    predicted = dict(true, cerebellum=12.0, brainstem=9.0)
    errors = volume_errors(predicted, true)
    assert errors["cerebellum"] == {"predicted_cm3": 12.0, "true_cm3": 10.0, "error_cm3": 2.0,
                                    "error_percent": pytest.approx(20.0)}
    assert errors["brainstem"]["error_percent"] == pytest.approx(-10.0)
    assert errors[TOTAL_KEY]["error_cm3"] == pytest.approx(1.0)
    assert errors[TOTAL_KEY]["error_percent"] == pytest.approx(1.0)
    assert volume_errors(dict(true, brainstem=1.0), dict(true, brainstem=0.0))["brainstem"]["error_percent"] is None
    with pytest.raises(ValueError, match="lack brainstem"):
        volume_errors({k: v for k, v in true.items() if k != "brainstem"}, true)
    with pytest.raises(ValueError, match="negative"):
        volume_errors(dict(true, cerebellum=-1.0), true)


def test_hemisphere_agreement_counts_sides_not_lobes():
    reference = np.zeros((2, 4, 10), np.uint8)
    reference[:, :, :5] = 1   # right frontal
    reference[:, :, 5:] = 2   # left frontal
    same_sides = np.where(reference == 1, 7, 8).astype(np.uint8)  # right / left temporal: other lobes, same sides
    assert hemisphere_agreement(same_sides, reference) == 1.0
    swapped = np.where(reference == 1, 2, 1).astype(np.uint8)
    assert hemisphere_agreement(swapped, reference) == 0.0
    half = reference.copy()
    half[:, :2, :] = swapped[:, :2, :]  # half of the rows swapped
    assert hemisphere_agreement(half, reference) == pytest.approx(0.5)


def test_hemisphere_agreement_ignores_voxels_not_cerebral_in_both():
    reference = np.zeros((2, 4, 10), np.uint8)
    reference[:, :, :5], reference[:, :, 5:] = 1, 2
    labels = reference.copy()
    labels[:, :, 4:6] = 9       # cerebellum in the one map: not compared
    labels[0, 0, 0] = 0         # background: not compared
    assert hemisphere_agreement(labels, reference) == 1.0
    assert hemisphere_agreement(np.full_like(reference, 9), reference) is None


def test_hemisphere_agreement_refuses_other_grids():
    a = sitk.GetImageFromArray(np.ones((3, 4, 5), np.uint8))
    b = sitk.GetImageFromArray(np.ones((3, 4, 5), np.uint8))
    b.SetSpacing((2.0, 1.0, 1.0))
    with pytest.raises(ValueError, match="different grids"):
        hemisphere_agreement(a, b)
    with pytest.raises(ValueError, match="shapes"):
        hemisphere_agreement(np.ones((3, 4, 5), np.uint8), np.ones((3, 4, 6), np.uint8))
    with pytest.raises(ValueError, match="integers"):
        hemisphere_agreement(np.ones((3, 4, 5), np.float32), np.ones((3, 4, 5), np.uint8))
