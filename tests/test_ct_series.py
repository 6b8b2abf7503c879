"""The phantom CT series writer: round trip through pydicom and the node's loader, headers, dciodvfy."""
from __future__ import annotations

import copy
import math

import numpy as np
import pydicom
import pytest
import SimpleITK as sitk

from inference.phantoms.generator import make_phantom
from inference.phantoms.dicom_series import write_ct_series
from node.dicom.demographics import demographics_from
from node.dicom.files import find_dicom_files
from node.dicom.volume import load_series_volume
from tests.dicom_validation import validate


@pytest.fixture(scope="module")
def phantom():
    return make_phantom(31, matrix=64, pixel_spacing_mm=3.2, slice_thickness_mm=5.0)


@pytest.fixture(scope="module")
def tilted():
    return make_phantom(32, matrix=64, pixel_spacing_mm=3.2, slice_thickness_mm=5.0, tilt_deg=-12.0)


@pytest.fixture(scope="module")
def written(phantom, tmp_path_factory):
    folder = tmp_path_factory.mktemp("series")
    return write_ct_series(phantom, folder / "dicom")


def test_series_round_trip_matches_image_and_labels_geometry(phantom, written, tmp_path):
    assert len(written) == phantom.image.GetSize()[2]
    datasets = [pydicom.dcmread(p) for p in written]
    labels_path = tmp_path / "labels.nii.gz"
    sitk.WriteImage(phantom.labels, str(labels_path))
    labels = sitk.ReadImage(str(labels_path))
    array = sitk.GetArrayFromImage(phantom.image)
    for k, ds in enumerate(datasets):
        assert ds.SOPClassUID == pydicom.uid.CTImageStorage
        assert np.array_equal(ds.pixel_array * float(ds.RescaleSlope) + float(ds.RescaleIntercept), array[k])
        assert [float(v) for v in ds.ImagePositionPatient] == pytest.approx(
            labels.TransformIndexToPhysicalPoint((0, 0, k)), abs=1e-4)
        assert [float(v) for v in ds.PixelSpacing] == pytest.approx(labels.GetSpacing()[1::-1])
        assert float(ds.SliceThickness) == float(ds.SpacingBetweenSlices) == pytest.approx(labels.GetSpacing()[2])
        assert [float(v) for v in ds.ImageOrientationPatient] == pytest.approx([1, 0, 0, 0, 1, 0])
    assert len({ds.SeriesInstanceUID for ds in datasets}) == 1
    assert len({ds.SOPInstanceUID for ds in datasets}) == len(datasets)


def test_node_loader_reads_the_series_on_the_label_grid(phantom, written):
    volume = load_series_volume(find_dicom_files(written[0].parent))
    assert not volume.resampled and volume.tilt_deg == 0.0
    assert volume.image.GetSize() == phantom.labels.GetSize()
    assert volume.image.GetOrigin() == pytest.approx(phantom.labels.GetOrigin(), abs=1e-4)
    assert volume.image.GetSpacing() == pytest.approx(phantom.labels.GetSpacing(), abs=1e-4)
    assert np.array_equal(sitk.GetArrayFromImage(volume.image), sitk.GetArrayFromImage(phantom.image))


def test_patient_and_study_agree_with_the_meta(phantom, written):
    ds = pydicom.dcmread(written[0])
    meta = phantom.meta
    assert ds.PatientSex == meta["sex"]
    assert ds.PatientBirthDate == meta["birth_date"] and ds.StudyDate == meta["study_date"]
    assert ds.PatientAge.endswith("M") and int(ds.PatientAge[:3]) / 12 == pytest.approx(meta["age_years"], abs=1 / 12)
    demographics = demographics_from(ds)
    assert demographics.sex == meta["sex"]
    assert demographics.age_years == pytest.approx(meta["age_years"], abs=0.01)
    assert not demographics.notes
    assert str(ds.PatientName) == "Phantom^0031"
    assert ds.Manufacturer == "lobevol phantom"
    assert ds.BodyPartExamined == "HEAD" and list(ds.ImageType) == ["ORIGINAL", "PRIMARY", "AXIAL"]
    assert ds.ConvolutionKernel == "STANDARD" and ds.SeriesDescription == "HEAD 5MM STD"
    assert float(ds.WindowCenter) == 30 and float(ds.WindowWidth) == 100


def test_same_phantom_same_files(phantom, written, tmp_path):
    again = write_ct_series(phantom, tmp_path / "again")
    assert [p.read_bytes() for p in again] == [p.read_bytes() for p in written]


def test_options_override_identity(phantom, tmp_path):
    paths = write_ct_series(phantom, tmp_path / "s", study_uid="1.2.3.4", series_number=7, patient_name="Test^Child",
                            patient_id="ID7", accession="ACC7")
    ds = pydicom.dcmread(paths[0])
    assert ds.StudyInstanceUID == "1.2.3.4" and ds.SeriesNumber == 7
    assert str(ds.PatientName) == "Test^Child" and ds.PatientID == "ID7" and ds.AccessionNumber == "ACC7"


def test_tilted_series_is_a_sheared_stack_the_loader_corrects(tilted, tmp_path):
    paths = write_ct_series(tilted, tmp_path / "tilted")
    datasets = [pydicom.dcmread(p) for p in paths]
    assert float(datasets[0].GantryDetectorTilt) == -12.0
    t = math.radians(-12.0)
    assert [float(v) for v in datasets[0].ImageOrientationPatient] == pytest.approx(
        [1, 0, 0, 0, math.cos(t), -math.sin(t)], abs=1e-6)
    positions = np.array([[float(v) for v in ds.ImagePositionPatient] for ds in datasets])
    assert positions == pytest.approx(np.array(tilted.meta["image_position_patient"]), abs=1e-4)
    volume = load_series_volume(find_dicom_files(tmp_path / "tilted"))
    assert volume.tilt_deg == pytest.approx(12.0, abs=0.01)   # the loader reports the angle's size


def test_tilted_series_shows_the_same_child_as_the_untilted_one(tilted, tmp_path):
    """De-sheared by the node's loader, the tilted series lies where the untilted scan of the same child does."""
    write_ct_series(tilted, tmp_path / "tilted")
    volume = load_series_volume(find_dicom_files(tmp_path / "tilted"))
    straight = make_phantom(32, matrix=64, pixel_spacing_mm=3.2, slice_thickness_mm=5.0)
    moved = sitk.GetArrayFromImage(sitk.Resample(volume.image, straight.image, sitk.Transform(), sitk.sitkLinear, -1000.0))
    reference = sitk.GetArrayFromImage(straight.image).astype(float)
    head = reference > -500
    assert np.corrcoef(moved[head], reference[head])[0, 1] > 0.8


@pytest.mark.integration
def test_series_passes_dciodvfy(written, tilted, tmp_path):
    tilted_paths = write_ct_series(tilted, tmp_path / "tilted")
    for path in (written[0], written[len(written) // 2], tilted_paths[-1]):
        result = validate(path)
        assert result.errors == [], result.output
        assert result.warnings == [], result.output


def test_bad_phantoms_are_refused(phantom, tmp_path):
    lacking = copy.copy(phantom)
    lacking.meta = {k: v for k, v in phantom.meta.items() if k != "birth_date"}
    with pytest.raises(ValueError, match="birth_date"):
        write_ct_series(lacking, tmp_path / "a")
    floating = copy.copy(phantom)
    floating.image = sitk.Cast(phantom.image, sitk.sitkFloat32)
    with pytest.raises(ValueError, match="Int16"):
        write_ct_series(floating, tmp_path / "b")
    backwards = copy.copy(phantom)
    backwards.meta = dict(phantom.meta, birth_date="20990101")
    with pytest.raises(ValueError, match="after the study date"):
        write_ct_series(backwards, tmp_path / "c")
