"""The vocabulary every part of lobevol shares: the version and the 10 brain regions.

The single source of truth for the code version (setup.cfg reads it from here),
the label values, region keys and names (their order is the label values of every label map, SEG and table). Every other module
(training, the SEG and SR writers, the normative reference, CSV files) takes them
from here; ``node``, ``inference`` and ``normative`` may all import it, and it
imports nothing of ours and nothing heavy.
"""
from __future__ import annotations

from dataclasses import dataclass
from enum import Enum
from typing import Optional

#: lobevol's version, written in every checkpoint and derived DICOM object.
__version__ = "0.1.0"


class Method(str, Enum):
    """What made a segmentation's regions (``[inference] method``, ``Segmentation.model["method"]``).

    A ``str`` Enum: it compares equal to its value and prints as it.
    """

    NETWORK = "network"   # the 3D ResU-Net
    ATLAS = "atlas"       # the template registration (the paper's own labelling)

    def __str__(self) -> str:
        return self.value


class Precision(str, Enum):
    """Arithmetic of the network's forward pass during training.

    ``AUTO`` is float16 mixed precision on CUDA and bfloat16 mixed precision on a CPU with
    native bfloat16 instructions (AVX512-BF16 or AMX), else float32: each device's fastest
    precision whose gradients stay those of float32 (``benchmarks/train_step_cpu.py``
    prints both, side by side). The loss and the weights stay float32 in every case.
    """

    AUTO = "auto"
    FLOAT32 = "float32"
    BFLOAT16 = "bfloat16"

    def __str__(self) -> str:
        return self.value


@dataclass(frozen=True)
class Region:
    """One labelled region.

    Attributes:
        value: label value in label maps (1..10; 0 is background).
        key: identifier used in JSON and CSV files.
        name: human-readable name.
        structure: the anatomical structure without laterality
            ("frontal lobe", "cerebellum", ...).
        laterality: "right", "left" or None for unpaired structures.
        rgb: display colour (0-255), used by overlays, montages, the PDF
            and the SEG's recommended display colour.
    """

    value: int
    key: str
    name: str
    structure: str
    laterality: Optional[str]
    rgb: tuple[int, int, int]


REGIONS: tuple[Region, ...] = (
    Region(1, "right_frontal_lobe", "Right frontal lobe", "frontal lobe", "right", (230, 25, 75)),
    Region(2, "left_frontal_lobe", "Left frontal lobe", "frontal lobe", "left", (245, 130, 48)),
    Region(3, "right_parietal_lobe", "Right parietal lobe", "parietal lobe", "right", (60, 180, 75)),
    Region(4, "left_parietal_lobe", "Left parietal lobe", "parietal lobe", "left", (170, 255, 195)),
    Region(5, "right_occipital_lobe", "Right occipital lobe", "occipital lobe", "right", (0, 130, 200)),
    Region(6, "left_occipital_lobe", "Left occipital lobe", "occipital lobe", "left", (70, 240, 240)),
    Region(7, "right_temporal_lobe", "Right temporal lobe", "temporal lobe", "right", (145, 30, 180)),
    Region(8, "left_temporal_lobe", "Left temporal lobe", "temporal lobe", "left", (240, 50, 230)),
    Region(9, "cerebellum", "Cerebellum", "cerebellum", None, (255, 225, 25)),
    Region(10, "brainstem", "Brainstem", "brainstem", None, (128, 128, 0)),
)

REGION_KEYS: tuple[str, ...] = tuple(r.key for r in REGIONS)
NUM_CLASSES: int = len(REGIONS) + 1  # background + 10 regions

#: Paired lobes as (structure, right key, left key), for asymmetry indices.
LOBE_PAIRS: tuple[tuple[str, str, str], ...] = tuple(
    (r.structure, r.key, left.key)
    for r in REGIONS
    for left in REGIONS
    if r.laterality == "right" and left.laterality == "left" and left.structure == r.structure
)


def region_by_key(key: str) -> Region:
    """Return the region with this key, or raise KeyError naming the valid keys."""
    for region in REGIONS:
        if region.key == key:
            return region
    raise KeyError(f"unknown region key {key!r}; valid keys: {', '.join(REGION_KEYS)}")


def left_right_permutation() -> list[int]:
    """Label value -> label value after a left-right mirror: right and left lobes swap (an involution).

    Used by training's flips (labels) and prediction's flip test-time augmentation (channels).
    """
    permutation = list(range(NUM_CLASSES))
    by_side = {(r.structure, r.laterality): r.value for r in REGIONS}
    for region in REGIONS:
        if region.laterality in ("right", "left"):
            other = "left" if region.laterality == "right" else "right"
            permutation[region.value] = by_side[(region.structure, other)]
    return permutation
