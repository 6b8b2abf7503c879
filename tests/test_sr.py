"""TID 1500 SR writer: content, agreement with the SEG, and the real readers and validators.

dciodvfy (IOD), PixelMed's DicomSRValidator (templates), DCMTK's dsr2html (the
SR as a document) and dcmqi's tid1500reader (3D Slicer's reader) all read
the SR in these tests; OHIF reads it in tests/test_viewer_ohif.py.
"""
from __future__ import annotations

import dataclasses
import json
import re
import shutil
import subprocess
import sys
from pathlib import Path

import highdicom as hd
import numpy as np
import pydicom
import pytest
from scipy import ndimage
from pydicom.sr.codedict import codes

from inference.vocabulary import REGIONS
from node.results.seg import build_seg, region_volumes_from_seg, structure_code
from node.results.sr import build_sr
from tests.dicom_validation import validate, validate_sr_templates
from tests.output_fixtures import (
    MODEL, ct_volume, hand_made_normative, region_labels, region_voxel_volumes_cm3, write_ct_series,
)

# dciodvfy does not know our private coding scheme (declared in CodingSchemeIdentificationSequence).
EXPLAINED_WARNINGS = ("Unrecognized defined term = <99LOBEVOL>",)


def _labels() -> np.ndarray:
    labels = region_labels((12, 40, 40))
    labels[labels == 10] = 0  # the model "missed" the brainstem
    return labels


@pytest.fixture(scope="module")
def study(tmp_path_factory):
    labels = _labels()
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


def _with_uncertain_parietal(normative):
    """The right parietal lobe's z-score made uncertain by a second method 1.6 SD away."""
    regions = list(normative.regions)
    parietal = regions[2]
    regions[2] = dataclasses.replace(parietal, other_method_volume_cm3=parietal.volume_cm3 + 1.6 * parietal.reference_sd_cm3,
                                     method_difference_sd=-1.6, z_range=(parietal.z_score, parietal.z_score + 1.6),
                                     uncertain=True)
    return dataclasses.replace(normative, regions=tuple(regions))


def test_an_uncertain_z_score_is_a_finding_on_its_region_with_both_methods_z(study, tmp_path):
    from node.results.sr import Z_SCORE_CERTAINTY, Z_SCORE_UNCERTAIN

    volume, seg, volumes = study
    normative = _with_uncertain_parietal(hand_made_normative(volumes))
    sr = build_sr(volume, seg, normative, MODEL)
    groups, _ = _groups(sr)
    (finding,) = groups["Right parietal lobe"].get_qualitative_evaluations(name=Z_SCORE_CERTAINTY)
    assert finding.value.value == Z_SCORE_UNCERTAIN.value
    comments = [c.TextValue for c in groups["Right parietal lobe"][0].ContentSequence if c.ValueType == "TEXT"]
    low = normative.regions[2].z_score
    assert any(f"two segmentation methods: {low:+.2f} to {low + 1.6:+.2f}" in text and "uncertain" in text
               for text in comments), comments
    assert not groups["Right frontal lobe"].get_qualitative_evaluations(name=Z_SCORE_CERTAINTY)
    path = tmp_path / "sr.dcm"
    sr.save_as(path)
    assert validate(path).errors == []


@pytest.mark.integration
@pytest.mark.parametrize("with_z", [True, False])
def test_sr_passes_dciodvfy(study, tmp_path, with_z):
    volume, seg, volumes = study
    path = tmp_path / "sr.dcm"
    build_sr(volume, seg, hand_made_normative(volumes, with_z=with_z), MODEL).save_as(path)
    result = validate(path)
    assert result.errors == [], result.output
    assert result.unexplained_warnings(EXPLAINED_WARNINGS) == [], result.output


def _polygon_area(points: np.ndarray) -> float:
    x, y = points[:, 0], points[:, 1]
    return 0.5 * abs(float(np.dot(x[:-1], y[1:]) - np.dot(x[1:], y[:-1])))


def test_found_regions_have_an_outline_group_with_the_same_tracking_uid(study):
    """TID 1410 beside each TID 1411 group: the region's real outline on the image where it is largest."""
    volume, seg, volumes = study
    labels = _labels()
    sr = build_sr(volume, seg, hand_made_normative(volumes), MODEL)
    volumetric, report = _groups(sr)
    planar = {g.tracking_identifier: g for g in report.get_planar_roi_measurement_groups()}
    assert sorted(planar) == sorted(volumetric)
    uids = [str(ds.SOPInstanceUID) for ds in volume.datasets]
    row_mm, column_mm = (float(v) for v in volume.datasets[0].PixelSpacing)
    for region in (r for r in REGIONS if r.key != "brainstem"):
        group = planar[region.name]
        assert group.tracking_uid == volumetric[region.name].tracking_uid
        region_item = group.roi
        assert region_item.GraphicType == "POLYLINE"
        points = np.asarray(region_item.value).reshape(-1, 2)
        assert (points[0] == points[-1]).all(), "the outline is not closed"
        assert len(points) - 1 >= 6, "4 or 5 points make OHIF take the outline for a rectangle"
        counts = (labels == region.value).sum(axis=(1, 2))
        image_uid = region_item.ContentSequence[0].ReferencedSOPSequence[0].ReferencedSOPInstanceUID
        index = uids.index(image_uid)
        assert counts[index] == counts.max()
        component = ndimage.binary_fill_holes(labels[index] == region.value)
        assert _polygon_area(points) == pytest.approx(component.sum()), "the outline does not follow the region"
        (area,) = group.get_measurements(name=codes.SCT.Area)
        assert area.value == pytest.approx(counts[index] * row_mm * column_mm / 100.0)


def test_total_and_asymmetry_measurements_have_image_coordinates(study):
    """TID 320 (INFERRED FROM SCOORD) under the TID 1501 NUMs: OHIF places a group only by a SCOORD."""
    volume, seg, volumes = study
    sr = build_sr(volume, seg, hand_made_normative(volumes), MODEL)
    _, report = _groups(sr)
    for group in report.get_image_measurement_groups():
        (measurement,) = group.get_measurements()
        scoords = [c for c in measurement[0].ContentSequence
                   if c.ValueType == "SCOORD" and c.RelationshipType == "INFERRED FROM"]
        images = {c.ContentSequence[0].ReferencedSOPSequence[0].ReferencedSOPInstanceUID for c in scoords}
        if group.tracking_identifier.startswith("Asymmetry"):
            assert len(scoords) == 2 and len(images) == 1, "both lobes, outlined on one image"
        else:
            assert len(scoords) == 1, group.tracking_identifier
        assert all(len(c.GraphicData) // 2 - 1 >= 6 for c in scoords)


def test_region_findings_are_added_in_one_place(study, monkeypatch):
    """Every normative volume group takes its qualitative findings from ``_region_findings``."""
    from node.results import sr as sr_module
    volume, seg, volumes = study
    concept = hd.sr.CodedConcept("TEST", "99LOBEVOL", "A finding added by a test")
    extra = hd.sr.QualitativeEvaluation(name=concept, value=codes.SCT.NormalityUndetermined)
    original = sr_module._region_findings
    monkeypatch.setattr(sr_module, "_region_findings", lambda result: [*original(result), extra])
    groups, report = _groups(build_sr(volume, seg, hand_made_normative(volumes), MODEL))
    with_extra = [g.tracking_identifier for g in [*groups.values(), *report.get_image_measurement_groups()]
                  if g.get_qualitative_evaluations(name=concept)]
    assert sorted(with_extra) == sorted([r.name for r in REGIONS] + ["Total of the 10 regions"])


#: PixelMed DicomSRValidator (Debian libpixelmed-java, tables of 2022) errors shown wrong by PS3.16's text.
PIXELMED_EXPLAINED_ERRORS = (
    # TID 1500 Row 4 "Procedure reported" takes DCID 100, an Extensible context group (PixelMed's own
    # table says extensible="T"). PS3.16 7.2.3: "An Application may extend an Extensible Context Group by
    # adding terms for new concepts. Applications may not substitute other terms of the same concept in the
    # Context Group." CID 100 has no CT-of-head concept ("CT unspecified body region" is another concept),
    # so SCT 303653007 "Computed tomography of head" is a permitted extension.
    r'\[Row 4\] CODE \(121058,DCM,"Procedure reported"\).*\(303653007,SCT,.*not found in context group 100$',
    # TID 1419 (ROI Measurements) includes TID 310 "Measurement Properties" under its Row 5 NUM (Row 12;
    # PixelMed's own table has it: "Including Template: TID_310" after Row 11), and TID 310 Row 1 is
    # "CODE EV (121402, DCM, "Normality") ... DCID (222)", Row 2 "INCLUDE DTID (311) Measurement Statistical
    # Properties" (mean, SD, z-score, percentile as NUMs, with Population description and Reference
    # Authority), all HAS PROPERTIES of the measurement. PixelMed matches each of our items against every
    # row whose concept name fits, the wildcard rows included ($ModType CODE at Row 6, $DerivationParameter
    # NUM at Rows 13-14), and reports the relationship mismatch there, though the item also matches its
    # TID 310/311 row (where it reports nothing).
    r'ROIMeasurements/\[Row 5\] NUM \*/\[Row 6\] CODE \*: .*/CODE \(121402,DCM,"Normality"\): '
    r'Incorrect relationship - expected HAS CONCEPT MOD - found HAS PROPERTIES$',
    r'ROIMeasurements/\[Row 5\] NUM \*/\[Row 1[34]\] NUM \*: .*/NUM \((373098007,SCT|121414,DCM|121416,DCM|'
    r'121415,DCM),[^)]*\): Incorrect relationship - expected INFERRED FROM - found HAS PROPERTIES$',
    # TID 1500 Row 6 "Imaging Measurements" contains TID 1410, TID 1411 and TID 1501 groups, all
    # "Measurement Group" containers. PixelMed decides which template checks a group by conditions counted
    # over ALL groups of the report (any Referenced Segment in any group sends every group to TID 1411),
    # so our TID 1501 groups (the total, the asymmetries, a region not found: no single segment) are
    # checked as TID 1411 and miss its region references. TID 1501 groups need none.
    r'Template 1411 VolumetricROIMeasurements/\[Row 1\] CONTAINER \(125007,DCM,"Measurement Group"\)/'
    r'\[Row (5|7|10)\] \w+ \((111030|121191|121231),DCM,[^)]*\): within .*: Missing conditional content item$',
)


@pytest.mark.integration
def test_sr_passes_pixelmed_template_validation(study, tmp_path):
    """With z-scores and an uncertain one (the fullest tree; about 20 s of Java, so one run: without z-scores
    is a subset plus comments)."""
    volume, seg, volumes = study
    path = tmp_path / "sr.dcm"
    build_sr(volume, seg, _with_uncertain_parietal(hand_made_normative(volumes)), MODEL).save_as(path)
    result = validate_sr_templates(path)
    assert "Found Root Template TID_1500" in result.output
    assert result.unexplained_errors(PIXELMED_EXPLAINED_ERRORS) == [], result.output


def test_explained_pixelmed_errors_match_only_what_they_explain():
    """The allow-list is not a blanket: a wrong relationship or an unknown procedure code is still an error."""
    still_errors = [
        'Error: Template 1500 MeasurementReport/[Row 1] CONTAINER CID 7021/[Row 4] CODE (121058,DCM,"Procedure '
        'reported"): 1.8: /CONTAINER (126000,DCM,"Imaging Measurement Report")/CODE (121058,DCM,"Procedure '
        'reported"): Code (12345,SCT,"Something") not found in context group 100',
        'Error: Template 1419 ROIMeasurements/[Row 5] NUM */[Row 13] NUM *: 1.9.1.10.3: /CONTAINER (126000,DCM,'
        '"Imaging Measurement Report")/NUM (118565006,SCT,"Volume")/NUM (118565006,SCT,"Volume"): Incorrect '
        'relationship - expected INFERRED FROM - found HAS PROPERTIES',
    ]
    for line in still_errors:
        assert not any(re.search(pattern, line) for pattern in PIXELMED_EXPLAINED_ERRORS), line


def _dsr2html(path: Path) -> str:
    if shutil.which("dsr2html") is None:
        raise RuntimeError("dsr2html not found: install dcmtk (apt-get install dcmtk)")
    completed = subprocess.run(["dsr2html", str(path)], capture_output=True, text=True, timeout=60, check=False)
    assert completed.returncode == 0, completed.stderr
    return completed.stdout


@pytest.mark.integration
def test_dsr2html_renders_every_region_volume_z_score_percentile_and_flag(study, tmp_path):
    volume, seg, volumes = study
    normative = hand_made_normative(volumes)
    path = tmp_path / "sr.dcm"
    build_sr(volume, seg, normative, MODEL).save_as(path)
    html = _dsr2html(path)
    sr = pydicom.dcmread(path)
    for region, result in zip(REGIONS, normative.regions):
        # The region's first group (TID 1411, or TID 1501 when not found) up to the next group.
        start = html.index(f'Tracking Identifier = "{region.name}"')
        section = html[start:html.find("<h3>Measurement Group</h3>", start)]
        shown = _numbers_of_group(sr, region.name)
        assert f"{shown['118565006']} cm3" in section, region.name
        assert f"Z-Score of measurement = <span class=\"under\">{shown['121416']} 1</span>" in section
        assert f"Percentile Ranking of measurement = <span class=\"under\">{shown['121415']} %</span>" in section
        flag = {"within": "Within normal limits", "above": "Abnormally high", "below": "Abnormally low"}[result.flag]
        assert f'<span class="under">{flag}</span>' in section, f"{region.name}: flag {flag} not shown"


def _numbers_of_group(sr: pydicom.Dataset, name: str) -> dict[str, str]:
    """Code value -> the NumericValue text of the region's volume and its properties (first group named ``name``)."""
    measurements = next(c for c in sr.ContentSequence if c.ConceptNameCodeSequence[0].CodeValue == "126010")
    group = next(g for g in measurements.ContentSequence
                 if any(getattr(c, "TextValue", None) == name for c in g.ContentSequence))
    volume_item = next(c for c in group.ContentSequence
                       if c.ValueType == "NUM" and c.ConceptNameCodeSequence[0].CodeValue == "118565006")
    numbers = {"118565006": str(volume_item.MeasuredValueSequence[0].NumericValue)}
    for child in volume_item.ContentSequence:
        if child.ValueType == "NUM":
            numbers[child.ConceptNameCodeSequence[0].CodeValue] = str(child.MeasuredValueSequence[0].NumericValue)
    return numbers


def _tid1500reader() -> str:
    reader = shutil.which("tid1500reader") or str(Path(sys.executable).parent / "tid1500reader")
    if not Path(reader).is_file():
        raise RuntimeError("tid1500reader not found: install dcmqi (pip install dcmqi, in the test extras)")
    return reader


@pytest.mark.integration
def test_dcmqi_tid1500reader_reads_every_region_volume_and_z_score(study, tmp_path):
    volume, seg, volumes = study
    normative = hand_made_normative(volumes)
    path, out = tmp_path / "sr.dcm", tmp_path / "sr.json"
    build_sr(volume, seg, normative, MODEL).save_as(path)
    completed = subprocess.run([_tid1500reader(), "--inputDICOM", str(path), "--outputMetadata", str(out)],
                               capture_output=True, text=True, timeout=120, check=False)
    assert completed.returncode == 0, completed.stdout + completed.stderr
    read = json.loads(out.read_text())
    volumes_read, z_read = {}, {}
    for group in read["Measurements"]:
        for item in group["measurementItems"]:
            if item["quantity"]["CodeValue"] == "118565006":
                volumes_read[group["TrackingIdentifier"]] = float(item["value"])
                z_read[group["TrackingIdentifier"]] = {
                    p["numProperty"]["CodeValue"]: float(p["numPropertyValue"])
                    for p in item.get("measurementNumProperties", [])}.get("121416")
    for region, result in zip(REGIONS, normative.regions):
        assert volumes_read[region.name] == pytest.approx(result.volume_cm3, rel=1e-6), region.name
        assert z_read[region.name] == pytest.approx(result.z_score, abs=1e-6), region.name
