"""Dice per region and volume errors."""
from __future__ import annotations

import numpy as np
import pytest
import SimpleITK as sitk

from inference.vocabulary import REGION_KEYS
from inference.metrics import TOTAL_KEY, dice_per_region, volume_errors


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
