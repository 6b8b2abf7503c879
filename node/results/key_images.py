"""Key images with the regions coloured over the CT, and their Secondary Capture series.

:func:`render_key_views` draws the axial, coronal and sagittal views (numpy
+ Pillow, colours from ``Region.rgb``); the PDF report and the overlay
images both use it. :func:`build_overlay_images` wraps each view, with the
volume table burned in, as an RGB Secondary Capture instance for PACS that
cannot display SEG: ImageType DERIVED\\SECONDARY, Burned In Annotation YES,
"NOT FOR DIAGNOSIS - DERIVED" written on every image.

Views are in radiological convention: patient right on the image left
(axial, coronal), anterior on the left (sagittal), superior at the top.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Sequence

import highdicom as hd
import numpy as np
import pydicom
import SimpleITK as sitk
from PIL import Image, ImageDraw, ImageFont

from inference.vocabulary import NUM_CLASSES, REGIONS
from node.results.derived import new_instance_arguments, source_names_as_they_are, with_required_patient_study

if TYPE_CHECKING:
    from normative.compare import NormativeResult

OVERLAY_SERIES_NUMBER = 9104
OVERLAY_SERIES_DESCRIPTION = "lobevol key images"
DERIVED_WARNING = "NOT FOR DIAGNOSIS - DERIVED"

#: Brain window of the paper (W100 / L30), in HU.
BRAIN_WINDOW_HU = (-20.0, 80.0)
OVERLAY_OPACITY = 0.45

#: Orientation letters (top, bottom, left, right) and DICOM Patient Orientation (row, column directions).
_VIEW_LETTERS = {
    "axial": ("A", "P", "R", "L"),
    "coronal": ("S", "I", "R", "L"),
    "sagittal": ("S", "I", "A", "P"),
}
_PATIENT_ORIENTATION = {"axial": ("L", "P"), "coronal": ("L", "F"), "sagittal": ("P", "F")}

_PALETTE = np.zeros((NUM_CLASSES, 3), dtype=np.float32)
for _region in REGIONS:
    _PALETTE[_region.value] = _region.rgb


@dataclass
class KeyView:
    """One rendered view.

    Attributes:
        name: "axial", "coronal" or "sagittal".
        image: RGB image, square pixels of ``pixel_mm`` millimetres.
        pixel_mm: size of one displayed pixel (mm).
        slice_index: index of the slice shown along the view's normal
            (z for axial, y for coronal, x for sagittal, on the LPS-oriented grid).
    """

    name: str
    image: Image.Image
    pixel_mm: float
    slice_index: int


def render_key_views(image: sitk.Image, labels: sitk.Image, *, size_px: int = 384,
                     slices: tuple[int, int, int] | None = None) -> list[KeyView]:
    """Axial, coronal and sagittal views through the labelled brain's centre.

    Args:
        image: CT in HU (any scalar type).
        labels: label map 0..10 with exactly the image's geometry.
        size_px: longest side of each rendered view (pixels).
        slices: the (axial, coronal, sagittal) slice indices to show instead, on the
            LPS-oriented grid (``KeyView.slice_index`` of another rendering: two label
            maps of one image then show the same cuts).

    Raises:
        ValueError: geometry mismatch, no labelled voxel, or a slice index off the grid.
    """
    if image.GetSize() != labels.GetSize() or not np.allclose(image.GetSpacing(), labels.GetSpacing()):
        raise ValueError(
            f"labels grid {labels.GetSize()} / {labels.GetSpacing()} differs from the image grid "
            f"{image.GetSize()} / {image.GetSpacing()}"
        )
    # Views of the arrays as LPS-oriented (z: I->S, y: A->P, x: R->L) whatever the source direction:
    # the three cuts are taken from them, no copy of the whole volume is made.
    axes, reversed_axes, spacing = _lps_arrangement(image)  # spacing (x, y, z) mm
    hu = _arranged(sitk.GetArrayViewFromImage(image), axes, reversed_axes)
    lab = _arranged(sitk.GetArrayViewFromImage(labels), axes, reversed_axes)
    labelled = _arranged_counts(sitk.GetArrayViewFromImage(labels) > 0, axes, reversed_axes)
    if not labelled[0].any():
        raise ValueError("the label map is empty: nothing to show")
    if slices is None:
        # The centre of the labelled voxels (the mean of their indices, from counts per slice).
        z, y, x = (int(round(float(np.dot(np.arange(n.size), n)) / n.sum())) for n in labelled)
        values = sitk.GetArrayViewFromImage(labels)
        z = _best_axial_slice(_arranged_counts((values >= 1) & (values <= 8), axes, reversed_axes)[0], z)
    else:
        z, y, x = (int(v) for v in slices)
        if not all(0 <= v < n for v, n in zip((z, y, x), lab.shape)):
            raise ValueError(f"slices (axial, coronal, sagittal) {tuple(slices)} lie outside the grid {lab.shape}")
    cuts = {
        # (2-D HU, 2-D labels, row spacing, column spacing); superior at the top.
        "axial": (hu[z], lab[z], spacing[1], spacing[0], z),
        "coronal": (hu[::-1, y, :], lab[::-1, y, :], spacing[2], spacing[0], y),
        "sagittal": (hu[::-1, :, x], lab[::-1, :, x], spacing[2], spacing[1], x),
    }
    return [
        _render(name, np.asarray(plane_hu, dtype=np.float32), np.asarray(plane_labels).astype(np.uint8),
                row_mm, col_mm, index, size_px)
        for name, (plane_hu, plane_labels, row_mm, col_mm, index) in cuts.items()
    ]


def _best_axial_slice(lobes_per_slice: np.ndarray, centre: int) -> int:
    """The axial slice showing the most lobe labels (1..8, counted per slice); the centre if none."""
    if not lobes_per_slice.any():
        return centre
    return int(np.argmax(lobes_per_slice))


def _lps_arrangement(image: sitk.Image) -> tuple[tuple[int, ...], tuple[bool, ...], tuple[float, ...]]:
    """How ``sitk.DICOMOrient(image, "LPS")`` rearranges the (z, y, x) array: for each axis of the
    oriented array, the source array's axis and whether it is reversed; and the oriented spacing
    (x, y, z). Read from DICOMOrient itself, on a 2 x 2 x 2 image of the same direction."""
    probe = sitk.GetImageFromArray(np.arange(8, dtype=np.uint8).reshape(2, 2, 2))
    probe.SetSpacing(image.GetSpacing())
    probe.SetDirection(image.GetDirection())
    oriented = sitk.DICOMOrient(probe, "LPS")
    values = sitk.GetArrayViewFromImage(oriented).astype(int)
    strides = (4, 2, 1)  # of the probe's (z, y, x) array
    steps = [int(values[step]) - int(values[0, 0, 0]) for step in ((1, 0, 0), (0, 1, 0), (0, 0, 1))]
    return tuple(strides.index(abs(d)) for d in steps), tuple(d < 0 for d in steps), oriented.GetSpacing()


def _arranged(array: np.ndarray, axes: Sequence[int], reversed_axes: Sequence[bool]) -> np.ndarray:
    """A view of ``array`` with its axes in ``axes`` order, those marked reversed reversed."""
    return np.transpose(array, axes)[tuple(slice(None, None, -1) if r else slice(None) for r in reversed_axes)]


def _arranged_counts(mask: np.ndarray, axes: Sequence[int], reversed_axes: Sequence[bool]) -> list[np.ndarray]:
    """Per axis of the arranged array, the number of ``mask`` voxels in each of its slices."""
    counts = []
    for axis, reverse in zip(axes, reversed_axes):
        per_slice = mask.sum(axis=tuple(a for a in range(3) if a != axis), dtype=np.int64)
        counts.append(per_slice[::-1] if reverse else per_slice)
    return counts


def _render(name, plane_hu, plane_labels, row_mm, col_mm, index, size_px) -> KeyView:
    low, high = BRAIN_WINDOW_HU
    grey = np.clip((plane_hu - low) / (high - low), 0.0, 1.0)[..., None] * 255.0
    colour = _PALETTE[plane_labels]
    alpha = np.where(plane_labels[..., None] > 0, OVERLAY_OPACITY, 0.0)
    rgb = (grey * (1 - alpha) + colour * alpha).astype(np.uint8)
    height_mm, width_mm = plane_hu.shape[0] * row_mm, plane_hu.shape[1] * col_mm
    pixel_mm = max(height_mm, width_mm) / size_px
    shape = (max(1, round(width_mm / pixel_mm)), max(1, round(height_mm / pixel_mm)))
    picture = Image.fromarray(rgb, "RGB").resize(shape, Image.Resampling.NEAREST)
    _draw_orientation_letters(picture, _VIEW_LETTERS[name])
    return KeyView(name, picture, pixel_mm, index)


def _draw_orientation_letters(picture: Image.Image, letters: tuple[str, str, str, str]) -> None:
    draw = ImageDraw.Draw(picture)
    font = ImageFont.load_default(size=max(10, picture.width // 28))
    w, h = picture.size
    top, bottom, left, right = letters
    placements = ((top, (w / 2, 4), "mt"), (bottom, (w / 2, h - 4), "mb"),
                  (left, (4, h / 2), "lm"), (right, (w - 4, h / 2), "rm"))
    for text, position, anchor in placements:
        draw.text(position, text, fill=(255, 255, 0), font=font, anchor=anchor)


def volume_table_rows(normative: NormativeResult) -> list[tuple[str, str, str, str]]:
    """(region, volume cm3, z-score, flag) as text: the header, the 10 regions, the total."""
    rows = [("Region", "cm3", "z", "flag")]
    for result in (*normative.regions, normative.total):
        name = "Total (10 regions)" if result.key == "total" else next(r.name for r in REGIONS if r.key == result.key)
        z = "-" if result.z_score is None else f"{result.z_score:+.1f}"
        rows.append((name, f"{result.volume_cm3:.1f}", z, result.flag or "-"))
    return rows


def _overlay_canvas(view: KeyView, normative, caption: str) -> np.ndarray:
    """The view on the left, the volume table (with colour keys) on the right, warnings on top and bottom."""
    font, big, mono = (ImageFont.load_default(size=n) for n in (14, 18, 13))
    panel_w, margin, line_h = 380, 36, 18
    width = view.image.width + panel_w
    height = max(view.image.height, 15 * line_h) + 2 * margin
    canvas = Image.new("RGB", (width, height), (0, 0, 0))
    canvas.paste(view.image, (0, margin))
    draw = ImageDraw.Draw(canvas)
    draw.text((width / 2, 8), DERIVED_WARNING, fill=(255, 64, 64), font=big, anchor="mt")
    draw.text((width / 2, height - 8), caption, fill=(200, 200, 200), font=font, anchor="mb")
    x0, y0 = view.image.width + 12, margin
    draw.text((x0, y0), f"{view.name.capitalize()} view, lobevol", fill=(255, 255, 255), font=big)
    y0 += 30
    for row, (name, volume, z, flag) in enumerate(volume_table_rows(normative)):
        y = y0 + row * line_h
        if 1 <= row <= len(REGIONS):
            draw.rectangle((x0, y + 2, x0 + 11, y + 13), fill=REGIONS[row - 1].rgb)
        # Columns drawn one by one: numbers right-aligned whatever the font.
        draw.text((x0 + 18, y), name, fill=(230, 230, 230), font=mono)
        draw.text((x0 + 226, y), volume, fill=(230, 230, 230), font=mono, anchor="ra")
        draw.text((x0 + 276, y), z, fill=(230, 230, 230), font=mono, anchor="ra")
        draw.text((x0 + 290, y), flag, fill=(230, 230, 230), font=mono)
    return np.asarray(canvas)


def build_overlay_images(
    views: Sequence[KeyView],
    normative: NormativeResult,
    source: pydicom.Dataset,
    *,
    series_number: int = OVERLAY_SERIES_NUMBER,
) -> list[hd.sc.SCImage]:
    """One RGB Secondary Capture image per key view, in the source study, new series.

    Args:
        views: from :func:`render_key_views`.
        normative: ``NormativeResult`` (its volumes, z-scores and flags are burned in).
        source: one source image of the analysed series (patient and study
            attributes are copied from it, and it is referenced).
        series_number: Series Number of the new series.
    """
    if not views:
        raise ValueError("no key views to write")
    series_uid = hd.UID()
    caption = f"{DERIVED_WARNING}: regions coloured over the CT; volumes in cm3, z vs {normative.reference.name}"
    images = []
    for number, view in enumerate(views, start=1):
        pixels = _overlay_canvas(view, normative, caption)
        with source_names_as_they_are():
            image = hd.sc.SCImage.from_ref_dataset(
                ref_dataset=with_required_patient_study([source])[0],
                pixel_array=pixels,
                photometric_interpretation=hd.PhotometricInterpretationValues.RGB,
                bits_allocated=8,
                coordinate_system=hd.CoordinateSystemNames.PATIENT,
                **new_instance_arguments(series_number, instance_number=number, series_instance_uid=series_uid),
                patient_orientation=_PATIENT_ORIENTATION[view.name],
                transfer_syntax_uid=pydicom.uid.ExplicitVRLittleEndian,
            )
        _mark_derived(image, view, source)
        images.append(image)
    return images


def _mark_derived(image: pydicom.Dataset, view: KeyView, source: pydicom.Dataset) -> None:
    image.ImageType = ["DERIVED", "SECONDARY", view.name.upper()]
    image.BurnedInAnnotation = "YES"
    # Naming the (unpaired) body part tells validators that no Laterality is due.
    image.BodyPartExamined = "HEAD"
    image.SeriesDescription = OVERLAY_SERIES_DESCRIPTION
    image.DerivationDescription = (
        f"{view.name} view of the CT (brain window) with lobevol's brain regions coloured over it "
        "and the volume table burned in; not for diagnosis"
    )
    reference = pydicom.Dataset()
    reference.ReferencedSOPClassUID = source.SOPClassUID
    reference.ReferencedSOPInstanceUID = source.SOPInstanceUID
    image.SourceImageSequence = [reference]
