"""Analyse one study: select the series, segment, measure, compare, write every result.

:func:`analyse_study` is the one path from received DICOM instances to the
result objects; the node's worker and ``lobevol segment`` both call it.
:func:`analyse_image` is the same analysis for a plain image (NIfTI...),
which yields only the plain files and the PDF (there is no DICOM study to
write into).

Files written per study (in ``out_dir``):
  seg.dcm, sr.dcm, report.dcm (Encapsulated PDF), key_<view>.dcm (Secondary
  Capture): the DICOM results, all in the source study, each in a new series;
  labels.nii.gz (label map on the analysed volume's grid), volumes.json,
  volumes.csv (``id,sex,age_years,<10 region keys>``) and report.pdf.

Volumes of DICOM studies are counted on the source images (the labels mapped
back onto every source slice, each pixel standing for its slice's extent
along the normal), the geometry the SEG references: a tilted or unevenly
spaced series is resampled for the model, never for measuring.
"""
from __future__ import annotations

import csv
import dataclasses
import json
import logging
import time
from dataclasses import dataclass, field
from enum import Enum
from pathlib import Path
from typing import TYPE_CHECKING, Mapping, Sequence

import pydicom

if TYPE_CHECKING:  # imported where used: the Orthanc plugin's process needs only PipelineSettings (~100 MB less)
    import SimpleITK as sitk

    from inference.predict import RegionSegmenter, Segmentation
    from node.dicom.volume import SeriesVolume
    from normative.compare import NormativeResult

from inference.vocabulary import REGION_KEYS
from node.config import OutputSettings, SegType
from node.dicom.selection import SelectionRules

log = logging.getLogger(__name__)

#: Slices thicker than this make the volumes noticeably less precise (mm).
THICK_SLICE_MM = 3.0


@dataclass(frozen=True)
class PipelineSettings:
    """What to analyse (the ``[selection]`` rules) and which results to write (``[outputs]``)."""

    selection: SelectionRules = field(default_factory=SelectionRules)
    outputs: OutputSettings = field(default_factory=OutputSettings)


class Outcome(str, Enum):
    """How the analysis of one study ended (a ``str`` Enum: prints and compares as its value)."""

    DONE = "done"  # results written
    SKIPPED = "skipped"  # nothing suitable to analyse (no head CT series)
    FAILED = "failed"  # the study could not be analysed; the reason says why

    def __str__(self) -> str:
        return self.value


@dataclass
class StudyOutcome:
    """What happened to one study.

    Attributes:
        study_uid: the study (or, for image input, the case id).
        status: done, skipped (nothing suitable to analyse) or failed.
        reason: plain language; always set when not "done".
        result_files: DICOM objects to send back (SEG, SR, Encapsulated PDF, key images).
        plain_files: NIfTI labels, volumes JSON and CSV, PDF.
        summary: one line, no patient identifiers.
        volumes_row: the CSV row (id, sex, age_years, volumes) when done.
    """

    study_uid: str
    status: Outcome
    reason: str = ""
    result_files: list[Path] = field(default_factory=list)
    plain_files: list[Path] = field(default_factory=list)
    summary: str = ""
    volumes_row: dict | None = None


def analyse_study(instances: Sequence, out_dir: Path, segmenter: RegionSegmenter,
                  settings: PipelineSettings = PipelineSettings()) -> StudyOutcome:
    """Analyse one study's instances and write its results into ``out_dir``.

    Args:
        instances: ``InstanceHeader`` objects of one study (any series mix).
        out_dir: folder for this study's files (created).
        segmenter: a loaded ``inference.predict.Segmenter``.
        settings: selection rules and outputs.

    Returns:
        The outcome; a study without a suitable series is "skipped" and a
        study whose series cannot be analysed is "failed", each with the
        reason (no exception escapes for bad input).
    """
    from node.dicom.demographics import demographics_from
    from node.dicom.selection import select_series
    from node.dicom.volume import load_series_volume
    from node.results.derived import clean_source_text

    if not instances:
        raise ValueError("no instances given")
    study_uids = {h.study_uid for h in instances}
    if len(study_uids) != 1:
        raise ValueError(f"instances of {len(study_uids)} studies given; analyse_study takes one study")
    study_uid = study_uids.pop()
    series: dict[str, list] = {}
    for header in instances:
        series.setdefault(header.series_uid, []).append(header)
    selection = select_series(series, settings.selection)
    if selection.chosen is None:
        reason = f"no suitable head CT series: {selection.summary()}"
        return StudyOutcome(study_uid, Outcome.SKIPPED, reason, summary=f"study {_short(study_uid)}: skipped, {reason}")
    # The best series first; one that cannot make a volume (missing slices...) gives way to the next.
    volume, refused = None, []
    for series_uid in selection.ranked:
        try:
            volume = load_series_volume(series[series_uid], max_gap_factor=settings.outputs.max_gap_factor)
            break
        except ValueError as error:
            refused.append(f"{selection.labels[series_uid]} cannot be analysed: {error}")
    if volume is None:
        reason = "; ".join(refused)
        return StudyOutcome(study_uid, Outcome.FAILED, reason, summary=f"study {_short(study_uid)}: failed, {reason}")
    if refused:
        log.info("study %s: %d better series could not be analysed", _short(study_uid), len(refused))
    refused += [selection.notes[series_uid]] if selection.notes.get(series_uid) else []
    volume.datasets, cleaned = clean_source_text(volume.datasets)
    demographics = demographics_from(volume.datasets[0])
    # Decided before computing: without one Frame of Reference a SEG cannot be placed on the images (and
    # the SR measures the SEG's segments), but volumes and the report are as true as with one.
    unplaced = [] if _frame_of_reference(volume) else [NO_FRAME_OF_REFERENCE]
    for note in (*cleaned, *unplaced, *selection.notes.values()):
        log.warning("study %s: %s", _short(study_uid), note)  # the notes the report carries, for the operator
    try:
        return _analyse_volume(
            volume, study_uid, Path(out_dir), segmenter, settings,
            sex=demographics.sex, age_years=demographics.age_years,
            extra_notes=[*refused, *volume.notes, *demographics.notes, *cleaned, *unplaced], case_id=study_uid,
        )
    except (ValueError, RuntimeError) as error:
        # Our own checks (empty segmentation, labels off the source planes...) name the problem.
        log.warning("study %s failed: %s", _short(study_uid), error)
        reason = f"analysis failed: {error}"
        return StudyOutcome(study_uid, Outcome.FAILED, reason, summary=f"study {_short(study_uid)}: failed, {reason}")


def analyse_image(
    image: sitk.Image,
    out_dir: Path,
    segmenter: RegionSegmenter,
    settings: PipelineSettings = PipelineSettings(),
    *,
    case_id: str,
    sex: str | None = None,
    age_years: float | None = None,
) -> StudyOutcome:
    """Analyse a plain image (HU): plain files and the PDF only (no DICOM study to write into)."""
    if sex is not None and sex not in ("M", "F"):
        raise ValueError(f"sex must be M or F, got {sex!r}")
    if age_years is not None and not 0 <= age_years < 30:
        raise ValueError(f"age {age_years} years is out of range")
    notes = [] if sex is not None and age_years is not None else [
        "sex and/or age not given (use --sex and --age for image input)"
    ]
    return _analyse_volume(None, case_id, Path(out_dir), segmenter, settings, sex=sex, age_years=age_years,
                           extra_notes=notes, case_id=case_id, image=image)


def _analyse_volume(volume: SeriesVolume, study_uid: str, out_dir: Path, segmenter: RegionSegmenter,
                    settings: PipelineSettings, *,
                    sex, age_years, extra_notes: Sequence[str], case_id: str,
                    image: sitk.Image | None = None) -> StudyOutcome:
    """Segment, compare, write. ``volume`` is a SeriesVolume, or None for plain-image input."""
    from normative.compare import compare, load_reference
    from node.results.key_images import render_key_views
    from node.results.pdf_report import StudyHeader, render_pdf_report

    started = time.monotonic()
    image = volume.image if volume is not None else image
    segmentation = segmenter.segment(image)
    label_slices = None
    if volume is not None:
        # Volumes on the source CT geometry (the images the SEG references), not on a grid resampled
        # for tilt or uneven spacing: SEG and SR then agree exactly.
        label_slices = volume.labels_on_source_slices(segmentation.labels)
        segmentation = dataclasses.replace(segmentation, volumes_cm3=volume.region_volumes_cm3(label_slices))
    if not any(segmentation.volumes_cm3.values()):
        raise RuntimeError("the model found no brain region in the image: nothing to measure")
    check = segmentation.cross_check
    normative = compare(segmentation.volumes_cm3, sex, age_years, load_reference(settings.outputs.reference_path),
                        z_threshold=settings.outputs.z_threshold, other_method_volumes=_other_method_volumes(segmentation))
    if check is not None:
        check = check.judged({r.key: r.method_difference_sd for r in normative.regions},
                             {r.key: r.uncertain for r in normative.regions})
        segmentation = dataclasses.replace(segmentation, cross_check=check)
    check_notes = [check.message] if check else []
    if segmentation.model.get("cross_check_error"):
        check_notes.append(f"cross-check not made: {segmentation.model['cross_check_error']}")
    notes = quality_notes(image, segmentation.model, [*extra_notes, *check_notes])
    out_dir.mkdir(parents=True, exist_ok=True)
    outcome = StudyOutcome(study_uid, Outcome.DONE)
    outcome.plain_files += write_plain_files(out_dir, case_id, segmentation, normative, notes)
    views = render_key_views(image, segmentation.labels)
    pdf = None
    if settings.outputs.write_pdf:
        header = StudyHeader.from_dataset(volume.datasets[0]) if volume is not None else StudyHeader()
        pdf = render_pdf_report(normative, segmentation.model, views, header=header, quality_notes=notes,
                                cross_check=check)
        (out_dir / "report.pdf").write_bytes(pdf)
        outcome.plain_files.append(out_dir / "report.pdf")
    if volume is not None:
        outcome.result_files += _write_dicom_results(volume, label_slices, segmentation, normative, views, pdf,
                                                     settings, out_dir)
    outcome.volumes_row = csv_row(case_id, normative.sex, normative.age_years, segmentation.volumes_cm3)
    flagged = [r.key for r in normative.regions if r.flag in ("above", "below")]
    if check is not None and not check.agrees:
        outcome.reason = check.message  # shown by lobevol status beside the done job
    outcome.summary = (
        f"study {_short(study_uid)}: done in {time.monotonic() - started:.0f} s, total "
        f"{normative.total.volume_cm3:.1f} cm3, "
        + (f"{len(flagged)} region(s) outside the normal range" if normative.applicable else "no z-scores")
        + ("" if check is None else f", {check.verdict}")
        + f", {len(outcome.result_files)} DICOM object(s) and {len(outcome.plain_files)} file(s) in {out_dir}"
    )
    return outcome


def _other_method_volumes(segmentation: Segmentation) -> dict[str, float] | None:
    """The cross-check's volumes on the reported volumes' footing: each reported volume less the
    difference the two methods have on their common grid (so the difference is exactly the check's)."""
    check = segmentation.cross_check
    if check is None:
        return None
    return {r.key: max(segmentation.volumes_cm3[r.key] - (r.volume_cm3 - r.other_volume_cm3), 0.0)
            for r in check.regions}


def _write_dicom_results(volume: SeriesVolume, label_slices, segmentation: Segmentation,
                         normative: NormativeResult, views, pdf: bytes | None, settings,
                         out_dir: Path) -> list[Path]:
    """SEG, SR, Encapsulated PDF and key images, as the settings ask.

    ``label_slices``: the labels on every source image (``volume.labels_on_source_slices``).
    """
    from node.results.encapsulated_pdf import build_encapsulated_pdf
    from node.results.key_images import build_overlay_images
    from node.results.seg import build_seg
    from node.results.sr import build_sr

    written = []
    source = volume.datasets[0]
    if settings.outputs.seg_type != SegType.NONE and _frame_of_reference(volume):
        seg = build_seg(volume, label_slices, segmentation.model, labelmap=settings.outputs.seg_type == SegType.LABELMAP)
        written.append(_save(seg, out_dir / "seg.dcm"))
        if settings.outputs.write_sr:
            sr = build_sr(volume, seg, normative, segmentation.model,
                          cross_check=segmentation.cross_check)
            written.append(_save(sr, out_dir / "sr.dcm"))
    if pdf is not None:
        wrapped = build_encapsulated_pdf(pdf, source, source_instances=volume.datasets)
        written.append(_save(wrapped, out_dir / "report.dcm"))
    if settings.outputs.write_overlays:
        for view, image in zip(views, build_overlay_images(views, normative, source)):
            written.append(_save(image, out_dir / f"key_{view.name}.dcm"))
    return written


NO_FRAME_OF_REFERENCE = ("no DICOM SEG or SR: the source images have no (single) Frame of Reference UID, "
                         "so a segmentation cannot be placed on them; volumes and report only")


def _frame_of_reference(volume) -> str | None:
    """The Frame of Reference UID every source image shares, or None (missing, empty or mixed)."""
    uids = {str(ds.get("FrameOfReferenceUID") or "").strip() for ds in volume.datasets}
    return uids.pop() if len(uids) == 1 and "" not in uids else None


def _save(dataset: pydicom.Dataset, path: Path) -> Path:
    dataset.save_as(path)
    return path


def quality_notes(image: sitk.Image, model: Mapping[str, object], notes: Sequence[str]) -> list[str]:
    """Plain-language notes for the report: input notes, thick slices, phantom-trained model."""
    result = list(notes)
    thickness = image.GetSpacing()[2]
    if thickness > THICK_SLICE_MM:
        result.append(f"thick slices ({thickness:.1f} mm): partial-volume effects make volumes less precise")
    if "phantom" in str(model.get("trained_on", "")).lower():
        result.append("the model was trained on synthetic phantoms, not on patient scans")
    return result


def csv_row(case_id: str, sex: str | None, age_years: float | None, volumes_cm3: Mapping[str, float]) -> dict:
    """One row of volumes.csv (the format ``lobevol normative fit/stats`` read)."""
    row = {"id": case_id, "sex": sex or "", "age_years": "" if age_years is None else f"{age_years:.3f}"}
    row.update({key: f"{volumes_cm3[key]:.3f}" for key in REGION_KEYS})
    return row


CSV_COLUMNS = ("id", "sex", "age_years", *REGION_KEYS)


def write_volumes_csv(path: Path, rows: Sequence[dict]) -> Path:
    """Write volume rows with the header ``id,sex,age_years,<10 region keys>``."""
    with open(path, "w", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=CSV_COLUMNS)
        writer.writeheader()
        writer.writerows(rows)
    return path


def write_plain_files(out_dir: Path, case_id: str, segmentation: Segmentation, normative: NormativeResult,
                      notes: Sequence[str]) -> list[Path]:
    """labels.nii.gz, volumes.json and volumes.csv for research use."""
    import SimpleITK as sitk

    labels_path = out_dir / "labels.nii.gz"
    sitk.WriteImage(segmentation.labels, str(labels_path), useCompression=True)
    summary = {
        "id": case_id,
        "volumes_cm3": {key: segmentation.volumes_cm3[key] for key in REGION_KEYS},
        "normative": normative.to_dict(),
        "model": _jsonable(segmentation.model),
        "quality_notes": list(notes),
        "timings_s": segmentation.timings_s,
    }
    if segmentation.cross_check is not None:
        summary["cross_check"] = segmentation.cross_check.to_dict()
    json_path = out_dir / "volumes.json"
    json_path.write_text(json.dumps(summary, indent=2))
    row = csv_row(case_id, normative.sex, normative.age_years, segmentation.volumes_cm3)
    return [labels_path, json_path, write_volumes_csv(out_dir / "volumes.csv", [row])]


def _jsonable(value):
    if isinstance(value, Mapping):
        return {str(k): _jsonable(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_jsonable(v) for v in value]
    if isinstance(value, (str, int, float, bool)) or value is None:
        return value
    return str(value)


def _short(uid: str) -> str:
    """A UID shortened for one-line summaries (its last 12 characters)."""
    return uid if len(uid) <= 16 else f"...{uid[-12:]}"
