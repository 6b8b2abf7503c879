"""Small CT studies and label maps for the output-writer tests (SEG, SR, PDF, pipeline).

``write_ct_series`` writes a tiny head-like CT series with pydicom (real CT
Image Storage files, as a scanner would send); ``region_labels`` makes a
label map of the 10 regions on that grid, so tests know the exact truth.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import pydicom
from pydicom.dataset import FileDataset, FileMetaDataset
from pydicom.uid import CTImageStorage, ExplicitVRLittleEndian, generate_uid

from inference.vocabulary import REGIONS

if TYPE_CHECKING:
    import SimpleITK as sitk

PATIENT = {"PatientName": "Test^Child", "PatientID": "LV-TEST-0001", "PatientBirthDate": "20220310",
           "PatientSex": "F"}


def region_labels(shape: tuple[int, int, int]) -> np.ndarray:
    """uint8 (z, y, x) label map: an ellipsoid 'brain' cut into the 10 regions.

    Right = low x (patient right is image left in LPS), anterior = low y.
    Lobes fill the upper part, cerebellum and brainstem the lower part.
    """
    nz, ny, nx = shape
    z, y, x = np.meshgrid(
        np.linspace(-1, 1, nz), np.linspace(-1, 1, ny), np.linspace(-1, 1, nx), indexing="ij"
    )
    inside = x ** 2 / 0.8 ** 2 + y ** 2 / 0.85 ** 2 + z ** 2 / 0.95 ** 2 <= 1.0
    labels = np.zeros(shape, np.uint8)
    left = x > 0
    upper = z > -0.3
    # Lobes along the anterior-posterior axis: frontal, parietal (top) / temporal (side), occipital.
    frontal = y < -0.2
    occipital = y > 0.45
    temporal = ~frontal & ~occipital & (np.abs(x) > 0.45)
    parietal = ~frontal & ~occipital & ~temporal
    for mask, right_value in ((frontal, 1), (parietal, 3), (occipital, 5), (temporal, 7)):
        labels[inside & upper & mask & ~left] = right_value
        labels[inside & upper & mask & left] = right_value + 1
    lower = inside & ~upper
    labels[lower & (np.abs(x) < 0.2) & (y < 0.2)] = 10  # brainstem
    labels[lower & (labels == 0)] = 9  # cerebellum
    return labels


def write_ct_series(
    folder: Path,
    labels: np.ndarray,
    *,
    pixel_spacing_mm: float = 4.0,
    slice_spacing_mm: float = 5.0,
    study_uid: str | None = None,
    series_number: int = 2,
    patient: dict | None = None,
) -> list[Path]:
    """Write one axial CT series whose HU values follow ``labels`` (z, y, x).

    Brain tissue about 30 HU, CSF-like background 5 HU, a 1-voxel skull ring
    of 1000 HU, air outside. Files are named ``IM<n>.dcm`` in ``folder``.
    """
    folder.mkdir(parents=True, exist_ok=True)
    nz, ny, nx = labels.shape
    study_uid = study_uid or generate_uid()
    series_uid, frame_uid = generate_uid(), generate_uid()
    hu = np.where(labels > 0, 28 + labels.astype(np.int16), -1000).astype(np.int16)
    # The skull: one voxel around the brain (the model's preprocessing finds the head by it).
    from scipy import ndimage
    brain = labels > 0
    hu[ndimage.binary_dilation(brain) & ~brain] = 1000
    rng = np.random.default_rng(0)
    hu = (hu + rng.normal(0, 3, hu.shape)).astype(np.int16)
    paths = []
    for index in range(nz):
        ds = _ct_header(index, study_uid, series_uid, frame_uid, series_number, patient or PATIENT)
        ds.Rows, ds.Columns = ny, nx
        ds.PixelSpacing = [pixel_spacing_mm, pixel_spacing_mm]
        ds.SliceThickness = slice_spacing_mm
        origin = (-nx * pixel_spacing_mm / 2, -ny * pixel_spacing_mm / 2, -nz * slice_spacing_mm / 2)
        ds.ImagePositionPatient = [origin[0], origin[1], origin[2] + index * slice_spacing_mm]
        ds.SliceLocation = ds.ImagePositionPatient[2]
        ds.PixelData = (hu[index] + 1024).astype(np.uint16).tobytes()
        path = folder / f"IM{index + 1}.dcm"
        ds.save_as(path, enforce_file_format=True)
        paths.append(path)
    return paths


def _ct_header(index: int, study_uid: str, series_uid: str, frame_uid: str, series_number: int,
               patient: dict) -> FileDataset:
    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = CTImageStorage
    meta.MediaStorageSOPInstanceUID = generate_uid()
    meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds = FileDataset("", {}, file_meta=meta, preamble=b"\0" * 128)
    ds.SOPClassUID, ds.SOPInstanceUID = CTImageStorage, meta.MediaStorageSOPInstanceUID
    for keyword, value in patient.items():
        setattr(ds, keyword, value)
    ds.StudyInstanceUID, ds.SeriesInstanceUID, ds.FrameOfReferenceUID = study_uid, series_uid, frame_uid
    ds.StudyDate, ds.StudyTime, ds.StudyID, ds.AccessionNumber = "20240915", "101500", "1", "ACC0001"
    ds.ReferringPhysicianName = ""
    ds.Modality, ds.Manufacturer, ds.SeriesNumber = "CT", "TestVendor", series_number
    ds.SeriesDescription = "HEAD 5MM STD"
    ds.BodyPartExamined = "HEAD"
    ds.PositionReferenceIndicator = ""
    ds.ImageType = ["ORIGINAL", "PRIMARY", "AXIAL"]
    ds.InstanceNumber, ds.AcquisitionNumber = index + 1, 1
    ds.ImageOrientationPatient = [1, 0, 0, 0, 1, 0]
    ds.PatientPosition = "HFS"
    ds.KVP = 120
    ds.SamplesPerPixel, ds.PhotometricInterpretation = 1, "MONOCHROME2"
    ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 16, 16, 15, 0
    ds.RescaleIntercept, ds.RescaleSlope, ds.RescaleType = -1024, 1, "HU"
    ds.WindowCenter, ds.WindowWidth = 40, 80
    return ds


def read_headers(paths: list[Path]) -> list[pydicom.Dataset]:
    """Source datasets sorted along z, without pixel data."""
    datasets = [pydicom.dcmread(p, stop_before_pixels=True) for p in paths]
    return sorted(datasets, key=lambda ds: float(ds.ImagePositionPatient[2]))


def region_voxel_volumes_cm3(labels: np.ndarray, voxel_mm3: float) -> dict[str, float]:
    """True volume per region key of a label map with isotropic-known voxel size."""
    return {r.key: float((labels == r.value).sum() * voxel_mm3 / 1000.0) for r in REGIONS}


def hand_made_normative(volumes_cm3: dict[str, float], *, with_z: bool = True):
    """A NormativeResult built by hand (whole-cohort style means and SDs).

    Uses normative.compare's dataclasses when that module exists; the
    numbers are those of Xi et al. 2025 for the means and SDs, scaled to
    the given volumes so that some regions are flagged.
    """
    AsymmetryResult, NormativeResult, ReferenceInfo, RegionResult = _normative_types()
    from inference.vocabulary import LOBE_PAIRS
    from math import erf, sqrt

    def region_result(key: str, volume: float) -> RegionResult:
        if not with_z:
            return RegionResult(key, volume, None, None, None, None, None)
        mean, sd = volume * 1.1, volume * 0.05 + 0.1
        z = (volume - mean) / sd
        flag = "below" if z < -2 else "above" if z > 2 else "within"
        return RegionResult(key, volume, mean, sd, z, 50 * (1 + erf(z / sqrt(2))), flag)

    regions = tuple(region_result(r.key, volumes_cm3[r.key]) for r in REGIONS)
    total = region_result("total", sum(volumes_cm3.values()))
    asymmetry = tuple(
        AsymmetryResult(s, rk, lk, (volumes_cm3[lk] - volumes_cm3[rk]) / ((volumes_cm3[lk] + volumes_cm3[rk]) / 2),
                        0.0 if with_z else None, 0.05 if with_z else None, 0.4 if with_z else None,
                        65.5 if with_z else None, "within" if with_z else None)
        for s, rk, lk in LOBE_PAIRS
    )
    reference = ReferenceInfo("Xi2025", "1.0", "Xi F et al. Front Neurol 2025;16:1573060",
                              "healthy children, one Chinese centre", 1487, (1.5, 2.5), "whole-cohort")
    notes = () if with_z else ("no z-scores because the patient's age is unknown",)
    return NormativeResult(regions, total, asymmetry, reference, "F" if with_z else None,
                           2.5 if with_z else None, 2.0, with_z, notes)


def _normative_types():
    """normative.compare's result types; field-for-field stand-ins until that module lands."""
    try:
        from normative.compare import AsymmetryResult, NormativeResult, ReferenceInfo, RegionResult
        return AsymmetryResult, NormativeResult, ReferenceInfo, RegionResult
    except ImportError:
        from collections import namedtuple
        return (
            namedtuple("AsymmetryResult", "structure right_key left_key index reference_mean reference_sd "
                       "z_score percentile flag"),
            namedtuple("NormativeResult", "regions total asymmetry reference sex age_years z_threshold "
                       "applicable notes"),
            namedtuple("ReferenceInfo", "name version citation population n age_range_years kind"),
            namedtuple("RegionResult", "key volume_cm3 reference_mean_cm3 reference_sd_cm3 z_score percentile flag"),
        )


@dataclass
class StandInVolume:
    """The parts of node.dicom.volume.SeriesVolume the writers use, for an axial untilted series."""

    image: "sitk.Image"
    datasets: list
    tilt_deg: float = 0.0
    notes: list = field(default_factory=list)

    def labels_on_source_slices(self, labels) -> np.ndarray:
        import SimpleITK as sitk
        return sitk.GetArrayFromImage(labels).astype(np.uint8)


def ct_volume(paths: list[Path]):
    """The series volume of files written by ``write_ct_series``."""
    import SimpleITK as sitk
    datasets = read_headers(paths)
    full = sorted((pydicom.dcmread(p) for p in paths), key=lambda ds: float(ds.ImagePositionPatient[2]))
    array = np.stack([ds.pixel_array * float(ds.RescaleSlope) + float(ds.RescaleIntercept) for ds in full])
    image = sitk.GetImageFromArray(array.astype(np.float32))
    spacing = float(datasets[0].PixelSpacing[0])
    image.SetSpacing((spacing, float(datasets[0].PixelSpacing[1]),
                      float(datasets[1].ImagePositionPatient[2]) - float(datasets[0].ImagePositionPatient[2])))
    image.SetOrigin(tuple(float(v) for v in datasets[0].ImagePositionPatient))
    return StandInVolume(image, datasets)


MODEL = {"name": "resunet333_phantom", "architecture": "resunet", "kernel_size": (3, 3, 3),
         "spacing_mm": (1.0, 1.0, 1.0), "weights_sha256": "ab" * 32, "code_version": "0.1.0",
         "trained_on": "synthetic phantoms"}


class PartitionSegmenter:
    """A stand-in for ``inference.predict.Segmenter`` that needs no model.

    It labels soft-tissue voxels (0..80 HU, brain-like) by their position
    around the head's centre: lobes above, cerebellum and brainstem below.
    Geometry, not anatomy: it lets the output tests run on any CT (real
    scanner samples included) without depending on a trained network.
    """

    def segment(self, image):
        import SimpleITK as sitk
        from inference.predict import Segmentation, measure_volumes

        hu = sitk.GetArrayFromImage(image)
        tissue = (hu > 0) & (hu < 80)
        if not tissue.any():
            raise ValueError("no soft tissue in the image")
        labels = region_labels(hu.shape)
        labels[~tissue] = 0
        label_image = sitk.GetImageFromArray(labels)
        label_image.CopyInformation(image)
        return Segmentation(labels=label_image, volumes_cm3=measure_volumes(label_image), model=dict(MODEL),
                            timings_s={"total": 0.0})
