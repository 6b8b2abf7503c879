"""TID 1500 SR writer: content, agreement with the SEG, validation with dciodvfy."""
from __future__ import annotations

import dataclasses

import highdicom as hd
import pytest
from pydicom.sr.codedict import codes

from inference.vocabulary import REGIONS
from node.results.seg import build_seg, region_volumes_from_seg, structure_code
from node.results.sr import build_sr
from tests.dicom_validation import validate
from tests.output_fixtures import (
    MODEL, ct_volume, hand_made_normative, region_labels, region_voxel_volumes_cm3, write_ct_series,
)

# dciodvfy does not know our private coding scheme (declared in CodingSchemeIdentificationSequence).
EXPLAINED_WARNINGS = ("Unrecognized defined term = <99LOBEVOL>",)


@pytest.fixture(scope="module")
def study(tmp_path_factory):
    labels = region_labels((12, 40, 40))
    labels[labels == 10] = 0  # the model "missed" the brainstem
    volume = ct_volume(write_ct_series(tmp_path_factory.mktemp("ct"), labels))
    seg = build_seg(volume, labels, MODEL)
    volumes = region_voxel_volumes_cm3(labels, 4 * 4 * 5)
    return volume, seg, volumes


def _groups(sr):
    """(volumetric groups by tracking identifier, the parsed TID 1500 report)."""
    report = hd.sr.MeasurementReport.from_sequence([sr])
    return {g.tracking_identifier: g for g in report.get_volumetric_roi_measurement_groups()}, report


def test_region_groups_reference_segments_and_match_seg_volumes(study):
    volume, seg, volumes = study
    sr = build_sr(volume, seg, hand_made_normative(volumes), MODEL)
    groups, _ = _groups(sr)
    seg_volumes = region_volumes_from_seg(seg, volume.datasets)
    segment_numbers = {item.TrackingID: item.SegmentNumber for item in seg.SegmentSequence}
    found = [r for r in REGIONS if r.key != "brainstem"]
    assert sorted(groups) == sorted(r.name for r in found)
    for region in found:
        group = groups[region.name]
        assert group.referenced_segment.referenced_segment_numbers == [segment_numbers[region.key]]
        (volume_item,) = group.get_measurements(name=codes.SCT.Volume)
        assert volume_item.unit.value == "cm3"
        assert volume_item.value == pytest.approx(seg_volumes[region.key], rel=0.005)
        site = group.finding_sites[0]
        assert site.value == structure_code(region)
        laterality = [c.ConceptCodeSequence[0].CodeValue for c in site.ContentSequence] if region.laterality else []
        assert laterality == {"right": ["24028007"], "left": ["7771000"], None: []}[region.laterality]


def test_normative_statistics_and_normality_are_encoded(study):
    volume, seg, volumes = study
    normative = hand_made_normative(volumes)
    sr = build_sr(volume, seg, normative, MODEL)
    groups, _ = _groups(sr)
    result = normative.regions[0]
    (item,) = groups["Right frontal lobe"].get_measurements(name=codes.SCT.Volume)
    stats = {
        c.ConceptNameCodeSequence[0].CodeValue: c for c in item[0].ContentSequence
        if c.RelationshipType == "HAS PROPERTIES"
    }
    assert float(stats["121416"].MeasuredValueSequence[0].NumericValue) == pytest.approx(result.z_score, abs=1e-6)
    assert float(stats["121415"].MeasuredValueSequence[0].NumericValue) == pytest.approx(result.percentile, abs=1e-6)
    assert float(stats["373098007"].MeasuredValueSequence[0].NumericValue) == pytest.approx(result.reference_mean_cm3)
    assert stats["121406"].TextValue == normative.reference.citation
    assert "n=1487" in stats["121405"].TextValue
    evaluations = groups["Right frontal lobe"].get_qualitative_evaluations(name=codes.DCM.Normality)
    expected = {"within": "125112009", "above": "371879000", "below": "371880002"}[result.flag]
    assert evaluations[0].value.value == expected


def test_missing_z_scores_are_explained(study):
    volume, seg, volumes = study
    normative = hand_made_normative(volumes, with_z=False)
    sr = build_sr(volume, seg, normative, MODEL)
    groups, _ = _groups(sr)
    group = groups["Left temporal lobe"]
    comments = [c.TextValue for c in group[0].ContentSequence if c.ValueType == "TEXT"
                and c.ConceptNameCodeSequence[0].CodeValue == "121106"]
    assert any("age is unknown" in text for text in comments)
    assert group.get_qualitative_evaluations()[0].value.value == "371934000"  # Normality undetermined


def test_total_asymmetry_and_missing_region_groups(study):
    volume, seg, volumes = study
    normative = hand_made_normative(volumes)
    sr = build_sr(volume, seg, normative, MODEL)
    _, report = _groups(sr)
    others = {g.tracking_identifier: g for g in report.get_image_measurement_groups()}
    assert {"Total of the 10 regions", "Brainstem", "Asymmetry of the frontal lobe"} <= set(others)
    (total,) = others["Total of the 10 regions"].get_measurements(name=codes.SCT.Volume)
    assert total.value == pytest.approx(sum(volumes.values()))
    comments = [c.TextValue for c in others["Brainstem"][0].ContentSequence if c.ValueType == "TEXT"]
    assert any("not found" in text for text in comments)


def test_sr_is_in_the_source_study_and_refuses_bad_input(study):
    volume, seg, volumes = study
    sr = build_sr(volume, seg, hand_made_normative(volumes), MODEL)
    source = volume.datasets[0]
    assert sr.StudyInstanceUID == source.StudyInstanceUID and sr.PatientID == source.PatientID
    assert sr.SeriesInstanceUID not in (source.SeriesInstanceUID, seg.SeriesInstanceUID)
    evidence_series = {s.SeriesInstanceUID for s in sr.CurrentRequestedProcedureEvidenceSequence[0].ReferencedSeriesSequence}
    assert {source.SeriesInstanceUID, seg.SeriesInstanceUID} <= evidence_series
    with pytest.raises(ValueError, match="cerebellum"):
        normative = hand_made_normative(volumes)
        build_sr(volume, seg, dataclasses.replace(
            normative, regions=tuple(r for r in normative.regions if r.key != "cerebellum")), MODEL)


@pytest.mark.integration
@pytest.mark.parametrize("with_z", [True, False])
def test_sr_passes_dciodvfy(study, tmp_path, with_z):
    volume, seg, volumes = study
    path = tmp_path / "sr.dcm"
    build_sr(volume, seg, hand_made_normative(volumes, with_z=with_z), MODEL).save_as(path)
    result = validate(path)
    assert result.errors == [], result.output
    assert result.unexplained_warnings(EXPLAINED_WARNINGS) == [], result.output
