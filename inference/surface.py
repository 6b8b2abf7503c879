"""Brain-surface refinement: the predicted edge of the cerebrum moved to where the CT shows CSF.

The network sees the head on its working grid (1.5 mm for the bundled model);
its labels come back to source voxels of 0.35-0.6 mm by interpolation, so
along the cerebral surface the edge sits where the network expects it, not
necessarily where the image draws it, and on held-out phantoms the total of
the 10 volumes followed the width of the extra-axial CSF (README, *Training*).
:func:`refine_brain_surface` moves that edge, on the source grid, by the
image's own contrast between CSF (about 0-15 HU) and cortex (about 30-40 HU):

1. Smooth the HU with a Gaussian of SD ``smoothing_mm`` along the axes whose
   spacing is finer than twice that (in-plane, usually): CT noise is grainy
   at the scale of a pixel, and one noisy voxel must not move the edge.
2. The case's own CSF/brain threshold: Otsu's threshold of the smoothed HU
   within ``band_mm`` of the predicted surface, on both sides, among values
   in ``hu_range``. Scanner calibration shifts it with the image.
3. Remove: cerebral-lobe voxels within ``remove_depth_mm`` of a non-brain
   voxel, darker than the threshold and connected to non-brain through such
   voxels, become background (a dark voxel of noise inside the cortex stays).
4. Add: background voxels within ``add_depth_mm`` of the brain, from the
   threshold up to ``max_brain_hu`` (bone and blood are brighter), connected
   to the brain through such voxels, whose nearest brain voxel is a cerebral
   lobe, take that lobe's label.

Only images whose voxels are at most ``max_spacing_mm`` along every axis are
refined. A thicker slice averages CSF and cortex over more than the removal
depth, so its HU no longer says where the edge lies within it; on held-out
phantoms of 2.5-5 mm slices the refinement made totals worse, on 1.25 mm ones
better (figures: the model card).

The brainstem and the cerebellum are left as the network drew them: they
border cisterns where partial volume with the petrous bone and the tentorium
reads as brain, and adding there lowered the brainstem's Dice on the tuning
phantoms. Lengths in mm, intensities in HU.
"""
from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Sequence

import numpy as np
import SimpleITK as sitk
from scipy import ndimage

from inference.volumes import otsu_threshold
from inference.vocabulary import NUM_CLASSES, REGIONS

log = logging.getLogger(__name__)

#: Label values of the eight cerebral lobes (the regions this refinement moves).
CEREBRAL_LOBES = tuple(region.value for region in REGIONS if region.structure.endswith("lobe"))
_IS_LOBE = np.isin(np.arange(NUM_CLASSES), CEREBRAL_LOBES)
#: Fewest voxels in the band around the surface for a threshold to be trusted.
MIN_BAND_VOXELS = 1000


@dataclass(frozen=True)
class SurfaceRefinement:
    """Settings of :func:`refine_brain_surface` (mm and HU).

    Attributes:
        remove_depth_mm: lobe voxels this close to non-brain may become background.
        add_depth_mm: background voxels this close to the brain may become a lobe.
        smoothing_mm: SD of the Gaussian applied along axes finer than twice it.
        band_mm: half-width of the band around the predicted surface whose
            voxels set the CSF/brain threshold.
        hu_range: (low, high) HU of the voxels that set the threshold.
        max_brain_hu: background voxels at or above this are never added.
        max_spacing_mm: images with a coarser spacing along any axis are left as they are.

    Raises:
        ValueError: a negative length, a band narrower than the depths, or an
            empty or inverted HU range.
    """

    remove_depth_mm: float = 2.0
    add_depth_mm: float = 1.5
    smoothing_mm: float = 0.6
    band_mm: float = 3.0
    hu_range: tuple[float, float] = (-20.0, 60.0)
    max_brain_hu: float = 70.0
    max_spacing_mm: float = 2.0

    def __post_init__(self) -> None:
        for name in ("remove_depth_mm", "add_depth_mm", "smoothing_mm", "band_mm", "max_spacing_mm"):
            if not getattr(self, name) >= 0:
                raise ValueError(f"{name} must be >= 0 mm, got {getattr(self, name)}")
        if self.band_mm < max(self.remove_depth_mm, self.add_depth_mm):
            raise ValueError(f"band_mm ({self.band_mm}) must be at least the remove and add depths "
                             f"({self.remove_depth_mm}, {self.add_depth_mm})")
        low, high = self.hu_range
        if not low < high:
            raise ValueError(f"hu_range must be (low, high) with low < high, got {self.hu_range}")
        if not self.max_brain_hu > low:
            raise ValueError(f"max_brain_hu ({self.max_brain_hu}) must exceed hu_range's low end ({low})")

    def applies_to(self, spacing_mm: Sequence[float]) -> bool:
        """Whether an image of this voxel spacing (mm, any axis order) is refined."""
        return max(float(s) for s in spacing_mm) <= self.max_spacing_mm


def refine_brain_surface(labels: np.ndarray, hu: np.ndarray, spacing_zyx: Sequence[float],
                         settings: SurfaceRefinement = SurfaceRefinement()) -> np.ndarray:
    """Move the cerebral lobes' predicted edge to the CSF/brain contrast of the image.

    Args:
        labels: uint8 (z, y, x) labels 0..10 on the image's grid.
        hu: the image (z, y, x) in HU, same shape.
        spacing_zyx: voxel spacing (mm) along the array's axes.
        settings: depths, smoothing and HU limits.

    Returns:
        A new uint8 label array; a copy of ``labels`` when a spacing exceeds
        ``settings.max_spacing_mm``, when there is no brain, or when too little
        of a surface shows to set a threshold on.

    Raises:
        ValueError: shapes differ, labels outside 0..10, or a non-positive spacing.
    """
    labels = np.asarray(labels)
    if labels.shape != np.shape(hu) or labels.ndim != 3:
        raise ValueError(f"labels {labels.shape} and image {np.shape(hu)} must be 3D arrays of one shape")
    spacing = np.asarray(spacing_zyx, dtype=np.float64)
    if spacing.shape != (3,) or not np.all(spacing > 0):
        raise ValueError(f"spacing must be three positive lengths (mm), got {spacing_zyx}")
    if labels.size and labels.max() >= NUM_CLASSES:
        raise ValueError(f"label values must lie within 0..{NUM_CLASSES - 1}, found {labels.max()}")
    refined = np.array(labels, dtype=np.uint8, copy=True)
    if not settings.applies_to(spacing):
        return refined
    found = ndimage.find_objects((labels > 0).astype(np.uint8))
    if not found or found[0] is None:
        return refined
    box = _grown_box(found[0], spacing, settings.band_mm + spacing.max(), labels.shape)
    window = refined[box]
    brain = window > 0
    smoothed = _smoothed(hu[box], spacing, settings.smoothing_mm)
    depth_inside = _distance_to(~brain, spacing)
    distance_outside = _distance_to(brain, spacing)
    threshold = _band_threshold(smoothed, brain, depth_inside, distance_outside, settings)
    if threshold is None:
        return refined
    original = window.copy()
    remove = brain & _IS_LOBE[original] & (depth_inside <= settings.remove_depth_mm) & (smoothed < threshold)
    add = (~brain & (distance_outside <= settings.add_depth_mm)
           & (smoothed >= threshold) & (smoothed < settings.max_brain_hu))
    # Dark voxels inside the cortex that no CSF reaches are noise, not sulci: they stay.
    remove &= _reached_from(~brain, remove)
    window[remove] = 0
    # A CSF voxel beside the inner table is as bright as cortex once smoothed, but dark CSF
    # lies between it and the brain: only voxels the brain reaches through bright ones are added.
    add_at = np.nonzero(add & _reached_from(window > 0, add))
    nearest_label = _nearest_labels(original, add_at, spacing, settings.add_depth_mm)
    keep = _IS_LOBE[nearest_label]
    window[tuple(axis[keep] for axis in add_at)] = nearest_label[keep]
    log.debug("surface refinement: threshold %.1f HU, %d voxels removed, %d added",
              threshold, int(remove.sum()), int(keep.sum()))
    return refined


def _distance_to(mask: np.ndarray, spacing: np.ndarray) -> np.ndarray:
    """Distance (mm, float32) of every voxel to the nearest voxel of ``mask``; 0 on it.

    SimpleITK's Maurer transform: exact Euclidean distances like
    ``scipy.ndimage.distance_transform_edt`` but multi-threaded, so faster on a
    head at 0.45 mm.
    """
    image = sitk.GetImageFromArray(mask.astype(np.uint8))
    image.SetSpacing([float(s) for s in spacing[::-1]])
    signed = sitk.SignedMaurerDistanceMap(image, insideIsPositive=False, squaredDistance=False,
                                          useImageSpacing=True, backgroundValue=0)
    return np.maximum(sitk.GetArrayFromImage(signed), 0.0)


def _nearest_labels(labels: np.ndarray, points: tuple[np.ndarray, ...], spacing: np.ndarray,
                    reach_mm: float) -> np.ndarray:
    """Label of the nearest labelled (> 0) voxel to each point within ``reach_mm``; 0 where none is.

    Offsets are tried nearest first, each only on the points still without a label, so
    points next to the brain (most of them) are settled by the first few.
    """
    radius = np.floor(reach_mm / spacing + 1e-6).astype(int)
    grid = np.stack(np.meshgrid(*[np.arange(-r, r + 1) for r in radius], indexing="ij"), -1).reshape(-1, 3)
    distance = np.sqrt(((grid * spacing) ** 2).sum(1))
    order = np.argsort(distance, kind="stable")
    offsets = grid[order][(distance[order] > 0) & (distance[order] <= reach_mm + 1e-6)]
    found = np.zeros(points[0].size, dtype=np.uint8)
    pending = np.arange(points[0].size)
    upper = np.array(labels.shape) - 1
    for offset in offsets:
        if not pending.size:
            break
        index = tuple(np.clip(points[a][pending] + offset[a], 0, upper[a]) for a in range(3))
        values = labels[index]
        hit = values > 0
        found[pending[hit]] = values[hit]
        pending = pending[~hit]
    return found


def _reached_from(seeds: np.ndarray, candidates: np.ndarray) -> np.ndarray:
    """The ``candidates`` connected (6-neighbours) to a seed voxel through candidates."""
    components, _ = ndimage.label(seeds | candidates)
    reached = np.zeros(int(components.max()) + 1, dtype=bool)
    reached[np.unique(components[seeds])] = True
    reached[0] = False
    return candidates & reached[components]


def _grown_box(box: tuple[slice, ...], spacing: np.ndarray, margin_mm: float,
               shape: tuple[int, ...]) -> tuple[slice, ...]:
    """``box`` grown by ``margin_mm`` on every side, clipped to ``shape``."""
    grown = []
    for axis, (part, size) in enumerate(zip(box, shape)):
        pad = int(np.ceil(margin_mm / spacing[axis]))
        grown.append(slice(max(0, part.start - pad), min(size, part.stop + pad)))
    return tuple(grown)


def _smoothed(hu: np.ndarray, spacing: np.ndarray, sigma_mm: float) -> np.ndarray:
    """Gaussian of SD ``sigma_mm`` along the axes finer than 2 x ``sigma_mm`` (float32)."""
    sigmas = [sigma_mm / s if s < 2 * sigma_mm else 0.0 for s in spacing]
    return ndimage.gaussian_filter(np.asarray(hu, dtype=np.float32), sigmas)


def _band_threshold(smoothed: np.ndarray, brain: np.ndarray, depth_inside: np.ndarray,
                    distance_outside: np.ndarray, settings: SurfaceRefinement) -> float | None:
    """Otsu's CSF/brain threshold in the band around the surface; None when the band is too small."""
    low, high = settings.hu_range
    band = np.where(brain, depth_inside, distance_outside) <= settings.band_mm
    sample = smoothed[band & (smoothed > low) & (smoothed < high)]
    if sample.size < MIN_BAND_VOXELS or sample.min() == sample.max():
        log.warning("surface refinement skipped: %d voxels of %g..%g HU around the brain's surface",
                    sample.size, low, high)
        return None
    return otsu_threshold(sample)
