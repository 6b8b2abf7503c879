"""Preprocessing shared by training and prediction: the paper's three steps on a SimpleITK image.

Xi et al. (2025) resample to a working spacing, equalise intensities by
adaptive histogram equalisation (AHE) and strip the skull by thresholding.
:func:`preprocess_image` does this in an order that keeps the slow step small:

1. **Resample** (linear) the HU image onto the *working grid*: the working
   spacing, axes aligned with the patient (LPS, identity direction), covering
   the whole source image. Aligning with the patient axes makes the last array
   axis always left-right, whatever the acquisition (gantry tilt, rotated
   reconstructions), which is what the left-right flips of training and of
   test-time augmentation assume.
2. **Intracranial mask** by thresholds (:func:`intracranial_mask`), sought in
   the head's box (HU > -500): the skull is bone (HU > ``bone_hu``), closed
   morphologically (``skull_closing_mm``) to seal sutures, thin bone and small
   foramina; the inside is what the closed skull encloses (holes filled per
   axial slice, which copes with the skull open at the foramen magnum; those
   filled slices plug the bottom for a 3D filling that reaches the levels where
   axial slices are open) within the soft-tissue HU range; an erosion cuts thin
   bridges, the largest component is kept, grown back, and its inner holes
   (calcified choroid plexus, vessels) are filled. In preprocess_image the mask
   is then dilated by half the source's largest spacing, the band where thick
   slices mix brain and bone (the network decides there). Morphology uses distance
   transforms (exact balls in mm, cost independent of the radius).
3. **Crop** to the mask's box plus ``margin_mm``, padded so that every side is a
   multiple of :data:`GRID_DIVISOR` (16, the network's down-sampling factor;
   this module stays free of torch).
4. **Window** to the brain window (``window_hu``), set everything outside the
   mask to the window's low end (so the skull does not dominate the
   histograms), **AHE** (``sitk.AdaptiveHistogramEqualizationImageFilter``) on
   the cropped box only, scale the window to [0, 1]; outside the mask = 0.

:func:`labels_to_grid` brings reference labels onto the same grid (for
training), label-aware. Times of each step are logged at DEBUG level and kept
in ``Preprocessed.timings_s``.
"""
from __future__ import annotations

import dataclasses
import logging
import math
import time
from dataclasses import dataclass, field
from typing import Any, Mapping

import numpy as np
import SimpleITK as sitk
from scipy import ndimage

from inference.vocabulary import NUM_CLASSES

log = logging.getLogger(__name__)

#: Sides of the cropped working grid are multiples of this (the network's down-sampling factor).
GRID_DIVISOR = 16
#: HU given to places outside the source image when resampling (air).
AIR_HU = -1024.0
#: Radius (mm) of the erosion that separates the brain from what touches it through narrow openings.
BRIDGE_MM = 2.0
#: Smaller intracranial spaces are refused (a neonate's brain is about 350 cm3).
MIN_INTRACRANIAL_CM3 = 100.0
#: Anything above this is the head (or its support), not air: the box the mask is sought in.
HEAD_HU = -500.0


@dataclass(frozen=True)
class PreprocessConfig:
    """Every parameter of the preprocessing; stored in checkpoints so prediction repeats training.

    Attributes:
        spacing_mm: working spacing (x, y, z) in mm.
        window_hu: brain window (low, high) in HU, clipped before AHE (W100/L30 by default).
        ahe_alpha: AHE alpha (0 = classical histogram equalisation, 1 = unsharp mask).
        ahe_beta: AHE beta (0 = unsharp mask, 1 = pass-through).
        ahe_radius_mm: AHE neighbourhood radius in mm (rounded to working voxels, at least 1).
        bone_hu: HU above which a voxel is bone (skull).
        soft_tissue_hu: (low, high) HU of intracranial soft tissue (CSF, brain, blood).
        skull_closing_mm: radius (mm) of the closing that seals sutures and foramina.
        margin_mm: margin (mm) added around the intracranial mask's box when cropping.
    """

    spacing_mm: tuple[float, float, float] = (1.5, 1.5, 1.5)
    window_hu: tuple[float, float] = (-20.0, 80.0)
    ahe_alpha: float = 0.3
    ahe_beta: float = 0.3
    ahe_radius_mm: float = 6.0
    bone_hu: float = 150.0
    soft_tissue_hu: tuple[float, float] = (-15.0, 120.0)
    skull_closing_mm: float = 12.0
    margin_mm: float = 6.0

    def __post_init__(self) -> None:
        if len(self.spacing_mm) != 3 or any(not (s > 0 and math.isfinite(s)) for s in self.spacing_mm):
            raise ValueError(f"working spacing must be three positive numbers (mm), got {self.spacing_mm}")
        if len(self.window_hu) != 2 or not self.window_hu[0] < self.window_hu[1]:
            raise ValueError(f"window must be (low, high) HU with low < high, got {self.window_hu}")
        if len(self.soft_tissue_hu) != 2 or not self.soft_tissue_hu[0] < self.soft_tissue_hu[1]:
            raise ValueError(f"soft-tissue range must be (low, high) HU with low < high, got {self.soft_tissue_hu}")
        if not self.bone_hu > self.soft_tissue_hu[1]:
            raise ValueError(f"bone threshold {self.bone_hu} HU must lie above the soft-tissue range "
                             f"{self.soft_tissue_hu}")
        for name in ("ahe_alpha", "ahe_beta"):
            if not 0.0 <= getattr(self, name) <= 1.0:
                raise ValueError(f"{name} must be within 0..1, got {getattr(self, name)}")
        for name in ("ahe_radius_mm", "skull_closing_mm", "margin_mm"):
            if not getattr(self, name) >= 0:
                raise ValueError(f"{name} must be >= 0 mm, got {getattr(self, name)}")

    def to_dict(self) -> dict[str, Any]:
        """JSON-able form (tuples become lists)."""
        return {f.name: (list(v) if isinstance(v := getattr(self, f.name), tuple) else v)
                for f in dataclasses.fields(self)}

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> "PreprocessConfig":
        """Inverse of :meth:`to_dict`; unknown keys are an error (a checkpoint from other code)."""
        names = {f.name for f in dataclasses.fields(cls)}
        unknown = set(data) - names
        if unknown:
            raise ValueError(f"unknown preprocessing parameters {', '.join(sorted(unknown))}; "
                             f"this code knows {', '.join(sorted(names))}")
        values = {k: (tuple(float(x) for x in v) if isinstance(v, (list, tuple)) else v) for k, v in data.items()}
        return cls(**values)


@dataclass
class Preprocessed:
    """A preprocessed image on its cropped working grid.

    Attributes:
        array: float32 (z, y, x), normalised to [0, 1] inside the mask, 0 outside.
        mask: bool (z, y, x), the intracranial mask.
        grid: an image (UInt8, empty) whose size/spacing/origin/direction are the cropped grid.
        timings_s: seconds spent per step ("resample", "mask", "ahe", ...).
    """

    array: np.ndarray
    mask: np.ndarray
    grid: sitk.Image
    timings_s: dict[str, float] = field(default_factory=dict)


# --- geometry ------------------------------------------------------------------------------

def check_image(image: sitk.Image, what: str = "image") -> None:
    """Raise ValueError unless ``image`` is a 3D scalar image with a usable geometry."""
    if not isinstance(image, sitk.Image):
        raise ValueError(f"{what} must be a SimpleITK image, got {type(image).__name__}")
    if image.GetDimension() != 3:
        raise ValueError(f"{what} must be 3D, got {image.GetDimension()}D")
    if image.GetNumberOfComponentsPerPixel() != 1:
        raise ValueError(f"{what} must be scalar, got {image.GetNumberOfComponentsPerPixel()} components per voxel")
    if min(image.GetSize()) < 2:
        raise ValueError(f"{what} of size {image.GetSize()} is not a volume (needs >= 2 voxels per axis)")
    if any(not (s > 0) for s in image.GetSpacing()):
        raise ValueError(f"{what} spacing {image.GetSpacing()} is not positive")
    if abs(np.linalg.det(np.reshape(image.GetDirection(), (3, 3)))) < 1e-6:
        raise ValueError(f"{what} direction {image.GetDirection()} is singular")


def index_to_physical_matrix(image: sitk.Image) -> tuple[np.ndarray, np.ndarray]:
    """(A, b) with physical point (x, y, z) = A @ (i, j, k) + b, in mm."""
    direction = np.reshape(image.GetDirection(), (3, 3))
    return direction @ np.diag(image.GetSpacing()), np.asarray(image.GetOrigin(), dtype=float)


def physical_bounds(image: sitk.Image) -> tuple[np.ndarray, np.ndarray]:
    """Lowest and highest physical (x, y, z) over the centres of the image's corner voxels."""
    matrix, offset = index_to_physical_matrix(image)
    size = np.asarray(image.GetSize()) - 1
    corners = np.array([[i, j, k] for i in (0, size[0]) for j in (0, size[1]) for k in (0, size[2])], dtype=float)
    points = corners @ matrix.T + offset
    return points.min(axis=0), points.max(axis=0)


def index_box_covering(image: sitk.Image, grid: sitk.Image, margin: int = 0) -> tuple[np.ndarray, np.ndarray] | None:
    """(low, high): the inclusive (i, j, k) index range of ``image`` that covers ``grid``'s extent.

    ``margin`` voxels are added on each side (for interpolation), clipped to the
    image; None when the two do not overlap.
    """
    image_matrix, image_offset = index_to_physical_matrix(image)
    low, high = physical_bounds(grid)
    corners = np.array([[x, y, z] for x in (low[0], high[0]) for y in (low[1], high[1]) for z in (low[2], high[2])])
    indices = np.linalg.solve(image_matrix, (corners - image_offset).T).T
    first = np.maximum(np.floor(indices.min(axis=0)).astype(int) - margin, 0)
    last = np.minimum(np.ceil(indices.max(axis=0)).astype(int) + margin, np.asarray(image.GetSize()) - 1)
    return None if np.any(first > last) else (first, last)


def working_grid(image: sitk.Image, spacing_mm: tuple[float, float, float]) -> sitk.Image:
    """An empty patient-aligned grid at ``spacing_mm`` covering all of ``image``."""
    low, high = physical_bounds(image)
    spacing = np.asarray(spacing_mm, dtype=float)
    size = np.floor((high - low) / spacing + 1e-6).astype(int) + 1
    grid = sitk.Image([int(s) for s in size], sitk.sitkUInt8)
    grid.SetSpacing([float(s) for s in spacing])
    grid.SetOrigin([float(v) for v in low])
    grid.SetDirection(np.eye(3).ravel().tolist())
    return grid


def crop_grid(grid: sitk.Image, start_zyx: np.ndarray, size_zyx: np.ndarray) -> sitk.Image:
    """The sub-grid of ``grid`` starting at array index ``start_zyx`` (may be negative) of ``size_zyx``."""
    matrix, offset = index_to_physical_matrix(grid)
    start_xyz = np.asarray(start_zyx, dtype=float)[::-1]
    cropped = sitk.Image([int(s) for s in np.asarray(size_zyx)[::-1]], sitk.sitkUInt8)
    cropped.SetSpacing(grid.GetSpacing())
    cropped.SetDirection(grid.GetDirection())
    cropped.SetOrigin([float(v) for v in matrix @ start_xyz + offset])
    return cropped


def resample_to(image: sitk.Image, grid: sitk.Image, interpolator: int = sitk.sitkLinear,
                default: float = AIR_HU, pixel_type: int = sitk.sitkFloat32) -> sitk.Image:
    """``image`` resampled onto ``grid``'s geometry; outside the image = ``default``."""
    return sitk.Resample(image, grid, sitk.Transform(), interpolator, float(default), pixel_type)


# --- skull stripping ----------------------------------------------------------------------

# Morphology by Euclidean distance transforms: exact balls in mm on anisotropic grids, and a
# cost that does not grow with the radius (a 10 mm ball is ~1000 voxels at 1.5 mm).

def dilate_mm(mask: np.ndarray, radius_mm: float, spacing_zyx: np.ndarray) -> np.ndarray:
    """Voxels within ``radius_mm`` of ``mask``."""
    if radius_mm <= 0 or not mask.any():
        return mask.copy()
    return ndimage.distance_transform_edt(~mask, sampling=spacing_zyx) <= radius_mm


def erode_mm(mask: np.ndarray, radius_mm: float, spacing_zyx: np.ndarray) -> np.ndarray:
    """Voxels of ``mask`` farther than ``radius_mm`` from its outside (the array edge is not outside)."""
    if radius_mm <= 0 or mask.all():
        return mask.copy()
    return ndimage.distance_transform_edt(mask, sampling=spacing_zyx) > radius_mm


def _fill_holes_per_slice(mask: np.ndarray) -> np.ndarray:
    """Fill holes in every axial slice (array axis 0) independently."""
    in_plane = np.zeros((3, 3, 3), dtype=bool)
    in_plane[1] = ndimage.generate_binary_structure(2, 1)
    return ndimage.binary_fill_holes(mask, structure=in_plane)


def _largest_component(mask: np.ndarray) -> np.ndarray:
    labels, count = ndimage.label(mask)
    if count == 0:
        return mask
    sizes = np.bincount(labels.ravel())
    sizes[0] = 0
    return labels == int(np.argmax(sizes))


def intracranial_mask(hu: np.ndarray, spacing_zyx: tuple[float, float, float],
                      config: PreprocessConfig) -> np.ndarray:
    """Boolean mask (z, y, x) of the intracranial space of a head CT in HU.

    Args:
        hu: image in HU on a grid whose axis 0 is (close to) the head's
            superior-inferior axis.
        spacing_zyx: voxel spacing (z, y, x) in mm.
        config: thresholds and the closing radius.

    Raises:
        ValueError: no skull (bone above ``bone_hu``), or less than
            :data:`MIN_INTRACRANIAL_CM3` of soft tissue enclosed by it, e.g. an
            image that is not a head CT, not in HU, or covers little of the head.
    """
    spacing = np.asarray(spacing_zyx, dtype=float)
    skull = hu > config.bone_hu
    if skull.sum() * spacing.prod() < 1000.0:  # < 1 cm3 of bone: not a head CT in HU
        raise ValueError(f"no skull found: less than 1 cm3 above {config.bone_hu} HU "
                         "(is this a head CT with pixel values in HU?)")
    # The closed skull is only the container: the closing seals gaps narrower than twice the
    # radius (sutures, thin bone lost to partial volume, the cribriform plate) but not the
    # foramen magnum. Slices where the skull is a closed ring are filled in 2D; those filled
    # slices then plug the open bottom, so that a 3D filling also reaches the levels where an
    # axial slice is open (the anterior skull base at the orbits, the sella).
    container = erode_mm(dilate_mm(skull, config.skull_closing_mm, spacing), config.skull_closing_mm, spacing)
    enclosed = ndimage.binary_fill_holes(_fill_holes_per_slice(container) | container)
    soft = (hu >= config.soft_tissue_hu[0]) & (hu <= config.soft_tissue_hu[1])
    inside = enclosed & soft & ~skull
    # An erosion cuts thin bridges (optic canals, scalp met through a sealed gap) before the
    # largest component is chosen; growing it back within the inside returns its surface.
    # (Excluding the sealed gaps from the core would also keep the nasal cavity out on thick
    # adult slices, but it cuts a toddler's foramen magnum and upper canal, which the closing
    # seals: the target population comes first.)
    bridge_mm = max(float(spacing.max()), BRIDGE_MM)
    core = _largest_component(erode_mm(inside, bridge_mm, spacing))
    if not core.any():
        raise ValueError("no intracranial space found: the skull encloses no soft tissue "
                         f"within {config.soft_tissue_hu} HU")
    brain = dilate_mm(core, bridge_mm, spacing) & inside
    # Inner holes (calcified choroid plexus, vessels above the range) belong to the inside.
    brain = ndimage.binary_fill_holes(brain)
    volume_cm3 = brain.sum() * spacing.prod() / 1000.0
    if volume_cm3 < MIN_INTRACRANIAL_CM3:
        raise ValueError(f"the skull encloses only {volume_cm3:.0f} cm3 of soft tissue (< {MIN_INTRACRANIAL_CM3:.0f}): "
                         "no brain to segment (a test object, or a series that covers only part of the head?)")
    return brain


# --- the pipeline -------------------------------------------------------------------------

def _box(mask: np.ndarray, spacing_zyx: np.ndarray, margin_mm: float,
         divisor: int = 1) -> tuple[np.ndarray, np.ndarray]:
    """(start, size) in array indices of the mask's box plus margin, sides padded to ``divisor``."""
    if not mask.any():
        raise ValueError("nothing to crop to: the image holds no head (no voxel above "
                         f"{HEAD_HU:.0f} HU)")
    nonzero = np.nonzero(mask.any(axis=(1, 2)))[0], np.nonzero(mask.any(axis=(0, 2)))[0], \
        np.nonzero(mask.any(axis=(0, 1)))[0]
    low = np.array([a[0] for a in nonzero])
    high = np.array([a[-1] for a in nonzero]) + 1
    margin = np.ceil(margin_mm / spacing_zyx).astype(int)
    low, high = low - margin, high + margin
    size = high - low
    padded = -(-size // divisor) * divisor
    start = low - (padded - size) // 2
    return start, padded


def _extract(array: np.ndarray, start: np.ndarray, size: np.ndarray, fill: float) -> np.ndarray:
    """``array[start:start+size]`` per axis, with ``fill`` where the box leaves the array."""
    out = np.full(tuple(int(s) for s in size), fill, dtype=array.dtype)
    src = tuple(slice(max(b, 0), min(b + s, n)) for b, s, n in zip(start, size, array.shape))
    dst = tuple(slice(r.start - b, r.stop - b) for r, b in zip(src, start))
    out[dst] = array[src]
    return out


def equalise(hu: np.ndarray, mask: np.ndarray, spacing_zyx: np.ndarray, config: PreprocessConfig) -> np.ndarray:
    """Brain-window clip, AHE, scale to [0, 1]; outside ``mask`` = 0. Returns float32."""
    low, high = config.window_hu
    scaled = np.zeros(hu.shape, dtype=np.float32)
    if not mask.any():
        return scaled
    radius_zyx = np.array([max(1, int(round(config.ahe_radius_mm / s))) for s in spacing_zyx])
    # AHE is the slow step (~2-3 us per voxel): run it on the mask's box grown by the radius
    # only. Outside the mask every voxel is `low`, and ITK's zero-flux boundary repeats the
    # box's edge (also `low`), so the result inside the mask is the same as on the whole crop.
    nonzero = np.nonzero(mask)
    start = np.maximum(np.array([a.min() for a in nonzero]) - radius_zyx - 1, 0)
    stop = np.minimum(np.array([a.max() for a in nonzero]) + radius_zyx + 2, hu.shape)
    box = tuple(slice(a, b) for a, b in zip(start, stop))
    # Integer HU: AHE's cost grows with the number of distinct values; the window keeps ~100.
    windowed = np.round(np.clip(hu[box], low, high)).astype(np.float32)
    windowed[~mask[box]] = low
    ahe = sitk.AdaptiveHistogramEqualizationImageFilter()
    ahe.SetAlpha(config.ahe_alpha)
    ahe.SetBeta(config.ahe_beta)
    ahe.SetRadius([int(r) for r in radius_zyx[::-1]])
    equalised = sitk.GetArrayFromImage(ahe.Execute(sitk.GetImageFromArray(windowed)))
    scaled[box] = np.clip((equalised - low) / (high - low), 0.0, 1.0)
    scaled[~mask] = 0.0
    return scaled


def preprocess_image(image: sitk.Image, config: PreprocessConfig) -> Preprocessed:
    """Resample, skull-strip, crop and normalise a head CT (HU) for the network.

    Args:
        image: 3D scalar SimpleITK image in HU (any pixel type, any direction).
        config: the preprocessing parameters (a checkpoint's, for prediction).

    Returns:
        The normalised array, the intracranial mask and the cropped working grid.

    Raises:
        ValueError: the image is not a 3D scalar volume, or no skull /
            intracranial space is found in it.
    """
    check_image(image)
    timings: dict[str, float] = {}
    started = time.perf_counter()
    full_grid = working_grid(image, config.spacing_mm)
    hu = sitk.GetArrayFromImage(resample_to(image, full_grid))
    timings["resample"] = time.perf_counter() - started

    started = time.perf_counter()
    spacing_zyx = np.asarray(config.spacing_mm, dtype=float)[::-1]
    # Work on the head's box only (the field of view is often much wider than the head); the
    # margin keeps the closing of the skull clear of the box's faces.
    head_start, head_size = _box(hu > HEAD_HU, spacing_zyx, config.skull_closing_mm + config.margin_mm + 3.0)
    hu = _extract(hu, head_start, head_size, AIR_HU)
    full_grid = crop_grid(full_grid, head_start, head_size)
    mask = intracranial_mask(hu, tuple(spacing_zyx), config)
    # Thick source slices blur the brain's edge into the skull (at the vertex a 5 mm slice
    # reads as bone while half of it is brain): give the network that band to decide on.
    partial_volume_mm = 0.5 * max(image.GetSpacing())
    if partial_volume_mm > 0.5 * float(spacing_zyx.min()):
        mask = dilate_mm(mask, partial_volume_mm, spacing_zyx)
    start, size = _box(mask, spacing_zyx, config.margin_mm, GRID_DIVISOR)
    hu = _extract(hu, start, size, AIR_HU)
    mask = _extract(mask, start, size, False)
    grid = crop_grid(full_grid, start, size)
    timings["mask"] = time.perf_counter() - started

    started = time.perf_counter()
    array = equalise(hu, mask, spacing_zyx, config)
    timings["ahe"] = time.perf_counter() - started
    log.debug("preprocess: grid %s at %s mm, mask %.0f cm3, %s", tuple(size), config.spacing_mm,
              mask.sum() * spacing_zyx.prod() / 1000.0, {k: round(v, 2) for k, v in timings.items()})
    return Preprocessed(array=array, mask=mask, grid=grid, timings_s=timings)


def labels_to_grid(labels: sitk.Image, grid: sitk.Image) -> np.ndarray:
    """Reference labels resampled label-aware onto ``grid``: uint8 (z, y, x), 0 outside ``labels``.

    Each label's indicator is resampled linearly and every voxel takes the
    label of the largest interpolated indicator, so thin regions survive a
    coarser grid better than with nearest neighbour and no label is invented
    between two others.
    """
    check_image(labels, "labels")
    values = sitk.GetArrayViewFromImage(labels)
    if not np.issubdtype(values.dtype, np.integer):
        raise ValueError(f"labels must have an integer pixel type, got {labels.GetPixelIDTypeAsString()}")
    present = np.unique(values)
    if present.min() < 0 or present.max() >= NUM_CLASSES:
        raise ValueError(f"labels must lie within 0..{NUM_CLASSES - 1}, found {present.min()}..{present.max()}")
    reference = grid if grid.GetPixelID() == sitk.sitkUInt8 else sitk.Image(grid.GetSize(), sitk.sitkUInt8)
    reference.CopyInformation(grid)
    best = np.zeros(tuple(reversed(grid.GetSize())), dtype=np.float32)
    result = np.zeros(best.shape, dtype=np.uint8)
    box = index_box_covering(labels, grid, margin=1)
    if box is None:
        return result
    # Only the part of the labels under the grid is resampled (the grid is the brain's box).
    labels = labels[int(box[0][0]):int(box[1][0]) + 1, int(box[0][1]):int(box[1][1]) + 1,
                    int(box[0][2]):int(box[1][2]) + 1]
    present = np.unique(sitk.GetArrayViewFromImage(labels))
    for value in present:
        indicator = sitk.Cast(labels == int(value), sitk.sitkFloat32)
        score = sitk.GetArrayFromImage(resample_to(indicator, reference, default=1.0 if value == 0 else 0.0))
        better = score > best
        best[better] = score[better]
        result[better] = value
    return result
