"""Anatomical relations of a 10-region label map: is each region where a brain has it?

Dice needs a reference; these checks need none. :func:`anatomical_relations` measures,
on the label map's own geometry (patient LPS coordinates in mm: +x the patient's left,
+y posterior, +z superior, from the image's origin, spacing and direction, so tilted
or oblique grids count right), where the regions' centroids lie relative to each other:

- the midline plane: the plane that best separates the voxels labelled left from those
  labelled right (see :func:`_midline`); its normal, the labelled right-to-left
  direction, must point to the patient's left (within :data:`MAX_HEMISPHERE_AXIS_DEG`).
  Turned towards the patient's left (+x), so that a map with its sides swapped cannot
  pass by turning the plane round, it decides sides: every lobe's centroid lies on its
  own side of it, and at most :data:`MAX_WRONG_SIDE_SHARE` of a lobe's voxels lie across
  it (the falx is not a plane, so a real lobe may cross it a little);
- per side, front to back along patient y: frontal anterior to parietal, parietal
  anterior to occipital; temporal inferior to parietal (patient z);
- the cerebellum inferior to the occipital lobes' centroid (in the bundled adult atlas it
  lies 42 mm below it, and 20 mm in front of it: the occipital poles reach behind the
  cerebellum, so "posterior to the occipital lobes" would be wrong); the brainstem anterior
  to the cerebellum; both near the midline (:data:`MAX_MIDLINE_OFFSET_MM`);
- the cerebellum's share of the 10 regions within :data:`CEREBELLUM_SHARE_RANGE`.

Front-back and up-down use the patient's axes, not the head's, so a head pitched far in
the scanner can fail them: the tightest, parietal anterior to occipital, has its centroids
31 mm apart in y and 38 mm in z in the bundled atlas, and 6.1 mm apart in y on the truth
of generation-3 phantom 910005 (pitch -17.8 degrees). The true labels of six posed
generation-3 phantoms (910001-910006, rotations up to 20 degrees about each axis, gantry
tilt 0-18.5 degrees) and the atlas registration of the real GE head pass every relation
(their worst share across the midline: 3.4 % and 0.9 %). Every relation is one
:class:`RelationCheck`; a region the map lacks fails the relations it is in (value NaN).
"""
from __future__ import annotations

import math
from typing import NamedTuple

import numpy as np
import SimpleITK as sitk

from inference.preprocess import check_image, index_to_physical_matrix
from inference.vocabulary import NUM_CLASSES, REGIONS, Region

#: Largest angle between the labelled right-to-left direction (the midline's normal) and the patient's
#: +x (degrees). Heads lie in the scanner turned by up to 10-20 degrees about each axis (the phantoms
#: draw up to 20 about each: 28 when two add up); a map with swapped sides measures about 180.
MAX_HEMISPHERE_AXIS_DEG = 45.0
#: Largest share of a lobe's voxels on the wrong side of the midline plane (true labels: up to 0.034).
MAX_WRONG_SIDE_SHARE = 0.05
#: Largest distance of the cerebellum's and the brainstem's centroids from the midline plane (mm).
MAX_MIDLINE_OFFSET_MM = 10.0
#: The midline fit: voxels it samples at most, their scale (mm) and its ridge (on that scale).
_MIDLINE_SAMPLE = 200_000
_MIDLINE_SCALE_MM = 50.0
_MIDLINE_RIDGE = 1e-3
#: Fitting rounds, and how far across the plane (mm) a voxel may lie and still be fitted in the next round.
_MIDLINE_ROUNDS = 3
_MIDLINE_TRIM_MM = 10.0
#: Plausible cerebellum volume / volume of the 10 regions. The paper's 2-year-olds: 128 / 1002 cm3
#: = 12.8 % (Xi et al. 2025, cohort means); the bundled adult atlas: 10.4 %. The range leaves
#: several cohort SDs (about 1.2 points) either side.
CEREBELLUM_SHARE_RANGE = (0.07, 0.18)

#: Patient (LPS) axis index of each front-to-back / up-down relation: a smaller coordinate comes first.
_ORDER_AXES = {"anterior to": 1, "inferior to": 2}


class RelationCheck(NamedTuple):
    """One anatomical relation as measured.

    Attributes:
        relation: what should hold, e.g. "left frontal lobe anterior to left parietal lobe".
        passed: whether it holds.
        value: the measured figure (NaN when a region it needs is absent).
        criterion: what passes, with the unit, e.g. "> 0 mm".
    """

    relation: str
    passed: bool
    value: float
    criterion: str


class _Regions:
    """The labelled voxels' physical points (LPS mm), with counts and coordinate sums per label."""

    def __init__(self, labels: sitk.Image):
        check_image(labels, "label map")
        array = sitk.GetArrayViewFromImage(labels)
        if not np.issubdtype(array.dtype, np.integer):
            raise ValueError(f"label map must have an integer pixel type, got {labels.GetPixelIDTypeAsString()}")
        k, j, i = np.nonzero(array)
        self.values = array[k, j, i].astype(np.int64)
        if self.values.size and (self.values.min() < 0 or self.values.max() >= NUM_CLASSES):
            raise ValueError(f"label map values must be 0..{NUM_CLASSES - 1}, found "
                             f"{int(self.values.min())}..{int(self.values.max())}")
        matrix, offset = index_to_physical_matrix(labels)
        self.points = np.stack([i, j, k], axis=1).astype(np.float64) @ matrix.T + offset
        self.counts = np.bincount(self.values, minlength=NUM_CLASSES)
        self.sums = np.stack([np.bincount(self.values, self.points[:, a], NUM_CLASSES) for a in range(3)], axis=1)

    def centroid(self, *regions: Region) -> np.ndarray:
        """Centroid (LPS mm) of the voxels of all ``regions`` together; NaN if they have none."""
        values = [r.value for r in regions]
        count = self.counts[values].sum()
        if count == 0:
            return np.full(3, np.nan)
        return self.sums[values].sum(axis=0) / count

    def mask(self, *regions: Region) -> np.ndarray:
        return np.isin(self.values, [r.value for r in regions])


def _region(structure: str, laterality: str | None) -> Region:
    return next(r for r in REGIONS if r.structure == structure and r.laterality == laterality)


def _check(relation: str, value: float, passed: bool, criterion: str) -> RelationCheck:
    value = float(value)
    return RelationCheck(relation, bool(passed) and not math.isnan(value), value, criterion)


class _Midline(NamedTuple):
    """The midline plane: signed distance (mm, + towards the patient's left) = normal . p - offset."""

    normal: np.ndarray      # unit, towards the patient's left (normal[0] >= 0)
    offset: float           # mm
    angle_deg: float        # of the labelled right-to-left direction to the patient's +x; NaN if unknown

    def distance(self, points: np.ndarray) -> np.ndarray:
        return points @ self.normal - self.offset


def _midline(regions: _Regions) -> _Midline:
    """The plane that best separates the voxels labelled left from those labelled right.

    A logistic regression of side on position (Newton's method on at most
    :data:`_MIDLINE_SAMPLE` voxels, a light ridge keeping separable maps finite): the
    plane where a voxel is as likely left as right, fitted again without the voxels more
    than :data:`_MIDLINE_TRIM_MM` across it (islands of one side in the other, which the
    logistic loss lets pull the plane), up to :data:`_MIDLINE_ROUNDS` times. A plane from the hemispheres' (or the
    lobe pairs') centroids would tilt with every asymmetry (petalia, a wider hemisphere,
    one side's lobe boundary further back) and put true labels across it: on posed
    generation-3 phantoms their truth had up to 10 % of a lobe across such a plane, and
    at most 3.4 % across this one. The normal is turned towards the patient's +x, so a
    map with swapped sides finds its plane but every lobe on the wrong side of it.
    """
    lateral = regions.mask(*(r for r in REGIONS if r.laterality is not None))
    points = regions.points[lateral]
    left = regions.mask(*(r for r in REGIONS if r.laterality == "left"))[lateral]
    if left.all() or not left.any():  # one side only: the patient's axis through the centroid; the angle fails
        normal = np.array([1.0, 0.0, 0.0])
        return _Midline(normal, float(points.mean(axis=0) @ normal), math.nan)
    step = max(1, len(points) // _MIDLINE_SAMPLE)
    centre = points.mean(axis=0)
    design = np.hstack([(points[::step] - centre) / _MIDLINE_SCALE_MM, np.ones((len(points[::step]), 1))])
    target = left[::step].astype(np.float64)
    weights = np.zeros(4)
    for _ in range(_MIDLINE_ROUNDS):
        weights = _logistic_fit(design, target, weights)
        length = float(np.linalg.norm(weights[:3]))
        if length < 1e-9:  # sides mixed all over: no left-right direction at all
            normal = np.array([1.0, 0.0, 0.0])
            return _Midline(normal, float(centre @ normal), math.nan)
        # Voxels far across the plane (an island of one side inside the other) would pull it:
        # the next round fits without them (they still count in the shares).
        distance_mm = (design @ weights) * _MIDLINE_SCALE_MM / length
        keep = np.where(target > 0, -distance_mm, distance_mm) < _MIDLINE_TRIM_MM
        if keep.all() or target[keep].min() == target[keep].max():
            break
        design, target = design[keep], target[keep]
    towards_left = weights[:3] / length
    angle = math.degrees(math.acos(float(np.clip(towards_left[0], -1.0, 1.0))))
    # On the plane: towards_left . (p - centre) = -bias x scale / |w|.
    offset = float(towards_left @ centre - weights[3] * _MIDLINE_SCALE_MM / length)
    sign = 1.0 if towards_left[0] >= 0 else -1.0
    return _Midline(sign * towards_left, sign * offset, angle)


def _logistic_fit(design: np.ndarray, target: np.ndarray, weights: np.ndarray) -> np.ndarray:
    """Ridge logistic regression of ``target`` (0/1) on ``design`` by Newton's method from ``weights``."""
    ridge = np.diag([_MIDLINE_RIDGE] * (design.shape[1] - 1) + [0.0])
    weights = weights.copy()
    for _ in range(50):
        probability = 1.0 / (1.0 + np.exp(-np.clip(design @ weights, -30.0, 30.0)))
        gradient = design.T @ (probability - target) / len(target) + ridge @ weights
        hessian = (design * (probability * (1.0 - probability))[:, None]).T @ design / len(target) + ridge
        change = np.linalg.solve(hessian, gradient)
        weights -= change
        if np.abs(change).max() < 1e-7:
            break
    return weights


def anatomical_relations(labels: sitk.Image) -> list[RelationCheck]:
    """Check where the 10 regions of ``labels`` lie relative to each other (see the module docstring).

    Args:
        labels: integer label map 0..10 with its true geometry (origin, spacing, direction).

    Returns:
        One :class:`RelationCheck` per relation (28), in a fixed order: the left-right axis,
        the lobes' sides of the midline and their shares across it, per side front to back
        and temporal below parietal, then cerebellum and brainstem.

    Raises:
        ValueError: not a 3D integer label image with values 0..10, or no cerebral voxel at all.
    """
    regions = _Regions(labels)
    lateral = [r for r in REGIONS if r.laterality is not None]
    if regions.counts[[r.value for r in lateral]].sum() == 0:
        raise ValueError("the label map has no cerebral (lobe) voxel: no anatomy to check")
    midline = _midline(regions)
    checks = [_check("labelled right-to-left direction towards the patient's left (+x)", midline.angle_deg,
                     midline.angle_deg <= MAX_HEMISPHERE_AXIS_DEG, f"<= {MAX_HEMISPHERE_AXIS_DEG:g} deg")]
    offsets = midline.distance(regions.points)  # signed distance to the midline, + = patient's left
    for region in lateral:
        sign = 1.0 if region.laterality == "left" else -1.0
        distance = sign * float(midline.distance(regions.centroid(region)))
        checks.append(_check(f"{region.name.lower()} on the patient's {region.laterality} of the midline",
                             distance, distance > 0, "> 0 mm"))
    for region in lateral:
        sign = 1.0 if region.laterality == "left" else -1.0
        inside = regions.mask(region)
        share = float(np.mean(sign * offsets[inside] < 0)) if inside.any() else math.nan
        checks.append(_check(f"share of the {region.name.lower()} across the midline", share,
                             share <= MAX_WRONG_SIDE_SHARE, f"<= {MAX_WRONG_SIDE_SHARE:g}"))
    for side in ("right", "left"):
        checks += [
            _order(regions, _region("frontal lobe", side), "anterior to", _region("parietal lobe", side)),
            _order(regions, _region("parietal lobe", side), "anterior to", _region("occipital lobe", side)),
            _order(regions, _region("temporal lobe", side), "inferior to", _region("parietal lobe", side)),
        ]
    cerebellum, brainstem = _region("cerebellum", None), _region("brainstem", None)
    occipital = (_region("occipital lobe", "right"), _region("occipital lobe", "left"))
    below = float(regions.centroid(*occipital)[2] - regions.centroid(cerebellum)[2])
    checks.append(_check("cerebellum inferior to the occipital lobes", below, below > 0, "> 0 mm"))
    checks.append(_order(regions, brainstem, "anterior to", cerebellum))
    for region in (cerebellum, brainstem):
        offset = abs(float(midline.distance(regions.centroid(region))))
        checks.append(_check(f"{region.name.lower()} centred on the midline", offset,
                             offset <= MAX_MIDLINE_OFFSET_MM, f"<= {MAX_MIDLINE_OFFSET_MM:g} mm"))
    total = regions.counts[[r.value for r in REGIONS]].sum()
    share = float(regions.counts[cerebellum.value] / total)
    low, high = CEREBELLUM_SHARE_RANGE
    checks.append(_check("cerebellum's share of the 10 regions' volume", share, low <= share <= high,
                         f"{low:g}-{high:g}"))
    return checks


def _order(regions: _Regions, first: Region, relation: str, second: Region) -> RelationCheck:
    """``first`` anterior to (smaller y) or inferior to (smaller z) ``second``: the gap of the centroids (mm)."""
    axis = _ORDER_AXES[relation]
    gap = float(regions.centroid(second)[axis] - regions.centroid(first)[axis])
    return _check(f"{first.name.lower()} {relation} {second.name.lower()}", gap, gap > 0, "> 0 mm")


def format_relations(checks: list[RelationCheck], title: str = "") -> str:
    """A plain-text table of the checks: relation, measured value, criterion, pass/FAIL."""
    width = max(len(c.relation) for c in checks)
    lines = [title] if title else []
    for check in checks:
        lines.append(f"  {check.relation:<{width}}  {check.value:>8.3g}  {check.criterion:<12} "
                     f"{'pass' if check.passed else 'FAIL'}")
    failed = sum(not c.passed for c in checks)
    lines.append(f"  {len(checks) - failed} of {len(checks)} relations hold")
    return "\n".join(lines)
