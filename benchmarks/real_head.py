"""A model on a real head CT against the atlas-registration labels (prints figures; not a test).

For the model card (issues 19 and 26): the network (``inference.predict.Segmenter``
with its defaults: flip TTA, surface refinement) and the template registration
(``inference.atlas.registration.AtlasSegmenter``, as ``lobevol segment --method atlas``)
label the same image; the script prints

- per region: Dice of the network against the atlas labels, network cm3, atlas cm3, their
  difference, and issue 26's targets (Dice >= 0.85 for every lobe and the cerebellum, the
  brainstem has none; every region's volume within 10 % of the atlas's);
- the hemisphere agreement (share of the voxels both call cerebral that both put on the
  same side; target >= 0.98);
- the anatomical relations (``inference.anatomy_checks``) of both label maps (target: all hold);
- one line per target, met or not. The exit status is 0 whatever the figures.

It writes key images (the node's renderer, ``node.results.key_images``: radiological
convention, brain window) of both label maps into --out, on the same cuts (those the
renderer picks for the atlas labels): network.png, atlas.png (axial, coronal, sagittal
side by side), comparison.png (the two rows), and both label maps
(network_labels.nii.gz, atlas_labels.nii.gz) to open in a viewer.

The atlas labels take 30-90 s of registration; they are cached in --cache under the
SHA-256 of the image (voxels and geometry), of the bundled atlas data and of the
registration settings, so a second run (another checkpoint on the same head) only runs
the network, against the same reference: the registration is not bit-repeatable (three
fresh registrations of the GE head, 1 thread, moved the bundled model's Dice by up to
0.02: right parietal 0.290-0.310, cerebellum 0.136-0.139; the atlas's cerebellum
147.4-149.7 cm3). --no-cache registers afresh. Volumes are counted as the node reports them: on the source slices for
DICOM input (a tilted series is resampled for the models), on the image grid otherwise.
Dice and the hemisphere agreement are on the image grid.

The real scans in shared/data/real-ct are TEST material: never train or tune on them.

examples:
  mkdir -p /tmp/realct && tar -xJf /work/shared/data/real-ct/dcm_qa_ct.tar.xz -C /tmp/realct
  .venv/bin/python benchmarks/real_head.py /tmp/realct/GE --threads 1 --out /tmp/real-head
      the bundled model on the GE head (28 tilted 4 mm slices)
  .venv/bin/python benchmarks/real_head.py /tmp/realct/GE --model runs/gen3/best.pt \\
      --out /tmp/real-head-gen3 --json /tmp/real-head-gen3.json
      a new checkpoint on the same head (the atlas labels come from the cache), all figures as JSON
  .venv/bin/python benchmarks/real_head.py head.nii.gz --out /tmp/head
      a NIfTI (or .mha, .nrrd) head CT in HU
"""
from __future__ import annotations

import argparse
import hashlib
import json
import math
import sys
import time
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import numpy as np  # noqa: E402
import SimpleITK as sitk  # noqa: E402

#: The targets on the real head (issue 26): Dice against the atlas labels, volumes, hemisphere agreement.
LOBE_DICE_TARGET = 0.85
CEREBELLUM_DICE_TARGET = 0.85
VOLUME_DIFFERENCE_TARGET_PERCENT = 10.0
HEMISPHERE_TARGET = 0.98
DEFAULT_CACHE = Path("/tmp/lobevol-real-head-cache")


@dataclass
class HeadImage:
    """The image both methods label, and how its volumes are counted.

    Attributes:
        image: HU on the grid the models see.
        source: what was read (folder or file) and which series.
        volume: the ``node.dicom.volume.SeriesVolume`` for DICOM input (volumes on its source
            slices), None for an image file.
    """

    image: sitk.Image
    source: str
    volume: object | None = None

    def volumes_cm3(self, labels: sitk.Image) -> dict[str, float]:
        from inference.predict import measure_volumes

        if self.volume is None:
            return measure_volumes(labels)
        return self.volume.region_volumes_cm3(self.volume.labels_on_source_slices(labels))


def load_head(path: Path) -> HeadImage:
    """A DICOM folder (the series the node would choose) or an image file in HU."""
    if not path.exists():
        raise FileNotFoundError(f"{path} does not exist")
    if path.is_file():
        return HeadImage(sitk.ReadImage(str(path)), str(path))
    from node.dicom.files import find_dicom_files, group_by_study
    from node.dicom.selection import select_series
    from node.dicom.volume import load_series_volume

    studies = group_by_study(find_dicom_files(path))
    if len(studies) != 1:
        raise ValueError(f"{path} holds {len(studies)} DICOM studies; give a folder of one study (or an image file)")
    (series,) = studies.values()
    selection = select_series(series)
    if selection.chosen is None:
        raise ValueError(f"no head CT series to analyse under {path}: {selection.summary()}")
    volume = load_series_volume(series[selection.chosen])
    for note in volume.notes:
        print(f"note: {note}")
    return HeadImage(volume.image, f"{path} ({selection.labels[selection.chosen]})", volume)


def image_sha256(image: sitk.Image) -> str:
    """SHA-256 of the voxels (as float32) and the geometry: the same head gives the same key."""
    digest = hashlib.sha256()
    digest.update(np.ascontiguousarray(sitk.GetArrayViewFromImage(image), dtype=np.float32).tobytes())
    geometry = (image.GetSize(), image.GetSpacing(), image.GetOrigin(), image.GetDirection())
    digest.update(repr(tuple(tuple(round(v, 6) for v in part) for part in geometry)).encode())
    return digest.hexdigest()


def atlas_labels(image: sitk.Image, cache: Path | None, threads: int) -> tuple[sitk.Image, dict]:
    """The atlas's labels of ``image`` (from the cache when this image was registered before), and a record."""
    from dataclasses import asdict

    from inference.atlas.registration import AtlasSegmenter, RegistrationSettings, atlas_sha256

    settings = RegistrationSettings()
    key = hashlib.sha256(f"{image_sha256(image)} {atlas_sha256()} {asdict(settings)}".encode()).hexdigest()
    path = cache / f"{key}.labels.mha" if cache is not None else None
    if path is not None and path.is_file():
        labels = sitk.ReadImage(str(path))
        if labels.GetSize() != image.GetSize():
            raise ValueError(f"cached atlas labels {path} do not fit the image: delete the file")
        labels.CopyInformation(image)  # the key covers the geometry; this only drops file rounding
        record = json.loads(path.with_suffix(".json").read_text()) if path.with_suffix(".json").is_file() else {}
        return labels, {**record, "from_cache": True, "cached": str(path)}
    segmenter = AtlasSegmenter(settings, threads=threads, progress=True)
    started = time.perf_counter()
    labels = segmenter.segment(image).labels
    record = {"seconds": round(time.perf_counter() - started, 1), "threads": threads,
              "weights_sha256": segmenter.model["weights_sha256"], "from_cache": False, "cached": None}
    if path is not None:
        path.parent.mkdir(parents=True, exist_ok=True)
        sitk.WriteImage(labels, str(path), useCompression=True)
        record["cached"] = str(path)
        path.with_suffix(".json").write_text(json.dumps({k: record[k] for k in ("seconds", "threads",
                                                                                "weights_sha256")}) + "\n")
    return labels, record


def volume_difference_percent(network_cm3: float, atlas_cm3: float) -> float:
    """The network's volume against the atlas's, in percent of the atlas's (inf when the atlas has none)."""
    from inference.metrics import percent_difference

    difference = percent_difference(network_cm3, atlas_cm3)
    return float("inf") if difference is None else difference


def dice_target(key: str) -> float | None:
    """The issue's Dice target of a region (None: no target)."""
    from inference.vocabulary import region_by_key

    region = region_by_key(key)
    if region.structure == "cerebellum":
        return CEREBELLUM_DICE_TARGET
    return LOBE_DICE_TARGET if region.laterality is not None else None


def key_images(image: sitk.Image, network: sitk.Image, atlas: sitk.Image, out: Path, title: str) -> list[Path]:
    """network.png, atlas.png (three views each) and comparison.png (both rows) in ``out``.

    Both show the same cuts, the ones the renderer picks for the atlas labels.
    """
    from PIL import Image, ImageDraw

    from node.results.key_images import render_key_views

    atlas_views = render_key_views(image, atlas)
    network_views = render_key_views(image, network, slices=tuple(v.slice_index for v in atlas_views))

    def strip(views, caption: str) -> Image.Image:
        header, gap = 20, 4
        canvas = Image.new("RGB", (sum(v.image.width for v in views) + gap * (len(views) - 1),
                                   header + max(v.image.height for v in views)))
        x = 0
        for view in views:
            canvas.paste(view.image, (x, header))
            x += view.image.width + gap
        ImageDraw.Draw(canvas).text((4, 3), caption, fill=(255, 255, 255))
        return canvas

    cuts = ", ".join(f"{v.name} {v.slice_index}" for v in atlas_views)
    out.mkdir(parents=True, exist_ok=True)
    rows = {"network": strip(network_views, f"network: {title} (LPS slices {cuts})"),
            "atlas": strip(atlas_views, f"atlas registration: {title} (LPS slices {cuts})")}
    paths = []
    for name, row in rows.items():
        paths.append(out / f"{name}.png")
        row.save(paths[-1])
    both = Image.new("RGB", (max(r.width for r in rows.values()), sum(r.height for r in rows.values())))
    both.paste(rows["network"], (0, 0))
    both.paste(rows["atlas"], (0, rows["network"].height))
    paths.append(out / "comparison.png")
    both.save(paths[-1])
    for name, labels in (("network", network), ("atlas", atlas)):
        paths.append(out / f"{name}_labels.nii.gz")
        sitk.WriteImage(labels, str(paths[-1]), useCompression=True)
    return paths


def measure(args: argparse.Namespace) -> dict:
    """Both labellings, their agreement, relations and key images: all figures as plain data."""
    from inference.anatomy_checks import anatomical_relations
    from inference.metrics import dice_per_region, hemisphere_agreement
    from inference.predict import Segmenter
    from inference.vocabulary import REGION_KEYS

    head = load_head(args.input)
    print(f"image: {head.source}, {head.image.GetSize()} voxels of "
          f"{', '.join(f'{s:.2f}' for s in head.image.GetSpacing())} mm", flush=True)
    network = Segmenter(args.model, threads=args.threads, progress=True)
    started = time.perf_counter()
    network_labels = network.segment(head.image).labels
    network_seconds = time.perf_counter() - started
    atlas, atlas_record = atlas_labels(head.image, None if args.no_cache else args.cache, args.threads)
    dice = dice_per_region(network_labels, atlas)
    network_cm3, atlas_cm3 = head.volumes_cm3(network_labels), head.volumes_cm3(atlas)
    agreement = hemisphere_agreement(network_labels, atlas)
    relations = {name: [{**c._asdict(), "value": None if math.isnan(c.value) else c.value}
                        for c in anatomical_relations(labels)]
                 for name, labels in (("network", network_labels), ("atlas", atlas))}
    at_least = [{"what": f"Dice {key}", "value": dice[key], "target": dice_target(key)}
                for key in REGION_KEYS if dice_target(key) is not None]
    at_least.append({"what": "hemisphere agreement", "value": agreement, "target": HEMISPHERE_TARGET})
    at_least.append({"what": "relations that hold (network)", "value": sum(c["passed"] for c in relations["network"]),
                     "target": len(relations["network"])})
    at_most = [{"what": f"|volume difference| {key} (%)",
                "value": abs(volume_difference_percent(network_cm3[key], atlas_cm3[key])),
                "target": VOLUME_DIFFERENCE_TARGET_PERCENT} for key in REGION_KEYS]
    for target in at_least:
        target.update(comparison=">=", met=target["value"] is not None and target["value"] >= target["target"])
    for target in at_most:
        target.update(comparison="<=", met=target["value"] <= target["target"])
    targets = at_least + at_most
    images = key_images(head.image, network_labels, atlas, args.out, f"{args.input.name}, {network.checkpoint.name}")
    return {
        "input": head.source,
        "size": list(head.image.GetSize()),
        "spacing_mm": [round(s, 4) for s in head.image.GetSpacing()],
        "model": {"checkpoint": str(network.checkpoint), "weights_sha256": network.model.get("weights_sha256"),
                  "seconds": round(network_seconds, 1), "threads": args.threads},
        "atlas": atlas_record,
        "dice_network_vs_atlas": dice,
        "network_cm3": network_cm3,
        "atlas_cm3": atlas_cm3,
        "hemisphere_agreement": agreement,
        "relations": relations,
        "targets": targets,
        "key_images": [str(p) for p in images],
    }


def report(result: dict) -> str:
    """The printed tables of :func:`measure`'s figures."""
    from inference.vocabulary import REGION_KEYS

    lines = [f"model {result['model']['checkpoint']} ({result['model']['seconds']} s, "
             f"{result['model']['threads']} thread(s)); atlas labels "
             + (f"from {result['atlas']['cached']}" if result["atlas"]["from_cache"]
                else f"registered in {result['atlas']['seconds']} s ({result['atlas']['threads']} thread(s))"),
             "",
             f"{'region':<22}{'Dice':>7}{'target':>8}{'network cm3':>13}{'atlas cm3':>11}{'diff %':>9}"]
    for key in REGION_KEYS:
        target = dice_target(key)
        difference = volume_difference_percent(result["network_cm3"][key], result["atlas_cm3"][key])
        lines.append(f"{key:<22}{result['dice_network_vs_atlas'][key]:>7.3f}"
                     f"{'-' if target is None else f'{target:.2f}':>8}{result['network_cm3'][key]:>13.1f}"
                     f"{result['atlas_cm3'][key]:>11.1f}{difference:>+9.1f}")
    lines.append(f"{'total':<22}{'':>15}{sum(result['network_cm3'].values()):>13.1f}"
                 f"{sum(result['atlas_cm3'].values()):>11.1f}")
    agreement = result["hemisphere_agreement"]
    lines += ["", f"hemisphere agreement: {'n/a' if agreement is None else f'{agreement:.3f}'} "
                  f"(target {HEMISPHERE_TARGET})", "",
              f"{'anatomical relation':<80}{'network':>10}{'':>6}{'atlas':>10}{'':>6}  criterion"]
    def cell(check: dict) -> str:
        value = "n/a" if check["value"] is None else f"{check['value']:.3g}"
        return f"{value:>10}{'' if check['passed'] else '  FAIL':>6}"

    for net, atl in zip(result["relations"]["network"], result["relations"]["atlas"]):
        lines.append(f"{net['relation']:<80}{cell(net)}{cell(atl)}  {net['criterion']}")
    for name in ("network", "atlas"):
        checks = result["relations"][name]
        lines.append(f"{name}: {sum(c['passed'] for c in checks)} of {len(checks)} relations hold")
    met = [t for t in result["targets"] if t["met"]]
    lines += ["", f"targets (issue 26): {len(met)} of {len(result['targets'])} met"]
    for target in result["targets"]:
        value = "n/a" if target["value"] is None else f"{target['value']:.3f}"
        lines.append(f"  {'met    ' if target['met'] else 'NOT MET'} {target['what']}: {value} "
                     f"(target {target['comparison']} {target['target']})")
    lines += ["", "key images: " + ", ".join(result["key_images"])]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter, epilog=__doc__)
    parser.add_argument("input", type=Path, metavar="INPUT",
                        help="a DICOM folder of one study (the series the node would choose is used) "
                             "or an image file in HU (.nii, .nii.gz, .mha, .nrrd)")
    parser.add_argument("--model", type=Path, default=None, metavar="CKPT",
                        help="network checkpoint (default: the bundled inference/weights/resunet333_phantom.pt)")
    parser.add_argument("--out", type=Path, default=Path("/tmp/lobevol-real-head"), metavar="DIR",
                        help="folder for the key images and label maps (default %(default)s)")
    parser.add_argument("--cache", type=Path, default=DEFAULT_CACHE, metavar="DIR",
                        help="folder of cached atlas labels, keyed by the image's SHA-256 (default %(default)s)")
    parser.add_argument("--no-cache", action="store_true", help="register again and keep nothing")
    parser.add_argument("--threads", type=int, default=2,
                        help="CPU threads for torch, SimpleITK and ANTs (default %(default)s; 1 beside a training run)")
    parser.add_argument("--json", type=Path, default=None, metavar="FILE", help="also write every figure as JSON")
    args = parser.parse_args(argv)
    if args.threads < 1:
        parser.error(f"--threads must be at least 1, got {args.threads}")
    try:
        result = measure(args)
    except (FileNotFoundError, ValueError) as error:  # bad input: the reason, without a traceback
        parser.exit(2, f"real_head.py: error: {error}\n")
    print(report(result), flush=True)
    if args.json is not None:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(result, indent=2) + "\n")
        print(f"figures: {args.json}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
