"""Where a voxel becomes a cm3: the one volume counter of lobevol.

Every regional volume lobevol reports is counted here: the network's and the
atlas's labels (:func:`image_region_volumes_cm3`), the labels on the source CT
images that the SEG and SR carry (``SeriesVolume.region_volumes_cm3``), a SEG
read back (``node.results.seg.region_volumes_from_seg``) and a phantom's truth.
Each pixel of a slice stands for its pixel area times the slice's extent along
the slice normal (:func:`slice_extents_mm`), so a stack with uneven spacing is
counted on its own geometry, never on a resampled grid. One function, one order
of summation: two counts of the same labels agree exactly.

Which voxels of a region count is decided here too (:func:`countable_labels`):
the one definition of a region's volume that every method goes through.
"""
from __future__ import annotations

from typing import Sequence

import numpy as np
from scipy import ndimage

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


# ---------------------------------------------------------------------------------------
# Which voxels of a region count: the one definition of a region's volume
# ---------------------------------------------------------------------------------------
#
# A region's volume is its brain tissue: the voxels of the region's territory (wherever a
# method puts the region's boundaries) whose density is brain parenchyma's, not CSF's.
# Sulcal and extra-axial CSF and the ventricles are not counted. Why, and from what
# sources: README "What a region's volume is" and inference/weights/MODEL_CARD.md.
# Every method goes through :func:`countable_labels`: the network, the atlas registration
# and a phantom's truth, so two methods differ only where they put the boundaries.

#: HU window in which the parenchyma's peak is looked for: above CSF (0-15 HU) even when CSF
#: outweighs the brain (hydrocephalus), below bone.
PARENCHYMA_PEAK_WINDOW_HU = (15.0, 60.0)
#: Half the usual density contrast between parenchyma and CSF (HU): grey and white matter read
#: about 25-45 HU, CSF 0-10 HU, so the threshold sits this far below the parenchyma's peak.
HALF_CONTRAST_HU = 12.0
#: A voxel at or above this HU is not parenchyma (partial volume with bone at the inner table).
MAX_PARENCHYMA_HU = 100.0
#: SD of the Gaussian that takes CT noise off before a voxel is called CSF or parenchyma (mm),
#: applied along the axes finer than twice it (in-plane, usually).
NOISE_SMOOTHING_MM = 0.6
#: Fewest intracranial voxels within the peak window for a threshold to be trusted.
MIN_THRESHOLD_VOXELS = 1000


def parenchyma_threshold_hu(intracranial_hu: np.ndarray) -> float:
    """The case's own CSF/parenchyma threshold (HU) from the HU of its intracranial voxels.

    The parenchyma's peak (the mode of the intracranial histogram within
    :data:`PARENCHYMA_PEAK_WINDOW_HU`, 1 HU bins smoothed over 2 HU) less
    :data:`HALF_CONTRAST_HU`. The peak follows scanner calibration and a child's lower
    brain density; a fixed offset from it, not a two-class split, because grey and white
    matter often make one broad peak with CSF only a shoulder below it, where a two-class
    split (Otsu's) cuts the brain's own peak in two. The sample should be the
    intracranial space on a grid of about 1-2 mm, where one source voxel's noise is averaged out.

    Raises:
        ValueError: fewer than :data:`MIN_THRESHOLD_VOXELS` voxels within the peak window.
    """
    values = np.asarray(intracranial_hu, dtype=np.float64).ravel()
    low, high = PARENCHYMA_PEAK_WINDOW_HU
    values = values[(values >= low) & (values < high)]
    if values.size < MIN_THRESHOLD_VOXELS:
        raise ValueError(f"only {values.size} intracranial voxels within {low:g}..{high:g} HU: "
                         "no brain parenchyma to measure (not a head CT in HU?)")
    counts, edges = np.histogram(values, bins=np.arange(low, high + 1.0, 1.0))
    smoothed = ndimage.gaussian_filter1d(counts.astype(float), 2.0, mode="nearest")
    peak = float((edges[:-1] + 0.5)[int(np.argmax(smoothed))])
    return peak - HALF_CONTRAST_HU


def countable_labels(labels: np.ndarray, hu: np.ndarray, spacing_zyx: Sequence[float],
                     threshold_hu: float) -> np.ndarray:
    """The labels whose voxels count towards a region's volume: territory voxels of parenchyma density.

    Args:
        labels: (z, y, x) region labels 0..10 (a method's territories) on the image's grid.
        hu: the image (z, y, x) in HU, same shape.
        spacing_zyx: voxel spacing (mm) along the array's axes.
        threshold_hu: the case's CSF/parenchyma threshold (:func:`parenchyma_threshold_hu`).

    Returns:
        A new uint8 label array: ``labels`` where the smoothed HU (clipped to the brain's
        window first) is at least ``threshold_hu`` and the voxel's own HU below
        :data:`MAX_PARENCHYMA_HU`, 0 elsewhere.

    Raises:
        ValueError: shapes that differ, a non-positive spacing or a threshold not below
            :data:`MAX_PARENCHYMA_HU`.
    """
    labels = np.asarray(labels)
    if labels.ndim != 3 or labels.shape != np.shape(hu):
        raise ValueError(f"labels {labels.shape} and image {np.shape(hu)} must be 3D arrays of one shape")
    spacing = np.asarray(spacing_zyx, dtype=float)
    if spacing.shape != (3,) or not np.all(spacing > 0):
        raise ValueError(f"spacing must be three positive lengths (mm), got {spacing_zyx}")
    if not threshold_hu < MAX_PARENCHYMA_HU:
        raise ValueError(f"parenchyma threshold {threshold_hu} HU must lie below {MAX_PARENCHYMA_HU} HU")
    counted = np.zeros(labels.shape, np.uint8)
    found = ndimage.find_objects((labels > 0).astype(np.uint8))
    if not found or found[0] is None:
        return counted
    box = found[0]
    sigmas = [NOISE_SMOOTHING_MM / s if s < 2 * NOISE_SMOOTHING_MM else 0.0 for s in spacing]
    # Clipped before smoothing: bone's and air's extreme values must not bleed into the cortex beside them.
    clipped = np.clip(np.asarray(hu[box], dtype=np.float32), PARENCHYMA_PEAK_WINDOW_HU[0] - 30.0, MAX_PARENCHYMA_HU)
    smoothed = ndimage.gaussian_filter(clipped, sigmas)
    # Noise decides nothing (the smoothed HU against the threshold); a voxel that reads as bone itself is not brain.
    keep = (smoothed >= threshold_hu) & (np.asarray(hu[box]) < MAX_PARENCHYMA_HU)
    counted[box] = np.where(keep, labels[box], 0)
    return counted


def otsu_threshold(values: np.ndarray, bins: int = 256) -> float:
    """Otsu's threshold of a 1D sample: the value that best splits it into two classes.

    Raises:
        ValueError: fewer than two distinct values.
    """
    values = np.asarray(values, dtype=np.float64).ravel()
    if values.size < 2 or values.min() == values.max():
        raise ValueError("Otsu's threshold needs at least two distinct values")
    counts, edges = np.histogram(values, bins=bins)
    centres = (edges[:-1] + edges[1:]) / 2
    below = np.cumsum(counts)
    above = below[-1] - below
    sum_below = np.cumsum(counts * centres)
    mean_below = sum_below / np.maximum(below, 1)
    mean_above = (sum_below[-1] - sum_below) / np.maximum(above, 1)
    between_class = below * above * (mean_below - mean_above) ** 2
    return float(centres[int(np.argmax(between_class))])
