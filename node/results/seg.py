"""DICOM Segmentation (SEG) of the 10 brain regions, written with highdicom.

One segment per region, segment number = label value (1..10, see
:mod:`inference.vocabulary`), so the SR can reference segments by label value.

Choices:
- Codes are pydicom's ``codes`` (DICOM PS3.16): category "Anatomical
  Structure" (SCT 91723000); type frontal / parietal / occipital / temporal
  lobe, cerebellum, brain stem (CID 7151). Brain stem is SCT 119238007, the
  code DICOM's CID 7140/7151 and pydicom use (not 15926001).
  Laterality goes where the SEG IOD puts it: a Segmented Property Type
  Modifier (SCT 24028007 right, 7771000 left).
- Frames lie on the source images' planes: the caller samples the label map
  on every source slice (``SeriesVolume.labels_on_source_slices``) and
  highdicom derives each frame's position and source-image reference from the
  source datasets, so a tilted or unevenly spaced series is referenced
  exactly, image by image.
- BINARY by default (what most viewers display); LABELMAP on request. Empty
  frames are omitted, and so are regions the model did not find: the
  present regions are numbered 1..N in label order (the standard wants no
  gaps) and carry their region key as Tracking ID, which is how the SR and
  :func:`segment_numbers_by_key` find them.
- BINARY is written uncompressed (every viewer reads it); LABELMAP with RLE
  Lossless (a label map compresses well).
- LABELMAP (Label Map Segmentation Storage, Supplement 243, 2024): the
  background is the Pixel Padding Value (0), not a segment, so the Segment
  Sequence describes the regions only. highdicom 0.28 adds a "Background"
  item numbered 0; we drop it, because viewers that colour segments by their
  position in the sequence (OHIF 3.x) would then paint every region in its
  predecessor's colour. dicom3tools' dciodvfy (2022) predates this SOP class.
"""
from __future__ import annotations

from typing import TYPE_CHECKING, Mapping, Sequence

import highdicom as hd
import numpy as np
import pydicom
from pydicom.sr.codedict import codes
from pydicom.uid import ExplicitVRLittleEndian, RLELossless

from inference.vocabulary import NUM_CLASSES, REGIONS, Region
from inference.vocabulary import __version__
from inference.volumes import label_volumes_mm3, slice_extents_mm
from node.dicom.geometry import positions_along, slice_normal
from node.results.derived import (MANUFACTURER, new_instance_arguments, segmentation_method,
                                   source_names_as_they_are, with_required_patient_study)

if TYPE_CHECKING:
    from node.dicom.volume import SeriesVolume

SEG_SERIES_NUMBER = 9101
SEG_SERIES_DESCRIPTION = "lobevol SEG"

_STRUCTURE_CODES = {
    "frontal lobe": codes.SCT.FrontalLobe,
    "parietal lobe": codes.SCT.ParietalLobe,
    "occipital lobe": codes.SCT.OccipitalLobe,
    "temporal lobe": codes.SCT.TemporalLobe,
    "cerebellum": codes.SCT.Cerebellum,
    "brainstem": codes.SCT.BrainStem,
}
_LATERALITY_CODES = {"right": codes.SCT.Right, "left": codes.SCT.Left}


def structure_code(region: Region) -> hd.sr.CodedConcept:
    """SNOMED CT code of the region's anatomical structure (without laterality)."""
    try:
        code = _STRUCTURE_CODES[region.structure]
    except KeyError:
        raise ValueError(f"no SNOMED CT code for structure {region.structure!r}") from None
    return hd.sr.CodedConcept.from_code(code)


def laterality_code(region: Region) -> hd.sr.CodedConcept | None:
    """SNOMED CT code of the region's laterality, None for unpaired structures."""
    if region.laterality is None:
        return None
    return hd.sr.CodedConcept.from_code(_LATERALITY_CODES[region.laterality])


def algorithm_identification(model: Mapping[str, object]) -> hd.AlgorithmIdentificationSequence:
    """Algorithm Identification: name "lobevol", its version, and the model's parameters.

    Args:
        model: ``Segmentation.model`` from :mod:`inference.predict` (name,
            architecture, kernel_size, spacing_mm, weights_sha256,
            code_version, trained_on; test_time_augmentation and
            surface_refinement when the segmenter says).
    """
    if not model.get("weights_sha256"):
        raise ValueError("model description lacks 'weights_sha256': cannot identify the algorithm")
    method = segmentation_method(model)
    parameters = {"method": method, **{
        key: _parameter_text(model[key])
        for key in ("name", "architecture", "kernel_size", "spacing_mm", "weights_sha256", "trained_on",
                    "test_time_augmentation", "surface_refinement")
        if model.get(key) is not None
    }}
    # Atlas labels come from deforming a labelled template (CID 7162 "Deformable Models").
    family = codes.cid7162.DeformableModels if method == "atlas" else codes.DCM.ArtificialIntelligence
    return hd.AlgorithmIdentificationSequence(
        name=MANUFACTURER,
        family=family,
        version=str(model.get("code_version") or __version__)[:64],
        source=MANUFACTURER,
        parameters=parameters,
    )


def _parameter_text(value: object) -> str:
    if isinstance(value, (list, tuple)):
        return "x".join(str(v) for v in value)
    return str(value)


def segment_descriptions(model: Mapping[str, object]) -> list[hd.seg.SegmentDescription]:
    """One segment description per region, numbered by label value."""
    algorithm = algorithm_identification(model)
    descriptions = []
    for region in REGIONS:
        description = hd.seg.SegmentDescription(
            segment_number=region.value,
            segment_label=region.name,
            segmented_property_category=codes.SCT.AnatomicalStructure,
            segmented_property_type=structure_code(region),
            algorithm_type=hd.seg.SegmentAlgorithmTypeValues.AUTOMATIC,
            algorithm_identification=algorithm,
            tracking_uid=hd.UID(),
            tracking_id=region.key,
            display_color=hd.color.CIELabColor.from_rgb(*region.rgb),
        )
        laterality = laterality_code(region)
        if laterality is not None:
            description.SegmentedPropertyTypeCodeSequence[0].SegmentedPropertyTypeModifierCodeSequence = [
                laterality
            ]
        descriptions.append(description)
    return descriptions


def check_label_slices(label_slices: np.ndarray, datasets: Sequence[pydicom.Dataset]) -> np.ndarray:
    """Validate the per-source-slice label map and return it as uint8.

    Raises:
        ValueError: wrong shape, non-integer values, or values outside 0..10.
    """
    if not datasets:
        raise ValueError("the series volume has no source images to reference")
    # One label image per source image plane: per instance, or per frame of an Enhanced CT instance.
    n_planes = sum(int(ds.get("NumberOfFrames", 1) or 1) for ds in datasets)
    expected = (n_planes, int(datasets[0].Rows), int(datasets[0].Columns))
    if label_slices.shape != expected:
        raise ValueError(
            f"label slices have shape {label_slices.shape}, expected {expected} "
            "(one label image per source image or frame: images x rows x columns)"
        )
    if not np.issubdtype(label_slices.dtype, np.integer):
        raise ValueError(f"label slices must hold integer labels, got dtype {label_slices.dtype}")
    if label_slices.size and (label_slices.min() < 0 or label_slices.max() >= NUM_CLASSES):
        raise ValueError(
            f"label values must be 0..{NUM_CLASSES - 1}, got {label_slices.min()}..{label_slices.max()}"
        )
    if not label_slices.any():
        raise ValueError("the label map is empty: no region was segmented, nothing to write as SEG")
    return label_slices.astype(np.uint8, copy=False)


def build_seg(
    volume: SeriesVolume,
    label_slices: np.ndarray,
    model: Mapping[str, object],
    *,
    labelmap: bool = False,
    series_number: int = SEG_SERIES_NUMBER,
) -> hd.seg.Segmentation:
    """Build the DICOM SEG of the 10 regions over the source series.

    Args:
        volume: the ``SeriesVolume`` the labels were computed on; its
            ``datasets`` (source images, sorted along the slice normal) are
            referenced frame by frame.
        label_slices: uint8 (n_source_images, rows, columns), label values
            0..10, in ``volume.datasets`` order
            (``volume.labels_on_source_slices(labels)``).
        model: the model description (``Segmentation.model``).
        labelmap: write a LABELMAP segmentation (one frame per source image,
            pixel value = segment number) instead of BINARY.
        series_number: Series Number of the new series.

    Returns:
        The SEG instance, in the source study, new series.
    """
    datasets = list(volume.datasets)
    labels = check_label_slices(np.asarray(label_slices), datasets)
    present = set(np.unique(labels).tolist()) - {0}
    # Describe only the regions that were found (a segment without frames
    # confuses viewers); segment numbers must then run 1..N without gaps.
    descriptions = [d for d in segment_descriptions(model) if d.SegmentNumber in present]
    descriptions, labels = _renumber_segments(descriptions, labels)
    segmentation_type = (
        hd.seg.SegmentationTypeValues.LABELMAP if labelmap else hd.seg.SegmentationTypeValues.BINARY
    )
    with source_names_as_they_are():
        seg = hd.seg.Segmentation(
            source_images=with_required_patient_study(datasets),
            pixel_array=labels,
            segmentation_type=segmentation_type,
            segment_descriptions=descriptions,
            **new_instance_arguments(series_number),
            content_label="BRAINREGIONS",
            content_description="Brain regions (lobes, cerebellum, brainstem)",
            content_creator_name="lobevol^automatic",
            omit_empty_frames=True,
            # A label map is 8 bits per pixel: RLE compresses it losslessly.
            transfer_syntax_uid=RLELossless if labelmap else ExplicitVRLittleEndian,
        )
    seg.SeriesDescription = SEG_SERIES_DESCRIPTION
    if labelmap:
        _drop_background_segment(seg)
    return seg


def _drop_background_segment(seg: hd.seg.Segmentation) -> None:
    """Remove the Segment Sequence item highdicom writes for the background of a LABELMAP.

    Supplement 243 marks background pixels by the Pixel Padding Value; a
    segment item for them is not what the standard describes, and viewers
    that index segments by position shift every colour by one.
    """
    padding = int(seg.PixelPaddingValue)
    kept = [item for item in seg.SegmentSequence if int(item.SegmentNumber) != padding]
    if len(kept) != len(seg.SegmentSequence) - 1:
        raise ValueError(f"expected one background segment numbered {padding} in the LABELMAP SEG")
    seg.SegmentSequence = kept


def _renumber_segments(
    descriptions: list[hd.seg.SegmentDescription], labels: np.ndarray
) -> tuple[list[hd.seg.SegmentDescription], np.ndarray]:
    """Number the present segments 1..N in label order and relabel the pixels to match."""
    lookup = np.zeros(NUM_CLASSES, dtype=np.uint8)
    for number, description in enumerate(descriptions, start=1):
        lookup[description.SegmentNumber] = number
        description.SegmentNumber = number
    return descriptions, lookup[labels]


def segment_numbers_by_key(seg: pydicom.Dataset) -> dict[str, int]:
    """Map region key -> segment number in a SEG we wrote (via its Tracking ID).

    A background segment (number 0, no Tracking ID, as other writers of
    LABELMAP put it) is left out.
    """
    return {
        str(item.TrackingID): int(item.SegmentNumber)
        for item in seg.SegmentSequence
        if "TrackingID" in item
    }


def region_volumes_from_seg(seg: pydicom.Dataset, source: Sequence[pydicom.Dataset]) -> dict[str, float]:
    """Volume (cm3) of every segment of a SEG we wrote, computed from its frames.

    Counted by :mod:`inference.volumes` (each frame pixel counts for
    PixelSpacing x its source image's slice extent), the counter the SR's
    volumes come from. Used to check that the SEG and the SR agree.
    """
    seg = hd.seg.Segmentation.from_dataset(seg) if not isinstance(seg, hd.seg.Segmentation) else seg
    source_uids = [str(ds.SOPInstanceUID) for ds in source]
    extents_mm = _slice_extents_mm(source)
    row_mm, col_mm = (float(v) for v in source[0].PixelSpacing)
    numbers = segment_numbers_by_key(seg)
    array = seg.get_pixels_by_source_instance(
        source_sop_instance_uids=source_uids,
        segment_numbers=list(numbers.values()),
        combine_segments=True,
        skip_overlap_checks=True,
        assert_missing_frames_are_empty=True,
    )
    volumes_mm3 = label_volumes_mm3(np.asarray(array), row_mm * col_mm, extents_mm, num_values=NUM_CLASSES)
    return {key: float(volumes_mm3[number] / 1000.0) for key, number in numbers.items()}


def _slice_extents_mm(source: Sequence[pydicom.Dataset]) -> np.ndarray:
    """Thickness of space each source slice stands for, along the slice normal (mm).

    The rule of :func:`inference.volumes.slice_extents_mm` (half the
    distance to each neighbour); a lone slice uses SliceThickness.
    """
    normal = slice_normal(source[0].ImageOrientationPatient)
    if normal is None:
        raise ValueError(f"ImageOrientationPatient {list(source[0].ImageOrientationPatient)} has no slice normal")
    positions = positions_along(normal, [ds.ImagePositionPatient for ds in source])
    if len(positions) == 1:
        return np.array([float(source[0].SliceThickness)])
    return slice_extents_mm(positions)
