"""Rebuild the bundled atlas (``inference/atlas/data``) from the two public sets it comes from.

Run once, by a maintainer, from a copy of the source sets::

    python -m inference.atlas.build --source /work/shared/data/atlas

It writes the template and its tissue maps compressed, the BLAST-CT lobar atlas
*aligned onto the template* and masked by its own intracranial mask, the licences,
and prints the figures recorded in ``metadata.json`` and ``MAPPING.md``:

1. **Alignment.** The template (Rorden et al. 2012) is on SPM's MNI152 2 mm grid, the
   BLAST-CT atlas on the ICBM 2009 1 mm grid. Both call themselves MNI, but their
   brains do not coincide exactly. An affine of the atlas's intracranial mask onto the
   template's brain (``scct_stripped.nii``), mean squares of the two smoothed
   masks, measures and removes the residual misalignment once; Dice of the two masks
   before and after is printed. The template's brain is thresholded where it holds the
   atlas mask's volume (see :func:`volume_matched_threshold`). The atlas labels are then resampled with that affine
   (nearest neighbour, on the atlas's own 1 mm grid) so that they sit on the template.
2. **Candidate label mappings.** The atlas's own volume per region under each candidate
   mapping of its 31 labels onto the 10 regions, as shares of the total, next to the
   paper's shares (Xi et al. 2025, cohort means): the evidence for ``mapping.json``.
"""
from __future__ import annotations

import argparse
import csv
import hashlib
import json
import shutil
from pathlib import Path

import numpy as np
import SimpleITK as sitk

from inference.vocabulary import REGION_KEYS

DATA = Path(__file__).resolve().parent / "data"

#: Paper's cohort mean volumes (cm3), Xi et al. 2025 (docs/paper-notes.md).
PAPER_VOLUMES_CM3 = {
    "right_frontal_lobe": 200.64, "left_frontal_lobe": 204.51, "right_parietal_lobe": 81.52,
    "left_parietal_lobe": 79.42, "right_occipital_lobe": 53.76, "left_occipital_lobe": 52.82,
    "right_temporal_lobe": 91.92, "left_temporal_lobe": 94.08, "cerebellum": 127.97, "brainstem": 15.47,
}

TEMPLATE_FILES = ("scct.nii", "scct_stripped.nii", "scgrey.nii", "scwhite.nii", "sccsf.nii")


def dice(a: np.ndarray, b: np.ndarray) -> float:
    return float(2.0 * np.logical_and(a, b).sum() / max(1, a.sum() + b.sum()))


def mask_volume_cm3(mask: sitk.Image) -> float:
    return float(sitk.GetArrayViewFromImage(mask).astype(bool).sum() * np.prod(mask.GetSpacing()) / 1000.0)


def volume_matched_threshold(stripped: sitk.Image, volume_cm3: float) -> float:
    """Intensity above which ``stripped`` (the template's brain) holds ``volume_cm3``.

    ``scct_stripped`` is a mean of 30 stripped heads: its edge fades over several
    voxels (> 0 holds 2.39 L, > 1000 holds 1.87 L). Matching the volume of the
    atlas's intracranial mask makes the affine measure misplacement and shape, not
    the two masks' different definitions of where the brain ends.
    """
    values = np.sort(sitk.GetArrayViewFromImage(stripped).ravel())[::-1]
    count = int(round(volume_cm3 * 1000.0 / np.prod(stripped.GetSpacing())))
    return float(values[min(count, values.size - 1)])


def mask_dice_on(fixed_mask: sitk.Image, moving_mask: sitk.Image, transform: sitk.Transform) -> float:
    """Dice of ``fixed_mask`` and ``moving_mask`` mapped onto its grid through ``transform``."""
    mapped = sitk.Resample(moving_mask, fixed_mask, transform, sitk.sitkLinear, 0.0, sitk.sitkFloat32)
    return dice(sitk.GetArrayFromImage(fixed_mask) > 0.5, sitk.GetArrayFromImage(mapped) > 0.5)


def align_masks(fixed_mask: sitk.Image, moving_mask: sitk.Image) -> sitk.AffineTransform:
    """Affine (fixed physical point -> moving physical point) of ``moving_mask`` onto ``fixed_mask``.

    Mean squares of the masks smoothed by 2 mm (a binary mask has no gradient
    elsewhere than on its edge), three resolutions, initialised at the identity:
    the headers already agree to a few mm, so moments would only add noise.
    """
    fixed = sitk.SmoothingRecursiveGaussian(sitk.Cast(fixed_mask, sitk.sitkFloat32), 2.0)
    moving = sitk.SmoothingRecursiveGaussian(sitk.Cast(moving_mask, sitk.sitkFloat32), 2.0)
    transform = sitk.AffineTransform(3)
    stats = sitk.LabelShapeStatisticsImageFilter()
    stats.Execute(sitk.Cast(fixed_mask > 0.5, sitk.sitkUInt8))
    transform.SetCenter(stats.GetCentroid(1))
    method = sitk.ImageRegistrationMethod()
    method.SetMetricAsMeanSquares()
    method.SetInterpolator(sitk.sitkLinear)
    method.SetOptimizerAsRegularStepGradientDescent(learningRate=1.0, minStep=1e-4, numberOfIterations=300,
                                                     relaxationFactor=0.6)
    method.SetOptimizerScalesFromPhysicalShift()
    method.SetShrinkFactorsPerLevel([4, 2, 1])
    method.SetSmoothingSigmasPerLevel([2.0, 1.0, 0.0])
    method.SmoothingSigmasAreSpecifiedInPhysicalUnitsOn()
    method.SetInitialTransform(transform, inPlace=True)
    method.Execute(fixed, moving)
    return transform


def affine_summary(transform: sitk.AffineTransform) -> dict:
    """Translation (mm), scale factors and rotation (degrees) of an affine, for the record."""
    matrix = np.reshape(transform.GetMatrix(), (3, 3))
    u, s, vt = np.linalg.svd(matrix)
    rotation = u @ vt
    angle = float(np.degrees(np.arccos(np.clip((np.trace(rotation) - 1) / 2, -1, 1))))
    return {"matrix": [round(float(v), 5) for v in matrix.ravel()],
            "translation_mm": [round(float(v), 3) for v in transform.GetTranslation()],
            "center_mm": [round(float(v), 3) for v in transform.GetCenter()],
            "singular_values": [round(float(v), 4) for v in s], "rotation_deg": round(angle, 3)}


def region_shares(atlas: np.ndarray, inside: np.ndarray, mapping: dict[int, str | None], voxel_cm3: float) -> dict:
    """Volume (cm3) and share of the 10-region total per region under ``mapping`` (label -> key or None)."""
    counts = np.bincount(atlas[inside].ravel(), minlength=32)
    volumes = {key: 0.0 for key in REGION_KEYS}
    for label, key in mapping.items():
        if key is not None:
            volumes[key] += counts[label] * voxel_cm3
    total = sum(volumes.values())
    return {key: (volumes[key], volumes[key] / total) for key in REGION_KEYS}


def candidate_mappings(base: dict[int, str | None], names: dict[int, str]) -> dict[str, dict[int, str | None]]:
    """The mappings weighed in MAPPING.md: where the insula, hippocampus and deep grey go."""
    def side(label: int) -> str:
        return "left" if names[label].startswith("Left") else "right"

    def assign(mapping, words, lobe):
        result = dict(mapping)
        for label, name in names.items():
            if any(word.lower() in name.lower() for word in words):
                result[label] = f"{side(label)}_{lobe}_lobe"
        return result

    lobes_only = {label: key for label, key in base.items()}
    medial_temporal = assign(lobes_only, ["Hippocampus"], "temporal")
    insula_temporal = assign(medial_temporal, ["Insula"], "temporal")
    insula_frontal = assign(medial_temporal, ["Insula"], "frontal")
    deep = ["BasalForebrain", "BasalGanglia", "Caudate"]
    deep_frontal = assign(insula_frontal, deep, "frontal")
    deep_thal_frontal = assign(deep_frontal, ["Thalamus"], "frontal")
    deep_thal_temporal = assign(deep_frontal, ["Thalamus"], "temporal")
    return {
        "A lobes only": lobes_only,
        "B +hippocampus->temporal": medial_temporal,
        "C B +insula->temporal": insula_temporal,
        "D B +insula->frontal": insula_frontal,
        "E D +basal ganglia, caudate, forebrain->frontal": deep_frontal,
        "F E +thalamus->frontal": deep_thal_frontal,
        "G E +thalamus->temporal": deep_thal_temporal,
    }


def lobe_of(name: str) -> str | None:
    """The 10-region key of an atlas label that is one lobe, the cerebellum or the brainstem."""
    lowered = name.lower()
    if lowered == "brainstem":
        return "brainstem"
    if "cerebellum" in lowered:
        return "cerebellum"
    for lobe in ("frontal", "parietal", "occipital", "temporal"):
        if f"{lobe}lobe" in lowered:
            return f"{'left' if lowered.startswith('left') else 'right'}_{lobe}_lobe"
    return None


def print_mapping_table(atlas: np.ndarray, inside: np.ndarray, names: dict[int, str], voxel_cm3: float) -> None:
    base = {label: lobe_of(name) for label, name in names.items()}
    paper_total = sum(PAPER_VOLUMES_CM3.values())
    groups = {"frontal": ("right_frontal_lobe", "left_frontal_lobe"),
              "parietal": ("right_parietal_lobe", "left_parietal_lobe"),
              "occipital": ("right_occipital_lobe", "left_occipital_lobe"),
              "temporal": ("right_temporal_lobe", "left_temporal_lobe"),
              "cerebellum": ("cerebellum",), "brainstem": ("brainstem",)}
    paper = {g: sum(PAPER_VOLUMES_CM3[k] for k in keys) / paper_total for g, keys in groups.items()}
    print("shares of the 10-region total (%), atlas inside its intracranial mask, vs the paper")
    print(f"{'mapping':50s} " + " ".join(f"{g[:9]:>9s}" for g in groups) + "  total cm3  sum|diff|")
    print(f"{'paper (Xi et al. 2025, cohort means)':50s} " + " ".join(f"{100 * paper[g]:9.1f}" for g in groups)
          + f"  {paper_total:9.0f}")
    for title, mapping in candidate_mappings(base, names).items():
        shares = region_shares(atlas, inside, mapping, voxel_cm3)
        grouped = {g: sum(shares[k][1] for k in keys) for g, keys in groups.items()}
        total = sum(v for v, _ in shares.values())
        off = sum(abs(grouped[g] - paper[g]) for g in groups)
        print(f"{title:50s} " + " ".join(f"{100 * grouped[g]:9.1f}" for g in groups)
              + f"  {total:9.0f}  {100 * off:8.1f}")


def sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def build(source: Path, out: Path = DATA) -> dict:
    """Write the bundled atlas into ``out`` from the source sets in ``source``; returns the alignment record."""
    rorden, blast = source / "rorden-ct-template", source / "blast-ct-atlas"
    for folder in (rorden, blast):
        if not folder.is_dir():
            raise FileNotFoundError(f"{folder} not found: give --source the folder holding "
                                    "rorden-ct-template/ and blast-ct-atlas/")
    out.mkdir(parents=True, exist_ok=True)
    for name in TEMPLATE_FILES:
        image = sitk.ReadImage(str(rorden / name))
        sitk.WriteImage(image, str(out / f"{name}.gz"), useCompression=True)
    shutil.copyfile(rorden / "LICENSE", out / "LICENSE.rorden-ct-template")
    shutil.copyfile(blast / "LICENSE.txt", out / "LICENSE.blast-ct")
    shutil.copyfile(blast / "atlas_labels.csv", out / "blast_atlas_labels.csv")

    atlas = sitk.ReadImage(str(blast / "atlas_template_space.nii.gz"))
    atlas = sitk.Cast(sitk.Round(atlas), sitk.sitkUInt8)
    atlas_mask = sitk.Cast(sitk.ReadImage(str(blast / "ct_template_mask.nii.gz")) > 0.5, sitk.sitkUInt8)
    stripped = sitk.ReadImage(str(rorden / "scct_stripped.nii"))
    threshold = volume_matched_threshold(stripped, mask_volume_cm3(atlas_mask))
    template_brain = sitk.Cast(stripped > threshold, sitk.sitkUInt8)
    print(f"template brain: scct_stripped > {threshold:.0f}, {mask_volume_cm3(template_brain):.0f} cm3 "
          f"(atlas mask {mask_volume_cm3(atlas_mask):.0f} cm3; scct_stripped > 0 is "
          f"{mask_volume_cm3(stripped > 0):.0f} cm3)")
    before = mask_dice_on(template_brain, atlas_mask, sitk.Transform())
    transform = align_masks(template_brain, atlas_mask)
    after = mask_dice_on(template_brain, atlas_mask, transform)
    print(f"atlas mask vs template brain: Dice {before:.4f} by the headers, {after:.4f} after the affine")
    # Labels moved onto the template, on the atlas's own 1 mm grid: the output grid is the same
    # grid; each output point p takes the atlas label at transform(p).
    aligned_mask = sitk.Resample(atlas_mask, atlas_mask, transform, sitk.sitkNearestNeighbor, 0, sitk.sitkUInt8)
    aligned = sitk.Resample(atlas, atlas, transform, sitk.sitkNearestNeighbor, 0, sitk.sitkUInt8)
    # The atlas's labels fill the whole field of view (the localisation atlas is dilated into the
    # skull and air): only the intracranial part is anatomy.
    aligned = sitk.Mask(aligned, aligned_mask)
    sitk.WriteImage(aligned, str(out / "blast_lobar_atlas.nii.gz"), useCompression=True)
    sitk.WriteImage(aligned_mask, str(out / "blast_intracranial_mask.nii.gz"), useCompression=True)

    names = {int(row["ROIIndex"]): row["ROIName"] for row in csv.DictReader(open(blast / "atlas_labels.csv"))}
    array = sitk.GetArrayFromImage(aligned)
    print_mapping_table(array, array > 0, names, float(np.prod(aligned.GetSpacing())) / 1000.0)
    record = {"template_brain_threshold": round(threshold, 1), "mask_dice_headers": round(before, 4),
              "mask_dice_aligned": round(after, 4),
              "affine_fixed_to_moving": affine_summary(transform)}
    print(json.dumps(record, indent=2))
    return record


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--source", type=Path, required=True,
                        help="folder with rorden-ct-template/ and blast-ct-atlas/ (as in shared/data/atlas)")
    parser.add_argument("--out", type=Path, default=DATA, help="where to write (default: the package's data/)")
    args = parser.parse_args(argv)
    build(args.source, args.out)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
