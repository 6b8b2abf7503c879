"""Paragraph styles of lobevol's PDF reports (the study report and the cohort statistics report).

One place for how a report names and builds its styles, so the two reports share
a look and a change of base font is made once. It lives in ``normative`` because
``node`` may import ``normative`` but not the reverse.
"""
from __future__ import annotations

from typing import Any

from reportlab.lib.styles import ParagraphStyle, getSampleStyleSheet


def paragraph_styles(**styles: dict[str, Any]) -> dict[str, ParagraphStyle]:
    """Named paragraph styles derived from reportlab's ``Normal`` style.

    Args:
        styles: style name -> its ``ParagraphStyle`` attributes (``fontName``,
            ``fontSize`` and ``leading`` in points, ``textColor``, ...).

    Returns:
        style name -> ``ParagraphStyle``.
    """
    base = getSampleStyleSheet()["Normal"]
    return {name: ParagraphStyle(name, parent=base, **attributes) for name, attributes in styles.items()}
