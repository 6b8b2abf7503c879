"""Series selection: eligibility, preference (kernel, window, description, thickness), rules, real studies."""
from __future__ import annotations

import itertools
from pathlib import Path

import highdicom as hd
import pydicom
import pytest
from pydicom.uid import CTImageStorage, SecondaryCaptureImageStorage, generate_uid

from node.config import parse_section
from node.dicom.files import InstanceHeader, find_dicom_files, group_by_study
from node.dicom.selection import BONE, SOFT, SelectionRules, select_series
from tests.output_fixtures import region_labels, write_ct_series

_numbers = itertools.count(2)


def series(*, n=30, thickness=3.0, kernel="STANDARD", window=40.0, description="HEAD 3MM", body_part="HEAD",
           image_type=("ORIGINAL", "PRIMARY", "AXIAL"), orientation=(1, 0, 0, 0, 1, 0), sop_class=CTImageStorage,
           study_description="CT HEAD") -> tuple[str, list[InstanceHeader]]:
    """Headers (no files) of one series: n slices ``thickness`` apart along z."""
    uid, number = generate_uid(), next(_numbers)
    headers = []
    for k in range(n):
        ds = pydicom.Dataset()
        ds.SOPClassUID, ds.SOPInstanceUID, ds.StudyInstanceUID, ds.SeriesInstanceUID = (
            sop_class, generate_uid(), "1.2.3", uid)
        ds.SeriesNumber, ds.SeriesDescription, ds.StudyDescription = number, description, study_description
        ds.BodyPartExamined, ds.ImageType = body_part, list(image_type)
        if kernel:
            ds.ConvolutionKernel = kernel
        if window is not None:
            ds.WindowCenter, ds.WindowWidth = window, 100
        ds.SliceThickness = thickness
        ds.ImageOrientationPatient = list(orientation)
        normal = [orientation[1] * orientation[5] - orientation[2] * orientation[4],
                  orientation[2] * orientation[3] - orientation[0] * orientation[5],
                  orientation[0] * orientation[4] - orientation[1] * orientation[3]]
        ds.ImagePositionPatient = [v * k * thickness for v in normal]
        headers.append(InstanceHeader(Path(f"/nowhere/{uid}/{k}"), "1.2.3", uid, sop_class, ds.SOPInstanceUID, ds))
    return uid, headers


def choose(*made, rules=SelectionRules()):
    selection = select_series(dict(made), rules)
    return selection, [uid for uid, _ in made]


def test_real_philips_study_chooses_the_1mm_soft_tissue_series(real_ct):
    (study,) = group_by_study(find_dicom_files(real_ct / "Philips")).values()
    selection = select_series(study)
    chosen = study[selection.chosen][0].dataset
    assert (chosen.SeriesDescription, chosen.ConvolutionKernel, float(chosen.SliceThickness)) == (
        "STD BRAIN 1MM, iDose", "UB", 1.0)
    assert len(study[selection.chosen]) == 140
    by_description = {str(h[0].dataset.get("SeriesDescription", "")): selection.reasons[uid] for uid, h in study.items()}
    assert by_description[""] == "not eligible: localizer (scout) image"
    assert "Secondary Capture" in by_description["Exam Summary"]
    assert "bone reconstruction (kernel YA)" in by_description["BONE BRAIN 1MM"]
    assert "thicker slices (5 mm)" in by_description["STD BRAIN 5MM"]
    summary = selection.summary()
    assert summary.startswith("series 202 (STD BRAIN 1MM, iDose): chosen") and summary.count(";") == 4


def test_real_ge_series_is_chosen(real_ct):
    (study,) = group_by_study(find_dicom_files(real_ct / "GE")).values()
    selection = select_series(study)
    assert selection.chosen is not None and "kernel STD+" in selection.reasons[selection.chosen]


def test_soft_tissue_kernel_beats_thinner_bone_kernel():
    selection, (soft, bone) = choose(series(kernel="STANDARD", thickness=5.0, n=25),
                                     series(kernel="BONEPLUS", thickness=1.0, n=120))
    assert selection.chosen == soft
    assert "bone reconstruction (kernel BONEPLUS)" in selection.reasons[bone]


def test_thinner_slices_win_among_soft_tissue_series():
    selection, (thick, thin) = choose(series(thickness=5.0, n=25), series(thickness=0.625, n=200))
    assert selection.chosen == thin and "thicker slices (5 mm)" in selection.reasons[thick]


def test_multi_valued_kernel_uses_its_first_value():
    uid, headers = series(kernel="Hr38f", n=40)
    for header in headers:
        header.dataset.ConvolutionKernel = ["Hr38f", "3"]  # Siemens: kernel, iterative strength
    selection, _ = choose((uid, headers))
    assert selection.chosen == uid and "kernel Hr38f" in selection.reasons[uid]


def test_window_centre_decides_when_the_kernel_is_unknown():
    selection, (bone, soft) = choose(series(kernel="XYZ9", window=700, thickness=1.0, n=120),
                                     series(kernel="XYZ1", window=35, thickness=2.0, n=60))
    assert selection.chosen == soft and "window centre 35 HU" in selection.reasons[soft]
    assert "window centre 700 HU" in selection.reasons[bone]


@pytest.mark.parametrize("description, tissue", [
    ("HEAD BONE 1MM", BONE), ("Kopf Knochen", BONE), ("OS 0.6", BONE), ("HEAD POST CONTRAST", None),
    ("WEICHTEILFENSTER", SOFT), ("STD+ 2MM", SOFT), ("BONE BRAIN 1MM", BONE), ("NEURO", None),
])
def test_description_keywords_match_at_word_starts(description, tissue):
    assert SelectionRules().description_tissue(description) == tissue


def test_description_decides_when_kernel_and_window_say_nothing():
    selection, (bone, soft) = choose(series(kernel="", window=None, description="HEAD BONE 1MM", thickness=1.0, n=120),
                                     series(kernel="", window=None, description="HEAD BRAIN 2MM", thickness=2.0, n=60))
    assert selection.chosen == soft and "description 'HEAD BRAIN 2MM'" in selection.reasons[soft]


@pytest.mark.parametrize("kernel, tissue", [
    ("STANDARD", SOFT), ("SOFT", SOFT), ("BONE", BONE), ("BONEPLUS", BONE), ("LUNG", BONE),   # GE
    ("UB", SOFT), ("UC", SOFT), ("B", SOFT), ("YA", BONE), ("YC", BONE), ("EB", BONE),        # Philips
    ("H31s", SOFT), ("Hr38", SOFT), ("J30s", SOFT), ("H70h", BONE), ("Hr64", BONE),          # Siemens
    ("FC26", SOFT), ("FC21", SOFT), ("FC30", BONE), ("FC81", BONE),                            # Canon
    ("SOMETHING", None),
])
def test_vendor_kernel_names(kernel, tissue):
    assert SelectionRules().kernel_tissue(kernel) == tissue


@pytest.mark.parametrize("kwargs, reason", [
    (dict(image_type=("ORIGINAL", "PRIMARY", "LOCALIZER")), "localizer"),
    (dict(image_type=("DERIVED", "SECONDARY", "AXIAL")), "not an original acquisition"),
    (dict(sop_class=SecondaryCaptureImageStorage), "not a CT image series (Secondary Capture Image Storage)"),
    (dict(orientation=(1, 0, 0, 0, 0, -1)), "not axial (slices 90 deg from axial)"),
    (dict(body_part="CHEST", description="THORAX 3MM", study_description="CT CHEST"), "not a head examination"),
    (dict(thickness=7.0, n=25), "slices too thick (7 mm > 5 mm)"),
    (dict(n=8, thickness=3.0), "too few images to cover a head (8 < 10)"),
    (dict(n=20, thickness=3.0), "too short to cover a head (60 mm < 90 mm)"),
])
def test_ineligible_series_are_named_with_their_reason(kwargs, reason):
    selection, (uid,) = choose(series(**kwargs))
    assert selection.chosen is None
    assert reason in selection.reasons[uid], selection.reasons[uid]
    assert reason in selection.summary()


def test_head_is_recognised_by_description_or_protocol_and_tilt_is_still_axial():
    selection, (uid,) = choose(series(n=40, body_part="", description="", study_description="SCHAEDEL NATIV",
                                      orientation=(1, 0, 0, 0, 0.948, -0.317)))
    assert selection.chosen == uid


def test_enhanced_ct_is_eligible(tmp_path):
    paths = write_ct_series(tmp_path / "single", region_labels((24, 16, 16)), slice_spacing_mm=4.0)
    enhanced = hd.legacy.LegacyConvertedEnhancedCTImage(
        [pydicom.dcmread(p) for p in paths], series_instance_uid=hd.UID(), series_number=5,
        sop_instance_uid=hd.UID(), instance_number=1)
    enhanced.BodyPartExamined = ""  # head known from the frame anatomy (Anatomic Region "Head") only
    (tmp_path / "multi").mkdir()
    enhanced.save_as(tmp_path / "multi" / "enhanced.dcm")
    (study,) = group_by_study(find_dicom_files(tmp_path / "multi")).values()
    selection = select_series(study)
    assert selection.chosen is not None, selection.summary()
    assert "24 images" in selection.reasons[selection.chosen]


def _rules(mapping: dict) -> SelectionRules:
    """Rules as node.config reads a [selection] section."""
    return parse_section(SelectionRules, "selection", mapping, Path.cwd())


def test_rules_from_config_mapping():
    rules = _rules({
        "head_keywords": "HEAD, THORAX", "max_slice_thickness_mm": "7.5", "min_slices": "5",
        "soft_kernels": r"MYSOFT\d", "soft_window_center_hu": "-10, 90",
    })
    assert rules.head_keywords == ("HEAD", "THORAX") and rules.max_slice_thickness_mm == 7.5
    assert rules.min_slices == 5 and rules.soft_window_center_hu == (-10.0, 90.0)
    assert rules.kernel_tissue("mysoft3") == SOFT and rules.kernel_tissue("STANDARD") is None
    selection, (uid,) = choose(series(thickness=7.0, n=25, body_part="THORAX"), rules=rules)
    assert selection.chosen == uid


@pytest.mark.parametrize("mapping, message", [
    ({"max_thickness": "5"}, "unknown key\\(s\\) in \\[selection\\]: max_thickness"),
    ({"min_slices": "ten"}, "expected a whole number"),
    ({"max_slice_thickness_mm": "0"}, "must be positive"),
    ({"bone_kernels": "BONE(, EDGE"}, "not a valid regular expression"),
    ({"soft_window_center_hu": "40"}, "expected a number, a number"),
    ({"head_keywords": " , "}, "head_keywords is empty"),
])
def test_bad_rules_are_refused(mapping, message):
    with pytest.raises(ValueError, match=message):
        _rules(mapping)


def test_empty_input_is_an_error():
    with pytest.raises(ValueError, match="no series"):
        select_series({})


HEAD_WORD_KEYWORDS = ("BodyPartExamined", "StudyDescription", "SeriesDescription", "ProtocolName",
                      "AnatomicRegionSequence", "PerformedProcedureStepDescription", "RequestedProcedureDescription")


def _anonymised(folder: Path, out: Path, change=None) -> dict:
    """The series in ``folder`` without any head word (as an anonymiser leaves it), as {series uid: headers}."""
    out.mkdir(parents=True)
    for path in sorted(folder.glob("*.dcm")):
        ds = pydicom.dcmread(path)
        for keyword in HEAD_WORD_KEYWORDS:
            if keyword in ds:
                delattr(ds, keyword)
        if change is not None:
            change(ds)
        ds.save_as(out / path.name)
    (study,) = group_by_study(find_dicom_files(out)).values()
    return study


def test_real_head_without_any_head_word_is_recognised_from_the_image(real_ct, tmp_path):
    study = _anonymised(real_ct / "GE", tmp_path / "ge")
    selection = select_series(study)
    assert selection.chosen is not None, selection.summary()
    note = selection.notes[selection.chosen]
    assert "recognised as a head CT from the image" in note and "3 of 3 sampled slices" in note


def _body(kind: str):
    """Pixel data of a body slice inside a closed bone ring: pelvis (fat and bowel) or chest (lungs)."""
    import numpy as np

    def change(ds):
        yy, xx = np.mgrid[: ds.Rows, : ds.Columns]
        cy, cx = ds.Rows / 2, ds.Columns / 2
        r = np.hypot((yy - cy) / (0.45 * ds.Rows), (xx - cx) / (0.35 * ds.Columns))
        hu = np.full((ds.Rows, ds.Columns), -1000.0)
        hu[r < 1.0] = -100.0 if kind == "pelvis" else -800.0  # fat, or lung
        hu[(r < 0.5)] = 35.0                                  # bowel loops / heart
        hu[(r >= 0.9) & (r < 1.0)] = 700.0                   # a bone ring closed all round
        ds.PixelData = (hu - float(ds.RescaleIntercept)).astype(np.int16).tobytes()
    return change


@pytest.mark.parametrize("kind", ["pelvis", "chest"])
def test_non_head_ct_without_head_words_is_still_skipped(tmp_path, kind):
    paths = write_ct_series(tmp_path / "src", region_labels((24, 32, 32)), slice_spacing_mm=4.0)
    study = _anonymised(paths[0].parent, tmp_path / "body", _body(kind))
    selection = select_series(study)
    assert selection.chosen is None
    (reason,) = selection.reasons.values()
    assert "not a head examination" in reason and "0 of 3 sampled slices show a skull" in reason, reason


def test_synthetic_head_without_head_words_is_recognised(tmp_path):
    paths = write_ct_series(tmp_path / "src", region_labels((24, 32, 32)), slice_spacing_mm=4.0)
    study = _anonymised(paths[0].parent, tmp_path / "head")
    selection = select_series(study)
    assert selection.chosen is not None, selection.summary()


def test_a_header_naming_another_body_part_decides_even_over_a_head_image(tmp_path):
    # The image is a head (as in the test above); the scanner says ABDOMEN: a mislabelled series is not analysed.
    paths = write_ct_series(tmp_path / "src", region_labels((24, 32, 32)), slice_spacing_mm=4.0)
    study = _anonymised(paths[0].parent, tmp_path / "abdomen", lambda ds: setattr(ds, "BodyPartExamined", "ABDOMEN"))
    selection = select_series(study)
    assert selection.chosen is None and selection.notes == {}
    (reason,) = selection.reasons.values()
    assert "not a head examination (body part ABDOMEN;" in reason, reason
    # A site's own word for a head makes it one.
    assert select_series(study, SelectionRules(head_keywords=("HEAD", "ABDOMEN"))).chosen is not None
