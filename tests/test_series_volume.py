"""Series to volume: geometry, HU, transfer syntaxes, Enhanced CT, tilt and uneven spacing, refusals."""
from __future__ import annotations

import math
import shutil
import subprocess
from pathlib import Path

import highdicom as hd
import numpy as np
import pydicom
import pytest
import SimpleITK as sitk
from scipy import ndimage
from pydicom.uid import (CTImageStorage, DeflatedExplicitVRLittleEndian, ExplicitVRLittleEndian, JPEG2000Lossless,
                         JPEGLSLossless, RLELossless, generate_uid)

from inference.metrics import dice_per_region
from node.dicom.files import find_dicom_files
from node.dicom.volume import AIR_HU, load_series_volume
from tests.conftest import phantom_truth_on_source_slices

AXIAL = (1.0, 0.0, 0.0, 0.0, 1.0, 0.0)


def blob_hu(points: np.ndarray) -> np.ndarray:
    """A smooth analytic 'head' in HU at physical points (..., 3), mm: an ellipsoid with a gradient."""
    x, y, z = points[..., 0], points[..., 1], points[..., 2]
    inside = (x / 40) ** 2 + (y / 45) ** 2 + (z / 35) ** 2
    return np.where(inside <= 1, 40 + 0.5 * z + 0.3 * x, -1000.0)


def write_series(folder: Path, positions, orientation=AXIAL, *, rows=48, columns=48, pixel_mm=(2.0, 2.0),
                 slope=1.0, intercept=-1024.0, shuffle=True, sizes=None, orientations=None) -> list[Path]:
    """One CT series with the given per-slice positions, pixel values = blob_hu at each pixel centre."""
    folder.mkdir(parents=True, exist_ok=True)
    study, series, frame = generate_uid(), generate_uid(), generate_uid()
    order = np.random.default_rng(1).permutation(len(positions)) if shuffle else np.arange(len(positions))
    paths = []
    for number, index in enumerate(order, start=1):
        iop = np.asarray(orientations[index] if orientations else orientation, float)
        r, c = sizes[index] if sizes else (rows, columns)
        ds = pydicom.Dataset()
        ds.SOPClassUID, ds.SOPInstanceUID = CTImageStorage, generate_uid()
        ds.StudyInstanceUID, ds.SeriesInstanceUID, ds.FrameOfReferenceUID = study, series, frame
        ds.Modality, ds.InstanceNumber = "CT", int(len(positions) - index)  # instance numbers run backwards
        ds.ImageType = ["ORIGINAL", "PRIMARY", "AXIAL"]
        ds.ImagePositionPatient = [float(v) for v in positions[index]]
        ds.ImageOrientationPatient = [float(v) for v in iop]
        ds.PixelSpacing = list(pixel_mm)
        ds.SliceThickness = 2.0
        ds.Rows, ds.Columns = r, c
        ds.SamplesPerPixel, ds.PhotometricInterpretation = 1, "MONOCHROME2"
        ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 16, 16, 15, 0
        ds.RescaleSlope, ds.RescaleIntercept = slope, intercept
        jj, ii = np.mgrid[0:r, 0:c]
        points = (np.asarray(positions[index], float) + ii[..., None] * pixel_mm[1] * iop[:3]
                  + jj[..., None] * pixel_mm[0] * iop[3:])
        stored = np.round((blob_hu(points) - intercept) / slope)
        ds.PixelData = stored.astype(np.uint16).tobytes()
        ds.file_meta = pydicom.dataset.FileMetaDataset()
        ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
        path = folder / f"slice{number:03d}"
        ds.save_as(path, enforce_file_format=True)
        paths.append(path)
    return paths


def axial_positions(n: int, spacing: float = 2.0, start: float = -40.0) -> list[tuple[float, float, float]]:
    return [(-47.0, -47.0, start + k * spacing) for k in range(n)]


def expected_on_grid(image: sitk.Image) -> np.ndarray:
    """blob_hu at every voxel centre of ``image`` (z, y, x)."""
    size = image.GetSize()
    index = np.stack(np.meshgrid(*[np.arange(s) for s in size], indexing="ij"), axis=-1).reshape(-1, 3)
    direction = np.asarray(image.GetDirection()).reshape(3, 3)
    points = np.asarray(image.GetOrigin()) + (index * np.asarray(image.GetSpacing())) @ direction.T
    return blob_hu(points).reshape(size).transpose(2, 1, 0)


def test_regular_series_is_used_as_is_sorted_along_the_normal(tmp_path):
    write_series(tmp_path, axial_positions(30), slope=2.0, intercept=-2048.0)
    volume = load_series_volume(find_dicom_files(tmp_path))
    assert not volume.resampled and volume.tilt_deg == 0.0 and volume.notes == []
    image = volume.image
    assert image.GetPixelID() == sitk.sitkFloat32
    assert image.GetSize() == (48, 48, 30)
    assert image.GetSpacing() == pytest.approx((2.0, 2.0, 2.0))
    assert image.GetOrigin() == pytest.approx((-47.0, -47.0, -40.0))
    z = [float(ds.ImagePositionPatient[2]) for ds in volume.datasets]
    assert z == sorted(z) and all("PixelData" not in ds for ds in volume.datasets)
    np.testing.assert_allclose(sitk.GetArrayFromImage(image), expected_on_grid(image), atol=1.0)  # slope 2: 1 HU steps


def test_labels_on_source_slices_of_a_regular_series_are_exact(tmp_path):
    write_series(tmp_path, axial_positions(20))
    volume = load_series_volume(find_dicom_files(tmp_path))
    labels = sitk.Cast(volume.image > 0, sitk.sitkUInt8)
    on_slices = volume.labels_on_source_slices(labels)
    assert on_slices.shape == (20, 48, 48) and on_slices.dtype == np.uint8
    np.testing.assert_array_equal(on_slices, sitk.GetArrayFromImage(labels))
    wrong = sitk.Image(labels)
    wrong.SetSpacing((1.0, 1.0, 1.0))
    with pytest.raises(ValueError, match="spacing"):
        volume.labels_on_source_slices(wrong)


def _recompress(paths: list[Path], syntax: str) -> None:
    for path in paths:
        ds = pydicom.dcmread(path)
        if syntax == DeflatedExplicitVRLittleEndian:
            ds.file_meta.TransferSyntaxUID = syntax
            ds.save_as(path, enforce_file_format=True)
        elif syntax in ("dcmcjpeg", "dcmcjpls"):
            tool = shutil.which(syntax)
            if tool is None:
                raise RuntimeError(f"{syntax} not found: install dcmtk")
            subprocess.run([tool, str(path), str(path)], check=True, capture_output=True)
        else:
            ds.compress(syntax)
            ds.save_as(path, enforce_file_format=True)


@pytest.mark.parametrize("syntax, name", [
    (RLELossless, "RLE Lossless"),
    (JPEG2000Lossless, "JPEG 2000"),
    (JPEGLSLossless, "JPEG-LS"),
    pytest.param("dcmcjpeg", "JPEG Lossless", marks=pytest.mark.integration),  # DCMTK's encoders
    pytest.param("dcmcjpls", "JPEG-LS", marks=pytest.mark.integration),
    (DeflatedExplicitVRLittleEndian, "Deflate"),
])
def test_compressed_transfer_syntaxes_decode_to_the_same_volume(tmp_path, syntax, name):
    write_series(tmp_path / "plain", axial_positions(12, 4.0), rows=64, columns=64)
    reference = load_series_volume(find_dicom_files(tmp_path / "plain"))
    paths = write_series(tmp_path / "compressed", axial_positions(12, 4.0), rows=64, columns=64)
    _recompress(paths, syntax)
    headers = find_dicom_files(tmp_path / "compressed")
    assert name in pydicom.uid.UID(headers[0].dataset.file_meta.TransferSyntaxUID).name
    volume = load_series_volume(headers)
    np.testing.assert_array_equal(sitk.GetArrayFromImage(volume.image), sitk.GetArrayFromImage(reference.image))


def test_enhanced_ct_multiframe_gives_the_same_volume_and_frame_order(tmp_path):
    paths = write_series(tmp_path / "single", axial_positions(16, 3.0))
    single = load_series_volume(find_dicom_files(tmp_path / "single"))
    enhanced = hd.legacy.LegacyConvertedEnhancedCTImage(
        [pydicom.dcmread(p) for p in paths], series_instance_uid=hd.UID(), series_number=5,
        sop_instance_uid=hd.UID(), instance_number=1)
    (tmp_path / "multi").mkdir()
    enhanced.save_as(tmp_path / "multi" / "enhanced.dcm")
    headers = find_dicom_files(tmp_path / "multi")
    assert len(headers) == 1 and headers[0].dataset.NumberOfFrames == 16
    volume = load_series_volume(headers)
    np.testing.assert_array_equal(sitk.GetArrayFromImage(volume.image), sitk.GetArrayFromImage(single.image))
    assert volume.image.GetOrigin() == pytest.approx(single.image.GetOrigin())
    assert volume.image.GetSpacing() == pytest.approx(single.image.GetSpacing())
    # Labels come back in frame order: frame k's plane, whatever order the frames are stored in.
    labels = sitk.Cast(volume.image > 0, sitk.sitkUInt8)
    on_frames = volume.labels_on_source_slices(labels)
    frame_z = [float(item.PlanePositionSequence[0].ImagePositionPatient[2])
               for item in headers[0].dataset.PerFrameFunctionalGroupsSequence]
    assert frame_z != sorted(frame_z)  # highdicom stores them by instance number, which runs backwards
    per_z = dict(zip([float(ds.ImagePositionPatient[2]) for ds in single.datasets],
                     single.labels_on_source_slices(labels)))
    for frame, z in zip(on_frames, frame_z):
        np.testing.assert_array_equal(frame, per_z[z])


def tilted_positions(n: int, table_mm: float, tilt_deg: float, gaps=None) -> tuple[list, tuple]:
    """A gantry-tilted stack: planes tilted about x, table moving along z (a sheared grid)."""
    t = math.radians(tilt_deg)
    orientation = (1.0, 0.0, 0.0, 0.0, math.cos(t), -math.sin(t))
    z = np.cumsum([0.0, *(gaps if gaps is not None else [table_mm] * (n - 1))]) - 40.0
    return [(-47.0, -60.0, float(v)) for v in z], orientation


def test_gantry_tilt_is_corrected_onto_a_regular_grid(tmp_path):
    positions, orientation = tilted_positions(36, 2.5, 18.5)
    write_series(tmp_path, positions, orientation, rows=64)
    volume = load_series_volume(find_dicom_files(tmp_path))
    assert volume.resampled and volume.tilt_deg == pytest.approx(18.5, abs=0.01)
    assert any("gantry tilt 18.5 deg corrected" in note for note in volume.notes)
    image = volume.image
    direction = np.asarray(image.GetDirection()).reshape(3, 3)
    np.testing.assert_allclose(direction[:, 1], orientation[3:], atol=1e-9)  # grid axes = slice axes
    assert image.GetSpacing()[2] == pytest.approx(2.5 * math.cos(math.radians(18.5)), rel=1e-3)
    # The resampled HU follow the analytic object inside the covered region.
    array, expected = sitk.GetArrayFromImage(image), expected_on_grid(image)
    inside = (expected > 0) & (array > -900)
    assert inside.sum() > 10000
    assert np.median(np.abs(array[inside] - expected[inside])) < 1.0
    # Labels on the grid map back onto each source plane (nearest) and round-trip exactly.
    source_truth = volume.labels_on_source_slices(sitk.Cast(volume.image > 0, sitk.sitkUInt8))
    back = volume.labels_on_source_slices(volume.source_slices_to_grid(source_truth, nearest=True))
    np.testing.assert_array_equal(back, source_truth)
    assert source_truth.any()


def test_uneven_spacing_is_resampled_and_reported(tmp_path):
    gaps = [2.0] * 10 + [0.5] + [3.5] * 10
    write_series(tmp_path, [(-47.0, -47.0, -40.0 + v) for v in np.cumsum([0.0, *gaps])])
    volume = load_series_volume(find_dicom_files(tmp_path))
    assert volume.resampled and volume.tilt_deg == 0.0
    assert any("uneven slice spacing (0.50 to 3.50 mm)" in note for note in volume.notes)
    spacing = volume.image.GetSpacing()[2]
    assert spacing <= 3.5 and (volume.image.GetSize()[2] - 1) * spacing == pytest.approx(sum(gaps))
    array, expected = sitk.GetArrayFromImage(volume.image), expected_on_grid(volume.image)
    # Well inside the object (away from the edge, where interpolation meets air) the HU are linear in z.
    inside = ndimage.binary_erosion(expected > 0, np.ones((5, 1, 1), bool))
    assert inside.sum() > 10000
    assert np.abs(array[inside] - expected[inside]).max() < 1.0


@pytest.mark.parametrize("mutate, message", [
    (lambda p: dict(positions=p[:10] + p[13:]), "gap of 8.00 mm"),
    (lambda p: dict(positions=p + [p[5]]), "duplicated slice positions"),
    (lambda p: dict(positions=p, orientations=[AXIAL] * 19 + [(1, 0, 0, 0, 0.98, -0.199)]), "mixed orientations"),
    (lambda p: dict(positions=p, sizes=[(48, 48)] * 19 + [(48, 40)]), "mixed image sizes"),
    (lambda p: dict(positions=p[:1]), "at least 2 slices"),
])
def test_irregular_series_are_refused_with_the_problem_named(tmp_path, mutate, message):
    write_series(tmp_path, **mutate(axial_positions(20)))
    with pytest.raises(ValueError, match=message):
        load_series_volume(find_dicom_files(tmp_path))


def test_gap_factor_is_configurable_and_checked(tmp_path):
    positions = axial_positions(20)
    write_series(tmp_path, positions[:10] + positions[12:])  # one gap of 3 x the spacing
    headers = find_dicom_files(tmp_path)
    with pytest.raises(ValueError, match="more than 2 x the typical slice spacing"):
        load_series_volume(headers)
    assert load_series_volume(headers, max_gap_factor=3.5).resampled
    one_missing = tmp_path / "one_missing"
    write_series(one_missing, positions[:10] + positions[11:])  # a gap of exactly 2 x: accepted at the limit
    notes = load_series_volume(find_dicom_files(one_missing)).notes
    assert notes == ["1 slice missing after instance 10 (a gap of 4.00 mm, interpolated across)"], notes
    with pytest.raises(ValueError, match="at least 1"):
        load_series_volume(headers, max_gap_factor=0.5)


def test_one_series_only(tmp_path):
    write_series(tmp_path / "a", axial_positions(5))
    write_series(tmp_path / "b", axial_positions(5))
    with pytest.raises(ValueError, match="2 series"):
        load_series_volume(find_dicom_files(tmp_path))
    with pytest.raises(ValueError, match="no instances"):
        load_series_volume([])


def test_real_ge_tilted_unevenly_spaced_series_is_accepted_with_the_default_factor(real_ct):
    headers = find_dicom_files(real_ct / "GE")
    volume = load_series_volume(headers)
    assert volume.tilt_deg == pytest.approx(18.5, abs=0.05)
    assert len(volume.datasets) == 28 and volume.resampled
    assert any("gantry tilt 18.5 deg" in note for note in volume.notes)
    assert any("uneven slice spacing (1.08 to 7.00 mm)" in note for note in volume.notes)
    array = sitk.GetArrayFromImage(volume.image)
    assert array.min() >= AIR_HU and 20 < np.median(array[(array > 0) & (array < 80)]) < 60  # brain HU
    labels = sitk.Cast((volume.image > 0) & (volume.image < 80), sitk.sitkUInt8)
    on_slices = volume.labels_on_source_slices(labels)
    assert on_slices.shape == (28, 512, 512)
    # The labels mapped back agree with thresholding the source images themselves.
    by_uid = {h.sop_instance_uid: h.path for h in headers}
    source = np.stack([pydicom.dcmread(by_uid[ds.SOPInstanceUID]).pixel_array.astype(float)
                       * float(ds.RescaleSlope) + float(ds.RescaleIntercept) for ds in volume.datasets])
    truth = (source > 0) & (source < 80)
    dice = 2 * (truth & (on_slices > 0)).sum() / (truth.sum() + (on_slices > 0).sum())
    assert dice > 0.9


def test_real_philips_thin_series_is_regular(real_ct):
    volume = load_series_volume(find_dicom_files(real_ct / "Philips" / "S21570" / "S2020"))
    assert not volume.resampled and volume.notes == []
    assert volume.image.GetSize() == (512, 512, 140)
    assert volume.image.GetSpacing() == pytest.approx((0.451171875, 0.451171875, 1.0))


def test_tilted_phantom_truth_survives_the_grid_and_back_onto_its_source_slices(tilted_phantom_study):
    phantom, folder = tilted_phantom_study
    volume = load_series_volume(find_dicom_files(folder))
    assert volume.tilt_deg == pytest.approx(18.5, abs=0.01) and volume.resampled
    # The grid has the phantom's (tilted) axes and slice spacing.
    np.testing.assert_allclose(volume.image.GetDirection(), phantom.image.GetDirection(), atol=1e-6)
    assert volume.image.GetSpacing() == pytest.approx(phantom.image.GetSpacing(), rel=1e-6)
    truth = phantom_truth_on_source_slices(phantom, volume.datasets)
    on_grid = volume.source_slices_to_grid(truth, nearest=True)
    back = volume.labels_on_source_slices(on_grid)
    dice = dice_per_region(back, truth)
    assert min(dice.values()) >= 0.97, dice
    # The HU on the grid, mapped back with the same (independent, physical-space) resampling, match
    # the source images: brain voxels of the truth sit at brain HU on the grid.
    hu_on_grid = sitk.GetArrayFromImage(volume.image)
    brain = sitk.GetArrayFromImage(on_grid) > 0
    assert 15 < np.median(hu_on_grid[brain]) < 50


@pytest.mark.slow
def test_untilted_phantom_volume_is_the_phantom_image_exactly(tmp_path):
    from inference.phantoms.generator import make_phantom
    from inference.phantoms.dicom_series import write_ct_series

    phantom = make_phantom(4, slice_thickness_mm=5.0, pixel_spacing_mm=2.2, matrix=96)
    write_ct_series(phantom, tmp_path)
    volume = load_series_volume(find_dicom_files(tmp_path))
    assert not volume.resampled and volume.tilt_deg == 0.0
    for getter in ("GetSize", "GetSpacing", "GetOrigin", "GetDirection"):
        np.testing.assert_allclose(getattr(volume.image, getter)(), getattr(phantom.image, getter)(), atol=1e-4)
    expected = np.maximum(sitk.GetArrayFromImage(phantom.image).astype(np.float32), AIR_HU)
    np.testing.assert_array_equal(sitk.GetArrayFromImage(volume.image), expected)
    labels = volume.labels_on_source_slices(phantom.labels)
    np.testing.assert_array_equal(labels, phantom_truth_on_source_slices(phantom, volume.datasets))


def test_slice_extents_and_source_volumes_follow_uneven_spacing(tmp_path):
    from inference.volumes import slice_extents_mm

    np.testing.assert_allclose(slice_extents_mm([0.0, 2.0, 4.0, 10.0]), [2.0, 2.0, 4.0, 6.0])
    np.testing.assert_allclose(slice_extents_mm([10.0, 0.0, 4.0, 2.0]), [6.0, 2.0, 4.0, 2.0])  # any order
    gaps = [2.0] * 10 + [0.5] + [3.5] * 10
    write_series(tmp_path, [(-47.0, -47.0, -40.0 + v) for v in np.cumsum([0.0, *gaps])])
    volume = load_series_volume(find_dicom_files(tmp_path))
    label_slices = np.zeros((len(volume.planes), 48, 48), np.uint8)
    label_slices[:, 10:20, 10:20] = 1   # 100 pixels of 2 x 2 mm on every slice
    label_slices[-1, 0, 0] = 10         # one pixel on the last slice
    volumes = volume.region_volumes_cm3(label_slices)
    assert volumes["right_frontal_lobe"] == pytest.approx(100 * 4 * (sum(gaps) + 2.0 / 2 + 3.5 / 2) / 1000)
    assert volumes["brainstem"] == pytest.approx(4 * 3.5 / 1000)
    assert volumes["cerebellum"] == 0.0
    with pytest.raises(ValueError, match="shape"):
        volume.region_volumes_cm3(label_slices[:-1])


def test_headers_claiming_a_huge_volume_are_refused_before_any_allocation(tmp_path, monkeypatch):
    import node.dicom.volume as volume
    from node.dicom.files import find_dicom_files
    from tests.output_fixtures import region_labels, write_ct_series

    paths = write_ct_series(tmp_path / "s", region_labels((4, 16, 16)))
    monkeypatch.setattr(volume, "MAX_VOXELS", 4 * 16 * 16 - 1)
    monkeypatch.setattr(volume, "_read_pixels", lambda *a: pytest.fail("pixels read despite the bound"))
    with pytest.raises(ValueError, match="4 x 16 x 16 = 1,024 voxels, more than the 1,023 allowed"):
        volume.load_series_volume(find_dicom_files(paths[0].parent))


def test_slice_geometry_is_one_rule_for_every_reader():
    from node.dicom.geometry import positions_along, slice_normal

    axial = slice_normal([1, 0, 0, 0, 1, 0])
    assert axial.tolist() == [0, 0, 1]
    assert positions_along(axial, [[0, 0, -5.5], [3, 4, 2.0]]).tolist() == [-5.5, 2.0]
    tilted = slice_normal([1, 0, 0, 0, 0.8, -0.6])
    assert np.linalg.norm(tilted) == pytest.approx(1) and tilted.tolist() == pytest.approx([0, 0.6, 0.8])
    assert slice_normal([1, 0, 0, 1, 0, 0]) is None and slice_normal([1, 0, 0]) is None  # no plane
