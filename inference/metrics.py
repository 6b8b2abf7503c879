"""Agreement between a predicted and a reference segmentation: Dice per region, hemisphere agreement,
volume errors.

Both work per region key of :mod:`inference.vocabulary`. Label maps may be numpy
arrays or SimpleITK images (compared voxel by voxel, so they must share a grid).
"""
from __future__ import annotations

from typing import Mapping

import numpy as np
import SimpleITK as sitk

from inference.vocabulary import NUM_CLASSES, REGION_KEYS, REGIONS

#: Key of the whole-brain (all 10 regions) entry of :func:`volume_errors`.
TOTAL_KEY = "total"


def _label_array(labels: np.ndarray | sitk.Image, what: str) -> np.ndarray:
    if isinstance(labels, sitk.Image):
        labels = sitk.GetArrayViewFromImage(labels)
    labels = np.asarray(labels)
    if not np.issubdtype(labels.dtype, np.integer):
        raise ValueError(f"{what} labels must be integers, got {labels.dtype}")
    return labels


def _check_same_grid(prediction: sitk.Image, truth: sitk.Image) -> None:
    for name, a, b in (("spacing", prediction.GetSpacing(), truth.GetSpacing()),
                       ("origin", prediction.GetOrigin(), truth.GetOrigin()),
                       ("direction", prediction.GetDirection(), truth.GetDirection())):
        if not np.allclose(a, b, atol=1e-3):
            raise ValueError(f"prediction and truth lie on different grids: {name} {a} vs {b}")


def dice_per_region(prediction: np.ndarray | sitk.Image, truth: np.ndarray | sitk.Image) -> dict[str, float]:
    """Dice coefficient 2|P n T| / (|P| + |T|) per region key; 1.0 for a region absent in both.

    Raises:
        ValueError: different shapes or grids, or non-integer labels.
    """
    if isinstance(prediction, sitk.Image) and isinstance(truth, sitk.Image):
        _check_same_grid(prediction, truth)
    predicted = _label_array(prediction, "predicted")
    true = _label_array(truth, "true")
    if predicted.shape != true.shape:
        raise ValueError(f"predicted labels of shape {predicted.shape} differ from true labels {true.shape}")
    # One pass: joint histogram of (predicted, true) label pairs.
    pairs = np.bincount(np.clip(predicted, 0, NUM_CLASSES).astype(np.int64).ravel() * (NUM_CLASSES + 1)
                        + np.clip(true, 0, NUM_CLASSES).astype(np.int64).ravel(),
                        minlength=(NUM_CLASSES + 1) ** 2).reshape(NUM_CLASSES + 1, NUM_CLASSES + 1)
    scores = {}
    for region in REGIONS:
        v = region.value
        total = pairs[v, :].sum() + pairs[:, v].sum()
        scores[region.key] = 1.0 if total == 0 else float(2.0 * pairs[v, v] / total)
    return scores


def _side_lookup() -> np.ndarray:
    """Label value -> 1 (a left region), 2 (a right region), 0 (background or an unpaired region)."""
    side = np.zeros(NUM_CLASSES + 1, np.uint8)
    for region in REGIONS:
        side[region.value] = {"left": 1, "right": 2}.get(region.laterality, 0)
    return side


def hemisphere_agreement(labels: np.ndarray | sitk.Image, reference: np.ndarray | sitk.Image) -> float | None:
    """Share of the voxels both maps call cerebral (a left or right lobe) that both put on the same side.

    Which lobe does not matter: a voxel the one map calls left frontal and the other left
    temporal agrees. 1.0 is the same left-right split, 0.0 sides swapped everywhere.

    Returns:
        The share in [0, 1]; None when no voxel is cerebral in both maps.

    Raises:
        ValueError: different shapes or grids, non-integer labels.
    """
    if isinstance(labels, sitk.Image) and isinstance(reference, sitk.Image):
        _check_same_grid(labels, reference)
    a, b = _label_array(labels, "first"), _label_array(reference, "reference")
    if a.shape != b.shape:
        raise ValueError(f"label maps of shapes {a.shape} and {b.shape} differ")
    side = _side_lookup()
    a_side = side[np.clip(a, 0, NUM_CLASSES)]
    b_side = side[np.clip(b, 0, NUM_CLASSES)]
    both = (a_side > 0) & (b_side > 0)
    shared = int(np.count_nonzero(both))
    if shared == 0:
        return None
    return float(np.count_nonzero(both & (a_side == b_side)) / shared)


def volume_errors(predicted_cm3: Mapping[str, float], true_cm3: Mapping[str, float]) -> dict[str, dict]:
    """Per region key and for the total: predicted and true volume, error in cm3 and in %.

    Returns:
        ``{key: {"predicted_cm3", "true_cm3", "error_cm3", "error_percent"}}`` for the
        10 region keys and :data:`TOTAL_KEY`; ``error_percent`` is None when the true
        volume is 0.

    Raises:
        ValueError: a region key missing from either mapping, or a negative volume.
    """
    for what, volumes in (("predicted", predicted_cm3), ("true", true_cm3)):
        missing = [k for k in REGION_KEYS if k not in volumes]
        if missing:
            raise ValueError(f"{what} volumes lack {', '.join(missing)}")
        negative = [k for k in REGION_KEYS if not volumes[k] >= 0]
        if negative:
            raise ValueError(f"{what} volumes are negative or not numbers for {', '.join(negative)}")
    rows = {key: _error_row(float(predicted_cm3[key]), float(true_cm3[key])) for key in REGION_KEYS}
    rows[TOTAL_KEY] = _error_row(sum(float(predicted_cm3[k]) for k in REGION_KEYS),
                                 sum(float(true_cm3[k]) for k in REGION_KEYS))
    return rows


def percent_difference(volume: float, reference: float) -> float | None:
    """(volume - reference) / reference x 100; None when the reference is 0."""
    return None if reference == 0 else 100.0 * (volume - reference) / reference


def _error_row(predicted: float, true: float) -> dict:
    return {"predicted_cm3": predicted, "true_cm3": true, "error_cm3": predicted - true,
            "error_percent": percent_difference(predicted, true)}
