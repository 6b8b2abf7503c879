"""Evaluation against ground truth: Dice and volume error per region, tables and CSV.

A :class:`CaseEvaluation` compares a predicted label map with the true one on
the same grid (the source grid, as a radiologist's volumes are measured).

A method's volumes are counted by the node's definition on the acquired image
(:func:`inference.volumes.countable_labels`), where the scanner's blur has darkened the
cortex beside CSF; a phantom's truth is its tissue before that blur. When the truth's
territories are also counted on the acquired image (``counted_truth``), the two volume
errors separate what the method placed wrongly (territory error) from what the
definition cannot see on a blurred image (partial volume), which both methods share.
:func:`summary_rows` groups cases by slice thickness, which is what decides
how hard a scan is (partial volume).
"""
from __future__ import annotations

import csv
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

import numpy as np

from inference.vocabulary import REGION_KEYS
from inference.metrics import dice_per_region, percent_difference
from inference.volumes import region_volumes_cm3

#: Slice-thickness groups of the summary (mm, upper bound inclusive), as the targets are set.
THICKNESS_GROUPS = ((0.0, 1.25), (1.25, 5.0))
#: The largest error of the total of the 10 volumes the bundled model is held to (%).
TOTAL_ERROR_TARGET_PERCENT = 3.0


@dataclass(frozen=True)
class CaseEvaluation:
    """Dice and volumes of one case.

    Attributes:
        name: case name.
        slice_thickness_mm: the source series' slice thickness (mm).
        dice: Dice per region key.
        true_cm3: true volume per region key (cm3).
        predicted_cm3: predicted volume per region key (cm3).
        counted_true_cm3: the true territories counted by the definition on the acquired
            image, with the method's threshold, per region key (cm3); None when not measured.
    """

    name: str
    slice_thickness_mm: float
    dice: dict[str, float]
    true_cm3: dict[str, float]
    predicted_cm3: dict[str, float]
    counted_true_cm3: dict[str, float] | None = None

    @property
    def total_error_percent(self) -> float:
        """Error of the total of the 10 volumes, in percent of the true total."""
        return percent_difference(sum(self.predicted_cm3.values()), sum(self.true_cm3.values()))

    def volume_error_percent(self, key: str) -> float:
        return percent_difference(self.predicted_cm3[key], self.true_cm3[key])

    def territory_error_percent(self, key: str) -> float:
        """Error against the true territory counted on the acquired image (needs ``counted_true_cm3``)."""
        if self.counted_true_cm3 is None:
            raise ValueError(f"case {self.name}: the truth was not counted on the acquired image")
        return percent_difference(self.predicted_cm3[key], self.counted_true_cm3[key])


def evaluate_labels(name: str, predicted: np.ndarray, truth: np.ndarray, voxel_mm3: float | np.ndarray,
                    slice_thickness_mm: float, counted_truth: np.ndarray | None = None) -> CaseEvaluation:
    """Compare two label arrays of one grid.

    Args:
        voxel_mm3: volume of one voxel (mm3), or an array per slice (first axis)
            for series whose slices are unevenly spaced.
        counted_truth: the true labels counted by the definition on the acquired image
            (:func:`inference.volumes.countable_labels` with the method's threshold), if measured.
    """
    if predicted.shape != truth.shape:
        raise ValueError(f"case {name}: prediction shape {predicted.shape} differs from truth {truth.shape}")
    if counted_truth is not None and counted_truth.shape != truth.shape:
        raise ValueError(f"case {name}: counted truth shape {counted_truth.shape} differs from truth {truth.shape}")
    per_slice = np.broadcast_to(np.asarray(voxel_mm3, dtype=float), (truth.shape[0],))

    def volumes(labels: np.ndarray) -> dict[str, float]:
        # The node's one volume counter; a voxel's volume stands for pixel area x slice extent.
        return region_volumes_cm3(np.asarray(labels).astype(np.uint8, copy=False), 1.0, per_slice)

    return CaseEvaluation(name, float(slice_thickness_mm), dice_per_region(predicted, truth), volumes(truth),
                          volumes(predicted), None if counted_truth is None else volumes(counted_truth))


def summary_rows(evaluations: Sequence[CaseEvaluation]) -> list[dict[str, object]]:
    """Per thickness group: cases, mean (and minimum) Dice per region, worst total error."""
    rows = []
    for low, high in THICKNESS_GROUPS:
        group = [e for e in evaluations if low < e.slice_thickness_mm <= high + 1e-6]
        if not group:
            continue
        row: dict[str, object] = {"slices_mm": f"{low:g}-{high:g}", "cases": len(group)}
        for key in REGION_KEYS:
            row[key] = float(np.mean([e.dice[key] for e in group]))
        row["min_case_dice"] = float(min(min(e.dice.values()) for e in group))
        row["max_abs_total_error_percent"] = float(max(abs(e.total_error_percent) for e in group))
        rows.append(row)
    return rows


def evaluation_record(evaluations: Sequence[CaseEvaluation], description: str, data: str,
                      tta: bool, refine_surface: bool) -> dict[str, object]:
    """The figures of an evaluation as plain data, to keep in a checkpoint's metrics.

    Args:
        description: what the cases are (e.g. seeds and slice thicknesses of phantoms).
        data: where they were read from (folder, or how they were made).
        tta: whether prediction used flip test-time augmentation.
        refine_surface: whether the brain-surface refinement (:mod:`inference.surface`) was on.
    """
    if not evaluations:
        raise ValueError("no evaluated cases to record")
    totals = {e.name: round(e.total_error_percent, 3) for e in evaluations}
    groups = [{key: (round(value, 4) if isinstance(value, float) else value) for key, value in row.items()}
              for row in summary_rows(evaluations)]
    return {
        "description": description,
        "data": data,
        "test_time_augmentation": bool(tta),
        "surface_refinement": bool(refine_surface),
        "cases": len(evaluations),
        "mean_dice_by_slice_thickness": groups,
        "total_error_percent": totals,
        "worst_total_error_percent": max(abs(v) for v in totals.values()),
        f"cases_with_total_within_{TOTAL_ERROR_TARGET_PERCENT:g}_percent":
            sum(abs(v) <= TOTAL_ERROR_TARGET_PERCENT for v in totals.values()),
    }


def format_table(evaluations: Sequence[CaseEvaluation]) -> str:
    """A plain-text table: mean Dice per region per thickness group, and volume errors."""
    summaries = summary_rows(evaluations)
    header = f"{'region':<22}" + "".join(f"{'Dice ' + str(s['slices_mm']) + ' mm':>18}" for s in summaries)
    header += f"{'mean |vol err| %':>18}"
    counted = all(e.counted_true_cm3 is not None for e in evaluations)
    if counted:
        header += f"{'|territory err| %':>19}"
    lines = [header, "-" * len(header)]
    for key in REGION_KEYS:
        errors = [abs(e.volume_error_percent(key)) for e in evaluations]
        line = f"{key:<22}" + "".join(f"{s[key]:>18.3f}" for s in summaries) + f"{np.mean(errors):>18.2f}"
        if counted:
            line += f"{np.mean([abs(e.territory_error_percent(key)) for e in evaluations]):>19.2f}"
        lines.append(line)
    lines.append("-" * len(header))
    lines.append(f"{'cases':<22}" + "".join(f"{s['cases']:>18}" for s in summaries))
    lines.append(f"{'worst |total err| %':<22}" + "".join(f"{s['max_abs_total_error_percent']:>18.2f}" for s in summaries))
    if counted:
        lines.append("vol err: against the true tissue; territory err: against the true territories counted by the "
                     "definition on the acquired image (partial volume left out)")
    return "\n".join(lines)


def has_counted_truth(rows: Sequence[dict[str, str]]) -> bool:
    """Whether rows read from :func:`write_csv`'s file carry the true territories counted on the acquired
    image (files of an older lobevol lack them)."""
    return bool(rows) and bool(rows[0].get(f"true_counted_cm3_{REGION_KEYS[0]}"))


def write_csv(path: Path, evaluations: Sequence[CaseEvaluation]) -> Path:
    """One row per case: thickness, Dice and true/predicted volume per region, total error."""
    columns = ["case", "slice_thickness_mm"]
    columns += [f"dice_{k}" for k in REGION_KEYS]
    columns += [f"true_cm3_{k}" for k in REGION_KEYS] + [f"predicted_cm3_{k}" for k in REGION_KEYS]
    columns += [f"true_counted_cm3_{k}" for k in REGION_KEYS]
    columns += ["total_error_percent"]
    with open(path, "w", newline="") as handle:
        writer = csv.writer(handle)
        writer.writerow(columns)
        for e in evaluations:
            writer.writerow(
                [e.name, f"{e.slice_thickness_mm:.3f}"]
                + [f"{e.dice[k]:.4f}" for k in REGION_KEYS]
                + [f"{e.true_cm3[k]:.3f}" for k in REGION_KEYS]
                + [f"{e.predicted_cm3[k]:.3f}" for k in REGION_KEYS]
                + [f"{e.counted_true_cm3[k]:.3f}" if e.counted_true_cm3 else "" for k in REGION_KEYS]
                + [f"{e.total_error_percent:.3f}"]
            )
    return Path(path)
