"""Where every segmenter is built: the one place that turns ``[inference]`` settings into a segmenter.

:func:`load_segmenter` builds it in the calling process (``lobevol segment``,
``run``, ``evaluate``, the benchmarks); :func:`segmenter_factory` returns a
picklable callable that builds it in another process (the node's worker,
spawned: the network process never imports the engine).
"""
from __future__ import annotations

import dataclasses
import functools
from typing import TYPE_CHECKING, Callable

from inference.vocabulary import Method

if TYPE_CHECKING:
    from inference.predict import RegionSegmenter
    from node.config import InferenceSettings


def load_segmenter(settings: InferenceSettings, progress: bool = False) -> RegionSegmenter:
    """The segmenter of ``settings``.

    method "network": :class:`inference.predict.Segmenter` (model, device, tta);
    "atlas": :class:`inference.atlas.registration.AtlasSegmenter` (those three do not apply);
    cross_check: the other method runs too (:class:`inference.cross_check.CrossCheckedSegmenter`).
    ``progress`` is off for the node: a server log, not a terminal.
    """
    if settings.cross_check:
        from inference.cross_check import CrossCheckedSegmenter

        other = Method.ATLAS if settings.method == Method.NETWORK else Method.NETWORK
        alone = dataclasses.replace(settings, cross_check=False)
        return CrossCheckedSegmenter(load_segmenter(alone, progress),
                                     load_segmenter(dataclasses.replace(alone, method=other), progress),
                                     settings.cross_check_min_dice)
    if settings.method == Method.ATLAS:
        from inference.atlas.registration import AtlasSegmenter

        return AtlasSegmenter(threads=settings.threads, progress=progress, refine_surface=settings.refine_surface)
    from inference.predict import Segmenter

    return Segmenter(str(settings.model) if settings.model else None, device=settings.device,
                     threads=settings.threads, tta=settings.tta, refine_surface=settings.refine_surface,
                     progress=progress)


def segmenter_factory(settings: InferenceSettings) -> Callable[[], RegionSegmenter]:
    """A picklable callable building the segmenter of ``settings`` where it is called (the worker process)."""
    return functools.partial(load_segmenter, settings)
