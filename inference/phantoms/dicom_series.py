"""Write a phantom as a CT Image Storage series, one file per slice, as a scanner would.

The series carries full Patient, General Study, Patient Study, General Series,
Frame of Reference, General Equipment, General Acquisition, General Image, Image
Plane, Image Pixel, CT Image, VOI LUT and SOP Common modules. Patient sex, birth
date, study date and age agree with the phantom's meta. A tilted phantom is written
as real tilted CT is: the tilted ImageOrientationPatient and one
ImagePositionPatient per slice from the meta (the table moves along z, so the
slices form a sheared stack), with GantryDetectorTilt.

UIDs are derived from the phantom's seed and geometry, so the same phantom written
twice gives the same files; the study UID depends on the seed only (one child = one
study, whatever the reconstruction).
"""
from __future__ import annotations

import datetime as dt
import hashlib
from pathlib import Path
from typing import Optional

import numpy as np
import pydicom
import SimpleITK as sitk
from pydicom.dataset import FileMetaDataset
from pydicom.uid import CTImageStorage, ExplicitVRLittleEndian

MANUFACTURER = "lobevol phantom"
MODEL_NAME = "synthetic head CT"
WINDOW_CENTER_HU = 30
WINDOW_WIDTH_HU = 100
HU_RANGE = (-1024, 3071)

#: Meta keys the writer needs (what inference.phantoms.generator.make_phantom records).
REQUIRED_META = ("seed", "sex", "birth_date", "study_date", "slice_thickness_mm", "pixel_spacing_mm", "tilt_deg")


def _uid(*parts) -> str:
    """A deterministic UID from the given parts: the 2.25 (UUID-derived) root and a 128-bit hash."""
    digest = hashlib.sha256("\x1f".join(["lobevol phantom"] + [str(p) for p in parts]).encode()).digest()
    return f"2.25.{int.from_bytes(digest[:16], 'big')}"


def _age_string(birth: dt.date, study: dt.date) -> str:
    """DICOM PatientAge for a toddler, in whole months ("025M"); days under one month."""
    months = (study.year - birth.year) * 12 + (study.month - birth.month) - (study.day < birth.day)
    if months < 1:
        return f"{(study - birth).days:03d}D"
    if months > 999:
        raise ValueError(f"age of {months} months does not fit PatientAge")
    return f"{months:03d}M"


def _date(text: str, what: str) -> dt.date:
    try:
        return dt.datetime.strptime(str(text), "%Y%m%d").date()
    except ValueError as error:
        raise ValueError(f"phantom meta {what} {text!r} is not a YYYYMMDD date") from error


def _check_phantom(phantom) -> None:
    missing = [key for key in REQUIRED_META if key not in phantom.meta]
    if missing:
        raise ValueError(f"phantom meta lacks {', '.join(missing)}; make it with inference.phantoms.generator.make_phantom")
    if phantom.image.GetPixelID() != sitk.sitkInt16:
        raise ValueError(f"phantom image must be Int16 HU, got {phantom.image.GetPixelIDTypeAsString()}")
    if phantom.image.GetDimension() != 3:
        raise ValueError(f"phantom image must be 3D, got {phantom.image.GetDimension()}D")
    if phantom.meta["sex"] not in ("M", "F"):
        raise ValueError(f"phantom meta sex must be 'M' or 'F', got {phantom.meta['sex']!r}")


def _planes(phantom) -> tuple[list[float], list[list[float]]]:
    """ImageOrientationPatient and the ImagePositionPatient of every slice."""
    meta, image = phantom.meta, phantom.image
    n_slices = image.GetSize()[2]
    if meta.get("tilt_deg", 0.0):
        orientation = [float(v) for v in meta["image_orientation_patient"]]
        positions = [[float(v) for v in p] for p in meta["image_position_patient"]]
        if len(positions) != n_slices:
            raise ValueError(f"meta has {len(positions)} slice positions for {n_slices} slices")
        return orientation, positions
    direction = np.array(image.GetDirection()).reshape(3, 3)
    orientation = [float(v) for v in (*direction[:, 0], *direction[:, 1])]
    positions = [[float(v) for v in image.TransformIndexToPhysicalPoint((0, 0, k))] for k in range(n_slices)]
    return orientation, positions


def _ds_number(value: float) -> str:
    """A DS string of at most 16 characters."""
    text = f"{value:.6f}".rstrip("0").rstrip(".")
    return text if len(text) <= 16 else f"{value:.8g}"


def write_ct_series(phantom, folder: Path | str, *, study_uid: Optional[str] = None, series_number: int = 2,
                    patient_name: Optional[str] = None, patient_id: Optional[str] = None,
                    accession: Optional[str] = None) -> list[Path]:
    """Write ``phantom`` as a CT Image Storage series into ``folder`` (created).

    Args:
        phantom: an :class:`inference.phantoms.generator.Phantom` (Int16 HU image and its meta).
        folder: where the files go, named ``CT000001.dcm``... in slice order (inferior first).
        study_uid: StudyInstanceUID; default derived from the seed.
        series_number: SeriesNumber (default 2, after a scanner's localizer as 1).
        patient_name: default "Phantom^NNNN" from the seed (synthetic, no real person).
        patient_id: default "PHANTOM-NNNNNN" from the seed.
        accession: AccessionNumber; default derived from the seed.

    Returns:
        The written paths, in slice order.

    Raises:
        ValueError: a phantom without the needed meta, a non-Int16 image, bad dates.
    """
    _check_phantom(phantom)
    meta = phantom.meta
    seed = int(meta["seed"])
    if not 0 <= series_number <= 99999:
        raise ValueError(f"series number must be 0-99999, got {series_number}")
    birth, study = _date(meta["birth_date"], "birth_date"), _date(meta["study_date"], "study_date")
    if birth > study:
        raise ValueError(f"birth date {meta['birth_date']} is after the study date {meta['study_date']}")
    orientation, positions = _planes(phantom)
    pixels = sitk.GetArrayViewFromImage(phantom.image)
    n_slices, rows, columns = pixels.shape
    thickness = float(meta["slice_thickness_mm"])
    spacing = phantom.image.GetSpacing()
    tilt = float(meta.get("tilt_deg", 0.0))

    geometry_key = (seed, rows, columns, n_slices, round(spacing[0], 4), round(thickness, 4), tilt, series_number)
    study_uid = study_uid or _uid("study", seed)
    series_uid = _uid("series", study_uid, *geometry_key)
    frame_uid = _uid("frame", series_uid)
    time_rng = np.random.default_rng([seed, 4])
    study_time = f"{int(time_rng.integers(7, 19)):02d}{int(time_rng.integers(0, 60)):02d}{int(time_rng.integers(0, 60)):02d}"

    common = pydicom.Dataset()
    common.SpecificCharacterSet = "ISO_IR 100"
    common.SOPClassUID = CTImageStorage
    common.InstanceCreationDate = study.strftime("%Y%m%d")
    common.InstanceCreationTime = study_time
    # Patient and study
    common.PatientName = patient_name or f"Phantom^{seed:04d}"
    common.PatientID = patient_id or f"PHANTOM-{seed:06d}"
    common.PatientBirthDate = birth.strftime("%Y%m%d")
    common.PatientSex = meta["sex"]
    common.PatientAge = _age_string(birth, study)
    common.StudyInstanceUID = study_uid
    common.StudyDate = study.strftime("%Y%m%d")
    common.StudyTime = study_time
    common.ReferringPhysicianName = ""
    common.StudyID = f"{seed % 100000:05d}"
    common.AccessionNumber = accession if accession is not None else f"PH{seed:08d}"[-16:]
    common.StudyDescription = "CT HEAD WO CONTRAST (SYNTHETIC PHANTOM)"
    # Series
    common.Modality = "CT"
    common.SeriesInstanceUID = series_uid
    common.SeriesNumber = series_number
    common.SeriesDate = common.StudyDate
    common.SeriesTime = study_time
    common.SeriesDescription = f"HEAD {thickness:g}MM STD"
    common.BodyPartExamined = "HEAD"
    common.PatientPosition = "HFS"
    common.FrameOfReferenceUID = frame_uid
    common.PositionReferenceIndicator = ""
    # Equipment
    common.Manufacturer = MANUFACTURER
    common.InstitutionName = "lobevol synthetic data"
    common.StationName = "PHANTOM"
    common.ManufacturerModelName = MODEL_NAME
    common.DeviceSerialNumber = "0"
    common.SoftwareVersions = "lobevol phantom 1"
    # Acquisition and CT image
    common.AcquisitionDate = common.StudyDate
    common.AcquisitionTime = study_time
    common.AcquisitionNumber = 1
    common.ContentDate = common.StudyDate
    common.ContentTime = study_time
    common.ImageType = ["ORIGINAL", "PRIMARY", "AXIAL"]
    common.BurnedInAnnotation = "NO"
    common.KVP = 120
    common.ScanOptions = "AXIAL MODE"
    common.DataCollectionDiameter = _ds_number(max(250.0, columns * spacing[0]))   # holds the reconstruction
    common.ReconstructionDiameter = _ds_number(columns * spacing[0])
    common.GantryDetectorTilt = _ds_number(tilt)
    common.TableHeight = 150
    common.RotationDirection = "CW"
    common.XRayTubeCurrent = 150
    common.ExposureTime = 800
    common.ConvolutionKernel = "STANDARD"
    common.RevolutionTime = 0.8
    common.CTDIvol = 18.0
    head_phantom = pydicom.Dataset()   # CTDIvol of head scans refers to the 16 cm phantom
    head_phantom.CodeValue = "113691"
    head_phantom.CodingSchemeDesignator = "DCM"
    head_phantom.CodeMeaning = "IEC Head Dosimetry Phantom"
    common.CTDIPhantomTypeCodeSequence = [head_phantom]
    # Image plane and pixels
    common.ImageOrientationPatient = [_ds_number(v) for v in orientation]
    common.PixelSpacing = [_ds_number(spacing[1]), _ds_number(spacing[0])]   # row spacing, column spacing
    common.SliceThickness = _ds_number(thickness)
    common.SpacingBetweenSlices = _ds_number(thickness)
    common.SamplesPerPixel = 1
    common.PhotometricInterpretation = "MONOCHROME2"
    common.Rows, common.Columns = rows, columns
    common.BitsAllocated = 16
    common.BitsStored = 16
    common.HighBit = 15
    common.PixelRepresentation = 1
    common.RescaleIntercept = 0
    common.RescaleSlope = 1
    common.RescaleType = "HU"
    common.WindowCenter = WINDOW_CENTER_HU
    common.WindowWidth = WINDOW_WIDTH_HU
    common.WindowCenterWidthExplanation = "BRAIN"

    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    paths = []
    for k in range(n_slices):
        ds = pydicom.Dataset()
        ds.update(common)
        sop_uid = _uid("instance", series_uid, k)
        ds.SOPInstanceUID = sop_uid
        ds.InstanceNumber = k + 1
        ds.ImagePositionPatient = [_ds_number(v) for v in positions[k]]
        ds.SliceLocation = _ds_number(positions[k][2])
        slice_pixels = np.clip(pixels[k], *HU_RANGE).astype("<i2")
        ds.SmallestImagePixelValue = int(slice_pixels.min())
        ds.LargestImagePixelValue = int(slice_pixels.max())
        ds.PixelData = slice_pixels.tobytes()
        ds["PixelData"].VR = "OW"
        ds["SmallestImagePixelValue"].VR = "SS"
        ds["LargestImagePixelValue"].VR = "SS"
        ds.file_meta = FileMetaDataset()
        ds.file_meta.MediaStorageSOPClassUID = CTImageStorage
        ds.file_meta.MediaStorageSOPInstanceUID = sop_uid
        ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
        path = folder / f"CT{k + 1:06d}.dcm"
        ds.save_as(path, enforce_file_format=True)
        paths.append(path)
    return paths

