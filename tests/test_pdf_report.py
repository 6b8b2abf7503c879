"""PDF report and its Encapsulated PDF instance."""
from __future__ import annotations

import shutil
import subprocess

import numpy as np
import pydicom
import pytest
import SimpleITK as sitk

from inference.vocabulary import REGIONS
from node.results.encapsulated_pdf import build_encapsulated_pdf, pdf_from_encapsulated
from node.results.key_images import render_key_views
from node.results.pdf_report import StudyHeader, render_pdf_report
from tests.dicom_validation import validate
from tests.output_fixtures import (
    MODEL, ct_volume, hand_made_normative, region_labels, region_voxel_volumes_cm3, write_ct_series,
)


@pytest.fixture(scope="module")
def study(tmp_path_factory):
    labels = region_labels((16, 48, 48))
    paths = write_ct_series(tmp_path_factory.mktemp("ct"), labels, pixel_spacing_mm=3.0, slice_spacing_mm=5.0)
    volume = ct_volume(paths)
    label_image = sitk.GetImageFromArray(labels)
    label_image.CopyInformation(volume.image)
    volumes = region_voxel_volumes_cm3(labels, 3.0 * 3.0 * 5.0)
    return volume, render_key_views(volume.image, label_image, size_px=160), volumes


def _tool(name: str) -> str:
    path = shutil.which(name)
    if path is None:
        raise RuntimeError(f"{name} not found: install poppler-utils (apt-get install poppler-utils)")
    return path


def _pdf_text(pdf: bytes, tmp_path) -> tuple[str, int]:
    path = tmp_path / "report.pdf"
    path.write_bytes(pdf)
    text = subprocess.run([_tool("pdftotext"), "-layout", str(path), "-"], capture_output=True, text=True,
                          check=True).stdout
    info = subprocess.run([_tool("pdfinfo"), str(path)], capture_output=True, text=True, check=True).stdout
    pages = int(next(line.split()[-1] for line in info.splitlines() if line.startswith("Pages:")))
    return text, pages


@pytest.mark.integration
def test_report_holds_patient_table_notes_and_disclaimer(study, tmp_path):
    volume, views, volumes = study
    normative = hand_made_normative(volumes)
    pdf = render_pdf_report(normative, MODEL, views, header=StudyHeader.from_dataset(volume.datasets[0]),
                            quality_notes=["gantry tilt 18.5 deg corrected by resampling"])
    text, pages = _pdf_text(pdf, tmp_path)
    assert pages == 1
    for expected in ("Test Child", "LV-TEST-0001", "female", "2.50 years", "2024-09-15", "ACC0001",
                     "gantry tilt 18.5 deg", "Not for clinical use", normative.reference.citation,
                     MODEL["weights_sha256"][:16], "Total (10 regions)"):
        assert expected in text, expected
    for region, result in zip(REGIONS, normative.regions):
        line = next(line for line in text.splitlines() if region.name in line and "." in line)
        assert f"{result.volume_cm3:.1f}" in line and f"{result.z_score:+.2f}" in line


@pytest.mark.integration
def test_report_without_z_scores_says_why(study, tmp_path):
    _, views, volumes = study
    pdf = render_pdf_report(hand_made_normative(volumes, with_z=False), MODEL, views)
    text, pages = _pdf_text(pdf, tmp_path)
    assert pages == 1
    assert "age is unknown" in text and "not available" in text


@pytest.mark.integration
def test_report_renders_to_a_non_blank_page(study, tmp_path):
    _, views, volumes = study
    (tmp_path / "r.pdf").write_bytes(render_pdf_report(hand_made_normative(volumes), MODEL, views))
    subprocess.run([_tool("pdftoppm"), "-png", "-r", "40", str(tmp_path / "r.pdf"), str(tmp_path / "page")],
                   check=True)
    from PIL import Image
    page = np.asarray(Image.open(tmp_path / "page-1.png").convert("RGB"))
    assert (page < 128).mean() > 0.05  # the key images and text are there


def test_report_refuses_missing_views(study):
    _, _, volumes = study
    with pytest.raises(ValueError, match="key views"):
        render_pdf_report(hand_made_normative(volumes), MODEL, [])


def test_encapsulated_pdf_is_in_the_source_study(study):
    volume, views, volumes = study
    pdf = render_pdf_report(hand_made_normative(volumes), MODEL, views)
    source = volume.datasets[0]
    ds = build_encapsulated_pdf(pdf, source, source_instances=volume.datasets)
    assert pdf_from_encapsulated(ds) == pdf
    assert ds.StudyInstanceUID == source.StudyInstanceUID and ds.PatientID == source.PatientID
    assert ds.SeriesInstanceUID != source.SeriesInstanceUID
    assert ds.MIMETypeOfEncapsulatedDocument == "application/pdf" and ds.DocumentTitle
    assert len(ds.SourceInstanceSequence) == len(volume.datasets)
    with pytest.raises(ValueError, match="not a PDF"):
        build_encapsulated_pdf(b"hello", source)


@pytest.mark.integration
def test_encapsulated_pdf_passes_dciodvfy(study, tmp_path):
    volume, views, volumes = study
    pdf = render_pdf_report(hand_made_normative(volumes), MODEL, views)
    path = tmp_path / "pdf.dcm"
    build_encapsulated_pdf(pdf, volume.datasets[0], source_instances=volume.datasets).save_as(path)
    result = validate(path)
    assert result.errors == [] and result.warnings == [], result.output
    assert pdf_from_encapsulated(pydicom.dcmread(path)) == pdf
