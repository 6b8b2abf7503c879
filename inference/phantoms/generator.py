"""Synthetic pediatric head-CT phantoms with known brain-region labels and volumes.

A phantom is a 2-year-old's head: scalp (skin and fat), skull (cortical tables and
diploe, thicker at the base, petrous ridges between the middle and posterior fossae),
face (orbits, nasal airway) and neck, extra-axial CSF, lateral / third / fourth
ventricles, brain parenchyma with a grey-matter ribbon, deep grey nuclei and random
cortical sulci (none on the brainstem and cord, which have no cortex), and the 10
labelled regions of :mod:`inference.vocabulary`. The regions are told apart by anatomy the
image shows, never by an intensity code: every lobe has the same parenchyma HU
distribution; the interhemispheric, Sylvian, central and parieto-occipital fissures and
the tentorium are thin CSF sheets at the region boundaries, and the rest of each
boundary is given by position.

How a phantom is made (all lengths in mm, head frame = LPS with the origin near the
centre of the cerebrum: +x patient left, +y posterior, +z superior):

1. Draw the case from the seed: sex, age, target volumes, pose, geometry, noise.
2. Evaluate smooth scalar fields (signed distances, region scores) on a 1 mm
   canonical grid after a smooth random displacement of the anatomy.
3. Calibrate the region partition: each region is a quantile of its score field, so
   that the regions' shares of the parenchyma match the drawn targets; the whole head
   is then scaled so that the total matches too.
4. Build the HU image on the canonical grid and resample it (linear) with the pose
   onto the series grid, averaging sub-slices across the slice thickness (slice
   profile); resample the region fields (linear) onto the slice centres and threshold
   them there, so label boundaries stay smooth at any resolution.
5. Add CT noise (Gaussian, slightly smoothed), round to Int16 HU, count the volumes on
   the written labels.

Choices this module makes where the paper is silent (documented, not measured):

- Volumes: whole-cohort means and SDs of Xi et al. 2025 (paper-notes.md); girls
  6 % smaller than boys in every region, +8 %/year with age around the cohort mean
  age 1.98 y; the sex and age effects are centred so that the cohort mean (55.5 % boys)
  equals the published mean; the remaining spread is a shared brain-size factor
  (correlation 0.8 between regions) plus a regional part, keeping each region's SD.
- Ventricles, fissures, sulci and extra-axial CSF are background (label 0): a region's
  volume is its parenchyma. Deep grey nuclei belong to the lobe their position gives.
- ``meta["volumes_cm3"]`` is counted on the written label map (the truth for
  evaluation); ``meta["target_volumes_cm3"]`` are the drawn targets (within a few %).
"""
from __future__ import annotations

import datetime as dt
import math
from dataclasses import dataclass, field

import numpy as np
import SimpleITK as sitk
from scipy import ndimage

from inference.vocabulary import REGION_KEYS, REGIONS, region_by_key
from inference.volumes import region_volumes_cm3

# ---------------------------------------------------------------------------------------
# Cohort model (see module docstring)
# ---------------------------------------------------------------------------------------

#: Whole-cohort regional volumes of Xi et al. 2025, mean and SD in cm3.
COHORT_VOLUMES_CM3: dict[str, tuple[float, float]] = {
    "right_frontal_lobe": (200.64, 19.15),
    "left_frontal_lobe": (204.51, 19.61),
    "right_parietal_lobe": (81.52, 7.91),
    "left_parietal_lobe": (79.42, 7.65),
    "right_occipital_lobe": (53.76, 5.21),
    "left_occipital_lobe": (52.82, 5.33),
    "right_temporal_lobe": (91.92, 9.07),
    "left_temporal_lobe": (94.08, 9.27),
    "cerebellum": (127.97, 11.85),
    "brainstem": (15.47, 1.50),
}
#: Raised whenever a seed's output changes (meta.json carries it; training caches are keyed by it).
#: 2: the brainstem and cord have no sulci (generation 1 cut cortical sulci into them).
GENERATION = 2

COHORT_BOY_FRACTION = 826 / 1487
COHORT_MEAN_AGE_YEARS = 1.98
COHORT_AGE_SD_YEARS = 0.28
AGE_RANGE_YEARS = (1.5, 2.5)
#: Phantom's own effects (the paper's coefficients were published only as images).
GIRL_VOLUME_FACTOR = 0.94
GROWTH_PER_YEAR = 0.08
REGION_CORRELATION = 0.8

#: Drawn geometry ranges.
SLICE_THICKNESS_CHOICES_MM = (0.625, 1.0, 1.25, 2.0, 2.5, 3.0, 5.0)
PIXEL_SPACING_RANGE_MM = (0.35, 0.6)
MIN_FIELD_OF_VIEW_MM = 215.0   # drawn pixel sizes keep a rotated, scaled head inside the field of view
MAX_ROTATION_DEG = 20.0
NOISE_RANGE_HU = (3.0, 12.0)
NOISE_GRAIN_MM = 0.45         # SD of the Gaussian that shapes the noise (a standard kernel's texture)

#: Canonical grid: 1 mm, head frame, covers the head of the largest drawn child.
CANONICAL_SPACING_MM = 1.0
CANONICAL_MIN_MM = np.array([-84.0, -104.0, -104.0])   # x, y, z
CANONICAL_SIZE = (168, 208, 194)                         # x, y, z voxels

#: Tissue HU (means; the image adds texture and noise).
HU_AIR = -1000.0
HU_FAT = -90.0
HU_SKIN = 35.0
HU_CORTICAL_BONE = 1500.0
HU_DIPLOE = 450.0
HU_CSF = 6.0
HU_GREY = 37.0
HU_WHITE = 28.0
HU_SOFT = 40.0

#: Anatomical widths (mm, before the whole-head scale).
FISSURE_HALF_WIDTH = 1.0       # fissures ~2 mm wide
SULCAL_UNDULATION_MM = 2.5     # SD of the wave of the central, parieto-occipital and Sylvian boundaries
CORTEX_THICKNESS_MM = 2.6

LOBES = ("frontal", "parietal", "occipital", "temporal")


@dataclass
class Phantom:
    """One synthetic head CT with its truth.

    Attributes:
        image: sitk.sitkInt16 image in HU on the geometry of the written series.
        labels: sitk.sitkUInt8 label map 0..10 on exactly the same grid as ``image``.
        meta: JSON-able description (seed, sex, age_years, volumes_cm3 counted on
            ``labels``, target_volumes_cm3, geometry, pose, noise, dates; for a tilted
            phantom image_orientation_patient and image_position_patient per slice).
    """

    image: sitk.Image
    labels: sitk.Image
    meta: dict = field(default_factory=dict)


# ---------------------------------------------------------------------------------------
# Drawing a case
# ---------------------------------------------------------------------------------------


def draw_target_volumes(rng: np.random.Generator, sex: str, age_years: float) -> dict[str, float]:
    """Regional volumes (cm3) for a child of this sex and age, from the cohort model."""
    mean_sex = COHORT_BOY_FRACTION + (1 - COHORT_BOY_FRACTION) * GIRL_VOLUME_FACTOR
    sex_factor = (1.0 if sex == "M" else GIRL_VOLUME_FACTOR) / mean_sex
    age_factor = 1.0 + GROWTH_PER_YEAR * (age_years - COHORT_MEAN_AGE_YEARS)
    # Spread explained by sex and age, removed from the residual so each region keeps its SD.
    explained_cv2 = (GROWTH_PER_YEAR * COHORT_AGE_SD_YEARS) ** 2 + (
        COHORT_BOY_FRACTION * (1 - COHORT_BOY_FRACTION) * ((1 - GIRL_VOLUME_FACTOR) / mean_sex) ** 2
    )
    shared = rng.standard_normal()
    volumes = {}
    for key in REGION_KEYS:
        mean, sd = COHORT_VOLUMES_CM3[key]
        residual_cv = math.sqrt(max((sd / mean) ** 2 - explained_cv2, 1e-6))
        z = math.sqrt(REGION_CORRELATION) * shared + math.sqrt(1 - REGION_CORRELATION) * rng.standard_normal()
        z = float(np.clip(z, -2.5, 2.5))
        volumes[key] = mean * sex_factor * age_factor * (1.0 + residual_cv * z)
    return volumes


def _draw_age(rng: np.random.Generator) -> float:
    """Age in years: the cohort's normal distribution, truncated to its range."""
    while True:
        age = rng.normal(COHORT_MEAN_AGE_YEARS, COHORT_AGE_SD_YEARS)
        if AGE_RANGE_YEARS[0] <= age <= AGE_RANGE_YEARS[1]:
            return float(age)


def _rotation_matrix(degrees: np.ndarray) -> np.ndarray:
    """Rotation about x, then y, then z (degrees), as a 3x3 matrix acting on column vectors."""
    ax, ay, az = np.deg2rad(degrees)
    rx = np.array([[1, 0, 0], [0, math.cos(ax), -math.sin(ax)], [0, math.sin(ax), math.cos(ax)]])
    ry = np.array([[math.cos(ay), 0, math.sin(ay)], [0, 1, 0], [-math.sin(ay), 0, math.cos(ay)]])
    rz = np.array([[math.cos(az), -math.sin(az), 0], [math.sin(az), math.cos(az), 0], [0, 0, 1]])
    return rz @ ry @ rx


@dataclass
class _Anatomy:
    """Random anatomical parameters of one case (head frame, mm, before scaling)."""

    cerebrum_axes: np.ndarray
    fossa_axes: np.ndarray
    ventricle_scale: float
    csf_width: float
    skull_thickness: float
    scalp_thickness: float
    tentorium_height: float
    sylvian_height: float
    sylvian_slope: float
    central_position: float
    central_slope: float
    parieto_occipital_position: float
    parieto_occipital_slope: float
    deformation_mm: float
    sulcus_depth: float
    calibration_hu: float        # scanner-to-scanner offset of soft-tissue HU
    grey_white_hu: float         # grey-white contrast (myelination and kernel vary)


def _draw_anatomy(rng: np.random.Generator, targets: dict[str, float]) -> _Anatomy:
    """Random shape parameters; the posterior fossa is sized for the child's cerebellum share."""
    u = rng.uniform
    share = targets["cerebellum"] / sum(targets.values())
    mean_share = COHORT_VOLUMES_CM3["cerebellum"][0] / sum(m for m, _ in COHORT_VOLUMES_CM3.values())
    cerebrum_factors = u(0.95, 1.05, 3)
    fossa_factor = (float(np.prod(cerebrum_factors)) * share / mean_share) ** (1 / 3)
    return _Anatomy(
        cerebrum_axes=np.array([64.0, 80.0, 66.0]) * cerebrum_factors,
        fossa_axes=np.array([56.0, 39.0, 31.0]) * fossa_factor * u(0.97, 1.03, 3),
        ventricle_scale=u(0.8, 1.3),
        csf_width=u(1.5, 3.0),
        skull_thickness=u(2.5, 4.0),
        scalp_thickness=u(4.0, 7.0),
        tentorium_height=u(-3.0, 3.0),
        sylvian_height=u(-3.0, 3.0),
        sylvian_slope=u(0.25, 0.45),
        central_position=u(-3.0, 3.0),
        central_slope=u(0.35, 0.6),
        parieto_occipital_position=u(-3.0, 3.0),
        parieto_occipital_slope=u(0.3, 0.6),
        deformation_mm=u(2.0, 4.0),
        sulcus_depth=u(6.0, 10.0),
        calibration_hu=u(-3.0, 3.0),
        grey_white_hu=u(6.0, 11.0),
    )


# ---------------------------------------------------------------------------------------
# Canonical fields
# ---------------------------------------------------------------------------------------


def _smooth_noise(rng: np.random.Generator, shape: tuple[int, ...], sigma_voxels: float, factor: int) -> np.ndarray:
    """Zero-mean, unit-SD smooth random field: white noise on a lattice ``factor`` times coarser,
    smoothed there, then interpolated (linear) up to ``shape``."""
    coarse_shape = tuple(max(2, math.ceil(n / factor) + 2) for n in shape)
    coarse = ndimage.gaussian_filter(rng.standard_normal(coarse_shape).astype(np.float32), sigma_voxels / factor,
                                     mode="wrap")
    coarse_image = sitk.GetImageFromArray(coarse)
    coarse_image.SetSpacing((float(factor),) * 3)
    reference = sitk.Image([int(n) for n in shape[::-1]], sitk.sitkFloat32)
    field = sitk.GetArrayFromImage(sitk.Resample(coarse_image, reference, sitk.Transform(), sitk.sitkLinear, 0.0))
    field -= field.mean()
    return field / max(float(field.std()), 1e-6)


def _ellipsoid(x, y, z, centre, axes) -> np.ndarray:
    """Approximate signed distance (mm, negative inside) to an axis-aligned ellipsoid."""
    q = np.sqrt(((x - centre[0]) / axes[0]) ** 2 + ((y - centre[1]) / axes[1]) ** 2 + ((z - centre[2]) / axes[2]) ** 2)
    return (q - 1.0) * float(np.min(axes))


def _capsule(x, y, z, start, end, radius) -> np.ndarray:
    """Signed distance (mm) to a capsule (segment start-end inflated by radius)."""
    start, end = np.asarray(start, float), np.asarray(end, float)
    axis = end - start
    length2 = float(axis @ axis)
    t = np.clip(((x - start[0]) * axis[0] + (y - start[1]) * axis[1] + (z - start[2]) * axis[2]) / length2, 0, 1)
    return np.sqrt((x - start[0] - t * axis[0]) ** 2 + (y - start[1] - t * axis[1]) ** 2
                   + (z - start[2] - t * axis[2]) ** 2) - radius


def _ramp(v):
    """0 below -2, 1 above +2, linear between: a cheap smooth-enough step for blending surfaces."""
    return np.clip(0.5 + 0.25 * v, 0.0, 1.0)


def _tentorium(x, y, anatomy: _Anatomy) -> np.ndarray:
    """Height (mm) of the tentorium: highest at the incisura, sloping down laterally and back."""
    return -14.0 + anatomy.tentorium_height - 0.32 * np.maximum(y - 12.0, 0) - 0.1 * np.abs(x)


BASE_EXTRA_BONE_MM = 5.0    # the skull base is thicker than the vault
BASE_START_Z = -28.0
PETROUS_APEX_X = 12.0        # |x| of the petrous apex, beside the clivus
PETROUS_SLOPE = 0.66         # the ridge runs back 0.66 mm per mm laterally
PETROUS_TOP_Z = -30.0


def _petrous_line(x) -> np.ndarray:
    """y (mm) of the front of the posterior fossa: the petrous ridges laterally, the brainstem medially."""
    lateral = np.abs(x) - PETROUS_APEX_X
    ridge = 4.0 + PETROUS_SLOPE * np.where(lateral > 0, lateral, 0.0)
    # Medially the posterior fossa's front is the brainstem: the cerebellum starts behind it.
    return np.maximum(ridge, 14.0 - 0.5 * np.abs(x))


def _petrous_ridges(x, y, z) -> np.ndarray:
    """Signed distance-like field (< 0 inside) of the two petrous bone wedges."""
    across = np.abs(y - _petrous_line(x)) / math.hypot(1.0, PETROUS_SLOPE)
    half_width = 3.0 + 0.35 * np.maximum(PETROUS_TOP_Z - z, 0.0)      # a wedge, wider downwards
    return np.maximum.reduce([across - half_width, z - PETROUS_TOP_Z, PETROUS_APEX_X - np.abs(x)])


BRAINSTEM_TOP = (0.0, 4.0, -14.0)
BRAINSTEM_BOTTOM = (0.0, 15.0, -82.0)


@dataclass
class _Fields:
    """Scalar fields on the canonical grid (arrays z, y, x; float32; mm-like units)."""

    intracranial: np.ndarray   # signed distance to the intracranial surface (negative inside)
    head: np.ndarray           # signed distance to the skin (negative inside)
    ventricles: np.ndarray     # < 0 inside a ventricle or a basal cistern
    brainstem: np.ndarray      # distance to the brainstem axis
    infratentorial: np.ndarray # height above the tentorium (low = cerebellum)
    midline: np.ndarray        # x distance from the midsagittal plane (+ = left)
    sylvian: np.ndarray        # height above the Sylvian plane (low = temporal)
    parieto_occipital: np.ndarray  # distance anterior to the parieto-occipital plane (low = occipital)
    central: np.ndarray        # distance behind the central-sulcus plane (low = frontal)
    sulci: np.ndarray          # band-pass noise: cortical sulci where |sulci| is small
    deep_grey: np.ndarray      # < 0 inside thalamus / basal ganglia
    texture: np.ndarray        # smooth unit noise for parenchyma texture

    height: np.ndarray         # head-frame height (mm): the brain ends at the foramen magnum
    face: np.ndarray           # HU of orbits and nasal airway, NaN elsewhere

    REGION_FIELDS = ("intracranial", "ventricles", "brainstem", "infratentorial", "midline", "sylvian",
                     "parieto_occipital", "central", "sulci", "height")


def _canonical_coordinates(rng: np.random.Generator, anatomy: _Anatomy):
    """Warped head-frame coordinates (z, y, x arrays) of the canonical grid."""
    nx, ny, nz = CANONICAL_SIZE
    shape = (nz, ny, nx)
    z = (CANONICAL_MIN_MM[2] + CANONICAL_SPACING_MM * np.arange(nz, dtype=np.float32))[:, None, None]
    y = (CANONICAL_MIN_MM[1] + CANONICAL_SPACING_MM * np.arange(ny, dtype=np.float32))[None, :, None]
    x = (CANONICAL_MIN_MM[0] + CANONICAL_SPACING_MM * np.arange(nx, dtype=np.float32))[None, None, :]
    # Smooth random displacement: boundaries move by a few mm, differently in every case.
    warp = [anatomy.deformation_mm * _smooth_noise(rng, shape, 22.0, 8) for _ in range(3)]
    return x + warp[0], y + warp[1], z + warp[2], shape


def _box(x_mm: tuple[float, float], y_mm: tuple[float, float], z_mm: tuple[float, float]) -> tuple[slice, ...]:
    """Index slices (z, y, x) of the canonical grid covering a head-frame box (mm)."""
    def axis(bounds, a):
        lo = int(max(0, math.floor((bounds[0] - CANONICAL_MIN_MM[a]) / CANONICAL_SPACING_MM)))
        hi = int(min(CANONICAL_SIZE[a], math.ceil((bounds[1] - CANONICAL_MIN_MM[a]) / CANONICAL_SPACING_MM) + 1))
        return slice(lo, hi)
    return axis(z_mm, 2), axis(y_mm, 1), axis(x_mm, 0)


def _in_box(shape, box, default: float, function, x, y, z) -> np.ndarray:
    """A full-grid float32 field equal to ``function(x, y, z)`` inside ``box`` and ``default`` outside.

    Small structures (ventricles, nuclei, face) are evaluated only where they can be.
    """
    field = np.full(shape, default, np.float32)
    field[box] = function(x[box], y[box], z[box])
    return field


def _compute_fields(rng: np.random.Generator, anatomy: _Anatomy) -> _Fields:
    x, y, z, shape = _canonical_coordinates(rng, anatomy)
    tent = _tentorium(x, y, anatomy)
    # Intracranial space: cerebrum (cut by the skull base floor) + posterior fossa + foramen magnum.
    floor_anterior = -22.0 + 0.08 * np.abs(x)
    floor_middle = -44.0 + 16.0 * np.exp(-(x / 16.0) ** 2)
    w_ant = _ramp((-30.0 - y) / 4.0)
    w_post = _ramp((y - 8.0) / 4.0)
    floor = w_ant * floor_anterior + w_post * tent + (1 - w_ant - w_post) * floor_middle
    del floor_anterior, floor_middle, w_ant, w_post
    implicit = np.maximum(_ellipsoid(x, y, z, (0.0, 2.0, -2.0), anatomy.cerebrum_axes), floor - z)
    del floor
    lower = _box((-80, 80), (-20, 90), (-104, 0))
    implicit[lower] = np.minimum(implicit[lower], np.maximum(
        _ellipsoid(x[lower], y[lower], z[lower], (0.0, 36.0, -42.0), anatomy.fossa_axes), z[lower] - tent[lower] - 3.0))
    implicit[lower] = np.minimum(implicit[lower], _capsule(x[lower], y[lower], z[lower], (0.0, 6.0, -20.0),
                                                           (0.0, 17.0, -92.0), 11.0))
    # Petrous ridges: bone walls between the middle and the posterior fossa.
    implicit[lower] = np.maximum(implicit[lower], -_petrous_ridges(x[lower], y[lower], z[lower]))
    intracranial = _signed_distance(implicit < 0)
    # Head: skull + scalp around the intracranial space (thicker at the base), face and neck.
    outer = intracranial - (anatomy.skull_thickness + anatomy.scalp_thickness
                            + BASE_EXTRA_BONE_MM * _ramp((BASE_START_Z - z) / 5.0))
    below = _box((-84, 84), (-104, 104), (-104, -10))
    outer[below] = np.minimum(outer[below], _capsule(x[below], y[below], z[below], (0.0, 2.0, -45.0),
                                                     (0.0, 2.0, -160.0), 40.0))
    front = _box((-84, 84), (-104, 0), (-104, -5))
    outer[front] = np.minimum(outer[front], _ellipsoid(x[front], y[front], z[front], (0.0, -50.0, -58.0),
                                                       np.array([44.0, 38.0, 36.0])))
    head = _signed_distance(outer < 0)
    del outer, implicit

    v = anatomy.ventricle_scale
    ventricles = _in_box(shape, _box((-45, 45), (-45, 50), (-60, 35)), 100.0, lambda x, y, z: np.minimum.reduce([
        _ellipsoid(np.abs(x), y, z, (8.0, -2.0, 14.0), np.array([3.8, 24.0, 5.5]) * v),        # bodies
        _ellipsoid(np.abs(x), y, z, (10.0, -22.0, 8.0), np.array([4.0, 8.0, 6.0]) * v),        # frontal horns
        _ellipsoid(np.abs(x), y, z, (15.0, 24.0, 6.0), np.array([4.5, 9.0, 6.0]) * v),        # atria
        _ellipsoid(np.abs(x), y, z, (25.0, 4.0, -18.0), np.array([2.0, 14.0, 2.5]) * v),      # temporal horns
        _ellipsoid(x, y, z, (0.0, 2.0, -6.0), np.array([1.3, 11.0, 8.0]) * v),                # third
        _ellipsoid(x, y, z, (0.0, 25.0, -44.0), np.array([5.0, 2.5, 6.0]) * v),               # fourth
        # Basal cisterns (CSF, unlabelled like the ventricles): suprasellar, quadrigeminal.
        _ellipsoid(x, y, z, (0.0, -10.0, -27.0), np.array([11.0, 6.0, 4.0])),
        _ellipsoid(x, y, z, (0.0, 19.0, -13.0), np.array([7.0, 4.0, 4.0])),
    ]), x, y, z)
    deep_grey = _in_box(shape, _box((-40, 40), (-40, 30), (-25, 25)), 100.0, lambda x, y, z: np.minimum(
        _ellipsoid(np.abs(x), y, z, (12.0, 4.0, -2.0), np.array([8.0, 13.0, 8.0])),           # thalami
        _ellipsoid(np.abs(x), y, z, (20.0, -14.0, 2.0), np.array([7.0, 14.0, 9.0])),          # basal ganglia
    ), x, y, z)
    brainstem = _in_box(shape, _box((-50, 50), (-40, 70), (-104, 20)), 100.0,
                        lambda x, y, z: _capsule(x, y, z, BRAINSTEM_TOP, BRAINSTEM_BOTTOM, 0.0), x, y, z)
    face = _in_box(shape, _box((-60, 60), (-104, -20), (-104, -5)), np.nan, _face_hu, x, y, z)
    # Below the tentorium and behind the petrous ridges; distance-like (unit gradient) on
    # both parts, so the CSF sheet around the cerebellum has the same width everywhere.
    infratentorial = np.maximum(z - tent, (_petrous_line(x) - y) / math.hypot(1.0, PETROUS_SLOPE))
    del tent
    # Sylvian plane rising medially: the temporal lobe is lateral; only low medial tissue
    # (uncus, hippocampus) falls below it.
    sylvian = (z - (-14.0 + anatomy.sylvian_height + anatomy.sylvian_slope * (y + 20.0))
               + 1.2 * np.maximum(30.0 - np.abs(x), 0.0))
    po_slope = anatomy.parieto_occipital_slope
    parieto_occipital = ((52.0 + anatomy.parieto_occipital_position + po_slope * (z - 20.0)) - y) / math.hypot(1, po_slope)
    cs_slope = anatomy.central_slope
    central = (y - (4.0 + anatomy.central_position + cs_slope * (z - 40.0))) / math.hypot(1, cs_slope)
    # Sulci are not planes: a shorter-range undulation (gyri) on the three lobar boundaries.
    undulation = SULCAL_UNDULATION_MM * _smooth_noise(rng, shape, 7.0, 4)
    sylvian += 0.6 * undulation
    parieto_occipital -= undulation
    central += undulation
    del undulation
    sulci = _smooth_noise(rng, shape, 3.0, 2)
    texture = _smooth_noise(rng, shape, 4.0, 2)
    return _Fields(
        intracranial=intracranial, head=head, ventricles=ventricles, brainstem=brainstem,
        infratentorial=_f32(infratentorial, shape), midline=_f32(x, shape), sylvian=_f32(sylvian, shape),
        parieto_occipital=_f32(parieto_occipital, shape), central=_f32(central, shape), sulci=sulci,
        deep_grey=deep_grey, texture=texture, height=_f32(z, shape), face=face,
    )


def _face_hu(x, y, z) -> np.ndarray:
    """HU of the face's own structures (NaN elsewhere): orbits (fat, globe, lens) and nasal airway."""
    hu = np.full(x.shape, np.nan, np.float32)
    orbit = _ellipsoid(np.abs(x), y, z, (25.0, -62.0, -34.0), np.array([14.0, 18.0, 13.0]))
    globe = _ellipsoid(np.abs(x), y, z, (25.0, -70.0, -34.0), np.array([9.5, 9.5, 9.5]))
    lens = _ellipsoid(np.abs(x), y, z, (25.0, -78.5, -34.0), np.array([4.0, 1.8, 4.0]))
    nasal = _ellipsoid(x, y, z, (0.0, -66.0, -58.0), np.array([7.0, 17.0, 12.0]))
    hu[orbit < 0] = HU_FAT
    hu[globe < 0] = 12.0
    hu[lens < 0] = 90.0
    hu[nasal < 0] = HU_AIR
    return hu


def _f32(array, shape) -> np.ndarray:
    return np.ascontiguousarray(np.broadcast_to(array, shape), dtype=np.float32)


def _signed_distance(mask: np.ndarray) -> np.ndarray:
    """Euclidean signed distance (mm, negative inside) of a boolean mask on the canonical grid."""
    image = sitk.GetImageFromArray(mask.astype(np.uint8))
    image.SetSpacing((CANONICAL_SPACING_MM,) * 3)
    distance = sitk.SignedMaurerDistanceMap(image, insideIsPositive=False, squaredDistance=False, useImageSpacing=True)
    # Maurer gives the object's own boundary voxels 0; half a voxel less puts the surface
    # midway between inside and outside voxels, so interpolated grids see the same volume.
    return sitk.GetArrayFromImage(distance).astype(np.float32) - 0.5 * CANONICAL_SPACING_MM


# ---------------------------------------------------------------------------------------
# Region partition
# ---------------------------------------------------------------------------------------


@dataclass
class _Partition:
    """Thresholds of the region scores and the widths that shape the brain."""

    csf_width: float
    sulcus_depth: float
    brainstem: float = 0.0
    infratentorial: float = 0.0
    midline: float = 0.0
    occipital: tuple[float, float] = (0.0, 0.0)   # (right, left)
    temporal: tuple[float, float] = (0.0, 0.0)
    frontal: tuple[float, float] = (0.0, 0.0)


SULCUS_HALF_WIDTH = 0.13    # in units of the sulci field's SD (~1.5 mm)
FORAMEN_MAGNUM_Z = -78.0    # head frame: below it the brainstem becomes the (unlabelled) spinal cord


def _depth_below_brain_surface(intracranial: np.ndarray, csf_width: float) -> np.ndarray:
    """Depth (mm) below the brain's surface, which lies ``csf_width`` inside the inner table."""
    return -intracranial - csf_width


def _parenchyma(f: dict[str, np.ndarray], depth: np.ndarray) -> np.ndarray:
    """Brain tissue before sulci and partition: below the brain surface, outside the ventricles."""
    return (depth > 0) & (f["ventricles"] > 0)


def _sulci(f: dict[str, np.ndarray], depth: np.ndarray, sulcus_depth: float) -> np.ndarray:
    """Cortical sulci: thin CSF clefts reaching ``sulcus_depth`` (mm) below the brain surface."""
    return (np.abs(f["sulci"]) < SULCUS_HALF_WIDTH) & (depth < sulcus_depth)


def _label_fields(f: dict[str, np.ndarray], p: _Partition) -> np.ndarray:
    """Labels (uint8) from region fields and thresholds; the same rule on any grid.

    ``f`` maps the names of :attr:`_Fields.REGION_FIELDS` to arrays of one shape.
    """
    depth = _depth_below_brain_surface(f["intracranial"], p.csf_width)
    above_foramen = f["height"] > FORAMEN_MAGNUM_Z
    tissue = _parenchyma(f, depth) & above_foramen
    # The brainstem has no cortex, hence no sulci: its surface is smooth.
    stem = tissue & (f["brainstem"] < p.brainstem)
    brain = tissue & ~_sulci(f, depth, p.sulcus_depth) | stem
    labels = np.zeros(depth.shape, np.uint8)
    labels[stem] = region_by_key("brainstem").value
    rest = brain & ~stem
    tent = f["infratentorial"] - p.infratentorial
    cerebellum = rest & (tent < -FISSURE_HALF_WIDTH)
    labels[cerebellum] = region_by_key("cerebellum").value
    cerebrum = rest & (tent > FISSURE_HALF_WIDTH)
    mid = f["midline"] - p.midline
    # Interhemispheric fissure everywhere except through the corpus callosum / diencephalon core.
    core = (np.abs(f["sylvian"] - 8.0) < 22.0) & (np.abs(f["central"] + 10.0) < 30.0) & (depth > 14.0)
    cerebrum &= ~((np.abs(mid) < FISSURE_HALF_WIDTH) & ~core)
    medial_depth = np.abs(mid)
    for side, sign in (("right", -1.0), ("left", 1.0)):
        index = 0 if side == "right" else 1
        hemisphere = cerebrum & (sign * mid > 0)
        po = f["parieto_occipital"] - p.occipital[index]
        syl = f["sylvian"] - p.temporal[index]
        cs = f["central"] - p.frontal[index]
        occipital = hemisphere & (po < 0)
        temporal = hemisphere & (po > 0) & (syl < 0)
        frontal = hemisphere & (po > 0) & (syl > 0) & (cs < 0)
        parietal = hemisphere & (po > 0) & (syl > 0) & (cs > 0)
        surface_depth = np.minimum(depth, medial_depth)
        fissures = (
            (np.abs(po) < FISSURE_HALF_WIDTH) & (surface_depth < 22.0) & (syl > 0)
            | (np.abs(syl) < FISSURE_HALF_WIDTH) & ((medial_depth > 26.0) | (depth < 15.0)) & (po > 18.0)
            & (f["central"] < 12.0)
            | (np.abs(cs) < FISSURE_HALF_WIDTH) & (surface_depth < 18.0) & (syl > 3.0) & (po > 0)
        )
        for lobe, mask in (("frontal", frontal), ("parietal", parietal), ("occipital", occipital),
                           ("temporal", temporal)):
            labels[mask & ~fissures] = region_by_key(f"{side}_{lobe}_lobe").value
    return labels


def _quantile_threshold(values: np.ndarray, count: float) -> float:
    """The value below which ``count`` of ``values`` lie (values sorted ascending)."""
    if values.size == 0:
        raise RuntimeError("phantom anatomy has an empty compartment; this seed cannot be built")
    k = int(np.clip(round(count), 1, values.size - 1))
    return float(np.partition(values, k)[k])


def _calibrate(fields: _Fields, anatomy: _Anatomy, targets: dict[str, float]) -> tuple[_Partition, float, np.ndarray]:
    """Thresholds giving each region its share of the parenchyma, the head scale factor,
    and the labels on the canonical grid.

    Regions are taken in turn (brainstem, cerebellum, hemispheres, then per hemisphere
    occipital, temporal, frontal; parietal is the rest); losses to fissures are measured
    and compensated in the next pass. The first passes use every second canonical voxel
    (cheap), the last one all of them (precise: volumes within ~1 % of the targets).
    """
    partition = _Partition(csf_width=anatomy.csf_width, sulcus_depth=anatomy.sulcus_depth)
    total_target = sum(targets.values())
    inflation = {key: 1.0 for key in REGION_KEYS}
    for stride in (2, 2, 1):
        sub = (slice(None, None, stride),) * 3
        f = {name: getattr(fields, name)[sub] for name in _Fields.REGION_FIELDS}
        voxel_cm3 = (stride * CANONICAL_SPACING_MM) ** 3 / 1000.0
        depth = _depth_below_brain_surface(f["intracranial"], partition.csf_width)
        tissue = _parenchyma(f, depth) & (f["height"] > FORAMEN_MAGNUM_Z)
        brain = tissue & ~_sulci(f, depth, partition.sulcus_depth)
        # Shares of the brain voxels (before fissures) each region should take.
        want = {key: targets[key] * inflation[key] for key in REGION_KEYS}
        scale_count = brain.sum() / sum(want.values())
        n = {key: want[key] * scale_count for key in REGION_KEYS}
        # The brainstem takes its share of the tissue without sulci (it has none).
        partition.brainstem = _quantile_threshold(f["brainstem"][tissue], n["brainstem"])
        rest = brain & (f["brainstem"] >= partition.brainstem)
        partition.infratentorial = _quantile_threshold(f["infratentorial"][rest], n["cerebellum"])
        cerebrum = rest & (f["infratentorial"] > partition.infratentorial)
        right_total = sum(n[f"right_{lobe}_lobe"] for lobe in LOBES)
        partition.midline = _quantile_threshold(f["midline"][cerebrum], right_total)
        thresholds: dict[str, list[float]] = {"occipital": [], "temporal": [], "frontal": []}
        for side, sign in (("right", -1.0), ("left", 1.0)):
            hemisphere = cerebrum & (sign * (f["midline"] - partition.midline) > 0)
            occ = _quantile_threshold(f["parieto_occipital"][hemisphere], n[f"{side}_occipital_lobe"])
            hemisphere &= f["parieto_occipital"] > occ
            tem = _quantile_threshold(f["sylvian"][hemisphere], n[f"{side}_temporal_lobe"])
            hemisphere &= f["sylvian"] > tem
            fro = _quantile_threshold(f["central"][hemisphere], n[f"{side}_frontal_lobe"])
            thresholds["occipital"].append(occ)
            thresholds["temporal"].append(tem)
            thresholds["frontal"].append(fro)
        partition.occipital = tuple(thresholds["occipital"])
        partition.temporal = tuple(thresholds["temporal"])
        partition.frontal = tuple(thresholds["frontal"])
        labels = _label_fields(f, partition)
        counts = np.bincount(labels.ravel(), minlength=len(REGIONS) + 1)
        measured_total = counts[1:].sum()
        for region in REGIONS:
            share_measured = counts[region.value] / measured_total
            share_target = targets[region.key] / total_target
            inflation[region.key] *= share_target / max(share_measured, 1e-9)
    scale = (total_target / (measured_total * voxel_cm3)) ** (1.0 / 3.0)
    return partition, float(scale), labels


# ---------------------------------------------------------------------------------------
# The HU image on the canonical grid
# ---------------------------------------------------------------------------------------


def _canonical_hu(fields: _Fields, anatomy: _Anatomy, partition: _Partition, labels: np.ndarray) -> np.ndarray:
    """HU of the head on the canonical grid (float32, z, y, x), before noise; ``labels`` on that grid."""
    f = {name: getattr(fields, name) for name in _Fields.REGION_FIELDS}
    inside = fields.intracranial < 0
    depth = _depth_below_brain_surface(fields.intracranial, partition.csf_width)
    cord = _parenchyma(f, depth) & (fields.height <= FORAMEN_MAGNUM_Z)   # no sulci
    parenchyma = (labels > 0) | cord
    # Grey-matter ribbon: within the cortical thickness of any CSF the brain touches
    # (surface, fissures, sulci), not of the ventricles (their walls are white matter).
    csf = inside & ~parenchyma & (fields.ventricles > 0)
    to_csf = _distance_to(csf)
    grey = np.clip(1.5 - to_csf / CORTEX_THICKNESS_MM, 0.0, 1.0)
    grey = np.maximum(grey, np.clip(0.5 - fields.deep_grey / 3.0, 0.0, 1.0))
    cerebellum = labels == region_by_key("cerebellum").value
    grey[cerebellum] = np.maximum(grey[cerebellum], 0.6)
    white = (HU_GREY + HU_WHITE) / 2.0 - anatomy.grey_white_hu / 2.0 + anatomy.calibration_hu
    brain_hu = white + anatomy.grey_white_hu * grey + 1.5 * fields.texture
    hu = np.full(inside.shape, HU_AIR, np.float32)
    hu[inside] = HU_CSF + anatomy.calibration_hu + 1.5 * fields.texture[inside]
    hu[parenchyma] = brain_hu[parenchyma]
    # Skull: outer and inner cortical tables around a diploe that appears where bone is thick.
    base_extra = BASE_EXTRA_BONE_MM * _ramp((BASE_START_Z - fields.height) / 5.0)
    thickness = anatomy.skull_thickness + base_extra
    bone_depth = fields.intracranial                      # 0 at the inner table
    bone = (bone_depth >= 0) & (bone_depth < thickness)
    table = np.minimum(bone_depth, thickness - bone_depth)
    bone_hu = np.where(table < 1.0, HU_CORTICAL_BONE + 150.0 * fields.texture, HU_DIPLOE + 120.0 * fields.texture)
    # Scalp: fat under the skin; face and neck soft tissue.
    head = fields.head < 0
    soft = head & ~inside & ~bone
    scalp = soft & (fields.head > -anatomy.scalp_thickness)     # subcutaneous fat under the skin
    hu[soft] = HU_SOFT + 8.0 * fields.texture[soft]
    hu[scalp] = HU_FAT + 15.0 * fields.texture[scalp]
    hu[head & (fields.head > -1.5)] = HU_SKIN
    face = head & ~inside & ~bone & np.isfinite(fields.face)
    hu[face] = fields.face[face]
    hu[bone] = bone_hu[bone]
    return hu


def _distance_to(mask: np.ndarray) -> np.ndarray:
    """Euclidean distance (mm) of every canonical voxel to the nearest voxel of ``mask``."""
    image = sitk.GetImageFromArray(mask.astype(np.uint8))
    image.SetSpacing((CANONICAL_SPACING_MM,) * 3)
    distance = sitk.SignedMaurerDistanceMap(image, insideIsPositive=False, squaredDistance=False, useImageSpacing=True)
    return np.maximum(sitk.GetArrayFromImage(distance), 0.0).astype(np.float32)


def _canonical_image(array: np.ndarray) -> sitk.Image:
    image = sitk.GetImageFromArray(array)
    image.SetSpacing((CANONICAL_SPACING_MM,) * 3)
    image.SetOrigin(tuple(float(v) for v in CANONICAL_MIN_MM))
    return image


# ---------------------------------------------------------------------------------------
# Series geometry
# ---------------------------------------------------------------------------------------


@dataclass
class _SeriesGeometry:
    """The written series: an orthogonal grid in the (tilted) slice frame plus the table shear.

    Slice k's true plane passes through ``positions[k]`` (DICOM IPP); the sitk grid puts
    it at ``origin + k * thickness * normal``, which differs by ``-k * thickness * tan(tilt)``
    along the column direction (zero without tilt).
    """

    matrix: int
    n_slices: int
    pixel_spacing: float
    thickness: float
    tilt_deg: float
    origin: np.ndarray        # IPP of slice 0
    row: np.ndarray           # direction of increasing column index
    col: np.ndarray           # direction of increasing row index
    normal: np.ndarray

    @property
    def direction(self) -> np.ndarray:
        return np.column_stack([self.row, self.col, self.normal])

    @property
    def table_increment(self) -> float:
        return self.thickness / math.cos(math.radians(self.tilt_deg))

    def positions(self) -> list[list[float]]:
        """DICOM ImagePositionPatient of every slice (the table moves along z)."""
        return [[float(v) for v in self.origin + k * self.table_increment * np.array([0.0, 0.0, 1.0])]
                for k in range(self.n_slices)]

    def shear(self, normal_offset_mm: float = 0.0) -> tuple[np.ndarray, np.ndarray]:
        """(matrix, offset) mapping a point of the orthogonal grid to its true patient position.

        ``normal_offset_mm``: for the grid shifted that far along the normal (a sub-slice
        of the slice profile), which keeps each slice's own table position.
        """
        tan = math.tan(math.radians(self.tilt_deg))
        matrix = np.eye(3) - tan * np.outer(self.col, self.normal)
        offset = tan * (float(self.normal @ self.origin) + normal_offset_mm) * self.col
        return matrix, offset

    def reference(self, normal_offset_mm: float = 0.0,
                  index_box: tuple[np.ndarray, np.ndarray] | None = None) -> sitk.Image:
        """An empty image on this grid (optionally shifted along the normal, optionally cropped)."""
        size = np.array([self.matrix, self.matrix, self.n_slices])
        spacing = np.array([self.pixel_spacing, self.pixel_spacing, self.thickness])
        origin = self.origin + normal_offset_mm * self.normal
        if index_box is not None:
            start, stop = index_box
            origin = origin + self.direction @ (start * spacing)
            size = stop - start
        image = sitk.Image([int(v) for v in size], sitk.sitkUInt8)
        image.SetSpacing([float(v) for v in spacing])
        image.SetOrigin([float(v) for v in origin])
        image.SetDirection([float(v) for v in self.direction.ravel()])
        return image

    def index_of(self, points: np.ndarray) -> np.ndarray:
        """Continuous (i, j, k) index of true patient points (N x 3)."""
        tan = math.tan(math.radians(self.tilt_deg))
        unsheared = points + tan * ((points - self.origin) @ self.normal)[:, None] * self.col[None, :]
        spacing = np.array([self.pixel_spacing, self.pixel_spacing, self.thickness])
        return ((unsheared - self.origin) @ self.direction) / spacing


def _pose_transform(geometry: _SeriesGeometry, rotation: np.ndarray, translation: np.ndarray,
                    scale: float, normal_offset_mm: float = 0.0) -> sitk.AffineTransform:
    """sitk transform from a point of the series' sitk grid (shifted by ``normal_offset_mm``
    along the normal) to the canonical head frame."""
    shear, shear_offset = geometry.shear(normal_offset_mm)
    inverse_pose = rotation.T / scale
    transform = sitk.AffineTransform(3)
    transform.SetMatrix([float(v) for v in (inverse_pose @ shear).ravel()])
    transform.SetTranslation([float(v) for v in inverse_pose @ (shear_offset - translation)])
    return transform


def _head_points(mask: np.ndarray, rotation: np.ndarray, translation: np.ndarray, scale: float) -> np.ndarray:
    """Patient coordinates (N x 3) of a subsample of canonical voxels in ``mask``."""
    zyx = np.argwhere(mask[::3, ::3, ::3]) * 3
    head = CANONICAL_MIN_MM + CANONICAL_SPACING_MM * zyx[:, ::-1]
    return (scale * head) @ rotation.T + translation


def _series_geometry(matrix: int, pixel_spacing: float, thickness: float, tilt_deg: float, n_slices: int | None,
                     intracranial_points: np.ndarray, head_points: np.ndarray, rng: np.random.Generator) -> _SeriesGeometry:
    """Slices from just below the foramen magnum to above the vertex (or ``n_slices`` centred there)."""
    tilt = math.radians(tilt_deg)
    row = np.array([1.0, 0.0, 0.0])
    col = np.array([0.0, math.cos(tilt), -math.sin(tilt)])
    normal = np.cross(row, col)
    low = float((intracranial_points @ normal).min()) - rng.uniform(5.0, 15.0)
    high = float((head_points @ normal).max()) + rng.uniform(1.0, 6.0)
    if n_slices is None:
        n_slices = int(math.ceil((high - low) / thickness)) + 1
    else:
        low = (low + high) / 2.0 - (n_slices - 1) * thickness / 2.0
    half_fov = (matrix - 1) / 2.0 * pixel_spacing
    # The reconstruction centre stays on the table axis (x = y = 0); slice 0 is at height `low`.
    centre = np.array([0.0, 0.0, low / math.cos(tilt)])
    origin = centre - half_fov * (row + col)
    return _SeriesGeometry(matrix, n_slices, pixel_spacing, thickness, tilt_deg, origin, row, col, normal)


# ---------------------------------------------------------------------------------------
# make_phantom
# ---------------------------------------------------------------------------------------


def _resample(image: sitk.Image, reference: sitk.Image, transform: sitk.Transform, default: float) -> np.ndarray:
    resampled = sitk.Resample(image, reference, transform, sitk.sitkLinear, default, sitk.sitkFloat32)
    return sitk.GetArrayFromImage(resampled)


#: Values of region fields outside the canonical grid (far outside the brain).
_FIELD_DEFAULTS = {"intracranial": 100.0, "ventricles": 100.0, "brainstem": 100.0, "infratentorial": 100.0,
                   "midline": 0.0, "sylvian": 0.0, "parieto_occipital": 0.0, "central": 0.0, "sulci": 0.0,
                   "height": 0.0}


def _labels_on_grid(fields: _Fields, partition: _Partition, geometry: _SeriesGeometry,
                    transform: sitk.Transform, intracranial_points: np.ndarray) -> np.ndarray:
    """Labels (uint8, k, j, i) on the slice centres, computed only inside the brain's index box."""
    index = geometry.index_of(intracranial_points)
    size = np.array([geometry.matrix, geometry.matrix, geometry.n_slices])
    # The points sample the intracranial space every 3 canonical voxels: keep a 6 mm margin.
    spacing = np.array([geometry.pixel_spacing, geometry.pixel_spacing, geometry.thickness])
    margin = np.ceil(6.0 / spacing).astype(int) + 1
    start = np.clip(np.floor(index.min(axis=0)).astype(int) - margin, 0, size)
    stop = np.clip(np.ceil(index.max(axis=0)).astype(int) + margin + 1, 0, size)
    labels = np.zeros(size[::-1], np.uint8)
    if np.any(stop <= start):
        return labels
    canonical = {name: _canonical_image(getattr(fields, name)) for name in _Fields.REGION_FIELDS}
    # Slabs of ~8 M voxels bound the memory of the resampled fields on fine grids.
    slab = max(1, int(8e6 // ((stop[0] - start[0]) * (stop[1] - start[1]))))
    for k0 in range(int(start[2]), int(stop[2]), slab):
        k1 = min(int(stop[2]), k0 + slab)
        box = (np.array([start[0], start[1], k0]), np.array([stop[0], stop[1], k1]))
        reference = geometry.reference(index_box=box)
        on_grid = {name: _resample(image, reference, transform, _FIELD_DEFAULTS[name])
                   for name, image in canonical.items()}
        labels[k0:k1, start[1]:stop[1], start[0]:stop[0]] = _label_fields(on_grid, partition)
    return labels


def _slice_profile_image(hu: sitk.Image, geometry: _SeriesGeometry, rotation: np.ndarray,
                         translation: np.ndarray, scale: float) -> np.ndarray:
    """HU of every slice averaged over its thickness (float32, k, j, i).

    Sub-slices (<= ~1 mm apart, centred on the slice) are resampled one offset at a time,
    each with its slice's own table position (for a tilted series too).
    """
    sub = _sub_slices(geometry.thickness)
    image = None
    for m in range(sub):
        offset = (m - (sub - 1) / 2.0) * geometry.thickness / sub
        transform = _pose_transform(geometry, rotation, translation, scale, offset)
        plane = _resample(hu, geometry.reference(offset), transform, HU_AIR)
        image = plane if image is None else image + plane
    image /= sub
    return image


def _sub_slices(thickness: float) -> int:
    """Odd number of sub-slices (<= ~1 mm apart) averaged into one slice: the slice profile."""
    n = max(1, int(math.ceil(thickness / 1.0)))
    return n if n % 2 == 1 else n + 1


def _ct_noise(rng: np.random.Generator, shape: tuple[int, ...], sigma_hu: float, pixel_spacing_mm: float) -> np.ndarray:
    """Gaussian noise with CT's grain (~NOISE_GRAIN_MM, whatever the pixel size), SD ``sigma_hu``."""
    sigma_px = max(0.5, NOISE_GRAIN_MM / pixel_spacing_mm)
    impulse = np.zeros((25, 25), np.float32)
    impulse[12, 12] = 1.0
    gain = float(np.sqrt((ndimage.gaussian_filter(impulse, sigma_px) ** 2).sum()))   # SD after filtering white noise
    noise = rng.standard_normal(shape, dtype=np.float32)
    for k in range(shape[0]):   # slice by slice: noise is independent between reconstructed slices
        noise[k] = ndimage.gaussian_filter(noise[k], sigma_px)
    noise *= sigma_hu / gain
    return noise


def _check_arguments(seed, slice_thickness_mm, pixel_spacing_mm, matrix, n_slices, tilt_deg, sex, age_years) -> None:
    if not isinstance(seed, (int, np.integer)) or seed < 0:
        raise ValueError(f"seed must be a non-negative integer, got {seed!r}")
    if slice_thickness_mm is not None and not 0.3 <= slice_thickness_mm <= 10.0:
        raise ValueError(f"slice thickness must be 0.3-10 mm, got {slice_thickness_mm}")
    if pixel_spacing_mm is not None and not 0.2 <= pixel_spacing_mm <= 5.0:
        raise ValueError(f"pixel spacing must be 0.2-5 mm, got {pixel_spacing_mm}")
    if pixel_spacing_mm is not None and isinstance(matrix, (int, np.integer)) and matrix * pixel_spacing_mm < 170.0:
        raise ValueError(f"field of view {matrix} x {pixel_spacing_mm} mm = {matrix * pixel_spacing_mm:.0f} mm is too "
                         "small for a toddler's head (needs >= 170 mm): raise the matrix or the pixel spacing")
    if not isinstance(matrix, (int, np.integer)) or not 32 <= matrix <= 1024:
        raise ValueError(f"matrix must be an integer 32-1024, got {matrix!r}")
    if n_slices is not None and (not isinstance(n_slices, (int, np.integer)) or not 1 <= n_slices <= 2000):
        raise ValueError(f"n_slices must be an integer 1-2000 or None, got {n_slices!r}")
    if not -30.0 <= tilt_deg <= 30.0:
        raise ValueError(f"gantry tilt must be within +-30 degrees, got {tilt_deg}")
    if sex not in (None, "M", "F"):
        raise ValueError(f"sex must be 'M', 'F' or None, got {sex!r}")
    if age_years is not None and not 0.5 <= age_years <= 5.0:
        raise ValueError(f"age must be 0.5-5 years (the anatomy is a toddler's), got {age_years}")


def make_phantom(seed: int, *, slice_thickness_mm: float | None = None, pixel_spacing_mm: float | None = None,
                 matrix: int = 512, n_slices: int | None = None, tilt_deg: float = 0.0,
                 sex: str | None = None, age_years: float | None = None) -> Phantom:
    """Make one synthetic head CT of a toddler with its region labels and true volumes.

    Args:
        seed: the case; the same seed and arguments give identical arrays and meta.
            The child (sex, age, volumes, anatomy, pose) depends on the seed only, so one
            seed at two slice thicknesses is the same child scanned twice.
        slice_thickness_mm: slice thickness = spacing (contiguous slices, mm); None draws
            one of 0.625-5 mm.
        pixel_spacing_mm: in-plane pixel size (mm); None draws 0.35-0.6 mm, at least
            215 mm / matrix so the field of view holds the head (0.42-0.6 mm at 512).
        matrix: rows = columns of every slice.
        n_slices: number of slices; None covers the head from below the foramen magnum to
            above the vertex.
        tilt_deg: gantry tilt (degrees, about the patient's left-right axis, GE's sign).
        sex: "M" or "F"; None draws it with the cohort's proportion of boys.
        age_years: age at the scan; None draws it from the cohort (1.5-2.5 years).

    Returns:
        A :class:`Phantom` whose image (Int16 HU) and labels share one grid.
    """
    _check_arguments(seed, slice_thickness_mm, pixel_spacing_mm, matrix, n_slices, tilt_deg, sex, age_years)
    child_rng = np.random.default_rng([int(seed), 1])
    anatomy_rng = np.random.default_rng([int(seed), 2])
    scan_rng = np.random.default_rng([int(seed), 3])

    drawn_sex = "M" if child_rng.uniform() < COHORT_BOY_FRACTION else "F"
    drawn_age = _draw_age(child_rng)
    sex = sex or drawn_sex
    age_years = float(age_years if age_years is not None else drawn_age)
    targets = draw_target_volumes(child_rng, sex, age_years)
    study_date = dt.date(2018, 1, 1) + dt.timedelta(days=int(child_rng.integers(0, 2900)))
    birth_date = study_date - dt.timedelta(days=int(round(age_years * 365.25)))

    anatomy = _draw_anatomy(anatomy_rng, targets)
    fields = _compute_fields(anatomy_rng, anatomy)
    partition, scale, canonical_labels = _calibrate(fields, anatomy, targets)
    hu = _canonical_hu(fields, anatomy, partition, canonical_labels)
    del canonical_labels

    # Every scan parameter is drawn even when given, so the pose of a seed never depends
    # on which options were given: one seed is one child in one position on the table.
    drawn_thickness = float(scan_rng.choice(SLICE_THICKNESS_CHOICES_MM))
    thickness = float(slice_thickness_mm if slice_thickness_mm is not None else drawn_thickness)
    low = max(PIXEL_SPACING_RANGE_MM[0], MIN_FIELD_OF_VIEW_MM / matrix)
    high = max(PIXEL_SPACING_RANGE_MM[1], low + 0.1)
    drawn_pixel = round(float(scan_rng.uniform(low, high)), 4)
    pixel_spacing = float(pixel_spacing_mm if pixel_spacing_mm is not None else drawn_pixel)
    rotation_deg = scan_rng.uniform(-MAX_ROTATION_DEG, MAX_ROTATION_DEG, 3)
    translation = np.array([scan_rng.uniform(-8.0, 8.0), scan_rng.uniform(-8.0, 8.0), 0.0])
    base_noise = scan_rng.uniform(3.0, 7.5)
    noise_hu = float(np.clip(base_noise * math.sqrt(2.5 / thickness), *NOISE_RANGE_HU))
    rotation = _rotation_matrix(rotation_deg)

    intracranial_points = _head_points(fields.intracranial < 0, rotation, translation, scale)
    head_points = _head_points(fields.head < 0, rotation, translation, scale)
    geometry = _series_geometry(matrix, pixel_spacing, thickness, float(tilt_deg), n_slices,
                                intracranial_points, head_points, scan_rng)
    transform = _pose_transform(geometry, rotation, translation, scale)

    labels = _labels_on_grid(fields, partition, geometry, transform, intracranial_points)
    image = _slice_profile_image(_canonical_image(hu), geometry, rotation, translation, scale)
    del hu
    image += _ct_noise(scan_rng, image.shape, noise_hu, pixel_spacing)
    image = np.clip(np.rint(image), -1024, 3071).astype(np.int16)

    image_sitk = sitk.GetImageFromArray(image)
    labels_sitk = sitk.GetImageFromArray(labels)
    reference = geometry.reference()
    for target in (image_sitk, labels_sitk):
        target.CopyInformation(reference)

    volumes = region_volumes_cm3(labels, pixel_spacing * pixel_spacing, np.full(labels.shape[0], thickness))
    meta = {
        "generation": GENERATION,
        "seed": int(seed),
        "sex": sex,
        "age_years": round(age_years, 4),
        "volumes_cm3": {key: round(value, 3) for key, value in volumes.items()},
        "target_volumes_cm3": {key: round(value, 3) for key, value in targets.items()},
        "pixel_spacing_mm": pixel_spacing,
        "slice_thickness_mm": thickness,
        "matrix": int(matrix),
        "n_slices": int(geometry.n_slices),
        "tilt_deg": float(tilt_deg),
        "pose": {"rotation_deg": [round(float(v), 3) for v in rotation_deg],
                 "translation_mm": [round(float(v), 3) for v in translation],
                 "scale": round(scale, 4)},
        "noise_hu": round(noise_hu, 3),
        "birth_date": birth_date.strftime("%Y%m%d"),
        "study_date": study_date.strftime("%Y%m%d"),
        "labels_note": "ventricles, fissures, sulci and extra-axial CSF are background (0)",
    }
    if tilt_deg != 0.0:
        meta["image_orientation_patient"] = [float(v) for v in (*geometry.row, *geometry.col)]
        meta["image_position_patient"] = geometry.positions()
    return Phantom(image=image_sitk, labels=labels_sitk, meta=meta)
