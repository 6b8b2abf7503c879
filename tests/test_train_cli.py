"""``lobevol train`` from the command line: NIfTI pairs in, checkpoints out, fine-tuning the bundled model."""
from __future__ import annotations

import SimpleITK as sitk

from inference.checkpoint import BUNDLED_CHECKPOINT, load_checkpoint
from inference.phantom import make_phantom
from node.cli import main


def test_train_fine_tunes_the_bundled_model_on_image_label_pairs(tmp_path, capsys):
    data = tmp_path / "data"
    for seed in (41, 42):
        phantom = make_phantom(seed, matrix=64, pixel_spacing_mm=3.2, slice_thickness_mm=5.0)
        case = data / f"case{seed}"
        case.mkdir(parents=True)
        sitk.WriteImage(phantom.image, str(case / "image.nii.gz"))
        sitk.WriteImage(phantom.labels, str(case / "labels.nii.gz"))
    out = tmp_path / "tuned"
    status = main(["train", "--data", str(data), "--out", str(out), "--init", "bundled", "--epochs", "1",
                   "--iterations", "1", "--batch-size", "1", "--patch", "32,32,32", "--validation-fraction", "0.5",
                   "--no-progress"])
    assert status == 0
    assert "training on 1 cases, validating on 1" in capsys.readouterr().out
    _, bundled = load_checkpoint(BUNDLED_CHECKPOINT)
    _, tuned = load_checkpoint(out / "best.pt")
    assert (tuned.channels, tuned.preprocessing) == (bundled.channels, bundled.preprocessing)
    assert f"fine-tuned from {BUNDLED_CHECKPOINT.name} (weights sha256 {bundled.weights_sha256[:12]})" \
        in tuned.trained_on


def test_train_names_a_missing_initial_checkpoint(tmp_path, capsys):
    status = main(["train", "--data", str(tmp_path), "--out", str(tmp_path / "o"), "--init", str(tmp_path / "no.pt")])
    assert status != 0
    assert "no.pt" in capsys.readouterr().err
