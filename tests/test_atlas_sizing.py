"""Sizing the atlas's regions (inference.atlas.sizing): the method on a toy head, and the bundled result."""
import json

import numpy as np
import pytest
import SimpleITK as sitk

from inference.atlas import bundle, sizing
from inference.vocabulary import REGION_KEYS, REGIONS

RIGHT = {r.value for r in REGIONS if r.laterality == "right"}
LEFT = {r.value for r in REGIONS if r.laterality == "left"}


def toy_head() -> np.ndarray:
    """A 40 x 40 x 40 box: each hemisphere four lobes front to back with wavy boundaries (a flat
    one moves a whole plane of voxels at once), the midline's two regions in a central column,
    a background rim (never labelled)."""
    z, y, x = np.indices((40, 40, 40))
    depth = y + 2.5 * np.sin(z / 3.0) * np.cos(x / 4.0)
    lobe = np.digitize(depth, (14, 22, 30))
    labels = np.where(x < 20, 1 + 2 * lobe, 2 + 2 * lobe).astype(np.uint8)  # right 1, 3, 5, 7; left 2, 4, 6, 8
    column = (abs(x - 19.5) < 3) & (abs(y - 20) < 10)
    labels[column & (z < 20)] = 9
    labels[column & (z >= 20)] = 10
    rim = np.ones(labels.shape, dtype=bool)
    rim[2:38, 2:38, 2:38] = False
    labels[rim] = 0
    return labels


def test_size_regions_reaches_the_targets_without_crossing_the_midline():
    labels = toy_head()
    tissue = np.ones(labels.shape)
    before = sizing.tissue_shares(labels, tissue)
    targets = before * np.array([1.15, 1.1, 0.85, 0.9, 1.0, 1.05, 1.0, 0.95, 1.2, 0.6])
    sized = sizing.size_regions(labels, tissue, targets, (1.0, 1.0, 1.0), tolerance=0.02)
    np.testing.assert_allclose(sized.shares_after, targets / targets.sum(), rtol=0.02)
    assert np.all((sized.labels == 0) == (labels == 0))
    assert not np.any(np.isin(labels, list(RIGHT)) & np.isin(sized.labels, list(LEFT)))
    assert not np.any(np.isin(labels, list(LEFT)) & np.isin(sized.labels, list(RIGHT)))
    # The brainstem shrank (edge moved in), the cerebellum grew.
    assert sized.offsets_mm[9] < 0 < sized.offsets_mm[8]


def test_size_regions_at_its_own_shares_changes_nothing():
    labels = toy_head()
    tissue = np.ones(labels.shape)
    sized = sizing.size_regions(labels, tissue, sizing.tissue_shares(labels, tissue), (1.0, 1.0, 1.0))
    assert sized.iterations == 1 and np.array_equal(sized.labels, labels)


@pytest.mark.parametrize("change, message", [
    (lambda labels, tissue, targets: (labels, tissue[:-1], targets), "differ in shape"),
    (lambda labels, tissue, targets: (labels, tissue, targets * np.r_[np.ones(9), 0.0]), "positive target"),
    (lambda labels, tissue, targets: (np.where(labels == 10, 9, labels), tissue, targets), "missing.*brainstem"),
])
def test_size_regions_says_what_is_wrong(change, message):
    labels = toy_head()
    tissue = np.ones(labels.shape)
    with pytest.raises(ValueError, match=message):
        sizing.size_regions(*change(labels, tissue, sizing.tissue_shares(labels, tissue)), (1.0, 1.0, 1.0))


def test_bundled_sized_atlas_holds_its_recorded_shares_and_only_moves_boundaries():
    raw = sitk.GetArrayFromImage(bundle.region_atlas())
    sized_image = bundle.sized_region_atlas()
    sized = sitk.GetArrayFromImage(sized_image)
    record = json.loads(sizing.SIZING_FILE.read_text())
    assert sized_image.GetSpacing() == bundle.region_atlas().GetSpacing()
    assert np.array_equal(sized > 0, raw > 0)
    shares = sizing.tissue_shares(sized, sizing.template_tissue(sized_image))
    targets = np.array([record["target_shares"][key] for key in REGION_KEYS])
    np.testing.assert_allclose(shares, targets, rtol=0.015)
    # Boundaries moved, regions did not: most of each region is where the atlas has it.
    for region in REGIONS:
        inside = raw == region.value
        assert np.mean(sized[inside] == region.value) > 0.5, region.key
    assert not np.any(np.isin(raw, list(RIGHT)) & np.isin(sized, list(LEFT)))


def test_sizing_command_names_a_bad_calibration_file_and_writes_nothing(tmp_path, capsys):
    before = sizing.SIZED_ATLAS_FILE.read_bytes(), sizing.SIZING_FILE.read_bytes()
    table = tmp_path / "cal.csv"
    table.write_text("case,slice_thickness_mm\n")
    for path, message in ((tmp_path / "none.csv", "no such file"), (table, "no cases with the true territories")):
        with pytest.raises(SystemExit) as exit_info:
            sizing.main(["--calibration", str(path)])
        assert exit_info.value.code == 2 and message in capsys.readouterr().err
    assert (sizing.SIZED_ATLAS_FILE.read_bytes(), sizing.SIZING_FILE.read_bytes()) == before
