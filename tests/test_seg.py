"""DICOM SEG writer: geometry round trip, codes, validation with dciodvfy."""
from __future__ import annotations

import highdicom as hd
import pydicom
import numpy as np
import pytest

from inference.vocabulary import REGIONS
from node.results.seg import build_seg, region_volumes_from_seg, segment_numbers_by_key
from tests.dicom_validation import validate
from tests.output_fixtures import MODEL, ct_volume, region_labels, region_voxel_volumes_cm3, write_ct_series

SHAPE = (12, 40, 40)  # slices, rows, columns: 4 mm pixels, 5 mm slices


@pytest.fixture(scope="module")
def study(tmp_path_factory):
    labels = region_labels(SHAPE)
    paths = write_ct_series(tmp_path_factory.mktemp("ct"), labels)
    return ct_volume(paths), labels


def test_binary_seg_round_trip_is_exact(study, tmp_path):
    volume, labels = study
    seg = build_seg(volume, labels, MODEL)
    path = tmp_path / "seg.dcm"
    seg.save_as(path)
    back = hd.seg.segread(path)
    numbers = segment_numbers_by_key(back)
    assert sorted(numbers) == sorted(r.key for r in REGIONS)
    pixels = back.get_pixels_by_source_instance(
        [ds.SOPInstanceUID for ds in volume.datasets], combine_segments=True,
        assert_missing_frames_are_empty=True,
    )
    expected = np.zeros_like(labels)
    for region in REGIONS:
        expected[labels == region.value] = numbers[region.key]
    np.testing.assert_array_equal(pixels, expected)
    # Every frame lies on a source image plane and references that image.
    source_positions = {ds.SOPInstanceUID: list(ds.ImagePositionPatient) for ds in volume.datasets}
    for frame in back.PerFrameFunctionalGroupsSequence:
        uid = frame.DerivationImageSequence[0].SourceImageSequence[0].ReferencedSOPInstanceUID
        assert list(frame.PlanePositionSequence[0].ImagePositionPatient) == pytest.approx(source_positions[uid])
    volumes = region_volumes_from_seg(back, volume.datasets)
    truth = region_voxel_volumes_cm3(labels, 4 * 4 * 5)
    assert volumes == pytest.approx(truth, rel=1e-9)


def test_segment_codes_colours_and_algorithm(study):
    volume, labels = study
    seg = build_seg(volume, labels, MODEL)
    by_label = {item.SegmentLabel: item for item in seg.SegmentSequence}
    right_frontal = by_label["Right frontal lobe"]
    prop = right_frontal.SegmentedPropertyTypeCodeSequence[0]
    assert (prop.CodeValue, prop.CodingSchemeDesignator) == ("83251001", "SCT")
    assert prop.SegmentedPropertyTypeModifierCodeSequence[0].CodeValue == "24028007"
    assert right_frontal.SegmentedPropertyCategoryCodeSequence[0].CodeValue == "91723000"
    assert "SegmentedPropertyTypeModifierCodeSequence" not in by_label["Cerebellum"].SegmentedPropertyTypeCodeSequence[0]
    assert by_label["Brainstem"].SegmentedPropertyTypeCodeSequence[0].CodeValue == "119238007"
    lab = hd.color.CIELabColor.from_dicom_value(right_frontal.RecommendedDisplayCIELabValue)
    assert np.abs(np.array(lab.to_rgb()) - np.array(REGIONS[0].rgb)).max() <= 2
    algorithm = right_frontal.SegmentationAlgorithmIdentificationSequence[0]
    assert algorithm.AlgorithmName == "lobevol"
    assert MODEL["weights_sha256"] in algorithm.AlgorithmParameters


def test_seg_is_in_the_source_study_new_series(study):
    volume, labels = study
    seg = build_seg(volume, labels, MODEL)
    source = volume.datasets[0]
    assert seg.StudyInstanceUID == source.StudyInstanceUID
    assert (seg.PatientID, seg.PatientName) == (source.PatientID, source.PatientName)
    assert seg.SeriesInstanceUID != source.SeriesInstanceUID
    assert seg.SeriesDescription == "lobevol SEG"
    assert seg.ReferencedSeriesSequence[0].SeriesInstanceUID == source.SeriesInstanceUID


def test_missing_regions_are_left_out_and_numbers_stay_contiguous(study):
    volume, labels = study
    partial = labels.copy()
    partial[np.isin(partial, (3, 9))] = 0
    seg = build_seg(volume, partial, MODEL)
    numbers = segment_numbers_by_key(seg)
    assert "right_parietal_lobe" not in numbers and "cerebellum" not in numbers
    assert sorted(numbers.values()) == list(range(1, 9))


def test_labelmap_seg_round_trip(study, tmp_path):
    volume, labels = study
    seg = build_seg(volume, labels, MODEL, labelmap=True)
    assert seg.SegmentationType == "LABELMAP"
    path = tmp_path / "labelmap.dcm"
    seg.save_as(path)
    back = hd.seg.segread(path)
    assert region_volumes_from_seg(back, volume.datasets) == pytest.approx(
        region_voxel_volumes_cm3(labels, 4 * 4 * 5), rel=1e-9
    )


def test_labelmap_background_is_the_padding_value_not_a_segment(study):
    """Supplement 243: background pixels carry the Pixel Padding Value; the Segment Sequence lists the regions.

    Item i of the sequence is segment i + 1, in label order, with its region's
    colour (OHIF colours by position: a background item shifted every colour).
    """
    volume, labels = study
    seg = build_seg(volume, labels, MODEL, labelmap=True)
    assert seg.PixelPaddingValue == 0
    assert [int(item.SegmentNumber) for item in seg.SegmentSequence] == list(range(1, 11))
    for item, region in zip(seg.SegmentSequence, REGIONS):
        assert (item.SegmentLabel, item.TrackingID) == (region.name, region.key)
        rgb = hd.color.CIELabColor.from_dicom_value(item.RecommendedDisplayCIELabValue).to_rgb()
        assert np.abs(np.array(rgb) - np.array(region.rgb)).max() <= 2


@pytest.mark.parametrize(
    "mutate, message",
    [
        (lambda a: a[:, :-1], "shape"),
        (lambda a: np.where(a == 1, 11, a), "label values"),
        (lambda a: a.astype(np.float32), "integer"),
        (lambda a: np.zeros_like(a), "empty"),
    ],
)
def test_bad_label_slices_are_refused(study, mutate, message):
    volume, labels = study
    with pytest.raises(ValueError, match=message):
        build_seg(volume, mutate(labels), MODEL)


def test_model_without_checksum_is_refused(study):
    volume, labels = study
    with pytest.raises(ValueError, match="weights_sha256"):
        build_seg(volume, labels, {**MODEL, "weights_sha256": ""})


@pytest.mark.integration
def test_binary_seg_passes_dciodvfy(study, tmp_path):
    volume, labels = study
    path = tmp_path / "seg.dcm"
    build_seg(volume, labels, MODEL).save_as(path)
    result = validate(path)
    assert result.errors == [], result.output
    assert result.warnings == [], result.output


@pytest.mark.integration
def test_labelmap_seg_passes_dciodvfy_but_for_what_supplement_243_changed(study, tmp_path):
    """dciodvfy (dicom3tools 2022) has no Label Map Segmentation IOD: check it as a Segmentation.

    The SOP class is set to Segmentation Storage for the check; the only
    complaints allowed are the two Supplement 243 made legal for LABELMAP:
    the Segmentation Type value itself, and no per-frame Segment
    Identification (a label map frame holds every segment).
    """
    volume, labels = study
    seg = build_seg(volume, labels, MODEL, labelmap=True)
    seg.SOPClassUID = seg.file_meta.MediaStorageSOPClassUID = "1.2.840.10008.5.1.4.1.1.66.4"
    path = tmp_path / "labelmap-as-seg.dcm"
    seg.save_as(path)
    result = validate(path)
    unexplained = [
        e for e in result.errors
        if "Unrecognized enumerated value = <LABELMAP>" not in e
        and "SegmentIdentificationSequence(0062,000a)> - Missing attribute for Type 1 Required" not in e
    ]
    assert unexplained == [], result.output
    assert any("<LABELMAP>" in e for e in result.errors), result.output  # the check did run on our file
    assert result.warnings == [], result.output


@pytest.fixture(scope="module")
def ge_headers(tmp_path_factory):
    """The GE sample's 28 headers (gantry tilt 18.5 deg, uneven spacing), sorted along the slice normal."""
    import subprocess

    from tests.conftest import REAL_CT_ARCHIVE as archive
    if not archive.exists():
        raise FileNotFoundError(f"real CT samples missing: {archive}")
    root = tmp_path_factory.mktemp("real-ct")
    subprocess.run(["tar", "-xJf", str(archive), "-C", str(root), "GE"], check=True)
    headers = [pydicom.dcmread(p, stop_before_pixels=True) for p in sorted((root / "GE").iterdir())]
    orientation = np.array(headers[0].ImageOrientationPatient, float)
    normal = np.cross(orientation[:3], orientation[3:])
    return sorted(headers, key=lambda ds: float(np.dot(normal, np.array(ds.ImagePositionPatient, float))))


@pytest.mark.slow
@pytest.mark.integration
def test_seg_on_tilted_uneven_ge_series_references_its_own_planes(ge_headers, tmp_path):
    from types import SimpleNamespace

    rows, columns = ge_headers[0].Rows, ge_headers[0].Columns
    yy, xx = np.mgrid[:rows, :columns]
    disc = (yy - rows / 2) ** 2 + (xx - columns / 2) ** 2 < 60 ** 2
    labels = np.zeros((len(ge_headers), rows, columns), np.uint8)
    for index in range(4, 24):
        labels[index][disc] = 1 + index % 10
    seg = build_seg(SimpleNamespace(datasets=ge_headers), labels, MODEL)
    path = tmp_path / "ge_seg.dcm"
    seg.save_as(path)
    source = {ds.SOPInstanceUID: ds for ds in ge_headers}
    for frame in seg.PerFrameFunctionalGroupsSequence:
        uid = frame.DerivationImageSequence[0].SourceImageSequence[0].ReferencedSOPInstanceUID
        assert list(frame.PlanePositionSequence[0].ImagePositionPatient) == pytest.approx(
            [float(v) for v in source[uid].ImagePositionPatient])
    shared = seg.SharedFunctionalGroupsSequence[0].PlaneOrientationSequence[0].ImageOrientationPatient
    assert [float(v) for v in shared] == pytest.approx([float(v) for v in ge_headers[0].ImageOrientationPatient])
    # The de-identified source leaves study date, time and ID empty and names the patient "REMOVED".
    result = validate(path)
    assert result.errors == [], result.output
    assert result.unexplained_warnings(("would be needed to build DICOMDIR", "Retired Person Name form")) == [], \
        result.output
    back = hd.seg.segread(path)
    pixels = back.get_pixels_by_source_instance([ds.SOPInstanceUID for ds in ge_headers], combine_segments=True,
                                                assert_missing_frames_are_empty=True)
    np.testing.assert_array_equal(pixels > 0, labels > 0)
