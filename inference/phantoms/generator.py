"""Synthetic pediatric head-CT phantoms with known brain-region labels and volumes (generation 3).

A phantom is a 2-year-old's head made from real anatomy: the bundled atlas's 10-region
map, the template's grey / white / CSF maps and its skull and scalp, pulled through a
random smooth diffeomorphism and given a toddler's tissue densities
(:mod:`inference.phantoms.anatomy`), then scanned: scaled to the child's drawn brain
volume, posed on the table, cut into slices of the drawn thickness (partial volume across
the slice), blurred by a drawn reconstruction kernel, with CT noise of drawn level and
grain. The regions are told apart by the anatomy the image shows, never by an intensity
code (each region's parenchyma gets a small random offset, the contrast is drawn per case).

How a phantom is made (lengths in mm, head frame = LPS with the origin at the atlas's
intracranial centroid: +x patient left, +y posterior, +z superior):

1. Draw the case from the seed: sex, age, target volumes (the paper's cohort), the
   deformation, the densities, pose, geometry, kernel and noise; separate generators for
   the child, the deformation, the appearance and the scan.
2. The canonical head (:func:`inference.phantoms.anatomy.make_canonical_head`) on the atlas's
   1 mm grid: the deformation also scales each region towards the child's drawn regional
   shares; the whole head is then scaled so the parenchyma's total matches the drawn total.
3. The HU image resampled (linear) with the pose onto the series grid, averaging
   sub-slices across the slice thickness (slice profile); the labels resampled (nearest)
   onto the slice centres.
4. Kernel blur in-plane, CT noise (Gaussian with the kernel's grain), round to Int16 HU,
   count the volumes on the written labels.

Choices this module makes where the paper is silent (documented, not measured):

- Volumes: whole-cohort means and SDs of Xi et al. 2025 (paper-notes.md); girls
  6 % smaller than boys in every region, +8 %/year with age around the cohort mean
  age 1.98 y; the sex and age effects are centred so that the cohort mean (55.5 % boys)
  equals the published mean; the remaining spread is a shared brain-size factor
  (correlation 0.8 between regions) plus a regional part, keeping each region's SD.
  The adult atlas's own proportions differ (its brainstem is three times the paper's
  share): the regional scaling is bounded (``anatomy.MAX_REGION_SCALE``), so a drawn share
  far from the atlas's is approached, not reached.
- Ventricles, sulci and extra-axial CSF are background (label 0): a region's volume is
  its parenchyma. Deep grey nuclei belong to the region the atlas mapping gives them.
- ``meta["volumes_cm3"]`` is counted on the written label map (the truth for
  evaluation); ``meta["target_volumes_cm3"]`` are the drawn targets.
- Seeds from :data:`HELD_OUT_SEEDS` are for evaluation: training refuses them, so the
  deformation of a held-out case never occurs in training.
"""
from __future__ import annotations

import datetime as dt
import math
from dataclasses import dataclass, field
from typing import Mapping

import numpy as np
import SimpleITK as sitk
from scipy import ndimage

from inference.phantoms.anatomy import SPACING_MM, TissueDensities, make_canonical_head
from inference.vocabulary import REGION_KEYS
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
#: 3: the anatomy is the bundled atlas's, deformed (generation 2 drew lobes between planes).
#: 4: generation 3's recipe, computed faster (random fields interpolated by SimpleITK, the
#:    regional scaling fitted on a 2 mm grid): the same seeds give slightly different cases.
#: 5: the bone shell's weakest voxels at least a quarter of the bone density (the skull had holes).
GENERATION = 6
#: Seeds of held-out phantoms (evaluation only; training refuses them).
HELD_OUT_SEEDS = range(900_000, 1_000_000)

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

KERNEL_SIGMA_RANGE_MM = (0.0, 0.6)   # in-plane blur of the reconstruction kernel (sharp bone to soft)
NOISE_GRAIN_RANGE_MM = (0.35, 0.6)   # SD of the Gaussian that shapes the noise (the kernel's texture)
HU_AIR = -1000.0


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


def child_of_seed(seed: int) -> tuple[str, float]:
    """The sex and age (years) ``make_phantom(seed)`` draws when not given them."""
    return _draw_child(np.random.default_rng([int(seed), 1]))


def _draw_child(rng: np.random.Generator) -> tuple[str, float]:
    sex = "M" if rng.uniform() < COHORT_BOY_FRACTION else "F"
    return sex, _draw_age(rng)


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


def _head_points(mask: np.ndarray, origin_mm: np.ndarray, rotation: np.ndarray, translation: np.ndarray,
                 scale: float) -> np.ndarray:
    """Patient coordinates (N x 3) of a subsample of canonical voxels in ``mask``."""
    zyx = np.argwhere(mask[::3, ::3, ::3]) * 3
    head = origin_mm + SPACING_MM * zyx[:, ::-1]
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


def _labels_on_grid(labels: sitk.Image, geometry: _SeriesGeometry, transform: sitk.Transform,
                    intracranial_points: np.ndarray) -> np.ndarray:
    """Labels (uint8, k, j, i) on the slice centres (nearest), resampled only inside the brain's index box."""
    index = geometry.index_of(intracranial_points)
    size = np.array([geometry.matrix, geometry.matrix, geometry.n_slices])
    # The points sample the intracranial space every 3 canonical voxels: keep a 6 mm margin.
    spacing = np.array([geometry.pixel_spacing, geometry.pixel_spacing, geometry.thickness])
    margin = np.ceil(6.0 / spacing).astype(int) + 1
    start = np.clip(np.floor(index.min(axis=0)).astype(int) - margin, 0, size)
    stop = np.clip(np.ceil(index.max(axis=0)).astype(int) + margin + 1, 0, size)
    out = np.zeros(size[::-1], np.uint8)
    if np.any(stop <= start):
        return out
    box = (start, stop)
    reference = geometry.reference(index_box=box)
    resampled = sitk.Resample(labels, reference, transform, sitk.sitkNearestNeighbor, 0, sitk.sitkUInt8)
    out[start[2]:stop[2], start[1]:stop[1], start[0]:stop[0]] = sitk.GetArrayFromImage(resampled)
    return out


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


def _kernel_blur(image: np.ndarray, sigma_mm: float, pixel_spacing_mm: float) -> np.ndarray:
    """In-plane Gaussian blur of every slice: a softer reconstruction kernel (none below 0.05 mm)."""
    if sigma_mm < 0.05:
        return image
    return ndimage.gaussian_filter(image, (0.0, sigma_mm / pixel_spacing_mm, sigma_mm / pixel_spacing_mm))


def _ct_noise(rng: np.random.Generator, shape: tuple[int, ...], sigma_hu: float, pixel_spacing_mm: float,
              grain_mm: float) -> np.ndarray:
    """Gaussian noise with CT's grain (SD ``grain_mm`` whatever the pixel size), SD ``sigma_hu``."""
    sigma_px = max(0.5, grain_mm / pixel_spacing_mm)
    impulse = np.zeros((25, 25), np.float32)
    impulse[12, 12] = 1.0
    gain = float(np.sqrt((ndimage.gaussian_filter(impulse, sigma_px) ** 2).sum()))   # SD after filtering white noise
    noise = rng.standard_normal(shape, dtype=np.float32)
    for k in range(shape[0]):   # slice by slice: noise is independent between reconstructed slices
        noise[k] = ndimage.gaussian_filter(noise[k], sigma_px)
    noise *= sigma_hu / gain
    return noise


def _checked_volumes(volumes_cm3: Mapping[str, float]) -> dict[str, float]:
    """The 10 regions' volumes, each a positive number of cm3 (raises ValueError naming the region)."""
    missing = [key for key in REGION_KEYS if key not in volumes_cm3]
    unknown = [key for key in volumes_cm3 if key not in REGION_KEYS]
    if missing or unknown:
        raise ValueError(f"volumes must give exactly the 10 regions: missing {missing or 'none'}, unknown {unknown or 'none'}")
    for key in REGION_KEYS:
        if not (math.isfinite(float(volumes_cm3[key])) and float(volumes_cm3[key]) > 0):
            raise ValueError(f"volume of {key} must be a positive number of cm3, got {volumes_cm3[key]!r}")
    return {key: float(volumes_cm3[key]) for key in REGION_KEYS}


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
                 sex: str | None = None, age_years: float | None = None,
                 volumes_cm3: Mapping[str, float] | None = None) -> Phantom:
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
        volumes_cm3: the 10 regions' volumes (cm3, by region key) to build, e.g. a reference's
            means for a typical child; None draws them from the cohort model for the sex and age.

    Returns:
        A :class:`Phantom` whose image (Int16 HU) and labels share one grid.
    """
    _check_arguments(seed, slice_thickness_mm, pixel_spacing_mm, matrix, n_slices, tilt_deg, sex, age_years)
    child_rng = np.random.default_rng([int(seed), 1])
    deformation_rng = np.random.default_rng([int(seed), 2])
    scan_rng = np.random.default_rng([int(seed), 3])
    appearance_rng = np.random.default_rng([int(seed), 4])

    drawn_sex, drawn_age = _draw_child(child_rng)
    sex = sex or drawn_sex
    age_years = float(age_years if age_years is not None else drawn_age)
    targets = draw_target_volumes(child_rng, sex, age_years)   # drawn even when given: the rest of the case stays the same
    if volumes_cm3 is not None:
        targets = _checked_volumes(volumes_cm3)
    study_date = dt.date(2018, 1, 1) + dt.timedelta(days=int(child_rng.integers(0, 2900)))
    birth_date = study_date - dt.timedelta(days=int(round(age_years * 365.25)))

    target_shares = np.array([targets[key] for key in REGION_KEYS]) / sum(targets.values())
    densities = TissueDensities.draw(appearance_rng)
    head = make_canonical_head(deformation_rng, target_shares, densities, appearance_rng)
    # The whole head is scaled so that its parenchyma has the drawn total volume.
    canonical_cm3 = float(np.count_nonzero(head.labels)) * SPACING_MM ** 3 / 1000.0
    scale = (sum(targets.values()) / canonical_cm3) ** (1.0 / 3.0)

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
    kernel_sigma = float(scan_rng.uniform(*KERNEL_SIGMA_RANGE_MM))
    noise_grain = float(scan_rng.uniform(*NOISE_GRAIN_RANGE_MM))
    rotation = _rotation_matrix(rotation_deg)

    intracranial_points = _head_points(head.intracranial, head.origin_mm, rotation, translation, scale)
    head_points = _head_points(head.head, head.origin_mm, rotation, translation, scale)
    geometry = _series_geometry(matrix, pixel_spacing, thickness, float(tilt_deg), n_slices,
                                intracranial_points, head_points, scan_rng)
    transform = _pose_transform(geometry, rotation, translation, scale)

    labels = _labels_on_grid(head.image(head.labels), geometry, transform, intracranial_points)
    image = _slice_profile_image(head.image(head.hu), geometry, rotation, translation, scale)
    del head.hu
    image = _kernel_blur(image, kernel_sigma, pixel_spacing)
    image += _ct_noise(scan_rng, image.shape, noise_hu, pixel_spacing, noise_grain)
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
        "noise_grain_mm": round(noise_grain, 3),
        "kernel_sigma_mm": round(kernel_sigma, 3),
        "anatomy": head.meta,
        "birth_date": birth_date.strftime("%Y%m%d"),
        "study_date": study_date.strftime("%Y%m%d"),
        "labels_note": "ventricles, sulci and extra-axial CSF are background (0)",
    }
    if tilt_deg != 0.0:
        meta["image_orientation_patient"] = [float(v) for v in (*geometry.row, *geometry.col)]
        meta["image_position_patient"] = geometry.positions()
    return Phantom(image=image_sitk, labels=labels_sitk, meta=meta)
