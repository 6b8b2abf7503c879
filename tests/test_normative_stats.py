"""Cohort statistics: every figure against scipy on the same data, or hand-worked values."""
from __future__ import annotations

import re
import shutil
import subprocess

import numpy as np
import pytest
from scipy import linalg, stats

from inference.vocabulary import LOBE_PAIRS, REGION_KEYS
from normative.cohort import Cohort
from normative.ols import fit_ols
from normative.simulate import simulate_cohort
from normative.stats import (
    all_tables, balance_tables, descriptive_table, paired_table, regression_table, spearman_table,
)
from normative.stats_report import render_stats_pdf


@pytest.fixture(scope="module")
def cohort() -> Cohort:
    """400 synthetic children, 3 of them with unknown sex or age."""
    base = simulate_cohort(400, 11)
    sex = list(base.sex)
    age = base.age_years.copy()
    sex[5] = None
    age[17] = np.nan
    age[33] = np.nan
    return Cohort(base.ids, tuple(sex), age, base.volumes_cm3, base.extra)


def _tiny_cohort(left_right: dict[str, tuple[list[float], list[float]]], sexes, ages) -> Cohort:
    n = len(sexes)
    volumes = np.full((n, 10), 50.0)
    for structure, (left, right) in left_right.items():
        for s, right_key, left_key in LOBE_PAIRS:
            if s == structure:
                volumes[:, REGION_KEYS.index(left_key)] = left
                volumes[:, REGION_KEYS.index(right_key)] = right
    return Cohort(tuple(f"c{i}" for i in range(n)), tuple(sexes), np.array(ages, dtype=float), volumes)


# ---- OLS -----------------------------------------------------------------------------------

def test_ols_hand_worked_simple_regression():
    x, y = np.array([1, 2, 3, 4, 5.0]), np.array([1, 3, 2, 5, 4.0])
    fit = fit_ols(np.column_stack([np.ones(5), x]), y, ("intercept", "x"))
    # Sxy = 8, Sxx = 10: slope 0.8, intercept 0.6; RSS 3.6, sigma2 = 1.2, TSS 10
    assert fit.coefficients == pytest.approx([0.6, 0.8])
    assert fit.standard_error("x") == pytest.approx(np.sqrt(1.2 / 10))
    assert fit.t_values[1] == pytest.approx(0.8 / np.sqrt(0.12))
    assert fit.r_squared == pytest.approx(0.64)
    assert fit.adjusted_r_squared == pytest.approx(1 - 0.36 * 4 / 3)
    assert fit.residual_sd == pytest.approx(np.sqrt(1.2))
    assert fit.df_residual == 3


def test_ols_agrees_with_scipy_linregress_and_lstsq(cohort):
    complete, _ = cohort.complete()
    y = complete.measure("cerebellum")
    simple = fit_ols(np.column_stack([np.ones(len(complete)), complete.age_years]), y, ("intercept", "age_years"))
    reference = stats.linregress(complete.age_years, y)
    assert simple.coefficient("age_years") == pytest.approx(reference.slope)
    assert simple.coefficient("intercept") == pytest.approx(reference.intercept)
    assert simple.standard_error("age_years") == pytest.approx(reference.stderr)
    assert simple.standard_error("intercept") == pytest.approx(reference.intercept_stderr)
    assert simple.p_values[1] == pytest.approx(reference.pvalue)
    assert simple.r_squared == pytest.approx(reference.rvalue ** 2)
    assert simple.f_p_value == pytest.approx(reference.pvalue)   # one predictor: F = t^2
    assert simple.standardized[1] == pytest.approx(reference.rvalue)

    sex = complete.sex_codes({"M": 1, "F": 2})
    design = np.column_stack([np.ones(len(complete)), sex, complete.age_years])
    multiple = fit_ols(design, y, ("intercept", "sex", "age_years"))
    coefficients, rss, *_ = linalg.lstsq(design, y)
    assert multiple.coefficients == pytest.approx(coefficients)
    sigma2 = rss / (len(y) - 3)
    se = np.sqrt(np.diag(sigma2 * np.linalg.inv(design.T @ design)))
    assert multiple.standard_errors == pytest.approx(se)
    assert multiple.p_values == pytest.approx(2 * stats.t.sf(np.abs(coefficients / se), len(y) - 3))


def test_ols_refuses_collinear_or_too_few():
    with pytest.raises(ValueError, match="collinear or constant"):
        fit_ols(np.column_stack([np.ones(6), np.ones(6)]), np.arange(6.0), ("intercept", "sex"))
    with pytest.raises(ValueError, match="2 observation\\(s\\) cannot fit 2"):
        fit_ols(np.column_stack([np.ones(2), [1.0, 2.0]]), np.array([1.0, 2.0]), ("intercept", "x"))


# ---- tables vs scipy -------------------------------------------------------------------------

def test_descriptive_table_overall_and_by_sex(cohort):
    table = descriptive_table(cohort)
    assert table.column("region") == [*REGION_KEYS, "total"]
    boys = np.array([s == "M" for s in cohort.sex])
    girls = np.array([s == "F" for s in cohort.sex])
    for key in ("cerebellum", "total"):
        row = table.row(region=key)
        values = cohort.measure(key)
        assert row["n_all"] == 400 and row["n_boys"] + row["n_girls"] == 399
        assert row["mean_all"] == pytest.approx(values.mean())
        assert row["sd_all"] == pytest.approx(stats.tstd(values))
        assert row["mean_girls"] == pytest.approx(values[girls].mean())
        assert row["sd_boys"] == pytest.approx(values[boys].std(ddof=1))
    assert any("unknown sex" in note for note in table.notes)


def test_balance_tables_agree_with_scipy(cohort):
    groups, tests = balance_tables(cohort, "split")
    split = np.array(cohort.extra["split"])
    test_age = cohort.age_years[(split == "test") & ~np.isnan(cohort.age_years)]
    train_age = cohort.age_years[(split == "train") & ~np.isnan(cohort.age_years)]
    t = stats.ttest_ind(test_age, train_age)
    row = tests.row(variable="age_years")
    assert row["statistic"] == pytest.approx(t.statistic) and row["p"] == pytest.approx(t.pvalue)
    # two groups: the t-test p is the one-way ANOVA p
    assert row["p"] == pytest.approx(stats.f_oneway(test_age, train_age).pvalue)
    counts = [[sum(1 for s, g in zip(cohort.sex, split) if g == group and s == sex) for sex in "MF"]
              for group in ("test", "train")]
    chi2 = stats.chi2_contingency(counts, correction=False)
    row = tests.row(variable="sex")
    assert row["statistic"] == pytest.approx(chi2.statistic) and row["p"] == pytest.approx(chi2.pvalue)
    assert row["df"] == 1
    assert groups.row(group="test")["boys"] == counts[0][0]
    assert groups.row(group="test")["age_mean_years"] == pytest.approx(test_age.mean())


def test_balance_chi_square_hand_worked():
    # 2x2: group a 3 M 1 F, group b 1 M 3 F; expected 2 everywhere: chi2 = 4 * (1/2) = 2
    tiny = _tiny_cohort({}, "MMMFMFFF", [1.6, 1.8, 2.0, 2.2, 1.7, 1.9, 2.1, 2.3])
    tiny = Cohort(tiny.ids, tiny.sex, tiny.age_years, tiny.volumes_cm3, {"group": tuple("aaaabbbb")})
    groups, tests = balance_tables(tiny, "group")
    assert tests.row(variable="sex")["statistic"] == pytest.approx(2.0)
    assert tests.row(variable="sex")["p"] == pytest.approx(stats.chi2.sf(2.0, 1))
    # ages a: 1.6 1.8 2.0 2.2 (mean 1.9), b: 1.7 1.9 2.1 2.3 (mean 2.0), both SD sqrt(0.2/3):
    # t = -0.1 / sqrt(2 * (0.2/3) / 4) = -0.5477
    assert tests.row(variable="age_years")["statistic"] == pytest.approx(-0.1 / np.sqrt(2 * 0.2 / 3 / 4))
    assert tests.row(variable="age_years")["df"] == 6


def test_balance_needs_a_column_with_two_groups(cohort):
    with pytest.raises(ValueError, match="no column 'site'.*extra columns: split"):
        balance_tables(cohort, "site")
    three = Cohort(cohort.ids, cohort.sex, cohort.age_years, cohort.volumes_cm3,
                   {"split": tuple("abc"[i % 3] for i in range(len(cohort)))})
    with pytest.raises(ValueError, match="exactly two groups.*found 3"):
        balance_tables(three, "split")


def test_regression_table_agrees_with_ols_and_leaves_out_incomplete_rows(cohort):
    table = regression_table(cohort)
    complete, excluded = cohort.complete()
    assert len(excluded) == 3 and any("3 row(s)" in note for note in table.notes)
    design = np.column_stack([np.ones(len(complete)), complete.sex_codes({"M": 1, "F": 2}), complete.age_years])
    for key in ("right_frontal_lobe", "brainstem", "total"):
        coefficients, *_ = linalg.lstsq(design, complete.measure(key))
        for term, value in zip(("intercept", "sex", "age_years"), coefficients):
            row = table.row(region=key, term=term)
            assert row["B"] == pytest.approx(value)
            assert row["n"] == 397
        assert table.row(region=key, term="sex")["B"] < 0   # girls smaller, as in the paper


def test_paired_table_agrees_with_scipy(cohort):
    table = paired_table(cohort)
    for structure, right_key, left_key in LOBE_PAIRS:
        left, right = cohort.measure(left_key), cohort.measure(right_key)
        reference = stats.ttest_rel(left, right)
        ci = reference.confidence_interval()
        row = table.row(structure=structure)
        assert row["t"] == pytest.approx(reference.statistic) and row["p"] == pytest.approx(reference.pvalue)
        assert (row["ci95_low"], row["ci95_high"]) == pytest.approx((ci.low, ci.high))
        assert row["mean_difference"] == pytest.approx((left - right).mean())
        assert row["df"] == 399


def test_paired_table_hand_worked():
    # differences L - R: 1, 2, 0, 2 -> mean 1.25, SD sqrt(2.75/3), t = 1.25 / (SD / 2)
    tiny = _tiny_cohort({"frontal lobe": ([10, 12, 11, 14], [9, 10, 11, 12])}, "MFMF", [2.0, 2.1, 2.2, 2.3])
    row = paired_table(tiny).row(structure="frontal lobe")
    sd = np.sqrt(2.75 / 3)
    assert row["mean_difference"] == pytest.approx(1.25)
    assert row["sd_difference"] == pytest.approx(sd)
    assert row["t"] == pytest.approx(1.25 / (sd / 2))
    assert row["cohens_dz"] == pytest.approx(1.25 / sd)
    half_width = stats.t.ppf(0.975, 3) * sd / 2     # 3.182446 * 0.478714
    assert (row["ci95_low"], row["ci95_high"]) == pytest.approx((1.25 - half_width, 1.25 + half_width))
    assert row["ci95_low"] == pytest.approx(-0.27346, abs=1e-4)


def test_spearman_table_agrees_with_scipy(cohort):
    table = spearman_table(cohort)
    known = ~np.isnan(cohort.age_years)
    for key in ("left_temporal_lobe", "total"):
        reference = stats.spearmanr(cohort.measure(key)[known], cohort.age_years[known])
        row = table.row(region=key)
        assert row["rho"] == pytest.approx(reference.statistic) and row["p"] == pytest.approx(reference.pvalue)
        assert row["n"] == 398 and row["rho"] > 0
    # hand-worked: ranks agree perfectly -> rho 1; reversed -> -1
    tiny = _tiny_cohort({}, "MFMF", [1.6, 1.8, 2.0, 2.2])
    tiny.volumes_cm3[:, REGION_KEYS.index("cerebellum")] = [100, 110, 120, 130]
    tiny.volumes_cm3[:, REGION_KEYS.index("brainstem")] = [16, 15, 14, 13]
    tiny_table = spearman_table(tiny)
    assert tiny_table.row(region="cerebellum")["rho"] == pytest.approx(1.0)
    assert tiny_table.row(region="brainstem")["rho"] == pytest.approx(-1.0)


# ---- files and PDF ---------------------------------------------------------------------------

def test_tables_write_csv_and_the_pdf_has_three_pages(cohort, tmp_path):
    tables = all_tables(cohort, "split")
    names = [table.write_csv(tmp_path).name for table in tables]
    assert names == ["table1_groups.csv", "table1_tests.csv", "table2_descriptive.csv", "table3_regression.csv",
                     "table5_paired_left_right.csv", "spearman_age.csv"]
    header = (tmp_path / "table3_regression.csv").read_text().splitlines()[0]
    assert header == "region,term,B,SE,beta,t,p,r2,adjusted_r2,F,p_F,n"
    assert len((tmp_path / "table3_regression.csv").read_text().splitlines()) == 1 + 11 * 3
    pdf = render_stats_pdf(cohort, tables, split_column="split")
    assert pdf.startswith(b"%PDF")
    assert len(re.findall(rb"/Type /Page\b", pdf)) == 3


@pytest.mark.integration
def test_the_pdf_renders_with_poppler(cohort, tmp_path):
    assert shutil.which("pdftoppm"), "poppler-utils (pdftoppm) is needed"
    (tmp_path / "report.pdf").write_bytes(render_stats_pdf(cohort, all_tables(cohort)))
    subprocess.run(["pdftoppm", "-png", "-r", "30", str(tmp_path / "report.pdf"), str(tmp_path / "page")],
                   check=True, timeout=60)
    pages = sorted(tmp_path.glob("page-*.png"))
    assert len(pages) == 3
    from PIL import Image
    # the figure page is not blank: the scatter points colour many pixels
    figure = np.asarray(Image.open(pages[2]).convert("RGB")).astype(int)
    coloured = (np.abs(figure[..., 0] - figure[..., 2]) > 60).mean()
    assert coloured > 0.003


def test_regression_needs_both_sexes(cohort):
    boys = cohort.subset(np.array([s == "M" for s in cohort.sex]))
    with pytest.raises(ValueError, match="needs children of both sexes.*has M only"):
        regression_table(boys)


def test_stats_refuses_a_cohort_without_enough_complete_rows():
    tiny = _tiny_cohort({}, [None, None, "M", "F", None], [2.0, 2.1, 2.2, 2.3, 2.4])
    with pytest.raises(ValueError, match="2 row\\(s\\) with sex and age: too few"):
        all_tables(tiny)
