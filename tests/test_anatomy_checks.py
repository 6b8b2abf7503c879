"""Anatomical relations of label maps on their geometry, on small block brains (2 mm voxels)."""
from __future__ import annotations

import math

import numpy as np
import pytest
import SimpleITK as sitk

from inference.anatomy_checks import CEREBELLUM_SHARE_RANGE, anatomical_relations, format_relations
from inference.vocabulary import REGIONS, left_right_permutation

SHAPE = (30, 40, 30)  # (k: inferior -> superior, j: anterior -> posterior, i: right -> left) on an LPS grid
MID_I = 15


def _value(structure: str, laterality: str | None = None) -> int:
    return next(r.value for r in REGIONS if r.structure == structure and r.laterality == laterality)


def _brain() -> np.ndarray:
    """Lobes as boxes where a brain has them: frontal in front, parietal on top behind it, temporal
    low in the middle, occipital at the back; cerebellum low at the back, brainstem in front of it."""
    array = np.zeros(SHAPE, np.uint8)
    for side, columns in (("right", slice(0, MID_I)), ("left", slice(MID_I, 30))):
        array[10:28, 2:16, columns] = _value("frontal lobe", side)
        array[18:28, 16:28, columns] = _value("parietal lobe", side)
        array[8:18, 10:28, columns] = _value("temporal lobe", side)
        array[10:24, 28:38, columns] = _value("occipital lobe", side)
    array[1:8, 22:38, 5:25] = _value("cerebellum")
    array[1:8, 14:21, 12:18] = _value("brainstem")
    return array


def _image(array: np.ndarray, direction=(1, 0, 0, 0, 1, 0, 0, 0, 1)) -> sitk.Image:
    image = sitk.GetImageFromArray(array)
    image.SetSpacing((2.0, 2.0, 2.0))
    image.SetOrigin((-30.0, -40.0, -20.0))
    image.SetDirection([float(v) for v in direction])
    return image


def _failures(array: np.ndarray, **geometry) -> set[str]:
    checks = anatomical_relations(_image(array, **geometry))
    return {c.relation for c in checks if not c.passed}


def _lateral_relations(kind: str) -> set[str]:
    names = [r.name.lower() for r in REGIONS if r.laterality]
    if kind == "side":
        return {f"{n} on the patient's {n.split()[0]} of the midline" for n in names}
    return {f"share of the {n} across the midline" for n in names}


AXIS = "labelled right-to-left direction towards the patient's left (+x)"
SWAPPED_SIDES = {AXIS} | _lateral_relations("side") | _lateral_relations("share")


def test_a_brain_shaped_map_passes_every_relation_and_reports_its_figures():
    checks = anatomical_relations(_image(_brain()))
    assert all(c.passed for c in checks), format_relations(checks)
    assert len(checks) == 28
    by_name = {c.relation: c for c in checks}
    assert by_name[AXIS].value == pytest.approx(0.0, abs=1e-6)
    # Right lobes: columns 0..14 (centre 7); the midline between columns 14 and 15; 2 mm voxels.
    assert by_name["right frontal lobe on the patient's right of the midline"].value == pytest.approx(15.0)
    assert by_name["brainstem anterior to cerebellum"].value == pytest.approx(2.0 * (29.5 - 17.0))
    assert by_name["brainstem centred on the midline"].value == pytest.approx(0.0, abs=1e-9)
    share = by_name["cerebellum's share of the 10 regions' volume"].value
    assert CEREBELLUM_SHARE_RANGE[0] < share < CEREBELLUM_SHARE_RANGE[1]
    assert "28 of 28 relations hold" in format_relations(checks)


def test_swapped_sides_fail_the_left_right_relations_and_only_those():
    swapped = np.asarray(left_right_permutation(), np.uint8)[_brain()]
    assert _failures(swapped) == SWAPPED_SIDES


def test_the_geometry_decides_the_sides_not_the_array():
    # The same array on a grid whose columns run to the patient's right: a mirrored head.
    assert _failures(_brain(), direction=(-1, 0, 0, 0, 1, 0, 0, 0, 1)) == SWAPPED_SIDES


def test_a_head_turned_in_the_scanner_still_passes():
    angle = math.radians(20.0)  # yaw: the midline plane follows the labelled hemispheres
    c, s = math.cos(angle), math.sin(angle)
    assert _failures(_brain(), direction=(c, -s, 0, s, c, 0, 0, 0, 1)) == set()


def test_lobe_voxels_across_the_midline_fail_the_share_but_not_the_centroid():
    array = _brain()
    array[10:28, 4:14, 2:7] = _value("frontal lobe", "left")  # an island of left frontal in the right one
    assert _failures(array) == {"share of the left frontal lobe across the midline"}


def test_sides_mixed_at_random_fail_every_share():
    array = _brain()
    lobes = np.isin(array, [r.value for r in REGIONS if r.laterality])
    flip = lobes & (np.random.default_rng(0).uniform(size=array.shape) < 0.5)
    array[flip] = np.asarray(left_right_permutation(), np.uint8)[array[flip]]
    assert _lateral_relations("share") <= _failures(array)


def test_front_and_back_swapped_fail_the_front_to_back_order():
    array = _brain()
    for side in ("right", "left"):
        frontal, occipital = array == _value("frontal lobe", side), array == _value("occipital lobe", side)
        array[frontal], array[occipital] = _value("occipital lobe", side), _value("frontal lobe", side)
    assert _failures(array) == {f"{side} {a} lobe anterior to {side} {b} lobe"
                                for side in ("right", "left") for a, b in (("frontal", "parietal"),
                                                                           ("parietal", "occipital"))}


def test_temporal_above_parietal_fails():
    array = _brain()
    for side in ("right", "left"):
        temporal, parietal = array == _value("temporal lobe", side), array == _value("parietal lobe", side)
        array[temporal], array[parietal] = _value("parietal lobe", side), _value("temporal lobe", side)
    assert _failures(array) == {f"{side} temporal lobe inferior to {side} parietal lobe" for side in ("right", "left")}


def test_an_upside_down_head_fails_the_up_down_relations():
    assert _failures(_brain()[::-1].copy()) == {"cerebellum inferior to the occipital lobes",
                                               "right temporal lobe inferior to right parietal lobe",
                                               "left temporal lobe inferior to left parietal lobe"}


def test_brainstem_behind_the_cerebellum_fails():
    array = _brain()
    array[array == _value("brainstem")] = 0
    array[1:8, 38:40, 12:18] = _value("brainstem")
    assert _failures(array) == {"brainstem anterior to cerebellum"}


def test_brainstem_off_the_midline_fails():
    array = _brain()
    array[array == _value("brainstem")] = 0
    array[1:8, 14:21, 18:24] = _value("brainstem")  # centroid 6 columns = 12 mm to the left
    assert _failures(array) == {"brainstem centred on the midline"}


@pytest.mark.parametrize("rows", [1, 7 + 20], ids=["too small", "too large"])
def test_implausible_cerebellum_share_fails(rows):
    array = np.zeros((SHAPE[0] + 20,) + SHAPE[1:], np.uint8)  # room below the brain
    array[20:] = _brain()
    array[array == _value("cerebellum")] = 0
    array[21 + 7 - rows:28, 22:38, 5:25] = _value("cerebellum")  # the same box, 1 or 27 slices high
    assert _failures(array) == {"cerebellum's share of the 10 regions' volume"}


def test_a_missing_region_fails_its_relations_with_nan():
    array = _brain()
    array[np.isin(array, [_value("occipital lobe", s) for s in ("right", "left")])] = 0
    checks = anatomical_relations(_image(array))
    failed = {c.relation: c.value for c in checks if not c.passed}
    assert set(failed) == {"right occipital lobe on the patient's right of the midline",
                           "left occipital lobe on the patient's left of the midline",
                           "share of the right occipital lobe across the midline",
                           "share of the left occipital lobe across the midline",
                           "right parietal lobe anterior to right occipital lobe",
                           "left parietal lobe anterior to left occipital lobe",
                           "cerebellum inferior to the occipital lobes"}
    assert all(math.isnan(v) for v in failed.values())


def test_bad_label_maps_are_refused_with_the_reason():
    with pytest.raises(ValueError, match="integer"):
        anatomical_relations(_image(_brain().astype(np.float32)))
    with pytest.raises(ValueError, match="0..10"):
        anatomical_relations(_image(_brain() + 1))
    only_cerebellum = np.where(_brain() == _value("cerebellum"), _brain(), 0).astype(np.uint8)
    with pytest.raises(ValueError, match="no cerebral"):
        anatomical_relations(_image(only_cerebellum))
    with pytest.raises(ValueError, match="SimpleITK"):
        anatomical_relations(_brain())
