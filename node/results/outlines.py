"""Outlines of the regions on one image, for the SR's spatial coordinates (TID 320, TID 1410).

A region's outline is the boundary of its pixels on its representative
slice (the source image where the region is largest), traced along the
pixel edges: a closed POLYLINE in DICOM image coordinates (column, row),
where the top left corner of the top left pixel is (0, 0) (PS3.3
C.18.6.1.2), so every vertex is a pixel corner.
"""
from __future__ import annotations

from collections import defaultdict
from dataclasses import dataclass
from typing import Sequence

import highdicom as hd
import numpy as np
import pydicom
from scipy import ndimage

#: Fewer vertices than this and OHIF takes the outline for its rectangle tool (it drops our label).
MIN_VERTICES = 6

#: Directed edges around an inside pixel at (row, column), clockwise on screen: the pixel's
#: neighbour that must be outside, then the edge's start and end corner as (x, y) offsets.
_EDGES = (
    ((-1, 0), (0, 0), (1, 0)),  # top: left to right
    ((0, 1), (1, 0), (1, 1)),  # right: top to bottom
    ((1, 0), (1, 1), (0, 1)),  # bottom: right to left
    ((0, -1), (0, 1), (0, 0)),  # left: bottom to top
)


@dataclass(frozen=True)
class SourcePlane:
    """One source image plane: a single-frame instance, or one frame of a multi-frame instance."""

    dataset: pydicom.Dataset
    frame_number: int | None = None

    @property
    def pixel_spacing_mm(self) -> tuple[float, float]:
        """(row, column) spacing in mm; a multi-frame instance's from its functional groups."""
        if self.frame_number is None:
            return tuple(float(v) for v in self.dataset.PixelSpacing)
        for groups in (self.dataset.PerFrameFunctionalGroupsSequence[self.frame_number - 1],
                       self.dataset.get("SharedFunctionalGroupsSequence", [None])[0]):
            if groups is not None and "PixelMeasuresSequence" in groups:
                return tuple(float(v) for v in groups.PixelMeasuresSequence[0].PixelSpacing)
        raise ValueError(f"frame {self.frame_number} of the source image has no PixelSpacing")

    def source_image(self) -> hd.sr.SourceImageForRegion:
        return hd.sr.SourceImageForRegion(
            referenced_sop_class_uid=str(self.dataset.SOPClassUID),
            referenced_sop_instance_uid=str(self.dataset.SOPInstanceUID),
            referenced_frame_numbers=None if self.frame_number is None else [self.frame_number],
        )


def source_planes(datasets: Sequence[pydicom.Dataset]) -> list[SourcePlane]:
    """The planes of a series in the order of its label slices: by instance, then by frame."""
    planes = []
    for ds in datasets:
        if "NumberOfFrames" in ds and "PerFrameFunctionalGroupsSequence" in ds:
            planes += [SourcePlane(ds, number) for number in range(1, int(ds.NumberOfFrames) + 1)]
        else:
            planes.append(SourcePlane(ds))
    return planes


@dataclass(frozen=True)
class Outline:
    """A closed outline on one source image plane.

    Attributes:
        image_index: index of the plane in the series' ``source_planes``.
        points: float (n, 2) array of (column, row) pixel-corner coordinates, first point repeated last.
        pixel_count: pixels of the region on that plane (the outlined component and any others).
    """

    image_index: int
    points: np.ndarray
    pixel_count: int


class PlaneLabels:
    """Label values (segment numbers) on every source plane, with each value's pixel count per plane."""

    def __init__(self, images: np.ndarray):
        """``images``: (planes, rows, columns) non-negative integer labels, 0 for none."""
        self.images = images
        values = int(images.max()) + 1 if images.size else 1
        self.counts = np.stack([np.bincount(plane.ravel(), minlength=values) for plane in images])

    def outlines_where_largest(self, groups: Sequence[Sequence[int]]) -> list[Outline]:
        """Each group's outline (its label values together) on the one plane where all groups have most pixels.

        One group: a region (or the brain) where it is largest. Two: a pair of
        regions compared (an asymmetry index), side by side on one plane. A
        group absent from that plane gets no outline; all absent, none.
        """
        per_group = [self.counts[:, [v for v in group if v < self.counts.shape[1]]].sum(axis=1) for group in groups]
        together = np.sum(per_group, axis=0)
        if not together.any():
            return []
        index = int(np.argmax(together))
        return [Outline(index, trace_outline(np.isin(self.images[index], group)), int(count[index]))
                for group, count in zip(groups, per_group) if count[index]]


def trace_outline(image: np.ndarray) -> np.ndarray:
    """Closed outline (column, row) of the largest 4-connected component of a 2D bool image."""
    components, count = ndimage.label(image)
    if count == 0:
        raise ValueError("cannot outline an empty image")
    sizes = ndimage.sum_labels(np.ones_like(components), components, index=np.arange(1, count + 1))
    component = ndimage.binary_fill_holes(components == int(np.argmax(sizes)) + 1)
    loop = _longest_boundary_loop(component)
    vertices = _corners(loop)
    if len(vertices) < MIN_VERTICES:
        vertices = _with_midpoints(loop if len(loop) >= len(vertices) else vertices)
    return np.array([*vertices, vertices[0]], dtype=float)


def _longest_boundary_loop(component: np.ndarray) -> list[tuple[int, int]]:
    """Chain the component's boundary edges into closed loops; return the longest (its corners in order)."""
    padded = np.pad(component, 1)
    outgoing: dict[tuple[int, int], list[tuple[int, int]]] = defaultdict(list)
    rows, columns = np.nonzero(component)
    for (d_row, d_col), start, end in _EDGES:
        outside = ~padded[rows + 1 + d_row, columns + 1 + d_col]
        for row, column in zip(rows[outside], columns[outside]):
            outgoing[(column + start[0], row + start[1])].append((column + end[0], row + end[1]))
    loops = []
    while outgoing:
        start = next(iter(outgoing))
        loop, vertex = [start], start
        while True:
            ends = outgoing[vertex]
            following = ends.pop()
            if not ends:
                del outgoing[vertex]
            if following == start:
                break
            loop.append(following)
            vertex = following
            if vertex not in outgoing:  # a pinch point used up: close the loop here
                break
        loops.append(loop)
    return max(loops, key=len)


def _corners(loop: list[tuple[int, int]]) -> list[tuple[int, int]]:
    """The loop's vertices where the direction changes (collinear unit steps merged)."""
    kept = []
    for i, point in enumerate(loop):
        before, after = loop[i - 1], loop[(i + 1) % len(loop)]
        if (point[0] - before[0], point[1] - before[1]) != (after[0] - point[0], after[1] - point[1]):
            kept.append(point)
    return kept or loop


def _with_midpoints(vertices: list[tuple[float, float]]) -> list[tuple[float, float]]:
    """Insert the midpoint of every side until there are enough vertices (the outline is unchanged)."""
    while len(vertices) < MIN_VERTICES:
        doubled = []
        for i, point in enumerate(vertices):
            following = vertices[(i + 1) % len(vertices)]
            doubled += [point, ((point[0] + following[0]) / 2, (point[1] + following[1]) / 2)]
        vertices = doubled
    return vertices
