"""Time the SEG and SR writers on a full-size series (prints figures; not a test).

The series is a synthetic 512 x 512 x N CT of the 10 regions
(``tests.output_fixtures``: an ellipsoid brain cut into lobes, exact labels), so
the figures are the writers' own: the SR's share is reading the SEG's frames
back and tracing each region's outline (``node.results.outlines``) plus building
the content tree. Also prints the SR's size and its outlines' vertex count.

examples:
  PYTHONPATH=$PWD .venv/bin/python benchmarks/sr_build.py
  PYTHONPATH=$PWD .venv/bin/python benchmarks/sr_build.py --slices 120 --repeat 3
"""
from __future__ import annotations

import argparse
import io
import tempfile
import time
from pathlib import Path

import highdicom as hd
import numpy as np

from node.results.seg import build_seg
from node.results.sr import build_sr
from tests.output_fixtures import (MODEL, ct_volume, hand_made_normative, region_labels, region_voxel_volumes_cm3,
                                   write_ct_series)

PIXEL_MM, SLICE_MM = 0.45, 0.625


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--slices", type=int, default=300)
    parser.add_argument("--repeat", type=int, default=2)
    args = parser.parse_args()
    labels = region_labels((args.slices, 512, 512))
    with tempfile.TemporaryDirectory() as folder:
        volume = ct_volume(write_ct_series(Path(folder), labels, pixel_spacing_mm=PIXEL_MM, slice_spacing_mm=SLICE_MM))
        normative = hand_made_normative(region_voxel_volumes_cm3(labels, PIXEL_MM * PIXEL_MM * SLICE_MM))
        for run in range(1, args.repeat + 1):
            started = time.perf_counter()
            seg = build_seg(volume, labels, MODEL)
            seg_s = time.perf_counter() - started
            started = time.perf_counter()
            sr = build_sr(volume, seg, normative, MODEL)
            sr_s = time.perf_counter() - started
            buffer = io.BytesIO()
            sr.save_as(buffer)
            report = hd.sr.MeasurementReport.from_sequence([sr])
            vertices = sum(np.asarray(g.roi.value).size // 2 for g in report.get_planar_roi_measurement_groups())
            print(f"run {run}: 512 x 512 x {args.slices}: build_seg {seg_s:.2f} s, build_sr {sr_s:.2f} s; "
                  f"SR {buffer.tell() / 1024:.0f} KiB, {vertices} outline vertices")


if __name__ == "__main__":
    main()
