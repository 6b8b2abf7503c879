"""The bundled template and atlas (``data/``) and the mapping of the atlas's 31 labels onto 10 regions.

Files (provenance in ``data/metadata.json`` and ``data/NOTICE``):

- ``scct.nii.gz``: the Rorden mean adult head CT (with skull), 2 mm, MNI152 (SPM),
  Cormack units (not HU): the image registered to each subject.
- ``blast_lobar_atlas.nii.gz``: the BLAST-CT atlas's 31 labels, 1 mm, aligned onto
  the template by ``python -m inference.atlas.build`` and 0 outside its intracranial mask.
- ``mapping.json``: atlas label -> region key of :mod:`inference.vocabulary` (or null:
  background); the reasoning is in ``MAPPING.md`` beside this module.
- ``blast_regions_sized.nii.gz``: those 10 regions with their boundaries moved to a child's
  proportions (:mod:`inference.atlas.sizing`, record in ``sizing.json``): the atlas method's labels.
"""
from __future__ import annotations

import json
from functools import lru_cache
from pathlib import Path

import numpy as np
import SimpleITK as sitk

from inference.vocabulary import region_by_key

DATA = Path(__file__).resolve().parent / "data"
TEMPLATE_FILE = DATA / "scct.nii.gz"
ATLAS_FILE = DATA / "blast_lobar_atlas.nii.gz"
MAPPING_FILE = DATA / "mapping.json"
SIZED_ATLAS_FILE = DATA / "blast_regions_sized.nii.gz"
METADATA_FILE = DATA / "metadata.json"
#: Labels of the BLAST-CT atlas (1..31).
ATLAS_LABEL_COUNT = 31


def load_mapping(path: Path | str = MAPPING_FILE) -> np.ndarray:
    """Lookup table (32,) uint8: atlas label (0..31) -> region value (0 = background).

    Raises:
        ValueError: a label missing or repeated, a label outside 1..31, or an unknown region key.
    """
    document = json.loads(Path(path).read_text())
    labels = document.get("labels")
    if not isinstance(labels, dict):
        raise ValueError(f"{path}: no 'labels' object (atlas label -> {{name, region}})")
    table = np.zeros(ATLAS_LABEL_COUNT + 1, dtype=np.uint8)
    seen = set()
    for text, entry in labels.items():
        try:
            label = int(text)
        except ValueError:
            raise ValueError(f"{path}: atlas label {text!r} is not an integer") from None
        if not 1 <= label <= ATLAS_LABEL_COUNT:
            raise ValueError(f"{path}: atlas label {label} outside 1..{ATLAS_LABEL_COUNT}")
        if "region" not in entry:
            raise ValueError(f"{path}: atlas label {label} has no 'region' (a region key or null)")
        key = entry["region"]
        table[label] = 0 if key is None else region_by_key(key).value
        seen.add(label)
    missing = sorted(set(range(1, ATLAS_LABEL_COUNT + 1)) - seen)
    if missing:
        raise ValueError(f"{path}: atlas labels {missing} are not mapped (give each a region or null)")
    return table


@lru_cache(maxsize=1)
def load_template() -> sitk.Image:
    """The template head CT (Float32, Cormack units), 2 mm, in template (MNI) space."""
    return sitk.ReadImage(str(TEMPLATE_FILE), sitk.sitkFloat32)


@lru_cache(maxsize=2)
def _region_atlas(mapping_path: str) -> sitk.Image:
    atlas = sitk.ReadImage(str(ATLAS_FILE), sitk.sitkUInt8)
    table = load_mapping(mapping_path)
    regions = sitk.GetImageFromArray(table[sitk.GetArrayViewFromImage(atlas)])
    regions.CopyInformation(atlas)
    return regions


def region_atlas(mapping_path: Path | str = MAPPING_FILE) -> sitk.Image:
    """The atlas as 10-region labels (UInt8, 0..10), 1 mm, in template space (a copy: callers may change it)."""
    return sitk.Image(_region_atlas(str(mapping_path)))


@lru_cache(maxsize=1)
def _sized_region_atlas() -> sitk.Image:
    return sitk.ReadImage(str(SIZED_ATLAS_FILE), sitk.sitkUInt8)


def sized_region_atlas() -> sitk.Image:
    """The 10 regions sized to a child's proportions (UInt8, 0..10), 1 mm, template space (a copy).

    What the atlas method registers; made from :func:`region_atlas` by ``python -m inference.atlas.sizing``.
    """
    return sitk.Image(_sized_region_atlas())


def data_on_grid(name: str, grid: sitk.Image) -> np.ndarray:
    """The bundled map ``data/<name>.nii.gz`` resampled (linear, 0 outside) onto ``grid``: float32 (z, y, x)."""
    image = sitk.ReadImage(str(DATA / f"{name}.nii.gz"), sitk.sitkFloat32)
    return sitk.GetArrayFromImage(sitk.Resample(image, grid, sitk.Transform(), sitk.sitkLinear, 0.0, sitk.sitkFloat32))


def metadata() -> dict:
    """Provenance of the bundled data (source, commit, licence, citation, alignment figures)."""
    return json.loads(METADATA_FILE.read_text())
