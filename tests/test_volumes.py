"""The one volume counter (inference/volumes.py): pixel area x slice extent, checked by hand."""
import numpy as np
import pytest

from inference.volumes import label_volumes_mm3, region_volumes_cm3


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
