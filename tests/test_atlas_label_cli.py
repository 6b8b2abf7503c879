"""``lobevol atlas-label``: image/label pairs that ``lobevol train --data`` reads, montages, summaries."""
from __future__ import annotations

import numpy as np
import pytest
import SimpleITK as sitk

from node.cli import main

pytestmark = pytest.mark.slow


def test_atlas_label_writes_training_pairs_that_train_reads(tmp_path, capsys):
    from inference.metrics import dice_per_region
    from inference.phantoms.generator import make_phantom
    from inference.training import find_image_label_pairs, load_pair

    phantom = make_phantom(910004, slice_thickness_mm=3.0, pixel_spacing_mm=1.6, matrix=150)
    scans = tmp_path / "scans"
    scans.mkdir()
    sitk.WriteImage(phantom.image, str(scans / "child_a.nii.gz"))
    (scans / "notes.txt").write_text("not an image")
    out = tmp_path / "labels"
    assert main(["atlas-label", str(scans), "--out", str(out), "--threads", "2", "--spacing", "3"]) == 0
    printed = capsys.readouterr().out
    assert "case child_a: labelled in" in printed and "1 case(s) labelled" in printed
    ((name, image_path, label_path),) = find_image_label_pairs(out)
    assert name == "child_a"
    image, labels = load_pair(image_path, label_path)
    assert image.GetSize() == phantom.image.GetSize()
    assert np.array_equal(sitk.GetArrayViewFromImage(image), sitk.GetArrayViewFromImage(phantom.image))
    dice = dice_per_region(labels, phantom.labels)
    assert np.mean(list(dice.values())) > 0.4, dice
    assert (out / "qc" / "child_a.png").stat().st_size > 10_000
    assert (out / "volumes.csv").read_text().startswith("id,sex,age_years,right_frontal_lobe")
    # Again: the case is kept unless --overwrite.
    assert main(["atlas-label", str(scans / "child_a.nii.gz"), "--out", str(out)]) == 0
    assert "skipped" in capsys.readouterr().out


def test_atlas_label_refuses_what_it_cannot_label(tmp_path, capsys):
    (tmp_path / "empty").mkdir()
    (tmp_path / "x.txt").write_text("x")
    for source, message in (("missing", "does not exist"), ("empty", "no images and no DICOM files"),
                            ("x.txt", "not an image")):
        assert main(["atlas-label", str(tmp_path / source), "--out", str(tmp_path / "o")]) == 1
        assert message in capsys.readouterr().err
