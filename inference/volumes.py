"""Where a voxel becomes a cm3: the one volume counter of lobevol.

Every regional volume lobevol reports is counted here: the network's and the
atlas's labels (:func:`image_region_volumes_cm3`), the labels on the source CT
images that the SEG and SR carry (``SeriesVolume.region_volumes_cm3``), a SEG
read back (``node.results.seg.region_volumes_from_seg``) and a phantom's truth.
Each pixel of a slice stands for its pixel area times the slice's extent along
the slice normal (:func:`slice_extents_mm`), so a stack with uneven spacing is
counted on its own geometry, never on a resampled grid (DESIGN.md). One
function, one order of summation: two counts of the same labels agree exactly.
"""
from __future__ import annotations

from typing import Sequence

import numpy as np

from inference.vocabulary import NUM_CLASSES, REGIONS


def slice_extents_mm(positions: Sequence[float]) -> np.ndarray:
    """Thickness of space each slice stands for along the normal (mm), in the given order.

    Half the distance to each neighbour (the full distance to the only
    neighbour for the first and last slice); evenly spaced slices all get
    the spacing. A lone slice gets NaN (no spacing to go by).
    """
    positions = np.asarray(positions, float)
    if len(positions) < 2:
        return np.full(len(positions), np.nan)
    order = np.argsort(positions, kind="stable")
    gaps = np.diff(positions[order])
    extents_sorted = np.empty(len(positions))
    extents_sorted[0], extents_sorted[-1] = gaps[0], gaps[-1]
    extents_sorted[1:-1] = (gaps[:-1] + gaps[1:]) / 2.0
    extents = np.empty(len(positions))
    extents[order] = extents_sorted
    return extents


def label_volumes_mm3(label_slices: np.ndarray, pixel_area_mm2: float, slice_extents: Sequence[float],
                      num_values: int = NUM_CLASSES) -> np.ndarray:
    """Volume (mm3) of every label value 0..num_values-1 in a stack of label slices.

    Args:
        label_slices: (n_slices, rows, columns) non-negative integer labels.
        pixel_area_mm2: area of one pixel of a slice (mm2), the same for every slice.
        slice_extents: thickness each slice stands for along the normal (mm), one per slice.
        num_values: how many label values to count (values must lie below it).

    Returns:
        float64 array of ``num_values`` volumes in mm3, index = label value.

    Raises:
        ValueError: shapes that do not match, labels out of range, a non-positive
            or non-finite pixel area or slice extent.
    """
    label_slices = np.asarray(label_slices)
    extents = np.asarray(slice_extents, dtype=float)
    if label_slices.ndim != 3:
        raise ValueError(f"label slices must be (slices, rows, columns), got shape {label_slices.shape}")
    if extents.shape != (label_slices.shape[0],):
        raise ValueError(f"{extents.size} slice extents for {label_slices.shape[0]} slices")
    if not (np.isfinite(pixel_area_mm2) and pixel_area_mm2 > 0):
        raise ValueError(f"pixel area must be a positive number of mm2, got {pixel_area_mm2}")
    if extents.size and not (np.all(np.isfinite(extents)) and np.all(extents > 0)):
        raise ValueError(f"slice extents must be positive numbers of mm, got {extents.min()}..{extents.max()}")
    if not np.issubdtype(label_slices.dtype, np.integer):
        raise ValueError(f"labels must be integers, got {label_slices.dtype}")
    if label_slices.size and (label_slices.min() < 0 or label_slices.max() >= num_values):
        raise ValueError(f"label values must lie within 0..{num_values - 1}, "
                         f"found {label_slices.min()}..{label_slices.max()}")
    counts = np.zeros((label_slices.shape[0], num_values), dtype=np.int64)
    for index, one_slice in enumerate(label_slices):  # per slice: bincount copies to intp (8 bytes a pixel)
        counts[index] = np.bincount(one_slice.ravel(), minlength=num_values)
    return (counts * extents[:, None]).sum(axis=0) * float(pixel_area_mm2)


def region_volumes_cm3(label_slices: np.ndarray, pixel_area_mm2: float,
                       slice_extents: Sequence[float]) -> dict[str, float]:
    """Volume (cm3) of each of the 10 regions, by region key; arguments as :func:`label_volumes_mm3`."""
    volumes_mm3 = label_volumes_mm3(label_slices, pixel_area_mm2, slice_extents)
    return {region.key: float(volumes_mm3[region.value] / 1000.0) for region in REGIONS}
