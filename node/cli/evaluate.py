"""``lobevol evaluate``: Dice and volume error of a model against ground truth."""
from __future__ import annotations

import argparse
import dataclasses
import json
from pathlib import Path

from inference.vocabulary import Method
from node.cli._options import add_device_options, inference_settings

#: Where ``--record`` keeps the figures in the checkpoint's metrics.
RECORD_KEY = "heldout_evaluation"
#: MODEL that stands for the atlas method instead of a checkpoint.
ATLAS_MODEL = Method.ATLAS.value

EPILOG = """\
examples:
  lobevol phantom --out heldout --count 10 --seed 900000
  lobevol evaluate inference/weights/resunet333_phantom.pt heldout
      phantom cases written by lobevol phantom (DICOM series + labels.nii.gz): each series
      goes through the node's own path (series to volume, segmentation, labels back on the
      source slices), so gantry tilt and uneven spacing are evaluated too
  lobevol evaluate runs/r1/best.pt /data/labelled --csv eval.csv
      image/label NIfTI pairs (imagesTr/ + labelsTr/, or <case>/image.nii.gz + labels.nii.gz)
  lobevol evaluate MODEL --phantoms 8 --seed 900000 --slice-thickness 5
      phantoms made in memory (nothing written), here all with 5 mm slices
  lobevol evaluate atlas heldout --threads 1
      the atlas method (template registration, the network's teacher) on the same cases:
      how far the two methods are from the truth, and from each other, on images whose
      truth is known
  lobevol evaluate runs/r1/best.pt heldout --record "10 phantoms, seeds 900000-9, 1.25 mm"
      also keep the figures in the checkpoint's metadata (metrics.heldout_evaluation), so
      the model carries how it was evaluated; the weights are not changed

Prints mean Dice per region for slices up to 1.25 mm and for 1.25-5 mm, the mean
absolute volume error per region and the worst error of the total of the 10 volumes;
--csv writes one row per case.
"""


def register(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser(
        "evaluate", help="Dice and volume error of a model against true labels",
        description="Segment every case with MODEL (the same prediction as the node) and compare with "
                    "its true labels on the source grid.",
        epilog=EPILOG, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("model", metavar="MODEL",
                        help="checkpoint (.pt), 'bundled', or 'atlas' (the template registration, "
                             "lobevol segment --method atlas)")
    parser.add_argument("data", metavar="DATA", nargs="?", type=Path,
                        help="folder of phantom cases or of image/label NIfTI pairs")
    parser.add_argument("--phantoms", type=int, metavar="N", help="evaluate on N phantoms made in memory instead")
    parser.add_argument("--seed", type=int, default=900000, help="first phantom seed with --phantoms (default 900000)")
    parser.add_argument("--slice-thickness", type=float, default=None, help="slice thickness of --phantoms (mm)")
    parser.add_argument("--csv", type=Path, default=None, help="write one row per case here")
    parser.add_argument("--record", metavar="DESCRIPTION", default=None,
                        help="store the figures in MODEL's metadata (metrics.%s), with this description "
                             "of the cases" % RECORD_KEY)
    add_device_options(parser, tta=True)
    parser.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from tqdm import tqdm

    from inference.evaluation import format_table, write_csv

    if (args.data is None) == (args.phantoms is None):
        raise ValueError("give either DATA or --phantoms N")
    if args.record is not None and not args.record.strip():
        raise ValueError("--record needs a description of the evaluated cases")
    if args.record is not None and args.model == ATLAS_MODEL:
        raise ValueError("--record keeps figures in a checkpoint; the atlas method has none")
    # One bar over the cases (none when the output is a log file), not one per network pass.
    from inference.factory import load_segmenter

    if args.model == ATLAS_MODEL:
        settings = dataclasses.replace(inference_settings(argparse.Namespace(**{**vars(args), "model": None})),
                                       method=Method.ATLAS)
    else:
        settings = inference_settings(args)
    segmenter = load_segmenter(settings, progress=False)
    cases = _phantom_cases(args) if args.phantoms is not None else _folder_cases(args.data)
    evaluations = []
    for name, evaluate_one in tqdm(cases, desc="evaluating", unit="case", disable=None):
        evaluations.append(evaluate_one(segmenter))
        result = evaluations[-1]
        tqdm.write(f"{name}: {result.slice_thickness_mm:.3g} mm slices, mean Dice "
                   f"{sum(result.dice.values()) / len(result.dice):.4f}, total error {result.total_error_percent:+.2f} %")
    print(format_table(evaluations))
    if args.csv:
        print(f"per-case figures: {write_csv(args.csv, evaluations)}")
    if args.record is not None:
        _record(args, evaluations)
    return 0


def _record(args: argparse.Namespace, evaluations) -> None:
    from inference.checkpoint import BUNDLED_CHECKPOINT, record_metrics
    from inference.evaluation import evaluation_record

    path = BUNDLED_CHECKPOINT if args.model == "bundled" else Path(args.model)
    data = (str(args.data) if args.data is not None else
            f"{args.phantoms} phantoms made in memory from seed {args.seed}"
            + (f", {args.slice_thickness:g} mm slices" if args.slice_thickness else ""))
    record = evaluation_record(evaluations, args.record.strip(), data, args.tta, args.refine_surface)
    meta = record_metrics(path, RECORD_KEY, record)
    print(f"figures recorded in {path} (metrics.{RECORD_KEY}; weights {meta.weights_sha256[:12]} unchanged)")


def _phantom_cases(args):
    from inference.phantoms.generator import make_phantom

    if args.phantoms < 1:
        raise ValueError("--phantoms must be at least 1")

    def case(seed: int):
        def evaluate_one(segmenter):
            phantom = make_phantom(seed, slice_thickness_mm=args.slice_thickness)
            return _evaluate_image(segmenter, f"phantom_{seed}", phantom.image, phantom.labels)
        return f"phantom_{seed}", evaluate_one

    return [case(args.seed + i) for i in range(args.phantoms)]


def _folder_cases(folder: Path):
    from inference.training import find_image_label_pairs, load_pair

    if not folder.is_dir():
        raise FileNotFoundError(f"evaluation data folder {folder} does not exist")
    dicom_cases = sorted(p for p in folder.iterdir() if (p / "dicom").is_dir() and (p / "labels.nii.gz").is_file())
    if dicom_cases:
        return [(p.name, lambda s, p=p: _evaluate_dicom_case(s, p)) for p in dicom_cases]
    return [(name, lambda s, n=name, i=image, m=label: _evaluate_image(s, n, *load_pair(i, m)))
            for name, image, label in find_image_label_pairs(folder)]


def _evaluate_image(segmenter, name: str, image, truth):
    import numpy as np
    import SimpleITK as sitk

    from inference.evaluation import evaluate_labels

    segmentation = segmenter.segment(image)
    voxel = float(np.prod(image.GetSpacing()))
    truth_array = sitk.GetArrayFromImage(truth)
    return evaluate_labels(name, sitk.GetArrayFromImage(segmentation.labels), truth_array, voxel, image.GetSpacing()[2],
                           counted_truth=_counted_on(truth_array, image, segmentation))


def _counted_on(truth, image, segmentation):
    """The true labels (array on ``image``'s grid) counted by the definition on the acquired image,
    with the threshold the method used."""
    import SimpleITK as sitk

    from inference.volumes import countable_labels

    return countable_labels(truth, sitk.GetArrayViewFromImage(image), image.GetSpacing()[::-1],
                            float(segmentation.model["parenchyma_threshold_hu"]))


def _evaluate_dicom_case(segmenter, case_dir: Path):
    """A phantom case through the node's path: DICOM series -> volume -> labels on the source slices."""
    import SimpleITK as sitk

    from inference.evaluation import evaluate_labels
    from node.dicom.files import find_dicom_files
    from node.dicom.volume import load_series_volume

    volume = load_series_volume(find_dicom_files(case_dir / "dicom"))
    segmentation = segmenter.segment(volume.image)
    predicted = volume.labels_on_source_slices(segmentation.labels)
    truth = sitk.GetArrayFromImage(sitk.ReadImage(str(case_dir / "labels.nii.gz")))
    # The truth goes the predicted labels' way: onto the volume's grid, counted there, back to the slices.
    truth_on_grid = sitk.GetArrayFromImage(volume.source_slices_to_grid(truth.astype("uint8"), nearest=True))
    counted = volume.labels_on_source_slices(
        _image_like(_counted_on(truth_on_grid, volume.image, segmentation), volume.image))
    meta = json.loads((case_dir / "meta.json").read_text()) if (case_dir / "meta.json").is_file() else {}
    first = volume.datasets[0]
    thickness = float(meta.get("slice_thickness_mm") or first.SliceThickness)
    pixel_area = float(first.PixelSpacing[0]) * float(first.PixelSpacing[1])
    return evaluate_labels(case_dir.name, predicted, truth, pixel_area * thickness, thickness, counted_truth=counted)


def _image_like(array, reference):
    import SimpleITK as sitk

    image = sitk.GetImageFromArray(array)
    image.CopyInformation(reference)
    return image
