"""``lobevol run``: the embedded default, what ``make run`` starts.

Until the DICOM node exists this does the whole engine loop on the bundled
model: generate one synthetic head-CT phantom, segment it, and print the
measured volumes next to the phantom's true volumes.
"""
from __future__ import annotations

import argparse

from inference.vocabulary import REGIONS
from node.cli._options import add_device_options, inference_settings

def register(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser(
        "run",
        help="phantom -> segmentation -> volumes next to the truth (the embedded default)",
        description=(
            "Generate one synthetic pediatric head-CT phantom, segment it with the bundled "
            "ResU-Net and print each region's measured volume next to the phantom's true "
            "volume (cm3), with the Dice overlap against the true labels."
        ),
        epilog="example:\n  lobevol run --seed 7 --slice-thickness 1.25",
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--seed", type=int, default=2025, help="phantom seed (default 2025)")
    parser.add_argument(
        "--slice-thickness", type=float, default=None, metavar="MM",
        help="slice thickness of the phantom in mm (default: drawn at random, 0.625-5)",
    )
    parser.add_argument("--model", default=None, help="checkpoint (default: the bundled model)")
    add_device_options(parser, tta=True)
    parser.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from inference.phantoms.generator import make_phantom
    from inference.metrics import dice_per_region
    from inference.factory import load_segmenter

    phantom = make_phantom(args.seed, slice_thickness_mm=args.slice_thickness)
    segmenter = load_segmenter(inference_settings(args), progress=True)
    result = segmenter.segment(phantom.image)
    dice = dice_per_region(result.labels, phantom.labels)
    truth = phantom.meta["volumes_cm3"]

    spacing = phantom.image.GetSpacing()
    print(
        f"phantom seed {args.seed}: {phantom.meta['sex']}, {phantom.meta['age_years']:.2f} years, "
        f"{phantom.image.GetSize()} voxels of {spacing[0]:.3f} x {spacing[1]:.3f} x {spacing[2]:.3f} mm"
    )
    print(f"model: {result.model['name']} (sha256 {result.model['weights_sha256'][:12]})")
    print(f"{'region':<22}{'measured':>10}{'true':>10}{'error':>9}{'Dice':>7}")
    for region in REGIONS:
        measured, true = result.volumes_cm3[region.key], truth[region.key]
        print(
            f"{region.name:<22}{measured:>10.1f}{true:>10.1f}"
            f"{100 * (measured - true) / true:>8.1f}%{dice[region.key]:>7.3f}"
        )
    measured_total = sum(result.volumes_cm3.values())
    true_total = sum(truth.values())
    print(
        f"{'total':<22}{measured_total:>10.1f}{true_total:>10.1f}"
        f"{100 * (measured_total - true_total) / true_total:>8.1f}%"
    )
    timings = ", ".join(f"{k} {v:.1f} s" for k, v in result.timings_s.items())
    print(f"time: {timings}")
    return 0
