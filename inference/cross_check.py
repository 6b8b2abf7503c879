"""Cross-check: a second segmentation method run on the same image, and how far the two agree.

The bundled network learnt synthetic phantoms; on a real head it can place regions a
radiologist would reject. The atlas registration (:mod:`inference.atlas.registration`)
is independent of that training, so its agreement with the network, region by region,
is a plausibility check on every study: :class:`CrossCheckedSegmenter` runs both and
returns the primary method's :class:`~inference.predict.Segmentation` with a
:class:`CrossCheck` attached (``Segmentation.cross_check``). Results then carry the
per-region Dice and volume difference. The pipeline judges the check in the unit a
radiologist reads (:meth:`CrossCheck.judged`, from ``normative.compare``: each region's
volume difference in reference SDs): the methods agree when every region's Dice is at
least ``min_dice`` and its volumes lie within one SD; otherwise the plain statement
:data:`DISAGREE_MESSAGE` names the regions and by how much.
"""
from __future__ import annotations

import dataclasses
import logging
import time
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Mapping

import numpy as np
import SimpleITK as sitk
import torch
from scipy import ndimage

from inference.metrics import dice_per_region, percent_difference
from inference.preprocess import check_image, preprocess_image
from inference.vocabulary import REGIONS, Method

log = logging.getLogger(__name__)

DISAGREE_MESSAGE = "methods disagree: review the regions"
#: Default Dice below which a region's two segmentations disagree. Set from phantoms: the atlas's
#: worst region against the truth was 0.24 (brainstem) on full-size phantoms 910001-2, where the
#: network is close to the truth; 0.2 leaves a margin below that. (The GE head's network
#: cerebellum, 11 cm3, reaches 0.14 against the atlas: it was seen before this was set.)
DEFAULT_MIN_DICE = 0.2


@dataclass(frozen=True)
class RegionAgreement:
    """Agreement of the two methods on one region (volumes in cm3 on the same grid).

    ``difference_sd`` (volume difference in reference SDs) and ``too_far`` (beyond the
    normative comparison's limit) are set by :meth:`CrossCheck.judged`, once a reference is known.
    """

    key: str
    dice: float
    volume_cm3: float
    other_volume_cm3: float
    difference_sd: float | None = None
    too_far: bool = False

    @property
    def label(self) -> str:
        return self.key.replace("_", " ")

    @property
    def volume_difference_percent(self) -> float | None:
        """(this - other) / other x 100; None when the other method found nothing."""
        return None if self.other_volume_cm3 <= 0 else percent_difference(self.volume_cm3, self.other_volume_cm3)


@dataclass(frozen=True)
class CrossCheck:
    """The agreement between the method that made the results and the other one."""

    method: str
    other_method: str
    regions: tuple[RegionAgreement, ...]
    min_dice: float
    seconds: float = 0.0

    @property
    def mean_dice(self) -> float:
        return float(np.mean([r.dice for r in self.regions]))

    @property
    def lowest(self) -> RegionAgreement:
        return min(self.regions, key=lambda r: r.dice)

    @property
    def judged_in_sd(self) -> bool:
        """Whether the volume differences were judged in reference SDs (:meth:`judged`)."""
        return any(r.difference_sd is not None for r in self.regions)

    @property
    def disagreeing(self) -> tuple[RegionAgreement, ...]:
        """Regions with a Dice below ``min_dice`` or volumes too far apart in reference SDs."""
        return tuple(r for r in self.regions if r.dice < self.min_dice or r.too_far)

    @property
    def agrees(self) -> bool:
        """Every region's Dice at least ``min_dice`` and, once judged, its volumes within the SD limit."""
        return not self.disagreeing

    @property
    def verdict(self) -> str:
        """"methods agree" or :data:`DISAGREE_MESSAGE`."""
        return "methods agree" if self.agrees else DISAGREE_MESSAGE

    @property
    def message(self) -> str:
        """One plain sentence for reports and logs: the verdict, and which regions differ by how much."""
        figures = (f"{self.method} vs {self.other_method}: mean Dice {self.mean_dice:.2f}, "
                   f"lowest {self.lowest.label} {self.lowest.dice:.2f}")
        if self.agrees:
            limit = f"every region's Dice at least {self.min_dice:.2f}"
            if self.judged_in_sd:
                worst = max((r for r in self.regions if r.difference_sd is not None), key=lambda r: abs(r.difference_sd))
                limit += f" and its volumes within one reference SD (largest {worst.label} {worst.difference_sd:+.1f} SD)"
            return f"methods agree ({figures}; {limit})"
        return f"{DISAGREE_MESSAGE}: {'; '.join(self._why(r) for r in self.disagreeing)} ({figures})"

    def _why(self, region: RegionAgreement) -> str:
        reasons = []
        if region.too_far:
            percent = region.volume_difference_percent
            reasons.append(f"volumes {abs(region.difference_sd):.1f} SD apart"
                           + ("" if percent is None else f" ({percent:+.0f} %)"))
        if region.dice < self.min_dice:
            reasons.append(f"Dice {region.dice:.2f} below {self.min_dice:.2f}")
        return f"{region.label} {' and '.join(reasons)}"

    def judged(self, differences_sd: Mapping[str, float | None], too_far: Mapping[str, bool]) -> "CrossCheck":
        """This check with each region's volume difference in reference SDs and whether it is beyond the limit
        (both from the normative comparison: ``normative.compare.compare(..., other_method_volumes=...)``)."""
        regions = tuple(dataclasses.replace(r, difference_sd=differences_sd.get(r.key), too_far=bool(too_far.get(r.key)))
                        for r in self.regions)
        return dataclasses.replace(self, regions=regions)

    def to_dict(self) -> dict:
        return {
            "method": self.method, "other_method": self.other_method, "agrees": self.agrees,
            "mean_dice": round(self.mean_dice, 4), "min_dice": self.min_dice, "message": self.message,
            "seconds": round(self.seconds, 1),
            "regions": {r.key: {"dice": round(r.dice, 4), "volume_cm3": round(r.volume_cm3, 3),
                                "other_volume_cm3": round(r.other_volume_cm3, 3),
                                "volume_difference_percent": None if r.volume_difference_percent is None
                                else round(r.volume_difference_percent, 2),
                                "volume_difference_sd": None if r.difference_sd is None else round(r.difference_sd, 2),
                                "agrees": r not in self.disagreeing}
                        for r in self.regions},
        }


def compare_segmentations(labels: sitk.Image, other_labels: sitk.Image, volumes_cm3: Mapping[str, float],
                          other_volumes_cm3: Mapping[str, float], *, method: str, other_method: str,
                          min_dice: float = DEFAULT_MIN_DICE, seconds: float = 0.0) -> CrossCheck:
    """Per-region Dice and volumes of two label maps on one grid."""
    if not 0.0 <= min_dice <= 1.0:
        raise ValueError(f"agreement threshold must be a Dice within 0..1, got {min_dice}")
    dice = dice_per_region(labels, other_labels)
    regions = tuple(RegionAgreement(r.key, dice[r.key], float(volumes_cm3[r.key]), float(other_volumes_cm3[r.key]))
                    for r in REGIONS)
    return CrossCheck(method, other_method, regions, float(min_dice), seconds)


class CrossCheckedSegmenter:
    """Segments with ``primary`` and cross-checks with ``other``: the Segmenter interface.

    The two methods run at the same time, ``other`` in a thread of its own, each on one
    CPU thread of torch and SimpleITK while both run (torch, SciPy and SimpleITK release
    the GIL; antspyx's registration holds it, so the network's work falls before and after
    the registration, beside the atlas's other stages). Two methods of
    the same ``preprocessing`` (the network's and the atlas's by default) share it: it is
    made once, before both, and its time is in each one's timings. The result is
    ``primary``'s segmentation, with ``cross_check`` set; the other method's time is in
    ``timings_s["cross_check"]``. When the other method fails on the image (ValueError,
    RuntimeError: e.g. a registration that finds no head), the primary result stands and
    ``model["cross_check_error"]`` says why: a check must not lose a study.
    """

    def __init__(self, primary, other, min_dice: float = DEFAULT_MIN_DICE):
        if not 0.0 <= min_dice <= 1.0:
            raise ValueError(f"agreement threshold must be a Dice within 0..1, got {min_dice}")
        self.primary, self.other, self.min_dice = primary, other, min_dice

    @property
    def model(self) -> dict:
        return self.primary.model

    def segment(self, image: sitk.Image):
        # Methods of one preprocessing (the network's and the atlas's by default) share it: made once.
        shared = {}
        preprocessing = getattr(self.primary, "preprocessing", None)
        if preprocessing is not None and preprocessing == getattr(self.other, "preprocessing", None):
            check_image(image)
            shared["prepared"] = preprocess_image(image, preprocessing)
        with ThreadPoolExecutor(max_workers=1, thread_name_prefix="cross-check") as pool:
            with _one_thread_each():
                other = pool.submit(_timed_segment, self.other, image, **shared)
                result = self.primary.segment(image, **shared)
            # The other method goes on, with every thread, after the primary one is done.
            second, seconds, error = other.result()
        if error is not None:
            log.warning("cross-check by %s failed: %s", _method(self.other.model), error)
            return dataclasses.replace(result, model={**result.model, "cross_check_error": str(error)})
        labels, other_labels = _common_box(result.labels, second.labels)
        check = compare_segmentations(labels, other_labels, result.volumes_cm3, second.volumes_cm3,
                                      method=_method(result.model), other_method=_method(second.model),
                                      min_dice=self.min_dice, seconds=seconds)
        return dataclasses.replace(result, cross_check=check, timings_s={**result.timings_s, "cross_check": seconds})


def _timed_segment(segmenter, image: sitk.Image, **shared):
    """(segmentation, seconds, None), or (None, seconds, error) for an image the method cannot segment."""
    started = time.perf_counter()
    try:
        return segmenter.segment(image, **shared), time.perf_counter() - started, None
    except (ValueError, RuntimeError) as error:
        return None, time.perf_counter() - started, error


@contextmanager
def _one_thread_each():
    """torch (this thread's) and SimpleITK (new filters) on one CPU thread within; their counts restored after."""
    torch_threads, sitk_threads = torch.get_num_threads(), sitk.ProcessObject.GetGlobalDefaultNumberOfThreads()
    torch.set_num_threads(1)
    sitk.ProcessObject.SetGlobalDefaultNumberOfThreads(1)
    try:
        yield
    finally:
        torch.set_num_threads(torch_threads)
        sitk.ProcessObject.SetGlobalDefaultNumberOfThreads(sitk_threads)


def _common_box(labels: sitk.Image, other_labels: sitk.Image) -> tuple[sitk.Image, sitk.Image]:
    """Both label maps cut to the box holding every labelled voxel of either: the same Dice and volumes,
    without comparing the empty rest of the grid."""
    either = (sitk.GetArrayViewFromImage(labels) > 0) | (sitk.GetArrayViewFromImage(other_labels) > 0)
    found = ndimage.find_objects(either.astype(np.uint8))
    if not found or found[0] is None:
        return labels, other_labels
    low = [found[0][axis].start for axis in (2, 1, 0)]
    size = [found[0][axis].stop - found[0][axis].start for axis in (2, 1, 0)]
    return sitk.RegionOfInterest(labels, size, low), sitk.RegionOfInterest(other_labels, size, low)


def _method(model: Mapping) -> str:
    return str(model.get("method") or Method.NETWORK)
