"""``lobevol atlas-label``: training labels from a site's own scans by template registration (the paper's way)."""
from __future__ import annotations

import argparse
import logging
import time
from pathlib import Path

log = logging.getLogger(__name__)

IMAGE_SUFFIXES = (".nii", ".nii.gz", ".mha", ".mhd", ".nrrd")

EPILOG = """\
examples:
  lobevol atlas-label /media/cd/DICOM --out atlas-labels
      every study under the folder (the node's series selection picks each study's head CT):
      atlas-labels/imagesTr/<case>.nii.gz (HU), atlas-labels/labelsTr/<case>.nii.gz (0..10),
      atlas-labels/qc/<case>.png (montage to check), atlas-labels/volumes.csv
  lobevol atlas-label scans/ --out atlas-labels        a folder of NIfTI head CTs in HU
  lobevol atlas-label scan.nii.gz --out atlas-labels --threads 2

Then correct the labels by eye (ITK-SNAP or 3D Slicer: open imagesTr/<case>.nii.gz with
labelsTr/<case>.nii.gz as its segmentation), and train on the folder:
  lobevol train --data atlas-labels --out runs/site

The template and atlas are of adults (Rorden et al. 2012; BLAST-CT): labels of young
children need the review, as the paper's did.
"""


def register(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser(
        "atlas-label",
        help="label scans by registering the bundled CT template and atlas (training labels to review)",
        description=(
            "Register the bundled adult CT template to each scan (ANTs affine + SyN), warp its lobar atlas "
            "onto the scan and write image/label pairs in the layout 'lobevol train --data' reads, with a QC "
            "montage per case."
        ),
        epilog=EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("input", metavar="INPUT", type=Path,
                        help="folder of DICOM studies, folder of images (.nii, .nii.gz, .mha, .nrrd) or one image")
    parser.add_argument("--out", type=Path, required=True, metavar="DIR", help="output folder (created)")
    parser.add_argument("--threads", type=int, default=None, metavar="N",
                        help="CPU threads for ANTs and SimpleITK (default: their choice)")
    parser.add_argument("--spacing", type=float, default=2.0, metavar="MM",
                        help="spacing registration works at (default 2 mm)")
    parser.add_argument("--refine-surface", action=argparse.BooleanOptionalAction, default=True,
                        help="move the cerebral lobes' edge to the image's CSF/brain contrast (default on)")
    parser.add_argument("--overwrite", action="store_true", help="replace cases already in DIR")
    parser.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from tqdm import tqdm

    from inference.atlas.registration import AtlasSegmenter, RegistrationSettings
    from node.pipeline import csv_row, write_volumes_csv

    cases = find_cases(args.input)
    segmenter = AtlasSegmenter(RegistrationSettings(spacing_mm=args.spacing), threads=args.threads,
                               progress=False, refine_surface=args.refine_surface)
    folders = {name: args.out / name for name in ("imagesTr", "labelsTr", "qc")}
    for folder in folders.values():
        folder.mkdir(parents=True, exist_ok=True)
    rows, failed = [], []
    for name, load in tqdm(cases, desc="atlas-label", unit="case", disable=len(cases) < 2):
        label_path = folders["labelsTr"] / f"{name}.nii.gz"
        if label_path.exists() and not args.overwrite:
            tqdm.write(f"case {name}: skipped, {label_path} exists (--overwrite replaces it)")
            continue
        try:
            rows.append(label_case(name, load, segmenter, folders))
        except (ValueError, RuntimeError) as error:
            failed.append(name)
            tqdm.write(f"case {name}: failed, {error}")
    if rows:
        write_volumes_csv(args.out / "volumes.csv", [csv_row(name, None, None, volumes) for name, volumes in rows])
    if failed and not rows:
        raise RuntimeError(f"no case could be labelled ({', '.join(failed)})")
    print(f"{len(rows)} case(s) labelled in {args.out} ({len(failed)} failed); review the labels, then "
          f"lobevol train --data {args.out}")
    return 0


def label_case(name: str, load, segmenter, folders: dict[str, Path]) -> tuple[str, dict[str, float]]:
    """Label one case: image, labels and montage written; returns (name, volumes) and prints its summary."""
    import SimpleITK as sitk
    from tqdm import tqdm

    from inference.montage import save_montage

    started = time.monotonic()
    image = load()
    segmentation = segmenter.segment(image)
    volumes = segmentation.volumes_cm3
    if not any(volumes.values()):
        raise RuntimeError("the warped atlas covers no brain: is this a head CT in HU?")
    # Training reads HU; Int16 keeps the files small without losing anything a CT holds.
    sitk.WriteImage(sitk.Cast(sitk.Round(image), sitk.sitkInt16), str(folders["imagesTr"] / f"{name}.nii.gz"),
                    useCompression=True)
    sitk.WriteImage(segmentation.labels, str(folders["labelsTr"] / f"{name}.nii.gz"), useCompression=True)
    montage = save_montage(image, segmentation.labels, folders["qc"] / f"{name}.png", title=f"{name}: atlas labels")
    tqdm.write(f"case {name}: labelled in {time.monotonic() - started:.0f} s, total {sum(volumes.values()):.0f} cm3 "
               f"(cerebellum {volumes['cerebellum']:.0f}, brainstem {volumes['brainstem']:.0f}); check {montage}")
    return name, volumes


def find_cases(source: Path) -> list[tuple[str, object]]:
    """(case name, loader of the HU image) for an image file, a folder of images or a folder of DICOM studies.

    DICOM studies go through the node's series selection (each study's best head CT series, tilt
    corrected); the case is named after the study UID (dots made underscores: training takes the
    name up to the first dot).

    Raises:
        FileNotFoundError: nothing there; ValueError: a study without a suitable series is reported, not fatal.
    """
    if not source.exists():
        raise FileNotFoundError(f"input {source} does not exist")
    if source.is_file():
        if not source.name.lower().endswith(IMAGE_SUFFIXES):
            raise ValueError(f"{source} is a file but not an image ({', '.join(IMAGE_SUFFIXES)}); give a folder "
                             "for DICOM input")
        return [(_image_name(source), _image_loader(source))]
    images = sorted(p for p in source.iterdir() if p.is_file() and p.name.lower().endswith(IMAGE_SUFFIXES))
    if images:
        return [(_image_name(p), _image_loader(p)) for p in images]
    return _dicom_cases(source)


def _image_name(path: Path) -> str:
    return path.name.split(".")[0].removesuffix("_0000")


def _image_loader(path: Path):
    def load():
        import SimpleITK as sitk

        return sitk.ReadImage(str(path), sitk.sitkFloat32)
    return load


def _dicom_cases(folder: Path) -> list[tuple[str, object]]:
    from node.dicom.files import find_dicom_files, group_by_study
    from node.dicom.selection import SelectionRules, select_series

    studies = group_by_study(find_dicom_files(folder))
    if not studies:
        raise FileNotFoundError(f"no images and no DICOM files found under {folder}")
    cases = []
    for study_uid, series in studies.items():
        selection = select_series(series, SelectionRules())
        name = study_uid.replace(".", "_")
        if selection.chosen is None:
            print(f"case {name}: skipped, no suitable head CT series: {selection.summary()}")
            continue
        cases.append((name, _series_loader(series, selection)))
    if not cases:
        raise RuntimeError(f"none of the {len(studies)} study(ies) under {folder} has a head CT series to label")
    return cases


def _series_loader(series: dict, selection):
    def load():
        from node.dicom.volume import load_series_volume

        refused = []
        for series_uid in selection.ranked:  # the best series first, as the node does
            try:
                return load_series_volume(series[series_uid]).image
            except ValueError as error:
                refused.append(f"{selection.labels[series_uid]}: {error}")
        raise ValueError("; ".join(refused))
    return load
