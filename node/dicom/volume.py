"""One CT series as a SimpleITK volume in HU, with its true physical geometry.

:func:`load_series_volume` turns the instances of one series (single-frame
CT Image Storage, or one Enhanced / Legacy Converted Enhanced CT multi-frame
instance) into a :class:`SeriesVolume`:

- the slices are sorted along the slice normal (not by InstanceNumber or
  file name), pixel data are decoded whatever the transfer syntax (pydicom
  with the pylibjpeg plugins: RLE, JPEG lossless, JPEG-LS, JPEG 2000;
  deflate natively) and rescaled to HU (per frame for multi-frame);
- the image grid has the slices' in-plane axes and their normal as axes.
  A regular series (slices stacked straight along their normal, evenly
  spaced) is used as it is. An irregular one (gantry tilt, which shears the
  stack, or uneven spacing) is resampled onto a regular grid: in-plane
  spacing = the pixel spacing, slice spacing = the median spacing, or a
  little finer so that the first and last grid slices fall on the first and
  last source slices. The correction is reported in ``notes``;
- what cannot make one volume is refused with a ValueError naming the
  problem: mixed orientations, mixed image sizes or pixel spacings,
  duplicated slice positions, a gap larger than ``max_gap_factor`` times
  the typical (median) spacing, fewer than two slices, pixel data that is
  not what the header says, and a volume (as read or as resampled) of more
  than ``MAX_VOXELS`` voxels, checked on the headers before any allocation.

Typical spacing = the median spacing between neighbouring slices along the
normal. The GE sample in ``shared/data/real-ct`` (gantry tilt 18.5 deg,
13 gaps of 4.0 mm, one of 1.08 mm, 13 of 7.0 mm) has a median of 4.0 mm
and a largest gap of 1.75 x that, so the default factor 2.0 accepts it. In
an evenly spaced series, one missing slice (a gap of 2 x the spacing) is
accepted, at the limit (interpolated across, like the GE sample's 7 mm
gaps), and two missing slices (3 x) are refused. The median, not the
smallest or the mean, is the typical spacing: one odd gap (the GE's 1.08 mm)
does not move it.

Values below -1024 HU (scanners' padding outside the reconstruction circle,
e.g. -3024 HU) are set to -1024 HU (air), so that interpolation does not
smear padding into the head.

``SeriesVolume.labels_on_source_slices`` maps a label image on the volume
grid back onto each source slice's own plane (exact position and
orientation of every source image): this is what the DICOM SEG writes, so
its frames lie on, and reference, the source images even after a tilt
correction.
"""
from __future__ import annotations

import dataclasses
import logging
import math
from dataclasses import dataclass, field
from typing import Sequence

import numpy as np
import pydicom
import SimpleITK as sitk
from scipy import ndimage
from tqdm import tqdm

from inference.volumes import region_volumes_cm3, slice_extents_mm
from node.dicom.geometry import functional_group_item, functional_group_value, positions_along, slice_normal
from node.dicom.pixels import MAX_VOXELS, pixel_data_problem

log = logging.getLogger(__name__)

#: Air; anything lower is scanner padding outside the field of view (HU).
AIR_HU = -1024.0
#: Two orientation vectors closer than this (cosine components) are the same orientation.
_ORIENTATION_TOLERANCE = 1e-3
#: Relative tolerance for "evenly spaced" and "same pixel spacing".
_RELATIVE_TOLERANCE = 0.01
#: Tilts below this are numerical noise, not a gantry tilt (degrees).
_TILT_NOISE_DEG = 0.05


@dataclass(frozen=True)
class SourcePlane:
    """One source image plane: a single-frame instance or one frame of a multi-frame instance.

    Attributes:
        dataset_index: index of its instance in ``SeriesVolume.datasets``.
        frame_number: 1-based frame number in a multi-frame instance, None for single-frame.
        position_mm: ImagePositionPatient (centre of the first pixel), LPS, mm.
        orientation: ImageOrientationPatient (row direction, column direction).
        pixel_spacing_mm: PixelSpacing (between rows, between columns), mm.
        rows: number of rows.
        columns: number of columns.
        slope: RescaleSlope.
        intercept: RescaleIntercept (HU).
        instance_number: InstanceNumber of its instance, for messages.
    """

    dataset_index: int
    frame_number: int | None
    position_mm: tuple[float, float, float]
    orientation: tuple[float, float, float, float, float, float]
    pixel_spacing_mm: tuple[float, float]
    rows: int
    columns: int
    slope: float = 1.0
    intercept: float = 0.0
    instance_number: str = "?"

    @property
    def normal(self) -> np.ndarray:
        """The unit slice normal (row direction x column direction)."""
        normal = slice_normal(self.orientation)
        if normal is None:
            raise ValueError(f"ImageOrientationPatient {_fmt(self.orientation)} of {self.label()} has no normal")
        return normal

    def label(self) -> str:
        """How to name this plane in an error message."""
        if self.frame_number is None:
            return f"the image with instance number {self.instance_number}"
        return f"frame {self.frame_number}"


@dataclass(frozen=True)
class _Grid:
    """The regular grid of the volume, in the slices' own frame (row direction u, column direction v, normal n)."""

    axes: np.ndarray          # 3 x 3, rows u, v, n
    origin_uvw: np.ndarray    # grid origin in (u, v, n) coordinates, mm
    spacing: tuple[float, float, float]  # along u (columns), v (rows), n (slices), mm
    size: tuple[int, int, int]           # columns, rows, slices

    def reference_image(self) -> sitk.Image:
        image = sitk.Image([int(s) for s in self.size], sitk.sitkUInt8)
        image.SetSpacing([float(s) for s in self.spacing])
        image.SetOrigin([float(v) for v in self.axes.T @ self.origin_uvw])
        image.SetDirection([float(v) for v in self.axes.T.ravel()])
        return image


@dataclass
class SeriesVolume:
    """A CT series as a volume in HU, with the source headers it came from.

    Attributes:
        image: float32 HU on a regular grid (axes: the slices' row and column
            directions and their normal).
        datasets: headers of the source instances (no pixel data), sorted
            along the slice normal; what SEG and SR reference.
        tilt_deg: angle between the slice normal and the direction the
            slices are stacked in (gantry tilt), degrees; 0 for straight stacks.
        notes: plain-language notes on corrections made (tilt, uneven spacing...).
        planes: the source image planes, in the order of
            :meth:`labels_on_source_slices` (``datasets`` order; frame order
            for a multi-frame instance).
        resampled: whether ``image`` was resampled (False: it is the source
            pixels exactly).
    """

    image: sitk.Image
    datasets: list[pydicom.Dataset]
    tilt_deg: float
    notes: list[str] = field(default_factory=list)
    planes: list[SourcePlane] = field(default_factory=list)
    resampled: bool = False

    def labels_on_source_slices(self, labels: sitk.Image) -> np.ndarray:
        """The label image sampled (nearest) on every source image plane.

        Args:
            labels: integer label image on exactly this volume's grid.

        Returns:
            uint8 (n_planes, rows, columns), in ``planes`` order (the order of
            ``datasets`` for single-frame series, frame order for a
            multi-frame instance): what the DICOM SEG stores per source image.

        Raises:
            ValueError: ``labels`` is not on this volume's grid.
        """
        _check_same_grid(labels, self.image)
        if not self.resampled:
            array = sitk.GetArrayFromImage(labels).astype(np.uint8)
            out = np.empty_like(array)
            out[_sorted_order(self.planes)] = array
            return out
        labels = sitk.Cast(labels, sitk.sitkUInt8)
        slices = []
        for plane in self.planes:
            reference = _plane_image(plane, self.image.GetSpacing()[2])
            resampled = sitk.Resample(labels, reference, sitk.Transform(), sitk.sitkNearestNeighbor, 0, sitk.sitkUInt8)
            slices.append(sitk.GetArrayFromImage(resampled)[0])
        return np.stack(slices).astype(np.uint8)

    def region_volumes_cm3(self, label_slices: np.ndarray) -> dict[str, float]:
        """Volume of every region (cm3) counted on the source images, as the DICOM SEG holds them.

        Each pixel of a source image stands for pixel area x that image's
        slice extent along the normal (half the distance to each neighbour,
        :func:`slice_extents_mm`). This is the source CT geometry (DESIGN:
        volumes are not counted on a resampled grid), and it is exactly what
        a reader of the SEG computes, so SEG and SR agree.

        Args:
            label_slices: (n_planes, rows, columns) labels 0..10 in ``planes``
                order (:meth:`labels_on_source_slices`).
        """
        label_slices = np.asarray(label_slices)
        expected = (len(self.planes), self.planes[0].rows, self.planes[0].columns)
        if label_slices.shape != expected:
            raise ValueError(f"label slices have shape {label_slices.shape}, expected {expected}")
        row_mm, column_mm = self.planes[0].pixel_spacing_mm
        return region_volumes_cm3(label_slices, row_mm * column_mm, slice_extents_mm(_normal_positions(self.planes)))

    def source_slices_to_grid(self, slices: np.ndarray, *, nearest: bool = False) -> sitk.Image:
        """Put per-source-image arrays onto the volume grid (the inverse of :meth:`labels_on_source_slices`).

        Args:
            slices: (n_planes, rows, columns) in ``planes`` order.
            nearest: nearest-neighbour (labels) instead of linear (intensities).

        Returns:
            An image on this volume's grid, of ``slices``' dtype for nearest,
            float32 for linear. Outside the source slices: 0 (nearest) or air.
        """
        slices = np.asarray(slices)
        expected = (len(self.planes), self.planes[0].rows, self.planes[0].columns)
        if slices.shape != expected:
            raise ValueError(f"slices have shape {slices.shape}, expected {expected} (planes x rows x columns)")
        order = _sorted_order(self.planes)
        if not self.resampled:
            array = slices[order]
        else:
            grid = _grid_of(self.image)
            fill = 0 if nearest else AIR_HU
            array = _resample_stack(slices[order], [self.planes[i] for i in order], grid, nearest=nearest, fill=fill)
        image = sitk.GetImageFromArray(array if nearest else array.astype(np.float32))
        image.CopyInformation(self.image)
        return image


def load_series_volume(instances: Sequence, max_gap_factor: float = 2.0) -> SeriesVolume:
    """Build the HU volume of one series.

    Args:
        instances: ``node.dicom.files.InstanceHeader`` objects of one series:
            single-frame CT images, or one multi-frame (Enhanced) CT instance.
        max_gap_factor: the largest accepted gap between neighbouring slices,
            in multiples of the median spacing (>= 1).

    Returns:
        The volume, its sorted source headers, tilt and notes.

    Raises:
        ValueError: the instances cannot form one volume; the message names why.
    """
    if not max_gap_factor >= 1.0:
        raise ValueError(f"max gap factor must be at least 1, got {max_gap_factor}")
    if not instances:
        raise ValueError("no instances given: a volume needs at least 2 slices")
    series_uids = {str(h.series_uid) for h in instances}
    if len(series_uids) != 1:
        raise ValueError(f"instances of {len(series_uids)} series given; a volume is built from one series")
    headers, planes = _source_planes(list(instances))
    _check_voxel_count((len(planes), planes[0].rows, planes[0].columns), "the series")
    positions = _normal_positions(planes)
    order = _sorted_order(planes)
    sorted_planes = [planes[i] for i in order]
    gaps = _check_spacing(sorted_planes, positions[order], max_gap_factor)
    stack = _read_pixels(headers, planes)[order]
    grid, resampled, tilt_deg, notes = _choose_grid(sorted_planes, positions[order], gaps)
    if resampled:
        array = _resample_stack(stack, sorted_planes, grid, nearest=False, fill=AIR_HU)
    else:
        array = stack
    image = sitk.GetImageFromArray(array.astype(np.float32, copy=False))
    reference = grid.reference_image()
    image.CopyInformation(reference)
    return SeriesVolume(image, [h.dataset for h in headers], tilt_deg, notes, planes, resampled)


# ---------------------------------------------------------------- planes from headers

def _source_planes(headers: list) -> tuple[list, list[SourcePlane]]:
    """The headers (single-frame: sorted along the normal) and their image planes, checked for consistency.

    Single-frame series: one plane per instance, both in order along the
    normal (the order SEG and SR reference them in). One multi-frame
    instance: one plane per frame, in frame order.
    """
    multi_frame = [h for h in headers if _is_multi_frame(h.dataset)]
    if multi_frame and len(headers) > 1:
        raise ValueError(
            f"the series mixes {len(multi_frame)} multi-frame instance(s) with {len(headers) - len(multi_frame)} "
            "other instance(s); a multi-frame series must be one Enhanced CT instance"
        )
    if multi_frame:
        planes = _frame_planes(headers[0].dataset)
    else:
        planes = [_single_frame_plane(i, h.dataset) for i, h in enumerate(headers)]
    _check_consistent(planes)
    if len(planes) < 2:
        raise ValueError(f"the series has {len(planes)} image plane(s): a volume needs at least 2 slices")
    if not multi_frame:
        order = _sorted_order(planes)
        headers = [headers[i] for i in order]
        planes = [dataclasses.replace(planes[i], dataset_index=new_index) for new_index, i in enumerate(order)]
    return headers, planes


def _is_multi_frame(ds: pydicom.Dataset) -> bool:
    return "PerFrameFunctionalGroupsSequence" in ds or int(ds.get("NumberOfFrames", 1) or 1) > 1


def _floats(value, count: int, what: str, where: str) -> tuple[float, ...]:
    if value is None:
        raise ValueError(f"{where} has no {what}")
    try:
        numbers = tuple(float(v) for v in value)
    except (TypeError, ValueError):
        raise ValueError(f"{where}: {what} {value!r} is not numeric") from None
    if len(numbers) != count or not all(math.isfinite(v) for v in numbers):
        raise ValueError(f"{where}: {what} must be {count} finite numbers, got {value!r}")
    return numbers


def _image_size(ds: pydicom.Dataset, where: str) -> tuple[int, int]:
    if "Rows" not in ds or "Columns" not in ds:
        raise ValueError(f"{where} is not an image (SOP class {ds.get('SOPClassUID', 'unknown')}): no Rows/Columns")
    return int(ds.Rows), int(ds.Columns)


def _rescale(item: pydicom.Dataset | None, fallback: pydicom.Dataset) -> tuple[float, float]:
    for source in (item, fallback):
        if source is not None and "RescaleSlope" in source and source.RescaleSlope not in (None, ""):
            return float(source.RescaleSlope), float(source.get("RescaleIntercept", 0.0) or 0.0)
        if source is not None and source.get("RescaleIntercept") not in (None, ""):
            return 1.0, float(source.RescaleIntercept)
    return 1.0, 0.0


def _single_frame_plane(index: int, ds: pydicom.Dataset) -> SourcePlane:
    where = f"image {index + 1} (instance number {ds.get('InstanceNumber', '?')})"
    rows, columns = _image_size(ds, where)
    slope, intercept = _rescale(None, ds)
    return SourcePlane(
        dataset_index=index,
        frame_number=None,
        position_mm=_floats(ds.get("ImagePositionPatient"), 3, "ImagePositionPatient", where),
        orientation=_floats(ds.get("ImageOrientationPatient"), 6, "ImageOrientationPatient", where),
        pixel_spacing_mm=_floats(ds.get("PixelSpacing"), 2, "PixelSpacing", where),
        rows=rows,
        columns=columns,
        slope=slope,
        intercept=intercept,
        instance_number=str(ds.get("InstanceNumber", "?")),
    )


def _frame_planes(ds: pydicom.Dataset) -> list[SourcePlane]:
    """Planes of a multi-frame instance from its functional groups (per-frame first, then shared)."""
    rows, columns = _image_size(ds, "the multi-frame instance")
    per_frame = ds.get("PerFrameFunctionalGroupsSequence")
    shared = ds.get("SharedFunctionalGroupsSequence")
    shared_item = shared[0] if shared else None
    count = int(ds.get("NumberOfFrames", 1) or 1)
    if per_frame is None or len(per_frame) != count:
        raise ValueError(
            f"the multi-frame instance has {count} frames but "
            f"{0 if per_frame is None else len(per_frame)} per-frame functional group items"
        )

    planes = []
    for number, item in enumerate(per_frame, start=1):
        where = f"frame {number}"
        position = functional_group_value(item, shared_item, "PlanePositionSequence", "ImagePositionPatient")
        orientation = functional_group_value(item, shared_item, "PlaneOrientationSequence", "ImageOrientationPatient")
        spacing = functional_group_value(item, shared_item, "PixelMeasuresSequence", "PixelSpacing")
        transformation = functional_group_item(item, shared_item, "PixelValueTransformationSequence", "RescaleSlope")
        slope, intercept = _rescale(transformation, ds)
        planes.append(SourcePlane(
            dataset_index=0,
            frame_number=number,
            position_mm=_floats(position, 3, "ImagePositionPatient (PlanePositionSequence)", where),
            orientation=_floats(orientation, 6, "ImageOrientationPatient (PlaneOrientationSequence)", where),
            pixel_spacing_mm=_floats(spacing, 2, "PixelSpacing (PixelMeasuresSequence)", where),
            rows=rows,
            columns=columns,
            slope=slope,
            intercept=intercept,
        ))
    return planes


# ---------------------------------------------------------------- checks

def _check_consistent(planes: Sequence[SourcePlane]) -> None:
    """All planes share orientation, size and pixel spacing; else ValueError naming the difference."""
    first = planes[0]
    for plane in planes[1:]:
        if np.abs(np.subtract(plane.orientation, first.orientation)).max() > _ORIENTATION_TOLERANCE:
            raise ValueError(
                f"mixed orientations in the series: {plane.label()} has ImageOrientationPatient "
                f"{_fmt(plane.orientation)}, {first.label()} has {_fmt(first.orientation)}"
            )
        if (plane.rows, plane.columns) != (first.rows, first.columns):
            raise ValueError(
                f"mixed image sizes in the series: {plane.label()} is {plane.rows} x {plane.columns}, "
                f"{first.label()} is {first.rows} x {first.columns} (rows x columns)"
            )
        if not np.allclose(plane.pixel_spacing_mm, first.pixel_spacing_mm, rtol=_RELATIVE_TOLERANCE, atol=0):
            raise ValueError(
                f"mixed pixel spacings in the series: {plane.label()} has {_fmt(plane.pixel_spacing_mm)} mm, "
                f"{first.label()} has {_fmt(first.pixel_spacing_mm)} mm"
            )
    row_direction, column_direction = np.asarray(first.orientation[:3]), np.asarray(first.orientation[3:])
    if abs(np.linalg.norm(row_direction) - 1) > 0.01 or abs(np.linalg.norm(column_direction) - 1) > 0.01 \
            or abs(np.dot(row_direction, column_direction)) > 0.01:
        raise ValueError(f"ImageOrientationPatient {_fmt(first.orientation)} is not two orthogonal unit vectors")
    if min(first.pixel_spacing_mm) <= 0:
        raise ValueError(f"PixelSpacing {_fmt(first.pixel_spacing_mm)} must be positive")


def _normal_positions(planes: Sequence[SourcePlane]) -> np.ndarray:
    return positions_along(planes[0].normal, [p.position_mm for p in planes])


def _sorted_order(planes: Sequence[SourcePlane]) -> np.ndarray:
    """Indices of ``planes`` sorted along the slice normal."""
    return np.argsort(_normal_positions(planes), kind="stable")


def _check_spacing(sorted_planes: Sequence[SourcePlane], positions: np.ndarray, max_gap_factor: float) -> np.ndarray:
    """Gaps between neighbouring slices (mm); refuses duplicates and gaps beyond the factor."""
    gaps = np.diff(positions)
    typical = float(np.median(gaps))
    duplicate_limit = max(0.01, _RELATIVE_TOLERANCE * typical)
    for k in np.flatnonzero(gaps < duplicate_limit):
        a, b = sorted_planes[k], sorted_planes[k + 1]
        raise ValueError(
            f"duplicated slice positions: {a.label()} and {b.label()} lie {gaps[k]:.3f} mm apart along the slice "
            f"normal (at {positions[k]:.2f} mm); the series holds the same slice twice or overlapping acquisitions"
        )
    for k in np.flatnonzero(gaps > max_gap_factor * typical * (1 + _RELATIVE_TOLERANCE)):  # header rounding
        a, b = sorted_planes[k], sorted_planes[k + 1]
        raise ValueError(
            f"gap of {gaps[k]:.2f} mm between {a.label()} and {b.label()} is more than {max_gap_factor:g} x the "
            f"typical slice spacing ({typical:.2f} mm): slices are missing"
        )
    return gaps


# ---------------------------------------------------------------- geometry

def _check_voxel_count(shape: tuple[int, int, int], what: str) -> None:
    """Refuse to allocate a volume the headers make larger than MAX_VOXELS (slices, rows, columns)."""
    voxels = math.prod(int(n) for n in shape)
    if voxels > MAX_VOXELS:
        raise ValueError(f"{what} would have {shape[0]} x {shape[1]} x {shape[2]} = {voxels:,} voxels, more than "
                         f"the {MAX_VOXELS:,} allowed (the headers' Rows, Columns or slice positions are wrong)")


def _choose_grid(sorted_planes: Sequence[SourcePlane], positions: np.ndarray,
                 gaps: np.ndarray) -> tuple[_Grid, bool, float, list[str]]:
    """The volume grid; whether resampling is needed; tilt (deg); notes on the correction."""
    first = sorted_planes[0]
    u, v = np.asarray(first.orientation[:3]), np.asarray(first.orientation[3:])
    n = first.normal
    axes = np.stack([u, v, n])
    in_plane = np.array([[np.dot(u, p.position_mm), np.dot(v, p.position_mm)] for p in sorted_planes])
    row_mm, column_mm = first.pixel_spacing_mm
    shear_px = np.abs(in_plane - in_plane[0]) / np.array([column_mm, row_mm])
    span = float(positions[-1] - positions[0])
    stacking = np.asarray(sorted_planes[-1].position_mm) - np.asarray(first.position_mm)
    tilt_deg = math.degrees(math.acos(min(1.0, abs(float(np.dot(stacking, n))) / np.linalg.norm(stacking))))
    tilt_deg = 0.0 if tilt_deg < _TILT_NOISE_DEG else tilt_deg
    mean_gap = span / (len(positions) - 1)
    even = np.abs(gaps - mean_gap).max() <= _RELATIVE_TOLERANCE * mean_gap
    straight = shear_px.max() <= 0.01
    if even and straight:
        grid = _Grid(axes, np.array([*in_plane[0], positions[0]]), (column_mm, row_mm, mean_gap),
                     (first.columns, first.rows, len(positions)))
        return grid, False, tilt_deg, []
    typical = float(np.median(gaps))
    n_slices = int(math.ceil(span / typical - _RELATIVE_TOLERANCE)) + 1  # tolerance: rounding in the headers
    spacing = span / (n_slices - 1)
    low, high = in_plane.min(axis=0), in_plane.max(axis=0)
    columns = int(math.ceil((high[0] - low[0]) / column_mm - 1e-6)) + first.columns
    rows = int(math.ceil((high[1] - low[1]) / row_mm - 1e-6)) + first.rows
    _check_voxel_count((n_slices, rows, columns), "the resampled grid")
    grid = _Grid(axes, np.array([low[0], low[1], positions[0]]), (column_mm, row_mm, spacing), (columns, rows, n_slices))
    notes = []
    if not straight:
        notes.append(
            f"gantry tilt {tilt_deg:.1f} deg corrected: resampled onto a regular grid perpendicular to the "
            f"slices ({spacing:.2f} mm slice spacing)"
        )
    if not even:
        notes += _missing_slices(sorted_planes, gaps, typical) or [
            f"uneven slice spacing ({gaps.min():.2f} to {gaps.max():.2f} mm) resampled to a regular "
            f"{spacing:.2f} mm grid"
        ]
    return grid, True, tilt_deg, notes


def _missing_slices(sorted_planes: Sequence[SourcePlane], gaps: np.ndarray, typical: float) -> list[str]:
    """Notes naming the missing slices when the spacing is even but for whole multiples of it; else []."""
    multiples = np.rint(gaps / typical)
    whole = np.abs(gaps - multiples * typical) <= _RELATIVE_TOLERANCE * multiples * typical
    if not whole.all() or multiples.min() < 1:
        return []  # really uneven (as the GE sample's 1.08, 4 and 7 mm)
    notes = []
    for k in np.flatnonzero(multiples >= 2):
        count, plane = int(multiples[k]) - 1, sorted_planes[k]
        where = f"instance {plane.instance_number}" if plane.frame_number is None else f"frame {plane.frame_number}"
        notes.append(f"{count} slice{'s' if count > 1 else ''} missing after {where} (a gap of {gaps[k]:.2f} mm, "
                     f"interpolated across)")
    return notes


def _grid_of(image: sitk.Image) -> _Grid:
    axes = np.asarray(image.GetDirection(), float).reshape(3, 3).T
    origin_uvw = axes @ np.asarray(image.GetOrigin(), float)
    return _Grid(axes, origin_uvw, tuple(image.GetSpacing()), tuple(image.GetSize()))


_IDENTITY_2D = np.eye(2)


def _resample_stack(stack: np.ndarray, sorted_planes: Sequence[SourcePlane], grid: _Grid, *,
                    nearest: bool, fill: float) -> np.ndarray:
    """Resample a sorted stack of (possibly sheared, unevenly spaced) slices onto ``grid``.

    Each grid slice lies between two source slices along the normal:
    linear interpolation between them (nearest: the closer one), each
    source slice first shifted in its plane onto the grid's rows and
    columns (the shear of a tilted stack).
    """
    u, v, n = grid.axes
    positions = np.array([np.dot(n, p.position_mm) for p in sorted_planes])
    columns, rows, n_slices = grid.size
    column_mm, row_mm, slice_mm = grid.spacing
    order = 0 if nearest else 1
    placed: dict[int, np.ndarray] = {}

    def on_grid(k: int) -> np.ndarray:
        if k not in placed:
            plane = sorted_planes[k]
            offset = ((grid.origin_uvw[1] - np.dot(v, plane.position_mm)) / row_mm,
                      (grid.origin_uvw[0] - np.dot(u, plane.position_mm)) / column_mm)
            source = stack[k] if nearest else stack[k].astype(np.float32, copy=False)
            # A shift (identity matrix given whole: the 1-D "diagonal" form makes SciPy warn on every call).
            placed[k] = ndimage.affine_transform(source, _IDENTITY_2D, offset=offset, output_shape=(rows, columns),
                                                 order=order, mode="constant", cval=fill)
            for old in [key for key in placed if key < k - 1]:
                del placed[old]
        return placed[k]

    out = np.empty((n_slices, rows, columns), dtype=stack.dtype if nearest else np.float32)
    for j in tqdm(range(n_slices), desc="resampling slices", unit="slice", disable=None, leave=False):
        w = grid.origin_uvw[2] + j * slice_mm
        k = int(np.clip(np.searchsorted(positions, w, side="right") - 1, 0, len(positions) - 2))
        t = float(np.clip((w - positions[k]) / (positions[k + 1] - positions[k]), 0.0, 1.0))
        if nearest:
            out[j] = on_grid(k if t < 0.5 else k + 1)
        else:
            out[j] = (1.0 - t) * on_grid(k) + t * on_grid(k + 1) if t > 0 else on_grid(k)
    return out


def _plane_image(plane: SourcePlane, slice_mm: float) -> sitk.Image:
    """A one-slice image on exactly the plane of a source image (for resampling onto it)."""
    u, v = np.asarray(plane.orientation[:3]), np.asarray(plane.orientation[3:])
    image = sitk.Image([plane.columns, plane.rows, 1], sitk.sitkUInt8)
    image.SetOrigin([float(c) for c in plane.position_mm])
    image.SetSpacing([plane.pixel_spacing_mm[1], plane.pixel_spacing_mm[0], slice_mm])
    image.SetDirection([float(c) for c in np.stack([u, v, plane.normal]).T.ravel()])
    return image


def _check_same_grid(image: sitk.Image, reference: sitk.Image) -> None:
    if image.GetSize() != reference.GetSize():
        raise ValueError(f"label image size {image.GetSize()} differs from the volume's {reference.GetSize()}")
    for what, a, b in (("spacing", image.GetSpacing(), reference.GetSpacing()),
                       ("origin", image.GetOrigin(), reference.GetOrigin()),
                       ("direction", image.GetDirection(), reference.GetDirection())):
        if not np.allclose(a, b, atol=1e-3):
            raise ValueError(f"label image {what} {_fmt(a)} differs from the volume's {_fmt(b)}")
    if image.GetNumberOfComponentsPerPixel() != 1:
        raise ValueError("the label image must have one component per voxel")


# ---------------------------------------------------------------- pixels

def _read_pixels(headers: Sequence, planes: Sequence[SourcePlane]) -> np.ndarray:
    """HU (float32) of every plane, in ``planes`` order; any transfer syntax pydicom's plugins decode."""
    stack = np.empty((len(planes), planes[0].rows, planes[0].columns), np.float32)
    frames_by_dataset: dict[int, list[int]] = {}
    for index, plane in enumerate(planes):
        frames_by_dataset.setdefault(plane.dataset_index, []).append(index)
    for dataset_index, plane_indices in tqdm(sorted(frames_by_dataset.items()), desc="reading slices", unit="image",
                                             disable=None, leave=False):
        pixels = _decode(headers[dataset_index])
        if pixels.ndim == 2:
            pixels = pixels[np.newaxis]
        for index in plane_indices:
            plane = planes[index]
            frame = pixels[(plane.frame_number or 1) - 1]
            if frame.shape != (plane.rows, plane.columns):
                raise ValueError(f"{plane.label()}: pixel data of shape {frame.shape} for {plane.rows} x {plane.columns}")
            stack[index] = frame.astype(np.float32) * plane.slope + plane.intercept
    np.maximum(stack, AIR_HU, out=stack)
    return stack


def _decode(header) -> np.ndarray:
    """Pixel data of one instance file, decoded."""
    ds = pydicom.dcmread(header.path, force=True)
    where = f"instance number {ds.get('InstanceNumber', '?')}"
    if "PixelData" not in ds and "FloatPixelData" not in ds:
        raise ValueError(f"{where} has no pixel data")
    if int(ds.get("SamplesPerPixel", 1)) != 1:
        raise ValueError(f"{where} is a colour image ({ds.get('PhotometricInterpretation')}), not CT grey levels")
    problem = pixel_data_problem(ds) if "PixelData" in ds else None
    if problem is not None:
        raise ValueError(f"{where}: {problem}")
    syntax = getattr(getattr(ds, "file_meta", None), "TransferSyntaxUID", None)
    try:
        pixels = ds.pixel_array
    except Exception as error:  # decoders raise many types; the message names the syntax
        name = syntax.name if syntax is not None else "unknown transfer syntax"
        raise ValueError(f"cannot decode the pixel data of {where} ({name}): {error}") from error
    if str(ds.get("PhotometricInterpretation", "MONOCHROME2")) == "MONOCHROME1":
        raise ValueError(f"{where} is MONOCHROME1 (inverted grey levels), which CT does not use")
    return pixels


def _fmt(values) -> str:
    return "[" + ", ".join(f"{float(v):.4g}" for v in values) + "]"
