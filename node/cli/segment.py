"""``lobevol segment``: analyse DICOM studies (or one image) offline, without the node."""
from __future__ import annotations

import argparse
from pathlib import Path

from node.cli._options import add_config_option, add_device_options, inference_settings
from node.config import METHODS, SEG_TYPES

IMAGE_SUFFIXES = (".nii", ".nii.gz", ".mha", ".mhd", ".nrrd")

EPILOG = """\
examples:
  lobevol segment /media/cd/DICOM --out results
      every study found under the folder (any nesting, any file names; non-DICOM
      files are ignored): results/<study uid>/{seg,sr,report,key_*}.dcm, report.pdf,
      labels.nii.gz, volumes.json, volumes.csv, and results/volumes.csv for all studies
  lobevol segment scan.nii.gz --out results --sex F --age 2.1
      a NIfTI image in HU: only the plain files and the PDF (no DICOM study to write into)
  lobevol segment incoming/ --out results --seg labelmap --no-overlays --z-threshold 2.5
  lobevol segment /media/cd/DICOM --dry-run
      which series of each study would be analysed, and why the others would not
  lobevol segment /media/cd/DICOM --out results --method atlas
      regions by template registration instead of the network (the SEG, SR and PDF say which)
  lobevol segment /media/cd/DICOM --out results --cross-check
      the network's regions, checked against the atlas's (agreement per region in every result)
  lobevol segment incoming/ --out results --config config.ini
      the node's [selection] rules and [outputs] settings (options given here win)
  lobevol segment /data/cohort --queue --config /etc/lobevol/config.ini --out cohort-results
      put every study on the job store's queue for the running 'lobevol worker' processes
      (any machine), follow their progress, and collect results/<study uid>/ and one
      volumes.csv; run it again after an interruption: finished studies are not redone
      (the folder must be on the file system the workers share; the workers' [outputs] apply)

Series selection: per study, the thinnest soft-tissue head CT series (ORIGINAL axial,
slices <= 5 mm, covering a head) is analysed; the summary says why others were skipped.
A tilted or unevenly spaced series is resampled for the model; volumes are counted on
the source images, which the SEG references.

Each study gets one summary line. The exit status is 1 when no study could be
analysed; the message gives each study's reason (e.g. why no series was chosen).
Not for clinical use: the bundled model was trained on synthetic phantoms.
"""


def register(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser(
        "segment",
        help="analyse DICOM studies or an image: SEG, SR, PDF, key images, volumes",
        description=(
            "Find the head CT studies under INPUT, pick each study's best head CT series, segment the "
            "10 brain regions, measure their volumes, compare them with the normative reference and "
            "write the results: DICOM SEG, TID 1500 SR, PDF report (also as Encapsulated PDF) and "
            "key images, all in the source study; plus the label map (NIfTI) and volumes (JSON, CSV)."
        ),
        epilog=EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("input", metavar="INPUT", type=Path,
                        help="folder of DICOM files (one or several studies), or an image file (.nii, .nii.gz, .mha, .nrrd)")
    parser.add_argument("--out", type=Path, metavar="DIR", help="output folder (created; required unless --dry-run)")
    parser.add_argument("--queue", action="store_true",
                        help="analyse on the shared job store's workers instead of here (needs --config; "
                             "resumable: studies already done are collected, not redone)")
    parser.add_argument("--dry-run", action="store_true",
                        help="only list each study's series and which one would be analysed, with the reasons "
                             "(no model, nothing written)")
    parser.add_argument("--method", choices=METHODS, default=None,
                        help="what makes the regions: network (default) or atlas (the bundled adult CT template "
                             "registered with ANTs, its lobar atlas warped onto the scan; about 15-30 s a scan)")
    parser.add_argument("--cross-check", action=argparse.BooleanOptionalAction, default=None,
                        help="run the other method too and report the per-region agreement (Dice, volume "
                             "difference in %% and in reference SDs) in volumes.json, the PDF and the SR; 'methods "
                             "disagree: review the regions' when a region's volumes differ by more than one "
                             "reference SD or its Dice is below 0.2, and such a region's z-score is marked uncertain "
                             "(default: the config file's [inference] cross_check, else off)")
    parser.add_argument("--model", default=None, help="checkpoint (default: the bundled model; network only)")
    add_device_options(parser, tta=True)
    add_config_option(parser, default=None,
                      help="take the [selection] and [outputs] settings of a node config file (config.ini); "
                           "the options below override them")
    parser.add_argument("--seg", choices=SEG_TYPES, default=None,
                        help="DICOM SEG type (default binary: what most viewers display)")
    parser.add_argument("--no-sr", action="store_true", help="do not write the TID 1500 SR")
    parser.add_argument("--no-pdf", action="store_true", help="do not write the PDF report")
    parser.add_argument("--no-overlays", action="store_true", help="do not write the Secondary Capture key images")
    parser.add_argument("--reference", type=Path, default=None, help="normative reference file (default: bundled)")
    parser.add_argument("--z-threshold", type=float, default=None, help="flag volumes with |z| above this (default 2)")
    parser.add_argument("--max-gap-factor", type=float, default=None, metavar="F",
                        help="refuse a series whose largest slice gap exceeds F x its median spacing (default 2)")
    parser.add_argument("--sex", choices=("M", "F"), default=None, help="patient sex, for image input")
    parser.add_argument("--age", type=float, default=None, metavar="YEARS", help="age at scan in years, for image input")
    parser.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    settings = _settings(args)
    if not args.input.exists():
        raise FileNotFoundError(f"input {args.input} does not exist")
    if args.dry_run:
        if args.input.is_file():
            raise ValueError("--dry-run lists the series of DICOM studies: give a folder")
        return _list_selection(args, settings)
    if args.out is None:
        raise ValueError("--out DIR is required (the folder for the results)")
    if args.input.is_file():
        if not args.input.name.lower().endswith(IMAGE_SUFFIXES):
            raise ValueError(
                f"{args.input} is a file but not an image ({', '.join(IMAGE_SUFFIXES)}); "
                "give a folder for DICOM input"
            )
        return _segment_image(args, settings)
    if args.sex or args.age is not None:
        raise ValueError("--sex and --age apply to image input; DICOM studies carry their own")
    if args.queue:
        return _queue_cohort(args)
    return _segment_dicom(args, settings)


def _settings(args: argparse.Namespace):
    """PipelineSettings: the config file's (or the defaults), with the options given on the command line."""
    import dataclasses

    from node.config import NodeConfig, load_config
    from node.pipeline import PipelineSettings

    config = load_config(args.config) if args.config is not None else NodeConfig()
    changes = {}
    if args.seg is not None:
        changes["seg_type"] = args.seg
    if args.no_sr or args.seg == "none":
        changes["write_sr"] = False
    if args.no_pdf:
        changes["write_pdf"] = False
    if args.no_overlays:
        changes["write_overlays"] = False
    for option, field_name in (("reference", "reference_path"), ("z_threshold", "z_threshold"),
                               ("max_gap_factor", "max_gap_factor")):
        if getattr(args, option) is not None:
            changes[field_name] = getattr(args, option)
    return PipelineSettings(config.selection, dataclasses.replace(config.outputs, **changes))


def _segmenter(args):
    """The segmenter of the options; method and cross-check default to the config file's [inference]."""
    base = None
    if getattr(args, "config", None) is not None:
        from node.config import load_config

        base = load_config(args.config).inference
    from inference.factory import load_segmenter

    return load_segmenter(inference_settings(args, base), progress=True)


def _segment_image(args, settings) -> int:
    import SimpleITK as sitk

    from node.pipeline import analyse_image

    image = sitk.ReadImage(str(args.input))
    case_id = args.input.name.split(".")[0]
    outcome = analyse_image(image, args.out / case_id, _segmenter(args), settings, case_id=case_id,
                            sex=args.sex, age_years=args.age)
    print(outcome.summary)
    return 0


def _list_selection(args, settings) -> int:
    """Print every study's series with the selection's verdict on each."""
    from node.dicom.files import find_dicom_files, group_by_study
    from node.dicom.selection import select_series

    studies = group_by_study(find_dicom_files(args.input))
    if not studies:
        raise ValueError(f"no DICOM files found under {args.input}")
    chosen = 0
    for study_uid, series in studies.items():
        selection = select_series(series, settings.selection)
        verdict = f"would analyse {selection.labels[selection.chosen]}" if selection.chosen else "nothing to analyse"
        print(f"study {study_uid}: {verdict}")
        for uid in sorted(selection.reasons, key=lambda uid: uid != selection.chosen):
            print(f"  {selection.labels[uid]}, {len(series[uid])} instance(s): {selection.reasons[uid]}")
        chosen += selection.chosen is not None
    if not chosen:
        raise RuntimeError(f"none of the {len(studies)} study(ies) has a series to analyse")
    return 0


def _segment_dicom(args, settings) -> int:
    from tqdm import tqdm

    from node.dicom.files import find_dicom_files, group_by_study
    from node.pipeline import Outcome, analyse_study, write_volumes_csv

    studies = group_by_study(find_dicom_files(args.input))
    if not studies:
        raise ValueError(f"no DICOM files found under {args.input}")
    segmenter = _segmenter(args)
    outcomes = []
    for study_uid, series in tqdm(studies.items(), desc="studies", unit="study", disable=len(studies) < 2):
        instances = [header for headers in series.values() for header in headers]
        outcome = analyse_study(instances, args.out / study_uid, segmenter, settings)
        tqdm.write(outcome.summary)
        outcomes.append(outcome)
    done = [o for o in outcomes if o.status == Outcome.DONE]
    if len(studies) > 1 and done:
        path = write_volumes_csv(args.out / "volumes.csv", [o.volumes_row for o in done])
        print(f"volumes of {len(done)} studies: {path}")
    if not done:
        reasons = "; ".join(f"study {o.study_uid}: {o.reason}" for o in outcomes)
        raise RuntimeError(f"no study could be analysed ({reasons})")
    return 0


def _queue_cohort(args) -> int:
    """Queue each study of the folder on the job store, wait for the workers, collect results and volumes.csv."""
    import csv
    import shutil
    import time

    from tqdm import tqdm

    from node.config import load_config
    from node.dicom.files import find_dicom_files, group_by_study
    from node.pipeline import write_volumes_csv
    from node.service.jobs import FINAL_STATES, JobStore
    from node.service.spool import Spool

    if args.config is None:
        raise ValueError("--queue needs --config: the node configuration naming the job store and its folders")
    config = load_config(args.config)
    jobs, spool = JobStore(config.storage.database), Spool(config.storage.spool_dir)
    studies = group_by_study(find_dicom_files(args.input))
    if not studies:
        raise ValueError(f"no DICOM files found under {args.input}")
    cohort, queued = str(args.input.resolve()), {}
    for study_uid, series in studies.items():
        paths = sorted(str(Path(h.path).resolve()) for headers in series.values() for h in headers)
        job_id, created = jobs.queue_cohort_study(study_uid, paths, cohort)
        if created or not jobs.get(job_id).input_ready:
            spool.freeze_job_input(job_id, [Path(p) for p in paths])
            jobs.mark_input_ready(job_id)
        queued[study_uid] = job_id
    now, runners = jobs.workers()
    if not any(r.stopped_at is None and now - r.heartbeat_at < 15 and r.role != "orthanc" for r in runners):
        print("no runner is running on this job store (see lobevol status): the studies wait in its queue")
    print(f"{len(queued)} study(ies) of {cohort} on the queue of {jobs.describe()}; Ctrl-C stops waiting, "
          "not the analyses (run the command again to collect)")
    with tqdm(total=len(queued), desc="studies", unit="study") as progress:
        while True:
            ended = sum(jobs.get(job_id).state in FINAL_STATES for job_id in queued.values())
            progress.update(ended - progress.n)
            if ended == len(queued):
                break
            time.sleep(1.0)
    rows, problems = [], []
    args.out.mkdir(parents=True, exist_ok=True)
    for study_uid, job_id in queued.items():
        job = jobs.get(job_id)
        if job.state != "done" or not job.results_dir:
            problems.append(f"study {study_uid}: {job.state}, {job.reason}")
            continue
        shutil.copytree(job.results_dir, args.out / study_uid, dirs_exist_ok=True)
        with open(Path(job.results_dir) / "volumes.csv", newline="") as handle:
            rows += list(csv.DictReader(handle))
    for problem in problems:
        print(problem)
    if not rows:
        raise RuntimeError(f"no study of the cohort was analysed ({len(problems)} not done)")
    path = write_volumes_csv(args.out / "volumes.csv", rows)
    print(f"volumes of {len(rows)} of {len(queued)} studies: {path}")
    return 0
