"""Comprehensive 3D SR with a TID 1500 Measurement Report of the region volumes.

Structure (written with highdicom.sr):

- Observation context: a device observer (this node: name "lobevol",
  manufacturer, the model as Model Name, the host as serial number).
- Procedure reported: Computed tomography of head (SCT 303653007).
- One TID 1411 Volumetric ROI group per region found in the SEG, with its
  Referenced Segment (the SEG segment whose Tracking ID is the region key;
  the group uses that segment's Tracking UID), finding type = the structure,
  finding site = structure + laterality (SCT 24028007 / 7771000), the
  algorithm (lobevol, version, model sha256), and one TID 300 measurement:
  Volume (SCT 118565006) in UCUM ``cm3``.
- Normative deviation, encoded in the measurement's properties (TID 310):
  Normality (DCM 121402) from CID 222 (Normal 17621005 / Abnormally high
  371879000 / Abnormally low 371880002 / Normality undetermined 371934000),
  and TID 311 Measurement Statistical Properties holding Mean value of
  population (SCT 373098007) and Standard deviation of population (DCM
  121414) from CID 226, Z-Score of measurement (DCM 121416, UCUM "1") and
  Percentile Ranking of measurement (DCM 121415, UCUM "%") from CID 227,
  with Population description (DCM 121405: reference name, version,
  population, n, ages, age/sex adjustment) and Reference Authority (DCM
  121406: the citation). The group also carries a qualitative evaluation
  Normality = Within normal limits (SCT 125112009) / Abnormally high /
  Abnormally low / Normality undetermined, the value viewers show.
- When no z-score applies, the group says why in a TEXT item Comment (DCM
  121106), from the normative notes.
- Beside each TID 1411 group, a TID 1410 Planar ROI group with the same
  Tracking Identifier and Tracking Unique Identifier (the same region):
  the region's closed POLYLINE outline (Image Region, SCOORD) on the
  source image where the region is largest, read from the SEG's frames
  (:mod:`node.results.outlines`), and its Area (SCT 42798000, ``cm2``)
  there. OHIF places a measurement group only by a SCOORD in it and
  merges groups by Tracking Unique Identifier, so it shows the volume on
  that outline; without one it fails to open the SR.
- The total of the 10 regions and the four lobe asymmetry indices are TID
  1501 measurement groups (they have no single segment); their NUM has
  TID 320 image coordinates (INFERRED FROM SCOORD): the brain's outline
  for the total, both lobes' outlines (two SCOORDs) on one image for an asymmetry. No
  standard code exists for an asymmetry index: we use the private scheme
  ``99LOBEVOL``, code ``AI``, "Asymmetry index (L-R)/mean" (UCUM "1").
- A region the model did not find (no SEG segment) is a TID 1501 group with
  volume 0, measured within the brain outline (its coordinates), and a
  Comment saying so.
- Per-region qualitative findings come from one place,
  ``_region_findings``: Normality, and "Certainty of the z-score: Uncertain" (99LOBEVOL)
  when the cross-check's two methods differ by more than one reference SD, with the
  two methods' z-scores in a Comment.
- With a LABELMAP SEG the Referenced Segment items point to a Label Map
  Segmentation instance; dciodvfy (which predates that SOP class) reports
  them as errors. The default BINARY SEG validates cleanly.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Mapping, Sequence

import highdicom as hd
import numpy as np
import pydicom
from pydicom.sr.codedict import codes
from pydicom.uid import generate_uid

from inference.vocabulary import REGION_KEYS, REGIONS, Region
from inference.vocabulary import __version__
from node.results.derived import (MANUFACTURER, device_serial_number, new_instance_arguments, segmentation_method,
                                   source_names_as_they_are, with_required_patient_study)
from node.results.outlines import Outline, PlaneLabels, SourcePlane, source_planes
from node.results.seg import laterality_code, structure_code

if TYPE_CHECKING:
    from inference.cross_check import CrossCheck
    from node.dicom.volume import SeriesVolume
    from normative.compare import NormativeResult

SR_SERIES_NUMBER = 9102
SR_SERIES_DESCRIPTION = "lobevol SR"

CM3 = hd.sr.CodedConcept("cm3", "UCUM", "cubic centimeter")
CM2 = hd.sr.CodedConcept("cm2", "UCUM", "square centimeter")
NO_UNITS = hd.sr.CodedConcept("1", "UCUM", "no units")
PERCENT = hd.sr.CodedConcept("%", "UCUM", "Percent")
ASYMMETRY_INDEX = hd.sr.CodedConcept("AI", "99LOBEVOL", "Asymmetry index (L-R)/mean")
STANDARD_DEVIATION_OF_POPULATION = hd.sr.CodedConcept("121414", "DCM", "Standard deviation of population")

#: Normality per flag: (TID 310 value from CID 222, qualitative evaluation value).
_NORMALITY = {
    "within": (codes.SCT.Normal, codes.SCT.WithinNormalLimits),
    "above": (codes.SCT.AbnormallyHigh, codes.SCT.AbnormallyHigh),
    "below": (codes.SCT.AbnormallyLow, codes.SCT.AbnormallyLow),
    None: (codes.SCT.NormalityUndetermined, codes.SCT.NormalityUndetermined),
}


def build_sr(
    volume: SeriesVolume,
    seg: pydicom.Dataset,
    normative: NormativeResult,
    model: Mapping[str, object],
    *,
    series_number: int = SR_SERIES_NUMBER,
    cross_check: CrossCheck | None = None,
) -> hd.sr.Comprehensive3DSR:
    """Build the TID 1500 Measurement Report of the region volumes.

    Args:
        volume: the ``SeriesVolume`` analysed (its ``datasets`` are the
            evidence and the source series).
        seg: the SEG written by :func:`node.results.seg.build_seg` for these labels.
        normative: ``NormativeResult`` from :func:`normative.compare.compare`: the
            volumes (cm3) of all 10 regions with their deviations.
        model: the model description (``Segmentation.model``).
        series_number: Series Number of the new series.
    """
    results = {result.key: result for result in normative.regions}
    missing = [key for key in REGION_KEYS if key not in results]
    if missing:
        raise ValueError(f"the normative result lacks regions: {', '.join(missing)}")
    datasets = list(volume.datasets)
    if not datasets:
        raise ValueError("the series volume has no source images")
    if seg.StudyInstanceUID != datasets[0].StudyInstanceUID:
        raise ValueError("the SEG belongs to another study than the source images")
    algorithm = hd.sr.AlgorithmIdentification(
        name=MANUFACTURER,
        version=str(model.get("code_version") or __version__)[:64],
        parameters=[f"method={segmentation_method(model)}", f"weights_sha256={model.get('weights_sha256', '')}",
                    f"model={model.get('name', '')}"]
        + [f"{key}={model[key]}" for key in ("test_time_augmentation", "surface_refinement") if key in model],
    )
    segments = _segments_by_key(seg)
    # Left first, as in (L-R). OHIF draws only the first outline: its label lands on a lobe's own outline
    # (and label) only when the pair's image is also the left lobe's own image.
    pairs = {_pair_key(a): (a.left_key, a.right_key) for a in normative.asymmetry}
    planes = source_planes(datasets)
    outlines = _outlines(seg, planes, segments, pairs)
    no_z_reason = _no_z_reason(normative)
    context = _GroupContext(datasets, planes, algorithm, normative.reference, no_z_reason, outlines)
    groups: list = []
    for region in REGIONS:
        groups += _region_groups(region, results[region.key], segments.get(region.key), seg, context)
    total = _total_group(normative.total, context, normative.notes)
    if cross_check is not None:
        _add_cross_check(total, cross_check)
    groups.append(total)
    for asymmetry in normative.asymmetry:
        groups.append(_asymmetry_group(asymmetry, context))
    report = hd.sr.MeasurementReport(
        observation_context=_observation_context(model),
        procedure_reported=codes.SCT.ComputedTomographyOfHead,
        imaging_measurements=groups,
    )
    with source_names_as_they_are():
        sr = hd.sr.Comprehensive3DSR(
            evidence=[*with_required_patient_study(datasets), seg],
            content=report,
            **new_instance_arguments(series_number),
            is_complete=True,
        )
    sr.SeriesDescription = SR_SERIES_DESCRIPTION
    sr.CodingSchemeIdentificationSequence = [_private_scheme_identification()]
    return sr


def _private_scheme_identification() -> pydicom.Dataset:
    """Declare the private coding scheme of the asymmetry index (PS3.3 C.12.1.1.8)."""
    item = pydicom.Dataset()
    item.CodingSchemeDesignator = ASYMMETRY_INDEX.scheme_designator
    item.CodingSchemeName = "lobevol local codes"
    item.CodingSchemeResponsibleOrganization = "lobevol project"
    return item


def _segments_by_key(seg: pydicom.Dataset) -> dict[str, tuple[int, str]]:
    """Region key -> (segment number, tracking UID) for the SEG's described regions."""
    return {
        str(item.TrackingID): (int(item.SegmentNumber), str(item.TrackingUID))
        for item in seg.SegmentSequence
        if "TrackingID" in item
    }


def _observation_context(model: Mapping[str, object]) -> hd.sr.ObservationContext:
    host = device_serial_number()
    device = hd.sr.DeviceObserverIdentifyingAttributes(
        # Stable per host, so all reports of one node carry the same device UID.
        uid=generate_uid(entropy_srcs=["lobevol device", host]),
        name=MANUFACTURER,
        manufacturer_name=MANUFACTURER,
        model_name=f"{model.get('name', 'model')} ({MANUFACTURER} {__version__})"[:64],
        serial_number=host,
    )
    return hd.sr.ObservationContext(
        observer_device_context=hd.sr.ObserverContext(
            observer_type=codes.DCM.Device, observer_identifying_attributes=device
        )
    )


def _no_z_reason(normative) -> str:
    """Plain-language reason why z-scores are missing (from the normative notes)."""
    notes = "; ".join(normative.notes)
    return notes or "no reference value for this measurement"


@dataclass(frozen=True)
class _GroupContext:
    """What every measurement group of one report shares."""

    datasets: Sequence[pydicom.Dataset]
    #: The source image planes the outlines' ``image_index`` counts.
    planes: Sequence[SourcePlane]
    algorithm: hd.sr.AlgorithmIdentification
    reference: object
    no_z_reason: str
    #: Region key -> its outline; BRAIN -> the brain's; _pair_key -> the two regions' on one image.
    outlines: Mapping[str, tuple[Outline, ...]]

    def coordinates(self, key: str) -> list[hd.sr.CoordinatesForMeasurement]:
        """TID 320 image coordinates (one SCOORD per outline) of ``key``'s outlines; none if it has none."""
        return [
            hd.sr.CoordinatesForMeasurement(
                graphic_type=hd.sr.GraphicTypeValues.POLYLINE,
                graphic_data=outline.points,
                source_image=self.planes[outline.image_index].source_image(),
            )
            for outline in self.outlines.get(key, ())
        ]


#: Key of the outline of all regions together (the brain) in ``_GroupContext.outlines``.
BRAIN = "brain"


def _outlines(seg: pydicom.Dataset, planes: Sequence[SourcePlane], segments: Mapping[str, tuple[int, str]],
              pairs: Mapping[str, tuple[str, str]]) -> dict[str, tuple[Outline, ...]]:
    """Outlines on the source image planes, read from the SEG's own frames (so they are what the SEG holds).

    Each segment and the brain (all segments) on the plane where it is
    largest; each pair of regions (an asymmetry) both on the plane where
    the two together are largest.
    """
    numbers = {key: number for key, (number, _) in segments.items()}
    labels = PlaneLabels(_segment_numbers_on_planes(seg, planes, sorted(numbers.values())))
    outlines = {key: labels.outlines_where_largest([[number]]) for key, number in numbers.items()}
    outlines[BRAIN] = labels.outlines_where_largest([list(numbers.values())])
    for key, members in pairs.items():
        outlines[key] = labels.outlines_where_largest([[numbers[m]] for m in members if m in numbers])
    return {key: tuple(found) for key, found in outlines.items() if found}


def _segment_numbers_on_planes(seg: pydicom.Dataset, planes: Sequence[SourcePlane],
                               numbers: Sequence[int]) -> np.ndarray:
    """(planes, rows, columns): the SEG's segment number at every pixel of every source plane (0: none)."""
    segmentation = seg if isinstance(seg, hd.seg.Segmentation) else hd.seg.Segmentation.from_dataset(seg)
    # The SEG omits empty frames (build_seg), so a source plane it does not reference is empty.
    options = dict(segment_numbers=list(numbers), combine_segments=True, skip_overlap_checks=True,
                   assert_missing_frames_are_empty=True)
    if all(plane.frame_number is None for plane in planes):
        return np.asarray(segmentation.get_pixels_by_source_instance(
            source_sop_instance_uids=[str(plane.dataset.SOPInstanceUID) for plane in planes], **options))
    stacks, instances = [], dict.fromkeys(str(plane.dataset.SOPInstanceUID) for plane in planes)
    for uid in instances:
        frames = [plane.frame_number for plane in planes if str(plane.dataset.SOPInstanceUID) == uid]
        stacks.append(np.asarray(segmentation.get_pixels_by_source_frame(
            source_sop_instance_uid=uid, source_frame_numbers=frames, **options)))
    return np.concatenate(stacks)


def _pair_key(asymmetry) -> str:
    """Key of the outlines of an asymmetry's two regions."""
    return f"{asymmetry.right_key}+{asymmetry.left_key}"


def _region_groups(region: Region, result, segment: tuple[int, str] | None, seg: pydicom.Dataset,
                   context: _GroupContext) -> list:
    """A found region: its TID 1411 volume group and a TID 1410 outline group (same tracking UID).

    The TID 1410 group is for viewers that place a measurement only by a
    SCOORD in its group (OHIF): they merge groups by Tracking Unique
    Identifier, so the volume is shown on the region's outline. A region
    the model did not find is one TID 1501 group with volume 0.
    """
    finding_site = hd.sr.FindingSite(anatomic_location=structure_code(region), laterality=laterality_code(region))
    if segment is None:
        # No segment, no outline of its own: the volume 0 was measured within the brain outline.
        measurement = _volume_measurement(float(result.volume_cm3), result, context, finding_site, BRAIN)
        group = hd.sr.MeasurementsAndQualitativeEvaluations(
            tracking_identifier=hd.sr.TrackingIdentifier(uid=hd.UID(), identifier=region.name),
            finding_type=structure_code(region),
            algorithm_id=context.algorithm,
            finding_sites=[finding_site],
            measurements=[measurement],
            qualitative_evaluations=_region_findings(result),
        )
        _add_comment(group, "region not found by the model: no SEG segment, volume 0")
        _explain_z(group, result, context)
        return [group]
    number, tracking_uid = segment
    volumetric = hd.sr.VolumetricROIMeasurementsAndQualitativeEvaluations(
        tracking_identifier=hd.sr.TrackingIdentifier(uid=tracking_uid, identifier=region.name),
        referenced_segment=hd.sr.ReferencedSegment(
            sop_class_uid=seg.SOPClassUID,
            sop_instance_uid=seg.SOPInstanceUID,
            segment_number=number,
            source_series=hd.sr.SourceSeriesForSegmentation(context.datasets[0].SeriesInstanceUID),
        ),
        finding_type=structure_code(region),
        algorithm_id=context.algorithm,
        finding_sites=[finding_site],
        measurements=[_volume_measurement(float(result.volume_cm3), result, context, finding_site)],
        qualitative_evaluations=_region_findings(result),
    )
    _explain_z(volumetric, result, context)
    groups = [volumetric]
    for outline in context.outlines.get(region.key, ()):
        groups.append(_outline_group(region, tracking_uid, outline, finding_site, context))
    return groups


def _region_findings(result) -> list[hd.sr.QualitativeEvaluation]:
    """The qualitative findings of a region's (or the total's) volume, beside it in its group.

    The one place to add a per-region qualitative finding (a CODE
    concept and value, as ``hd.sr.QualitativeEvaluation``): every group
    that carries a normative volume takes its findings from here.
    """
    findings = [_normality_evaluation(result)]
    if getattr(result, "uncertain", False):
        findings.append(hd.sr.QualitativeEvaluation(name=Z_SCORE_CERTAINTY, value=Z_SCORE_UNCERTAIN))
    return findings


def _outline_group(region: Region, tracking_uid: str, outline: Outline, finding_site: hd.sr.FindingSite,
                   context: _GroupContext) -> hd.sr.PlanarROIMeasurementsAndQualitativeEvaluations:
    """TID 1410: the region's outline on its representative image, with its area there."""
    row_mm, column_mm = context.planes[outline.image_index].pixel_spacing_mm
    area = hd.sr.Measurement(
        name=codes.SCT.Area, value=outline.pixel_count * row_mm * column_mm / 100.0, unit=CM2,
        finding_sites=[finding_site],
    )
    return hd.sr.PlanarROIMeasurementsAndQualitativeEvaluations(
        tracking_identifier=hd.sr.TrackingIdentifier(uid=tracking_uid, identifier=region.name),
        referenced_region=hd.sr.ImageRegion(
            graphic_type=hd.sr.GraphicTypeValues.POLYLINE,
            graphic_data=outline.points,
            source_image=context.planes[outline.image_index].source_image(),
        ),
        finding_type=structure_code(region),
        algorithm_id=context.algorithm,
        finding_sites=[finding_site],
        measurements=[area],
    )


def _explain_z(group, result, context: _GroupContext) -> None:
    """A comment when there is no z-score (why), or when two methods give a range of z (which)."""
    if result is None or result.z_score is None:
        _add_comment(group, f"no z-score: {context.no_z_reason}")
    elif getattr(result, "z_range", None) is not None:
        low, high = result.z_range
        _add_comment(group, f"z-score of the two segmentation methods: {low:+.2f} to {high:+.2f} (volumes "
                            f"{result.method_difference_sd:+.1f} reference SD apart)"
                     + ("; uncertain: the methods differ by more than one SD" if result.uncertain else ""))


def _total_group(total, context: _GroupContext, notes: Sequence[str]):
    site = hd.sr.FindingSite(anatomic_location=codes.SCT.Brain)
    group = hd.sr.MeasurementsAndQualitativeEvaluations(
        tracking_identifier=hd.sr.TrackingIdentifier(uid=hd.UID(), identifier="Total of the 10 regions"),
        finding_type=codes.SCT.Brain,
        algorithm_id=context.algorithm,
        finding_sites=[site],
        measurements=[_volume_measurement(float(total.volume_cm3), total, context, site, BRAIN)],
        qualitative_evaluations=_region_findings(total),
    )
    _explain_z(group, total, context)
    for note in notes:
        _add_comment(group, note)
    return group


def _asymmetry_group(asymmetry, context: _GroupContext):
    structure = next(r for r in REGIONS if r.key == asymmetry.right_key)
    site = hd.sr.FindingSite(anatomic_location=structure_code(structure))
    measurement = hd.sr.Measurement(
        name=ASYMMETRY_INDEX,
        value=float(asymmetry.index),
        unit=NO_UNITS,
        finding_sites=[site],
        properties=_properties(
            asymmetry.flag, asymmetry.reference_mean, asymmetry.reference_sd, NO_UNITS,
            asymmetry.z_score, asymmetry.percentile, context.reference,
        ),
        # The index compares the two lobes: their outlines on the image showing both best.
        referenced_coordinates=context.coordinates(_pair_key(asymmetry)) or None,
    )
    group = hd.sr.MeasurementsAndQualitativeEvaluations(
        tracking_identifier=hd.sr.TrackingIdentifier(
            uid=hd.UID(), identifier=f"Asymmetry of the {asymmetry.structure}"
        ),
        finding_type=structure_code(structure),
        algorithm_id=context.algorithm,
        finding_sites=[site],
        measurements=[measurement],
        qualitative_evaluations=[_normality_evaluation(asymmetry)],
    )
    _explain_z(group, asymmetry, context)
    return group


def _volume_measurement(volume_cm3: float, result, context: _GroupContext, site: hd.sr.FindingSite,
                        outline_key: str | None = None) -> hd.sr.Measurement:
    """Volume NUM with its normative properties; TID 320 coordinates of ``outline_key``'s outline if given."""
    properties = None
    if result is not None:
        properties = _properties(
            result.flag, result.reference_mean_cm3, result.reference_sd_cm3, CM3,
            result.z_score, result.percentile, context.reference,
        )
    coordinates = context.coordinates(outline_key) if outline_key else []
    return hd.sr.Measurement(
        name=codes.SCT.Volume, value=volume_cm3, unit=CM3, finding_sites=[site], properties=properties,
        referenced_coordinates=coordinates or None,
    )


def _properties(flag, mean, sd, unit, z_score, percentile, reference) -> hd.sr.MeasurementProperties:
    """TID 310: normality (CID 222) and TID 311 statistics against the reference."""
    values = [
        _num(codes.SCT.MeanValueOfPopulation, mean, unit),
        _num(STANDARD_DEVIATION_OF_POPULATION, sd, unit),
        _num(codes.DCM.ZScoreOfMeasurement, z_score, NO_UNITS),
        _num(codes.DCM.PercentileRankingOfMeasurement, percentile, PERCENT),
    ]
    values = [v for v in values if v is not None]
    statistics = None
    if values:
        statistics = hd.sr.MeasurementStatisticalProperties(
            values=values,
            description=population_description(reference),
            authority=reference.citation,
        )
    return hd.sr.MeasurementProperties(
        normality=_NORMALITY[flag][0], measurement_statistical_properties=statistics
    )


def population_description(reference) -> str:
    """One line naming the reference population (used by the SR and the PDF)."""
    low, high = reference.age_range_years
    return (
        f"{reference.name} {reference.version}: {reference.population}, n={reference.n}, "
        f"ages {low:g}-{high:g} years, {reference.kind}"
    )


def _num(name, value, unit) -> hd.sr.NumContentItem | None:
    if value is None:
        return None
    return hd.sr.NumContentItem(
        name=name, value=float(value), unit=unit, relationship_type=hd.sr.RelationshipTypeValues.HAS_PROPERTIES
    )


def _normality_evaluation(result) -> hd.sr.QualitativeEvaluation:
    flag = None if result is None else result.flag
    if flag not in _NORMALITY:
        raise ValueError(f"unknown normative flag {flag!r}; expected 'below', 'within', 'above' or None")
    return hd.sr.QualitativeEvaluation(name=codes.DCM.Normality, value=_NORMALITY[flag][1])


#: A region's z-score made uncertain by the cross-check (private scheme, as the agreement below):
#: the two methods' volumes differ by more than one reference SD (normative.compare).
Z_SCORE_CERTAINTY = hd.sr.CodedConcept("ZC", "99LOBEVOL", "Certainty of the z-score")
Z_SCORE_UNCERTAIN = hd.sr.CodedConcept("ZU", "99LOBEVOL", "Uncertain: segmentation methods differ by more than one SD")

#: The cross-check's quality finding (private scheme: DICOM has no code for two methods' agreement).
METHOD_AGREEMENT = hd.sr.CodedConcept("MA", "99LOBEVOL", "Agreement of segmentation methods")
METHODS_AGREE = hd.sr.CodedConcept("MAY", "99LOBEVOL", "Methods agree")
METHODS_DISAGREE = hd.sr.CodedConcept("MAN", "99LOBEVOL", "Methods disagree: review the regions")


def _add_cross_check(group, cross_check) -> None:
    """The cross-check as a qualitative evaluation of the total, with the per-region Dice as a comment."""
    container = group[0]
    container.ContentSequence.append(hd.sr.CodeContentItem(
        name=METHOD_AGREEMENT, value=METHODS_AGREE if cross_check.agrees else METHODS_DISAGREE,
        relationship_type=hd.sr.RelationshipTypeValues.CONTAINS))
    per_region = ", ".join(f"{r.key} {r.dice:.2f}" for r in cross_check.regions)
    _add_comment(group, f"{cross_check.message}. Dice per region: {per_region}")


def _add_comment(group, text: str) -> None:
    """Append a TEXT Comment (DCM 121106) to a measurement group's container."""
    container = group[0]
    container.ContentSequence.append(
        hd.sr.TextContentItem(
            name=codes.DCM.Comment, value=text[:1024], relationship_type=hd.sr.RelationshipTypeValues.CONTAINS
        )
    )
