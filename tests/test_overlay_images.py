"""Key views and the Secondary Capture overlay series."""
from __future__ import annotations

import numpy as np
import pydicom
import pytest
import SimpleITK as sitk

from inference.vocabulary import REGIONS
from node.results.key_images import DERIVED_WARNING, build_overlay_images, render_key_views
from tests.dicom_validation import validate
from tests.output_fixtures import ct_volume, hand_made_normative, region_labels, region_voxel_volumes_cm3, write_ct_series


@pytest.fixture(scope="module")
def study(tmp_path_factory):
    labels = region_labels((16, 48, 48))
    volume = ct_volume(write_ct_series(tmp_path_factory.mktemp("ct"), labels, pixel_spacing_mm=3.0))
    label_image = sitk.GetImageFromArray(labels)
    label_image.CopyInformation(volume.image)
    return volume, label_image, labels


def test_views_show_region_colours_in_radiological_orientation(study):
    volume, label_image, labels = study
    views = {v.name: v for v in render_key_views(volume.image, label_image, size_px=192)}
    assert set(views) == {"axial", "coronal", "sagittal"}
    axial = np.asarray(views["axial"].image).astype(int)
    # Right frontal lobe (patient right = image left, anterior = top) is tinted with its colour.
    h, w, _ = axial.shape
    pixel = axial[int(h * 0.3), int(w * 0.35)]
    grey = pixel.mean()
    tint = np.array(REGIONS[0].rgb) - 127
    assert np.dot(pixel - grey, tint) > 0
    # Square display pixels: the physical aspect ratio is kept (coronal: 16 x 5 mm high, 48 x 3 mm wide).
    coronal = views["coronal"].image
    assert coronal.height / coronal.width == pytest.approx(80 / 144, abs=0.02)


def test_views_of_two_label_maps_can_share_their_cuts(study):
    volume, label_image, _ = study
    first = render_key_views(volume.image, label_image, size_px=96)
    chosen = tuple(v.slice_index for v in first)
    shifted = tuple(index - 2 for index in chosen)
    again = render_key_views(volume.image, label_image, size_px=96, slices=shifted)
    assert tuple(v.slice_index for v in again) == shifted
    assert [v.image.size for v in again] == [v.image.size for v in first]
    assert np.asarray(again[0].image).tolist() != np.asarray(first[0].image).tolist()  # another axial slice
    with pytest.raises(ValueError, match="outside the grid"):
        render_key_views(volume.image, label_image, slices=(0, 0, 48))


def test_views_refuse_mismatched_or_empty_labels(study):
    volume, label_image, _ = study
    with pytest.raises(ValueError, match="differs"):
        render_key_views(volume.image, label_image[:, :, :8])
    empty = sitk.Image(label_image.GetSize(), sitk.sitkUInt8)
    empty.CopyInformation(label_image)
    with pytest.raises(ValueError, match="empty"):
        render_key_views(volume.image, empty)


@pytest.mark.integration
def test_overlay_series_is_derived_valid_and_in_the_study(study, tmp_path):
    volume, label_image, labels = study
    normative = hand_made_normative(region_voxel_volumes_cm3(labels, 3 * 3 * 5))
    images = build_overlay_images(render_key_views(volume.image, label_image, size_px=192), normative,
                                  volume.datasets[0])
    assert len(images) == 3 and len({im.SeriesInstanceUID for im in images}) == 1
    for number, image in enumerate(images):
        path = tmp_path / f"sc{number}.dcm"
        image.save_as(path)
        back = pydicom.dcmread(path)
        assert list(back.ImageType[:2]) == ["DERIVED", "SECONDARY"]
        assert back.BurnedInAnnotation == "YES" and back.PhotometricInterpretation == "RGB"
        assert back.StudyInstanceUID == volume.datasets[0].StudyInstanceUID
        assert back.SeriesInstanceUID != volume.datasets[0].SeriesInstanceUID
        assert back.SourceImageSequence[0].ReferencedSOPInstanceUID == volume.datasets[0].SOPInstanceUID
        result = validate(path)
        assert result.errors == [] and result.warnings == [], result.output
    assert DERIVED_WARNING in images[0].DerivationDescription.upper() or "not for diagnosis" in images[0].DerivationDescription
