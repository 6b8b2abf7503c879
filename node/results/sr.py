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
- The total of the 10 regions and the three lobe asymmetry indices are TID
  1501 measurement groups (they have no single segment). No standard code
  exists for an asymmetry index: we use the private scheme ``99LOBEVOL``,
  code ``AI``, "Asymmetry index (L-R)/mean" (UCUM "1").
- A region the model did not find (no SEG segment) is a TID 1501 group with
  volume 0 and a Comment saying so.
- With a LABELMAP SEG the Referenced Segment items point to a Label Map
  Segmentation instance; dciodvfy (which predates that SOP class) reports
  them as errors. The default BINARY SEG validates cleanly.
"""
from __future__ import annotations

from typing import TYPE_CHECKING, Mapping, Sequence

import highdicom as hd
import pydicom
from pydicom.sr.codedict import codes
from pydicom.uid import generate_uid

from inference.vocabulary import REGION_KEYS, REGIONS, Region
from inference.vocabulary import __version__
from node.results.derived import (MANUFACTURER, device_serial_number, new_instance_arguments, segmentation_method,
                                   source_names_as_they_are, with_required_patient_study)
from node.results.seg import laterality_code, structure_code

if TYPE_CHECKING:
    from inference.cross_check import CrossCheck
    from node.dicom.volume import SeriesVolume
    from normative.compare import NormativeResult

SR_SERIES_NUMBER = 9102
SR_SERIES_DESCRIPTION = "lobevol SR"

CM3 = hd.sr.CodedConcept("cm3", "UCUM", "cubic centimeter")
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
    no_z_reason = _no_z_reason(normative)
    groups: list = []
    for region in REGIONS:
        groups.append(
            _region_group(
                region, float(results[region.key].volume_cm3), results[region.key], segments.get(region.key),
                seg, datasets[0].SeriesInstanceUID, algorithm, normative.reference, no_z_reason,
            )
        )
    total = _total_group(normative.total, algorithm, normative.reference, no_z_reason, normative.notes)
    if cross_check is not None:
        _add_cross_check(total, cross_check)
    groups.append(total)
    for asymmetry in normative.asymmetry:
        groups.append(_asymmetry_group(asymmetry, algorithm, normative.reference, no_z_reason))
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


def _region_group(
    region: Region,
    volume_cm3: float,
    result,
    segment: tuple[int, str] | None,
    seg: pydicom.Dataset,
    source_series_uid: str,
    algorithm: hd.sr.AlgorithmIdentification,
    reference,
    no_z_reason: str,
):
    finding_site = hd.sr.FindingSite(
        anatomic_location=structure_code(region), laterality=laterality_code(region)
    )
    measurement = _volume_measurement(volume_cm3, result, reference, finding_site)
    evaluations = [_normality_evaluation(result)]
    if segment is None:
        group = hd.sr.MeasurementsAndQualitativeEvaluations(
            tracking_identifier=hd.sr.TrackingIdentifier(uid=hd.UID(), identifier=region.name),
            finding_type=structure_code(region),
            algorithm_id=algorithm,
            finding_sites=[finding_site],
            measurements=[measurement],
            qualitative_evaluations=evaluations,
        )
        _add_comment(group, "region not found by the model: no SEG segment, volume 0")
    else:
        number, tracking_uid = segment
        group = hd.sr.VolumetricROIMeasurementsAndQualitativeEvaluations(
            tracking_identifier=hd.sr.TrackingIdentifier(uid=tracking_uid, identifier=region.name),
            referenced_segment=hd.sr.ReferencedSegment(
                sop_class_uid=seg.SOPClassUID,
                sop_instance_uid=seg.SOPInstanceUID,
                segment_number=number,
                source_series=hd.sr.SourceSeriesForSegmentation(source_series_uid),
            ),
            finding_type=structure_code(region),
            algorithm_id=algorithm,
            finding_sites=[finding_site],
            measurements=[measurement],
            qualitative_evaluations=evaluations,
        )
    if result is None or result.z_score is None:
        _add_comment(group, f"no z-score: {no_z_reason}")
    return group


def _total_group(total, algorithm, reference, no_z_reason: str, notes: Sequence[str]):
    site = hd.sr.FindingSite(anatomic_location=codes.SCT.Brain)
    group = hd.sr.MeasurementsAndQualitativeEvaluations(
        tracking_identifier=hd.sr.TrackingIdentifier(uid=hd.UID(), identifier="Total of the 10 regions"),
        finding_type=codes.SCT.Brain,
        algorithm_id=algorithm,
        finding_sites=[site],
        measurements=[_volume_measurement(float(total.volume_cm3), total, reference, site)],
        qualitative_evaluations=[_normality_evaluation(total)],
    )
    if total.z_score is None:
        _add_comment(group, f"no z-score: {no_z_reason}")
    for note in notes:
        _add_comment(group, note)
    return group


def _asymmetry_group(asymmetry, algorithm, reference, no_z_reason: str):
    structure = next(r for r in REGIONS if r.key == asymmetry.right_key)
    site = hd.sr.FindingSite(anatomic_location=structure_code(structure))
    measurement = hd.sr.Measurement(
        name=ASYMMETRY_INDEX,
        value=float(asymmetry.index),
        unit=NO_UNITS,
        finding_sites=[site],
        properties=_properties(
            asymmetry.flag, asymmetry.reference_mean, asymmetry.reference_sd, NO_UNITS,
            asymmetry.z_score, asymmetry.percentile, reference,
        ),
    )
    group = hd.sr.MeasurementsAndQualitativeEvaluations(
        tracking_identifier=hd.sr.TrackingIdentifier(
            uid=hd.UID(), identifier=f"Asymmetry of the {asymmetry.structure}"
        ),
        finding_type=structure_code(structure),
        algorithm_id=algorithm,
        finding_sites=[site],
        measurements=[measurement],
        qualitative_evaluations=[_normality_evaluation(asymmetry)],
    )
    if asymmetry.z_score is None:
        _add_comment(group, f"no z-score: {no_z_reason}")
    return group


def _volume_measurement(volume_cm3: float, result, reference, site: hd.sr.FindingSite) -> hd.sr.Measurement:
    properties = None
    if result is not None:
        properties = _properties(
            result.flag, result.reference_mean_cm3, result.reference_sd_cm3, CM3,
            result.z_score, result.percentile, reference,
        )
    return hd.sr.Measurement(
        name=codes.SCT.Volume, value=volume_cm3, unit=CM3, finding_sites=[site], properties=properties,
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
