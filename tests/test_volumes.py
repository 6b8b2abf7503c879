"""The one volume counter (inference/volumes.py): pixel area x slice extent, checked by hand; which voxels of a region count."""
import numpy as np
import pytest

from inference.volumes import (HALF_CONTRAST_HU, countable_labels, label_volumes_mm3, parenchyma_threshold_hu,
                               region_volumes_cm3)


def test_each_pixel_counts_for_its_area_times_its_slices_extent():
    slices = np.zeros((3, 4, 5), np.uint8)
    slices[0, :2, :] = 1          # 10 pixels of label 1 on a 2 mm slice
    slices[2, 0, 0] = 9           # 1 pixel of label 9 on a 5 mm slice
    volumes = label_volumes_mm3(slices, pixel_area_mm2=0.25, slice_extents=[2.0, 3.0, 5.0])
    assert volumes[1] == pytest.approx(10 * 0.25 * 2.0)
    assert volumes[9] == pytest.approx(0.25 * 5.0)
    assert volumes.sum() == pytest.approx(20 * 0.25 * (2.0 + 3.0 + 5.0))  # background included
    by_key = region_volumes_cm3(slices, 0.25, [2.0, 3.0, 5.0])
    assert by_key["right_frontal_lobe"] == pytest.approx(0.005) and by_key["cerebellum"] == pytest.approx(0.00125)
    assert len(by_key) == 10


@pytest.mark.parametrize("slices, area, extents, message", [
    (np.zeros((2, 3, 3), np.uint8), 1.0, [1.0], "2 slices"),
    (np.zeros((2, 3, 3), np.uint8), 0.0, [1.0, 1.0], "pixel area"),
    (np.zeros((2, 3, 3), np.uint8), 1.0, [1.0, np.nan], "slice extents"),
    (np.full((1, 2, 2), 11, np.uint8), 1.0, [1.0], "0..10"),
    (np.zeros((1, 2, 2), np.float32), 1.0, [1.0], "integers"),
    (np.zeros((2, 2), np.uint8), 1.0, [1.0], "slices, rows, columns"),
])
def test_inputs_that_cannot_be_counted_are_refused_with_the_reason(slices, area, extents, message):
    with pytest.raises(ValueError, match=message):
        label_volumes_mm3(slices, area, extents)


def test_the_threshold_sits_below_the_parenchyma_peak_whatever_the_share_of_csf():
    rng = np.random.default_rng(0)
    brain, csf = rng.normal(30.0, 3.0, 90_000), rng.normal(6.0, 3.0, 10_000)
    assert parenchyma_threshold_hu(np.concatenate([brain, csf])) == pytest.approx(30.5 - HALF_CONTRAST_HU, abs=1.0)
    # Tight sulci (almost no CSF) or hydrocephalus (more CSF than brain): the peak is still the brain's.
    assert parenchyma_threshold_hu(brain) == pytest.approx(30.5 - HALF_CONTRAST_HU, abs=1.0)
    hydrocephalus = np.concatenate([rng.normal(30.0, 3.0, 40_000), rng.normal(6.0, 3.0, 60_000)])
    assert parenchyma_threshold_hu(hydrocephalus) == pytest.approx(30.5 - HALF_CONTRAST_HU, abs=1.0)
    # A darker scanner calibration moves the threshold with it.
    assert parenchyma_threshold_hu(brain - 8.0) == pytest.approx(22.5 - HALF_CONTRAST_HU, abs=1.0)
    with pytest.raises(ValueError, match="no brain parenchyma"):
        parenchyma_threshold_hu(rng.normal(-500.0, 10.0, 50_000))


def test_a_region_counts_its_parenchyma_not_its_csf_nor_bone():
    hu = np.full((6, 40, 40), 32.0, np.float32)
    hu[:, :, 10:20] = 4.0        # a sulcus / CSF inside the territory
    hu[:, :, 30:] = 900.0        # bone
    labels = np.full(hu.shape, 3, np.uint8)
    counted = countable_labels(labels, hu, (2.0, 0.5, 0.5), threshold_hu=20.0)
    columns = counted[3, 20]
    assert (columns[:9] == 3).all() and (columns[11:19] == 0).all() and (columns[21:29] == 3).all()
    assert (columns[31:] == 0).all()
    assert not countable_labels(np.zeros_like(labels), hu, (2.0, 0.5, 0.5), 20.0).any()
    # A single dark voxel of noise inside the cortex is smoothed away, not cut out.
    noisy = np.full(hu.shape, 32.0, np.float32)
    noisy[3, 20, 5] = 10.0
    assert countable_labels(labels, noisy, (2.0, 0.5, 0.5), 20.0)[3, 20, 5] == 3
    with pytest.raises(ValueError, match="one shape"):
        countable_labels(labels[0], hu, (2.0, 0.5, 0.5), 20.0)
    with pytest.raises(ValueError, match="below 100"):
        countable_labels(labels, hu, (2.0, 0.5, 0.5), 150.0)
