"""Synthetic phantoms (generation 3): determinism, geometry, volumes, anatomy, deformation,
densities, montage and the ``lobevol phantom`` command.

A phantom costs 10-20 s of CPU whatever its grid (the 1 mm canonical anatomy dominates):
phantoms here use coarse grids and are shared through module fixtures.
"""
from __future__ import annotations

import json
import math

import numpy as np
import pytest
import SimpleITK as sitk
from PIL import Image
from scipy import ndimage

from inference.montage import save_montage
from inference.phantoms import anatomy
from inference.phantoms.anatomy import DeformationParameters, TissueDensities, exponentiate, make_canonical_head
from inference.phantoms.generator import (COHORT_VOLUMES_CM3, GENERATION, child_of_seed, GIRL_VOLUME_FACTOR, HELD_OUT_SEEDS,
                                          SLICE_THICKNESS_CHOICES_MM, _rotation_matrix, draw_target_volumes,
                                          make_phantom)
from inference.training import phantom_training_specs
from inference.vocabulary import REGION_KEYS, REGIONS, region_by_key
from inference.volumes import countable_labels, parenchyma_threshold_hu
from node.cli import main

GRID = dict(matrix=150, pixel_spacing_mm=1.5, slice_thickness_mm=1.25)
VOXEL_CM3 = 1.5 * 1.5 * 1.25 / 1000.0
SEED = 21
TILTED = dict(matrix=64, pixel_spacing_mm=3.5, slice_thickness_mm=2.5, tilt_deg=15.0)
#: The cohort's mean regional shares of the parenchyma, in region order.
COHORT_SHARES = np.array([COHORT_VOLUMES_CM3[key][0] for key in REGION_KEYS])
COHORT_SHARES = COHORT_SHARES / COHORT_SHARES.sum()


@pytest.fixture(scope="module")
def boy():
    return make_phantom(SEED, sex="M", age_years=2.0, **GRID)


@pytest.fixture(scope="module")
def tilted():
    return make_phantom(SEED + 1, **TILTED)


@pytest.fixture(scope="module")
def canonical_heads():
    """Two cases' canonical heads (1 mm, before scale and pose) with the cohort's mean shares, and their densities."""
    heads = []
    for seed in (1, 2):
        appearance = np.random.default_rng([seed, 4])
        densities = TissueDensities.draw(appearance)
        heads.append((make_canonical_head(np.random.default_rng([seed, 2]), COHORT_SHARES, densities, appearance),
                      densities))
    return heads


def arrays(phantom):
    return sitk.GetArrayFromImage(phantom.image), sitk.GetArrayFromImage(phantom.labels)


def dice(a: np.ndarray, b: np.ndarray) -> float:
    return 2.0 * float((a & b).sum()) / float(a.sum() + b.sum())


# ---------------------------------------------------------------------------------------
# The phantom as written: determinism, grid, meta, volumes
# ---------------------------------------------------------------------------------------


def test_same_seed_same_phantom(tilted):
    again = make_phantom(SEED + 1, **TILTED)
    image, labels = arrays(tilted)
    image2, labels2 = arrays(again)
    assert np.array_equal(image, image2)
    assert np.array_equal(labels, labels2)
    assert json.dumps(tilted.meta, sort_keys=True) == json.dumps(again.meta, sort_keys=True)


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


def test_meta_volumes_are_counted_on_the_labels(boy):
    _, labels = arrays(boy)
    counts = np.bincount(labels.ravel(), minlength=11)
    for region in REGIONS:
        assert boy.meta["volumes_cm3"][region.key] == pytest.approx(counts[region.value] * VOXEL_CM3, abs=1e-3)


def test_drawn_volumes_are_the_labelled_volumes(boy):
    """Each region's labelled volume (the node's definition: parenchyma of its territory) is what was drawn."""
    volumes, targets = boy.meta["volumes_cm3"], boy.meta["target_volumes_cm3"]
    assert sum(volumes.values()) == pytest.approx(sum(targets.values()), rel=0.02)
    for key in REGION_KEYS:
        # On this coarse written grid (1.5 x 1.5 x 1.25 mm) a region's edge voxels move it a little.
        assert volumes[key] == pytest.approx(targets[key], rel=0.03), key


def test_every_regional_share_reaches_its_target(canonical_heads):
    """The adult atlas's brainstem is ~1.9 times the cohort's share; each case reaches the drawn shares."""
    base = anatomy.atlas_anatomy()
    parenchyma = (base.intracranial > 0.5) & (base.grey + base.white > base.csf)
    atlas_counts = np.bincount(base.regions[parenchyma], minlength=11)[1:]
    atlas_ratio = atlas_counts / atlas_counts.sum() / COHORT_SHARES
    brainstem = region_by_key("brainstem").value - 1
    assert atlas_ratio[brainstem] > 1.5     # what there is to correct
    for head, _ in canonical_heads:
        counts = np.bincount(head.labels.ravel(), minlength=11)[1:]
        ratio = counts / counts.sum() / COHORT_SHARES
        assert np.all(np.abs(ratio - 1.0) < 0.03), ratio


def test_meta_is_complete_and_json(boy):
    meta = json.loads(json.dumps(boy.meta))
    for key in ("generation", "seed", "sex", "age_years", "volumes_cm3", "target_volumes_cm3", "pixel_spacing_mm",
                "slice_thickness_mm", "matrix", "n_slices", "tilt_deg", "pose", "noise_hu", "noise_grain_mm",
                "kernel_sigma_mm", "anatomy", "birth_date", "study_date"):
        assert key in meta, key
    assert meta["seed"] == SEED and meta["sex"] == "M" and meta["age_years"] == 2.0
    assert meta["generation"] == GENERATION >= 3
    assert set(meta["volumes_cm3"]) == set(REGION_KEYS)
    assert len(meta["pose"]["rotation_deg"]) == 3 and len(meta["pose"]["translation_mm"]) == 3
    assert all(abs(angle) <= 20.0 for angle in meta["pose"]["rotation_deg"])
    assert 3.0 <= meta["noise_hu"] <= 12.0
    assert 0.0 <= meta["kernel_sigma_mm"] <= 0.6 and 0.35 <= meta["noise_grain_mm"] <= 0.6
    drawn = meta["anatomy"]
    assert set(drawn) >= {"deformation", "densities", "csf", "parenchyma_threshold_hu"}
    assert set(drawn["csf"]) == {"csf_share", "sulcal_fraction", "ventricle_volume_factor", "extra_axial_mm"}
    assert len(drawn["deformation"]["region_log_scales"]) == len(REGIONS)
    assert drawn["densities"]["white_hu"] < drawn["densities"]["grey_hu"]
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


# ---------------------------------------------------------------------------------------
# Anatomy: where the regions are, what the labels cover, how cases differ
# ---------------------------------------------------------------------------------------


def head_frame_centroids(phantom) -> dict[str, np.ndarray]:
    """Each region's centroid in the head frame (LPS about the atlas centre, mm): the pose undone."""
    labels = sitk.GetArrayFromImage(phantom.labels)
    pose = phantom.meta["pose"]
    rotation = _rotation_matrix(np.array(pose["rotation_deg"]))
    translation = np.array(pose["translation_mm"])
    centroids = {}
    for region in REGIONS:
        index = np.argwhere(labels == region.value).mean(axis=0)[::-1]
        point = np.array(phantom.labels.TransformContinuousIndexToPhysicalPoint([float(v) for v in index]))
        centroids[region.key] = rotation.T @ (point - translation) / pose["scale"]
    return centroids


def test_regions_lie_where_the_anatomy_puts_them(boy):
    c = head_frame_centroids(boy)
    x, y, z = 0, 1, 2   # LPS: +x patient left, +y posterior, +z superior
    for lobe in ("frontal", "parietal", "occipital", "temporal"):
        # Measured 47-78 mm apart.
        assert c[f"left_{lobe}_lobe"][x] > c[f"right_{lobe}_lobe"][x] + 20.0, lobe
        assert c[f"left_{lobe}_lobe"][x] > 5.0 and c[f"right_{lobe}_lobe"][x] < -5.0, lobe
    for side in ("left", "right"):
        frontal, parietal, occipital, temporal = (c[f"{side}_{lobe}_lobe"] for lobe in
                                                  ("frontal", "parietal", "occipital", "temporal"))
        assert frontal[y] + 20.0 < parietal[y] < occipital[y] - 10.0, side     # measured -37, 29, 59 mm
        assert temporal[z] < parietal[z] - 15.0, side                           # measured 47 mm lower
        assert temporal[y] > frontal[y] + 15.0, side                            # measured 38 mm behind
    cerebellum, brainstem = c["cerebellum"], c["brainstem"]
    for key in ("cerebellum", "brainstem"):
        assert abs(c[key][x]) < 10.0, key                                       # midline (measured 2.6, 0.3 mm)
    assert cerebellum[z] < min(c["left_occipital_lobe"][z], c["right_occipital_lobe"][z]) - 15.0   # measured 40 mm
    assert cerebellum[y] > brainstem[y] + 15.0                                  # behind the brainstem (measured 37 mm)
    assert brainstem[z] < min(c["left_temporal_lobe"][z], c["right_temporal_lobe"][z])


def test_labels_lie_on_parenchyma_densities_only(boy):
    image, labels = arrays(boy)
    labelled = labels > 0
    # No label on air after the slice profile, the kernel blur and the noise (measured: 0.1st percentile 1 HU).
    assert np.percentile(image[labelled].astype(float), 0.1) > -20.0
    # Bright labelled voxels are partial volume with the skull where the cortex touches it (the truth
    # is counted before acquisition): a few %, all within one voxel of bone (measured 1.8 %, at most
    # 1.95 mm); farther than 3 mm the brightest labelled voxel is brain (measured 69 HU).
    bone = (image > 300) & ~labelled
    from_bone_mm = ndimage.distance_transform_edt(~bone, sampling=boy.image.GetSpacing()[::-1])
    bright = labelled & (image >= 100)
    assert bright.sum() < 0.03 * labelled.sum() and from_bone_mm[bright].max() <= 2.0
    assert image[labelled & (from_bone_mm > 3.0)].max() < 100
    densities = boy.meta["anatomy"]["densities"]
    for region in REGIONS:
        median = float(np.median(image[labels == region.value]))
        # Measured 27-33 HU (white 26.9, grey 36.5): between white and grey matter, no region code.
        assert densities["white_hu"] - 6.0 < median < densities["grey_hu"] + 3.0, (region.key, median)


def test_canonical_labels_are_counted_by_the_node_s_definition(canonical_heads):
    """The truth is the node's definition applied to the image before acquisition (inference.volumes)."""
    for head, densities in canonical_heads:
        threshold = head.meta["parenchyma_threshold_hu"]
        assert threshold == parenchyma_threshold_hu(head.hu[head.intracranial])
        assert densities.csf < threshold < densities.white, (densities, threshold)
        assert np.array_equal(head.labels, countable_labels(head.territory, head.hu, (1.0, 1.0, 1.0), threshold))
        assert not ((head.territory > 0) & ~head.intracranial).any()
        # What the definition leaves out of a territory is CSF: much darker than what it counts.
        left_out = head.hu[(head.territory > 0) & (head.labels == 0)]
        assert np.median(left_out) < np.median(head.hu[head.labels > 0]) - 8.0


def test_two_seeds_are_the_same_anatomy_in_different_shapes(canonical_heads):
    (first, _), (second, _) = canonical_heads
    for region in REGIONS:
        overlap = dice(first.labels == region.value, second.labels == region.value)
        # Measured 0.65 (brainstem) to 0.85 (cerebellum).
        assert 0.5 < overlap < 0.95, (region.key, overlap)


def test_tissues_have_ct_values(boy):
    image, labels = arrays(boy)
    assert np.percentile(image, 5) < -950                                           # air around the head
    bone_cm3 = (image > 300).sum() * VOXEL_CM3
    assert 100.0 < bone_cm3 < 1000.0, bone_cm3                                      # skull (measured 354 cm3)
    brain = labels > 0
    inside = ndimage.binary_fill_holes(ndimage.binary_closing(brain, iterations=3))
    csf = inside & ~brain
    assert float(np.median(image[csf])) < float(np.median(image[brain])) - 8.0      # measured 12 vs 30 HU


def test_the_cranium_is_closed_but_at_the_foramen_magnum(canonical_heads):
    """Bone encloses the intracranial space: no path through non-bone from the brain to the air
    outside the head above the foramen magnum. (The adult template's skull alone, thresholded,
    is open over the forehead and the orbital roofs, and the preprocessing's intracranial
    mask then stopped above the hole.)"""
    for head, _ in canonical_heads:
        lowest = int(np.nonzero(head.intracranial.any(axis=(1, 2)))[0].min())
        # Cut below: the foramen magnum is open for FORAMEN_MM above the atlas's lowest
        # intracranial voxel, and the deformation moves it by a few mm (13 mm seen).
        above = slice(lowest + int(anatomy.FORAMEN_MM + 10.0), None)
        components, _ = ndimage.label(head.hu[above] < 300.0)
        inside = components[head.intracranial[above]]
        outside = components[~head.head[above]]
        assert not np.intersect1d(np.unique(inside), np.unique(outside)).size


def test_the_preprocessing_finds_the_whole_brain_inside_the_skull(boy):
    from inference.preprocess import PreprocessConfig, preprocess_image

    pre = preprocess_image(sitk.Cast(boy.image, sitk.sitkFloat32), PreprocessConfig())
    mask = sitk.GetImageFromArray(pre.mask.astype(np.uint8))
    mask.CopyInformation(pre.grid)
    on_series = sitk.GetArrayFromImage(sitk.Resample(mask, boy.labels, sitk.Transform(), sitk.sitkNearestNeighbor, 0))
    labels = sitk.GetArrayViewFromImage(boy.labels) > 0
    assert (on_series[labels] > 0).mean() > 0.98            # with the template's skull alone: 0.27-0.83


# ---------------------------------------------------------------------------------------
# The deformation and the densities
# ---------------------------------------------------------------------------------------


def jacobian_determinant(displacement: np.ndarray) -> np.ndarray:
    """det(I + du/dx) of x -> x + u(x) at every lattice node (u: 3, z, y, x in mm, components x, y, z)."""
    gradient = np.array([[np.gradient(displacement[c], anatomy.LATTICE_MM, axis=2 - a) for a in range(3)]
                         for c in range(3)])
    jacobian = np.moveaxis(gradient + np.eye(3)[:, :, None, None, None], (0, 1), (-2, -1))
    return np.linalg.det(jacobian)


def strongest_velocity(rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    """A velocity on the atlas's lattice with every drawn amplitude at the top of its range,
    every region scaled by the limit: the lattice regions and the velocity (3, z, y, x, mm)."""
    base = anatomy.atlas_anatomy()
    shape, xyz = anatomy._lattice_points(base.shape, base.origin_mm)
    regions = anatomy._lattice_sample(base.regions, shape)
    top = DeformationParameters(large_mm=6.0, medium_mm=2.0, asymmetry=0.03, petalia=0.03)
    velocity = top.large_mm * anatomy._random_field(rng, shape, 24.0) + top.medium_mm * anatomy._random_field(rng, shape, 8.0)
    velocity[0] -= np.sqrt(xyz[0] ** 2 + 25.0) * (top.asymmetry + top.petalia * np.tanh(xyz[1] / 30.0))
    limits = {r.value: math.log(anatomy.MAX_BRAINSTEM_SCALE if r.key == "brainstem" else anatomy.MAX_REGION_SCALE)
              for r in REGIONS}
    scales = {value: float(rng.choice([-limit, limit])) for value, limit in limits.items()}
    scales[region_by_key("brainstem").value] = -limits[region_by_key("brainstem").value]   # the way it is scaled
    velocity += anatomy.region_scaling_velocity(regions, xyz, scales)
    return regions, velocity


def test_drawn_deformation_parameters_stay_in_their_ranges():
    drawn = [DeformationParameters.draw(np.random.default_rng(s)) for s in range(300)]
    assert max(p.large_mm for p in drawn) <= 6.0 and max(p.medium_mm for p in drawn) <= 2.0
    assert max(abs(p.asymmetry) for p in drawn) <= 0.03 and max(abs(p.petalia) for p in drawn) <= 0.03


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_the_deformation_is_diffeomorphic(seed):
    regions, velocity = strongest_velocity(np.random.default_rng(seed))
    displacement = exponentiate(velocity)
    brain = regions > 0
    assert np.linalg.norm(displacement, axis=0)[brain].max() > 5.0              # it deforms (measured ~20 mm)
    # The velocity itself would fold space (det < 0, measured down to -5); its exponential
    # never does (measured min det 0.06-0.13 with every amplitude at its top).
    assert jacobian_determinant(velocity).min() < 0.0
    assert jacobian_determinant(displacement).min() > 0.0
    # exp(-v) inverts exp(v): composing them returns (about) the identity inside the brain
    # (measured mean 0.25-0.28 mm, against displacements up to ~20 mm).
    inverse = exponentiate(-velocity)
    at = np.indices(brain.shape, dtype=np.float32) + displacement[::-1] / anatomy.LATTICE_MM
    residual = displacement + np.stack([ndimage.map_coordinates(c, at, order=1, mode="nearest") for c in inverse])
    assert np.linalg.norm(residual, axis=0)[brain].mean() < 1.0


def test_zero_velocity_gives_no_displacement():
    assert not exponentiate(np.zeros((3, 9, 8, 7), np.float32)).any()


def test_drawn_densities_are_in_the_documented_ranges():
    drawn = [TissueDensities.draw(np.random.default_rng(s)) for s in range(500)]
    for d in drawn:
        assert 30.0 <= d.grey <= 42.0
        assert 4.0 <= d.grey - d.white <= 10.0          # a toddler's white matter: darker than grey, less than an adult's gap
        assert 0.0 <= d.csf <= 12.0 and d.csf < d.white
        assert 700.0 <= d.bone_peak <= 1500.0
        assert -8.0 <= d.soft_offset <= 8.0             # on the template's own soft tissue and fat
        assert len(d.region_offsets) == len(REGIONS)
    # The contrast varies from case to case (the SynthSeg idea): a spread, not one value.
    assert np.ptp([d.grey for d in drawn]) > 8.0 and np.ptp([d.grey - d.white for d in drawn]) > 4.0
    # Per-region offsets are small next to the grey-white difference: no intensity code.
    assert np.abs([d.region_offsets for d in drawn]).mean() < 2.0


# ---------------------------------------------------------------------------------------
# Held-out seeds, scan geometry, arguments
# ---------------------------------------------------------------------------------------


@pytest.mark.parametrize("count, seed", [(1, 900_000), (10, 899_995), (5, 999_999), (2_000_000, 0)])
def test_training_refuses_held_out_seeds(count, seed):
    with pytest.raises(ValueError, match="900000-999999"):
        list(phantom_training_specs(count, seed))


def test_training_takes_seeds_around_the_held_out_ones():
    # Loaders are lazy: naming the cases makes no phantom.
    names = [name for name, _ in phantom_training_specs(3, HELD_OUT_SEEDS.start - 3)]
    names += [name for name, _ in phantom_training_specs(2, HELD_OUT_SEEDS.stop)]
    assert names == [f"phantom_g{GENERATION}_{s:06d}" for s in (899_997, 899_998, 899_999, 1_000_000, 1_000_001)]


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
    assert "atlas" in text and "900000-999999" in text      # what a phantom is made of; the held-out seeds


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


def test_a_typical_child_is_built_at_the_reference_means_and_reads_within_everywhere():
    from normative.compare import compare, load_reference

    sex, age = child_of_seed(SEED + 2)
    reference = load_reference()
    means = {key: reference.expected(key, age, sex).mean for key in REGION_KEYS}
    typical = make_phantom(SEED + 2, volumes_cm3=means, **GRID)
    assert (typical.meta["sex"], typical.meta["age_years"]) == (sex, round(age, 4))
    assert typical.meta["target_volumes_cm3"] == {key: round(value, 3) for key, value in means.items()}
    for key in REGION_KEYS:
        assert typical.meta["volumes_cm3"][key] == pytest.approx(means[key], rel=0.03), key
    result = compare(typical.meta["volumes_cm3"], sex, age)
    assert {r.flag for r in result.regions} == {"within"} and max(abs(r.z_score) for r in result.regions) < 0.5
    with pytest.raises(ValueError, match="missing"):
        make_phantom(SEED + 2, volumes_cm3={"brainstem": 15.0}, **GRID)
