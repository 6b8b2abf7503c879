"""Site-fitted references: recovery of known coefficients, z-scores of fresh draws, provenance, errors."""
from __future__ import annotations

import hashlib

import numpy as np
import pytest

from inference.vocabulary import REGION_KEYS
from normative.cohort import Cohort, read_cohort, write_cohort
from normative.compare import compare, load_reference
from normative.fit import MIN_FIT_ROWS, fit_reference
from normative.simulate import paper_like_truth, simulate_cohort

TERMS = ("intercept", "age_years", "sex")


@pytest.fixture(scope="module")
def truth():
    return paper_like_truth()


@pytest.fixture(scope="module")
def fitted(truth, tmp_path_factory):
    path = write_cohort(tmp_path_factory.mktemp("fit") / "cohort.csv", simulate_cohort(3000, 1, truth))
    return fit_reference(read_cohort(path)).reference


def _z_scores(reference, cohort: Cohort, sex_known: bool = True) -> np.ndarray:
    """z of every region of every child (rows: children, columns: REGION_KEYS).

    Every child must be within the reference's ages (else there is no z)."""
    assert all(reference.covers_age(a) for a in cohort.age_years)
    rows = []
    for i in range(len(cohort)):
        volumes = dict(zip(REGION_KEYS, cohort.volumes_cm3[i]))
        result = compare(volumes, cohort.sex[i] if sex_known else None, float(cohort.age_years[i]), reference)
        rows.append([r.z_score for r in result.regions])
    return np.array(rows, dtype=float)


def test_fit_recovers_the_known_coefficients_within_their_standard_errors(truth, fitted):
    standardised_errors = []
    for key in REGION_KEYS:
        estimate, se = fitted.measures[key].mean.coefficients, fitted.measures[key].extra["se"]
        for term in TERMS:
            error = (estimate[term] - truth.measures[key].mean.coefficients[term]) / se[term]
            assert abs(error) < 3, f"{key} {term}: {error:+.2f} SE from the truth"
            standardised_errors.append(error)
        true_sd = truth.measures[key].sd.coefficients["intercept"]
        # SE of a residual SD with 2997 df is about 1.3 %
        assert fitted.measures[key].sd.coefficients["intercept"] == pytest.approx(true_sd, rel=0.04)
    errors = np.array(standardised_errors)
    # 30 estimates: errors in SE units behave like standard normal draws
    assert np.mean(np.abs(errors) < 1) > 0.5
    assert abs(errors.mean()) < 0.6 and 0.5 < errors.std() < 1.5
    # the sex coefficients are negative (girls smaller) and the age coefficients positive, as in the paper
    assert all(fitted.measures[k].mean.coefficients["sex"] < 0 for k in REGION_KEYS)
    assert all(fitted.measures[k].mean.coefficients["age_years"] > 0 for k in REGION_KEYS)


def _within(reference, cohort: Cohort) -> Cohort:
    """The children whose age the (fitted) reference covers: it spans only the cohort's own ages."""
    return cohort.subset(np.array([reference.covers_age(a) for a in cohort.age_years]))


def test_z_scores_of_fresh_draws_are_standard_normal(truth, fitted):
    fresh = _within(fitted, simulate_cohort(2000, 2, truth))
    assert len(fresh) > 1990
    z = _z_scores(fitted, fresh)
    assert np.abs(z.mean(axis=0)).max() < 0.1
    assert np.abs(z.std(axis=0) - 1).max() < 0.06
    # regions of one child are correlated (see normative.simulate), so the grand mean varies more
    assert abs(z.mean()) < 0.08
    # |z| > 2 for about 4.55 % of normal draws
    assert 0.035 < np.mean(np.abs(z) > 2) < 0.057


def test_pooled_model_for_unknown_sex_gives_standard_normal_z(truth, fitted):
    fresh = _within(fitted, simulate_cohort(1500, 3, truth))
    z = _z_scores(fitted, fresh, sex_known=False)
    assert np.abs(z.mean(axis=0)).max() < 0.1
    assert np.abs(z.std(axis=0) - 1).max() < 0.07
    # but the pooled z of boys is higher than girls': the sex adjustment is what it leaves out
    boys = np.array([s == "M" for s in fresh.sex])
    assert z[boys].mean() > z[~boys].mean() + 0.4


def test_age_dependent_sd_is_recovered_and_needed(tmp_path):
    truth = paper_like_truth(age_dependent_sd=True)
    cohort = simulate_cohort(3000, 4, truth)
    varying = fit_reference(cohort, age_dependent_sd=True).reference
    constant = fit_reference(cohort).reference
    for key in REGION_KEYS:
        for age in (1.6, 2.4):
            true_sd = truth.expected(key, age, "F").sd
            assert varying.expected(key, age, "F").sd == pytest.approx(true_sd, rel=0.1), (key, age)
    fresh = _within(varying, simulate_cohort(2000, 5, truth))
    young, old = fresh.age_years < 1.75, fresh.age_years > 2.25
    z_varying, z_constant = _z_scores(varying, fresh), _z_scores(constant, fresh)
    for mask in (young, old):
        assert z_varying[mask].std() == pytest.approx(1.0, abs=0.06)
    # a constant SD overstates the spread of the young and understates that of the old
    assert z_constant[young].std() < 0.93 and z_constant[old].std() > 1.07
    path = varying.save(tmp_path / "varying.json")
    assert load_reference(path).measures["cerebellum"].sd.coefficients["age_years"] > 0


def test_fitted_reference_file_carries_its_provenance(tmp_path):
    cohort = simulate_cohort(200, 6)
    path = write_cohort(tmp_path / "site.csv", cohort)
    reference = fit_reference(read_cohort(path), name="SiteA", version="2026.1").reference
    loaded = load_reference(reference.save(tmp_path / "ref.json"))
    assert loaded.name == "SiteA" and loaded.version == "2026.1"
    assert loaded.n == 200
    assert loaded.metadata["sexes"] == {"M": cohort.sex.count("M"), "F": cohort.sex.count("F")}
    assert loaded.age_range_years == pytest.approx((cohort.age_years.min(), cohort.age_years.max()), abs=1e-3)
    provenance = loaded.metadata["provenance"]
    assert provenance["source_sha256"] == hashlib.sha256(path.read_bytes()).hexdigest()
    assert provenance["source_file"] == "site.csv" and provenance["fitted"].startswith("20")
    assert "adjusted for age and sex" in loaded.kind
    assert set(loaded.measures) >= {*REGION_KEYS, "total", "asymmetry_frontal_lobe"}
    # the total and the asymmetry get z-scores from a fitted reference
    result = compare(dict(zip(REGION_KEYS, cohort.volumes_cm3[0])), "F", 2.0, loaded)
    assert result.total.z_score is not None
    assert all(a.z_score is not None and a.reference_sd > 0 for a in result.asymmetry)
    # outside the cohort's ages the fitted reference does not apply
    assert not compare(dict(zip(REGION_KEYS, cohort.volumes_cm3[0])), "F", 3.0, loaded).applicable


def test_fit_reads_the_batch_volumes_csv_format(tmp_path):
    """The header and value style of node.pipeline.write_volumes_csv: empty sex/age when unknown."""
    cohort = simulate_cohort(60, 7)
    lines = ["id,sex,age_years," + ",".join(REGION_KEYS)]
    for i in range(len(cohort)):
        sex = "" if i == 8 else cohort.sex[i]
        age = "" if i == 3 else f"{cohort.age_years[i]:.3f}"
        lines.append(",".join([f"1.2.826.0.1.{i}", sex, age, *(f"{v:.3f}" for v in cohort.volumes_cm3[i])]))
    path = tmp_path / "volumes.csv"
    path.write_text("\r\n".join(lines) + "\r\n")
    outcome = fit_reference(read_cohort(path))
    assert outcome.reference.n == 58
    assert outcome.messages == ("volumes.csv: 2 row(s) without sex or age excluded from the fit (line(s) 5, 10)",)
    assert outcome.reference.metadata["provenance"]["rows_excluded_missing_sex_or_age"] == 2


def _tiny(n: int, sexes=("M", "F"), ages=None) -> Cohort:
    rng = np.random.default_rng(0)
    return Cohort(tuple(f"c{i}" for i in range(n)), tuple(sexes[i % len(sexes)] for i in range(n)),
                  np.array(ages if ages is not None else rng.uniform(1.5, 2.5, n)),
                  rng.uniform(10, 200, (n, 10)))


def test_fit_refuses_a_cohort_too_small_or_without_contrast():
    with pytest.raises(ValueError, match=f"{MIN_FIT_ROWS - 1} complete row.*too small to fit.*at least {MIN_FIT_ROWS}"):
        fit_reference(_tiny(MIN_FIT_ROWS - 1))
    with pytest.raises(ValueError, match="0 child\\(ren\\) of sex F"):
        fit_reference(_tiny(30, sexes=("M",)))
    with pytest.raises(ValueError, match="every child has the same age"):
        fit_reference(_tiny(30, ages=[2.0] * 30))
    cohort = _tiny(30)
    missing = Cohort(cohort.ids, tuple(None if i < 15 else s for i, s in enumerate(cohort.sex)),
                     cohort.age_years, cohort.volumes_cm3)
    with pytest.raises(ValueError, match="15 complete row"):
        fit_reference(missing)


def test_age_dependent_sd_that_would_turn_negative_is_refused():
    # spread shrinking steeply with age: the fitted SD line crosses zero inside the range
    rng = np.random.default_rng(1)
    n = 400
    age = rng.uniform(1.5, 2.5, n)
    spread = np.clip(2.3 - age, 0.0, None) * 40
    volumes = 100 + spread[:, None] * rng.standard_normal((n, 10))
    volumes = np.abs(volumes)
    cohort = Cohort(tuple(f"c{i}" for i in range(n)), tuple("MF"[i % 2] for i in range(n)), age, volumes)
    fit_reference(cohort)  # a constant SD is fine
    with pytest.raises(ValueError, match="age-dependent SD of .* would not be positive"):
        fit_reference(cohort, age_dependent_sd=True)
