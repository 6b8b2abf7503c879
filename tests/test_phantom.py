"""Synthetic phantoms: determinism, geometry, volumes, anatomy, montage and the ``lobevol phantom`` command.

Phantoms here use coarse grids (the cost is mostly the fixed 1 mm canonical anatomy,
~5 s per phantom), shared through module fixtures.
"""
from __future__ import annotations

import json
import math

import numpy as np
import pytest
import SimpleITK as sitk
from PIL import Image
from scipy import ndimage

from inference.vocabulary import REGIONS, REGION_KEYS, region_by_key
from inference.montage import save_montage
from inference.phantoms.generator import (COHORT_VOLUMES_CM3, GENERATION, GIRL_VOLUME_FACTOR, SLICE_THICKNESS_CHOICES_MM,
                               draw_target_volumes, make_phantom)
from node.cli import main

GRID = dict(matrix=150, pixel_spacing_mm=1.5, slice_thickness_mm=1.25)
SEED = 21


@pytest.fixture(scope="module")
def boy():
    return make_phantom(SEED, sex="M", age_years=2.0, **GRID)


@pytest.fixture(scope="module")
def tilted():
    return make_phantom(SEED + 1, matrix=64, pixel_spacing_mm=3.5, slice_thickness_mm=2.5, tilt_deg=15.0)


def arrays(phantom):
    return sitk.GetArrayFromImage(phantom.image), sitk.GetArrayFromImage(phantom.labels)


def test_same_seed_same_phantom(boy):
    again = make_phantom(SEED, sex="M", age_years=2.0, **GRID)
    image, labels = arrays(boy)
    image2, labels2 = arrays(again)
    assert np.array_equal(image, image2)
    assert np.array_equal(labels, labels2)
    assert json.dumps(boy.meta, sort_keys=True) == json.dumps(again.meta, sort_keys=True)


def test_image_and_labels_share_one_untilted_grid(boy):
    image, labels = boy.image, boy.labels
    assert image.GetPixelID() == sitk.sitkInt16
    assert labels.GetPixelID() == sitk.sitkUInt8
    assert image.GetSize() == labels.GetSize()
    assert image.GetSpacing() == labels.GetSpacing()
    assert image.GetOrigin() == labels.GetOrigin()
    assert image.GetDirection() == labels.GetDirection() == (1, 0, 0, 0, 1, 0, 0, 0, 1)
    assert image.GetSpacing() == pytest.approx((1.5, 1.5, 1.25))
    assert image.GetSize()[:2] == (150, 150)
    assert set(np.unique(sitk.GetArrayViewFromImage(labels))) == set(range(11))
    assert "image_position_patient" not in boy.meta


def test_meta_volumes_are_counted_on_the_labels_and_near_the_targets(boy):
    _, labels = arrays(boy)
    voxel_cm3 = 1.5 * 1.5 * 1.25 / 1000.0
    counts = np.bincount(labels.ravel(), minlength=11)
    for region in REGIONS:
        counted = counts[region.value] * voxel_cm3
        assert boy.meta["volumes_cm3"][region.key] == pytest.approx(counted, abs=1e-3)
        target = boy.meta["target_volumes_cm3"][region.key]
        assert counted == pytest.approx(target, rel=0.06), region.key
        mean, sd = COHORT_VOLUMES_CM3[region.key]
        assert mean - 4 * sd < counted < mean + 4 * sd, region.key


def test_meta_is_complete_and_json(boy):
    meta = json.loads(json.dumps(boy.meta))
    for key in ("generation", "seed", "sex", "age_years", "volumes_cm3", "pixel_spacing_mm", "slice_thickness_mm",
                "matrix", "n_slices", "tilt_deg", "pose", "noise_hu", "birth_date", "study_date"):
        assert key in meta, key
    assert meta["seed"] == SEED and meta["sex"] == "M" and meta["age_years"] == 2.0
    assert meta["generation"] == GENERATION
    assert set(meta["volumes_cm3"]) == set(REGION_KEYS)
    assert len(meta["pose"]["rotation_deg"]) == 3 and len(meta["pose"]["translation_mm"]) == 3
    assert all(abs(angle) <= 20.0 for angle in meta["pose"]["rotation_deg"])
    assert 3.0 <= meta["noise_hu"] <= 12.0
    from datetime import date
    birth = date.fromisoformat(f"{meta['birth_date'][:4]}-{meta['birth_date'][4:6]}-{meta['birth_date'][6:]}")
    study = date.fromisoformat(f"{meta['study_date'][:4]}-{meta['study_date'][4:6]}-{meta['study_date'][6:]}")
    assert (study - birth).days / 365.25 == pytest.approx(2.0, abs=1 / 365)


@pytest.mark.slow
def test_girl_and_older_child_change_every_region_in_the_right_direction(boy):
    girl = make_phantom(SEED, sex="F", age_years=2.0, **GRID)
    older = make_phantom(SEED, sex="M", age_years=2.45, **GRID)
    for key in REGION_KEYS:
        ratio_girl = girl.meta["volumes_cm3"][key] / boy.meta["volumes_cm3"][key]
        ratio_older = older.meta["volumes_cm3"][key] / boy.meta["volumes_cm3"][key]
        assert ratio_girl == pytest.approx(GIRL_VOLUME_FACTOR, abs=0.03), key
        assert ratio_older > 1.01, key


def test_drawn_volumes_follow_the_cohort():
    rng = np.random.default_rng(5)
    draws, sexes, ages = [], [], []
    for _ in range(3000):
        sex = "M" if rng.uniform() < 826 / 1487 else "F"
        age = float(np.clip(rng.normal(1.98, 0.28), 1.5, 2.5))
        draws.append(draw_target_volumes(rng, sex, age))
        sexes.append(sex)
        ages.append(age)
    sexes, ages = np.array(sexes), np.array(ages)
    for key in REGION_KEYS:
        values = np.array([d[key] for d in draws])
        mean, sd = COHORT_VOLUMES_CM3[key]
        assert values.mean() == pytest.approx(mean, rel=0.015), key
        assert values.std() == pytest.approx(sd, rel=0.15), key
        assert values[sexes == "M"].mean() > values[sexes == "F"].mean(), key
        assert np.corrcoef(ages, values)[0, 1] > 0.05, key
    # Regions of one child share its brain size.
    frontal = np.array([d["right_frontal_lobe"] for d in draws])
    cerebellum = np.array([d["cerebellum"] for d in draws])
    assert np.corrcoef(frontal, cerebellum)[0, 1] > 0.5


def _fissure_voxels(labels: np.ndarray, a: set[int], b: set[int]) -> np.ndarray:
    """Background voxels touching (within 1 voxel) both a region of ``a`` and a region of ``b``."""
    ball = ndimage.generate_binary_structure(3, 1)
    near_a = ndimage.binary_dilation(np.isin(labels, list(a)), ball)
    near_b = ndimage.binary_dilation(np.isin(labels, list(b)), ball)
    return near_a & near_b & (labels == 0)


def _touching(labels: np.ndarray, a: set[int], b: set[int]) -> int:
    """Voxels of ``a`` with a 6-neighbour in ``b`` (direct contact, no CSF between)."""
    ball = ndimage.generate_binary_structure(3, 1)
    return int((np.isin(labels, list(a)) & ndimage.binary_dilation(np.isin(labels, list(b)), ball)).sum())


#: Direct contact allowed, as a multiple of the fissure's voxels: the interhemispheric
#: fissure stops at the corpus callosum, and the Sylvian fissure is lateral (deep to the
#: insula the temporal stem joins frontal and temporal white matter without CSF).
@pytest.mark.parametrize("name, a, b, contact_factor", [
    ("interhemispheric", {1, 3, 5}, {2, 4, 6}, 1.0),
    ("sylvian", {1, 2}, {7, 8}, 3.0),
    ("central", {1, 2}, {3, 4}, 1.0),
    ("parieto-occipital", {3, 4}, {5, 6}, 1.0),
    ("tentorium", {5, 6, 7, 8}, {9}, 0.2),
])
def test_fissures_are_csf_sheets_between_lobes(boy, name, a, b, contact_factor):
    image, labels = arrays(boy)
    fissure = _fissure_voxels(labels, a, b)
    assert fissure.sum() > 100, f"{name}: no fissure between the regions"
    parenchyma = image[np.isin(labels, list(a | b))].astype(float)
    # Fissures are ~2 mm CSF sheets; at 1.5 mm voxels they are partial-volume darker than brain.
    assert image[fissure].mean() < parenchyma.mean() - 8.0, name
    assert image[fissure].mean() < 22.0, name
    assert _touching(labels, a, b) < contact_factor * fissure.sum(), name


def _cleft_fraction(labels: np.ndarray, value: int) -> float:
    """Background voxels a one-voxel closing adds to a region (its sulci), per voxel of the region."""
    region = np.pad(labels == value, 3)
    closed = ndimage.binary_closing(region, ndimage.generate_binary_structure(3, 1))[3:-3, 3:-3, 3:-3]
    return float((closed & (labels == 0)).sum() / (labels == value).sum())


def test_sulci_cut_the_cerebellum_but_not_the_brainstem(boy):
    # The brainstem has no cortex: generation 1 cut sulci into it (8 % of its volume here),
    # CSF clefts thinner than a voxel that no image shows.
    _, labels = arrays(boy)
    assert _cleft_fraction(labels, region_by_key("brainstem").value) < 0.02
    assert _cleft_fraction(labels, region_by_key("cerebellum").value) > 0.03


def test_lobes_share_one_parenchyma_intensity(boy):
    image, labels = arrays(boy)
    medians = {r.key: float(np.median(image[labels == r.value])) for r in REGIONS}
    lobes = [v for k, v in medians.items() if k.endswith("_lobe")]
    assert max(lobes) - min(lobes) < 3.0, medians
    assert all(22.0 < v < 42.0 for v in medians.values()), medians


def test_tissues_have_ct_values(boy):
    image, labels = arrays(boy)
    assert np.percentile(image, 5) < -950                                           # air around the head
    assert (image > 700).sum() * 1.5 * 1.5 * 1.25 / 1000 > 30.0                     # > 30 cm3 of cortical bone
    brain = labels > 0
    inside = ndimage.binary_fill_holes(ndimage.binary_closing(brain, iterations=3))
    csf = inside & ~brain
    assert 0.0 < float(np.median(image[csf])) < 22.0                                # CSF between and inside


def test_tilted_phantom_geometry(tilted):
    meta = tilted.meta
    t = math.radians(15.0)
    assert meta["tilt_deg"] == 15.0
    assert meta["image_orientation_patient"] == pytest.approx([1, 0, 0, 0, math.cos(t), -math.sin(t)])
    positions = np.array(meta["image_position_patient"])
    assert len(positions) == tilted.image.GetSize()[2] == meta["n_slices"]
    steps = np.diff(positions, axis=0)
    assert np.allclose(steps, [0.0, 0.0, 2.5 / math.cos(t)])                         # the table moves along z
    direction = np.array(tilted.image.GetDirection()).reshape(3, 3)
    assert direction[:, 1] == pytest.approx([0, math.cos(t), -math.sin(t)])
    assert tilted.image.GetSpacing()[2] == pytest.approx(2.5)                        # table increment * cos(tilt)
    assert tilted.image.GetOrigin() == pytest.approx(tuple(positions[0]))
    assert tilted.labels.GetDirection() == tilted.image.GetDirection()


def test_drawn_scan_parameters_are_in_range():
    thin = make_phantom(3, n_slices=2)   # 512 matrix, drawn pixel size and thickness; two slices are cheap
    assert thin.meta["slice_thickness_mm"] in SLICE_THICKNESS_CHOICES_MM
    assert 0.42 <= thin.meta["pixel_spacing_mm"] <= 0.6       # >= 215 mm field of view at 512
    assert thin.image.GetSize() == (512, 512, 2)
    assert thin.meta["sex"] in ("M", "F") and 1.5 <= thin.meta["age_years"] <= 2.5


@pytest.mark.parametrize("kwargs, message", [
    (dict(slice_thickness_mm=0.0), "slice thickness"),
    (dict(pixel_spacing_mm=-1.0), "pixel spacing"),
    (dict(matrix=8), "matrix"),
    (dict(matrix=128, pixel_spacing_mm=0.5), "field of view"),
    (dict(n_slices=0), "n_slices"),
    (dict(tilt_deg=45.0), "tilt"),
    (dict(sex="X"), "sex"),
    (dict(age_years=30.0), "age"),
])
def test_bad_arguments_are_refused_with_their_name(kwargs, message):
    with pytest.raises(ValueError, match=message):
        make_phantom(1, **kwargs)


def test_negative_seed_is_refused():
    with pytest.raises(ValueError, match="seed"):
        make_phantom(-1)


def test_montage_shows_three_planes_with_overlay(boy, tmp_path):
    path = save_montage(boy.image, boy.labels, tmp_path / "m.png", title="test")
    picture = np.asarray(Image.open(path).convert("RGB")).astype(int)
    assert picture.shape[0] > 600 and picture.shape[1] > 600
    # The overlay row carries region colours: some pixels far from grey.
    lower = picture[picture.shape[0] // 2:]
    assert (np.ptp(lower, axis=2) > 60).mean() > 0.05
    with pytest.raises(ValueError, match="size"):
        save_montage(boy.image, sitk.Image(4, 4, 4, sitk.sitkUInt8), tmp_path / "bad.png")


@pytest.mark.slow
def test_phantom_command_writes_cases(tmp_path, capsys):
    out = tmp_path / "phantoms"
    args = ["phantom", "--out", str(out), "--count", "2", "--seed", "40", "--montage", "--nifti",
            "--matrix", "64", "--pixel-spacing", "3.2", "--slice-thickness", "5"]
    assert main(args) == 0
    for index, seed in enumerate((40, 41)):
        case = out / f"case_{index:04d}"
        meta = json.loads((case / "meta.json").read_text())
        assert meta["seed"] == seed
        labels = sitk.ReadImage(str(case / "labels.nii.gz"))
        assert labels.GetSize() == (64, 64, meta["n_slices"])
        assert len(list((case / "dicom").glob("*.dcm"))) == meta["n_slices"]
        assert (case / "montage.png").stat().st_size > 1000
        assert sitk.ReadImage(str(case / "image.nii.gz")).GetSize() == labels.GetSize()
        counts = np.bincount(sitk.GetArrayFromImage(labels).ravel(), minlength=11)
        voxel = 3.2 * 3.2 * 5 / 1000
        assert meta["volumes_cm3"]["cerebellum"] == pytest.approx(counts[9] * voxel, abs=1e-3)
    # Existing cases are not overwritten silently.
    assert main(args) == 1
    assert "already exists" in capsys.readouterr().err


@pytest.mark.parametrize("extra, message", [
    (["--count", "0"], "--count"),
    (["--seed", "-3"], "--seed"),
    (["--slice-thickness", "0"], "slice thickness"),
])
def test_phantom_command_bad_arguments(tmp_path, capsys, extra, message):
    assert main(["phantom", "--out", str(tmp_path / "x")] + extra) == 1
    assert message in capsys.readouterr().err


def test_phantom_help_teaches(capsys):
    with pytest.raises(SystemExit):
        main(["phantom", "--help"])
    text = capsys.readouterr().out
    assert "examples:" in text and "--montage" in text and "case_0000" in text


@pytest.mark.slow
def test_thick_slices_average_the_thin_ones_of_the_same_child():
    """Same seed, same child and pose: a 5 mm slice is the mean of the 1 mm slices it covers."""
    grid = dict(matrix=80, pixel_spacing_mm=2.8, sex="F", age_years=2.2)
    thick = make_phantom(50, slice_thickness_mm=5.0, **grid)
    thin = make_phantom(50, slice_thickness_mm=1.0, **grid)
    assert thick.meta["pose"] == thin.meta["pose"]
    assert thick.meta["target_volumes_cm3"] == thin.meta["target_volumes_cm3"]
    thin_resampled = sitk.Resample(sitk.Cast(thin.image, sitk.sitkFloat32), thick.image, sitk.Transform(),
                                   sitk.sitkLinear, -1000.0)
    # Average the thin slices over each 5 mm slab: shift the thin series by -2, -1, 0, 1, 2 mm.
    slabs = []
    for offset in (-2.0, -1.0, 0.0, 1.0, 2.0):
        shifted = sitk.TranslationTransform(3, (0.0, 0.0, offset))
        slabs.append(sitk.GetArrayFromImage(sitk.Resample(sitk.Cast(thin.image, sitk.sitkFloat32), thick.image,
                                                          shifted, sitk.sitkLinear, -1000.0)))
    profile = np.mean(slabs, axis=0)
    centre = sitk.GetArrayFromImage(thin_resampled)
    observed = sitk.GetArrayFromImage(thick.image).astype(float)
    brain = sitk.GetArrayFromImage(thick.labels) > 0
    skull_zone = ndimage.binary_dilation(brain, iterations=3) & ~brain
    # Near the skull, where HU change fast along z, the slab mean explains the thick slice
    # better than the thin slice at its centre does.
    error_profile = np.abs(observed - profile)[skull_zone].mean()
    error_centre = np.abs(observed - centre)[skull_zone].mean()
    assert error_profile < 0.25 * error_centre, (error_profile, error_centre)
    # The labels of the thick series are those at the slice centres.
    centre_labels = sitk.GetArrayFromImage(sitk.Resample(thin.labels, thick.labels, sitk.Transform(),
                                                         sitk.sitkNearestNeighbor, 0))
    assert (centre_labels == sitk.GetArrayFromImage(thick.labels)).mean() > 0.97
