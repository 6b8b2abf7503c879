"""``lobevol train``, ``compare`` and ``evaluate`` from the command line: NIfTI pairs in, checkpoints and tables out."""
from __future__ import annotations

import csv

import pytest
import SimpleITK as sitk

from inference.checkpoint import BUNDLED_CHECKPOINT, load_checkpoint
from inference.phantoms.generator import make_phantom
from inference.training import TrainConfig
from inference.vocabulary import REGION_KEYS
from node.cli import build_parser, main
from node.cli.train import train_config


TINY_BUDGET = ["--epochs", "1", "--iterations", "1", "--batch-size", "1", "--patch", "32,32,32",
               "--validation-fraction", "0.5", "--no-progress"]


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    """Two labelled cases, made once for the module: the commands only read them."""
    folder = tmp_path_factory.mktemp("pairs") / "data"
    _write_pairs(folder)
    return folder


def _write_pairs(data, seeds=(41, 42)) -> None:
    """Small phantoms as <case>/image.nii.gz + <case>/labels.nii.gz, the layout a user brings."""
    for seed in seeds:
        phantom = make_phantom(seed, matrix=64, pixel_spacing_mm=3.2, slice_thickness_mm=5.0)
        case = data / f"case{seed}"
        case.mkdir(parents=True)
        sitk.WriteImage(phantom.image, str(case / "image.nii.gz"))
        sitk.WriteImage(phantom.labels, str(case / "labels.nii.gz"))


def test_command_line_defaults_are_the_train_config_defaults():
    # The parser keeps literal defaults (importing torch would slow every `lobevol --help`);
    # this keeps them from drifting away from TrainConfig's.
    for command in ("train", "compare"):
        args = build_parser().parse_args([command, "--phantoms", "2", "--out", "runs/x"])
        assert train_config(args) == TrainConfig()


def test_train_fine_tunes_the_bundled_model_on_image_label_pairs(data, tmp_path, capsys):
    out = tmp_path / "tuned"
    status = main(["train", "--data", str(data), "--out", str(out), "--init", "bundled", *TINY_BUDGET])
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


def test_evaluate_records_its_figures_in_the_checkpoint_without_touching_the_weights(data, tmp_path, capsys):
    out = tmp_path / "small"
    assert main(["train", "--data", str(data), "--out", str(out), "--channels", "4,8,8,8,8", *TINY_BUDGET]) == 0
    _, before = load_checkpoint(out / "best.pt")
    status = main(["evaluate", str(out / "best.pt"), str(data), "--no-tta", "--record", "two small phantoms"])
    assert status == 0
    assert "figures recorded in" in capsys.readouterr().out
    _, after = load_checkpoint(out / "best.pt")
    record = after.metrics["heldout_evaluation"]
    assert after.weights_sha256 == before.weights_sha256
    assert after.metrics["epoch"] == before.metrics["epoch"]          # the training figures stay
    assert (record["description"], record["data"], record["cases"]) == ("two small phantoms", str(data), 2)
    assert record["test_time_augmentation"] is False
    assert set(record["total_error_percent"]) == {"case41", "case42"}
    assert record["worst_total_error_percent"] == max(abs(v) for v in record["total_error_percent"].values())


def test_evaluate_refuses_an_empty_record_description(tmp_path, capsys):
    assert main(["evaluate", "bundled", str(tmp_path), "--record", " "]) != 0
    assert "--record needs a description" in capsys.readouterr().err


def test_evaluate_atlas_scores_the_template_registration_on_the_same_cases(data, tmp_path, capsys):
    table = tmp_path / "atlas.csv"
    assert main(["evaluate", "atlas", str(data), "--threads", "1", "--csv", str(table)]) == 0
    assert "territory err" in capsys.readouterr().out
    rows = list(csv.DictReader(open(table, newline="")))
    assert [row["case"] for row in rows] == ["case41", "case42"]
    # The registration's own labels: anatomically placed, far above what a stand-in would score.
    assert all(sum(float(row[f"dice_{key}"]) for key in REGION_KEYS) / len(REGION_KEYS) > 0.5 for row in rows)
    assert main(["evaluate", "atlas", str(data), "--record", "atlas"]) != 0
    assert "the atlas method has none" in capsys.readouterr().err


def test_compare_trains_the_three_models_alike_and_prints_the_papers_table(data, tmp_path, capsys):
    out = tmp_path / "compare"
    status = main(["compare", "--data", str(data), "--out", str(out), "--channels", "4,8,8,8,8", *TINY_BUDGET])
    assert status == 0
    table = capsys.readouterr().out
    for model in ("3D U-Net (baseline)", "ResU-Net (1,3,3)", "ResU-Net (3,3,3)"):
        assert model in table
    assert "1 training, 1 test cases" in table
    with open(out / "compare.csv", newline="") as handle:
        rows = list(csv.DictReader(handle))
    assert [row["model"] for row in rows] == ["3D U-Net (baseline)", "ResU-Net (1,3,3)", "ResU-Net (3,3,3)"]
    assert all(0.0 <= float(row[key]) <= 1.0 for row in rows for key in ("train_dice", "test_dice"))
    assert {path.name for path in out.iterdir()} >= {"unet333_run0", "resunet133_run0", "resunet333_run0"}
