"""Prediction: a head CT (SimpleITK image, HU) in, 10-region labels on its own grid and volumes out.

:class:`Segmenter` loads a checkpoint once and segments images:

1. :func:`inference.preprocess.preprocess_image` with the checkpoint's own
   preprocessing (working grid, skull stripping, crop, AHE).
2. Class probabilities on the cropped working grid (:func:`predict_probabilities`):
   one pass when the activations fit a memory budget (or the given patch size
   covers the grid), otherwise sliding windows with overlap and Gaussian
   blending; optional flip test-time augmentation: the left-right mirror only,
   with the right and left channels swapped back (the working grid is
   patient-aligned, so left-right is always the last axis). Mirrors along the
   other axes would show the network upside-down or back-to-front heads, which
   training (left-right flips, rotations up to a few degrees) never shows it.
3. Post-processing on the working grid (:func:`postprocess_labels`): outside
   the intracranial mask = 0; per region the largest connected component is
   kept; background holes that one region encloses entirely become that region.
   Holes open to the outside (a ventricle reaching a fissure) are left as they are.
4. Back to the source grid (:func:`labels_on_source_grid`): a smooth per-class
   score (0.6 x the post-processed one-hot + 0.4 x the probabilities, so that
   the post-processed label wins at every working voxel and boundaries fall
   between voxels where the probabilities put them) is interpolated trilinearly at every
   source voxel inside the crop box, slice chunk by slice chunk, and the argmax
   taken. Where all 8 surrounding working voxels agree the result is known
   without interpolation (a convex combination of scores that all favour one
   class favours it too), so only boundary voxels cost 11-channel work.
   Outside the box = 0. The label image has exactly the input's size, spacing,
   origin and direction.
5. The cerebral lobes' edge refined on the source grid by the image's own
   CSF/brain contrast (:func:`inference.surface.refine_brain_surface`;
   images with voxels up to 2 mm only; off with ``refine_surface=False``).
6. Volumes per region counted on the source grid (:func:`measure_volumes`).

No DICOM here (see :mod:`node`).
"""
from __future__ import annotations

import logging
import math
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Protocol, Sequence

import numpy as np
import SimpleITK as sitk
import torch
import torch.nn.functional as F
from scipy import ndimage
from tqdm import tqdm

from inference.checkpoint import BUNDLED_CHECKPOINT, load_checkpoint
from inference.vocabulary import NUM_CLASSES, REGIONS, left_right_permutation
from inference.models import MODEL_DIVISOR
from inference.preprocess import (
    Preprocessed,
    PreprocessConfig,
    check_image,
    index_box_covering,
    index_to_physical_matrix,
    preprocess_image,
    resample_to,
)
from inference.surface import SurfaceRefinement, refine_brain_surface
from inference.volumes import countable_labels, parenchyma_threshold_hu, region_volumes_cm3

log = logging.getLogger(__name__)

#: Memory the network's activations may take in one pass (bytes); sets the largest one-pass grid.
NETWORK_MEMORY_BUDGET = 2 * 1024 ** 3
#: Peak activation bytes per input voxel per first-level channel (measured on CPU, float32: ~35).
ACTIVATION_BYTES_PER_VOXEL_CHANNEL = 40
#: Sliding-window patch (z, y, x) used above that size when no patch size is given.
DEFAULT_PATCH_SIZE = (128, 128, 128)
#: Source slices mapped back per chunk (bounds the memory of the coordinate arrays).
SOURCE_CHUNK_VOXELS = 4_000_000
#: Weight of the post-processed one-hot in the scores mapped back (> 0.5: it wins at working voxels).
POSTPROCESSED_WEIGHT = 0.6
_MIXED = 255


@dataclass
class Segmentation:
    """The result of segmenting one image.

    Attributes:
        labels: UInt8 label image (0 background, 1..10 regions) on exactly the input image's grid.
        volumes_cm3: volume per region key in cm3, counted on ``labels``.
        model: the checkpoint's metadata as a dict, plus "name" (the checkpoint file's stem),
            "test_time_augmentation" and "surface_refinement" (whether each was applied).
        timings_s: seconds per stage ("preprocess", "inference", "postprocess", "to_source", "surface", "total", ...).
        cross_check: the other method's agreement (:class:`inference.cross_check.CrossCheck`), when one ran.
    """

    labels: sitk.Image
    volumes_cm3: dict[str, float]
    model: dict
    timings_s: dict[str, float] = field(default_factory=dict)
    cross_check: object | None = None


class RegionSegmenter(Protocol):
    """What the node asks of a segmentation method: :class:`Segmenter` (the network),
    ``inference.atlas.registration.AtlasSegmenter`` (template registration) and
    ``inference.cross_check.CrossCheckedSegmenter`` (one checked by the other)."""

    def segment(self, image: sitk.Image) -> Segmentation:
        """The 10 regions of ``image`` (HU, on its own grid) and their volumes."""
        ...


# --- volumes -----------------------------------------------------------------------------

def voxel_volume_mm3(image: sitk.Image) -> float:
    """Volume of one voxel in mm3 (|det| of direction x spacing, so sheared grids count right)."""
    matrix, _ = index_to_physical_matrix(image)
    return float(abs(np.linalg.det(matrix)))


def measure_volumes(labels: sitk.Image) -> dict[str, float]:
    """Volume of every region (cm3) in a label image: each voxel counts for the voxel volume.

    The count is :func:`inference.volumes.region_volumes_cm3`'s, with every
    slice of the grid standing for one voxel volume (|det| of direction x
    spacing, so sheared grids count right).

    Raises:
        ValueError: not a 3D integer label image, or values outside 0..10.
    """
    check_image(labels, "label image")
    values = sitk.GetArrayViewFromImage(labels)
    if not np.issubdtype(values.dtype, np.integer):
        raise ValueError(f"label image must have an integer pixel type, got {labels.GetPixelIDTypeAsString()}")
    return region_volumes_cm3(values, voxel_volume_mm3(labels), np.ones(values.shape[0]))


# --- device and network passes ------------------------------------------------------------

def resolve_device(device: str | torch.device) -> torch.device:
    """"auto" -> the first CUDA device when there is one, else the CPU; "cuda[:N]" must exist."""
    if str(device) == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        resolved = torch.device(device)
    except RuntimeError as error:
        raise ValueError(f"unknown device {device!r}; use auto, cpu or cuda[:N]") from error
    if resolved.type == "cuda" and not torch.cuda.is_available():
        raise RuntimeError(f"device {device!r} requested but CUDA is not available on this machine")
    if resolved.type not in ("cpu", "cuda"):
        raise ValueError(f"unsupported device {device!r}; use auto, cpu or cuda[:N]")
    return resolved


def gaussian_importance(patch_size: Sequence[int], sigma_fraction: float = 0.125) -> torch.Tensor:
    """Blending weights (z, y, x) of a patch: a Gaussian of sigma = size/8 and peak 1.

    Each axis's profile is floored at 1e-3 before the product, so that a voxel
    on one patch's edge always weighs less there than in a patch where it lies
    inside along that axis, even in a corner of the volume (a floor on the
    product would make the edges of all patches there weigh the same).
    """
    axes = []
    for n in patch_size:
        centre, sigma = (n - 1) / 2, max(n * sigma_fraction, 1e-6)
        profile = torch.exp(-0.5 * ((torch.arange(n, dtype=torch.float32) - centre) / sigma) ** 2)
        axes.append((profile / profile.max()).clamp_min(1e-3))
    return axes[0][:, None, None] * axes[1][None, :, None] * axes[2][None, None, :]


def window_starts(length: int, patch: int, overlap: float) -> list[int]:
    """Starts of patches along one axis: evenly spread, covering it, stepping <= patch x (1 - overlap)."""
    if patch >= length:
        return [0]
    step = max(1, int(patch * (1.0 - overlap)))
    count = math.ceil((length - patch) / step) + 1
    return sorted({int(round(i * (length - patch) / (count - 1))) for i in range(count)})


def whole_volume_limit(first_width: int) -> int:
    """Largest grid (voxels) one network pass may take within :data:`NETWORK_MEMORY_BUDGET`."""
    return NETWORK_MEMORY_BUDGET // (ACTIVATION_BYTES_PER_VOXEL_CHANNEL * max(1, int(first_width)))


def _resolve_patch(shape: Sequence[int], patch_size: Sequence[int] | None,
                   max_whole_voxels: int) -> tuple[int, int, int]:
    if patch_size is None:
        if math.prod(shape) <= max_whole_voxels:
            return tuple(int(n) for n in shape)
        patch_size = DEFAULT_PATCH_SIZE
    return tuple(min(int(p), int(n)) for p, n in zip(patch_size, shape))


def _forward_probabilities(model: torch.nn.Module, batch: torch.Tensor, device: torch.device) -> torch.Tensor:
    with torch.autocast(device.type, dtype=torch.float16, enabled=device.type == "cuda"):
        logits = model(batch.to(device))
    return torch.softmax(logits.float(), dim=1)


@torch.inference_mode()
def predict_probabilities(model: torch.nn.Module, array: np.ndarray, *, device: torch.device,
                          patch_size: Sequence[int] | None = None, overlap: float = 0.5,
                          tta: bool = False, max_whole_voxels: int = whole_volume_limit(16),
                          progress: bool = True) -> torch.Tensor:
    """Class probabilities (C, z, y, x), float32 on the CPU, for a preprocessed array.

    Args:
        model: network in eval mode on ``device``.
        array: float32 (z, y, x), each side a multiple of the model's divisor (16).
        device: where the network runs.
        patch_size: sliding-window patch (z, y, x), multiples of 16; None = one pass
            when the array has at most ``max_whole_voxels``, else
            :data:`DEFAULT_PATCH_SIZE`. Patches larger than the array shrink to it.
        overlap: fraction (0 <= overlap < 1) by which neighbouring patches overlap.
        tta: also predict the left-right mirror (last axis) and average, with
            right/left channels swapped back.
        max_whole_voxels: the largest array predicted in one pass when no patch
            size is given (see :func:`whole_volume_limit`).
        progress: show a progress bar over the windows.
    """
    if array.ndim != 3 or any(n % MODEL_DIVISOR for n in array.shape):
        raise ValueError(f"array shape {array.shape} must be 3D with sides that are multiples of {MODEL_DIVISOR}")
    if not 0.0 <= overlap < 1.0:
        raise ValueError(f"overlap must be within [0, 1), got {overlap}")
    patch = _resolve_patch(array.shape, patch_size, max_whole_voxels)
    if any(p % MODEL_DIVISOR or p <= 0 for p in patch):
        raise ValueError(f"patch size {tuple(patch)} must be positive multiples of {MODEL_DIVISOR}")
    image = torch.from_numpy(np.ascontiguousarray(array, dtype=np.float32))
    variants = [False, True] if tta else [False]
    starts = [window_starts(n, p, overlap) for n, p in zip(array.shape, patch)]
    windows = [(z, y, x) for z in starts[0] for y in starts[1] for x in starts[2]]
    whole = len(windows) == 1
    if not whole:
        importance = gaussian_importance(patch)
        total = torch.zeros((NUM_CLASSES,) + tuple(array.shape), dtype=torch.float32)
        weight = torch.zeros(tuple(array.shape), dtype=torch.float32)
    permutation = left_right_permutation()
    bar = tqdm(total=len(windows) * len(variants), desc="network", unit="pass", leave=False,
               disable=not progress or len(windows) * len(variants) == 1)
    for z, y, x in windows:
        region = (slice(z, z + patch[0]), slice(y, y + patch[1]), slice(x, x + patch[2]))
        patch_input = image[region][None, None]
        summed = torch.zeros((NUM_CLASSES,) + tuple(patch), dtype=torch.float32)
        for mirrored in variants:
            batch = patch_input.flip(-1) if mirrored else patch_input
            probabilities = _forward_probabilities(model, batch, device)[0].cpu()
            if mirrored:
                probabilities = probabilities.flip(-1)[permutation]
            summed += probabilities
            bar.update(1)
        summed /= len(variants)
        if whole:
            total = summed
        else:
            total[(slice(None),) + region] += summed * importance
            weight[region] += importance
    bar.close()
    if not whole:
        total /= weight
    return total


# --- post-processing -----------------------------------------------------------------------

def postprocess_labels(labels: np.ndarray, mask: np.ndarray | None = None) -> np.ndarray:
    """Clean a (z, y, x) label map: mask, largest component per region, enclosed holes filled.

    - voxels outside ``mask`` (when given) become 0;
    - for each region only its largest 26-connected component is kept; the
      other pieces become 0;
    - background (0) voxels in a hole that one region encloses entirely (a
      hole of that region's mask, 6-connected) become that region. A hole that
      reaches the outside of the region (a ventricle open to a fissure) is not
      a hole and stays as it is; holes are filled in label order, so a hole
      shared by nested regions goes to the region with the lower value.
    """
    cleaned = np.array(labels, dtype=np.uint8, copy=True)
    if mask is not None:
        if mask.shape != cleaned.shape:
            raise ValueError(f"mask shape {mask.shape} differs from labels {cleaned.shape}")
        cleaned[~mask] = 0
    full = ndimage.generate_binary_structure(3, 3)
    for region in REGIONS:
        box = ndimage.find_objects((cleaned == region.value).astype(np.uint8))
        if not box or box[0] is None:
            continue
        window = cleaned[box[0]]
        components, count = ndimage.label(window == region.value, structure=full)
        if count > 1:
            sizes = np.bincount(components.ravel())
            sizes[0] = 0
            window[(components > 0) & (components != int(np.argmax(sizes)))] = 0
    for region in REGIONS:
        box = ndimage.find_objects((cleaned == region.value).astype(np.uint8))
        if not box or box[0] is None:
            continue
        window = cleaned[box[0]]
        inside = window == region.value
        holes = ndimage.binary_fill_holes(inside) & ~inside & (window == 0)
        window[holes] = region.value
    return cleaned


# --- back to the source grid ----------------------------------------------------------------

def _uniform_cells(labels: np.ndarray) -> np.ndarray:
    """(z-1, y-1, x-1): the label of each cell whose 8 corner voxels agree, else 255."""
    corner = labels[:-1, :-1, :-1]
    same = np.ones(corner.shape, dtype=bool)
    for dz in (0, 1):
        for dy in (0, 1):
            for dx in (0, 1):
                if dz or dy or dx:
                    same &= labels[dz:labels.shape[0] - 1 + dz, dy:labels.shape[1] - 1 + dy,
                                   dx:labels.shape[2] - 1 + dx] == corner
    return np.where(same, corner, _MIXED).astype(np.uint8)


def labels_on_source_grid(scores: torch.Tensor, grid_labels: np.ndarray, grid: sitk.Image,
                          source: sitk.Image, progress: bool = True) -> np.ndarray:
    """Labels (k, j, i) on ``source``'s grid from per-class scores on ``grid``.

    Args:
        scores: (C, z, y, x) float scores on ``grid``, whose argmax is ``grid_labels``.
        grid_labels: uint8 (z, y, x) argmax of ``scores``.
        grid: the working grid's geometry.
        source: the image whose grid the labels are wanted on.
        progress: show a progress bar over slice chunks.

    Returns:
        uint8 array shaped like ``source`` (k, j, i); 0 outside the working grid.
    """
    output = np.zeros(tuple(reversed(source.GetSize())), dtype=np.uint8)
    box = index_box_covering(source, grid)
    if box is None:
        return output
    low, high = box
    grid_matrix, grid_offset = index_to_physical_matrix(grid)
    source_matrix, source_offset = index_to_physical_matrix(source)
    # grid continuous index (x, y, z) = to_grid @ source index (i, j, k) + shift
    to_grid = np.linalg.solve(grid_matrix, source_matrix)
    shift = np.linalg.solve(grid_matrix, source_offset - grid_offset)
    # Untilted, unrotated series: each grid coordinate depends on one source index only.
    separable = bool(np.allclose(to_grid - np.diag(np.diag(to_grid)), 0.0, atol=1e-9))
    last = np.asarray(grid.GetSize(), dtype=np.float64) - 1
    cells = _uniform_cells(grid_labels)
    volume = scores[None].float()
    axes = [np.arange(low[a], high[a] + 1, dtype=np.float64) for a in range(3)]
    chunk = max(1, SOURCE_CHUNK_VOXELS // (len(axes[0]) * len(axes[1])))
    starts = range(0, len(axes[2]), chunk)
    for start in tqdm(starts, desc="to source grid", unit="chunk", leave=False, disable=not progress or len(starts) < 2):
        i, j, k = axes[0], axes[1], axes[2][start:start + chunk]
        if separable:
            per_axis = [shift[a] + to_grid[a, a] * index for a, index in enumerate((i, j, k))]
            cell = [_cell_index(c, last[a]) for a, c in enumerate(per_axis)]
            labels = cells[np.ix_(cell[2], cell[1], cell[0])]
            inside = [(c >= -1e-4) & (c <= last[a] + 1e-4) for a, c in enumerate(per_axis)]
            labels[~inside[2]] = 0
            labels[:, ~inside[1]] = 0
            labels[:, :, ~inside[0]] = 0
            mixed = np.nonzero(labels == _MIXED)
            points = np.stack([per_axis[0][mixed[2]], per_axis[1][mixed[1]], per_axis[2][mixed[0]]], axis=1)
        else:
            coordinates = [(shift[a] + to_grid[a, 0] * i[None, None, :] + to_grid[a, 1] * j[None, :, None]
                            + to_grid[a, 2] * k[:, None, None]).astype(np.float32) for a in range(3)]
            labels = cells[_cell_index(coordinates[2], last[2]), _cell_index(coordinates[1], last[1]),
                           _cell_index(coordinates[0], last[0])]
            for a, c in enumerate(coordinates):
                labels[(c < -1e-4) | (c > last[a] + 1e-4)] = 0
            mixed = np.nonzero(labels == _MIXED)
            points = np.stack([c[mixed] for c in coordinates], axis=1)
        if mixed[0].size:
            labels[mixed] = _interpolated_argmax(volume, points, last)
        output[low[2] + start:low[2] + start + len(k), low[1]:high[1] + 1, low[0]:high[0] + 1] = labels
    return output


def _cell_index(coordinate: np.ndarray, last: float) -> np.ndarray:
    """Index of the grid cell (lower corner) holding each continuous coordinate, clipped to the grid."""
    return np.clip(np.floor(coordinate), 0, last - 1).astype(np.intp)


def _interpolated_argmax(volume: torch.Tensor, points_xyz: np.ndarray, last: np.ndarray) -> np.ndarray:
    """Argmax over classes of trilinearly interpolated scores at continuous grid points (n, 3)."""
    normalised = (2.0 * points_xyz / last - 1.0).astype(np.float32)
    sample_grid = torch.from_numpy(normalised)[None, :, None, None, :]
    sampled = F.grid_sample(volume, sample_grid, mode="bilinear", align_corners=True)[0, :, :, 0, 0]
    return np.argmax(sampled.numpy(), axis=0).astype(np.uint8)


def parenchyma_labels(labels: np.ndarray, image: sitk.Image, prepared: Preprocessed) -> tuple[np.ndarray, float]:
    """``labels`` on ``image``'s grid reduced to the voxels that count (:func:`inference.volumes.countable_labels`).

    The case's CSF/parenchyma threshold comes from the image's HU over the intracranial
    mask on the working grid, so every method that segments this image with this
    preprocessing counts by the same threshold. Returns the labels and the threshold (HU).
    """
    hu_on_grid = sitk.GetArrayViewFromImage(resample_to(image, prepared.grid))
    threshold = parenchyma_threshold_hu(hu_on_grid[prepared.mask])
    counted = countable_labels(labels, sitk.GetArrayViewFromImage(image), image.GetSpacing()[::-1], threshold)
    return counted, threshold


def set_cpu_threads(threads: int | None) -> None:
    """Use ``threads`` CPU threads in torch and SimpleITK (process-wide); None keeps their defaults."""
    if threads is None:
        return
    if int(threads) < 1:
        raise ValueError(f"threads must be >= 1, got {threads}")
    torch.set_num_threads(int(threads))
    sitk.ProcessObject.SetGlobalDefaultNumberOfThreads(int(threads))


# --- the segmenter ---------------------------------------------------------------------------

class Segmenter:
    """A loaded model that segments head CT images.

    Args:
        checkpoint: checkpoint file; None = :data:`inference.checkpoint.BUNDLED_CHECKPOINT`.
        device: "auto" (CUDA when present, with fp16 autocast; else CPU), "cpu" or "cuda[:N]".
        threads: CPU threads for torch and SimpleITK (process-wide settings); None leaves their defaults.
        tta: average with the left-right mirrored prediction (default; about twice the network time).
        overlap: overlap of sliding windows (0 <= overlap < 1).
        patch_size: sliding-window patch (z, y, x) in working voxels, multiples of 16;
            None = one pass when the activations fit :data:`NETWORK_MEMORY_BUDGET`
            (about 3.3 M voxels for 16 first-level channels), else 128^3 windows.
        progress: show progress bars.
        refine_surface: move the cerebral lobes' edge to the image's CSF/brain
            contrast on the source grid (default; see :mod:`inference.surface`).

    Raises:
        FileNotFoundError: no checkpoint file.
        ValueError: a checkpoint that does not match this code, or bad arguments.
        RuntimeError: CUDA requested but absent.
    """

    def __init__(self, checkpoint: str | Path | None = None, device: str = "auto", threads: int | None = None,
                 tta: bool = True, overlap: float = 0.5, patch_size: tuple[int, int, int] | None = None,
                 progress: bool = True, refine_surface: bool = True):
        set_cpu_threads(threads)
        if not 0.0 <= overlap < 1.0:
            raise ValueError(f"overlap must be within [0, 1), got {overlap}")
        if patch_size is not None and (len(patch_size) != 3 or any(
                int(p) <= 0 or int(p) % MODEL_DIVISOR for p in patch_size)):
            raise ValueError(f"patch size {patch_size} must be three positive multiples of {MODEL_DIVISOR} (z, y, x)")
        self.checkpoint = Path(checkpoint) if checkpoint is not None else BUNDLED_CHECKPOINT
        self.device = resolve_device(device)
        self.network, self.meta = load_checkpoint(self.checkpoint, device=self.device)
        self.config = PreprocessConfig.from_dict(self.meta.preprocessing)
        self.tta, self.overlap, self.progress = tta, overlap, progress
        self.surface_refinement = SurfaceRefinement() if refine_surface else None
        self.patch_size = tuple(int(p) for p in patch_size) if patch_size is not None else None

    @property
    def model(self) -> dict:
        """The checkpoint's metadata and its name, as the SEG/SR/PDF writers record it."""
        return {**self.meta.to_dict(), "name": self.checkpoint.stem}

    def _refines(self, image: sitk.Image) -> bool:
        return self.surface_refinement is not None and self.surface_refinement.applies_to(image.GetSpacing())

    @property
    def preprocessing(self) -> PreprocessConfig:
        """The checkpoint's preprocessing, which :meth:`segment` applies."""
        return self.config

    @torch.inference_mode()
    def segment(self, image: sitk.Image, prepared: Preprocessed | None = None) -> Segmentation:
        """Segment a head CT in HU; labels on exactly ``image``'s grid, volumes in cm3.

        ``prepared``: ``preprocess_image(image, self.preprocessing)`` when already made (another
        method of the same preprocessing shares it); None preprocesses here.
        """
        check_image(image)
        timings: dict[str, float] = {}
        started = time.perf_counter()
        if prepared is None:
            prepared = preprocess_image(image, self.config)
        timings["preprocess"] = sum(prepared.timings_s.values())
        timings.update({f"preprocess_{k}": v for k, v in prepared.timings_s.items()})

        mark = time.perf_counter()
        probabilities = predict_probabilities(
            self.network, prepared.array, device=self.device, patch_size=self.patch_size,
            overlap=self.overlap, tta=self.tta, max_whole_voxels=whole_volume_limit(self.meta.channels[0]),
            progress=self.progress)
        timings["inference"] = time.perf_counter() - mark

        mark = time.perf_counter()
        mask = torch.from_numpy(prepared.mask)
        probabilities[:, ~mask] = 0.0
        probabilities[0, ~mask] = 1.0
        grid_labels = postprocess_labels(probabilities.argmax(0).numpy().astype(np.uint8), prepared.mask)
        # Scores whose argmax is the post-processed label at every working voxel.
        scores = probabilities.mul_(1.0 - POSTPROCESSED_WEIGHT)
        scores.scatter_add_(0, torch.from_numpy(grid_labels.astype(np.int64))[None],
                            torch.full((1,) + grid_labels.shape, POSTPROCESSED_WEIGHT))
        timings["postprocess"] = time.perf_counter() - mark

        mark = time.perf_counter()
        labels = labels_on_source_grid(scores, grid_labels, prepared.grid, image, progress=self.progress)
        del probabilities, scores  # the 11 channels on the working grid: not needed any more
        timings["to_source"] = time.perf_counter() - mark
        refined = self._refines(image)
        if refined:
            mark = time.perf_counter()
            labels = refine_brain_surface(labels, sitk.GetArrayViewFromImage(image), image.GetSpacing()[::-1],
                                          self.surface_refinement)
            timings["surface"] = time.perf_counter() - mark
        labels, threshold = parenchyma_labels(labels, image, prepared)
        label_image = sitk.GetImageFromArray(labels)
        label_image.CopyInformation(image)
        mark = time.perf_counter()
        volumes = measure_volumes(label_image)
        timings["volumes"] = time.perf_counter() - mark
        timings["total"] = time.perf_counter() - started
        log.info("segmented %s voxels on %s in %.1f s", image.GetSize(), self.device, timings["total"])
        model = {**self.model, "test_time_augmentation": self.tta, "surface_refinement": refined,
                 "parenchyma_threshold_hu": round(threshold, 1)}
        return Segmentation(labels=label_image, volumes_cm3=volumes, model=model, timings_s=timings)
