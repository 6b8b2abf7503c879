"""PDF report of the cohort statistics (reportlab, charts with reportlab's own graphics).

Pages: cohort summary with Table 1 (balance of a split, when asked) and Table 2
(descriptive); Tables 3-4 (regression on sex and age), Table 5 (left vs right) and the
Spearman correlations; Figure 3, volume against age coloured by sex, one panel per
region, with each sex's fitted line.
"""
from __future__ import annotations

import io
import math
from datetime import datetime, timezone
from typing import Optional, Sequence

import numpy as np
from reportlab.graphics.shapes import Circle, Drawing, Line, Rect, String
from reportlab.lib import colors
from reportlab.lib.pagesizes import A4
from reportlab.lib.styles import ParagraphStyle
from reportlab.lib.units import mm
from reportlab.platypus import (
    KeepTogether, PageBreak, Paragraph, SimpleDocTemplate, Spacer, Table as PdfTable, TableStyle,
)

from inference.vocabulary import REGION_KEYS
from normative.cohort import Cohort
from normative.report_styles import paragraph_styles
from normative.stats import SEX_CODING, Table, label

SEX_COLOURS = {"M": colors.HexColor("#1f77b4"), "F": colors.HexColor("#d62728")}
#: At most this many children are drawn per panel (a random sample beyond), to keep the PDF small.
MAX_POINTS = 3000
_GRID = colors.HexColor("#cccccc")
_HEADER_BG = colors.HexColor("#e8eef6")


def render_stats_pdf(cohort: Cohort, tables: Sequence[Table], *, split_column: Optional[str] = None,
                     created: Optional[datetime] = None) -> bytes:
    """The statistics report as PDF bytes (A4 portrait)."""
    styles = _styles()
    by_name = {t.name: t for t in tables}
    buffer = io.BytesIO()
    document = SimpleDocTemplate(buffer, pagesize=A4, leftMargin=15 * mm, rightMargin=15 * mm,
                                 topMargin=14 * mm, bottomMargin=14 * mm,
                                 title="lobevol cohort statistics", author="lobevol normative stats")
    width = A4[0] - 30 * mm
    story: list = [Paragraph("Cohort statistics of regional brain volumes", styles["title"]),
                   Paragraph(_summary(cohort, split_column, created), styles["small"]), Spacer(1, 3 * mm)]
    if "table1_groups" in by_name:
        story += _section("Table 1. " + by_name["table1_groups"].title, _groups_table(by_name["table1_groups"]),
                          by_name["table1_groups"].notes, styles)
        story += _section("Table 1 (tests). " + by_name["table1_tests"].title, _tests_table(by_name["table1_tests"]),
                          by_name["table1_tests"].notes, styles)
    story += _section("Table 2. " + by_name["table2_descriptive"].title,
                      _descriptive_table(by_name["table2_descriptive"]), by_name["table2_descriptive"].notes, styles)
    story.append(PageBreak())
    story += _section("Tables 3-4. " + by_name["table3_regression"].title,
                      _regression_table(by_name["table3_regression"], width), by_name["table3_regression"].notes,
                      styles)
    story += _section("Table 5. " + by_name["table5_paired_left_right"].title,
                      _paired_table(by_name["table5_paired_left_right"]), by_name["table5_paired_left_right"].notes,
                      styles)
    story += _section(by_name["spearman_age"].title, _spearman_table(by_name["spearman_age"]),
                      by_name["spearman_age"].notes, styles)
    story.append(PageBreak())
    story += _figure(cohort, by_name["table3_regression"], width, styles)
    document.build(story)
    return buffer.getvalue()


def _styles() -> dict[str, ParagraphStyle]:
    return paragraph_styles(
        title=dict(fontName="Helvetica-Bold", fontSize=15, leading=19, spaceAfter=2),
        heading=dict(fontName="Helvetica-Bold", fontSize=10, leading=13, spaceBefore=4, spaceAfter=2),
        small=dict(fontSize=8, leading=10),
        note=dict(fontName="Helvetica-Oblique", fontSize=7.5, leading=9, textColor=colors.HexColor("#444444")),
    )


def _summary(cohort: Cohort, split_column: Optional[str], created: Optional[datetime]) -> str:
    complete, excluded = cohort.complete()
    boys, girls = cohort.sex.count("M"), cohort.sex.count("F")
    ages = cohort.age_years[~np.isnan(cohort.age_years)]
    age = (f"age {ages.mean():.2f} &plusmn; {ages.std(ddof=1):.2f} years (range {ages.min():.2f}-{ages.max():.2f})"
           if len(ages) > 1 else "age not available")
    source = cohort.source.name if cohort.source else "in-memory cohort"
    text = (f"<b>Cohort</b>: {source}, {len(cohort)} children ({boys} boys, {girls} girls"
            + (f", {len(cohort) - boys - girls} of unknown sex" if len(cohort) - boys - girls else "")
            + f"), {age}. ")
    if excluded:
        text += f"{len(excluded)} row(s) without sex or age are left out of the regression. "
    if split_column:
        text += f"Groups for Table 1 from column '{split_column}'. "
    if cohort.sha256:
        text += f"Source sha256 {cohort.sha256[:16]}&hellip;. "
    stamp = (created or datetime.now(timezone.utc)).strftime("%Y-%m-%d %H:%M UTC")
    return text + (f"Produced by <i>lobevol normative stats</i> on {stamp}, reproducing the analyses of "
                   "Xi et al. 2025 (Front Neurol 16:1573060). Volumes in cm3, ages in years; p &lt; 0.05 "
                   "significant.")


def _section(title: str, table: PdfTable, notes: Sequence[str], styles) -> list:
    parts = [Paragraph(title, styles["heading"]), table]
    parts += [Paragraph(note, styles["note"]) for note in notes]
    return [KeepTogether(parts), Spacer(1, 3 * mm)]


def _grid(data: list[list], header_rows: int = 1, text_columns: int = 1) -> PdfTable:
    """A table with bold shaded header rows; the first ``text_columns`` left-aligned, numbers right-aligned."""
    table = PdfTable(data, repeatRows=header_rows)
    table.setStyle(TableStyle([
        ("FONT", (0, 0), (-1, -1), "Helvetica", 7.5),
        ("FONT", (0, 0), (-1, header_rows - 1), "Helvetica-Bold", 7.5),
        ("BACKGROUND", (0, 0), (-1, header_rows - 1), _HEADER_BG),
        ("LINEBELOW", (0, header_rows - 1), (-1, header_rows - 1), 0.6, colors.black),
        ("LINEBELOW", (0, -1), (-1, -1), 0.6, colors.black),
        ("ALIGN", (text_columns, 0), (-1, -1), "RIGHT"),
        ("VALIGN", (0, 0), (-1, -1), "MIDDLE"),
        ("TOPPADDING", (0, 0), (-1, -1), 1.2),
        ("BOTTOMPADDING", (0, 0), (-1, -1), 1.2),
    ]))
    return table


def _fmt(value, spec: str = ".2f") -> str:
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "–"
    return format(value, spec)


def _p(value) -> str:
    if value is None or math.isnan(value):
        return "–"
    return "<0.001" if value < 0.001 else f"{value:.3f}"


def _mean_sd(mean, sd) -> str:
    return "–" if mean is None else f"{mean:.2f} ± {_fmt(sd)}"


def _groups_table(table: Table) -> PdfTable:
    data = [["Group", "n", "Age, years (mean ± SD)", "Boys", "Girls"]]
    for r in (dict(zip(table.columns, row)) for row in table.rows):
        data.append([r["group"], r["n"], _mean_sd(r["age_mean_years"], r["age_sd_years"]), r["boys"], r["girls"]])
    return _grid(data)


def _tests_table(table: Table) -> PdfTable:
    data = [["Variable", "Test", "Statistic", "df", "p"]]
    for r in (dict(zip(table.columns, row)) for row in table.rows):
        data.append([r["variable"], r["test"], _fmt(r["statistic"], ".3f"), _fmt(r["df"], "g"), _p(r["p"])])
    return _grid(data, text_columns=2)


def _descriptive_table(table: Table) -> PdfTable:
    data = [["Region", "n", "All", "n", "Boys", "n", "Girls"]]
    for r in (dict(zip(table.columns, row)) for row in table.rows):
        data.append([label(r["region"]), r["n_all"], _mean_sd(r["mean_all"], r["sd_all"]),
                     r["n_boys"], _mean_sd(r["mean_boys"], r["sd_boys"]),
                     r["n_girls"], _mean_sd(r["mean_girls"], r["sd_girls"])])
    return _grid(data)


def _regression_table(table: Table, width: float) -> PdfTable:
    header = [["Region", "Sex", "", "", "", "Age (per year)", "", "", "", "R2", "n"],
              ["", "B", "SE", "beta", "p", "B", "SE", "beta", "p", "", ""]]
    records = [dict(zip(table.columns, row)) for row in table.rows]
    data = list(header)
    for key in (*REGION_KEYS, "total"):
        terms = {r["term"]: r for r in records if r["region"] == key}
        sex, age = terms["sex"], terms["age_years"]
        data.append([label(key), _fmt(sex["B"]), _fmt(sex["SE"]), _fmt(sex["beta"], ".3f"), _p(sex["p"]),
                     _fmt(age["B"]), _fmt(age["SE"]), _fmt(age["beta"], ".3f"), _p(age["p"]),
                     _fmt(sex["r2"], ".3f"), sex["n"]])
    grid = _grid(data, header_rows=2)
    grid.setStyle(TableStyle([("SPAN", (1, 0), (4, 0)), ("SPAN", (5, 0), (8, 0)), ("ALIGN", (1, 0), (8, 0), "CENTER"),
                              ("LINEBELOW", (1, 0), (8, 0), 0.3, colors.grey)]))
    return grid


def _paired_table(table: Table) -> PdfTable:
    data = [["Lobe", "n", "Left", "Right", "L - R", "95% CI", "t", "p", "Cohen's dz"]]
    for r in (dict(zip(table.columns, row)) for row in table.rows):
        data.append([r["structure"], r["n"], _fmt(r["mean_left"]), _fmt(r["mean_right"]), _fmt(r["mean_difference"]),
                     f"{r['ci95_low']:.2f} to {r['ci95_high']:.2f}", _fmt(r["t"]), _p(r["p"]),
                     _fmt(r["cohens_dz"], ".3f")])
    return _grid(data)


def _spearman_table(table: Table) -> PdfTable:
    data = [["Region", "n", "Spearman rho", "p"]]
    for r in (dict(zip(table.columns, row)) for row in table.rows):
        data.append([label(r["region"]), r["n"], _fmt(r["rho"], ".3f"), _p(r["p"])])
    return _grid(data)


def _figure(cohort: Cohort, regression: Table, width: float, styles) -> list:
    """Figure 3: 10 panels of volume against age, coloured by sex, with each sex's fitted line."""
    complete, _ = cohort.complete()
    parts: list = [Paragraph("Figure 3. Regional volume against age by sex", styles["heading"])]
    legend = (f"<font color='#{SEX_COLOURS['M'].hexval()[2:]}'><b>boys</b></font>, "
              f"<font color='#{SEX_COLOURS['F'].hexval()[2:]}'><b>girls</b></font>; "
              "lines: the multiple regression of Tables 3-4 evaluated for each sex.")
    if len(complete) > MAX_POINTS:
        legend += f" {MAX_POINTS} of {len(complete)} children drawn (random sample); fits use all."
    parts.append(Paragraph(legend, styles["small"]))
    if len(complete) == 0:
        parts.append(Paragraph("no child with both sex and age: nothing to plot", styles["small"]))
        return parts
    rng = np.random.default_rng(0)
    shown = np.sort(rng.choice(len(complete), MAX_POINTS, replace=False)) if len(complete) > MAX_POINTS \
        else np.arange(len(complete))
    coefficients = {(r[0], r[1]): r[2] for r in regression.rows}
    panel_w, panel_h = width / 2, 47 * mm
    cells = [_panel(complete, key, shown, coefficients, panel_w, panel_h) for key in REGION_KEYS]
    rows = [cells[i:i + 2] for i in range(0, len(cells), 2)]
    grid = PdfTable(rows, colWidths=[panel_w, panel_w], rowHeights=[panel_h] * len(rows))
    grid.setStyle(TableStyle([("LEFTPADDING", (0, 0), (-1, -1), 0), ("RIGHTPADDING", (0, 0), (-1, -1), 0),
                              ("TOPPADDING", (0, 0), (-1, -1), 0), ("BOTTOMPADDING", (0, 0), (-1, -1), 0)]))
    parts.append(grid)
    return parts


def _panel(cohort: Cohort, key: str, shown: np.ndarray, coefficients: dict, width: float, height: float) -> Drawing:
    age, volume = cohort.age_years, cohort.measure(key)
    left, right, bottom, top = 13 * mm, 3 * mm, 8 * mm, 6 * mm
    plot_w, plot_h = width - left - right, height - bottom - top
    x_ticks, y_ticks = _ticks(age.min(), age.max()), _ticks(volume.min(), volume.max())
    x0, x1, y0, y1 = x_ticks[0], x_ticks[-1], y_ticks[0], y_ticks[-1]
    to_x = lambda a: left + (a - x0) / (x1 - x0) * plot_w  # noqa: E731
    to_y = lambda v: bottom + (v - y0) / (y1 - y0) * plot_h  # noqa: E731
    drawing = Drawing(width, height)
    drawing.add(String(left, height - 4 * mm, label(key), fontName="Helvetica-Bold", fontSize=8))
    for tick in x_ticks:
        drawing.add(Line(to_x(tick), bottom, to_x(tick), bottom + plot_h, strokeColor=_GRID, strokeWidth=0.3))
        drawing.add(String(to_x(tick), bottom - 3 * mm, f"{tick:g}", fontSize=6, textAnchor="middle"))
    for tick in y_ticks:
        drawing.add(Line(left, to_y(tick), left + plot_w, to_y(tick), strokeColor=_GRID, strokeWidth=0.3))
        drawing.add(String(left - 1 * mm, to_y(tick) - 2, f"{tick:g}", fontSize=6, textAnchor="end"))
    drawing.add(String(left + plot_w / 2, 0.8 * mm, "age, years", fontSize=6, textAnchor="middle"))
    drawing.add(String(left + 1 * mm, bottom + plot_h - 3 * mm, "cm3", fontSize=6))
    # fewer points can be bigger and more opaque and stay readable
    radius = min(1.6, max(0.55, 1.6 * math.sqrt(300 / len(shown))))
    opacity = 0.8 if len(shown) < 500 else 0.45
    for i in shown:
        drawing.add(Circle(to_x(age[i]), to_y(volume[i]), radius, fillColor=SEX_COLOURS[cohort.sex[i]],
                           strokeColor=None, fillOpacity=opacity))
    for sex, code in SEX_CODING.items():
        line = [coefficients[(key, "intercept")] + coefficients[(key, "sex")] * code
                + coefficients[(key, "age_years")] * a for a in (age.min(), age.max())]
        drawing.add(Line(to_x(age.min()), to_y(line[0]), to_x(age.max()), to_y(line[1]),
                         strokeColor=SEX_COLOURS[sex], strokeWidth=1.4))
    # the frame last, so that grid lines and points do not cover it
    drawing.add(Rect(left, bottom, plot_w, plot_h, strokeColor=colors.black, strokeWidth=0.5, fillColor=None))
    return drawing


def _ticks(low: float, high: float, target: int = 5) -> list[float]:
    """Round tick values covering [low, high] (at least two)."""
    if not high > low:
        low, high = low - 0.5, high + 0.5
    raw = (high - low) / target
    magnitude = 10 ** math.floor(math.log10(raw))
    step = next(m * magnitude for m in (1, 2, 2.5, 5, 10) if m * magnitude >= raw)
    start, stop = math.floor(low / step) * step, math.ceil(high / step) * step
    count = int(round((stop - start) / step))
    return [round(start + i * step, 10) for i in range(count + 1)]
