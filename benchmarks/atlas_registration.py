"""Atlas labelling (template registration) speed, memory and accuracy (prints figures; not a test).

Target (issue 18): a 512 x 512 x 300 study labelled in at most 3 min and 4 GB on
2 CPU cores. Each case runs in a fresh child process so that its peak resident
memory (VmHWM, reset by exec) is the labelling's, not the phantom generator's.

Cases:
  phantom:SEED       a synthetic phantom (``inference.phantoms.generator``); Dice against its truth
  phantom512:SEED    the same child as a 512 x 512 x 300 series at 0.625 mm (the target's size)
  PATH               a NIfTI/MHA head CT in HU (e.g. the GE head as the pipeline loads it)

Backends:
  ants   the product's registration (:class:`inference.atlas.registration.AtlasSegmenter`)
  sitk   SimpleITK's own registration for comparison: the same affine start (Mattes MI,
         four levels), then a B-spline free-form deformation (6^3 mesh, Mattes MI, LBFGSB 20 iterations, 3 levels),
         labels warped nearest-neighbour; every other step identical.

examples:
  .venv/bin/python benchmarks/atlas_registration.py phantom512:910001
  .venv/bin/python benchmarks/atlas_registration.py phantom:910001 phantom:910002 --backend sitk
  .venv/bin/python benchmarks/atlas_registration.py /tmp/ge_head.nii.gz --montage /tmp/ge.png
  .venv/bin/python benchmarks/atlas_registration.py /tmp/ge_head.nii.gz --network
      also the bundled network on the same image: Dice and volumes network vs atlas, and the
      hemisphere agreement (share of the voxels both call cerebral that both put on one side)
"""
from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

TARGET_S, TARGET_GB = 180.0, 4.0
FULL_SIZE = {"matrix": 512, "n_slices": 300, "slice_thickness_mm": 0.625, "pixel_spacing_mm": 0.45}


def case_files(case: str, cache: Path) -> tuple[Path, Path | None]:
    """(image, truth labels or None) files of a case, phantoms generated and cached on first use."""
    import SimpleITK as sitk

    if not case.startswith(("phantom:", "phantom512:")):
        return Path(case), None
    kind, seed = case.split(":")
    path = cache / f"{kind}-{seed}.mha"
    if not path.exists():
        from inference.phantoms.generator import make_phantom

        print(f"generating {case} ...", flush=True)
        phantom = make_phantom(int(seed), **(FULL_SIZE if kind == "phantom512" else {}))
        cache.mkdir(parents=True, exist_ok=True)
        sitk.WriteImage(phantom.image, str(path))
        sitk.WriteImage(phantom.labels, str(path.with_suffix(".labels.mha")), useCompression=True)
    return path, path.with_suffix(".labels.mha")


def sitk_segmenter(threads: int):
    """An AtlasSegmenter whose registration is SimpleITK's (affine + B-spline FFD), for comparison."""
    import numpy as np
    import SimpleITK as sitk

    from inference.atlas.bundle import load_template
    from inference.atlas.registration import SKULL_MARGIN_MM, AtlasSegmenter, isotropic_grid
    from inference.preprocess import resample_to

    class SimpleITKAtlasSegmenter(AtlasSegmenter):
        def grid_labels(self, image, grid, timings):
            low, high = self.settings.hu_range
            fixed = resample_to(image, isotropic_grid(grid, self.settings.spacing_mm, SKULL_MARGIN_MM))
            fixed = sitk.Clamp(fixed, sitk.sitkFloat32, low, high) - low
            moving = load_template()
            started = time.perf_counter()
            initial = sitk.CenteredTransformInitializer(fixed, moving, sitk.AffineTransform(3),
                                                        sitk.CenteredTransformInitializerFilter.MOMENTS)
            method = sitk.ImageRegistrationMethod()
            method.SetMetricAsMattesMutualInformation(32)
            method.SetMetricSamplingStrategy(method.RANDOM)
            method.SetMetricSamplingPercentage(0.25, seed=self.settings.seed)
            method.SetInterpolator(sitk.sitkLinear)
            method.SetOptimizerAsRegularStepGradientDescent(1.0, 1e-4, 300, relaxationFactor=0.7)
            method.SetOptimizerScalesFromPhysicalShift()
            method.SetShrinkFactorsPerLevel([8, 4, 2, 1])
            method.SetSmoothingSigmasPerLevel([3, 2, 1, 0])
            method.SetInitialTransform(initial, inPlace=True)
            method.Execute(fixed, moving)
            timings["affine"] = time.perf_counter() - started
            mark = time.perf_counter()
            bspline = sitk.BSplineTransformInitializer(fixed, [6, 6, 6], order=3)
            deform = sitk.ImageRegistrationMethod()
            deform.SetMetricAsMattesMutualInformation(32)
            deform.SetMetricSamplingStrategy(deform.RANDOM)
            deform.SetMetricSamplingPercentage(0.25, seed=self.settings.seed)
            deform.SetInterpolator(sitk.sitkLinear)
            deform.SetOptimizerAsLBFGSB(gradientConvergenceTolerance=1e-5, numberOfIterations=20)
            deform.SetShrinkFactorsPerLevel([4, 2, 1])
            deform.SetSmoothingSigmasPerLevel([2, 1, 0])
            deform.SetMovingInitialTransform(initial)
            deform.SetInitialTransform(bspline, inPlace=True)
            deform.Execute(fixed, moving)
            timings["deformable"] = time.perf_counter() - mark
            timings["registration"] = time.perf_counter() - started
            composite = sitk.CompositeTransform([initial, bspline])
            mark = time.perf_counter()
            warped = sitk.Resample(self.atlas, grid, composite, sitk.sitkNearestNeighbor, 0, sitk.sitkUInt8)
            timings["warp"] = time.perf_counter() - mark
            return np.asarray(sitk.GetArrayFromImage(warped), dtype=np.uint8)

    return SimpleITKAtlasSegmenter(threads=threads, progress=False)


def network_vs_atlas(image, atlas_labels, threads: int) -> dict:
    """The bundled network on ``image`` against the atlas labels: Dice, volumes, hemisphere agreement."""
    from inference.metrics import dice_per_region, hemisphere_agreement
    from inference.predict import Segmenter

    network = Segmenter(threads=threads, progress=False).segment(image)
    agreement = hemisphere_agreement(network.labels, atlas_labels)
    return {"dice_network_vs_atlas": {k: round(v, 3) for k, v in dice_per_region(network.labels, atlas_labels).items()},
            "network_volumes_cm3": {k: round(v, 1) for k, v in network.volumes_cm3.items()},
            "hemisphere_agreement": None if agreement is None else round(agreement, 3)}


def run_case(image_path: Path, truth_path: Path | None, backend: str, threads: int, montage: Path | None,
             network: bool = False) -> dict:
    """One labelling in this process: figures as a dict."""
    import SimpleITK as sitk

    from inference.atlas.registration import AtlasSegmenter
    from inference.metrics import dice_per_region

    image = sitk.ReadImage(str(image_path))
    segmenter = AtlasSegmenter(threads=threads, progress=False) if backend == "ants" else sitk_segmenter(threads)
    started = time.perf_counter()
    segmentation = segmenter.segment(image)
    elapsed = time.perf_counter() - started
    peak_kb = next(int(line.split()[1]) for line in open("/proc/self/status") if line.startswith("VmHWM"))
    result = {"size": list(image.GetSize()), "spacing_mm": [round(s, 3) for s in image.GetSpacing()],
              "seconds": round(elapsed, 1), "peak_gb": round(peak_kb / 1024 ** 2, 2),
              "timings_s": {k: round(v, 1) for k, v in segmentation.timings_s.items()},
              "volumes_cm3": {k: round(v, 1) for k, v in segmentation.volumes_cm3.items()}}
    if truth_path is not None:
        dice = dice_per_region(segmentation.labels, sitk.ReadImage(str(truth_path)))
        result["dice"] = {k: round(v, 3) for k, v in dice.items()}
        result["mean_dice"] = round(sum(dice.values()) / len(dice), 3)
    if network:
        result.update(network_vs_atlas(image, segmentation.labels, threads))
    if montage is not None:
        from inference.montage import save_montage

        save_montage(image, segmentation.labels, montage, title=f"{image_path.name}: atlas ({backend})")
    return result


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter, epilog=__doc__)
    parser.add_argument("cases", nargs="+", help="phantom:SEED, phantom512:SEED or an image path")
    parser.add_argument("--backend", choices=("ants", "sitk"), default="ants")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--cache", type=Path, default=Path("/tmp/lobevol-atlas-bench"))
    parser.add_argument("--montage", type=Path, default=None, help="QC montage PNG (one case)")
    parser.add_argument("--network", action="store_true",
                        help="also run the bundled network and compare it with the atlas labels")
    parser.add_argument("--child", nargs=2, metavar=("IMAGE", "TRUTH"), help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.child:
        truth = None if args.child[1] == "-" else Path(args.child[1])
        print(json.dumps(run_case(Path(args.child[0]), truth, args.backend, args.threads, args.montage,
                                  args.network)))
        return 0
    for case in args.cases:
        image, truth = case_files(case, args.cache)
        command = [sys.executable, __file__, case, "--child", str(image), str(truth or "-"),
                   "--backend", args.backend, "--threads", str(args.threads)]
        if args.montage is not None:
            command += ["--montage", str(args.montage)]
        if args.network:
            command.append("--network")
        output = subprocess.run(command, check=True, stdout=subprocess.PIPE, text=True).stdout
        result = json.loads(output.strip().splitlines()[-1])
        verdict = "within" if result["seconds"] <= TARGET_S and result["peak_gb"] <= TARGET_GB else "OUTSIDE"
        print(f"{case} [{args.backend}, {args.threads} threads] {result['size']}: {result['seconds']} s, "
              f"peak {result['peak_gb']} GB ({verdict} the {TARGET_S:.0f} s / {TARGET_GB:.0f} GB target); "
              f"stages {result['timings_s']}")
        if "dice" in result:
            print(f"  Dice vs truth: mean {result['mean_dice']}, {result['dice']}")
        print(f"  volumes cm3: {result['volumes_cm3']}", flush=True)
        if "dice_network_vs_atlas" in result:
            print(f"  network vs atlas Dice: {result['dice_network_vs_atlas']}")
            print(f"  network volumes cm3: {result['network_volumes_cm3']}")
            print(f"  hemisphere agreement: {result['hemisphere_agreement']}", flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
