"""A picture of what the phantoms look like next to a real head CT (writes a PNG; not a test).

Six phantoms (``inference.phantoms.generator.make_phantom``, drawn slice thickness,
pose, noise, kernel and densities; 256 x 256 at 0.9 mm so it stays cheap) are shown
by their axial slice through the centroid of the labelled brain, in the brain window
W100/L30, each once plain and once with the truth as a label overlay; beside them
one axial slice of the real GE head of the ``dcm_qa_ct`` samples (an adult, 4 and 7 mm slabs,
gantry tilt 18.5 degrees: the slice with the most brain-density pixels), unpacked
into a temporary folder. The real scan is only displayed here, never used to make
or tune a phantom.

Each phantom costs 10-20 s of CPU (the 1 mm anatomy); the whole picture about 2 min.

examples:
  .venv/bin/python benchmarks/phantom_montage.py --out docs/phantoms.png
  .venv/bin/python benchmarks/phantom_montage.py --seeds 11 12 13 14 15 16 --out /tmp/m.png
"""
from __future__ import annotations

import argparse
import subprocess
import sys
import tempfile
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from tests.real_ct import real_ct_archive  # noqa: E402

PHANTOM_GRID = {"matrix": 256, "pixel_spacing_mm": 0.9}
PANEL_PIXELS = 240
#: A brain-density pixel of the real slice (HU), to pick the slice through the brain's widest part.
BRAIN_HU = (15.0, 50.0)


def phantom_panels(seed: int) -> tuple[np.ndarray, np.ndarray, float, str]:
    """(plain RGB, overlay RGB, pixel size in mm, caption) of one phantom's axial slice through its brain centre."""
    import SimpleITK as sitk

    from inference.montage import _colour_overlay, _window
    from inference.phantoms.generator import make_phantom

    phantom = make_phantom(seed, **PHANTOM_GRID)
    hu = sitk.GetArrayViewFromImage(phantom.image)
    labels = sitk.GetArrayViewFromImage(phantom.labels)
    k = int(round(np.argwhere(labels > 0)[:, 0].mean()))
    grey = _window(hu[k].astype(np.float32))
    meta = phantom.meta
    densities = meta["anatomy"]["densities"]
    caption = (f"seed {seed}  {meta['sex']} {meta['age_years']:.1f} y  {meta['slice_thickness_mm']:g} mm\n"
               f"GM {densities['grey_hu']:.0f} WM {densities['white_hu']:.0f} CSF {densities['csf_hu']:.0f} HU"
               f"  noise {meta['noise_hu']:.0f}")
    return (np.repeat(grey[:, :, None], 3, axis=2), _colour_overlay(grey, labels[k]), meta["pixel_spacing_mm"],
            caption)


def real_panel(archive: Path) -> tuple[np.ndarray, float, str]:
    """(RGB, pixel size in mm, caption) of the GE head's slice with the most brain-density pixels."""
    import pydicom

    from inference.montage import _window

    if not archive.is_file():
        raise FileNotFoundError(f"real CT samples missing: {archive} (set LOBEVOL_REAL_CT or --archive)")
    with tempfile.TemporaryDirectory() as folder:
        subprocess.run(["tar", "-xJf", str(archive), "-C", folder, "GE"], check=True)
        slices = [pydicom.dcmread(path) for path in sorted(Path(folder, "GE").iterdir()) if path.is_file()]
    if not slices:
        raise ValueError(f"no GE series in {archive}")

    def hu(ds) -> np.ndarray:
        return ds.pixel_array.astype(np.float32) * float(ds.RescaleSlope) + float(ds.RescaleIntercept)

    images = [hu(ds) for ds in slices]
    counts = [int(((image > BRAIN_HU[0]) & (image < BRAIN_HU[1])).sum()) for image in images]
    best = int(np.argmax(counts))
    ds = slices[best]
    caption = (f"real head CT (adult), GE {getattr(ds, 'ManufacturerModelName', '')}\n"
               f"{float(ds.SliceThickness):g} mm, tilt {float(getattr(ds, 'GantryDetectorTilt', 0)):g} deg")
    grey = _window(images[best])
    return np.repeat(grey[:, :, None], 3, axis=2), float(ds.PixelSpacing[1]), caption


def _tile(rgb: np.ndarray, pixel_mm: float, field_mm: float):
    """RGB resized so that ``field_mm`` spans PANEL_PIXELS, cropped or padded (black) to a square panel."""
    from PIL import Image

    size = max(1, round(rgb.shape[1] * pixel_mm * PANEL_PIXELS / field_mm))
    image = Image.fromarray(rgb).resize((size, round(rgb.shape[0] * size / rgb.shape[1])), Image.BILINEAR)
    panel = Image.new("RGB", (PANEL_PIXELS, PANEL_PIXELS))
    panel.paste(image, ((PANEL_PIXELS - image.width) // 2, (PANEL_PIXELS - image.height) // 2))
    return panel


def write_montage(seeds: list[int], archive: Path, out: Path, field_mm: float = 230.0) -> Path:
    """Two rows per three phantoms (plain, overlay) and the real slice on the right; PNG at ``out``."""
    from PIL import Image, ImageDraw
    from tqdm import tqdm

    phantoms = [phantom_panels(seed) for seed in tqdm(seeds, desc="phantoms", unit="case")]
    real, real_pixel, real_caption = real_panel(archive)

    caption_height, margin, columns = 34, 6, 3
    rows = 2 * ((len(phantoms) + columns - 1) // columns)
    width = (columns + 1) * (PANEL_PIXELS + margin) + margin
    height = rows * (PANEL_PIXELS + caption_height + margin) + margin + 20
    canvas = Image.new("RGB", (width, height), (255, 255, 255))
    draw = ImageDraw.Draw(canvas)
    draw.text((margin, 4), "Phantoms (axial slice through the brain centre, W100/L30; "
              "below each: the true labels) and a real head CT", fill=(0, 0, 0))
    for index, (plain, overlay, pixel, caption) in enumerate(phantoms):
        column, pair = index % columns, index // columns
        x = margin + column * (PANEL_PIXELS + margin)
        for row_in_pair, rgb in enumerate((plain, overlay)):
            y = 20 + margin + (2 * pair + row_in_pair) * (PANEL_PIXELS + caption_height + margin)
            canvas.paste(_tile(rgb, pixel, field_mm), (x, y))
            draw.text((x, y + PANEL_PIXELS + 2), caption if row_in_pair == 0 else "with the true labels",
                      fill=(0, 0, 0))
    x = margin + columns * (PANEL_PIXELS + margin)
    canvas.paste(_tile(real, real_pixel, field_mm), (x, 20 + margin))
    draw.text((x, 20 + margin + PANEL_PIXELS + 2), real_caption, fill=(0, 0, 0))
    out.parent.mkdir(parents=True, exist_ok=True)
    # 256 colours (median cut, no dither) keep the greys and the overlay at half the bytes.
    canvas.quantize(colors=256, method=Image.Quantize.MEDIANCUT, dither=Image.Dither.NONE).save(out, optimize=True)
    return out


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], epilog="examples:" + __doc__.split("examples:")[1],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path, default=ROOT / "docs" / "phantoms.png", metavar="PNG",
                        help="picture to write (default docs/phantoms.png)")
    parser.add_argument("--seeds", type=int, nargs="+", default=[1, 2, 3, 4, 5, 6], metavar="S",
                        help="phantom seeds (default 1-6; at most 9)")
    parser.add_argument("--archive", type=Path, default=None, metavar="TAR",
                        help="the real-CT samples (default: LOBEVOL_REAL_CT or shared/data/real-ct/dcm_qa_ct.tar.xz)")
    parser.add_argument("--threads", type=int, default=1, metavar="N", help="CPU threads for the generator (default 1)")
    args = parser.parse_args(argv)
    if not 1 <= len(args.seeds) <= 9 or min(args.seeds) < 0:
        parser.error(f"--seeds takes 1-9 non-negative seeds, got {args.seeds}")
    if args.threads < 1:
        parser.error(f"--threads must be at least 1, got {args.threads}")
    archive = args.archive or real_ct_archive()
    if not archive.is_file():   # before the phantoms' minutes of CPU
        parser.error(f"real CT samples missing: {archive} (set LOBEVOL_REAL_CT or --archive)")
    import SimpleITK as sitk

    sitk.ProcessObject.SetGlobalDefaultNumberOfThreads(args.threads)
    out = write_montage(args.seeds, archive, args.out)
    print(f"{out}: {len(args.seeds)} phantoms and one real slice, {out.stat().st_size / 1024:.0f} KiB")
    return 0


if __name__ == "__main__":
    sys.exit(main())
