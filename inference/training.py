"""Training: cases prepared by the inference preprocessing, patches, augmentation, Adam, checkpoints.

The pieces are small and separate so that ``lobevol train`` and ``lobevol
compare`` use exactly the same ones:

- :func:`prepare_case` puts an image and its labels through
  :func:`inference.preprocess.preprocess_image` (the same call prediction
  makes) and :func:`inference.preprocess.labels_to_grid`;
- :class:`CaseCache` keeps prepared cases on disk (``.npz``), so a second run
  on the same data starts at once;
- :func:`sample_patch`, :func:`random_flip` and :func:`random_rotation_and_zoom` are the
  training-only transforms (the paper's random flips and rotations; a
  left-right flip swaps the right and left labels, or the model would learn
  that the sides are interchangeable);
- :func:`train` runs the loop: Adam, cross-entropy (+ soft Dice when asked),
  a progress bar, validation Dice per epoch, ``last.pt`` (resumable) and
  ``best.pt`` (to ship) checkpoints, deterministic seeds.
"""
from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
import math
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Iterable, Sequence

import numpy as np
import SimpleITK as sitk
import torch
import torch.nn.functional as F

from inference.checkpoint import CheckpointMeta, FORMAT_VERSION, read_checkpoint, save_checkpoint
from inference.vocabulary import NUM_CLASSES, REGION_KEYS, Precision, left_right_permutation
from inference.metrics import dice_per_region
from inference.models import MODEL_DIVISOR, build_model
from inference.preprocess import PreprocessConfig, labels_to_grid, preprocess_image

log = logging.getLogger(__name__)


LR_DECAYS = ("poly", "constant")

#: TrainConfig fields added after runs were saved, with the value those runs trained with:
#: an older ``last.pt`` lacks them and resumes as the run it was.
SETTINGS_BEFORE_THEY_EXISTED = {"zoom_range": [1.0, 1.0]}


def cpu_has_native_bfloat16() -> bool:
    """Whether oneDNN runs bfloat16 on this CPU natively (emulated bfloat16 is slower than float32)."""
    try:
        return bool(torch.backends.mkldnn.is_available() and torch.ops.mkldnn._is_mkldnn_bf16_supported())
    except (AttributeError, RuntimeError):
        return False


def autocast_dtype(device: torch.device, precision: Precision) -> torch.dtype | None:
    """The dtype ``torch.autocast`` runs the forward pass in, or None for float32."""
    precision = Precision(precision)
    if precision is Precision.FLOAT32:
        return None
    if precision is Precision.BFLOAT16:
        return torch.bfloat16
    if device.type == "cuda":
        return torch.float16
    return torch.bfloat16 if device.type == "cpu" and cpu_has_native_bfloat16() else None


def _autocast(device: torch.device, dtype: torch.dtype | None):
    return torch.autocast(device.type, dtype=dtype, enabled=dtype is not None)


@dataclass(frozen=True)
class TrainConfig:
    """Everything that defines a training run (saved in the checkpoint).

    Attributes:
        architecture, kernel_size, channels: the network (see ``build_model``).
        preprocessing: the preprocessing (working spacing in mm, window, AHE...).
        epochs: passes of ``iterations_per_epoch`` optimiser steps each.
        iterations_per_epoch: optimiser steps per epoch.
        batch_size: patches per step (the paper uses 4).
        patch_size: (z, y, x) voxels of a training patch; multiples of 16. The
            default covers most of a child's cropped head at 1.5 mm: inference sees
            the whole head in one pass, so training sees nearly as much context
            (what smaller patches cost: README, *Training*).
        learning_rate: Adam's step size (the paper uses 1e-5 over 200 epochs;
            1e-3 suits the short CPU budgets of this project).
        lr_decay: "poly" lowers the step size each epoch as
            ``learning_rate * (1 - epoch / epochs) ** 0.9`` (nnU-Net's schedule: large
            steps early, fine ones at the end); "constant" keeps it.
        dice_weight: weight of the soft Dice term added to cross-entropy (0 = CE only).
        flip_probability: chance of a left-right flip (labels swapped) per patch.
        rotation_deg: largest random rotation about each axis, in degrees.
        zoom_range: (smallest, largest) linear magnification of a patch's content, drawn
            log-uniformly; (1, 1) = none. Children's heads span a wide range of sizes (an
            infant's brain is half a two-year-old's, an adolescent's a third larger), more
            than the phantoms' cohort draws.
        seed: seed of every random choice (patches, augmentation, weights).
    """

    architecture: str = "resunet"
    kernel_size: tuple[int, int, int] = (3, 3, 3)
    channels: tuple[int, ...] = (8, 16, 32, 64, 128)
    preprocessing: PreprocessConfig = field(default_factory=PreprocessConfig)
    epochs: int = 40
    iterations_per_epoch: int = 50
    batch_size: int = 1
    patch_size: tuple[int, int, int] = (96, 112, 96)
    learning_rate: float = 1e-3
    lr_decay: str = "poly"
    dice_weight: float = 1.0
    flip_probability: float = 0.5
    rotation_deg: float = 10.0
    zoom_range: tuple[float, float] = (0.85, 1.2)
    seed: int = 2025

    def __post_init__(self) -> None:
        if self.epochs < 1 or self.iterations_per_epoch < 1 or self.batch_size < 1:
            raise ValueError("epochs, iterations per epoch and batch size must be at least 1")
        if any(p % MODEL_DIVISOR for p in self.patch_size) or len(self.patch_size) != 3:
            raise ValueError(f"patch size {self.patch_size} must be three multiples of {MODEL_DIVISOR}")
        if not self.learning_rate > 0:
            raise ValueError(f"learning rate must be positive, got {self.learning_rate}")
        if self.lr_decay not in LR_DECAYS:
            raise ValueError(f"learning-rate decay {self.lr_decay!r} is not one of {', '.join(LR_DECAYS)}")
        if not 0 <= self.flip_probability <= 1:
            raise ValueError(f"flip probability must be within 0..1, got {self.flip_probability}")
        low, high = self.zoom_range
        if not 0 < low <= 1 <= high:
            raise ValueError(f"zoom range {self.zoom_range} must be (smallest, largest) with 0 < smallest <= 1 <= largest")

    def to_dict(self) -> dict:
        values = dataclasses.asdict(self)
        values["preprocessing"] = self.preprocessing.to_dict()
        return values


@dataclass
class TrainingCase:
    """One prepared case on the working grid: the network's input, its labels and mask."""

    name: str
    array: np.ndarray   # float32 (z, y, x)
    labels: np.ndarray  # uint8 (z, y, x)
    mask: np.ndarray    # bool (z, y, x), intracranial


def prepare_case(name: str, image: sitk.Image, labels: sitk.Image, config: PreprocessConfig) -> TrainingCase:
    """Preprocess an image (HU) and bring its labels onto the same working grid."""
    if image.GetSize() != labels.GetSize():
        raise ValueError(f"case {name}: image size {image.GetSize()} differs from labels size {labels.GetSize()}")
    prepared = preprocess_image(image, config)
    grid_labels = labels_to_grid(labels, prepared.grid)
    grid_labels[~prepared.mask] = 0
    return TrainingCase(name, prepared.array.astype(np.float32), grid_labels, prepared.mask)


class CaseCache:
    """Prepared cases stored as ``<folder>/<name>.npz``, keyed also by the preprocessing."""

    def __init__(self, folder: Path, config: PreprocessConfig):
        key = json.dumps(config.to_dict(), sort_keys=True)
        digest = hashlib.sha256(key.encode()).hexdigest()[:10]
        self.folder = Path(folder) / f"prep-{digest}"
        self.folder.mkdir(parents=True, exist_ok=True)
        self.config = config

    def get(self, name: str, load: Callable[[], tuple[sitk.Image, sitk.Image]]) -> TrainingCase:
        path = self.folder / f"{name}.npz"
        if path.exists():
            with np.load(path) as data:
                return TrainingCase(name, data["array"], data["labels"], data["mask"])
        image, labels = load()
        case = prepare_case(name, image, labels, self.config)
        temporary = path.with_suffix(".tmp.npz")
        np.savez_compressed(temporary, array=case.array, labels=case.labels, mask=case.mask)
        temporary.replace(path)
        return case


# --- training-only transforms -------------------------------------------------------------

def sample_patch(case: TrainingCase, patch_size: Sequence[int], rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    """A random (z, y, x) patch of image and labels, zero-padded where the case is smaller."""
    array, labels = case.array, case.labels
    pads = [(0, max(0, p - s)) for p, s in zip(patch_size, array.shape)]
    if any(after for _, after in pads):
        array, labels = np.pad(array, pads), np.pad(labels, pads)
    starts = [int(rng.integers(0, s - p + 1)) for s, p in zip(array.shape, patch_size)]
    window = tuple(slice(b, b + p) for b, p in zip(starts, patch_size))
    return array[window], labels[window]


def random_flip(images: torch.Tensor, labels: torch.Tensor, probability: float,
                generator: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    """Mirror left-right (x, the last axis) with the right/left labels swapped, per batch item."""
    permutation = torch.tensor(left_right_permutation(), device=labels.device)
    for item in range(images.shape[0]):
        if torch.rand((), generator=generator) < probability:
            images[item] = images[item].flip(-1)
            labels[item] = permutation[labels[item].flip(-1)]
    return images, labels


def random_rotation_and_zoom(images: torch.Tensor, labels: torch.Tensor, max_deg: float,
                    generator: torch.Generator,
                    zoom_range: tuple[float, float] = (1.0, 1.0)) -> tuple[torch.Tensor, torch.Tensor]:
    """Rotate each patch about its centre by up to ``max_deg`` on each axis and magnify its
    content by a factor drawn log-uniformly from ``zoom_range``, in one resampling
    (image: linear, labels: nearest)."""
    zooming = tuple(zoom_range) != (1.0, 1.0)
    if max_deg <= 0 and not zooming:
        return images, labels
    angles = (torch.rand(images.shape[0], 3, generator=generator) * 2 - 1) * math.radians(max(max_deg, 0.0))
    theta = torch.stack([_rotation_matrix(a) for a in angles])
    if zooming:
        low, high = (math.log(z) for z in zoom_range)
        zoom = torch.exp(low + (high - low) * torch.rand(images.shape[0], generator=generator))
        # affine_grid maps output to input coordinates: a content magnified z times samples 1/z as far.
        theta = theta / zoom.reshape(-1, 1, 1)
    theta = torch.cat([theta, torch.zeros(images.shape[0], 3, 1)], dim=2).to(images)
    grid = F.affine_grid(theta, list(images.shape), align_corners=False)
    rotated = F.grid_sample(images, grid, mode="bilinear", padding_mode="zeros", align_corners=False)
    rotated_labels = F.grid_sample(labels[:, None].float(), grid, mode="nearest", padding_mode="zeros",
                                   align_corners=False)[:, 0].long()
    return rotated, rotated_labels


def _rotation_matrix(angles: torch.Tensor) -> torch.Tensor:
    a, b, c = angles.tolist()
    rx = torch.tensor([[1, 0, 0], [0, math.cos(a), -math.sin(a)], [0, math.sin(a), math.cos(a)]])
    ry = torch.tensor([[math.cos(b), 0, math.sin(b)], [0, 1, 0], [-math.sin(b), 0, math.cos(b)]])
    rz = torch.tensor([[math.cos(c), -math.sin(c), 0], [math.sin(c), math.cos(c), 0], [0, 0, 1]])
    return (rz @ ry @ rx).float()


# --- loss and validation -----------------------------------------------------------------

def _to_model_layout(batch: torch.Tensor) -> torch.Tensor:
    """A (n, c, z, y, x) batch in the channels-last layout the network is kept in during
    training (oneDNN's and cuDNN's fastest 3D convolutions)."""
    return batch.contiguous(memory_format=torch.channels_last_3d)


def segmentation_loss(logits: torch.Tensor, labels: torch.Tensor, dice_weight: float) -> torch.Tensor:
    """Multi-class cross-entropy plus ``dice_weight`` x (1 - mean soft Dice of the regions)."""
    loss = F.cross_entropy(logits, labels)
    if dice_weight > 0:
        probabilities = logits.float().softmax(dim=1)[:, 1:]
        one_hot = F.one_hot(labels, NUM_CLASSES).permute(0, 4, 1, 2, 3)[:, 1:].float()
        dims = (0, 2, 3, 4)
        intersection = (probabilities * one_hot).sum(dims)
        dice = (2 * intersection + 1.0) / (probabilities.sum(dims) + one_hot.sum(dims) + 1.0)
        loss = loss + dice_weight * (1 - dice.mean())
    return loss


@torch.inference_mode()
def predict_case(model: torch.nn.Module, case: TrainingCase, device: torch.device,
                 precision: Precision = Precision.AUTO) -> np.ndarray:
    """Labels of a prepared case from one whole-volume pass (validation; the array fits)."""
    tensor = _to_model_layout(torch.from_numpy(case.array)[None, None].to(device))
    with _autocast(device, autocast_dtype(device, precision)):
        logits = model(tensor)
    labels = logits.argmax(1)[0].cpu().numpy().astype(np.uint8)
    labels[~case.mask] = 0
    return labels


# --- the loop -----------------------------------------------------------------------------

@dataclass
class TrainResult:
    """Where the checkpoints are and how validation went."""

    last: Path
    best: Path
    best_epoch: int
    best_dice: float
    history: list[dict]


def choose_device(device: str = "auto") -> torch.device:
    """``auto``: the first CUDA device when there is one, else the CPU."""
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    chosen = torch.device(device)
    if chosen.type == "cuda" and not torch.cuda.is_available():
        raise RuntimeError(f"device {device} asked for, but torch sees no CUDA device")
    return chosen


def train(
    config: TrainConfig,
    training: Sequence[TrainingCase],
    validation: Sequence[TrainingCase],
    out_dir: Path,
    *,
    trained_on: str,
    device: str = "auto",
    resume: bool = False,
    initial: tuple[torch.nn.Module, CheckpointMeta] | None = None,
    progress: bool = True,
    precision: Precision = Precision.AUTO,
) -> TrainResult:
    """Train a network; write ``out_dir/last.pt`` every epoch and ``out_dir/best.pt`` on improvement.

    Args:
        config: the run's definition.
        training: prepared training cases.
        validation: prepared validation cases (mean region Dice picks ``best.pt``);
            empty = the last epoch is the best.
        out_dir: checkpoint folder (created).
        trained_on: description stored in the checkpoints.
        device: "auto", "cpu" or "cuda[:N]".
        resume: continue from ``out_dir/last.pt`` when it exists (same config required).
        initial: a loaded checkpoint, ``(model, meta)`` as ``load_checkpoint`` returns it, whose
            weights the run starts from (fine-tuning) instead of random ones; its network and
            preprocessing must be the config's. A resumed run continues from ``last.pt`` and
            ignores it.
        progress: show a progress bar per epoch.
        precision: the forward pass's arithmetic (see :class:`Precision`); not part of the
            run's definition, so a run may resume on another device.
    """
    from tqdm import tqdm

    if not training:
        raise ValueError("no training cases")
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    torch_device = choose_device(device)
    torch.manual_seed(config.seed)
    # Channels-last before the optimiser takes the parameters: the layout change may replace them.
    model = build_model(config.architecture, config.kernel_size, config.channels).to(
        torch_device, memory_format=torch.channels_last_3d)
    dtype = autocast_dtype(torch_device, precision)
    log.info("training on %s in %s", torch_device, "float32" if dtype is None else f"{dtype} mixed precision")
    optimizer = torch.optim.Adam(model.parameters(), lr=config.learning_rate)
    # Only float16 can underflow gradients; bfloat16 has float32's range.
    scaler = torch.amp.GradScaler(enabled=dtype is torch.float16)
    start_epoch, history, best_dice, best_epoch = 0, [], -1.0, 0
    last, best = out_dir / "last.pt", out_dir / "best.pt"
    if resume and last.exists():
        start_epoch, history, best_dice, best_epoch = _resume(last, model, optimizer, config, torch_device)
        log.info("resuming at epoch %d of %d from %s", start_epoch + 1, config.epochs, last)
    elif initial is not None:
        model.load_state_dict(_initial_state(initial, config))
        log.info("starting from the weights %s", initial[1].weights_sha256[:12])
    meta = _meta(config, trained_on)
    for epoch in range(start_epoch, config.epochs):
        started = time.monotonic()
        loss = _train_epoch(model, optimizer, scaler, config, training, epoch, torch_device, dtype, progress, tqdm)
        scores = validation_dice(model, validation, torch_device, precision)
        mean_dice = float(np.mean(list(scores.values()))) if scores else float("nan")
        history.append({"epoch": epoch + 1, "loss": loss, "val_mean_dice": mean_dice,
                        "seconds": round(time.monotonic() - started, 1)})
        improved = not validation or mean_dice > best_dice
        if improved:
            best_dice, best_epoch = (mean_dice if validation else float("nan")), epoch + 1
            metrics = {"validation_mean_dice": best_dice, "validation_dice": scores, "epoch": epoch + 1,
                       "validation_cases": len(validation), "training_cases": len(training)}
            save_checkpoint(best, model, dataclasses.replace(meta, metrics=metrics))
        state = {"epoch": epoch + 1, "optimizer": optimizer.state_dict(), "history": history,
                 "best_dice": best_dice, "best_epoch": best_epoch, "config": _plain_config(config)}
        save_checkpoint(last, model, dataclasses.replace(meta, metrics={"epoch": epoch + 1}), training_state=state)
        message = (f"epoch {epoch + 1}/{config.epochs}: loss {loss:.4f}"
                   + (f", validation mean Dice {mean_dice:.4f}" if validation else "")
                   + (" (best)" if improved and validation else ""))
        # One line per epoch, also without bars (a nohup log is then the run's record).
        if progress:
            tqdm.write(message)
        else:
            print(message, flush=True)
    return TrainResult(last, best, best_epoch, best_dice, history)


def _train_epoch(model, optimizer, scaler, config: TrainConfig, cases: Sequence[TrainingCase], epoch: int,
                 device: torch.device, dtype: torch.dtype | None, progress: bool, tqdm) -> float:
    model.train()
    for group in optimizer.param_groups:
        group["lr"] = learning_rate_at(config, epoch)
    # One generator per epoch from (seed, epoch): a resumed run draws what the uninterrupted one would.
    rng = np.random.default_rng([config.seed, epoch])
    generator = torch.Generator().manual_seed(int(rng.integers(2 ** 31)))
    losses = []
    bar = tqdm(range(config.iterations_per_epoch), desc=f"epoch {epoch + 1}/{config.epochs}", unit="step",
               disable=not progress, leave=False)
    for _ in bar:
        picks = rng.integers(0, len(cases), config.batch_size)
        patches = [sample_patch(cases[i], config.patch_size, rng) for i in picks]
        images = torch.from_numpy(np.stack([p[0] for p in patches]))[:, None]
        labels = torch.from_numpy(np.stack([p[1] for p in patches]).astype(np.int64))
        images, labels = random_flip(images, labels, config.flip_probability, generator)
        images, labels = random_rotation_and_zoom(images, labels, config.rotation_deg, generator, config.zoom_range)
        images, labels = _to_model_layout(images.to(device)), labels.to(device)
        optimizer.zero_grad(set_to_none=True)
        with _autocast(device, dtype):
            logits = model(images)
        loss = segmentation_loss(logits.float(), labels, config.dice_weight)
        scaler.scale(loss).backward()
        scaler.step(optimizer)
        scaler.update()
        losses.append(float(loss.detach()))
        bar.set_postfix(loss=f"{np.mean(losses[-20:]):.4f}")
    return float(np.mean(losses))


def learning_rate_at(config: TrainConfig, epoch: int) -> float:
    """Adam's step size during ``epoch`` (0-based) under the config's decay."""
    if config.lr_decay == "constant":
        return config.learning_rate
    return config.learning_rate * (1.0 - epoch / config.epochs) ** 0.9


def validation_dice(model, cases: Sequence[TrainingCase], device: torch.device,
                    precision: Precision = Precision.AUTO) -> dict[str, float]:
    """Mean Dice per region over prepared cases (whole-volume passes on the working grid)."""
    if not cases:
        return {}
    model.eval()
    per_case = [dice_per_region(predict_case(model, case, device, precision), case.labels) for case in cases]
    return {key: float(np.mean([scores[key] for scores in per_case])) for key in REGION_KEYS}


def _meta(config: TrainConfig, trained_on: str) -> CheckpointMeta:
    return CheckpointMeta(
        format_version=FORMAT_VERSION, architecture=config.architecture, kernel_size=config.kernel_size,
        channels=tuple(config.channels), num_classes=NUM_CLASSES, label_keys=tuple(REGION_KEYS),
        spacing_mm=tuple(config.preprocessing.spacing_mm), preprocessing=config.preprocessing.to_dict(),
        trained_on=trained_on,
    )


def _plain_config(config: TrainConfig) -> dict:
    return json.loads(json.dumps(config.to_dict()))


def network_settings(meta: CheckpointMeta) -> dict:
    """The TrainConfig fields that a checkpoint fixes: network and preprocessing (for fine-tuning)."""
    from inference.preprocess import PreprocessConfig

    return dict(architecture=meta.architecture, kernel_size=tuple(meta.kernel_size), channels=tuple(meta.channels),
                preprocessing=PreprocessConfig.from_dict(meta.preprocessing))


def _initial_state(initial: tuple[torch.nn.Module, CheckpointMeta], config: TrainConfig) -> dict:
    """The loaded checkpoint's weights, refused unless its network and preprocessing are ``config``'s."""
    model, meta = initial
    mismatches = [f"{name} {theirs} (this run: {getattr(config, name)})"
                  for name, theirs in network_settings(meta).items() if getattr(config, name) != theirs]
    if mismatches:
        raise ValueError(f"cannot start from the checkpoint with weights {meta.weights_sha256[:12]}: it has "
                         + "; ".join(mismatches))
    return model.state_dict()


def _resume(path: Path, model, optimizer, config: TrainConfig, device) -> tuple[int, list, float, int]:
    payload = read_checkpoint(path)
    state = payload.get("training_state")
    if not state:
        raise ValueError(f"{path} holds no training state; it cannot be resumed")
    # More epochs may be asked for on resume; everything else must be the run's own.
    saved = {**SETTINGS_BEFORE_THEY_EXISTED, **state["config"]}
    wanted = _plain_config(config)
    saved.pop("epochs"), wanted.pop("epochs")
    if saved != wanted:
        raise ValueError(f"{path} was written by a run with other settings; start a new output folder "
                         "or repeat the same options")
    model.load_state_dict(payload["state_dict"])
    optimizer.load_state_dict(state["optimizer"])
    return int(state["epoch"]), list(state["history"]), float(state["best_dice"]), int(state["best_epoch"])


# --- data sources -------------------------------------------------------------------------

def k_fold_split(names: Sequence[str], folds: int, fold: int, seed: int) -> tuple[list[str], list[str]]:
    """Deterministic k-fold split: (training names, validation names) for ``fold`` (0-based)."""
    if folds < 2 or not 0 <= fold < folds:
        raise ValueError(f"fold {fold} of {folds}: need folds >= 2 and 0 <= fold < folds")
    if len(names) < folds:
        raise ValueError(f"{len(names)} cases cannot be split into {folds} folds")
    order = list(np.random.default_rng(seed).permutation(sorted(names)))
    validation = order[fold::folds]
    return [n for n in order if n not in validation], validation


def find_image_label_pairs(folder: Path) -> list[tuple[str, Path, Path]]:
    """Image/label NIfTI pairs of a folder, in either common layout.

    - ``imagesTr/<case>.nii.gz`` with ``labelsTr/<case>.nii.gz`` (nnU-Net's ``_0000``
      image suffix is accepted), or
    - ``<case>/image.nii.gz`` with ``<case>/labels.nii.gz`` (what ``lobevol phantom --nifti`` writes).

    Returns (case name, image path, label path), sorted by name.
    """
    folder = Path(folder)
    if not folder.is_dir():
        raise FileNotFoundError(f"training data folder {folder} does not exist")
    pairs = []
    if (folder / "imagesTr").is_dir():
        for image in sorted((folder / "imagesTr").glob("*.nii*")):
            name = image.name.split(".")[0].removesuffix("_0000")
            label = next(iter(sorted((folder / "labelsTr").glob(f"{name}.nii*"))), None)
            if label is None:
                raise FileNotFoundError(f"{image} has no label file labelsTr/{name}.nii.gz")
            pairs.append((name, image, label))
    else:
        for case in sorted(p for p in folder.iterdir() if p.is_dir()):
            image = next(iter(sorted(case.glob("image.nii*"))), None)
            label = next(iter(sorted(case.glob("labels.nii*"))), None)
            if image is not None and label is not None:
                pairs.append((case.name, image, label))
    if not pairs:
        raise FileNotFoundError(
            f"no image/label pairs in {folder}: expected imagesTr/ + labelsTr/, or <case>/image.nii.gz + "
            "<case>/labels.nii.gz"
        )
    return pairs


def load_pair(image_path: Path, label_path: Path) -> tuple[sitk.Image, sitk.Image]:
    """Read an image (HU) and its label map, checking that they share one grid and valid labels."""
    image = sitk.ReadImage(str(image_path), sitk.sitkFloat32)
    labels = sitk.ReadImage(str(label_path))
    if image.GetSize() != labels.GetSize() or not np.allclose(image.GetSpacing(), labels.GetSpacing(), atol=1e-4):
        raise ValueError(f"{label_path} is not on the grid of {image_path} (size or spacing differ)")
    values = np.unique(sitk.GetArrayViewFromImage(labels))
    if values.min() < 0 or values.max() >= NUM_CLASSES:
        raise ValueError(f"{label_path} has label values {values.tolist()}; expected 0..{NUM_CLASSES - 1}")
    labels = sitk.Cast(labels, sitk.sitkUInt8)
    labels.CopyInformation(image)
    return image, labels


def phantom_training_specs(count: int, seed: int) -> list[tuple[str, Callable[[], tuple[sitk.Image, sitk.Image]]]]:
    """(name, loader) of ``count`` phantoms with seeds ``seed``, ``seed+1``, ... (loaders make them lazily).

    The seeds are checked when this is called, before any phantom is made.

    Raises:
        ValueError: a seed among the held-out phantoms' (``generator.HELD_OUT_SEEDS``): a
            held-out case's deformation must never be seen in training.
    """
    from inference.phantoms.generator import GENERATION, HELD_OUT_SEEDS, make_phantom

    seeds = range(seed, seed + count)
    if seeds and seeds.start < HELD_OUT_SEEDS.stop and HELD_OUT_SEEDS.start < seeds.stop:
        raise ValueError(f"phantom seeds {seeds.start}-{seeds.stop - 1} overlap the held-out seeds "
                         f"{HELD_OUT_SEEDS.start}-{HELD_OUT_SEEDS.stop - 1} (kept for evaluation): choose another --phantom-seed")

    def loader(case_seed: int) -> Callable[[], tuple[sitk.Image, sitk.Image]]:
        def load() -> tuple[sitk.Image, sitk.Image]:
            phantom = make_phantom(case_seed, **PHANTOM_TRAINING_GEOMETRY)
            return sitk.Cast(phantom.image, sitk.sitkFloat32), phantom.labels
        return load

    # The generation is in the name: a cache of an older generator's phantoms is not reused.
    return [(f"phantom_g{GENERATION}_{case_seed:06d}", loader(case_seed)) for case_seed in seeds]


#: Phantoms for training are drawn with their random pose, noise, thickness and anatomy,
#: on a coarser in-plane grid than a scanner's: the network sees them at its working
#: spacing (1.5 mm) anyway, and this keeps phantom generation cheap.
PHANTOM_TRAINING_GEOMETRY: dict = {"matrix": 256, "pixel_spacing_mm": 0.8}


def prepare_cases(specs: Iterable[tuple[str, Callable]], cache: CaseCache | None, config: PreprocessConfig,
                  progress: bool = True, total: int | None = None) -> list[TrainingCase]:
    """Prepare (or read from the cache) every case, with a progress bar."""
    from tqdm import tqdm

    cases = []
    for name, load in tqdm(list(specs), desc="preparing cases", unit="case", disable=not progress, total=total):
        if cache is not None:
            cases.append(cache.get(name, load))
        else:
            image, labels = load()
            cases.append(prepare_case(name, image, labels, config))
    return cases
