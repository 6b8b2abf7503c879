"""``lobevol phantom``: write synthetic pediatric head-CT phantoms as DICOM series with their truth."""
from __future__ import annotations

import argparse
import json
import shutil
from pathlib import Path

EPILOG = """\
examples:
  lobevol phantom --out phantoms --count 3 --seed 1 --montage
      phantoms/case_0000 .. case_0002 (seeds 1, 2, 3), each with dicom/ (CT series),
      labels.nii.gz (10 regions, on the series' grid), meta.json (sex, age, true
      volumes in cm3, geometry, pose) and montage.png (axial, coronal, sagittal)
  lobevol phantom --out thick --count 10 --seed 500 --slice-thickness 5 --pixel-spacing 0.5
      every case with 5 mm slices and 0.5 mm pixels (otherwise drawn per case)
  lobevol phantom --out tilted --count 2 --seed 9 --tilt 15 --matrix 256 --nifti
      gantry tilt 15 degrees (sheared slice stack, as scanners write it), 256 x 256
      slices, plus image.nii.gz for training tools

Same seed, same output. A seed is one child: its sex, age, regional volumes and
anatomy do not depend on the scan options, so one seed at two slice thicknesses is
the same child scanned twice. Volumes follow the whole-cohort distribution of
Xi et al. 2025 (girls ~6 % smaller, +8 %/year; the phantom's own choices).
Seeds 900000-999999 are kept for held-out evaluation: lobevol train refuses them.
For a tilted series, labels.nii.gz is indexed like the DICOM slices (slice k, row j,
column i) and carries the orthogonal geometry of the tilted plane; the DICOM
headers carry the true, sheared slice positions.
"""

MAX_COUNT = 100000


def register(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser(
        "phantom",
        help="write synthetic head-CT phantoms (DICOM series + labels + true volumes)",
        description=(
            "Generate synthetic head CTs of 1.5-2.5-year-old children made from the bundled atlas's\n"
            "real anatomy (10 labelled regions, grey / white matter and CSF, skull and scalp) under a\n"
            "random smooth deformation, with volumes drawn from the published cohort, a toddler's\n"
            "tissue densities and random pose, field of view, slice thickness, kernel and noise.\n"
            "Each case is written as a CT Image Storage series with its label map and truth."
        ),
        epilog=EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--out", required=True, type=Path, metavar="DIR", help="output folder (created)")
    parser.add_argument("--count", type=int, default=1, metavar="N", help="number of cases (default 1)")
    parser.add_argument("--seed", type=int, default=0, metavar="S", help="seed of case 0; case i uses S+i (default 0)")
    parser.add_argument("--montage", action="store_true", help="also write montage.png per case (to look at them)")
    parser.add_argument("--nifti", action="store_true", help="also write image.nii.gz (HU) per case")
    parser.add_argument("--slice-thickness", type=float, default=None, metavar="MM",
                        help="slice thickness = spacing in mm (default: drawn per case, 0.625-5)")
    parser.add_argument("--pixel-spacing", type=float, default=None, metavar="MM",
                        help="in-plane pixel size in mm (default: drawn per case, 0.35-0.6 and a field of view "
                             ">= 215 mm so the head fits: 0.42-0.6 at 512)")
    parser.add_argument("--matrix", type=int, default=512, metavar="N", help="rows = columns per slice (default 512)")
    parser.add_argument("--slices", type=int, default=None, metavar="N",
                        help="number of slices (default: enough to cover the head)")
    parser.add_argument("--tilt", type=float, default=0.0, metavar="DEG", help="gantry tilt in degrees (default 0)")
    parser.add_argument("--sex", choices=("M", "F"), default=None, help="sex of every case (default: drawn)")
    parser.add_argument("--age", type=float, default=None, metavar="YEARS", help="age of every case (default: drawn)")
    parser.add_argument("--overwrite", action="store_true", help="replace existing case folders")
    parser.set_defaults(func=run)


def _check_args(args: argparse.Namespace) -> None:
    if not 1 <= args.count <= MAX_COUNT:
        raise ValueError(f"--count must be 1-{MAX_COUNT}, got {args.count}")
    if args.seed < 0:
        raise ValueError(f"--seed must be zero or positive, got {args.seed}")
    if args.out.exists() and not args.out.is_dir():
        raise ValueError(f"--out {args.out} exists and is not a folder")
    if not args.overwrite:
        existing = [args.out / f"case_{i:04d}" for i in range(args.count) if (args.out / f"case_{i:04d}").exists()]
        if existing:
            raise ValueError(f"{existing[0]} already exists ({len(existing)} case folder(s) in the way); "
                             "use --overwrite to replace them or another --out")


def run(args: argparse.Namespace) -> int:
    import SimpleITK as sitk
    from tqdm import tqdm

    from inference.montage import save_montage
    from inference.phantoms.generator import make_phantom
    from inference.phantoms.dicom_series import write_ct_series

    _check_args(args)
    args.out.mkdir(parents=True, exist_ok=True)
    for index in tqdm(range(args.count), desc="phantoms", unit="case", disable=args.count == 1 and not args.verbose):
        seed = args.seed + index
        phantom = make_phantom(
            seed, slice_thickness_mm=args.slice_thickness, pixel_spacing_mm=args.pixel_spacing, matrix=args.matrix,
            n_slices=args.slices, tilt_deg=args.tilt, sex=args.sex, age_years=args.age,
        )
        case = args.out / f"case_{index:04d}"
        if case.exists():
            shutil.rmtree(case)
        write_ct_series(phantom, case / "dicom")
        sitk.WriteImage(phantom.labels, str(case / "labels.nii.gz"), useCompression=True)
        if args.nifti:
            sitk.WriteImage(phantom.image, str(case / "image.nii.gz"), useCompression=True)
        (case / "meta.json").write_text(json.dumps(phantom.meta, indent=2) + "\n")
        if args.montage:
            meta = phantom.meta
            title = (f"seed {seed}  {meta['sex']} {meta['age_years']:.2f} y  "
                     f"{meta['pixel_spacing_mm']:.3g} x {meta['slice_thickness_mm']:g} mm  tilt {meta['tilt_deg']:g}")
            save_montage(phantom.image, phantom.labels, case / "montage.png", title=title)
    print(f"{args.count} phantom case(s) written to {args.out}")
    return 0
