"""Evaluation figures: Dice, volumes with per-slice voxel sizes, thickness groups, CSV."""
from __future__ import annotations

import csv

import numpy as np
import pytest

from inference.evaluation import evaluate_labels, evaluation_record, format_table, summary_rows, write_csv
from inference.vocabulary import REGION_KEYS


def _truth() -> np.ndarray:
    truth = np.zeros((4, 10, 10), np.uint8)
    for value in range(1, 11):
        truth[:, value - 1, :] = value
    return truth


def test_perfect_prediction_scores_one_and_counts_volumes_per_slice():
    truth = _truth()
    result = evaluate_labels("c", truth, truth, np.array([1.0, 1.0, 2.0, 2.0]), 1.0)
    assert all(d == 1.0 for d in result.dice.values())
    assert result.true_cm3["right_frontal_lobe"] == pytest.approx(10 * (1 + 1 + 2 + 2) / 1000)
    assert result.total_error_percent == 0.0


def test_errors_and_groups():
    truth = _truth()
    predicted = truth.copy()
    predicted[:, 0, :5] = 0  # half of the right frontal lobe missed
    thin = evaluate_labels("thin", predicted, truth, 1.0, 0.625)
    thick = evaluate_labels("thick", truth, truth, 1.0, 5.0)
    assert thin.dice["right_frontal_lobe"] == pytest.approx(2 * 20 / (20 + 40))
    assert thin.volume_error_percent("right_frontal_lobe") == pytest.approx(-50.0)
    rows = summary_rows([thin, thick])
    assert [r["slices_mm"] for r in rows] == ["0-1.25", "1.25-5"] and rows[1]["cases"] == 1
    assert "right_frontal_lobe" in format_table([thin, thick])


def test_record_keeps_groups_totals_and_the_count_within_target():
    truth = _truth()
    short = truth.copy()
    short[:, 0, :] = 0  # the right frontal lobe missed: 10 % of the total
    record = evaluation_record([evaluate_labels("good", truth, truth, 1.0, 1.0),
                                evaluate_labels("short", short, truth, 1.0, 5.0)], "two cases", "here", tta=True,
                               refine_surface=True)
    assert record["total_error_percent"] == {"good": 0.0, "short": -10.0}
    assert record["worst_total_error_percent"] == 10.0
    assert record["cases_with_total_within_3_percent"] == 1
    assert [g["slices_mm"] for g in record["mean_dice_by_slice_thickness"]] == ["0-1.25", "1.25-5"]
    assert record["mean_dice_by_slice_thickness"][1]["right_frontal_lobe"] == 0.0
    with pytest.raises(ValueError, match="no evaluated cases"):
        evaluation_record([], "none", "here", tta=True, refine_surface=False)


def test_csv_has_one_row_per_case(tmp_path):
    truth = _truth()
    write_csv(tmp_path / "e.csv", [evaluate_labels("a", truth, truth, 1.0, 1.0)])
    rows = list(csv.DictReader(open(tmp_path / "e.csv")))
    assert len(rows) == 1 and float(rows[0][f"dice_{REGION_KEYS[0]}"]) == 1.0


def test_shape_mismatch_is_named():
    with pytest.raises(ValueError, match="shape"):
        evaluate_labels("c", np.zeros((2, 2, 2)), np.zeros((2, 2, 3)), 1.0, 1.0)


def test_territory_error_is_taken_against_the_truth_counted_on_the_acquired_image(tmp_path):
    truth = _truth()
    counted = truth.copy()
    counted[:, 0, :2] = 0            # the blur darkened 2 of the region's 10 voxels a slice below the threshold
    predicted = counted.copy()       # a method that places the territory exactly, counted the same way
    result = evaluate_labels("c", predicted, truth, 1.0, 1.0, counted_truth=counted)
    assert result.volume_error_percent("right_frontal_lobe") == pytest.approx(-20.0)
    assert result.territory_error_percent("right_frontal_lobe") == pytest.approx(0.0)
    assert "territory err" in format_table([result])
    write_csv(tmp_path / "e.csv", [result])
    row = next(csv.DictReader(open(tmp_path / "e.csv")))
    assert float(row["true_counted_cm3_right_frontal_lobe"]) == pytest.approx(0.032)
    with pytest.raises(ValueError, match="not counted"):
        evaluate_labels("c", truth, truth, 1.0, 1.0).territory_error_percent("right_frontal_lobe")
