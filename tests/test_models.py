"""Networks (layer count, shapes, kernels) and the checkpoint format (round trip, refusals)."""
from __future__ import annotations

import dataclasses

import pytest
import torch

from inference.checkpoint import CheckpointMeta, load_checkpoint, read_checkpoint, save_checkpoint
from inference.vocabulary import NUM_CLASSES, REGION_KEYS
from inference.models import build_model, count_conv_layers


@pytest.mark.parametrize("architecture,kernel", [("resunet", (3, 3, 3)), ("resunet", (1, 3, 3)), ("unet", (3, 3, 3))])
def test_standard_depth_has_27_convolutions_and_keeps_the_shape(architecture, kernel):
    model = build_model(architecture, kernel, (4, 8, 8, 8, 8))
    assert count_conv_layers(model) == 27
    with torch.inference_mode():
        logits = model(torch.zeros(1, 1, 16, 32, 16))
    assert logits.shape == (1, NUM_CLASSES, 16, 32, 16)


def test_kernel_1x3x3_convolves_in_plane_only():
    model = build_model("resunet", (1, 3, 3), (4, 8, 8, 8, 8))
    kernels = {tuple(m.kernel_size) for m in model.modules() if isinstance(m, torch.nn.Conv3d) and m.kernel_size != (1, 1, 1)
               and m.stride == (1, 1, 1)}
    assert kernels == {(1, 3, 3)}


def test_only_the_resunet_has_residual_shortcuts():
    assert any("shortcut" in n for n, m in build_model("resunet").named_modules() if isinstance(m, torch.nn.Conv3d))
    assert not any("shortcut" in n for n, m in build_model("unet").named_modules() if isinstance(m, torch.nn.Conv3d))


@pytest.mark.parametrize("kwargs,message", [
    ({"architecture": "vnet"}, "unknown architecture"),
    ({"kernel_size": (3, 3, 1)}, "kernel size"),
    ({"channels": (8,)}, "channels"),
])
def test_bad_model_parameters_are_named(kwargs, message):
    with pytest.raises(ValueError, match=message):
        build_model(**kwargs)


def _meta(**changes) -> CheckpointMeta:
    from inference.preprocess import PreprocessConfig

    config = PreprocessConfig()
    meta = CheckpointMeta(
        format_version=1, architecture="resunet", kernel_size=(3, 3, 3), channels=(4, 8), num_classes=NUM_CLASSES,
        label_keys=tuple(REGION_KEYS), spacing_mm=config.spacing_mm, preprocessing=config.to_dict(),
        trained_on="nothing (test)", metrics={"dice": 0.5},
    )
    return dataclasses.replace(meta, **changes)


def test_checkpoint_round_trip_keeps_weights_and_metadata(tmp_path):
    model = build_model("resunet", (3, 3, 3), (4, 8))
    written = save_checkpoint(tmp_path / "m.pt", model, _meta(), training_state={"epoch": 3})
    loaded, meta = load_checkpoint(tmp_path / "m.pt")
    assert meta == written and len(meta.weights_sha256) == 64 and meta.created
    for name, tensor in model.state_dict().items():
        assert torch.equal(tensor, loaded.state_dict()[name])
    assert read_checkpoint(tmp_path / "m.pt")["training_state"] == {"epoch": 3}


def test_altered_weights_are_refused(tmp_path):
    save_checkpoint(tmp_path / "m.pt", build_model("resunet", (3, 3, 3), (4, 8)), _meta())
    payload = torch.load(tmp_path / "m.pt", weights_only=True)
    name = next(iter(payload["state_dict"]))
    payload["state_dict"][name] += 1
    torch.save(payload, tmp_path / "m.pt")
    with pytest.raises(ValueError, match="sha256"):
        load_checkpoint(tmp_path / "m.pt")


def test_checkpoint_with_other_labels_is_refused(tmp_path):
    payload_path = tmp_path / "m.pt"
    save_checkpoint(payload_path, build_model("resunet", (3, 3, 3), (4, 8)), _meta())
    payload = torch.load(payload_path, weights_only=True)
    payload["meta"]["label_keys"] = list(reversed(REGION_KEYS))
    torch.save(payload, payload_path)
    with pytest.raises(ValueError, match="labels"):
        load_checkpoint(payload_path)


def test_foreign_files_are_refused(tmp_path):
    torch.save({"weights": torch.zeros(2)}, tmp_path / "other.pt")
    with pytest.raises(ValueError, match="not a lobevol checkpoint"):
        load_checkpoint(tmp_path / "other.pt")
    (tmp_path / "text.pt").write_text("hello")
    with pytest.raises(ValueError, match="not a readable"):
        load_checkpoint(tmp_path / "text.pt")
    with pytest.raises(FileNotFoundError):
        load_checkpoint(tmp_path / "missing.pt")
