"""Template registration: the bundled CT template registered to a subject's head CT, its atlas warped.

The paper's way of labelling (Xi et al. 2025: one labelled template registered to every
scan with ANTs). :func:`register_template` registers the template (moving) to the
subject (fixed) with ANTs through ``antspyx``: a centre-of-mass start, then affine
(which absorbs a toddler's smaller head), then SyN (the shape), both with Mattes mutual
information (the template is in Cormack units, the subject in HU). :func:`warp_labels`
carries the 10-region atlas through those transforms with ANTs' ``genericLabel``
interpolator.

:class:`AtlasSegmenter` has the interface of :class:`inference.predict.Segmenter`
(``segment(image) -> Segmentation``, ``model``), so the pipeline, the SEG, the SR and
the volumes take its labels unchanged:

1. :func:`inference.preprocess.preprocess_image` with the network's default
   preprocessing gives the patient-aligned working grid (1.5 mm, cropped to the brain)
   and the intracranial mask, as for the network.
2. The subject's HU on the same box at the registration spacing (2 mm by default),
   clipped to ``hu_range`` (brain contrast kept, bone saturated), is the fixed image.
3. The warped atlas labels on the working grid, 0 outside the intracranial mask.
4. Back onto the image's grid as the network's labels are
   (:func:`inference.predict.labels_on_source_grid` of the one-hot labels: boundaries
   fall halfway between working voxels), then the cerebral lobes' edge refined on the
   source grid (:func:`inference.surface.refine_brain_surface`), and volumes counted.

Registration is at a coarse spacing: its cost then depends little on the source matrix.
It runs on one ITK thread with ``RegistrationSettings.seed`` set (:func:`register_template`): ANTs
is repeatable only so (antspyx's own deterministic mode does the same). With more threads, or with
the seed given as ``ants.registration``'s ``random_seed`` keyword (which antspyx 0.6 ignores), the
metric's sampling changes from run to run and so do the labels, at times by a whole failed
registration. Run beside the network (:class:`inference.cross_check.CrossCheckedSegmenter`) one
thread is what it gets anyway.
Both template and atlas are of adults (see ``data/NOTICE``).
"""
from __future__ import annotations

import hashlib
import logging
import os
import time
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path

import numpy as np
import SimpleITK as sitk
import torch
from tqdm import tqdm

from inference.atlas.bundle import SIZED_ATLAS_FILE, TEMPLATE_FILE, load_template, metadata, sized_region_atlas
from inference.predict import Segmentation, labels_on_source_grid, measure_volumes, parenchyma_labels, set_cpu_threads
from inference.preprocess import Preprocessed, PreprocessConfig, check_image, preprocess_image, resample_to
from inference.surface import SurfaceRefinement, refine_brain_surface
from inference.vocabulary import NUM_CLASSES, Method

log = logging.getLogger(__name__)

#: Name of the method, as results record it (``model["method"]``).
METHOD = Method.ATLAS.value
#: Margin (mm) around the brain's box in the fixed image: the skull and scalp, which the template shows too.
SKULL_MARGIN_MM = 20.0
#: ITK threads of the registration: ANTs's results are repeatable on one thread only.
ANTS_THREADS = 1


@dataclass(frozen=True)
class RegistrationSettings:
    """Parameters of the template registration.

    Attributes:
        spacing_mm: isotropic spacing (mm) of the fixed image registration runs on.
        hu_range: (low, high) HU the subject is clipped to: brain contrast kept, bone saturated.
        affine_iterations: affine iterations per level (coarse to fine).
        syn_iterations: SyN iterations per level (coarse to fine); () = affine only.
        seed: random seed of the metric's sampling (repeatable results).
    """

    spacing_mm: float = 2.0
    hu_range: tuple[float, float] = (-100.0, 200.0)
    affine_iterations: tuple[int, ...] = (1000, 500, 250, 50)
    syn_iterations: tuple[int, ...] = (40, 20, 0)
    seed: int = 20261202

    def __post_init__(self) -> None:
        if not 0.5 <= self.spacing_mm <= 6.0:
            raise ValueError(f"registration spacing must be within 0.5..6 mm, got {self.spacing_mm}")
        if len(self.hu_range) != 2 or not self.hu_range[0] < self.hu_range[1]:
            raise ValueError(f"HU range must be (low, high) with low < high, got {self.hu_range}")
        if not self.affine_iterations or any(int(n) < 0 for n in self.affine_iterations):
            raise ValueError(f"affine iterations must be non-negative counts per level, got {self.affine_iterations}")
        if any(int(n) < 0 for n in self.syn_iterations):
            raise ValueError(f"SyN iterations must be non-negative counts per level, got {self.syn_iterations}")

    @property
    def transform_type(self) -> str:
        return "SyN" if any(self.syn_iterations) else "Affine"


@dataclass
class Registration:
    """Template -> subject transforms (ANTs files, fixed = subject).

    Attributes:
        forward: transform files mapping template content onto the subject (for ``apply_transforms``).
        fixed: the fixed image (subject HU at the registration spacing), an ``ants`` image.
        timings_s: seconds ("registration").
    """

    forward: list[str]
    fixed: object
    timings_s: dict[str, float]


def _ants():
    # ANTs's ITK reads its thread count from the environment once, when it first runs. SimpleITK's
    # ITK reads the same variable once too: it reads it first, so that it keeps the count it had.
    if os.environ.get("ITK_GLOBAL_DEFAULT_NUMBER_OF_THREADS") != str(ANTS_THREADS):
        sitk.ProcessObject.GetGlobalDefaultNumberOfThreads()
        os.environ["ITK_GLOBAL_DEFAULT_NUMBER_OF_THREADS"] = str(ANTS_THREADS)
    import ants  # heavy (ITK wrappers): loaded only when registering

    return ants


def to_ants(image: sitk.Image):
    """A SimpleITK image as an ``ants`` image with the same geometry (float32)."""
    ants = _ants()
    array = sitk.GetArrayFromImage(sitk.Cast(image, sitk.sitkFloat32))
    # ants arrays are (x, y, z): the transpose of SimpleITK's (z, y, x).
    return ants.from_numpy(np.ascontiguousarray(array.transpose(2, 1, 0)), origin=list(image.GetOrigin()),
                           spacing=list(image.GetSpacing()),
                           direction=np.reshape(image.GetDirection(), (3, 3)))


def from_ants(image, pixel_type: int = sitk.sitkFloat32) -> sitk.Image:
    """An ``ants`` image as a SimpleITK image with the same geometry."""
    result = sitk.GetImageFromArray(np.ascontiguousarray(image.numpy().transpose(2, 1, 0)))
    result.SetOrigin(tuple(float(v) for v in image.origin))
    result.SetSpacing(tuple(float(v) for v in image.spacing))
    result.SetDirection(tuple(float(v) for v in np.asarray(image.direction).ravel()))
    return sitk.Cast(result, pixel_type)


def isotropic_grid(grid: sitk.Image, spacing_mm: float, margin_mm: float = 0.0) -> sitk.Image:
    """An empty grid over ``grid``'s extent (grown by ``margin_mm`` on every side), same direction, at ``spacing_mm``."""
    size = [max(2, int(round((n * s + 2 * margin_mm) / spacing_mm))) for n, s in zip(grid.GetSize(), grid.GetSpacing())]
    result = sitk.Image(size, sitk.sitkUInt8)
    result.SetSpacing([spacing_mm] * 3)
    result.SetDirection(grid.GetDirection())
    # Same outer corner: the first voxel's centre moves by half the change in spacing.
    direction = np.reshape(grid.GetDirection(), (3, 3))
    shift = direction @ ((spacing_mm - np.asarray(grid.GetSpacing())) / 2.0 - margin_mm)
    result.SetOrigin([float(v) for v in np.asarray(grid.GetOrigin()) + shift])
    return result


def register_template(fixed: sitk.Image, settings: RegistrationSettings = RegistrationSettings(),
                      template: sitk.Image | None = None) -> Registration:
    """Register the template (moving) to ``fixed`` (a subject's HU on its registration grid).

    Args:
        fixed: the subject in HU, on the grid registration runs on (any geometry).
        settings: registration parameters.
        template: the moving image; None = the bundled template (Cormack units).

    Raises:
        ValueError: a fixed image without contrast inside ``settings.hu_range``.
    """
    ants = _ants()
    low, high = settings.hu_range
    # Shifted so that air is 0, as in the template: ANTs starts from the images' centres of mass.
    clipped = sitk.Clamp(sitk.Cast(fixed, sitk.sitkFloat32), sitk.sitkFloat32, low, high) - low
    if float(np.ptp(sitk.GetArrayViewFromImage(clipped))) <= 0:
        raise ValueError(f"the image has no contrast within {low:.0f}..{high:.0f} HU: not a head CT in HU?")
    fixed_ants = to_ants(clipped)
    moving_ants = to_ants(template if template is not None else load_template())
    levels = len(settings.affine_iterations)
    started = time.perf_counter()
    # antspyx passes a seed to antsRegistration from its config only (its random_seed keyword is ignored).
    ants.config._random_seed = int(settings.seed)
    affine = ants.registration(
        fixed=fixed_ants, moving=moving_ants, type_of_transform="Affine", aff_metric="mattes",
        aff_iterations=tuple(int(n) for n in settings.affine_iterations),
        aff_shrink_factors=_shrink_factors(levels), aff_smoothing_sigmas=tuple(range(levels - 1, -1, -1)),
        verbose=False)
    timings = {"affine": time.perf_counter() - started}
    result = affine
    if any(settings.syn_iterations):
        mark = time.perf_counter()
        result = ants.registration(
            fixed=fixed_ants, moving=moving_ants, type_of_transform="SyNOnly", syn_metric="mattes",
            initial_transform=affine["fwdtransforms"][0],
            reg_iterations=tuple(int(n) for n in settings.syn_iterations),
            verbose=False)
        timings["syn"] = time.perf_counter() - mark
    timings["registration"] = time.perf_counter() - started
    log.info("template registered (%s) in %.1f s", settings.transform_type, timings["registration"])
    return Registration(forward=list(result["fwdtransforms"]), fixed=result["warpedmovout"], timings_s=timings)


def _shrink_factors(levels: int) -> tuple[int, ...]:
    """Shrink factors per level, finest 1: (8, 4, 2, 1) for four levels."""
    return tuple(2 ** (levels - 1 - level) for level in range(levels))


def warp_labels(labels: sitk.Image, registration: Registration, grid: sitk.Image) -> np.ndarray:
    """Template-space labels carried onto ``grid`` through the registration (genericLabel): uint8 (z, y, x)."""
    ants = _ants()
    reference = to_ants(_empty_like(grid))
    warped = ants.apply_transforms(fixed=reference, moving=to_ants(labels), transformlist=registration.forward,
                                   interpolator="genericLabel")
    return np.rint(warped.numpy().transpose(2, 1, 0)).astype(np.uint8)


def _empty_like(grid: sitk.Image) -> sitk.Image:
    empty = sitk.Image(grid.GetSize(), sitk.sitkFloat32)
    empty.CopyInformation(grid)
    return empty


@lru_cache(maxsize=1)
def atlas_sha256() -> str:
    """SHA-256 over the template and the sized regions: identifies the data that made the labels."""
    digest = hashlib.sha256()
    for path in (TEMPLATE_FILE, SIZED_ATLAS_FILE):
        digest.update(Path(path).read_bytes())
    return digest.hexdigest()


class AtlasSegmenter:
    """Segments head CTs by registering the bundled template and warping its atlas.

    The same interface as :class:`inference.predict.Segmenter`.

    Args:
        settings: registration parameters.
        threads: CPU threads for SimpleITK and torch (process-wide); None leaves the defaults. The
            registration itself runs on :data:`ANTS_THREADS` (repeatable results).
        progress: show a progress bar over the stages.
        refine_surface: move the cerebral lobes' edge to the image's CSF/brain contrast (as the network does).
        preprocess: the preprocessing whose working grid and intracranial mask are used.
    """

    def __init__(self, settings: RegistrationSettings = RegistrationSettings(), threads: int | None = None,
                 progress: bool = True, refine_surface: bool = True,
                 preprocess: PreprocessConfig = PreprocessConfig()):
        set_cpu_threads(threads)
        _ants()  # before any registration: ANTs's thread count is read once
        self.settings, self.progress, self.preprocess = settings, progress, preprocess
        self.surface_refinement = SurfaceRefinement() if refine_surface else None
        self.atlas = sized_region_atlas()

    @property
    def model(self) -> dict:
        """The method's description, as the SEG/SR/PDF writers record it (keys as the network's)."""
        data = metadata()
        return {
            "name": "atlas-rorden-blast",
            "method": METHOD,
            "architecture": f"ANTs {self.settings.transform_type} template registration (antspyx)",
            "spacing_mm": [self.settings.spacing_mm] * 3,
            "weights_sha256": atlas_sha256(),
            "trained_on": "none: adult CT template (Rorden 2012) with the BLAST-CT lobar atlas, its regions "
                          "sized to the paper's proportions (inference/atlas/sizing.py)",
            "template_commit": data["template"]["commit"],
            "atlas_commit": data["atlas"]["commit"],
        }

    def grid_labels(self, image: sitk.Image, grid: sitk.Image, timings: dict[str, float]) -> np.ndarray:
        """The atlas's regions on ``grid`` (uint8, z, y, x) after registering the template to ``image``.

        ``timings`` receives the seconds of each step.
        """
        # The brain's box and the skull around it: the template has its skull too.
        fixed = resample_to(image, isotropic_grid(grid, self.settings.spacing_mm, SKULL_MARGIN_MM))
        registration = register_template(fixed, self.settings)
        timings.update(registration.timings_s)
        mark = time.perf_counter()
        labels = warp_labels(self.atlas, registration, grid)
        timings["warp"] = time.perf_counter() - mark
        return labels

    @property
    def preprocessing(self) -> PreprocessConfig:
        """The preprocessing whose working grid and mask :meth:`segment` uses."""
        return self.preprocess

    def segment(self, image: sitk.Image, prepared: Preprocessed | None = None) -> Segmentation:
        """Labels on exactly ``image``'s grid (HU input), volumes in cm3.

        ``prepared``: ``preprocess_image(image, self.preprocessing)`` when already made (another
        method of the same preprocessing shares it); None preprocesses here.
        """
        check_image(image)
        timings: dict[str, float] = {}
        started = time.perf_counter()
        with tqdm(total=4, desc="atlas", unit="stage", leave=False, disable=not self.progress) as bar:
            if prepared is None:
                prepared = preprocess_image(image, self.preprocess)
            timings["preprocess"] = sum(prepared.timings_s.values())
            bar.update(1)
            grid_labels = self.grid_labels(image, prepared.grid, timings)
            grid_labels[~prepared.mask] = 0
            bar.update(2)
            mark = time.perf_counter()
            # The one-hot labels as scores, made in float32 directly (one_hot makes int64 first: 8 bytes x 11 a voxel).
            scores = torch.zeros((NUM_CLASSES,) + grid_labels.shape, dtype=torch.float32)
            scores.scatter_(0, torch.from_numpy(grid_labels.astype(np.int64))[None], 1.0)
            labels = labels_on_source_grid(scores, grid_labels, prepared.grid, image, progress=False)
            del scores
            refined = self.surface_refinement is not None and self.surface_refinement.applies_to(image.GetSpacing())
            if refined:
                labels = refine_brain_surface(labels, sitk.GetArrayViewFromImage(image), image.GetSpacing()[::-1],
                                              self.surface_refinement)
            labels, threshold = parenchyma_labels(labels, image, prepared)
            timings["to_source"] = time.perf_counter() - mark
            bar.update(1)
        label_image = sitk.GetImageFromArray(labels)
        label_image.CopyInformation(image)
        volumes = measure_volumes(label_image)
        timings["total"] = time.perf_counter() - started
        log.info("atlas-segmented %s voxels in %.1f s", image.GetSize(), timings["total"])
        return Segmentation(labels=label_image, volumes_cm3=volumes,
                            model={**self.model, "surface_refinement": refined,
                                   "parenchyma_threshold_hu": round(threshold, 1)}, timings_s=timings)
