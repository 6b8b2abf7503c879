"""Brain-surface refinement on a synthetic head: a brain ball in a CSF shell inside bone."""
import numpy as np
import pytest

from inference.surface import SurfaceRefinement, otsu_threshold, refine_brain_surface

SPACING = (1.0, 0.5, 0.5)   # z, y, x (mm): thin slices, finer pixels
BRAIN_RADIUS_MM = 30.0
CSF_OUTER_MM = 33.0


def _radius_mm(shape=(80, 150, 150)) -> np.ndarray:
    z, y, x = np.indices(shape, dtype=np.float32)
    centre = (np.array(shape) - 1) / 2
    return np.sqrt(((z - centre[0]) * SPACING[0]) ** 2 + ((y - centre[1]) * SPACING[1]) ** 2
                   + ((x - centre[2]) * SPACING[2]) ** 2)


def _head(noise_hu: float = 4.0) -> tuple[np.ndarray, np.ndarray]:
    """HU image (brain 35, CSF 5, bone 1000, with noise) and the radius of every voxel (mm)."""
    radius = _radius_mm()
    hu = np.where(radius <= BRAIN_RADIUS_MM, 35.0, np.where(radius <= CSF_OUTER_MM, 5.0, 1000.0))
    hu = hu + np.random.default_rng(7).normal(0.0, noise_hu, hu.shape)
    return hu.astype(np.float32), radius


def _hemispheres(inside: np.ndarray) -> np.ndarray:
    """Label 1 (right frontal) on one half, 2 (left frontal) on the other, 0 outside."""
    labels = np.zeros(inside.shape, dtype=np.uint8)
    half = inside.shape[2] // 2
    labels[:, :, :half][inside[:, :, :half]] = 1
    labels[:, :, half:][inside[:, :, half:]] = 2
    return labels


def _volume_cm3(labels: np.ndarray) -> float:
    return float((labels > 0).sum() * np.prod(SPACING) / 1000.0)


@pytest.mark.parametrize("predicted_radius_mm", [31.5, 28.5])
def test_edge_moves_to_the_csf_contrast(predicted_radius_mm):
    hu, radius = _head()
    predicted = _hemispheres(radius <= predicted_radius_mm)
    true_cm3 = _volume_cm3(radius <= BRAIN_RADIUS_MM)
    before = _volume_cm3(predicted) / true_cm3 - 1
    refined = refine_brain_surface(predicted, hu, SPACING)
    after = _volume_cm3(refined) / true_cm3 - 1
    assert abs(before) > 0.12, before            # 1.5 mm off on a 30 mm ball: about 15 %
    assert abs(after) < 0.03, (before, after)
    # the refined edge lies on the true one: everything left as brain is within a voxel of it
    assert radius[refined > 0].max() <= BRAIN_RADIUS_MM + 0.75


def test_added_voxels_take_the_nearest_lobe():
    hu, radius = _head()
    refined = refine_brain_surface(_hemispheres(radius <= 28.5), hu, SPACING)
    half = hu.shape[2] // 2
    added_right = refined[:, :, :half - 3][radius[:, :, :half - 3] > 28.5]
    added_left = refined[:, :, half + 3:][radius[:, :, half + 3:] > 28.5]
    assert set(np.unique(added_right)) == {0, 1}
    assert set(np.unique(added_left)) == {0, 2}


def test_brainstem_and_cerebellum_are_left_as_drawn():
    hu, radius = _head()
    predicted = np.where(radius <= 31.5, 10, 0).astype(np.uint8)   # all brainstem, 1.5 mm too big
    np.testing.assert_array_equal(refine_brain_surface(predicted, hu, SPACING), predicted)


def test_coarse_slices_are_left_as_they_are():
    hu, radius = _head()
    predicted = _hemispheres(radius <= 31.5)
    settings = SurfaceRefinement(max_spacing_mm=0.9)     # SPACING has 1.0 mm slices
    np.testing.assert_array_equal(refine_brain_surface(predicted, hu, SPACING, settings), predicted)


def test_no_brain_gives_the_labels_back():
    hu, _ = _head()
    empty = np.zeros(hu.shape, dtype=np.uint8)
    np.testing.assert_array_equal(refine_brain_surface(empty, hu, SPACING), empty)


def test_input_labels_are_not_modified():
    hu, radius = _head()
    predicted = _hemispheres(radius <= 31.5)
    copy = predicted.copy()
    refine_brain_surface(predicted, hu, SPACING)
    np.testing.assert_array_equal(predicted, copy)


def test_otsu_threshold_splits_two_modes():
    sample = np.concatenate([np.random.default_rng(1).normal(5, 3, 5000),
                             np.random.default_rng(2).normal(35, 3, 5000)])
    assert 15 < otsu_threshold(sample) < 25
    with pytest.raises(ValueError, match="two distinct values"):
        otsu_threshold(np.full(10, 3.0))


@pytest.mark.parametrize("kwargs, message", [
    ({"remove_depth_mm": -1.0}, "remove_depth_mm must be >= 0"),
    ({"band_mm": 1.0}, "band_mm .* must be at least"),
    ({"hu_range": (60.0, -20.0)}, "low < high"),
    ({"max_brain_hu": -30.0}, "must exceed hu_range"),
])
def test_settings_are_validated(kwargs, message):
    with pytest.raises(ValueError, match=message):
        SurfaceRefinement(**kwargs)


def test_bad_inputs_are_refused():
    hu, radius = _head()
    labels = _hemispheres(radius <= 30)
    with pytest.raises(ValueError, match="one shape"):
        refine_brain_surface(labels[:-1], hu, SPACING)
    with pytest.raises(ValueError, match="three positive lengths"):
        refine_brain_surface(labels, hu, (1.0, 0.0, 0.5))
    with pytest.raises(ValueError, match="within 0..10"):
        refine_brain_surface(np.full(hu.shape, 11, dtype=np.uint8), hu, SPACING)


def test_a_dark_speck_inside_the_cortex_stays_brain():
    hu, radius = _head(noise_hu=0.0)
    centre = (np.array(hu.shape) - 1) / 2
    z, y = int(centre[0]), int(centre[1])
    x = int(round(centre[2] - 28.5 / SPACING[2]))                 # 1.5 mm under the surface
    hu[z - 1:z + 2, y - 2:y + 3, x - 1:x + 2] = 5.0               # CSF-dark, but no CSF reaches it
    predicted = _hemispheres(radius <= BRAIN_RADIUS_MM)
    refined = refine_brain_surface(predicted, hu, SPACING)
    assert (refined[z - 1:z + 2, y - 2:y + 3, x - 1:x + 2] == 1).all()
    settings = SurfaceRefinement()
    assert radius[z, y, x] < BRAIN_RADIUS_MM - 1.0 and settings.remove_depth_mm > 1.5
