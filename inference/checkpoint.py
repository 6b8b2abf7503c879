"""Model checkpoints that carry their own metadata, loaded with ``weights_only`` safety.

A checkpoint is one ``torch.save`` file holding plain data only:
``{"format": "lobevol-checkpoint", "meta": {...}, "state_dict": {...},
"training_state": {...} | None}``. The metadata says how to rebuild the
network (architecture, kernel, channel widths), how to prepare its input
(working spacing and every preprocessing parameter), what its outputs mean
(label keys), where it came from (training data, figures, code version) and a
sha256 of the weights. :func:`load_checkpoint` refuses a file that does not
match this code (labels, format, architecture, tampered or damaged weights)
with a message that names the mismatch.
"""
from __future__ import annotations

import dataclasses
import hashlib
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Mapping

import torch

from inference.vocabulary import NUM_CLASSES, REGION_KEYS
from inference.models import ARCHITECTURES, KERNEL_SIZES, build_model

FORMAT_NAME = "lobevol-checkpoint"
FORMAT_VERSION = 1
WEIGHTS_DIR = Path(__file__).resolve().parent / "weights"
#: The model shipped with the package (trained on synthetic phantoms; see MODEL_CARD.md).
BUNDLED_CHECKPOINT = WEIGHTS_DIR / "resunet333_phantom.pt"


@dataclass(frozen=True)
class CheckpointMeta:
    """What a checkpoint is and how to use it.

    Attributes:
        format_version: checkpoint format (this code reads :data:`FORMAT_VERSION`).
        architecture: "resunet" or "unet".
        kernel_size: convolution kernel (depth, height, width): (3, 3, 3) or (1, 3, 3).
        channels: feature widths per level.
        num_classes: output channels (background + regions).
        label_keys: region keys of output channels 1.. (must equal inference.vocabulary).
        spacing_mm: working spacing (x, y, z) in mm.
        preprocessing: ``PreprocessConfig.to_dict()`` used in training.
        trained_on: plain-language description of the training data.
        metrics: evaluation figures (e.g. mean Dice per region on held-out data).
        code_version: lobevol version that wrote the file.
        weights_sha256: sha256 of the weights (filled in by :func:`save_checkpoint`).
        created: ISO 8601 time the file was written.
    """

    format_version: int
    architecture: str
    kernel_size: tuple[int, int, int]
    channels: tuple[int, ...]
    num_classes: int
    label_keys: tuple[str, ...]
    spacing_mm: tuple[float, float, float]
    preprocessing: Mapping[str, Any]
    trained_on: str
    metrics: Mapping[str, Any] = field(default_factory=dict)
    code_version: str = ""
    weights_sha256: str = ""
    created: str = ""

    def to_dict(self) -> dict[str, Any]:
        return {f.name: _plain(getattr(self, f.name)) for f in dataclasses.fields(self)}

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> "CheckpointMeta":
        names = {f.name for f in dataclasses.fields(cls)}
        missing = names - set(data) - {"metrics", "code_version", "weights_sha256", "created"}
        if missing:
            raise ValueError(f"checkpoint metadata lacks {', '.join(sorted(missing))}")
        values = {k: v for k, v in data.items() if k in names}
        for key in ("kernel_size", "channels", "label_keys", "spacing_mm"):
            values[key] = tuple(values[key])
        return cls(**values)


def _plain(value: Any) -> Any:
    """Tuples to lists, mappings to dicts: what ``weights_only`` loading accepts everywhere."""
    if isinstance(value, Mapping):
        return {str(k): _plain(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_plain(v) for v in value]
    return value


def weights_sha256(state_dict: Mapping[str, torch.Tensor]) -> str:
    """sha256 over parameter names, dtypes, shapes and values, in name order."""
    digest = hashlib.sha256()
    for name in sorted(state_dict):
        tensor = state_dict[name].detach().cpu().clone(memory_format=torch.contiguous_format)
        digest.update(f"{name}|{tensor.dtype}|{tuple(tensor.shape)}|".encode())
        digest.update(tensor.view(torch.uint8).numpy().tobytes() if tensor.numel() else b"")
    return digest.hexdigest()


def save_checkpoint(path: str | Path, model: torch.nn.Module, meta: CheckpointMeta, *,
                    training_state: Mapping[str, Any] | None = None) -> CheckpointMeta:
    """Write ``model`` and ``meta`` (the weights' sha256 and creation time filled in).

    ``training_state`` (optimizer state, epoch, ...) makes the file resumable;
    leave it out for a checkpoint to ship. The file is written atomically.

    Returns:
        The metadata as written.
    """
    from inference.vocabulary import __version__

    # Stored in the standard layout whatever layout training kept the model in (channels-last).
    state_dict = {k: v.detach().cpu().clone(memory_format=torch.contiguous_format)
                  for k, v in model.state_dict().items()}
    meta = dataclasses.replace(
        meta,
        weights_sha256=weights_sha256(state_dict),
        code_version=meta.code_version or __version__,
        created=datetime.now(timezone.utc).isoformat(timespec="seconds"),
    )
    _check_meta(meta)
    payload = {"format": FORMAT_NAME, "meta": meta.to_dict(), "state_dict": state_dict,
               "training_state": dict(training_state) if training_state is not None else None}
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    temporary = path.with_name(path.name + ".tmp")
    torch.save(payload, temporary)
    temporary.replace(path)
    return meta


def read_checkpoint(path: str | Path) -> dict[str, Any]:
    """The raw payload (``format``, ``meta``, ``state_dict``, ``training_state``), safely unpickled."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"checkpoint {path} does not exist")
    try:
        payload = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as error:  # torch raises several types for foreign or damaged files
        raise ValueError(f"{path} is not a readable lobevol checkpoint: {error}") from error
    if not isinstance(payload, dict) or payload.get("format") != FORMAT_NAME:
        raise ValueError(f"{path} is not a lobevol checkpoint (no '{FORMAT_NAME}' header)")
    return payload


def load_checkpoint(path: str | Path, device: str | torch.device = "cpu") -> tuple[torch.nn.Module, CheckpointMeta]:
    """Rebuild the network of a checkpoint, in eval mode on ``device``.

    Raises:
        FileNotFoundError: no such file.
        ValueError: not a lobevol checkpoint, or one that does not match this
            code (format version, labels, architecture, weights' checksum).
    """
    model, meta = _model_from_payload(path, read_checkpoint(path))
    return model.to(device).eval(), meta


def _model_from_payload(path: str | Path, payload: Mapping[str, Any]) -> tuple[torch.nn.Module, CheckpointMeta]:
    """The network and metadata of a read checkpoint, checked against this code and the weights' sha256."""
    meta = CheckpointMeta.from_dict(payload["meta"])
    _check_meta(meta)
    state_dict = payload["state_dict"]
    actual = weights_sha256(state_dict)
    if actual != meta.weights_sha256:
        raise ValueError(f"{path}: weights sha256 {actual[:12]}... does not match the metadata's "
                         f"{meta.weights_sha256[:12]}... (damaged or altered file)")
    model = build_model(meta.architecture, meta.kernel_size, meta.channels, meta.num_classes)
    try:
        model.load_state_dict(state_dict, strict=True)
    except RuntimeError as error:
        raise ValueError(f"{path}: weights do not fit a {meta.architecture} {meta.kernel_size} "
                         f"{meta.channels} network: {error}") from error
    return model, meta


def record_metrics(path: str | Path, key: str, figures: Mapping[str, Any]) -> CheckpointMeta:
    """Keep ``figures`` under ``metrics[key]`` of the checkpoint at ``path`` (rewritten in place).

    The weights (and their sha256) and any training state stay as they were; an
    earlier record under the same key is replaced.

    Returns:
        The metadata as written.
    """
    payload = read_checkpoint(path)
    model, meta = _model_from_payload(path, payload)
    metrics = {**meta.metrics, key: dict(figures)}
    return save_checkpoint(path, model, dataclasses.replace(meta, metrics=metrics),
                           training_state=payload["training_state"])


def _check_meta(meta: CheckpointMeta) -> None:
    from inference.preprocess import PreprocessConfig

    if meta.format_version != FORMAT_VERSION:
        raise ValueError(f"checkpoint format version {meta.format_version}; this code reads {FORMAT_VERSION}")
    if meta.architecture not in ARCHITECTURES:
        raise ValueError(f"checkpoint architecture {meta.architecture!r} is unknown to this code ({ARCHITECTURES})")
    if tuple(meta.kernel_size) not in KERNEL_SIZES:
        raise ValueError(f"checkpoint kernel size {meta.kernel_size} is not one of {KERNEL_SIZES}")
    if meta.num_classes != NUM_CLASSES or tuple(meta.label_keys) != tuple(REGION_KEYS):
        raise ValueError(
            f"checkpoint labels ({meta.num_classes} classes: {', '.join(meta.label_keys)}) do not match "
            f"this code's {NUM_CLASSES} classes ({', '.join(REGION_KEYS)})"
        )
    config = PreprocessConfig.from_dict(meta.preprocessing)
    if tuple(float(s) for s in config.spacing_mm) != tuple(float(s) for s in meta.spacing_mm):
        raise ValueError(f"checkpoint spacing {meta.spacing_mm} differs from its preprocessing's {config.spacing_mm}")
