"""The paper's cohort statistics, as tables (Xi et al. 2025, Tables 1-5 and Figure 3).

Each function takes a :class:`~normative.cohort.Cohort` and returns a :class:`Table`
(written as CSV by :meth:`Table.write_csv`, laid out in the PDF by
:mod:`normative.stats_report`):

- :func:`descriptive_table`: mean and SD per region, overall and by sex (Table 2);
- :func:`balance_tables`: two groups of a split column compared on age (Student's
  t-test, equal variances, the same p as a one-way ANOVA with two groups) and sex
  (Pearson chi-square without continuity correction, as SPSS reports first) (Table 1);
- :func:`regression_table`: each region on sex (M = 1, F = 2, as the paper) and age:
  B, SE, standardized beta, t, p, R2 (Tables 3 and 4);
- :func:`paired_table`: left vs right per lobe, paired t-test with the mean
  difference L - R, its 95 % CI and Cohen's dz = mean difference / SD of differences
  (Table 5);
- :func:`spearman_table`: Spearman's rho of each region with age.

Rows without sex or age are left out of the analyses that need them; each table says
how many rows it used. Volumes in cm3, ages in years.
"""
from __future__ import annotations

import csv
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Optional

import numpy as np
from scipy import stats

from inference.vocabulary import LOBE_PAIRS, REGION_KEYS, region_by_key
from normative.cohort import Cohort
from normative.ols import fit_ols

SEX_CODING = {"M": 1, "F": 2}
#: Measures described per region: the 10 regions and their total.
VOLUME_KEYS: tuple[str, ...] = (*REGION_KEYS, "total")


@dataclass(frozen=True)
class Table:
    """One result table.

    Attributes:
        name: file stem of its CSV (e.g. "table2_descriptive").
        title: heading in the report.
        columns: column names (CSV header).
        rows: values (str, int, float or None for "not applicable").
        notes: plain-language notes printed under the table.
    """

    name: str
    title: str
    columns: tuple[str, ...]
    rows: tuple[tuple[Any, ...], ...]
    notes: tuple[str, ...] = ()

    def __post_init__(self) -> None:
        for row in self.rows:
            if len(row) != len(self.columns):
                raise ValueError(f"table {self.name}: a row has {len(row)} values for {len(self.columns)} columns")

    def column(self, name: str) -> list[Any]:
        index = self.columns.index(name)
        return [row[index] for row in self.rows]

    def row(self, **match: Any) -> dict[str, Any]:
        """The first row whose columns equal ``match`` (as a dict)."""
        for row in self.rows:
            record = dict(zip(self.columns, row))
            if all(record[k] == v for k, v in match.items()):
                return record
        raise KeyError(f"table {self.name}: no row with {match}")

    def write_csv(self, directory: Path) -> Path:
        path = Path(directory) / f"{self.name}.csv"
        with open(path, "w", newline="") as handle:
            writer = csv.writer(handle)
            writer.writerow(self.columns)
            for row in self.rows:
                writer.writerow(["" if v is None else (f"{v:.6g}" if isinstance(v, float) else v) for v in row])
        return path


def label(key: str) -> str:
    """Human-readable name of a measure key."""
    return "Total (10 regions)" if key == "total" else region_by_key(key).name


def descriptive_table(cohort: Cohort) -> Table:
    """Table 2: n, mean and SD (cm3) of each region and the total, overall and per sex."""
    boys = np.array([s == "M" for s in cohort.sex])
    girls = np.array([s == "F" for s in cohort.sex])
    rows = []
    for key in VOLUME_KEYS:
        values = cohort.measure(key)
        row: list[Any] = [key]
        for mask in (np.ones(len(cohort), dtype=bool), boys, girls):
            row += [int(mask.sum()), *_mean_sd(values[mask])]
        rows.append(tuple(row))
    unknown = len(cohort) - int(boys.sum() + girls.sum())
    notes = ["volumes in cm3; SD with n - 1 in the denominator"]
    if unknown:
        notes.append(f"{unknown} child(ren) of unknown sex are counted in 'all' only")
    return Table("table2_descriptive", "Regional volumes, overall and by sex (cm3, mean and SD)",
                 ("region", "n_all", "mean_all", "sd_all", "n_boys", "mean_boys", "sd_boys",
                  "n_girls", "mean_girls", "sd_girls"), tuple(rows), tuple(notes))


def balance_tables(cohort: Cohort, split_column: str) -> tuple[Table, Table]:
    """Table 1: the two groups of ``split_column`` compared on age and sex.

    Returns (groups table, tests table). Children with an empty split value are left out.

    Raises:
        ValueError: the column is absent or does not hold exactly two groups.
    """
    if split_column not in cohort.extra:
        available = ", ".join(cohort.extra) or "none"
        raise ValueError(f"no column {split_column!r} in the cohort (extra columns: {available})")
    values = np.array(cohort.extra[split_column], dtype=object)
    groups = sorted(set(values) - {""})
    if len(groups) != 2:
        raise ValueError(f"column {split_column!r} must hold exactly two groups to compare, "
                         f"found {len(groups)}: {', '.join(map(repr, groups[:10]))}")
    masks = [values == g for g in groups]
    rows, ages, sex_counts = [], [], []
    for group, mask in zip(groups, masks):
        age = cohort.age_years[mask]
        age = age[~np.isnan(age)]
        sexes = [s for s, m in zip(cohort.sex, mask) if m]
        counts = [sexes.count("M"), sexes.count("F")]
        rows.append((group, int(mask.sum()), len(age), *_mean_sd(age), *counts))
        ages.append(age)
        sex_counts.append(counts)
    if min(len(a) for a in ages) < 2:
        raise ValueError(f"each group of {split_column!r} needs at least 2 children with a known age")
    t = stats.ttest_ind(ages[0], ages[1], equal_var=True)
    contingency = np.array(sex_counts)
    if (contingency.sum(axis=0) == 0).any() or (contingency.sum(axis=1) == 0).any():
        chi2 = (math.nan, math.nan, 0)
    else:
        result = stats.chi2_contingency(contingency, correction=False)
        chi2 = (float(result.statistic), float(result.pvalue), int(result.dof))
    tests = (
        ("age_years", "Student t-test (equal variances)", float(t.statistic), float(t.df), float(t.pvalue)),
        ("sex", "Pearson chi-square (no continuity correction)", chi2[0], float(chi2[2]), chi2[1]),
    )
    left_out = int((values == "").sum())
    notes = [f"groups from column {split_column!r}"]
    if left_out:
        notes.append(f"{left_out} child(ren) with an empty {split_column!r} left out")
    return (
        Table("table1_groups", f"Groups of '{split_column}': age and sex",
              ("group", "n", "n_with_age", "age_mean_years", "age_sd_years", "boys", "girls"),
              tuple(rows), tuple(notes)),
        Table("table1_tests", f"Balance of the groups of '{split_column}'",
              ("variable", "test", "statistic", "df", "p"), tests,
              (f"t > 0: group {groups[0]!r} older; p >= 0.05 means no evidence of a difference",)),
    )


def regression_table(cohort: Cohort) -> Table:
    """Tables 3-4: each region (and the total) regressed on sex (M = 1, F = 2) and age."""
    complete, excluded = cohort.complete()
    present = sorted(set(complete.sex))
    if len(present) < 2:
        raise ValueError(f"the regression on sex and age needs children of both sexes with a known age; "
                         f"the cohort has {', '.join(present) or 'none'} only")
    design = np.column_stack([np.ones(len(complete)), complete.sex_codes(SEX_CODING), complete.age_years])
    rows = []
    for key in VOLUME_KEYS:
        fit = fit_ols(design, complete.measure(key), ("intercept", "sex", "age_years"))
        for j, term in enumerate(fit.terms):
            rows.append((key, term, float(fit.coefficients[j]), float(fit.standard_errors[j]),
                         None if term == "intercept" else float(fit.standardized[j]),
                         float(fit.t_values[j]), float(fit.p_values[j]),
                         fit.r_squared, fit.adjusted_r_squared, fit.f_statistic, fit.f_p_value, fit.n))
    notes = ["multiple linear regression, volume (cm3) = B0 + B_sex * sex + B_age * age_years; "
             "sex coded 1 = male, 2 = female (as the paper): a negative B_sex means girls' volumes are smaller",
             "beta: standardized coefficient (B * SD(x) / SD(volume))"]
    if excluded:
        notes.append(f"{len(excluded)} row(s) without sex or age left out")
    return Table("table3_regression", "Regional volume on sex and age (multiple linear regression)",
                 ("region", "term", "B", "SE", "beta", "t", "p", "r2", "adjusted_r2", "F", "p_F", "n"),
                 tuple(rows), tuple(notes))


def paired_table(cohort: Cohort) -> Table:
    """Table 5: left vs right volume per lobe (paired t-test, difference L - R in cm3)."""
    rows = []
    for structure, right_key, left_key in LOBE_PAIRS:
        left, right = cohort.measure(left_key), cohort.measure(right_key)
        difference = left - right
        n = len(difference)
        if n < 2:
            raise ValueError("the paired t-test needs at least 2 children")
        test = stats.ttest_rel(left, right)
        ci = test.confidence_interval(0.95)
        sd = float(difference.std(ddof=1))
        rows.append((structure, n, float(left.mean()), float(right.mean()), float(difference.mean()), sd,
                     float(ci.low), float(ci.high), float(test.statistic), int(test.df), float(test.pvalue),
                     float(difference.mean() / sd) if sd > 0 else None))
    return Table("table5_paired_left_right", "Left vs right per lobe (paired t-test)",
                 ("structure", "n", "mean_left", "mean_right", "mean_difference", "sd_difference",
                  "ci95_low", "ci95_high", "t", "df", "p", "cohens_dz"), tuple(rows),
                 ("difference = left - right, cm3 (positive: left larger)",
                  "Cohen's dz = mean difference / SD of the differences"))


def spearman_table(cohort: Cohort) -> Table:
    """Spearman's rank correlation of each region (and the total) with age."""
    known = ~np.isnan(cohort.age_years)
    rows = []
    constant = []
    for key in VOLUME_KEYS:
        values, ages = cohort.measure(key)[known], cohort.age_years[known]
        if len(values) < 3 or np.ptp(values) == 0 or np.ptp(ages) == 0:
            constant.append(key)  # rho is undefined: say so instead of a NaN
            rows.append((key, int(known.sum()), None, None))
            continue
        result = stats.spearmanr(values, ages)
        rows.append((key, int(known.sum()), float(result.statistic), float(result.pvalue)))
    notes = []
    if constant:
        notes.append(f"no correlation for {', '.join(constant)}: fewer than 3 children, or constant values")
    if not known.all():
        notes.append(f"{int((~known).sum())} row(s) without age left out")
    return Table("spearman_age", "Spearman correlation of regional volume with age",
                 ("region", "n", "rho", "p"), tuple(rows), tuple(notes))


def all_tables(cohort: Cohort, split_column: Optional[str] = None) -> list[Table]:
    """Every table of the report, in the paper's order."""
    complete, _ = cohort.complete()
    if len(complete) < 4:
        raise ValueError(f"{len(complete)} row(s) with sex and age: too few for the regression "
                         f"(need at least 4)")
    tables = list(balance_tables(cohort, split_column)) if split_column else []
    tables += [descriptive_table(cohort), regression_table(cohort), paired_table(cohort), spearman_table(cohort)]
    return tables


def _mean_sd(values: np.ndarray) -> tuple[Optional[float], Optional[float]]:
    if len(values) == 0:
        return None, None
    return float(values.mean()), (float(values.std(ddof=1)) if len(values) > 1 else None)
