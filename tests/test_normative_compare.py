"""normative.compare and normative.reference: the per-study API the node calls."""
from __future__ import annotations

import json
import math

import pytest
from scipy.stats import norm

from inference.vocabulary import LOBE_PAIRS, REGION_KEYS
from normative.compare import NormativeResult, ReferenceInfo, compare, load_reference
from normative.reference import BUNDLED_REFERENCE, LinearModel, MeasureModel, Reference, asymmetry_key

# Xi et al. 2025, whole cohort (paper-notes.md), DESIGN order.
PAPER_TABLE = {
    "right_frontal_lobe": (200.64, 19.15), "left_frontal_lobe": (204.51, 19.61),
    "right_parietal_lobe": (81.52, 7.91), "left_parietal_lobe": (79.42, 7.65),
    "right_occipital_lobe": (53.76, 5.21), "left_occipital_lobe": (52.82, 5.33),
    "right_temporal_lobe": (91.92, 9.07), "left_temporal_lobe": (94.08, 9.27),
    "cerebellum": (127.97, 11.85), "brainstem": (15.47, 1.50),
}
MEANS = {key: mean for key, (mean, _) in PAPER_TABLE.items()}


def test_bundled_reference_is_the_paper_table_with_provenance():
    reference = load_reference()
    assert reference.path == BUNDLED_REFERENCE
    for key, (mean, sd) in PAPER_TABLE.items():
        expected = reference.expected(key, 2.0, "M")
        assert (expected.mean, expected.sd) == (mean, sd)
    raw = json.loads(BUNDLED_REFERENCE.read_text())
    assert raw["n"] == 1487 and raw["sexes"] == {"M": 826, "F": 661}
    assert raw["age_range_years"] == [1.5, 2.5]
    assert raw["doi"] == "10.3389/fneur.2025.1573060"
    for field in ("citation", "population", "scanner", "method", "version", "kind"):
        assert raw[field].strip()
    assert "whole-cohort" in reference.kind
    assert not reference.sex_specific and not reference.age_specific
    # total: sum of the means, no SD (the paper gives none)
    assert reference.expected("total", 2.0, None).mean == pytest.approx(sum(MEANS.values()))
    assert reference.expected("total", 2.0, None).sd is None


def test_z_percentile_and_flags_from_the_bundled_reference():
    volumes = dict(MEANS)
    volumes["brainstem"] = 15.47 - 2.5 * 1.50       # z = -2.5
    volumes["cerebellum"] = 127.97 + 1.0 * 11.85    # z = +1
    volumes["left_frontal_lobe"] = 204.51 + 2.01 * 19.61
    result = compare(volumes, "F", 2.1)
    assert isinstance(result, NormativeResult) and result.applicable
    assert [r.key for r in result.regions] == list(REGION_KEYS)
    brainstem = result.region("brainstem")
    assert brainstem.z_score == pytest.approx(-2.5)
    assert brainstem.percentile == pytest.approx(100 * norm.cdf(-2.5))
    assert brainstem.flag == "below"
    assert result.region("cerebellum").flag == "within"
    assert result.region("cerebellum").percentile == pytest.approx(84.134, abs=1e-3)
    assert result.region("left_frontal_lobe").flag == "above"
    assert result.region("right_frontal_lobe").z_score == pytest.approx(0.0)
    # the threshold is configurable
    assert compare(volumes, "F", 2.1, z_threshold=3.0).region("brainstem").flag == "within"
    # the whole-cohort kind is said in the result
    assert any("whole-cohort" in note for note in result.notes)
    assert result.reference == ReferenceInfo("Xi2025", "1.0", result.reference.citation, result.reference.population,
                                             1487, (1.5, 2.5), "whole-cohort (not adjusted for age or sex)")


def test_total_and_asymmetry_without_published_sd():
    result = compare(MEANS, "M", 2.0)
    assert result.total.key == "total"
    assert result.total.volume_cm3 == pytest.approx(sum(MEANS.values()))
    assert result.total.reference_mean_cm3 == pytest.approx(sum(MEANS.values()))
    assert result.total.z_score is None and result.total.flag is None
    assert any("no SD for the total" in note for note in result.notes)
    assert [(a.structure, a.right_key, a.left_key) for a in result.asymmetry] == list(LOBE_PAIRS)
    frontal = result.asymmetry[0]
    assert frontal.index == pytest.approx((204.51 - 200.64) / ((204.51 + 200.64) / 2))
    assert frontal.reference_mean is None and frontal.z_score is None and frontal.flag is None
    assert any("asymmetry" in note for note in result.notes)


@pytest.mark.parametrize("age, reason", [(None, "age is unknown"), (3.4, "outside the reference's range"),
                                         (1.2, "outside the reference's range")])
def test_no_z_scores_when_the_age_is_missing_or_out_of_range(age, reason):
    result = compare(MEANS, "F", age)
    assert not result.applicable
    assert all(r.z_score is None and r.flag is None and r.reference_mean_cm3 is None
               for r in (*result.regions, result.total, *result.asymmetry[:0]))
    assert all(a.z_score is None for a in result.asymmetry)
    assert result.region("cerebellum").volume_cm3 == 127.97
    assert any(reason in note for note in result.notes)


def test_edges_of_the_age_range_apply():
    assert compare(MEANS, "F", 1.5).applicable and compare(MEANS, "F", 2.5).applicable


def test_to_dict_is_json_and_round_trips_the_fields():
    result = compare(MEANS, "f", 2.0)
    data = json.loads(json.dumps(result.to_dict()))
    assert data["sex"] == "F" and data["age_years"] == 2.0 and data["applicable"] is True
    assert data["regions"][0]["key"] == "right_frontal_lobe" and len(data["regions"]) == 10
    assert data["total"]["key"] == "total" and len(data["asymmetry"]) == 4
    assert data["reference"]["age_range_years"] == [1.5, 2.5]
    assert data["reference"]["n"] == 1487


@pytest.mark.parametrize("volumes, message", [
    ({k: v for k, v in MEANS.items() if k != "brainstem"}, "missing volume(s) for brainstem"),
    ({**MEANS, "pons": 3.0}, "unknown region key(s) pons"),
    ({**MEANS, "cerebellum": -1.0}, "volume of cerebellum"),
    ({**MEANS, "cerebellum": float("nan")}, "volume of cerebellum"),
    ({**MEANS, "cerebellum": "127"}, "volume of cerebellum"),
])
def test_bad_volumes_are_refused_with_the_region_named(volumes, message):
    with pytest.raises(ValueError, match=message.replace("(", r"\(").replace(")", r"\)")):
        compare(volumes, "F", 2.0)


def test_bad_sex_age_threshold_are_refused():
    with pytest.raises(ValueError, match="sex must be"):
        compare(MEANS, "female", 2.0)
    with pytest.raises(ValueError, match="age must be"):
        compare(MEANS, "F", -1.0)
    with pytest.raises(ValueError, match="z threshold"):
        compare(MEANS, "F", 2.0, z_threshold=0)


def test_sex_o_is_unknown_with_a_note():
    result = compare(MEANS, "O", 2.0)
    assert result.sex is None and result.applicable
    assert any("'O'" in note for note in result.notes)


def _sex_specific_reference(with_pooled: bool) -> Reference:
    """Per region: mean = 100 + 10 age - 8 sex (M=1, F=2), SD 5; pooled: 90 + 10 age, SD 6.
    Asymmetry of the frontal lobe: mean 0.02, SD 0.01, age-dependent SD for the total."""
    pooled = MeasureModel(LinearModel({"intercept": 90.0, "age_years": 10.0}), LinearModel({"intercept": 6.0}))
    region = MeasureModel(LinearModel({"intercept": 100.0, "age_years": 10.0, "sex": -8.0}),
                          LinearModel({"intercept": 5.0}), pooled if with_pooled else None)
    measures = {key: region for key in REGION_KEYS}
    measures["total"] = MeasureModel(LinearModel({"intercept": 1000.0, "age_years": 100.0, "sex": -80.0}),
                                     LinearModel({"intercept": 10.0, "age_years": 10.0}),
                                     MeasureModel(LinearModel({"intercept": 900.0, "age_years": 100.0}),
                                                  LinearModel({"intercept": 60.0})) if with_pooled else None)
    measures[asymmetry_key("frontal lobe")] = MeasureModel(LinearModel({"intercept": 0.02}),
                                                           LinearModel({"intercept": 0.01}))
    return Reference("Site", "2", "fitted (adjusted for age and sex)", "site cohort", "site children", 300,
                     (1.0, 3.0), {"M": 1, "F": 2}, measures)


def test_sex_and_age_adjusted_reference():
    reference = _sex_specific_reference(with_pooled=True)
    volumes = {key: 112.0 for key in REGION_KEYS}   # girl at 2 y: expected 100 + 20 - 16 = 104, SD 5
    result = compare(volumes, "F", 2.0, reference)
    assert result.region("cerebellum").reference_mean_cm3 == pytest.approx(104.0)
    assert result.region("cerebellum").z_score == pytest.approx(1.6)
    boy = compare(volumes, "M", 2.0, reference)      # boy: 112 expected, z = 0
    assert boy.region("cerebellum").z_score == pytest.approx(0.0)
    # total 1120: girl expected 1000 + 200 - 160 = 1040, SD 10 + 20 = 30 -> z = 80/30
    assert result.total.z_score == pytest.approx(80 / 30)
    assert result.total.flag == "above"
    frontal = result.asymmetry[0]
    assert frontal.index == pytest.approx(0.0)
    assert frontal.z_score == pytest.approx(-2.0) and frontal.flag == "within"
    assert frontal.percentile == pytest.approx(100 * norm.cdf(-2.0))
    assert result.asymmetry[1].z_score is None
    assert not any("whole-cohort" in note for note in result.notes)


def test_unknown_sex_falls_back_to_the_pooled_model_and_says_so():
    reference = _sex_specific_reference(with_pooled=True)
    volumes = {key: 112.0 for key in REGION_KEYS}
    result = compare(volumes, None, 2.0, reference)
    assert result.applicable
    assert result.region("cerebellum").reference_mean_cm3 == pytest.approx(110.0)
    assert result.region("cerebellum").reference_sd_cm3 == pytest.approx(6.0)
    assert result.region("cerebellum").z_score == pytest.approx(2 / 6)
    assert any("pooled" in note for note in result.notes)


def test_unknown_sex_without_pooled_model_gives_no_z_and_says_why():
    result = compare({key: 112.0 for key in REGION_KEYS}, None, 2.0, _sex_specific_reference(with_pooled=False))
    assert all(r.z_score is None for r in result.regions)
    assert result.asymmetry[0].z_score is not None          # the asymmetry model has no sex term
    assert any("no pooled model" in note for note in result.notes)


def test_reference_file_round_trip_and_validation(tmp_path):
    reference = _sex_specific_reference(with_pooled=True)
    path = reference.save(tmp_path / "site.json")
    loaded = load_reference(path)
    assert loaded.to_dict() == reference.to_dict()
    volumes = {key: 107.0 for key in REGION_KEYS}
    assert compare(volumes, "F", 1.5, loaded).to_dict()["regions"] == compare(volumes, "F", 1.5, reference).to_dict()["regions"]

    data = json.loads(path.read_text())
    del data["measures"]["brainstem"]
    (tmp_path / "bad.json").write_text(json.dumps(data))
    with pytest.raises(ValueError, match="lacks the region measure.*brainstem"):
        load_reference(tmp_path / "bad.json")
    data = json.loads(path.read_text())
    data["measures"]["total"]["sd"] = {"intercept": 10.0, "age_years": -4.0}   # negative at 3 y only
    (tmp_path / "bad.json").write_text(json.dumps(data))
    with pytest.raises(ValueError, match="'total': SD is not positive at age 3"):
        load_reference(tmp_path / "bad.json")
    data = json.loads(path.read_text())
    data["measures"]["cerebellum"]["mean"]["height"] = 1.0
    (tmp_path / "bad.json").write_text(json.dumps(data))
    with pytest.raises(ValueError, match="cerebellum.*unknown model term 'height'"):
        load_reference(tmp_path / "bad.json")
    data = json.loads(path.read_text())
    data["measures"]["brainstem"]["sd"]["sex"] = 1.0
    (tmp_path / "bad.json").write_text(json.dumps(data))
    with pytest.raises(ValueError, match="measure 'brainstem': an SD model may not depend on sex"):
        load_reference(tmp_path / "bad.json")
    (tmp_path / "bad.json").write_text("{not json")
    with pytest.raises(ValueError, match="not valid JSON"):
        load_reference(tmp_path / "bad.json")
    with pytest.raises(FileNotFoundError, match="normative reference file not found"):
        load_reference(tmp_path / "absent.json")
    (tmp_path / "bad.json").write_text(json.dumps({"format": "something else"}))
    with pytest.raises(ValueError, match="not a lobevol normative reference"):
        load_reference(tmp_path / "bad.json")


def test_percentile_is_the_normal_cdf_for_many_z():
    reference = load_reference()
    for z in (-3.1, -1.0, -0.2, 0.7, 1.96, 4.0):
        volumes = {key: max(0.0, mean + z * sd) for key, (mean, sd) in PAPER_TABLE.items()}
        result = compare(volumes, None, 2.0, reference)
        for region in result.regions:
            assert region.z_score == pytest.approx(z)
            assert region.percentile == pytest.approx(100 * 0.5 * (1 + math.erf(z / math.sqrt(2))))


def test_lobe_missing_on_both_sides_has_no_asymmetry_but_the_rest_is_measured():
    from inference.vocabulary import REGION_KEYS
    from normative.compare import compare

    volumes = {key: 50.0 for key in REGION_KEYS}
    volumes["right_occipital_lobe"] = volumes["left_occipital_lobe"] = 0.0
    result = compare(volumes, "F", 2.0)
    assert len(result.asymmetry) == 3 and "occipital" not in " ".join(a.structure for a in result.asymmetry)
    assert any("both sides measured 0" in note for note in result.notes)
    assert len(result.regions) == 10


def test_a_second_method_gives_the_difference_in_sds_the_range_of_z_and_marks_what_is_uncertain():
    means = {key: PAPER_TABLE[key][0] for key in REGION_KEYS}
    sds = {key: PAPER_TABLE[key][1] for key in REGION_KEYS}
    other = dict(means)
    other["right_parietal_lobe"] = means["right_parietal_lobe"] + 1.5 * sds["right_parietal_lobe"]   # 1.5 SD apart
    other["brainstem"] = means["brainstem"] - 0.5 * sds["brainstem"]                                 # 0.5 SD apart
    result = compare(means, "F", 2.0, other_method_volumes=other)
    parietal, brainstem = result.region("right_parietal_lobe"), result.region("brainstem")
    assert parietal.method_difference_sd == pytest.approx(-1.5) and parietal.uncertain
    assert parietal.z_range == pytest.approx((0.0, 1.5)) and parietal.other_method_volume_cm3 == other["right_parietal_lobe"]
    assert brainstem.method_difference_sd == pytest.approx(0.5) and not brainstem.uncertain
    assert brainstem.z_range == pytest.approx((-0.5, 0.0))
    assert [r.key for r in result.uncertain_regions] == ["right_parietal_lobe"]
    assert any("uncertain z-score" in note and "right parietal lobe (-1.5 SD)" in note for note in result.notes)
    assert json.loads(json.dumps(result.to_dict()))["regions"][2]["uncertain"] is True
    # Without an age the reference does not apply, but its SD is still the unit of the difference.
    adult = compare(means, None, None, other_method_volumes=other)
    assert adult.region("right_parietal_lobe").uncertain and adult.region("right_parietal_lobe").z_range is None
    # Without a second method nothing is marked.
    alone = compare(means, "F", 2.0)
    assert not alone.uncertain_regions and alone.region("brainstem").method_difference_sd is None
