"""A montage PNG of a CT volume with its label overlay: axial, coronal and sagittal.

For looking at phantoms (``lobevol phantom --montage``) and at segmentations: one row
of three planes through the centre of the labelled brain in the brain window
(W100/L30), each shown twice (plain, and with the labels in their region colours),
resampled to square pixels so anatomy keeps its proportions.
"""
from __future__ import annotations

from pathlib import Path

import numpy as np
import SimpleITK as sitk
from PIL import Image, ImageDraw

from inference.vocabulary import REGIONS

WINDOW_CENTRE_HU = 30.0
WINDOW_WIDTH_HU = 100.0
OVERLAY_OPACITY = 0.45
PANEL_PIXELS = 320


def _window(array: np.ndarray, centre: float = WINDOW_CENTRE_HU, width: float = WINDOW_WIDTH_HU) -> np.ndarray:
    """HU -> uint8 grey levels of a display window."""
    low = centre - width / 2.0
    return (np.clip((array - low) / width, 0.0, 1.0) * 255.0).astype(np.uint8)


def _colour_overlay(grey: np.ndarray, labels: np.ndarray) -> np.ndarray:
    """RGB (H, W, 3) of grey levels with labelled pixels tinted in their region colour."""
    rgb = np.repeat(grey[:, :, None].astype(np.float32), 3, axis=2)
    for region in REGIONS:
        mask = labels == region.value
        if mask.any():
            rgb[mask] = (1 - OVERLAY_OPACITY) * rgb[mask] + OVERLAY_OPACITY * np.array(region.rgb, np.float32)
    return rgb.astype(np.uint8)


def _panel(plane: np.ndarray, row_mm: float, col_mm: float, resample) -> Image.Image:
    """A 2D plane as a PIL image with square pixels, fitted into PANEL_PIXELS."""
    height_mm, width_mm = plane.shape[0] * row_mm, plane.shape[1] * col_mm
    factor = PANEL_PIXELS / max(height_mm, width_mm)
    size = (max(1, round(width_mm * factor)), max(1, round(height_mm * factor)))
    return Image.fromarray(plane).resize(size, resample)


def _planes(array: np.ndarray, centre: tuple[int, int, int]):
    """Axial, coronal and sagittal planes (k, j, i array) through ``centre``; superior at the top."""
    k, j, i = centre
    return (array[k], array[::-1, j, :], array[::-1, :, i])


def save_montage(image: sitk.Image, labels: sitk.Image, path: Path | str, *, title: str = "") -> Path:
    """Write the montage PNG of ``image`` (HU) with ``labels`` (0..10) on the same grid.

    Planes pass through the centroid of the labelled voxels (the volume centre when
    there are none). Array axes are shown as acquired (rows of a slice top-down,
    slices bottom-up), so a tilted series looks as a scanner shows it.

    Raises:
        ValueError: when image and labels are not on one grid.
    """
    if image.GetSize() != labels.GetSize():
        raise ValueError(f"image size {image.GetSize()} and label size {labels.GetSize()} differ")
    hu = sitk.GetArrayViewFromImage(image).astype(np.float32)
    lab = sitk.GetArrayViewFromImage(labels)
    labelled = np.argwhere(lab > 0)
    centre = tuple(int(v) for v in (labelled.mean(axis=0) if len(labelled) else np.array(hu.shape) / 2))
    sx, sy, sz = image.GetSpacing()
    spacings = ((sy, sx), (sz, sx), (sz, sy))
    panels = []
    for plane_hu, plane_lab, (row_mm, col_mm) in zip(_planes(hu, centre), _planes(lab, centre), spacings):
        grey = _window(plane_hu)
        plain = _panel(np.repeat(grey[:, :, None], 3, axis=2), row_mm, col_mm, Image.BILINEAR)
        overlay_lab = np.asarray(_panel(plane_lab, row_mm, col_mm, Image.NEAREST))
        overlay = Image.fromarray(_colour_overlay(np.asarray(plain)[:, :, 0], overlay_lab))
        panels.append((plain, overlay))
    margin, header = 6, 22 if title else 0
    width = sum(p.width for p, _ in panels) + margin * (len(panels) + 1)
    height = header + 2 * PANEL_PIXELS + 3 * margin
    canvas = Image.new("RGB", (width, height), (0, 0, 0))
    x = margin
    for plain, overlay in panels:
        canvas.paste(plain, (x, header + margin))
        canvas.paste(overlay, (x, header + 2 * margin + PANEL_PIXELS))
        x += plain.width + margin
    if title:
        ImageDraw.Draw(canvas).text((margin, 4), title, fill=(255, 255, 255))
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    canvas.save(path)
    return path
