"""One-page PDF report of the brain-region volumes (reportlab).

Contents, top to bottom: title and the not-for-clinical-use banner; patient
and study (name, ID, sex, age at scan, study date, accession); the three
key images with the regions coloured over the CT; the volume table (region,
volume, reference mean and SD, z-score, percentile, flag) beside a chart of
the z-scores against the normal band; the lobe asymmetry indices; quality
notes; model and reference versions; the disclaimer.
"""
from __future__ import annotations

import io
from dataclasses import dataclass
from datetime import datetime
from typing import TYPE_CHECKING, Sequence

import pydicom
from reportlab.graphics.shapes import Drawing, Line, Rect, String
from reportlab.lib import colors
from reportlab.lib.enums import TA_LEFT
from reportlab.lib.pagesizes import A4
from reportlab.lib.styles import ParagraphStyle
from reportlab.lib.units import mm
from reportlab.platypus import Image as PdfImage
from reportlab.platypus import Paragraph, SimpleDocTemplate, Spacer, Table, TableStyle

from inference.vocabulary import REGIONS, Method, region_by_key
from inference.vocabulary import __version__
from normative.report_styles import paragraph_styles
from node.results.derived import METHOD_DESCRIPTIONS, segmentation_method
from node.results.key_images import KeyView

if TYPE_CHECKING:
    from inference.cross_check import CrossCheck
    from normative.compare import NormativeResult

DISCLAIMER = (
    "Not for clinical use. Research demonstration: the segmentation model was trained on synthetic "
    "phantoms, not on labelled patient scans; volumes and z-scores may be wrong. Do not base any "
    "diagnosis or treatment on this report."
)
_FLAG_COLOURS = {"above": colors.HexColor("#fde2e1"), "below": colors.HexColor("#dde9fb"),
                 "uncertain": colors.HexColor("#fff1c2")}
_Z_AXIS_LIMIT = 4.0
# The z chart's bars line up with the volume table's rows.
_TABLE_HEADER_H = 7.5 * mm
_TABLE_ROW_H = 4.4 * mm


@dataclass(frozen=True)
class StudyHeader:
    """What the report says about the patient and the examination (None = not available)."""

    patient_name: str | None = None
    patient_id: str | None = None
    study_date: str | None = None
    accession_number: str | None = None
    study_description: str | None = None
    series_description: str | None = None

    @classmethod
    def from_dataset(cls, dataset: pydicom.Dataset) -> "StudyHeader":
        """Read the header fields from a source image."""

        def text(keyword: str) -> str | None:
            value = dataset.get(keyword)
            return _shortened(str(value).strip()) or None if value is not None else None

        date = text("StudyDate")
        if date and len(date) == 8 and date.isdigit():
            date = f"{date[:4]}-{date[4:6]}-{date[6:]}"
        name = text("PatientName")
        return cls(
            patient_name=name.replace("^", " ").strip() if name else None,
            patient_id=text("PatientID"),
            study_date=date,
            accession_number=text("AccessionNumber"),
            study_description=text("StudyDescription"),
            series_description=text("SeriesDescription"),
        )


#: Longest header text shown in the report's table (characters); longer values end in an ellipsis.
HEADER_TEXT_MAX = 64


def _shortened(text: str) -> str:
    return text if len(text) <= HEADER_TEXT_MAX else text[:HEADER_TEXT_MAX - 1] + "\u2026"


def render_pdf_report(
    normative: NormativeResult,
    model: dict,
    views: Sequence[KeyView],
    *,
    header: StudyHeader = StudyHeader(),
    quality_notes: Sequence[str] = (),
    created: datetime | None = None,
    cross_check: CrossCheck | None = None,
) -> bytes:
    """Render the report and return the PDF bytes.

    Args:
        normative: ``NormativeResult`` (volumes, reference, z-scores, flags,
            sex and age used, notes).
        model: the model description (``Segmentation.model``).
        views: key images from :func:`node.results.key_images.render_key_views`.
        header: patient and study fields (empty for NIfTI input).
        quality_notes: plain-language notes about the input (tilt corrected,
            thick slices, ...); the normative notes are added automatically.
        created: report time (default now).
    """
    styles = _styles()
    buffer = io.BytesIO()
    document = SimpleDocTemplate(
        buffer, pagesize=A4, leftMargin=12 * mm, rightMargin=12 * mm, topMargin=10 * mm, bottomMargin=10 * mm,
        title="Brain region volumetry report", author="lobevol", subject="Head CT brain-region volumes",
    )
    width = A4[0] - 24 * mm
    story = [
        _title(styles, width),
        Spacer(1, 2 * mm),
        _header_table(header, normative, styles, width),
        Spacer(1, 3 * mm),
        _images_row(views, width),
        Spacer(1, 3 * mm),
        _results_row(normative, styles, width),
        Spacer(1, 2 * mm),
        _asymmetry_table(normative, styles),
        Spacer(1, 2 * mm),
        *_notes(quality_notes, normative, styles),
        Spacer(1, 2 * mm),
        *_cross_check_table(cross_check, styles),
        _method_line(model, styles),
        _provenance(normative, model, styles, created or datetime.now()),
        Spacer(1, 2 * mm),
        Paragraph(DISCLAIMER, styles["disclaimer"]),
    ]
    document.build(story)
    return buffer.getvalue()


def _styles() -> dict[str, ParagraphStyle]:
    return paragraph_styles(
        title=dict(fontName="Helvetica-Bold", fontSize=15, leading=18),
        banner=dict(fontName="Helvetica-Bold", fontSize=8.5, textColor=colors.white, leading=11),
        cell=dict(fontSize=8, leading=9.6),
        cellbold=dict(fontName="Helvetica-Bold", fontSize=8, leading=9.6),
        heading=dict(fontName="Helvetica-Bold", fontSize=9.5, leading=12, spaceAfter=1),
        small=dict(fontSize=7.5, leading=9, alignment=TA_LEFT),
        disclaimer=dict(fontName="Helvetica-Oblique", fontSize=7.5, leading=9, textColor=colors.HexColor("#8b0000")),
    )


def _title(styles, width: float) -> Table:
    title = Paragraph("Brain region volumetry &mdash; head CT", styles["title"])
    version = Paragraph(f"lobevol {__version__}", styles["cell"])
    banner = Paragraph(
        "NOT FOR CLINICAL USE &mdash; demonstration model trained on synthetic phantoms", styles["banner"]
    )
    table = Table([[title, version], [banner, ""]], colWidths=[width - 30 * mm, 30 * mm])
    table.setStyle(TableStyle([
        ("SPAN", (0, 1), (1, 1)),
        ("BACKGROUND", (0, 1), (1, 1), colors.HexColor("#b22222")),
        ("ALIGN", (1, 0), (1, 0), "RIGHT"),
        ("VALIGN", (0, 0), (-1, -1), "MIDDLE"),
        ("LEFTPADDING", (0, 0), (-1, -1), 3),
    ]))
    return table


def _header_table(header: StudyHeader, normative, styles, width: float) -> Table:
    missing = "not available"
    sex = {"M": "male", "F": "female"}.get(normative.sex or "", missing)
    age = f"{normative.age_years:.2f} years" if normative.age_years is not None else missing
    cells = [
        ("Patient", header.patient_name or missing, "Patient ID", header.patient_id or missing),
        ("Sex", sex, "Age at scan", age),
        ("Study date", header.study_date or missing, "Accession", header.accession_number or missing),
        ("Study", header.study_description or missing, "Series", header.series_description or missing),
    ]
    rows = [
        [Paragraph(a, styles["cellbold"]), Paragraph(_escape(b), styles["cell"]),
         Paragraph(c, styles["cellbold"]), Paragraph(_escape(d), styles["cell"])]
        for a, b, c, d in cells
    ]
    table = Table(rows, colWidths=[22 * mm, width / 2 - 22 * mm, 24 * mm, width / 2 - 24 * mm])
    table.setStyle(TableStyle([
        ("BOX", (0, 0), (-1, -1), 0.5, colors.grey),
        ("BACKGROUND", (0, 0), (-1, -1), colors.HexColor("#f4f4f4")),
        ("TOPPADDING", (0, 0), (-1, -1), 1), ("BOTTOMPADDING", (0, 0), (-1, -1), 1),
    ]))
    return table


def _images_row(views: Sequence[KeyView], width: float) -> Table:
    if not views:
        raise ValueError("the report needs the key views (axial, coronal, sagittal)")
    cell_w = width / len(views)
    cells, captions = [], []
    for view in views:
        png = io.BytesIO()
        view.image.save(png, format="PNG")
        png.seek(0)
        scale = min((cell_w - 3 * mm) / view.image.width, 68 * mm / view.image.height)
        cells.append(PdfImage(png, width=view.image.width * scale, height=view.image.height * scale))
        captions.append(Paragraph(f"<b>{view.name.capitalize()}</b> (radiological convention, brain window)",
                                  _styles()["small"]))
    table = Table([cells, captions], colWidths=[cell_w] * len(views))
    table.setStyle(TableStyle([
        ("ALIGN", (0, 0), (-1, -1), "CENTER"), ("VALIGN", (0, 0), (-1, 0), "MIDDLE"),
        ("BACKGROUND", (0, 0), (-1, 0), colors.black),
        ("TOPPADDING", (0, 0), (-1, -1), 1), ("BOTTOMPADDING", (0, 0), (-1, -1), 1),
    ]))
    return table


def _fmt(value: float | None, pattern: str) -> str:
    return "–" if value is None else format(value, pattern)


def _results_row(normative, styles, width: float) -> Table:
    chart_w = 62 * mm
    table = _volume_table(normative, styles, width - chart_w - 2 * mm)
    chart = _z_chart(normative, chart_w)
    row = Table([[table, chart]], colWidths=[width - chart_w, chart_w])
    row.setStyle(TableStyle([("VALIGN", (0, 0), (-1, -1), "TOP"), ("LEFTPADDING", (0, 0), (-1, -1), 0),
                             ("RIGHTPADDING", (0, 0), (-1, -1), 0)]))
    return row


def _volume_table(normative, styles, width: float) -> Table:
    header = ["Region", "Volume\ncm3", "Ref. mean\ncm3", "Ref. SD\ncm3", "z", "Percentile", "Flag"]
    with_range = any(result.z_range is not None for result in normative.regions)
    if with_range:
        header.append("z of the\n2 methods")
    rows = [header]
    flags = []
    for result in (*normative.regions, normative.total):
        name = "Total (10 regions)" if result.key == "total" else region_by_key(result.key).name
        # An uncertain z-score (the two methods differ by more than one SD) is marked, never hidden.
        row = [
            name, f"{result.volume_cm3:.1f}", _fmt(result.reference_mean_cm3, ".1f"),
            _fmt(result.reference_sd_cm3, ".1f"), _fmt(result.z_score, "+.2f") + ("?" if result.uncertain else ""),
            _fmt(result.percentile, ".1f"), (result.flag or "–") + ("?" if result.uncertain else ""),
        ]
        if with_range:
            row.append("–" if result.z_range is None else f"{result.z_range[0]:+.1f}..{result.z_range[1]:+.1f}")
        rows.append(row)
        flags.append("uncertain" if result.uncertain else result.flag)
    columns = len(header) - 1
    column_w = 14.5 * mm if columns == 6 else 13.5 * mm
    name_w = width - columns * column_w
    table = Table(rows, colWidths=[name_w] + [column_w] * columns, repeatRows=1,
                  rowHeights=[_TABLE_HEADER_H] + [_TABLE_ROW_H] * (len(rows) - 1))
    style = [
        ("FONT", (0, 0), (-1, 0), "Helvetica-Bold", 7.5),
        ("FONT", (0, 1), (-1, -1), "Helvetica", 8),
        ("FONT", (0, -1), (-1, -1), "Helvetica-Bold", 8),
        ("ALIGN", (1, 0), (-1, -1), "RIGHT"),
        ("LINEBELOW", (0, 0), (-1, 0), 0.6, colors.black),
        ("LINEABOVE", (0, -1), (-1, -1), 0.6, colors.black),
        ("TOPPADDING", (0, 0), (-1, -1), 1.2), ("BOTTOMPADDING", (0, 0), (-1, -1), 1.2),
        ("VALIGN", (0, 0), (-1, -1), "MIDDLE"),
    ]
    for row_index, flag in enumerate(flags, start=1):
        if flag in _FLAG_COLOURS:
            style.append(("BACKGROUND", (0, row_index), (-1, row_index), _FLAG_COLOURS[flag]))
    for row_index, region in enumerate(REGIONS, start=1):
        style.append(("LINEBEFORE", (0, row_index), (0, row_index), 3, colors.Color(*(c / 255 for c in region.rgb))))
    table.setStyle(TableStyle(style))
    return table


def _z_chart(normative, width: float) -> Drawing:
    """Horizontal z-score bars, one per region and the total, over the normal band."""
    results = (*normative.regions, normative.total)
    row_h, top, bottom = _TABLE_ROW_H, _TABLE_HEADER_H, 9 * mm
    height = top + bottom + row_h * len(results)
    drawing = Drawing(width, height)
    left, right = 4 * mm, width - 4 * mm
    to_x = lambda z: left + (max(-_Z_AXIS_LIMIT, min(_Z_AXIS_LIMIT, z)) + _Z_AXIS_LIMIT) / (2 * _Z_AXIS_LIMIT) * (right - left)  # noqa: E731
    threshold = normative.z_threshold
    plot_top, plot_bottom = height - top, bottom
    drawing.add(String(width / 2, height - 4.5 * mm, "z-score vs reference", fontName="Helvetica-Bold",
                       fontSize=8, textAnchor="middle"))
    drawing.add(Rect(to_x(-threshold), plot_bottom, to_x(threshold) - to_x(-threshold), plot_top - plot_bottom,
                     fillColor=colors.HexColor("#e3f1e3"), strokeColor=None))
    for z in range(-int(_Z_AXIS_LIMIT), int(_Z_AXIS_LIMIT) + 1):
        drawing.add(Line(to_x(z), plot_bottom, to_x(z), plot_top, strokeColor=colors.HexColor("#cccccc"),
                         strokeWidth=0.8 if z == 0 else 0.3))
        drawing.add(String(to_x(z), plot_bottom - 3.2 * mm, f"{z:+d}" if z else "0", fontSize=6.5,
                           textAnchor="middle"))
    drawing.add(String(width / 2, 1 * mm, f"green band: normal range |z| <= {threshold:g}", fontSize=6.5,
                       textAnchor="middle", fillColor=colors.HexColor("#2e7d32")))
    if all(result.z_score is None for result in results):
        middle = (plot_top + plot_bottom) / 2
        drawing.add(Rect(left, middle - 2.5 * mm, right - left, 6 * mm, fillColor=colors.white, strokeColor=None))
        drawing.add(String(width / 2, middle, "no z-scores: see quality notes",
                           fontSize=7.5, textAnchor="middle", fillColor=colors.grey))
        return drawing
    for index, result in enumerate(results):
        y = plot_top - (index + 1) * row_h + 0.9 * mm
        colour = colors.black if result.key == "total" else colors.Color(*(c / 255 for c in region_by_key(result.key).rgb))
        if result.z_score is None:
            drawing.add(String(to_x(0) + 1 * mm, y + 0.5 * mm, "no z", fontSize=6, fillColor=colors.grey))
            continue
        x0, x1 = sorted((to_x(0), to_x(result.z_score)))
        drawing.add(Rect(x0, y, max(x1 - x0, 0.6), row_h - 1.6 * mm, fillColor=colour, strokeColor=colors.black,
                         strokeWidth=0.3))
        if abs(result.z_score) > _Z_AXIS_LIMIT:  # off the axis: say so
            drawing.add(String(x1 + 0.5 * mm if result.z_score > 0 else x0 - 0.5 * mm, y, f"{result.z_score:+.1f}",
                               fontSize=6, textAnchor="start" if result.z_score > 0 else "end"))
    return drawing


def _asymmetry_table(normative, styles) -> Table:
    rows = [["Asymmetry index (L - R) / mean", "Index", "Ref. mean", "Ref. SD", "z", "Flag"]]
    for item in normative.asymmetry:
        rows.append([item.structure.capitalize(), f"{item.index:+.3f}", _fmt(item.reference_mean, "+.3f"),
                     _fmt(item.reference_sd, ".3f"), _fmt(item.z_score, "+.2f"), item.flag or "–"])
    table = Table(rows, colWidths=[58 * mm, 18 * mm, 18 * mm, 18 * mm, 16 * mm, 16 * mm])
    table.setStyle(TableStyle([
        ("FONT", (0, 0), (-1, 0), "Helvetica-Bold", 7.5), ("FONT", (0, 1), (-1, -1), "Helvetica", 8),
        ("ALIGN", (1, 0), (-1, -1), "RIGHT"), ("LINEBELOW", (0, 0), (-1, 0), 0.6, colors.black),
        ("TOPPADDING", (0, 0), (-1, -1), 1), ("BOTTOMPADDING", (0, 0), (-1, -1), 1),
    ]))
    return table


def _notes(quality_notes: Sequence[str], normative, styles) -> list:
    notes = [*quality_notes, *normative.notes]
    if not normative.applicable:
        notes.append("the reference does not apply to this patient: z-scores and flags are not reported")
    if not notes:
        notes = ["none"]
    items = "<br/>".join(f"&bull; {_escape(note)}" for note in notes)
    return [Paragraph("Quality notes", styles["heading"]), Paragraph(items, styles["small"])]


def _options_text(model: dict) -> str:
    """", flip TTA on, surface refinement off" for the prediction options the model dict records."""
    names = {"test_time_augmentation": "flip TTA", "surface_refinement": "surface refinement"}
    return "".join(f", {name} {'on' if model[key] else 'off'}" for key, name in names.items() if key in model)


def _cross_check_table(cross_check, styles) -> list:
    """The cross-check (``inference.cross_check.CrossCheck``): verdict and a table per region; [] without one."""
    if cross_check is None:
        return []
    judged = cross_check.judged_in_sd
    rows = [["Region", "Dice", f"{cross_check.method} cm3", f"{cross_check.other_method} cm3", "difference"]
            + (["SD apart"] if judged else [])]
    for region in cross_check.regions:
        difference = region.volume_difference_percent
        rows.append([region_by_key(region.key).name, f"{region.dice:.2f}", f"{region.volume_cm3:.1f}",
                     f"{region.other_volume_cm3:.1f}", "-" if difference is None else f"{difference:+.0f} %"]
                    + ([_fmt(region.difference_sd, "+.1f")] if judged else []))
    table = Table(rows, hAlign="LEFT")
    style = [("FONTSIZE", (0, 0), (-1, -1), 7), ("FONTNAME", (0, 0), (-1, 0), "Helvetica-Bold"),
             ("ALIGN", (1, 0), (-1, -1), "RIGHT"), ("LINEBELOW", (0, 0), (-1, 0), 0.5, colors.grey),
             ("TOPPADDING", (0, 0), (-1, -1), 0.5), ("BOTTOMPADDING", (0, 0), (-1, -1), 0.5)]
    disagreeing = cross_check.disagreeing
    for row, region in enumerate(cross_check.regions, start=1):
        if region in disagreeing:
            style.append(("TEXTCOLOR", (0, row), (-1, row), colors.red))
    table.setStyle(TableStyle(style))
    heading = "Cross-check: " + (_escape(cross_check.verdict) if cross_check.agrees
                                 else f"<font color='red'><b>{_escape(cross_check.verdict)}</b></font>")
    return [Paragraph(heading, styles["heading"]), Paragraph(_escape(cross_check.message), styles["small"]),
            table, Spacer(1, 2 * mm)]


def _method_line(model: dict, styles) -> Paragraph:
    """Which method made the regions (the network or the atlas registration)."""
    method = segmentation_method(model)
    return Paragraph(f"<b>Regions made by</b>: {_escape(METHOD_DESCRIPTIONS[method])} (method {method}).",
                     styles["small"])


def _provenance(normative, model: dict, styles, created: datetime) -> Paragraph:
    reference = normative.reference
    low, high = reference.age_range_years
    kernel = "x".join(str(k) for k in model.get("kernel_size", ())) or "?"
    if segmentation_method(model) == Method.ATLAS:
        made_with = (f"{_escape(str(model.get('name', '?')))} ({_escape(str(model.get('architecture', '?')))}), "
                     f"{_escape(str(model.get('trained_on', '?')))}, data sha256 ")
    else:
        made_with = (f"{_escape(str(model.get('name', '?')))} ({_escape(str(model.get('architecture', '?')))}, "
                     f"kernel {kernel}), trained on {_escape(str(model.get('trained_on', '?')))}, weights sha256 ")
    text = (
        f"<b>Model</b>: {made_with}"
        f"{str(model.get('weights_sha256', '?'))[:16]}&hellip;, code {_escape(str(model.get('code_version', __version__)))}"
        f"{_options_text(model)}. "
        f"<b>Reference</b>: {_escape(reference.name)} {_escape(reference.version)} ({_escape(reference.kind)}; "
        f"{_escape(reference.population)}, n = {reference.n}, ages {low:g}&ndash;{high:g} years), "
        f"{_escape(reference.citation)}. Flags: |z| &gt; {normative.z_threshold:g}. "
        f"<b>Generated</b> {created:%Y-%m-%d %H:%M} by lobevol {__version__}."
    )
    return Paragraph(text, styles["small"])


def _escape(text: str) -> str:
    return text.replace("&", "&amp;").replace("<", "&lt;").replace(">", "&gt;")
