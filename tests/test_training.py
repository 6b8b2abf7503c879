"""Training pieces: label-swapping flips, rotations, loss, k-fold split, deterministic resume."""
from __future__ import annotations

import dataclasses

import numpy as np
import pytest
import torch

from inference.checkpoint import load_checkpoint, read_checkpoint
from inference.vocabulary import REGIONS, Precision, left_right_permutation, region_by_key
from inference.training import (TrainConfig, TrainingCase, autocast_dtype, cpu_has_native_bfloat16, k_fold_split,
                                learning_rate_at,
                                random_flip, random_rotation_and_zoom, sample_patch, segmentation_loss, train)


def test_left_right_flip_swaps_the_lateral_labels_only():
    permutation = left_right_permutation()
    assert permutation[region_by_key("right_frontal_lobe").value] == region_by_key("left_frontal_lobe").value
    assert permutation[region_by_key("left_temporal_lobe").value] == region_by_key("right_temporal_lobe").value
    for key in ("cerebellum", "brainstem"):
        assert permutation[region_by_key(key).value] == region_by_key(key).value
    assert permutation[0] == 0
    assert sorted(permutation) == list(range(len(REGIONS) + 1))


def test_flip_mirrors_image_and_labels_together():
    images = torch.arange(16.0).reshape(1, 1, 1, 4, 4)
    labels = torch.zeros(1, 1, 4, 4, dtype=torch.long)
    labels[..., 0] = region_by_key("right_frontal_lobe").value
    flipped, flipped_labels = random_flip(images.clone(), labels.clone(), 1.0, torch.Generator().manual_seed(0))
    assert torch.equal(flipped, images.flip(-1))
    assert (flipped_labels[..., 3] == region_by_key("left_frontal_lobe").value).all()
    assert (flipped_labels[..., :3] == 0).all()


def test_rotation_keeps_labels_as_labels_and_moves_image_with_them():
    images = torch.zeros(2, 1, 16, 16, 16)
    images[:, :, 4:12, 4:12, 4:12] = 1.0
    labels = (images[:, 0] > 0).long() * 3
    rotated, rotated_labels = random_rotation_and_zoom(images, labels, 15.0, torch.Generator().manual_seed(1))
    assert set(rotated_labels.unique().tolist()) <= {0, 3}
    inside = rotated_labels == 3
    assert rotated[:, 0][inside].mean() > 0.9 and rotated[:, 0][~inside].mean() < 0.1


def test_zoom_magnifies_image_and_labels_together():
    images = torch.zeros(1, 1, 24, 24, 24)
    images[:, :, 8:16, 8:16, 8:16] = 1.0
    labels = (images[:, 0] > 0).long() * 3
    zoomed, zoomed_labels = random_rotation_and_zoom(images, labels, 0.0, torch.Generator().manual_seed(1), (1.25, 1.25))
    # An 8-voxel cube magnified 1.25 times is a 10-voxel cube: 1,000 voxels instead of 512.
    assert int((zoomed_labels == 3).sum()) == pytest.approx(1000, rel=0.1)
    inside = zoomed_labels == 3
    assert zoomed[:, 0][inside].mean() > 0.9 and zoomed[:, 0][~inside].mean() < 0.1
    with pytest.raises(ValueError, match="zoom range"):
        TrainConfig(zoom_range=(1.1, 1.3))


def test_precision_is_float32_bfloat16_or_cudas_float16_as_asked():
    cpu, cuda = torch.device("cpu"), torch.device("cuda")
    assert autocast_dtype(cpu, Precision.FLOAT32) is None
    assert autocast_dtype(cpu, Precision.BFLOAT16) is torch.bfloat16
    assert autocast_dtype(cuda, Precision.AUTO) is torch.float16
    assert autocast_dtype(cpu, Precision.AUTO) is (torch.bfloat16 if cpu_has_native_bfloat16() else None)


def test_patch_is_padded_when_the_case_is_small():
    case = TrainingCase("c", np.ones((10, 20, 20), np.float32), np.ones((10, 20, 20), np.uint8),
                        np.ones((10, 20, 20), bool))
    image, labels = sample_patch(case, (16, 16, 16), np.random.default_rng(0))
    assert image.shape == labels.shape == (16, 16, 16)
    assert image[10:].sum() == 0 and labels[:10].min() == 1


def test_loss_is_lower_for_the_right_answer():
    labels = torch.randint(0, 11, (1, 4, 4, 4))
    right = torch.nn.functional.one_hot(labels, 11).permute(0, 4, 1, 2, 3).float() * 10
    wrong = torch.roll(right, 1, dims=1)
    assert segmentation_loss(right, labels, 1.0) < segmentation_loss(wrong, labels, 1.0)
    assert segmentation_loss(right, labels, 0.0) < 0.01


def test_k_fold_split_covers_every_case_once():
    names = [f"case{i}" for i in range(10)]
    validated = []
    for fold in range(5):
        training, validation = k_fold_split(names, 5, fold, seed=3)
        assert not set(training) & set(validation) and len(training) + len(validation) == 10
        validated += validation
    assert sorted(validated) == sorted(names)
    with pytest.raises(ValueError, match="folds"):
        k_fold_split(names, 5, 5, seed=3)


def _cases(count: int) -> list[TrainingCase]:
    """Tiny cases where the label is readable from the image (a cube of 'brain' split in two)."""
    rng = np.random.default_rng(0)
    cases = []
    for index in range(count):
        labels = np.zeros((16, 16, 16), np.uint8)
        labels[4:12, 4:12, 4:8] = region_by_key("right_frontal_lobe").value
        labels[4:12, 4:12, 8:12] = region_by_key("left_frontal_lobe").value
        image = (labels > 0).astype(np.float32) + rng.normal(0, 0.05, labels.shape).astype(np.float32)
        image[:, :, 8] = 0.0  # a 'fissure' between the halves
        cases.append(TrainingCase(f"c{index}", image, labels, np.ones(labels.shape, bool)))
    return cases


def _config(epochs: int) -> TrainConfig:
    return TrainConfig(channels=(4, 8), epochs=epochs, iterations_per_epoch=3, batch_size=2,
                       patch_size=(16, 16, 16), rotation_deg=5.0, seed=7)


def test_training_writes_checkpoints_that_load_and_resume_deterministically(tmp_path):
    cases = _cases(3)
    whole = train(_config(2), cases[:2], cases[2:], tmp_path / "whole", trained_on="tiny cubes", progress=False)
    train(_config(1), cases[:2], cases[2:], tmp_path / "split", trained_on="tiny cubes", progress=False)
    with pytest.raises(ValueError, match="other settings"):
        train(dataclasses.replace(_config(2), seed=8), cases[:2], cases[2:], tmp_path / "split",
              trained_on="tiny cubes", resume=True, progress=False)
    resumed = train(_config(2), cases[:2], cases[2:], tmp_path / "split", trained_on="tiny cubes", resume=True,
                    progress=False)
    assert [h["epoch"] for h in resumed.history] == [1, 2]
    a, b = read_checkpoint(whole.last)["state_dict"], read_checkpoint(resumed.last)["state_dict"]
    for name in a:
        torch.testing.assert_close(a[name], b[name])
    model, meta = load_checkpoint(whole.best)
    assert meta.trained_on == "tiny cubes" and "validation_mean_dice" in meta.metrics
    assert read_checkpoint(whole.best)["training_state"] is None


def test_a_run_saved_before_zoom_existed_resumes_as_the_run_it_was(tmp_path):
    cases = _cases(3)
    unzoomed = dataclasses.replace(_config(2), zoom_range=(1.0, 1.0))
    run = train(dataclasses.replace(unzoomed, epochs=1), cases[:2], cases[2:], tmp_path / "old",
                trained_on="tiny cubes", progress=False)
    payload = read_checkpoint(run.last)
    del payload["training_state"]["config"]["zoom_range"]   # what an older last.pt holds
    torch.save(payload, run.last)
    with pytest.raises(ValueError, match="other settings"):
        train(_config(2), cases[:2], cases[2:], tmp_path / "old", trained_on="tiny cubes", resume=True, progress=False)
    resumed = train(unzoomed, cases[:2], cases[2:], tmp_path / "old", trained_on="tiny cubes", resume=True,
                    progress=False)
    assert [h["epoch"] for h in resumed.history] == [1, 2]


def test_bad_training_settings_are_named():
    with pytest.raises(ValueError, match="patch size"):
        TrainConfig(patch_size=(20, 16, 16))
    with pytest.raises(ValueError, match="learning rate"):
        TrainConfig(learning_rate=0)


def test_poly_decay_falls_from_the_set_rate_towards_zero():
    config = TrainConfig(epochs=10, learning_rate=1e-3)
    rates = [learning_rate_at(config, epoch) for epoch in range(10)]
    assert rates[0] == pytest.approx(1e-3)
    assert all(a > b for a, b in zip(rates, rates[1:]))
    assert rates[-1] == pytest.approx(1e-3 * 0.1 ** 0.9)
    constant = TrainConfig(epochs=10, learning_rate=1e-3, lr_decay="constant")
    assert {learning_rate_at(constant, epoch) for epoch in range(10)} == {1e-3}
    with pytest.raises(ValueError, match="decay"):
        TrainConfig(lr_decay="cosine")


def test_fine_tuning_starts_from_the_given_weights_and_refuses_another_network(tmp_path):
    cases = _cases(3)
    first = train(_config(1), cases[:2], cases[2:], tmp_path / "first", trained_on="tiny cubes", progress=False)
    # Zero epochs' worth of change: a learning rate so small that one step keeps the weights.
    still = dataclasses.replace(_config(1), learning_rate=1e-12)
    tuned = train(still, cases[:2], cases[2:], tmp_path / "tuned", trained_on="tiny cubes", progress=False,
                  initial=load_checkpoint(first.last))
    fresh = train(still, cases[:2], cases[2:], tmp_path / "fresh", trained_on="tiny cubes", progress=False)
    start, after, random = (read_checkpoint(p)["state_dict"] for p in (first.last, tuned.last, fresh.last))
    weight = next(name for name in start if name.endswith("weight") and start[name].dim() == 5)
    torch.testing.assert_close(after[weight], start[weight], atol=1e-6, rtol=0)
    assert not torch.allclose(random[weight], start[weight])
    with pytest.raises(ValueError, match=r"channels \(4, 8\) \(this run: \(4, 16\)\)"):
        train(dataclasses.replace(still, channels=(4, 16)), cases[:2], cases[2:], tmp_path / "wider",
              trained_on="tiny cubes", progress=False, initial=load_checkpoint(first.last))
