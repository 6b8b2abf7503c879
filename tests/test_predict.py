"""Prediction: geometry of the output, volumes, sliding windows, flip TTA, post-processing, checkpoints."""
from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import SimpleITK as sitk
import torch
from torch import nn

from inference.checkpoint import CheckpointMeta, save_checkpoint
from inference.vocabulary import NUM_CLASSES, REGION_KEYS, region_by_key
from inference.models import build_model
from inference.predict import (
    Segmenter,
    gaussian_importance,
    labels_on_source_grid,
    measure_volumes,
    postprocess_labels,
    predict_probabilities,
    resolve_device,
    window_starts,
)
from inference.preprocess import PreprocessConfig, working_grid
from test_preprocess import rotation, synthetic_head

CPU = torch.device("cpu")
RIGHT_FRONTAL = region_by_key("right_frontal_lobe").value
LEFT_FRONTAL = region_by_key("left_frontal_lobe").value
CEREBELLUM = region_by_key("cerebellum").value


def tiny_meta(config: PreprocessConfig, channels=(4, 8, 16, 32, 64)) -> CheckpointMeta:
    return CheckpointMeta(
        format_version=1, architecture="resunet", kernel_size=(3, 3, 3), channels=channels,
        num_classes=NUM_CLASSES, label_keys=tuple(REGION_KEYS), spacing_mm=config.spacing_mm,
        preprocessing=config.to_dict(), trained_on="untrained (test)")


def write_checkpoint(path: Path, model: nn.Module | None = None, config: PreprocessConfig | None = None) -> Path:
    config = config or PreprocessConfig(spacing_mm=(3.0, 3.0, 3.0), ahe_radius_mm=6.0)
    torch.manual_seed(0)
    model = model or build_model("resunet", (3, 3, 3), (4, 8, 16, 32, 64))
    save_checkpoint(path, model, tiny_meta(config))
    return path


def constant_class_network(value: int) -> nn.Module:
    """A real ResU-Net whose output layer says ``value`` everywhere (an oracle for the mask-only chain)."""
    torch.manual_seed(0)
    model = build_model("resunet", (3, 3, 3), (4, 8, 16, 32, 64))
    with torch.no_grad():
        model.head.weight.zero_()
        model.head.bias.zero_()
        model.head.bias[value] = 10.0
    return model


class SideByPosition(nn.Module):
    """Right frontal in the low-x (patient right) half of the input, left frontal in the other."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        width = x.shape[-1]
        position = torch.arange(width, dtype=torch.float32) - (width - 1) / 2
        logits = torch.zeros((x.shape[0], NUM_CLASSES) + x.shape[2:])
        logits[:, RIGHT_FRONTAL] = -position
        logits[:, LEFT_FRONTAL] = position
        return logits


class LocalConvolution(nn.Module):
    """Two 3x3x3 convolutions: a receptive field of 5 voxels, no global statistics."""

    def __init__(self):
        super().__init__()
        torch.manual_seed(1)
        self.net = nn.Sequential(nn.Conv3d(1, 6, 3, padding=1), nn.Tanh(), nn.Conv3d(6, NUM_CLASSES, 3, padding=1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return 4.0 * self.net(x)


def test_geometry_of_the_labels_is_exactly_the_input_grid(tmp_path):
    checkpoint = write_checkpoint(tmp_path / "tiny.pt")
    image, _ = synthetic_head(spacing=(1.1, 0.9, 2.5), direction=rotation(15.0, -20.0))
    result = Segmenter(checkpoint, device="cpu", threads=1, progress=False).segment(image)
    labels = result.labels
    assert labels.GetPixelID() == sitk.sitkUInt8
    assert labels.GetSize() == image.GetSize()
    assert labels.GetSpacing() == image.GetSpacing()
    assert labels.GetOrigin() == image.GetOrigin()
    assert labels.GetDirection() == image.GetDirection()
    assert set(result.volumes_cm3) == set(REGION_KEYS)
    assert result.model["name"] == "tiny" and result.model["architecture"] == "resunet"
    assert {"preprocess", "inference", "postprocess", "to_source", "total"} <= set(result.timings_s)


def test_csf_the_network_called_brain_is_not_counted_with_or_without_the_refinement(tmp_path):
    """A model that calls the whole inside 'right frontal lobe': the 2 mm of CSF under the skull is left
    out by the definition of a region's volume (inference.volumes.countable_labels), whether the surface
    refinement runs or not; the refinement runs only when on."""
    from scipy import ndimage

    right_frontal = region_by_key("right_frontal_lobe").value
    checkpoint = write_checkpoint(tmp_path / "constant.pt", constant_class_network(right_frontal))
    image, _ = synthetic_head(spacing=(1.0, 1.0, 1.0), foramen=False)
    hu = sitk.GetArrayFromImage(image)
    inside = hu == 30
    brain = ndimage.distance_transform_edt(inside) > 2.0
    hu[inside & ~brain] = 5                                      # a CSF shell 2 mm wide: 9 % of the inside
    with_csf = sitk.GetImageFromArray(hu)
    with_csf.CopyInformation(image)
    brain_cm3 = brain.sum() / 1000.0
    refined = Segmenter(checkpoint, device="cpu", progress=False).segment(with_csf)
    plain = Segmenter(checkpoint, device="cpu", progress=False, refine_surface=False).segment(with_csf)
    assert sum(refined.volumes_cm3.values()) == pytest.approx(brain_cm3, rel=0.04)
    assert sum(plain.volumes_cm3.values()) == pytest.approx(brain_cm3, rel=0.04)
    assert refined.model["parenchyma_threshold_hu"] == pytest.approx(30 - 12, abs=1.0)
    assert "surface" in refined.timings_s and "surface" not in plain.timings_s


@pytest.mark.parametrize("direction", [None, rotation(18.5, 0.0)])
def test_mask_only_chain_gives_the_brain_volume_on_the_source_grid(tmp_path, direction):
    """A model that says 'cerebellum' everywhere: the result is the intracranial mask, on the source grid."""
    checkpoint = write_checkpoint(tmp_path / "constant.pt", constant_class_network(CEREBELLUM))
    image, brain_cm3 = synthetic_head(spacing=(1.0, 1.0, 2.0), direction=direction)
    result = Segmenter(checkpoint, device="cpu", progress=False).segment(image)
    assert result.volumes_cm3["cerebellum"] == pytest.approx(brain_cm3, rel=0.05)
    assert sum(result.volumes_cm3.values()) == pytest.approx(result.volumes_cm3["cerebellum"])
    # Voxel by voxel against the true brain: the mapping back puts it in the right place.
    truth = sitk.GetArrayFromImage(image) == 30
    predicted = sitk.GetArrayFromImage(result.labels) == CEREBELLUM
    dice = 2 * (truth & predicted).sum() / (truth.sum() + predicted.sum())
    assert dice > 0.95


def test_measure_volumes_is_counts_times_voxel_volume():
    array = np.zeros((5, 6, 7), np.uint8)
    array[0, :, :] = 1      # 42 voxels
    array[1:3, 0, 0] = 10   # 2 voxels
    image = sitk.GetImageFromArray(array)
    image.SetSpacing((0.5, 0.8, 2.0))
    image.SetDirection(rotation(30.0, 10.0))
    volumes = measure_volumes(image)
    voxel_cm3 = 0.5 * 0.8 * 2.0 / 1000
    assert volumes["right_frontal_lobe"] == pytest.approx(42 * voxel_cm3)
    assert volumes["brainstem"] == pytest.approx(2 * voxel_cm3)
    assert volumes["cerebellum"] == 0.0
    array[0, 0, 0] = 11
    with pytest.raises(ValueError, match="0..10"):
        measure_volumes(sitk.GetImageFromArray(array))
    with pytest.raises(ValueError, match="integer"):
        measure_volumes(sitk.GetImageFromArray(array.astype(np.float32)))


def test_window_starts_cover_the_axis():
    assert window_starts(64, 64, 0.5) == [0]
    assert window_starts(64, 128, 0.5) == [0]
    starts = window_starts(96, 32, 0.5)
    assert starts[0] == 0 and starts[-1] == 64
    assert all(b - a <= 16 for a, b in zip(starts, starts[1:]))
    weights = gaussian_importance((16, 32, 16))
    assert weights.shape == (16, 32, 16) and float(weights.max()) == pytest.approx(1.0)
    assert float(weights.min()) >= 1e-9


def test_sliding_window_equals_whole_volume_for_a_local_model():
    array = np.random.default_rng(3).random((48, 64, 48)).astype(np.float32)
    model = LocalConvolution().eval()
    whole = predict_probabilities(model, array, device=CPU, patch_size=(48, 64, 48), progress=False)
    windows = predict_probabilities(model, array, device=CPU, patch_size=(32, 32, 32), overlap=0.5, progress=False)
    assert whole.shape == windows.shape == (NUM_CLASSES, 48, 64, 48)
    assert torch.allclose(whole.sum(0), torch.ones(48, 64, 48), atol=1e-4)
    assert float((whole - windows).abs().max()) < 0.02
    agreement = float((whole.argmax(0) == windows.argmax(0)).float().mean())
    assert agreement > 0.995


def test_flip_tta_swaps_right_and_left_channels():
    array = np.random.default_rng(4).random((16, 32, 32)).astype(np.float32)
    model = SideByPosition().eval()
    plain = predict_probabilities(model, array, device=CPU, progress=False)
    mirrored = predict_probabilities(model, array, device=CPU, tta=True, progress=False)
    # The model is consistent with its mirror: TTA must change nothing (without the channel
    # swap, both frontal channels would tie everywhere).
    assert torch.allclose(plain, mirrored, atol=1e-6)
    labels = mirrored.argmax(0)
    assert bool((labels[..., :16] == RIGHT_FRONTAL).all()) and bool((labels[..., 16:] == LEFT_FRONTAL).all())


def test_tta_of_an_asymmetric_model_averages_with_its_mirror():
    array = np.random.default_rng(5).random((16, 16, 32)).astype(np.float32)
    model = LocalConvolution().eval()
    plain = predict_probabilities(model, array, device=CPU, progress=False)
    mirrored_input = predict_probabilities(model, np.ascontiguousarray(array[..., ::-1]), device=CPU, progress=False)
    from inference.vocabulary import left_right_permutation
    expected = 0.5 * (plain + mirrored_input.flip(-1)[left_right_permutation()])
    tta = predict_probabilities(model, array, device=CPU, tta=True, progress=False)
    assert torch.allclose(tta, expected, atol=1e-5)


def test_postprocess_removes_islands_and_fills_enclosed_holes_only():
    labels = np.zeros((20, 20, 20), np.uint8)
    labels[2:12, 2:12, 2:12] = 3
    labels[6, 4, 9] = 0             # enclosed hole -> 3
    labels[2:12, 7, 2:7] = 0        # a slit open to the outside of the region -> stays 0
    labels[16:18, 16:18, 16:18] = 3  # island of 3 -> removed
    labels[15:19, 2:6, 2:6] = 9     # cerebellum block, one piece: kept
    labels[0, 19, 19] = 9           # cerebellum island -> removed
    cleaned = postprocess_labels(labels)
    assert cleaned[6, 4, 9] == 3
    assert np.all(cleaned[2:12, 7, 2:7] == 0)
    assert np.all(cleaned[16:18, 16:18, 16:18] == 0)
    assert cleaned[0, 19, 19] == 0 and np.all(cleaned[15:19, 2:6, 2:6] == 9)
    mask = np.ones(labels.shape, bool)
    mask[:, :, :4] = False
    assert not postprocess_labels(labels, mask)[:, :, :4].any()


def test_labels_back_on_a_finer_rotated_source_grid_match_direct_resampling():
    source = sitk.Image([120, 110, 50], sitk.sitkInt16)
    source.SetSpacing((0.8, 0.8, 2.0))
    source.SetDirection(rotation(12.0, 25.0))
    source.SetOrigin((-40.0, -30.0, -40.0))
    grid = working_grid(source, (2.0, 2.0, 2.0))
    size = grid.GetSize()
    zz, yy, xx = np.meshgrid(*[np.arange(n, dtype=float) for n in size[::-1]], indexing="ij")
    centre = [(n - 1) / 2 for n in size[::-1]]
    radius = np.sqrt((zz - centre[0]) ** 2 + (yy - centre[1]) ** 2 + (xx - centre[2]) ** 2)
    grid_labels = np.where(radius < 12, np.where(xx < centre[2], RIGHT_FRONTAL, LEFT_FRONTAL), 0).astype(np.uint8)
    scores = torch.nn.functional.one_hot(torch.from_numpy(grid_labels).long(), NUM_CLASSES).permute(3, 0, 1, 2).float()
    mapped = labels_on_source_grid(scores, grid_labels, grid, source, progress=False)
    assert mapped.shape == tuple(reversed(source.GetSize()))
    label_grid = sitk.GetImageFromArray(grid_labels)
    label_grid.CopyInformation(grid)
    direct = sitk.GetArrayFromImage(sitk.Resample(label_grid, source, sitk.Transform(), sitk.sitkNearestNeighbor, 0))
    for value in (RIGHT_FRONTAL, LEFT_FRONTAL):
        a, b = mapped == value, direct == value
        assert 2 * (a & b).sum() / (a.sum() + b.sum()) > 0.93
        assert a.sum() == pytest.approx(b.sum(), rel=0.05)


def test_checkpoint_problems_surface_as_clear_errors(tmp_path):
    with pytest.raises(FileNotFoundError, match="does not exist"):
        Segmenter(tmp_path / "missing.pt", device="cpu")
    path = write_checkpoint(tmp_path / "good.pt")
    payload = torch.load(path, weights_only=True)
    payload["meta"]["label_keys"] = list(reversed(payload["meta"]["label_keys"]))
    torch.save(payload, tmp_path / "relabelled.pt")
    with pytest.raises(ValueError, match="labels"):
        Segmenter(tmp_path / "relabelled.pt", device="cpu")
    payload = torch.load(path, weights_only=True)
    payload["meta"]["preprocessing"]["unsharp"] = 1.0
    torch.save(payload, tmp_path / "foreign.pt")
    with pytest.raises(ValueError, match="unknown preprocessing parameters"):
        Segmenter(tmp_path / "foreign.pt", device="cpu")
    with pytest.raises(ValueError, match="patch size"):
        Segmenter(path, device="cpu", patch_size=(30, 32, 32))


def test_device_resolution():
    assert resolve_device("cpu") == CPU
    assert resolve_device("auto").type == ("cuda" if torch.cuda.is_available() else "cpu")
    with pytest.raises(ValueError, match="device"):
        resolve_device("tpu")
    if not torch.cuda.is_available():
        with pytest.raises(RuntimeError, match="CUDA is not available"):
            resolve_device("cuda")


@pytest.mark.slow
def test_perfect_scores_on_a_tilted_phantom_come_back_with_the_true_volumes():
    """Mapping back at scale: ideal scores on the working grid -> source labels close to the truth."""
    from inference.metrics import dice_per_region, volume_errors
    from inference.phantoms.generator import make_phantom
    from inference.preprocess import labels_to_grid, preprocess_image, resample_to

    phantom = make_phantom(3, slice_thickness_mm=1.25, pixel_spacing_mm=0.9, matrix=256, tilt_deg=15.0)
    prepared = preprocess_image(phantom.image, PreprocessConfig())
    grid_labels = labels_to_grid(phantom.labels, prepared.grid)
    scores = torch.from_numpy(np.stack([
        sitk.GetArrayFromImage(resample_to(sitk.Cast(phantom.labels == value, sitk.sitkFloat32), prepared.grid,
                                           default=float(value == 0)))
        for value in range(NUM_CLASSES)]))
    mapped = sitk.GetImageFromArray(labels_on_source_grid(scores, grid_labels, prepared.grid, phantom.image,
                                                          progress=False))
    mapped.CopyInformation(phantom.image)
    dice = dice_per_region(mapped, phantom.labels)
    assert min(dice.values()) > 0.9, dice
    errors = volume_errors(measure_volumes(mapped), phantom.meta["volumes_cm3"])
    assert abs(errors["total"]["error_percent"]) < 3.0
    assert all(abs(errors[key]["error_percent"]) < 6.0 for key in REGION_KEYS), errors
