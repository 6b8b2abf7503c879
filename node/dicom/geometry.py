"""Slice geometry shared by every reader of image planes: the slice normal, positions along it, functional groups.

DICOM places each image by ImagePositionPatient (the centre of its first
pixel, LPS, mm) and ImageOrientationPatient (the row and column directions).
The slice normal is row x column; a slice's position along the normal is the
dot product of its ImagePositionPatient with the unit normal. Sorting by that
position, not by InstanceNumber or file name, orders a series from one end to
the other. A multi-frame (Enhanced CT) instance keeps these per frame in its
functional groups, where a frame's own item overrides the shared one.

Used by ``node.dicom.selection`` (coverage, axial angle), ``node.dicom.volume``
(the volume grid) and ``node.results.seg`` (the slices a SEG's volumes count).
"""
from __future__ import annotations

from typing import Iterable, Sequence

import numpy as np
import pydicom


def slice_normal(orientation: Sequence[float]) -> np.ndarray | None:
    """The unit slice normal of an ImageOrientationPatient (6 numbers), or None when it has no direction.

    None when the value is not 6 numbers or its row and column directions are
    (nearly) parallel or null: no plane, hence no normal.
    """
    if orientation is None or len(orientation) != 6:
        return None
    row, column = np.array([float(v) for v in orientation[:3]]), np.array([float(v) for v in orientation[3:]])
    normal = np.cross(row, column)
    length = float(np.linalg.norm(normal))
    if length < 0.5:
        return None
    return normal / length


def positions_along(normal: np.ndarray, points: Iterable[Sequence[float]]) -> np.ndarray:
    """Each point's (ImagePositionPatient's) position along ``normal``, in mm."""
    array = np.array([[float(v) for v in point] for point in points], dtype=float).reshape(-1, 3)
    return array @ np.asarray(normal, dtype=float)


def functional_group_item(frame: pydicom.Dataset | None, shared: pydicom.Dataset | None,
                          sequence: str, keyword: str) -> pydicom.Dataset | None:
    """The item of ``sequence`` that holds ``keyword`` for one frame: the frame's own, else the shared one."""
    for group in (frame, shared):
        if group is not None and sequence in group and len(group[sequence].value) and keyword in group[sequence][0]:
            return group[sequence][0]
    return None


def functional_group_value(frame: pydicom.Dataset | None, shared: pydicom.Dataset | None,
                           sequence: str, keyword: str):
    """``keyword``'s value in ``sequence`` for one frame (see :func:`functional_group_item`), or None."""
    item = functional_group_item(frame, shared, sequence, keyword)
    return None if item is None else item[keyword].value
