"""Side-by-side table of models on the same held-out cases, from ``lobevol evaluate --csv`` files.

For each model (``NAME=CSV``) and region: mean Dice over all cases and per slice thickness,
mean absolute volume error against the true tissue, and, when the CSV has the true
territories counted on the acquired image (``true_counted_cm3_*``), the mean absolute
territory error. Prints a Markdown table (the model card's).

examples:
  lobevol evaluate old.pt heldout --threads 2 --csv old.csv
  lobevol evaluate new.pt heldout --threads 2 --csv new.csv
  .venv/bin/python benchmarks/heldout_table.py old=old.csv new=new.csv
"""
from __future__ import annotations

import argparse
import csv
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from inference.evaluation import has_counted_truth  # noqa: E402
from inference.vocabulary import REGION_KEYS  # noqa: E402


def read_rows(path: Path) -> list[dict[str, str]]:
    rows = list(csv.DictReader(open(path, newline="")))
    if not rows:
        raise SystemExit(f"{path}: no cases")
    return rows


def mean(values) -> float:
    values = list(values)
    return sum(values) / len(values)


def region_cells(rows: list[dict[str, str]], key: str, thicknesses: list[str]) -> str:
    dice = mean(float(r[f"dice_{key}"]) for r in rows)
    by_thickness = " / ".join(f"{mean(float(r[f'dice_{key}']) for r in rows if r['slice_thickness_mm'] == t):.3f}"
                              for t in thicknesses)
    volume = 100 * mean(abs(float(r[f"predicted_cm3_{key}"]) / float(r[f"true_cm3_{key}"]) - 1) for r in rows)
    cells = f"{dice:.3f} ({by_thickness}) | {volume:.1f} %"
    if has_counted_truth(rows):
        territory = 100 * mean(abs(float(r[f"predicted_cm3_{key}"]) / float(r[f"true_counted_cm3_{key}"]) - 1)
                               for r in rows)
        cells += f" | {territory:.1f} %"
    return cells


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("models", nargs="+", metavar="NAME=CSV", help="a model's name and its evaluate --csv file")
    args = parser.parse_args(argv)
    models = []
    for item in args.models:
        name, sep, path = item.partition("=")
        if not sep or not Path(path).is_file():
            parser.error(f"{item!r}: give NAME=CSV with an existing CSV file")
        models.append((name, read_rows(Path(path))))
    thicknesses = sorted({r["slice_thickness_mm"] for _, rows in models for r in rows}, key=float)
    groups = " / ".join(f"{float(t):g} mm" for t in thicknesses)
    header, rule = "| region |", "| --- |"
    for name, rows in models:
        counted = has_counted_truth(rows)
        header += f" {name}: Dice, all ({groups}) | vol err |" + (" territory err |" if counted else "")
        rule += " --- | --- |" + (" --- |" if counted else "")
    print(f"{sum(len(rows) for _, rows in models) // len(models)} cases per model; mean absolute errors")
    print(header)
    print(rule)
    for key in REGION_KEYS:
        print(f"| {key.replace('_', ' ')} | " + " | ".join(region_cells(rows, key, thicknesses) for _, rows in models)
              + " |")
    cells = []
    for _, rows in models:
        errors = [float(r["total_error_percent"]) for r in rows]
        empty = 2 if has_counted_truth(rows) else 1
        cells += [f"{min(errors):+.1f} to {max(errors):+.1f} %"] + [""] * empty
    print("| total of the 10 | " + " | ".join(cells) + " |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
