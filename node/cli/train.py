"""``lobevol train``: train a segmentation model on phantoms or on your own labelled scans."""
from __future__ import annotations

import argparse
from pathlib import Path

from inference.vocabulary import Precision
from node.cli._options import add_device_options

EPILOG = """\
examples:
  lobevol train --phantoms 60 --out runs/r1
      60 synthetic phantoms (seeds 1000..1059; 15 % kept for validation), ResU-Net 3x3x3,
      runs/r1/best.pt (best validation Dice) and runs/r1/last.pt (resumable)
  lobevol train --data /data/my_labelled_ct --out runs/site --epochs 200 --lr 1e-5 --batch-size 4
      your scans: imagesTr/<case>.nii.gz + labelsTr/<case>.nii.gz (HU images, labels 0..10:
      0 background, 1/2 right/left frontal, 3/4 parietal, 5/6 occipital, 7/8 temporal lobe,
      9 cerebellum, 10 brainstem, as in inference/vocabulary.py), or <case>/image.nii.gz +
      <case>/labels.nii.gz; the paper's settings (Adam 1e-5, 200 epochs, batch 4)
  lobevol train --data DIR --out runs/cv --folds 5 --fold 2
      fold 2 of a 5-fold cross-validation (run folds 0..4 for the full CV)
  lobevol train --phantoms 60 --out runs/r1 --resume
      continue an interrupted run from runs/r1/last.pt (same options)
  lobevol train --data /data/my_labelled_ct --out runs/tuned --init bundled --lr 1e-4 --epochs 30
      fine-tune the bundled phantom model on your scans: the network and preprocessing
      come from the --init checkpoint, the run starts from its weights

Prepared (preprocessed) cases are cached under OUT/cache so reruns start at once.
Use the result with: lobevol segment ... --model runs/r1/best.pt, and measure it with
lobevol evaluate runs/r1/best.pt DATA.
"""


def register(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser(
        "train", help="train a segmentation model (phantoms or your own image/label pairs)",
        description="Train a 3D ResU-Net (or the U-Net baseline) with the inference preprocessing: "
                    "Adam, cross-entropy (+ soft Dice), random left-right flips (labels swapped), "
                    "rotations and zoom, validation Dice per epoch, periodic and best checkpoints.",
        epilog=EPILOG, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_data_arguments(parser)
    parser.add_argument("--out", required=True, type=Path, metavar="DIR", help="output folder for checkpoints")
    add_model_arguments(parser)
    add_budget_arguments(parser)
    parser.add_argument("--folds", type=int, default=None, help="k of a k-fold cross-validation")
    parser.add_argument("--fold", type=int, default=0, help="which fold (0-based) is validated (with --folds)")
    parser.add_argument("--resume", action="store_true", help="continue from OUT/last.pt")
    parser.add_argument("--init", metavar="MODEL", default=None,
                        help="start from this checkpoint's weights (fine-tuning); 'bundled' = the shipped "
                             "model. Its architecture, kernel, channels and preprocessing replace "
                             "--architecture/--kernel/--channels/--spacing")
    parser.set_defaults(func=run)


def add_data_arguments(parser: argparse.ArgumentParser) -> None:
    source = parser.add_mutually_exclusive_group(required=True)
    source.add_argument("--phantoms", type=int, metavar="N", help="train on N synthetic phantoms made on the fly")
    source.add_argument("--data", type=Path, metavar="DIR", help="folder of image/label NIfTI pairs")
    parser.add_argument("--phantom-seed", type=int, default=1000, help="seed of the first phantom (default %(default)s)")
    parser.add_argument("--validation-fraction", type=float, default=0.15,
                        help="share of cases kept for validation when not using --folds (default %(default)s)")


def add_model_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--architecture", choices=("resunet", "unet"), default="resunet")
    parser.add_argument("--kernel", choices=("3x3x3", "1x3x3"), default="3x3x3", help="convolution kernel (z x y x x)")
    add_size_arguments(parser)


def add_size_arguments(parser: argparse.ArgumentParser) -> None:
    """Network width and working spacing (shared by train and compare)."""
    parser.add_argument("--channels", default="8,16,32,64,128", help="widths of the 5 levels (default %(default)s)")
    parser.add_argument("--spacing", type=float, default=1.5, help="working spacing in mm (paper: 1; default %(default)s)")


def add_budget_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--epochs", type=int, default=40)
    parser.add_argument("--iterations", type=int, default=50, help="optimiser steps per epoch (default %(default)s)")
    parser.add_argument("--batch-size", type=int, default=1, help="patches per optimiser step (default %(default)s)")
    parser.add_argument("--patch", default="96,112,96",
                        help="patch size z,y,x in voxels, multiples of 16 (default %(default)s: most of a "
                             "cropped head at 1.5 mm, the context the network has at inference)")
    parser.add_argument("--lr", type=float, default=1e-3, help="Adam learning rate (default %(default)s; paper 1e-5)")
    parser.add_argument("--lr-decay", choices=("poly", "constant"), default="poly",
                        help="poly: lr x (1 - epoch/epochs)^0.9 each epoch (default); constant")
    parser.add_argument("--dice-weight", type=float, default=1.0, help="weight of the soft Dice loss (0: CE only)")
    parser.add_argument("--rotation", type=float, default=10.0, help="largest random rotation per axis, degrees")
    parser.add_argument("--zoom", default="0.85,1.2", metavar="LOW,HIGH",
                        help="range of the random magnification of a patch's content (default %(default)s: "
                             "heads from an infant's size to an adult's; 1,1 = none)")
    parser.add_argument("--seed", type=int, default=2025)
    add_device_options(parser)
    parser.add_argument("--precision", choices=[p.value for p in Precision], default=Precision.AUTO.value,
                        help="arithmetic of the forward pass: auto (default) = float16 mixed precision on CUDA, "
                             "bfloat16 on a CPU with native bfloat16 (AVX512-BF16/AMX; about twice as fast), "
                             "else float32")
    parser.add_argument("--no-progress", action="store_true", help="no progress bars (log files)")


def _floats(text: str, what: str) -> tuple[float, ...]:
    try:
        return tuple(float(v) for v in text.split(","))
    except ValueError:
        raise ValueError(f"{what} must be comma-separated numbers, got {text!r}") from None


def _ints(text: str, what: str) -> tuple[int, ...]:
    try:
        return tuple(int(v) for v in text.split(","))
    except ValueError:
        raise ValueError(f"{what} must be comma-separated integers, got {text!r}") from None


def train_config(args: argparse.Namespace, **changes):
    """The TrainConfig the arguments describe."""
    from inference.preprocess import PreprocessConfig
    from inference.training import TrainConfig

    if not args.spacing > 0:
        raise ValueError(f"--spacing must be positive, got {args.spacing}")
    values = dict(
        architecture=args.architecture, kernel_size=(1, 3, 3) if args.kernel == "1x3x3" else (3, 3, 3),
        channels=_ints(args.channels, "--channels"),
        preprocessing=PreprocessConfig(spacing_mm=(args.spacing,) * 3),
        epochs=args.epochs, iterations_per_epoch=args.iterations, batch_size=args.batch_size,
        patch_size=_ints(args.patch, "--patch"), learning_rate=args.lr, lr_decay=args.lr_decay, dice_weight=args.dice_weight,
        rotation_deg=args.rotation, zoom_range=_floats(args.zoom, "--zoom"), seed=args.seed,
    )
    values.update(changes)
    return TrainConfig(**values)


def load_cases(args: argparse.Namespace, config, out_dir: Path):
    """Prepared cases of the data options, with a description of them (for the checkpoint)."""
    from inference.training import (CaseCache, find_image_label_pairs, load_pair, phantom_training_specs,
                                    prepare_cases)

    cache = CaseCache(out_dir / "cache", config.preprocessing)
    if args.phantoms is not None:
        if args.phantoms < 2:
            raise ValueError("--phantoms needs at least 2 cases (training and validation)")
        specs = list(phantom_training_specs(args.phantoms, args.phantom_seed))
        described = (f"{args.phantoms} synthetic head-CT phantoms (lobevol phantom, seeds "
                     f"{args.phantom_seed}-{args.phantom_seed + args.phantoms - 1})")
    else:
        pairs = find_image_label_pairs(args.data)
        specs = [(name, (lambda i=image, m=label: load_pair(i, m))) for name, image, label in pairs]
        described = f"{len(pairs)} labelled images from {args.data.name}"
    return prepare_cases(specs, cache, config.preprocessing, progress=not args.no_progress), described


def split_cases(args: argparse.Namespace, cases, seed: int):
    from inference.training import k_fold_split

    names = [c.name for c in cases]
    if args.folds:
        training, validation = k_fold_split(names, args.folds, args.fold, seed)
    else:
        if not 0 <= args.validation_fraction < 1:
            raise ValueError(f"--validation-fraction must be within 0..1, got {args.validation_fraction}")
        count = max(1, round(len(names) * args.validation_fraction)) if args.validation_fraction else 0
        validation = names[-count:] if count else []
        training = [n for n in names if n not in validation]
    by_name = {c.name: c for c in cases}
    return [by_name[n] for n in training], [by_name[n] for n in validation]


def initial_checkpoint(name: str | None) -> Path | None:
    """The --init checkpoint's path ('bundled' = the shipped model), checked to exist."""
    from inference.checkpoint import BUNDLED_CHECKPOINT

    if name is None:
        return None
    path = BUNDLED_CHECKPOINT if name == "bundled" else Path(name)
    if not path.is_file():
        raise FileNotFoundError(f"--init {name}: no checkpoint file {path}")
    return path


def run(args: argparse.Namespace) -> int:
    from inference.checkpoint import load_checkpoint
    from inference.predict import set_cpu_threads
    from inference.training import network_settings, train

    set_cpu_threads(args.threads)
    initial_path = initial_checkpoint(args.init)
    initial = load_checkpoint(initial_path) if initial_path else None
    config = train_config(args, **(network_settings(initial[1]) if initial else {}))
    cases, described = load_cases(args, config, args.out)
    if initial:
        described += f", fine-tuned from {initial_path.name} (weights sha256 {initial[1].weights_sha256[:12]})"
    training, validation = split_cases(args, cases, config.seed)
    fold = f", fold {args.fold} of {args.folds}" if args.folds else ""
    print(f"training on {len(training)} cases, validating on {len(validation)}{fold}", flush=True)
    result = train(config, training, validation, args.out, trained_on=described + fold, device=args.device,
                   resume=args.resume, initial=initial, progress=not args.no_progress,
                   precision=Precision(args.precision))
    print(f"best epoch {result.best_epoch}: validation mean Dice {result.best_dice:.4f}; "
          f"checkpoints {result.best} and {result.last}")
    return 0
