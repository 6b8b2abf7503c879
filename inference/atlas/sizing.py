"""The atlas's regions sized to a child's proportions in template space: the atlas method's labels.

The BLAST-CT atlas is an adult's. Mapped onto the 10 regions (``MAPPING.md``), its
proportions are not the paper's children's: on the template's tissue its parietal lobes
and brainstem are larger, its cerebellum smaller. Registration carries a template's
labels onto a child only as far as it recovers the child's shape; where a boundary is
invisible on CT (between lobes) or the deformation is large (a toddler's brainstem is
less than half an adult's share), the labels keep the adult's proportions. On phantoms
drawn at the cohort's proportions, whose truth is known, that is a method error of one to
several reference SDs, in the same direction on every case (figures: ``MAPPING.md``, "Sizing").

The remedy is the one a labelling method has: its atlas. :func:`size_regions` moves
the boundaries between neighbouring regions in template space, each region's edge by
one offset (mm) along its distance map, until every region holds a given share of the
template's brain tissue; the tissue itself does not move. A voxel changes only between
regions of its own side or the midline (a lobe never crosses to the other hemisphere).
The shares are the paper's cohort means, corrected once by what the method then measured on
calibration phantoms (``main``'s ``--calibration``), so that registration's own tendencies are
compensated as measured rather than assumed. ``python -m inference.atlas.sizing`` writes
the sized atlas (``data/blast_regions_sized.nii.gz``) and its record (``data/sizing.json``).
"""
from __future__ import annotations

import argparse
import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import SimpleITK as sitk
from scipy import ndimage

from inference.atlas.bundle import DATA, SIZED_ATLAS_FILE, data_on_grid
from inference.vocabulary import REGION_KEYS, REGIONS

SIZING_FILE = DATA / "sizing.json"
#: Largest change of one region's offset per iteration (mm): thin regions (the brainstem)
#: change volume fast with their edge.
MAX_STEP_MM = 0.5
#: Smallest step (mm): a step halved at every overshoot still moves.
MIN_STEP_MM = 0.01
#: Jitter (mm) added to the distance maps to break ties between voxels.
TIE_JITTER_MM = 0.1
#: Offset change (mm) per unit of log share error: about a region's volume-to-surface ratio.
GAIN_MM = 6.0


@dataclass(frozen=True)
class SizedRegions:
    """The result of :func:`size_regions`.

    Attributes:
        labels: region value per voxel (0..10), the input's grid.
        offsets_mm: how far each region's edge moved outwards (mm, negative: inwards), region order.
        shares_before, shares_after: each region's share of the tissue, region order.
        iterations: fitting iterations run.
    """

    labels: np.ndarray
    offsets_mm: np.ndarray
    shares_before: np.ndarray
    shares_after: np.ndarray
    iterations: int


def tissue_shares(labels: np.ndarray, tissue: np.ndarray) -> np.ndarray:
    """Each region's share (10,) of the tissue over all 10 regions (``tissue``: fraction per voxel)."""
    totals = ndimage.sum_labels(tissue, labels, index=[r.value for r in REGIONS])
    return np.asarray(totals, dtype=float) / float(np.sum(totals))


def _allowed(labels: np.ndarray) -> np.ndarray:
    """(10, ...) bool: the regions each voxel may take (its own side's and the midline's)."""
    sides = {"right": {r.value for r in REGIONS if r.laterality == "right"},
             "left": {r.value for r in REGIONS if r.laterality == "left"}}
    allowed = np.ones((len(REGIONS),) + labels.shape, dtype=bool)
    for index, region in enumerate(REGIONS):
        if region.laterality is not None:
            other = sides["left" if region.laterality == "right" else "right"]
            allowed[index] = ~np.isin(labels, list(other))
    return allowed


def _signed_distances(labels: np.ndarray, spacing_mm: tuple[float, float, float]) -> np.ndarray:
    """(10, ...) float32: distance (mm) from each region's edge, negative inside it."""
    distances = np.empty((len(REGIONS),) + labels.shape, dtype=np.float32)
    for index, region in enumerate(REGIONS):
        inside = labels == region.value
        distances[index] = (ndimage.distance_transform_edt(~inside, sampling=spacing_mm)
                            - ndimage.distance_transform_edt(inside, sampling=spacing_mm))
    return distances


def size_regions(labels: np.ndarray, tissue: np.ndarray, target_shares: np.ndarray,
                 spacing_mm: tuple[float, float, float], tolerance: float = 0.01,
                 max_iterations: int = 200) -> SizedRegions:
    """Move the regions' boundaries until each holds ``target_shares`` of the tissue.

    Args:
        labels: region values (0..10; 0 = outside the regions, never changed), (z, y, x).
        tissue: brain tissue fraction per voxel (0..1), same shape.
        target_shares: (10,) positive, region order; normalised to sum 1.
        spacing_mm: voxel size (z, y, x) in mm.
        tolerance: largest relative share error accepted (0.01 = 1 % of each share).

    Raises:
        ValueError: shapes differ, a target is not positive, a region is missing, or the fit
            did not reach ``tolerance``.
    """
    if labels.shape != tissue.shape:
        raise ValueError(f"labels {labels.shape} and tissue {tissue.shape} differ in shape")
    targets = np.asarray(target_shares, dtype=float)
    if targets.shape != (len(REGIONS),) or not np.all(targets > 0):
        raise ValueError(f"need {len(REGIONS)} positive target shares, got {target_shares}")
    targets = targets / targets.sum()
    inside = labels > 0
    box = ndimage.find_objects(inside.astype(np.uint8))[0]
    cropped, weights = labels[box], np.where(inside, tissue, 0.0)[box].astype(np.float64)
    if (missing := [r.key for r in REGIONS if not np.any(cropped == r.value)]):
        raise ValueError(f"regions missing from the atlas: {missing}")
    distances = _signed_distances(cropped, spacing_mm)
    # On a voxel grid many voxels are equally far from two edges, and a tie flips a whole sheet of
    # them at once; a fixed jitter far below a voxel breaks the ties, so shares change smoothly.
    distances += np.random.default_rng(0).uniform(-TIE_JITTER_MM, TIE_JITTER_MM, distances.shape).astype(np.float32)
    distances[~_allowed(cropped)] = np.inf
    before = tissue_shares(cropped, weights)
    offsets, steps = np.zeros(len(REGIONS)), np.full(len(REGIONS), MAX_STEP_MM)
    sized, shares, last_error = cropped, before, np.zeros(len(REGIONS))
    for iteration in range(1, max_iterations + 1):
        error = np.log(targets / shares)
        if np.max(np.abs(error)) <= tolerance:
            break
        # A region whose error changed sign overshot: its steps halve, otherwise they grow back
        # (neighbours share boundaries, so one region's move changes the others' errors).
        steps = np.clip(np.where(error * last_error < 0, steps / 2.0, steps * 1.5), MIN_STEP_MM, MAX_STEP_MM)
        offsets += np.clip(GAIN_MM * error, -steps, steps)
        last_error = error
        sized = np.where(inside[box], np.argmin(distances - offsets[:, None, None, None].astype(np.float32),
                                                 axis=0).astype(np.uint8) + 1, 0).astype(np.uint8)
        shares = tissue_shares(sized, weights)
    else:
        raise ValueError(f"sizing did not converge in {max_iterations} iterations: "
                         f"largest share error {100 * np.max(np.abs(targets / shares - 1)):.1f} %")
    result = labels.copy()
    result[box] = sized
    return SizedRegions(result, offsets, before, shares, iteration)


def template_tissue(grid: sitk.Image) -> np.ndarray:
    """The template's brain tissue fraction (grey + white probability, 0..1) on ``grid``, (z, y, x)."""
    return np.clip(data_on_grid("scgrey", grid) + data_on_grid("scwhite", grid), 0.0, 1.0)


def calibration_ratios(csv_path: Path) -> dict[str, float]:
    """Mean ratio per region of the method's volume to the true territory's (``lobevol evaluate --csv``)."""
    import csv

    from inference.evaluation import has_counted_truth

    rows = list(csv.DictReader(open(csv_path, newline="")))
    if not has_counted_truth(rows):
        raise ValueError(f"{csv_path}: no cases with the true territories counted (lobevol evaluate --csv)")
    return {key: float(np.mean([float(r[f"predicted_cm3_{key}"]) / float(r[f"true_counted_cm3_{key}"])
                                for r in rows])) for key in REGION_KEYS}


def main(argv: list[str] | None = None) -> int:
    from inference.atlas.bundle import region_atlas
    from inference.atlas.build import PAPER_VOLUMES_CM3

    parser = argparse.ArgumentParser(
        description="Size the bundled atlas's regions (data/blast_regions_sized.nii.gz, data/sizing.json).",
        epilog="examples:\n"
               "  python -m inference.atlas.sizing\n"
               "      regions sized to the paper's cohort shares of the template's tissue\n"
               "  lobevol evaluate atlas calibration/ --threads 2 --csv cal.csv\n"
               "  python -m inference.atlas.sizing --calibration cal.csv --note 'phantoms 700000-700005'\n"
               "      targets divided by what the atlas method measured against the truth\n"
               "      (volume / true territory, mean over the cases), then sized again",
        formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--calibration", type=Path, help="lobevol evaluate --csv of the atlas method on phantoms")
    parser.add_argument("--note", default="", help="what the calibration cases are")
    args = parser.parse_args(argv)
    if args.calibration is not None and not args.calibration.is_file():
        parser.error(f"--calibration {args.calibration}: no such file (lobevol evaluate atlas ... --csv FILE)")
    if args.calibration is not None and not SIZING_FILE.is_file():
        parser.error(f"--calibration corrects the targets of {SIZING_FILE.name}: run without it first")
    atlas = region_atlas()
    labels = sitk.GetArrayFromImage(atlas)
    paper = np.array([PAPER_VOLUMES_CM3[key] for key in REGION_KEYS])
    targets, record = paper / paper.sum(), {"paper_shares": dict(zip(REGION_KEYS, np.round(paper / paper.sum(), 5)))}
    if args.calibration is not None:
        previous = json.loads(SIZING_FILE.read_text())
        try:
            ratios = calibration_ratios(args.calibration)
        except (ValueError, KeyError) as error:
            parser.error(f"--calibration {args.calibration}: {error}")
        targets = np.array([previous["target_shares"][key] / ratios[key] for key in REGION_KEYS])
        targets /= targets.sum()
        record["calibration"] = {"cases": args.note, "csv": args.calibration.name,
                                 "measured_over_true": {k: round(v, 4) for k, v in ratios.items()},
                                 "previous_target_shares": previous["target_shares"]}
    sized = size_regions(labels, template_tissue(atlas), targets, atlas.GetSpacing()[::-1])
    image = sitk.GetImageFromArray(sized.labels)
    image.CopyInformation(atlas)
    sitk.WriteImage(image, str(SIZED_ATLAS_FILE), useCompression=True)
    record.update({
        "target_shares": dict(zip(REGION_KEYS, np.round(targets, 5))),
        "tissue_shares_before": dict(zip(REGION_KEYS, np.round(sized.shares_before, 5))),
        "tissue_shares_after": dict(zip(REGION_KEYS, np.round(sized.shares_after, 5))),
        "offsets_mm": dict(zip(REGION_KEYS, np.round(sized.offsets_mm, 3))),
        "iterations": sized.iterations,
        "changed_voxels": int(np.sum(sized.labels != labels)),
        "script": "python -m inference.atlas.sizing",
    })
    SIZING_FILE.write_text(json.dumps(record, indent=2, default=float) + "\n")
    print(f"{'region':<22}{'before %':>10}{'target %':>10}{'after %':>10}{'edge mm':>10}")
    for i, key in enumerate(REGION_KEYS):
        print(f"{key:<22}{100 * sized.shares_before[i]:>10.2f}{100 * targets[i]:>10.2f}"
              f"{100 * sized.shares_after[i]:>10.2f}{sized.offsets_mm[i]:>+10.2f}")
    print(f"wrote {SIZED_ATLAS_FILE} and {SIZING_FILE}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
