"""A child's head made from the bundled atlas's real anatomy: the canonical volume of a generation-3 phantom.

Every case starts from the same real anatomy (:mod:`inference.atlas.bundle`): the
10-region lobar atlas, the template's grey / white / CSF probability maps and the
template CT's skull and scalp, all on the atlas's 1 mm grid. A case is that anatomy
pulled through a random smooth diffeomorphism, given a child's tissue densities:

1. **Deformation** (:func:`draw_deformation`): a stationary velocity field on a 4 mm
   lattice, the sum of a large-scale random field (lobe shapes and proportions, ventricle
   size), a medium-scale one (gyral and sulcal positions), a left-right asymmetry (one
   hemisphere wider, frontal and occipital petalia) and a local scaling of each region
   towards the child's drawn regional shares; integrated by scaling and squaring, so the
   map is smooth and invertible (no folding, no tearing of a region).
2. **Tissue**: the warped probability maps give partial volume at 1 mm; random cortical
   sulci (a band-limited field thresholded inside the cortical ribbon) vary the gyral
   pattern beyond what the adult template's average cortex shows. A voxel is parenchyma
   when grey + white outweigh CSF; its label is the warped atlas region (ventricles,
   sulci and extra-axial CSF are background, as in the node's volumes).
3. **Densities** (:class:`TissueDensities`): drawn per case around a 2-year-old's values
   (below), with a small offset per region and a smooth bias field, so no region has an
   intensity code and the contrast varies (the SynthSeg idea: learn shape, not one contrast).
4. **Skull, scalp and face** from the template CT (its soft tissue and air in approximate
   HU, :func:`template_hu`), the skull thresholded at a drawn level and closed by a shell
   of drawn thickness around the intracranial space (open at the foramen magnum), so the
   skull's and scalp's thickness vary from case to case.

Where the densities come from (means; each case draws around them):

- Grey matter 30-42 HU, white matter 4-10 HU below grey matter, CSF 0-12 HU. An adult's
  grey and white matter are about 35-45 and 20-30 HU (a 10-15 HU difference). In infancy
  the brain's attenuation is lower and rises with myelination; by about 2 years the
  white matter is still less dense (more water, less myelin) than an adult's, and the
  grey-white difference is smaller than an adult's (Cauley et al., AJNR 2018, "Modeling
  early postnatal brain growth and development with CT"; the range here was chosen from
  these general statements, not fitted to their tables, which are not bundled).
- A toddler's calvarium is thinner and less mineralised than an adult's: bone 700-1500 HU
  at its densest here (adult cortical bone about 1500-2000 HU), at least 2-3.5 mm thick.
- Scalp and face: the template's own soft tissue and air (an adult average), offset by
  -8..8 HU per case.

Lengths in mm, frame LPS (+x patient left, +y posterior, +z superior) with the origin
at the intracranial centroid of the atlas; arrays (z, y, x).
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from functools import lru_cache

import numpy as np
import SimpleITK as sitk
from scipy import ndimage

from inference.volumes import countable_labels, parenchyma_threshold_hu
from inference.vocabulary import REGIONS

SPACING_MM = 1.0
#: Lattice of the velocity field (mm): the deformation is smooth well above this scale.
LATTICE_MM = 4.0
#: Scaling-and-squaring steps: the velocity is divided by 2**STEPS before composing.
SQUARING_STEPS = 6
#: Atlas label volumes a case may be scaled to, as a factor of the atlas's own share (linear, per axis).
MAX_REGION_SCALE = 1.35
#: The brainstem's bound: the adult atlas's brainstem is about twice the cohort's share, and its
#: scaling is diluted by its larger neighbours (the velocity is smoothed over ~6 mm).
MAX_BRAINSTEM_SCALE = 2.5
#: Template CT (Cormack units of the Rorden template, not HU) levels between which tissues are drawn.
TEMPLATE_BONE_LEVEL = (2880.0, 3060.0)     # soft tissue | bone: drawn per case, varies the skull
TEMPLATE_BONE_TOP = 3700.0                  # the template's densest bone
#: Skin level (HU of the template's blurred surface): drawn per case, moves the scalp's surface.
SKIN_LEVEL_HU = (-700.0, -300.0)
#: Thickness (mm) of the closed shell of bone around the intracranial space: the template's
#: skull, an average of adults, is thin or open where it varies most (squama, orbital roofs).
SHELL_MM = (2.0, 3.5)
#: Least bone share of the shell (0.25: half-way in HU from soft tissue to the case's bone peak, ~370-770 HU).
SHELL_BONE_SHARE = 0.25
#: The shell is open in the lowest part of the intracranial space (the foramen magnum).
FORAMEN_MM = 10.0
FORAMEN_RADIUS_MM = 14.0
#: Share of the template's (adults') CSF kept where the maps see brain: a toddler's sulci are
#: narrow, an atrophic child's as wide as an adult's.
CSF_SHARE = (0.15, 1.0)
#: Corrections of the regional scaling's fit by the shares the finished labels would have,
#: estimated on the fitting grid (then one more by a finished head's).
COARSE_SHARE_CORRECTIONS = 1
#: Share of the cortical ribbon cut into random sulci.
SULCAL_FRACTION = (0.05, 0.35)
#: Ventricle volume factor of most cases, and of the cases with enlarged ventricles
#: (ventriculomegaly, hydrocephalus: children this tool is for), drawn with this frequency.
VENTRICLE_VOLUME_FACTOR = (0.6, 1.4)
ENLARGED_VENTRICLES = (1.5, 5.0)
ENLARGED_VENTRICLES_FRACTION = 0.25
#: Template CSF this deep inside the intracranial space (mm) is ventricle, not sulcus.
VENTRICLE_DEPTH_MM = 12.0
#: Cases with the brain drawn back from the inner table (atrophy, benign enlargement of the
#: subarachnoid spaces): frequency, and depth of the added extra-axial CSF (mm).
WIDE_EXTRA_AXIAL_FRACTION = 0.2
WIDE_EXTRA_AXIAL_MM = (1.0, 4.0)
#: Neck added below the template (mm, voxels of 1 mm).
NECK_MM = 30


@dataclass(frozen=True)
class AtlasAnatomy:
    """The bundled atlas's anatomy on one identity-direction 1 mm grid (arrays z, y, x).

    Attributes:
        origin_mm: physical position (x, y, z) of voxel (0, 0, 0), head frame.
        regions: region value per voxel (0..10), the nearest region filled into every
            intracranial voxel (the atlas's ventricles take the region around them; the
            tissue maps decide what is parenchyma).
        intracranial: float32 0..1.
        grey, white, csf: float32 probability maps of the template.
        template: float32 the template CT (Cormack units).
        outside_mm: float32 distance (mm) outwards from the intracranial space (0 inside;
            large in the foramen magnum's levels, where the skull is open).
    """

    origin_mm: np.ndarray
    regions: np.ndarray
    intracranial: np.ndarray
    grey: np.ndarray
    white: np.ndarray
    csf: np.ndarray
    template: np.ndarray
    outside_mm: np.ndarray

    @property
    def shape(self) -> tuple[int, int, int]:
        return self.regions.shape

    def image(self, array: np.ndarray) -> sitk.Image:
        """``array`` (z, y, x) as an image on this grid."""
        return grid_image(array, self.origin_mm)


def grid_image(array: np.ndarray, origin_mm: np.ndarray, spacing_mm: float = SPACING_MM) -> sitk.Image:
    """``array`` (z, y, x) as an identity-direction image with this origin (x, y, z, mm) and isotropic spacing."""
    image = sitk.GetImageFromArray(array)
    image.SetSpacing((spacing_mm,) * 3)
    image.SetOrigin([float(v) for v in origin_mm])
    return image


@lru_cache(maxsize=1)
def atlas_anatomy() -> AtlasAnatomy:
    """The bundled atlas, template and tissue maps on the atlas's 1 mm grid, LPS identity direction (cached)."""
    from inference.atlas.bundle import data_on_grid, region_atlas

    atlas = sitk.DICOMOrient(region_atlas(), "LPS")
    reference = sitk.Image(atlas.GetSize(), sitk.sitkFloat32)
    reference.SetSpacing(atlas.GetSpacing())
    reference.SetOrigin(atlas.GetOrigin())

    def on_grid(name: str) -> np.ndarray:
        return data_on_grid(name, reference)

    regions = sitk.GetArrayFromImage(atlas).astype(np.uint8)
    intracranial = on_grid("blast_intracranial_mask")
    inside = intracranial > 0.5
    # Every intracranial voxel takes its nearest region: ventricle walls and the atlas's
    # unlabelled gaps belong to the lobe around them; the tissue maps decide parenchyma.
    nearest = ndimage.distance_transform_edt(regions == 0, return_distances=False, return_indices=True)
    filled = regions[tuple(nearest)]
    filled[~inside] = 0
    # The template stops just below the foramen magnum; a scan goes on into the neck. The
    # neck is its lowest slice continued down (soft tissue, the cervical spine's bone),
    # with no brain: the cord below the foramen magnum is not labelled.
    pad = ((NECK_MM, 0), (0, 0), (0, 0))
    index_centre = np.array(ndimage.center_of_mass(inside))[::-1] + np.array([0.0, 0.0, NECK_MM])
    origin = -index_centre * SPACING_MM
    zero = {"constant_values": 0}
    outside = ndimage.distance_transform_edt(~inside).astype(np.float32) * SPACING_MM
    # The foramen magnum: a disc around the lowest intracranial voxels, open to the neck.
    lowest = int(np.argmax(inside.any(axis=(1, 2))))
    centre_y, centre_x = ndimage.center_of_mass(inside[lowest])
    y, x = np.indices(inside.shape[1:])
    disc = (y - centre_y) ** 2 + (x - centre_x) ** 2 <= (FORAMEN_RADIUS_MM / SPACING_MM) ** 2
    outside[:lowest + int(FORAMEN_MM / SPACING_MM), disc] = 99.0
    return AtlasAnatomy(origin_mm=origin, outside_mm=np.pad(outside, pad, constant_values=99.0),
                        regions=np.pad(filled, pad, **zero),
                        intracranial=np.pad(intracranial.astype(np.float32), pad, **zero),
                        grey=np.pad(on_grid("scgrey"), pad, **zero), white=np.pad(on_grid("scwhite"), pad, **zero),
                        csf=np.pad(on_grid("sccsf"), pad, **zero), template=np.pad(on_grid("scct"), pad, mode="edge"))


# ---------------------------------------------------------------------------------------
# Deformation
# ---------------------------------------------------------------------------------------


@dataclass(frozen=True)
class DeformationParameters:
    """Random parameters of one case's deformation (mm and dimensionless)."""

    large_mm: float          # SD of the large-scale velocity (correlation ~24 mm)
    medium_mm: float         # SD of the medium-scale velocity (correlation ~8 mm)
    asymmetry: float         # relative widening of the left hemisphere (negative: the right)
    petalia: float           # frontal-occipital twist of that asymmetry

    @classmethod
    def draw(cls, rng: np.random.Generator) -> "DeformationParameters":
        return cls(large_mm=float(rng.uniform(2.5, 6.0)), medium_mm=float(rng.uniform(0.8, 2.0)),
                   asymmetry=float(rng.uniform(-0.03, 0.03)), petalia=float(rng.uniform(0.0, 0.03)))


def _lattice_points(shape_zyx: tuple[int, ...], origin_mm: np.ndarray) -> tuple[tuple[int, ...], np.ndarray]:
    """Lattice covering the grid: its shape and the (x, y, z) mm coordinates of its nodes (3, z, y, x)."""
    extent = np.array(shape_zyx[::-1]) * SPACING_MM
    lattice_shape = tuple(int(math.ceil(e / LATTICE_MM)) + 1 for e in extent[::-1])
    zyx = np.indices(lattice_shape, dtype=np.float32) * LATTICE_MM
    xyz = np.stack([zyx[2], zyx[1], zyx[0]]) + origin_mm.reshape(3, 1, 1, 1).astype(np.float32)
    return lattice_shape, xyz


def _random_field(rng: np.random.Generator, shape: tuple[int, ...], correlation_mm: float) -> np.ndarray:
    """Zero-mean, unit-SD smooth vector field (3, z, y, x) on the lattice."""
    noise = rng.standard_normal((3, *shape)).astype(np.float32)
    field = np.stack([ndimage.gaussian_filter(c, correlation_mm / LATTICE_MM, mode="nearest") for c in noise])
    field -= field.mean(axis=(1, 2, 3), keepdims=True)
    return field / max(float(field.std()), 1e-6)


def region_scaling_velocity(lattice_regions: np.ndarray, xyz: np.ndarray, log_scales: dict[int, float]) -> np.ndarray:
    """Velocity (3, z, y, x) that scales each region about its centroid by exp(log scale).

    The weight of a region is its indicator smoothed over ~6 mm, so the velocity is smooth
    across boundaries; the deformation pulls the atlas back, hence the minus sign.
    """
    velocity = np.zeros_like(xyz)
    total_weight = np.zeros(xyz.shape[1:], np.float32)
    weights = {}
    for value, log_scale in log_scales.items():
        indicator = (lattice_regions == value).astype(np.float32)
        if not indicator.any() or log_scale == 0.0:
            continue
        weights[value] = (ndimage.gaussian_filter(indicator, 6.0 / LATTICE_MM), log_scale, indicator)
        total_weight += weights[value][0]
    norm = np.maximum(total_weight, 1.0)
    for value, (weight, log_scale, indicator) in weights.items():
        centre = (xyz * indicator).sum(axis=(1, 2, 3)) / indicator.sum()
        velocity -= (weight / norm) * log_scale * (xyz - centre.reshape(3, 1, 1, 1))
    return velocity


def exponentiate(velocity: np.ndarray) -> np.ndarray:
    """Displacement (3, z, y, x, mm) of the map exp(velocity), by scaling and squaring on the lattice."""
    displacement = velocity / (2 ** SQUARING_STEPS)
    index = np.indices(velocity.shape[1:], dtype=np.float32)
    for _ in range(SQUARING_STEPS):
        # u <- u + u o (id + u); the lattice index of x + u(x) is index + u / spacing (u is x, y, z; index z, y, x).
        at = index + displacement[::-1] / LATTICE_MM
        displacement = displacement + np.stack([ndimage.map_coordinates(c, at, order=1, mode="nearest")
                                                for c in displacement])
    return displacement


def displacement_transform(displacement: np.ndarray, origin_mm: np.ndarray) -> sitk.Transform:
    """A SimpleITK transform x -> x + u(x) from a lattice displacement (3, z, y, x, mm)."""
    field = sitk.GetImageFromArray(np.moveaxis(displacement, 0, -1).astype(np.float64), isVector=True)
    field.SetSpacing((LATTICE_MM,) * 3)
    field.SetOrigin([float(v) for v in origin_mm])
    return sitk.DisplacementFieldTransform(field)


# ---------------------------------------------------------------------------------------
# Densities
# ---------------------------------------------------------------------------------------


@dataclass(frozen=True)
class TissueDensities:
    """HU of one case's tissues (means; the image adds texture, a bias field and noise)."""

    grey: float
    white: float
    csf: float
    bone_peak: float
    soft_offset: float                    # HU added to the template's soft tissue
    region_offsets: tuple[float, ...]     # HU added to the parenchyma of regions 1..10
    bias_hu: float                        # SD of the smooth bias field
    texture_hu: float                     # SD of the fine parenchymal texture

    @classmethod
    def draw(cls, rng: np.random.Generator) -> "TissueDensities":
        grey = float(rng.uniform(30.0, 42.0))
        return cls(grey=grey, white=grey - float(rng.uniform(4.0, 10.0)), csf=float(rng.uniform(0.0, 12.0)),
                   bone_peak=float(rng.uniform(700.0, 1500.0)), soft_offset=float(rng.uniform(-8.0, 8.0)),
                   region_offsets=tuple(float(v) for v in rng.normal(0.0, 1.5, len(REGIONS))),
                   bias_hu=float(rng.uniform(0.0, 3.0)), texture_hu=float(rng.uniform(0.5, 2.5)))

    def to_dict(self) -> dict:
        return {"grey_hu": round(self.grey, 2), "white_hu": round(self.white, 2), "csf_hu": round(self.csf, 2),
                "bone_peak_hu": round(self.bone_peak, 1), "soft_tissue_offset_hu": round(self.soft_offset, 2),
                "region_offsets_hu": [round(v, 2) for v in self.region_offsets],
                "bias_field_sd_hu": round(self.bias_hu, 2), "texture_sd_hu": round(self.texture_hu, 2)}


# ---------------------------------------------------------------------------------------
# One case
# ---------------------------------------------------------------------------------------


@dataclass
class CanonicalHead:
    """One case on the canonical grid before the global scale and the pose.

    Attributes:
        hu: float32 HU (z, y, x).
        labels: uint8 region labels (z, y, x) by the node's definition of a region's volume
            (:func:`inference.volumes.countable_labels` of the territories).
        territory: uint8 (z, y, x) every intracranial voxel's region (CSF included).
        intracranial: bool (z, y, x).
        head: bool (z, y, x), everything not air outside the body.
        origin_mm: (x, y, z) of voxel (0, 0, 0).
        meta: the drawn parameters (JSON-able).
    """

    hu: np.ndarray
    labels: np.ndarray
    territory: np.ndarray
    intracranial: np.ndarray
    head: np.ndarray
    origin_mm: np.ndarray
    meta: dict

    def image(self, array: np.ndarray) -> sitk.Image:
        """``array`` (z, y, x) as an image on the canonical grid."""
        return grid_image(array, self.origin_mm)


def _warp_labels(base: AtlasAnatomy, labels: np.ndarray, transform: sitk.Transform) -> np.ndarray:
    """A label map warped (nearest neighbour)."""
    image = base.image(labels)
    return sitk.GetArrayFromImage(sitk.Resample(image, image, transform, sitk.sitkNearestNeighbor, 0))


def _warp_maps(base: AtlasAnatomy, arrays: list[np.ndarray], transform: sitk.Transform) -> list[np.ndarray]:
    """Float maps warped (linear) in one pass: the displacement field is evaluated once per voxel, not per map."""
    stacked = sitk.Compose([base.image(a.astype(np.float32)) for a in arrays])
    warped = sitk.GetArrayFromImage(sitk.Resample(stacked, stacked, transform, sitk.sitkLinear, 0.0))
    return [np.ascontiguousarray(warped[..., index]) for index in range(len(arrays))]


def _smooth_scalar(rng: np.random.Generator, shape: tuple[int, ...], correlation_mm: float, factor: int = 2) -> np.ndarray:
    """Unit-SD smooth scalar field on the 1 mm grid, made on a ``factor`` times coarser grid (interpolated linearly)."""
    coarse_shape = tuple(int(math.ceil(n / factor)) + 1 for n in shape)
    coarse = ndimage.gaussian_filter(rng.standard_normal(coarse_shape).astype(np.float32), correlation_mm / factor)
    coarse_image = sitk.GetImageFromArray(coarse)
    coarse_image.SetSpacing((float(factor),) * 3)
    reference = sitk.Image([int(n) for n in shape[::-1]], sitk.sitkFloat32)
    field = sitk.GetArrayFromImage(sitk.Resample(coarse_image, reference, sitk.Transform(), sitk.sitkLinear, 0.0))
    field -= field.mean()
    return field / max(float(field.std()), 1e-6)


#: The regional scaling is fitted on a grid this many times coarser (only counts are needed).
FIT_FACTOR = 2


def _parenchyma_counts(coarse_regions: sitk.Image, coarse_tissue: sitk.Image, transform: sitk.Transform) -> np.ndarray:
    regions = sitk.GetArrayFromImage(sitk.Resample(coarse_regions, coarse_regions, transform, sitk.sitkNearestNeighbor, 0))
    tissue = sitk.GetArrayFromImage(sitk.Resample(coarse_tissue, coarse_tissue, transform, sitk.sitkLinear, 0.0))
    return np.bincount(regions[tissue > 0].ravel(), minlength=len(REGIONS) + 1)[1:].astype(float)


def _coarse(array: np.ndarray) -> np.ndarray:
    return array[::FIT_FACTOR, ::FIT_FACTOR, ::FIT_FACTOR]


def _fit_region_scales(base: AtlasAnatomy, shares: np.ndarray, base_velocity: np.ndarray,
                       lattice_regions: np.ndarray, xyz: np.ndarray, log_scales: np.ndarray,
                       iterations: int = 6) -> tuple[sitk.Transform, np.ndarray]:
    """The deformation whose regional shares of the parenchyma approach ``shares`` (10,), by a few fixed-point
    steps from ``log_scales`` (10,)."""
    log_scales = np.asarray(log_scales, dtype=float).copy()
    limit = np.array([math.log(MAX_BRAINSTEM_SCALE if region.key == "brainstem" else MAX_REGION_SCALE)
                      for region in REGIONS])
    # Subsampled before the sum: the same values as summing first, an eighth of the work.
    spacing = SPACING_MM * FIT_FACTOR
    coarse_regions = grid_image(_coarse(base.regions), base.origin_mm, spacing)
    coarse_tissue = grid_image(_coarse(base.grey) + _coarse(base.white) - _coarse(base.csf), base.origin_mm, spacing)
    for iteration in range(iterations + 1):
        velocity = base_velocity + region_scaling_velocity(
            lattice_regions, xyz, {region.value: float(s) for region, s in zip(REGIONS, log_scales)})
        transform = displacement_transform(exponentiate(velocity), base.origin_mm)
        if iteration == iterations:
            break
        counts = _parenchyma_counts(coarse_regions, coarse_tissue, transform)
        measured = counts / counts.sum()
        log_scales = np.clip(log_scales + 0.9 * np.log(shares / np.maximum(measured, 1e-9)) / 3.0, -limit, limit)
    return transform, log_scales


def _sulci(rng: np.random.Generator, grey: np.ndarray, white: np.ndarray, fraction: float) -> np.ndarray:
    """Share of every voxel's grey matter turned into sulcal CSF (0..1): ``fraction`` of the cortical ribbon."""
    field = _smooth_scalar(rng, grey.shape, correlation_mm=float(rng.uniform(1.5, 2.5)))
    threshold = float(np.quantile(field[::4, ::4, ::4], 1.0 - fraction))
    return _cortical_ribbon(grey, white) * np.clip((field - threshold) / 0.3, 0.0, 1.0)


def _cortical_ribbon(grey: np.ndarray, white: np.ndarray) -> np.ndarray:
    """How much each voxel is cortex (0..1): much grey matter, little white."""
    return np.clip((grey - 0.3) / 0.4, 0.0, 1.0) * np.clip(1.0 - white / 0.3, 0.0, 1.0)


def _toddler_csf(grey: np.ndarray, white: np.ndarray, csf: np.ndarray, intracranial: np.ndarray,
                 csf_share: float) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Tissue maps summing to 1 inside the skull, with the template's CSF in the brain reduced to ``csf_share``.

    The template's adults have wider sulci and more extra-axial CSF than a toddler: where
    the maps see brain, CSF is scaled down and grey and white matter take its place; where
    they see none (ventricles, cisterns), everything left is CSF (the dura is not modelled).
    """
    brain = grey + white
    brainish = brain > 0.05
    reduced = np.where(brainish, np.minimum(csf, 1.0 - brain) * csf_share, np.maximum(1.0 - brain, 0.0))
    scale = np.where(brainish, (1.0 - reduced) / np.maximum(brain, 1e-6), 1.0)
    maps = (grey * scale, white * scale, reduced)
    return tuple(np.where(intracranial, m, 0.0).astype(np.float32) for m in maps)


@dataclass(frozen=True)
class CsfParameters:
    """How much CSF one case has, from a toddler's tight sulci to atrophy and hydrocephalus.

    Attributes:
        csf_share: share of the template's CSF kept where the maps see brain.
        sulcal_fraction: share of the cortical ribbon cut into random sulci.
        ventricle_log_scale: log of the linear scaling of the ventricles (volume x exp(3 s)).
        extra_axial_mm: depth below the inner table turned from brain into CSF (0: none).
        seed: seed of the sulci's, bias field's and texture's random fields.
    """

    csf_share: float
    sulcal_fraction: float
    ventricle_log_scale: float
    extra_axial_mm: float
    seed: int

    @classmethod
    def draw(cls, rng: np.random.Generator) -> "CsfParameters":
        ventricles = rng.uniform(*ENLARGED_VENTRICLES) if rng.uniform() < ENLARGED_VENTRICLES_FRACTION \
            else rng.uniform(*VENTRICLE_VOLUME_FACTOR)
        extra_axial = rng.uniform(*WIDE_EXTRA_AXIAL_MM) if rng.uniform() < WIDE_EXTRA_AXIAL_FRACTION else 0.0
        return cls(csf_share=float(rng.uniform(*CSF_SHARE)), sulcal_fraction=float(rng.uniform(*SULCAL_FRACTION)),
                   ventricle_log_scale=float(math.log(ventricles) / 3.0), extra_axial_mm=float(extra_axial),
                   seed=int(rng.integers(2 ** 62)))


def make_canonical_head(rng: np.random.Generator, shares: np.ndarray, densities: TissueDensities,
                        texture_rng: np.random.Generator) -> CanonicalHead:
    """One deformed child's head on the canonical 1 mm grid (before the global scale and the pose).

    The regional scaling is fitted twice: once on the template's tissue (fast, on a 2 mm
    grid), then corrected by the shares the finished head's labels have under the node's
    definition of a region's volume, so each region lands within a few % of its drawn share.

    Args:
        rng: the deformation's generator (a held-out case's seed gives a deformation no training case has).
        shares: the drawn regional shares of the parenchyma (10, sums to 1), in region order.
        densities: the case's tissue HU.
        texture_rng: generator of the CSF parameters, the sulci, the bias field and the texture.
    """
    base = atlas_anatomy()
    parameters = DeformationParameters.draw(rng)
    csf_parameters = CsfParameters.draw(texture_rng)
    lattice_shape, xyz = _lattice_points(base.shape, base.origin_mm)
    x, y = xyz[0], xyz[1]
    velocity = parameters.large_mm * _random_field(rng, lattice_shape, 24.0)
    velocity += parameters.medium_mm * _random_field(rng, lattice_shape, 8.0)
    # Asymmetry: one hemisphere wider than the other, more in front or behind (petalia).
    smooth_abs_x = np.sqrt(x * x + 25.0)
    velocity[0] -= smooth_abs_x * (parameters.asymmetry + parameters.petalia * np.tanh(y / 30.0))
    velocity += _ventricle_velocity(base, lattice_shape, xyz, csf_parameters.ventricle_log_scale)
    lattice_regions = _lattice_sample(base.regions, lattice_shape)
    # The fit's own measure (the template's tissue) differs from the finished labels' (the node's
    # definition, after this case's CSF) by a few % per region: each correction aims the next fit
    # past that bias, first as estimated on the fitting grid, last as measured on a finished head.
    fit_shares, log_scales = shares, np.zeros(len(REGIONS))
    for corrections in range(COARSE_SHARE_CORRECTIONS + 2):
        transform, log_scales = _fit_region_scales(base, fit_shares, velocity, lattice_regions, xyz, log_scales)
        if corrections < COARSE_SHARE_CORRECTIONS:
            measured = _coarse_definition_shares(base, transform, csf_parameters, densities)
        else:
            head = _tissue_head(base, transform, csf_parameters, densities)
            if corrections == COARSE_SHARE_CORRECTIONS + 1:
                break
            counts = np.bincount(head.labels.ravel(), minlength=len(REGIONS) + 1)[1:].astype(float)
            measured = counts / max(counts.sum(), 1.0)
        fit_shares = fit_shares * shares / np.maximum(measured, 1e-9)
        fit_shares = fit_shares / fit_shares.sum()
    head.meta = {"deformation": {"large_mm": round(parameters.large_mm, 3), "medium_mm": round(parameters.medium_mm, 3),
                                 "asymmetry": round(parameters.asymmetry, 4), "petalia": round(parameters.petalia, 4),
                                 "region_log_scales": [round(float(v), 4) for v in log_scales]},
                 "csf": {"csf_share": round(csf_parameters.csf_share, 3),
                         "sulcal_fraction": round(csf_parameters.sulcal_fraction, 3),
                         "ventricle_volume_factor": round(math.exp(3 * csf_parameters.ventricle_log_scale), 3),
                         "extra_axial_mm": round(csf_parameters.extra_axial_mm, 2)},
                 "densities": densities.to_dict(), **head.meta}
    return head


def _ventricle_velocity(base: AtlasAnatomy, lattice_shape: tuple[int, ...], xyz: np.ndarray,
                        log_scale: float) -> np.ndarray:
    """Velocity (3, z, y, x) that scales the ventricles (deep CSF of the template) about their centroid."""
    if log_scale == 0.0:
        return np.zeros_like(xyz)
    indicator = _lattice_sample(_ventricles().astype(np.uint8), lattice_shape).astype(np.float32)
    weight = np.clip(ndimage.gaussian_filter(indicator, 6.0 / LATTICE_MM) * 3.0, 0.0, 1.0)
    centre = (xyz * indicator).sum(axis=(1, 2, 3)) / max(float(indicator.sum()), 1.0)
    return -weight * log_scale * (xyz - centre.reshape(3, 1, 1, 1))


@lru_cache(maxsize=1)
def _ventricles() -> np.ndarray:
    """The template's ventricles: CSF more than VENTRICLE_DEPTH_MM inside the intracranial space (cached)."""
    base = atlas_anatomy()
    inside = base.intracranial > 0.5
    depth = ndimage.distance_transform_edt(inside[::2, ::2, ::2]) * 2 * SPACING_MM
    deep = np.repeat(np.repeat(np.repeat(depth, 2, 0), 2, 1), 2, 2)[tuple(slice(0, n) for n in inside.shape)]
    return (base.csf > 0.5) & (deep > VENTRICLE_DEPTH_MM)


def _coarse_definition_shares(base: AtlasAnatomy, transform: sitk.Transform, csf_parameters: CsfParameters,
                              densities: TissueDensities) -> np.ndarray:
    """Regional shares (10,) the finished head would have, estimated on the 2 mm fitting grid.

    As :func:`_tissue_head` but coarse, without skull, bias field or texture, and with the
    sulci's expected effect (their share of the cortical ribbon) instead of drawn sulci.
    """
    spacing = SPACING_MM * FIT_FACTOR
    maps = [_coarse(m).astype(np.float32) for m in (base.grey, base.white, base.csf, base.intracranial)]
    stacked = sitk.Compose([grid_image(m, base.origin_mm, spacing) for m in maps])
    warped = sitk.GetArrayFromImage(sitk.Resample(stacked, stacked, transform, sitk.sitkLinear, 0.0))
    grey, white, csf, intracranial = (np.ascontiguousarray(warped[..., i]) for i in range(4))
    intracranial = intracranial > 0.5
    regions_image = grid_image(_coarse(base.regions), base.origin_mm, spacing)
    regions = sitk.GetArrayFromImage(sitk.Resample(regions_image, regions_image, transform, sitk.sitkNearestNeighbor, 0))
    grey, white, csf = _toddler_csf(grey, white, csf, intracranial, csf_parameters.csf_share)
    sulcal = csf_parameters.sulcal_fraction * _cortical_ribbon(grey, white)
    csf, grey = csf + grey * sulcal, grey * (1.0 - sulcal)
    if csf_parameters.extra_axial_mm > 0:
        grey, white, csf = _widen_extra_axial(grey, white, csf, intracranial, csf_parameters.extra_axial_mm, spacing)
    hu = grey * densities.grey + white * densities.white + csf * densities.csf
    territory = np.where(intracranial, regions, 0).astype(np.uint8)
    labels = countable_labels(territory, hu, (spacing,) * 3, parenchyma_threshold_hu(hu[intracranial]))
    counts = np.bincount(labels.ravel(), minlength=len(REGIONS) + 1)[1:].astype(float)
    return counts / max(counts.sum(), 1.0)


def _tissue_head(base: AtlasAnatomy, transform: sitk.Transform, csf_parameters: CsfParameters,
                 densities: TissueDensities) -> CanonicalHead:
    """The warped anatomy with this case's CSF and densities; labels by the node's definition of a region's volume."""
    texture_rng = np.random.default_rng(csf_parameters.seed)
    grey, white, csf, intracranial, template, outside_mm = _warp_maps(
        base, [base.grey, base.white, base.csf, base.intracranial, base.template, base.outside_mm], transform)
    intracranial = intracranial > 0.5
    regions = _warp_labels(base, base.regions, transform)

    grey, white, csf = _toddler_csf(grey, white, csf, intracranial, csf_parameters.csf_share)
    sulcal = _sulci(texture_rng, grey, white, csf_parameters.sulcal_fraction)
    csf = csf + grey * sulcal
    grey = grey * (1.0 - sulcal)
    if csf_parameters.extra_axial_mm > 0:
        grey, white, csf = _widen_extra_axial(grey, white, csf, intracranial, csf_parameters.extra_axial_mm)

    territory = np.where(intracranial, regions, 0).astype(np.uint8)
    hu, head, skull_level, skin_level = _head_hu(texture_rng, densities, grey, white, csf, intracranial, territory,
                                                 template, outside_mm)
    # The truth is counted by the node's own definition of a region's volume, on the
    # image before acquisition (no blur, no noise): parenchyma-density voxels of a territory.
    threshold = parenchyma_threshold_hu(hu[intracranial])
    labels = countable_labels(territory, hu, (SPACING_MM,) * 3, threshold)
    meta = {"parenchyma_threshold_hu": round(threshold, 2),
            "template_bone_level": round(skull_level, 1), "template_skin_level": round(skin_level, 1)}
    return CanonicalHead(hu=hu, labels=labels, territory=territory, intracranial=intracranial, head=head,
                         origin_mm=base.origin_mm, meta=meta)


def _widen_extra_axial(grey: np.ndarray, white: np.ndarray, csf: np.ndarray, intracranial: np.ndarray,
                       depth_mm: float, spacing_mm: float = SPACING_MM) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Brain within ``depth_mm`` of the inner table turned into CSF (atrophy, wide subarachnoid spaces)."""
    image = sitk.GetImageFromArray(intracranial.astype(np.uint8))
    image.SetSpacing((spacing_mm,) * 3)
    depth = -sitk.GetArrayFromImage(sitk.SignedMaurerDistanceMap(image, insideIsPositive=False, squaredDistance=False,
                                                                 useImageSpacing=True))
    share = np.clip((depth_mm - depth) / spacing_mm + 0.5, 0.0, 1.0) * intracranial
    return grey * (1 - share), white * (1 - share), csf + (grey + white) * share


def _lattice_sample(regions: np.ndarray, lattice_shape: tuple[int, ...]) -> np.ndarray:
    """Region of the grid voxel at every lattice node (nearest)."""
    step = int(round(LATTICE_MM / SPACING_MM))
    sampled = regions[::step, ::step, ::step]
    out = np.zeros(lattice_shape, np.uint8)
    out[tuple(slice(0, n) for n in sampled.shape)] = sampled
    return out


def template_hu(cormack: np.ndarray) -> np.ndarray:
    """Approximate HU of the template's Cormack units below bone.

    Rorden's units stretch -100..100 HU ten-fold; the two anchors are read off the template
    itself: its grey matter (2604 units) is taken as 40 HU, and air is 0 units. Bone is
    not converted (the phantom draws its own bone density).
    """
    stretched = (cormack - 2204.0) / 10.0
    dark = -1000.0 + cormack * (900.0 / 1204.0)
    return np.where(cormack < 1204.0, dark, np.minimum(stretched, 100.0)).astype(np.float32)


def _head_hu(rng: np.random.Generator, d: TissueDensities, grey: np.ndarray, white: np.ndarray, csf: np.ndarray,
             intracranial: np.ndarray, territory: np.ndarray, template: np.ndarray, outside_mm: np.ndarray
             ) -> tuple[np.ndarray, np.ndarray, float, float]:
    """HU on the canonical grid: brain by partial volume of the tissues; scalp, face and skull from the template."""
    offsets = np.array((0.0, *d.region_offsets), np.float32)[territory]
    bias = d.bias_hu * _smooth_scalar(rng, grey.shape, correlation_mm=40.0, factor=4)
    texture = d.texture_hu * _smooth_scalar(rng, grey.shape, correlation_mm=0.7, factor=1)
    brain = grey * d.grey + white * d.white + csf * d.csf + (grey + white) * offsets + bias + texture

    skin_level = float(rng.uniform(*SKIN_LEVEL_HU))
    bone_level = float(rng.uniform(*TEMPLATE_BONE_LEVEL))
    shell_mm = float(rng.uniform(*SHELL_MM))
    soft = template_hu(template)
    head = (soft > skin_level) | intracranial
    template_bone = template > bone_level
    shell = ~intracranial & (outside_mm > 0) & (outside_mm < shell_mm)
    bone = ~intracranial & (template_bone | shell)
    bone_share = np.where(template_bone, np.clip((template - bone_level) / (TEMPLATE_BONE_TOP - bone_level), 0.0, 1.0),
                          1.0)
    # Where the template calls the shell bone too, its bone just above the drawn level has a
    # share near 0 (~40 HU): the shell had holes there. It is at least SHELL_BONE_SHARE.
    bone_share = np.where(shell, np.maximum(bone_share, SHELL_BONE_SHARE), bone_share)
    hu = np.full(grey.shape, -1000.0, np.float32)
    tissue = head & ~intracranial
    hu[tissue] = (np.maximum(soft, -1000.0) + np.where(soft > -200.0, d.soft_offset + texture, 0.0))[tissue]
    hu[bone] = (d.soft_offset + 40.0 + (d.bone_peak - 40.0) * np.sqrt(bone_share))[bone]
    hu[intracranial] = brain[intracranial]
    return hu, head, bone_level, skin_level
