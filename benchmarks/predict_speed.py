"""Prediction speed and memory on a full-size head CT (prints figures; not a test).

The target (set by the project's issue for the engine) is one
512 x 512 x 300 series at 0.625 mm segmented in under 20 s and 4 GB on 2 CPU
cores. The series is a synthetic phantom (``inference.phantoms.generator.make_phantom``,
cached as .mha so that repeated runs time prediction only). Prediction runs in
a fresh child process so that its peak resident memory (VmHWM of
/proc/self/status, which exec resets, unlike ``ru_maxrss``) is the prediction's,
not the phantom generator's.

The model is the bundled checkpoint when it exists; otherwise a ResU-Net of the
bundled architecture (3x3x3, channels 8-128, 1.5 mm) with random weights, which
costs the same time (the output says which).

examples:
  .venv/bin/python benchmarks/predict_speed.py
  .venv/bin/python benchmarks/predict_speed.py --threads 2 --no-tta --cache /tmp/lobevol-bench
  .venv/bin/python benchmarks/predict_speed.py --no-refine-surface   # without the surface refinement
"""
from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

SERIES = {"matrix": 512, "n_slices": 300, "slice_thickness_mm": 0.625, "pixel_spacing_mm": 0.45}
TARGET_S, TARGET_GB = 20.0, 4.0


def phantom_image(cache: Path, seed: int) -> Path:
    """The cached phantom image (.mha), generated on first use."""
    import SimpleITK as sitk

    path = cache / f"phantom-{seed}-{SERIES['matrix']}x{SERIES['n_slices']}.mha"
    if not path.exists():
        from inference.phantoms.generator import make_phantom

        print(f"generating phantom seed {seed} ({SERIES}) ...", flush=True)
        started = time.perf_counter()
        phantom = make_phantom(seed, **SERIES)
        cache.mkdir(parents=True, exist_ok=True)
        sitk.WriteImage(phantom.image, str(path), useCompression=False)
        sitk.WriteImage(phantom.labels, str(path.with_suffix(".labels.mha")), useCompression=True)
        (path.with_suffix(".json")).write_text(json.dumps(phantom.meta["volumes_cm3"]))
        print(f"  done in {time.perf_counter() - started:.0f} s -> {path}", flush=True)
    return path


def model_checkpoint(cache: Path) -> tuple[Path, str]:
    """The bundled checkpoint, or a random-weight one of the same architecture."""
    from inference.checkpoint import BUNDLED_CHECKPOINT, CheckpointMeta, save_checkpoint
    from inference.vocabulary import NUM_CLASSES, REGION_KEYS
    from inference.models import build_model
    from inference.preprocess import PreprocessConfig

    if BUNDLED_CHECKPOINT.exists():
        return BUNDLED_CHECKPOINT, f"bundled checkpoint {BUNDLED_CHECKPOINT.name}"
    import torch

    path = cache / "random-resunet333-8-128.pt"
    if not path.exists():
        torch.manual_seed(0)
        config = PreprocessConfig(spacing_mm=(1.5, 1.5, 1.5))
        channels = (8, 16, 32, 64, 128)
        meta = CheckpointMeta(format_version=1, architecture="resunet", kernel_size=(3, 3, 3), channels=channels,
                              num_classes=NUM_CLASSES, label_keys=tuple(REGION_KEYS), spacing_mm=config.spacing_mm,
                              preprocessing=config.to_dict(), trained_on="random weights (speed benchmark only)")
        save_checkpoint(path, build_model("resunet", (3, 3, 3), channels), meta)
    return path, "NO bundled checkpoint: ResU-Net 3x3x3 (8-128), 1.5 mm, RANDOM weights (timing only)"


def peak_resident_mb() -> float:
    """Peak resident memory of this process (MB)."""
    status = Path("/proc/self/status")
    if status.exists():
        for line in status.read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def cpu_seconds() -> float:
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


def measure(image_path: Path, checkpoint: Path, threads: int, tta: bool, refine_surface: bool, repeat: int) -> dict:
    """Child process: load, segment ``repeat`` times, report the median run and peak memory."""
    import numpy as np
    import SimpleITK as sitk

    from node.config import InferenceSettings
    from inference.factory import load_segmenter

    sitk.ProcessObject.SetGlobalDefaultNumberOfThreads(threads)
    image = sitk.ReadImage(str(image_path))
    baseline_mb = peak_resident_mb()
    started = time.perf_counter()
    segmenter = load_segmenter(InferenceSettings(device="cpu", threads=threads, model=checkpoint, tta=tta,
                                                 refine_surface=refine_surface, cross_check=False), progress=False)
    load_s = time.perf_counter() - started
    runs = []
    for _ in range(repeat):
        cpu = cpu_seconds()
        result = segmenter.segment(image)
        runs.append((result.timings_s["total"], result.timings_s, cpu_seconds() - cpu))
    runs.sort(key=lambda run: run[0])
    median_total, timings, cpu_s = runs[len(runs) // 2]
    peak_mb = peak_resident_mb()
    truth = json.loads(image_path.with_suffix(".json").read_text())
    labels = sitk.GetArrayFromImage(result.labels)
    true_labels = sitk.GetArrayFromImage(sitk.ReadImage(str(image_path.with_suffix(".labels.mha"))))
    return {"size": image.GetSize(), "spacing": image.GetSpacing(), "load_model_s": load_s,
            "timings_s": timings, "totals_s": [run[0] for run in runs], "cpu_s": cpu_s,
            "peak_rss_mb": peak_mb, "after_image_load_mb": baseline_mb,
            "labelled_cm3": float(sum(result.volumes_cm3.values())), "true_cm3": float(sum(truth.values())),
            "brain_overlap": float(2 * np.logical_and(labels > 0, true_labels > 0).sum()
                                   / max(1, (labels > 0).sum() + (true_labels > 0).sum())),
            "load_average": os.getloadavg()[0]}


def main(argv: list[str] | None = None) -> int:
    description, examples = __doc__.split("examples:")
    parser = argparse.ArgumentParser(description=description.strip(), epilog="examples:" + examples.rstrip(),
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--threads", type=int, default=2, help="CPU threads for torch and SimpleITK (default 2)")
    parser.add_argument("--tta", action=argparse.BooleanOptionalAction, default=True,
                        help="left-right flip test-time augmentation, as the node does by default (default on)")
    parser.add_argument("--refine-surface", action=argparse.BooleanOptionalAction, default=True,
                        help="surface refinement on the source grid, as the node does by default (default on)")
    parser.add_argument("--repeat", type=int, default=3,
                        help="segmentations to time; the median is shown (default 3)")
    parser.add_argument("--seed", type=int, default=11, help="phantom seed (default 11)")
    parser.add_argument("--cache", type=Path, default=Path(tempfile.gettempdir()) / "lobevol-bench",
                        help="folder for the cached phantom and random checkpoint")
    parser.add_argument("--child", nargs=2, metavar=("IMAGE", "CHECKPOINT"), help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.child:
        print(json.dumps(measure(Path(args.child[0]), Path(args.child[1]), args.threads, args.tta, args.refine_surface,
                                 args.repeat)))
        return 0

    image = phantom_image(args.cache, args.seed)
    checkpoint, model_note = model_checkpoint(args.cache)
    command = [sys.executable, __file__, "--tta" if args.tta else "--no-tta", "--threads", str(args.threads),
               "--refine-surface" if args.refine_surface else "--no-refine-surface",
               "--repeat", str(max(1, args.repeat)), "--child", str(image), str(checkpoint)]
    child = subprocess.run(command, capture_output=True, text=True, cwd=ROOT)
    if child.returncode != 0:
        print(child.stderr, file=sys.stderr)
        return child.returncode
    figures = json.loads(child.stdout.strip().splitlines()[-1])
    timings = figures["timings_s"]
    total, peak_gb = timings["total"], figures["peak_rss_mb"] / 1024
    print(f"model: {model_note}")
    print(f"series: {figures['size']} voxels at {tuple(round(s, 3) for s in figures['spacing'])} mm, "
          f"{args.threads} threads, TTA {'on' if args.tta else 'off'}, "
          f"surface refinement {'on' if args.refine_surface else 'off'}")
    print(f"  load model      {figures['load_model_s']:6.2f} s (once per process, not in the total)")
    for stage in ("preprocess", "preprocess_resample", "preprocess_mask", "preprocess_ahe", "inference",
                  "postprocess", "to_source", "surface", "volumes"):
        if stage in timings:
            print(f"  {stage:<15} {timings[stage]:6.2f} s")
    print(f"  total           {total:6.2f} s   (target < {TARGET_S:.0f} s: {'met' if total < TARGET_S else 'MISSED'}; "
          f"median of {len(figures['totals_s'])} runs: {', '.join(f'{t:.1f}' for t in figures['totals_s'])} s)")
    print(f"  CPU time {figures['cpu_s']:.1f} s over {args.threads} threads; machine load average "
          f"{figures['load_average']:.1f} (other work on the cores stretches wall times)")
    print(f"peak memory {peak_gb:.2f} GB resident (after imports and reading the image "
          f"{figures['after_image_load_mb'] / 1024:.2f} GB; "
          f"target < {TARGET_GB:.0f} GB: {'met' if peak_gb < TARGET_GB else 'MISSED'})")
    print(f"labelled {figures['labelled_cm3']:.0f} cm3 of {figures['true_cm3']:.0f} cm3 true brain, "
          f"brain overlap (Dice of label > 0) {figures['brain_overlap']:.3f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
