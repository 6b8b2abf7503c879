"""``lobevol compare``: the paper's model comparison, trained with one budget on one data set."""
from __future__ import annotations

import argparse
import csv
from pathlib import Path

from node.cli.train import (add_budget_arguments, add_data_arguments, add_size_arguments, load_cases, split_cases,
                                 train_config)

#: The three models of Xi et al. 2025, Table (Dice training / test): name, architecture, kernel.
VARIANTS = (
    ("3D U-Net (baseline)", "unet", (3, 3, 3)),
    ("ResU-Net (1,3,3)", "resunet", (1, 3, 3)),
    ("ResU-Net (3,3,3)", "resunet", (3, 3, 3)),
)
PAPER_DICE = {"3D U-Net (baseline)": (0.94, 0.88), "ResU-Net (1,3,3)": (0.93, 0.92), "ResU-Net (3,3,3)": (0.92, 0.96)}

EPILOG = """\
examples:
  lobevol compare --phantoms 24 --out runs/compare --epochs 10
      the three models on the same 24 phantoms, same split, same budget
  lobevol compare --data /data/labelled --out runs/compare --runs 3 --epochs 200 --lr 1e-5 --batch-size 4
      your data, three training runs per model (different seeds), averaged as in the paper

Prints the paper's table: mean region Dice on training and on held-out (test) cases,
with the published figures beside ours; OUT/compare.csv keeps every run.
"""


def register(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser(
        "compare", help="train ResU-Net 3x3x3, ResU-Net 1x3x3 and U-Net alike and compare their Dice",
        description="The paper's comparison: each model trained with the same budget on the same cases "
                    "and split, then mean Dice of the 10 regions on training and test cases.",
        epilog=EPILOG, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_data_arguments(parser)
    parser.add_argument("--out", required=True, type=Path, metavar="DIR")
    add_size_arguments(parser)
    parser.add_argument("--runs", type=int, default=1, help="training runs per model, averaged (paper: 10)")
    add_budget_arguments(parser)
    # the base configuration; each variant then sets its architecture and kernel
    parser.set_defaults(func=run, folds=None, fold=0, architecture="resunet", kernel="3x3x3")


def run(args: argparse.Namespace) -> int:
    import numpy as np

    from inference.checkpoint import load_checkpoint
    from inference.predict import set_cpu_threads
    from inference.training import train, validation_dice

    set_cpu_threads(args.threads)
    if args.runs < 1:
        raise ValueError("--runs must be at least 1")
    base = train_config(args)
    cases, described = load_cases(args, base, args.out)
    training, test = split_cases(args, cases, base.seed)
    if not test:
        raise ValueError("compare needs held-out cases: set --validation-fraction above 0")
    rows = []
    for name, architecture, kernel in VARIANTS:
        for run_index in range(args.runs):
            config = train_config(args, architecture=architecture, kernel_size=kernel, seed=base.seed + run_index)
            folder = args.out / f"{architecture}{''.join(map(str, kernel))}_run{run_index}"
            print(f"{name}, run {run_index + 1}/{args.runs}")
            result = train(config, training, test, folder, trained_on=described, device=args.device,
                           progress=not args.no_progress)
            model, _ = load_checkpoint(result.last)
            device = next(model.parameters()).device
            train_dice = float(np.mean(list(validation_dice(model, training, device).values())))
            test_dice = float(np.mean(list(validation_dice(model, test, device).values())))
            rows.append({"model": name, "run": run_index, "train_dice": train_dice, "test_dice": test_dice})
    _write(args.out / "compare.csv", rows)
    print(_table(rows, len(training), len(test)))
    return 0


def _table(rows, n_train: int, n_test: int) -> str:
    import numpy as np

    lines = [f"{'model':<22}{'Dice, training':>16}{'Dice, test':>12}{'paper (train/test)':>22}",
             "-" * 72]
    for name, _, _ in VARIANTS:
        mine = [r for r in rows if r["model"] == name]
        paper = PAPER_DICE[name]
        lines.append(f"{name:<22}{np.mean([r['train_dice'] for r in mine]):>16.3f}"
                     f"{np.mean([r['test_dice'] for r in mine]):>12.3f}{paper[0]:>15.2f} / {paper[1]:.2f}")
    lines.append(f"mean Dice of the 10 regions at the working spacing (last epoch); "
                 f"{n_train} training, {n_test} test cases")
    return "\n".join(lines)


def _write(path: Path, rows) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=["model", "run", "train_dice", "test_dice"])
        writer.writeheader()
        writer.writerows(rows)
