"""The study pipeline (analyse_study): selection, results, validation, real scanner samples."""
from __future__ import annotations

import csv
import json
from pathlib import Path

import highdicom as hd
import numpy as np
import pydicom
import pytest
import SimpleITK as sitk

from inference.vocabulary import REGION_KEYS, REGIONS
from node.dicom.files import find_dicom_files, group_by_study
from node.config import OutputSettings
from node.pipeline import PipelineSettings, analyse_study
from node.results.seg import region_volumes_from_seg
from tests.dicom_validation import validate
from tests.output_fixtures import MODEL, PartitionSegmenter, region_labels, write_ct_series

# dciodvfy warnings we accept, and why: our private code for the asymmetry index
# (declared in CodingSchemeIdentificationSequence); DICOMDIR hints for study
# attributes that the source itself leaves empty (GE sample); the GE sample's
# de-identified one-component patient name, copied as it is.
EXPLAINED_WARNINGS = ("<99LOBEVOL>", "would be needed to build DICOMDIR", "Retired Person Name form")


def _single_study(root: Path):
    studies = group_by_study(find_dicom_files(root))
    assert len(studies) == 1
    ((study_uid, series),) = studies.items()
    return study_uid, [h for headers in series.values() for h in headers]


def _assert_valid(paths):
    for path in paths:
        if path.suffix == ".dcm":
            result = validate(path)
            assert result.errors == [], result.output
            assert result.unexplained_warnings(EXPLAINED_WARNINGS) == [], result.output


def _sr_volumes(path: Path) -> dict[str, float]:
    report = hd.sr.MeasurementReport.from_sequence([pydicom.dcmread(path)])
    volumes = {}
    for group in report.get_volumetric_roi_measurement_groups():
        (item,) = [m for m in group.get_measurements() if m.name.value == "118565006"]
        volumes[group.tracking_identifier] = item.value
    return volumes


@pytest.fixture(scope="module")
def synthetic_study(tmp_path_factory):
    root = tmp_path_factory.mktemp("incoming")
    write_ct_series(root / "a" / "b", region_labels((20, 40, 40)))  # 100 mm: covers a head
    (root / "notes.txt").write_text("not DICOM")
    return root


@pytest.mark.integration
def test_study_results_are_complete_consistent_and_valid(synthetic_study, tmp_path):
    study_uid, instances = _single_study(synthetic_study)
    outcome = analyse_study(instances, tmp_path / "out", PartitionSegmenter())
    assert outcome.status == "done", outcome.reason
    names = sorted(p.name for p in outcome.result_files)
    assert names == ["key_axial.dcm", "key_coronal.dcm", "key_sagittal.dcm", "report.dcm", "seg.dcm", "sr.dcm"]
    assert sorted(p.name for p in outcome.plain_files) == ["labels.nii.gz", "report.pdf", "volumes.csv", "volumes.json"]
    _assert_valid(outcome.result_files)
    source_series = {h.series_uid for h in instances}
    for path in outcome.result_files:
        ds = pydicom.dcmread(path, stop_before_pixels=True)
        assert ds.StudyInstanceUID == study_uid and ds.SeriesInstanceUID not in source_series
        assert ds.SeriesDescription.startswith("lobevol")
    # The SEG's frames and the SR's volumes agree within 0.5 %.
    seg = hd.seg.segread(tmp_path / "out" / "seg.dcm")
    headers = sorted((h.dataset for h in instances), key=lambda d: float(d.ImagePositionPatient[2]))
    from_seg = region_volumes_from_seg(seg, headers)
    from_sr = _sr_volumes(tmp_path / "out" / "sr.dcm")
    names_by_key = {item.TrackingID: item.SegmentLabel for item in seg.SegmentSequence}
    for key, volume in from_seg.items():
        assert from_sr[names_by_key[key]] == pytest.approx(volume, rel=0.005)
    with open(tmp_path / "out" / "volumes.csv") as handle:
        rows = list(csv.reader(handle))
    assert rows[0] == ["id", "sex", "age_years", *REGION_KEYS] and rows[1][0] == study_uid
    assert rows[1][1:3] == ["F", f"{920 / 365.25:.3f}"]  # PatientSex; birth 2022-03-10, study 2024-09-15
    summary = json.loads((tmp_path / "out" / "volumes.json").read_text())
    assert set(summary["volumes_cm3"]) == set(REGION_KEYS)
    labels = sitk.ReadImage(str(tmp_path / "out" / "labels.nii.gz"))
    assert labels.GetSize() == (40, 40, 20)
    assert "Test" not in outcome.summary and "LV-TEST" not in outcome.summary  # no patient identifiers


def test_outputs_follow_the_settings(synthetic_study, tmp_path):
    _, instances = _single_study(synthetic_study)
    settings = PipelineSettings(outputs=OutputSettings(seg_type="labelmap", write_sr=False, write_pdf=False,
                                                       write_overlays=False))
    outcome = analyse_study(instances, tmp_path, PartitionSegmenter(), settings)
    assert [p.name for p in outcome.result_files] == ["seg.dcm"]
    assert pydicom.dcmread(outcome.result_files[0]).SegmentationType == "LABELMAP"


def test_study_without_a_ct_series_is_skipped_with_reasons(synthetic_study, tmp_path):
    # Our own key images are Secondary Captures of the same study: nothing to analyse.
    _, instances = _single_study(synthetic_study)
    first = analyse_study(instances, tmp_path / "first", PartitionSegmenter(),
                          PipelineSettings(outputs=OutputSettings(seg_type="none", write_sr=False, write_pdf=False)))
    captures = tmp_path / "captures"
    captures.mkdir()
    for path in first.result_files:
        (captures / path.name).write_bytes(path.read_bytes())
    _, capture_instances = _single_study(captures)
    outcome = analyse_study(capture_instances, tmp_path / "second", PartitionSegmenter())
    assert outcome.status == "skipped" and not outcome.result_files
    assert "no suitable head CT series" in outcome.reason and outcome.reason in outcome.summary


def test_chosen_series_that_cannot_make_a_volume_fails_with_the_reason(tmp_path):
    root = tmp_path / "incoming"
    paths = write_ct_series(root, region_labels((24, 40, 40)))
    for path in paths[10:13]:  # three slices lost in transfer: a 20 mm gap in 5 mm slices
        path.unlink()
    _, instances = _single_study(root)
    outcome = analyse_study(instances, tmp_path / "out", PartitionSegmenter())
    assert outcome.status == "failed" and not outcome.result_files
    assert "slices are missing" in outcome.reason and "gap of 20.00 mm" in outcome.summary


def test_next_best_series_is_analysed_when_the_chosen_one_cannot_make_a_volume(tmp_path):
    root = tmp_path / "incoming"
    study_uid = pydicom.uid.generate_uid()
    thin = write_ct_series(root / "thin", region_labels((40, 40, 40)), slice_spacing_mm=2.5, study_uid=study_uid)
    write_ct_series(root / "thick", region_labels((20, 40, 40)), study_uid=study_uid, series_number=3)
    for path in thin[10:15]:
        path.unlink()
    _, instances = _single_study(root)
    outcome = analyse_study(instances, tmp_path / "out", PartitionSegmenter(),
                            PipelineSettings(outputs=OutputSettings(seg_type="none", write_sr=False, write_overlays=False)))
    assert outcome.status == "done", outcome.reason
    notes = json.loads((tmp_path / "out" / "volumes.json").read_text())["quality_notes"]
    assert any(note.startswith("series 2 (HEAD 5MM STD) cannot be analysed: gap of 15.00 mm") for note in notes)
    assert sitk.ReadImage(str(tmp_path / "out" / "labels.nii.gz")).GetSize() == (40, 40, 20)  # the 5 mm series


@pytest.mark.parametrize(
    "kwargs, message",
    [({"seg_type": "contour"}, r"\[outputs\] seg = 'contour'"), ({"seg_type": "none"}, "SR references"),
     ({"z_threshold": 0}, r"\[outputs\] z_threshold = 0")],
)
def test_bad_settings_are_refused(kwargs, message):
    with pytest.raises(ValueError, match=message):
        OutputSettings(**kwargs)


@pytest.mark.slow
@pytest.mark.integration
def test_philips_study_picks_the_soft_tissue_series_and_writes_valid_objects(real_ct, tmp_path):
    study_uid, instances = _single_study(real_ct / "Philips")
    outcome = analyse_study(instances, tmp_path, PartitionSegmenter())
    assert outcome.status == "done", outcome.reason
    seg = pydicom.dcmread(tmp_path / "seg.dcm", stop_before_pixels=True)
    chosen = seg.ReferencedSeriesSequence[0].SeriesInstanceUID
    descriptions = {h.series_uid: str(h.dataset.get("SeriesDescription", "")) for h in instances}
    assert descriptions[chosen] == "STD BRAIN 1MM, iDose"  # S2020: 1 mm soft tissue, not bone, not 5 mm
    chosen_instances = {h.sop_instance_uid for h in instances if h.series_uid == chosen}
    referenced = {item.ReferencedSOPInstanceUID for item in seg.ReferencedSeriesSequence[0].ReferencedInstanceSequence}
    assert len(chosen_instances) == 140 and referenced <= chosen_instances
    _assert_valid(outcome.result_files)


@pytest.mark.slow
@pytest.mark.integration
def test_tilted_ge_series_gives_valid_objects_referencing_its_own_images(real_ct, tmp_path):
    _, instances = _single_study(real_ct / "GE")
    outcome = analyse_study(instances, tmp_path, PartitionSegmenter())
    assert outcome.status == "done", outcome.reason
    _assert_valid(outcome.result_files)
    seg = pydicom.dcmread(tmp_path / "seg.dcm")
    source = {h.sop_instance_uid: h.dataset for h in instances}
    assert len(source) == 28
    for frame in seg.PerFrameFunctionalGroupsSequence:
        uid = frame.DerivationImageSequence[0].SourceImageSequence[0].ReferencedSOPInstanceUID
        assert uid in source
        position = np.array(frame.PlanePositionSequence[0].ImagePositionPatient, float)
        assert np.allclose(position, np.array(source[uid].ImagePositionPatient, float), atol=1e-3)
    orientation = seg.SharedFunctionalGroupsSequence[0].PlaneOrientationSequence[0].ImageOrientationPatient
    assert np.allclose(np.array(orientation, float), np.array(next(iter(source.values())).ImageOrientationPatient, float))
    # Volumes are measured on the source images, so the SEG's frames and the SR agree despite the resampling.
    headers = sorted(source.values(), key=lambda ds: float(ds.SliceLocation))
    from_seg = region_volumes_from_seg(hd.seg.Segmentation.from_dataset(seg), headers)
    from_sr = _sr_volumes(tmp_path / "sr.dcm")
    names_by_key = {item.TrackingID: item.SegmentLabel for item in seg.SegmentSequence}
    assert len(from_seg) >= 8
    for key, volume in from_seg.items():
        assert from_sr[names_by_key[key]] == pytest.approx(volume, rel=0.005)


@pytest.mark.integration
def test_enhanced_ct_study_gives_valid_objects_whose_frames_lie_on_the_source_frames(tmp_path):
    paths = write_ct_series(tmp_path / "single", region_labels((20, 40, 40)))
    enhanced = hd.legacy.LegacyConvertedEnhancedCTImage(
        [pydicom.dcmread(p) for p in paths], series_instance_uid=hd.UID(), series_number=5,
        sop_instance_uid=hd.UID(), instance_number=1)
    (tmp_path / "multi").mkdir()
    enhanced.save_as(tmp_path / "multi" / "enhanced.dcm")
    _, instances = _single_study(tmp_path / "multi")
    outcome = analyse_study(instances, tmp_path / "out", PartitionSegmenter())
    assert outcome.status == "done", outcome.reason
    _assert_valid(outcome.result_files)
    seg = hd.seg.segread(tmp_path / "out" / "seg.dcm")
    frame_positions = [list(item.PlanePositionSequence[0].ImagePositionPatient)
                       for item in enhanced.PerFrameFunctionalGroupsSequence]
    for frame in seg.PerFrameFunctionalGroupsSequence:
        source = frame.DerivationImageSequence[0].SourceImageSequence[0]
        assert source.ReferencedSOPInstanceUID == enhanced.SOPInstanceUID
        position = frame.PlanePositionSequence[0].ImagePositionPatient
        assert list(position) == pytest.approx(frame_positions[source.ReferencedFrameNumber - 1])
    # Regular 4 x 4 x 5 mm grid: the SEG's pixel count gives each volume, which the SR repeats.
    pixels = seg.get_volume(combine_segments=True).array
    from_sr = _sr_volumes(tmp_path / "out" / "sr.dcm")
    for item in seg.SegmentSequence:
        volume = (pixels == item.SegmentNumber).sum() * 4 * 4 * 5 / 1000
        assert from_sr[item.SegmentLabel] == pytest.approx(volume, rel=0.005)


class TruthSegmenter:
    """A stand-in Segmenter that returns given labels (a phantom's truth put on the volume grid)."""

    def __init__(self, labels_on_grid: sitk.Image):
        self.labels = labels_on_grid

    def segment(self, image):
        from inference.predict import Segmentation, measure_volumes

        assert image.GetSize() == self.labels.GetSize()
        assert np.allclose(image.GetOrigin(), self.labels.GetOrigin())
        return Segmentation(labels=self.labels, volumes_cm3=measure_volumes(self.labels), model=dict(MODEL),
                            timings_s={"total": 0.0})


@pytest.mark.integration
def test_tilted_phantom_seg_read_back_matches_the_truth_on_every_source_slice(tilted_phantom_study, tmp_path):
    from node.dicom.volume import load_series_volume

    phantom, folder = tilted_phantom_study
    _, instances = _single_study(folder)
    volume = load_series_volume(instances)
    truth = _truth_by_instance(phantom, instances)
    truth_in_order = np.stack([truth[ds.SOPInstanceUID] for ds in volume.datasets])
    segmenter = TruthSegmenter(volume.source_slices_to_grid(truth_in_order, nearest=True))
    outcome = analyse_study(instances, tmp_path, segmenter)
    assert outcome.status == "done", outcome.reason
    assert any("gantry tilt 18.5 deg corrected" in note for note in json.loads(
        (tmp_path / "volumes.json").read_text())["quality_notes"])
    _assert_valid(outcome.result_files)
    seg = hd.seg.segread(tmp_path / "seg.dcm")
    numbers = {int(item.SegmentNumber): item.TrackingID for item in seg.SegmentSequence}
    pixels = seg.get_pixels_by_source_instance([ds.SOPInstanceUID for ds in volume.datasets],
                                               combine_segments=True, assert_missing_frames_are_empty=True)
    values = {region.key: region.value for region in REGIONS}
    read_back = np.zeros_like(pixels, dtype=np.uint8)
    for number, key in numbers.items():
        read_back[pixels == number] = values[key]
    for region in REGIONS:
        a, b = read_back == region.value, truth_in_order == region.value
        dice = 2 * (a & b).sum() / (a.sum() + b.sum())
        assert dice >= 0.97, (region.key, dice)
    # The SR's volumes are the truth's (counted on the same source slices, within 1 %) and the CSV
    # carries the phantom's sex and age, read from the DICOM header.
    from_sr = _sr_volumes(tmp_path / "sr.dcm")
    for region in REGIONS:
        assert from_sr[region.name] == pytest.approx(phantom.meta["volumes_cm3"][region.key], rel=0.01)
    with open(tmp_path / "volumes.csv") as handle:
        row = list(csv.DictReader(handle))[0]
    assert row["sex"] == phantom.meta["sex"]
    assert float(row["age_years"]) == pytest.approx(phantom.meta["age_years"], abs=0.01)


def _truth_by_instance(phantom, instances) -> dict[str, np.ndarray]:
    """The phantom's true label slice of every written image, by SOP Instance UID (matched by position)."""
    truth = sitk.GetArrayFromImage(phantom.labels)
    positions = np.asarray(phantom.meta["image_position_patient"], float)
    slice_of = {
        header.sop_instance_uid: int(np.argmin(np.abs(positions - np.asarray(header.dataset.ImagePositionPatient,
                                                                              float)).sum(axis=1)))
        for header in instances
    }
    assert sorted(slice_of.values()) == list(range(len(positions)))  # one image per true slice
    return {uid: truth[k] for uid, k in slice_of.items()}


def _rewritten(folder: Path, tmp_path: Path, change) -> Path:
    """A copy of the series in ``folder`` with every header changed by ``change(dataset)``."""
    out = tmp_path / "changed"
    out.mkdir()
    for path in sorted(folder.rglob("*.dcm")):
        ds = pydicom.dcmread(path)
        change(ds)
        ds.save_as(out / path.name)
    return out


def _hostile_text(ds):
    ds.PatientName = "Doe^John\\Smith^Jane"  # two names where one is allowed
    ds.PatientID = "ID\x1b[31m\x00\x07"
    ds.InstitutionName = "Hospital\r\nINFO forged"


def _long_name(ds):
    ds.PatientName = "Verylongfamilyname" * 555 + "^Jo"  # 10,000 characters


@pytest.mark.integration
@pytest.mark.parametrize("change, cleaned", [
    (_hostile_text, ["PatientName of the source cleaned for the results: 2 values, the first kept",
                     "PatientID of the source cleaned for the results: control characters removed",
                     "InstitutionName of the source cleaned for the results: control characters removed"]),
    (_long_name, ["PatientName of the source cleaned for the results: shortened to 64 characters"]),
], ids=["control-bytes-and-two-names", "10000-character-name"])
def test_hostile_patient_text_is_cleaned_and_the_results_are_delivered(synthetic_study, tmp_path, change, cleaned):
    folder = _rewritten(synthetic_study, tmp_path, change)
    _, instances = _single_study(folder)
    outcome = analyse_study(instances, tmp_path / "out", PartitionSegmenter())
    assert outcome.status == "done", outcome.reason
    assert sorted(p.name for p in outcome.result_files) == [
        "key_axial.dcm", "key_coronal.dcm", "key_sagittal.dcm", "report.dcm", "seg.dcm", "sr.dcm"]
    _assert_valid(outcome.result_files)  # dciodvfy: every value valid for its VR
    for path in outcome.result_files:
        ds = pydicom.dcmread(path, stop_before_pixels=True)
        for keyword in ("PatientName", "PatientID"):
            text = str(ds.get(keyword, ""))
            assert len(text) <= 64 and "\\" not in text and not any(ord(c) < 0x20 for c in text), (path.name, text)
    notes = json.loads((tmp_path / "out" / "volumes.json").read_text())["quality_notes"]
    assert set(cleaned) <= set(notes), notes
    text = _pdf_text(tmp_path / "out" / "report.pdf")
    assert "cleaned for the results" in text


def _pdf_text(path: Path) -> str:
    import subprocess

    from tests.node_peers import tool

    return subprocess.run([tool("pdftotext", "poppler-utils"), str(path), "-"], capture_output=True, text=True,
                          check=True).stdout


@pytest.mark.integration
def test_series_without_a_frame_of_reference_gets_volumes_and_report_but_no_seg(synthetic_study, tmp_path):
    folder = _rewritten(synthetic_study, tmp_path, lambda ds: delattr(ds, "FrameOfReferenceUID"))
    _, instances = _single_study(folder)
    outcome = analyse_study(instances, tmp_path / "out", PartitionSegmenter())
    assert outcome.status == "done", outcome.reason
    assert sorted(p.name for p in outcome.result_files) == [
        "key_axial.dcm", "key_coronal.dcm", "key_sagittal.dcm", "report.dcm"]
    notes = json.loads((tmp_path / "out" / "volumes.json").read_text())["quality_notes"]
    assert any(n.startswith("no DICOM SEG or SR: the source images have no (single) Frame of Reference UID")
               for n in notes)
    _assert_valid(outcome.result_files)


@pytest.mark.integration
def test_anonymised_real_head_without_head_words_nor_frame_of_reference_is_analysed(real_ct, tmp_path):
    blanked = ("BodyPartExamined", "StudyDescription", "SeriesDescription", "ProtocolName", "FrameOfReferenceUID")

    def anonymise(ds):
        for keyword in blanked:
            if keyword in ds:
                delattr(ds, keyword)

    folder = _rewritten(real_ct / "GE", tmp_path, anonymise)
    _, instances = _single_study(folder)
    outcome = analyse_study(instances, tmp_path / "out", PartitionSegmenter())
    assert outcome.status == "done", outcome.reason
    assert "seg.dcm" not in {p.name for p in outcome.result_files} and "report.dcm" in {p.name for p in outcome.result_files}
    notes = json.loads((tmp_path / "out" / "volumes.json").read_text())["quality_notes"]
    assert any("recognised as a head CT from the image" in n for n in notes), notes
    assert any(n.startswith("no DICOM SEG or SR") for n in notes), notes
    assert "recognised as a head CT from the image" in _pdf_text(tmp_path / "out" / "report.pdf")


@pytest.mark.integration
@pytest.mark.filterwarnings("error")
def test_a_resampled_series_of_a_de_identified_patient_is_analysed_without_a_warning(tmp_path):
    # One slice missing (the volume is resampled: SciPy's affine_transform) and the patient named
    # "REMOVED" (one component: highdicom warned, with the name, for the SEG, the SR and each key image).
    files = write_ct_series(tmp_path / "in", region_labels((22, 40, 40)), patient={"PatientName": "REMOVED"})
    files[10].unlink()
    _, instances = _single_study(tmp_path / "in")
    outcome = analyse_study(instances, tmp_path / "out", PartitionSegmenter())
    assert outcome.status == "done", outcome.reason
    assert any(p.name == "key_axial.dcm" for p in outcome.result_files)
    assert pydicom.dcmread(tmp_path / "out" / "seg.dcm").PatientName == "REMOVED"  # kept as the source has it
