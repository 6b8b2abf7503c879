"""Is this CT series a head? Asked of the image when no header says so.

Anonymisers blank BodyPartExamined and every description, so a real head CT can
arrive without a head word anywhere. :func:`head_in_images` then looks at a few
slices around the middle of the series (decoding three images, not the series,
so selection stays cheap) for what makes a head on CT: a closed ring of bone
(the skull) enclosing tissue of brain density.

A slice passes when the region enclosed by bone (HU >= ``BONE_HU``, holes
filled) is between ``MIN_AREA_CM2`` (a newborn's head, about 9 cm across, near
the vertex) and ``MAX_AREA_CM2`` (beyond an adult head), and inside it, outside
the bone, at least ``MIN_BRAIN_FRACTION`` of the tissue is brain density (0 to
80 HU) and at most ``MAX_FAT_FRACTION`` is fat (-200 to -30 HU): brain holds
no fat, while a pelvic ring or a rib cage that happens to close encloses fat,
bowel gas or lung. The series is a head when at least two of the three slices pass.
"""
from __future__ import annotations

from typing import Sequence

import numpy as np
import pydicom
from scipy import ndimage

BONE_HU = 300.0
BRAIN_HU = (0.0, 80.0)
FAT_HU = (-200.0, -30.0)
MIN_AREA_CM2 = 15.0
MAX_AREA_CM2 = 400.0
MIN_BRAIN_FRACTION = 0.6
MAX_FAT_FRACTION = 0.05
#: Where in the series the slices looked at lie (fractions of its extent along the normal).
SAMPLED_FRACTIONS = (0.4, 0.55, 0.7)


def head_in_images(headers: Sequence) -> tuple[bool, str]:
    """(whether a skull encloses brain-density tissue in most sampled slices, what was seen).

    Args:
        headers: the ``InstanceHeader`` objects of one single-frame CT series, any order.
    """
    ordered = sorted(headers, key=_position_along_normal)
    if len(ordered) < len(SAMPLED_FRACTIONS):
        return False, f"{len(ordered)} image(s): too few to look at"
    seen = []
    for fraction in SAMPLED_FRACTIONS:
        header = ordered[min(int(fraction * len(ordered)), len(ordered) - 1)]
        seen.append(_slice_verdict(header))
    passed = sum(ok for ok, _ in seen)
    return passed >= 2, f"{passed} of {len(seen)} sampled slices show a skull around brain-density tissue (" \
        + "; ".join(what for _, what in seen) + ")"


def _slice_verdict(header) -> tuple[bool, str]:
    try:
        ds = pydicom.dcmread(header.path, force=True)
        hu = ds.pixel_array.astype(np.float32) * float(ds.get("RescaleSlope", 1) or 1) \
            + float(ds.get("RescaleIntercept", 0) or 0)
        row_mm, column_mm = (float(v) for v in ds.PixelSpacing)
    except Exception as error:  # undecodable or incomplete: not evidence of a head
        return False, f"unreadable ({type(error).__name__})"
    if hu.ndim != 2:
        return False, "not a single-frame image"
    bone = hu >= BONE_HU
    enclosed = ndimage.binary_fill_holes(bone) & ~bone
    if not enclosed.any():
        return False, "no closed bone ring"
    labels, count = ndimage.label(enclosed)
    largest = labels == (1 + int(np.argmax(ndimage.sum(enclosed, labels, range(1, count + 1)))))
    area_cm2 = float(largest.sum()) * row_mm * column_mm / 100.0
    inside = hu[largest]
    brain = float(np.mean((inside >= BRAIN_HU[0]) & (inside <= BRAIN_HU[1])))
    fat = float(np.mean((inside >= FAT_HU[0]) & (inside <= FAT_HU[1])))
    ok = MIN_AREA_CM2 <= area_cm2 <= MAX_AREA_CM2 and brain >= MIN_BRAIN_FRACTION and fat <= MAX_FAT_FRACTION
    return ok, f"enclosed {area_cm2:.0f} cm2, {100 * brain:.0f} % brain density, {100 * fat:.0f} % fat"


def _position_along_normal(header) -> float:
    ds = header.dataset
    try:
        orientation = np.asarray([float(v) for v in ds.ImageOrientationPatient])
        position = np.asarray([float(v) for v in ds.ImagePositionPatient])
    except (AttributeError, TypeError, ValueError):
        return float(ds.get("InstanceNumber", 0) or 0)
    return float(np.dot(np.cross(orientation[:3], orientation[3:]), position))
