"""Site-fitted references: the paper's model fitted to a site's own cohort.

For every measure (10 regions, their total, the 4 lobes' asymmetry index) we fit::

    value = b0 + b_age * age_years + b_sex * sex        (sex coded M = 1, F = 2, as the paper)

by ordinary least squares, with the residual SD as the reference SD (so a z-score is
adjusted for age and sex), and a *pooled* model ``value = b0 + b_age * age_years`` with
its own residual SD, used for children whose sex is unknown.

With ``age_dependent_sd=True`` the SD is a straight line in age instead of a constant:
sd(age) = s0 + s1 * age, fitted by regressing sqrt(pi/2) * |residual| on age (for
normal residuals E|e| = sd * sqrt(2/pi)), scaled by sqrt(n / (n - p)) so that it agrees
with the constant SD when the spread does not change with age.

Rows without sex or age are excluded (and reported); a cohort needs at least
:data:`MIN_FIT_ROWS` complete rows and :data:`MIN_PER_SEX` children of each sex.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from datetime import datetime, timezone
from typing import Optional

import numpy as np

from normative.cohort import Cohort
from normative.ols import OLSResult, fit_ols
from normative.reference import (
    FORMAT_VERSION, MEASURE_KEYS, LinearModel, MeasureModel, Reference,
)

#: Fewer complete rows than this is not a reference, whatever the statistics say.
MIN_FIT_ROWS = 20
#: Each sex needs this many children for its coefficient to mean anything.
MIN_PER_SEX = 5
SEX_CODING = {"M": 1, "F": 2}


@dataclass(frozen=True)
class FitOutcome:
    """A fitted reference and what the fit has to say about its input."""

    reference: Reference
    messages: tuple[str, ...]


def fit_reference(cohort: Cohort, *, age_dependent_sd: bool = False, name: Optional[str] = None,
                  version: str = "1", population: Optional[str] = None) -> FitOutcome:
    """Fit a reference to a cohort.

    Args:
        cohort: children with sex, age and the 10 volumes (rows missing sex or age
            are excluded and reported in ``messages``).
        age_dependent_sd: SD as a line in age instead of a constant.
        name, version, population: the reference's name (default: the file's stem),
            version and population description.

    Raises:
        ValueError: too few complete rows, too few children of a sex, no spread of
            ages, or an age-dependent SD that would not stay positive.
    """
    complete, excluded = cohort.complete()
    source = cohort.source.name if cohort.source else "in-memory cohort"
    messages = [m for m in (cohort.describe_excluded(excluded, "the fit"),) if m]
    if len(complete) < MIN_FIT_ROWS:
        raise ValueError(f"{source}: {len(complete)} complete row(s) (sex and age known): too small to fit a "
                         f"reference, need at least {MIN_FIT_ROWS}")
    counts = {s: sum(1 for x in complete.sex if x == s) for s in SEX_CODING}
    few = [s for s, c in counts.items() if c < MIN_PER_SEX]
    if few:
        raise ValueError(f"{source}: {', '.join(f'{counts[s]} child(ren) of sex {s}' for s in few)}: "
                         f"need at least {MIN_PER_SEX} of each sex to fit the sex coefficient")
    age = complete.age_years
    if np.ptp(age) <= 0:
        raise ValueError(f"{source}: every child has the same age ({age[0]:g} years): no age coefficient can be fitted")
    sex = complete.sex_codes(SEX_CODING)
    ones = np.ones(len(complete))
    full_design, pooled_design = np.column_stack([ones, age, sex]), np.column_stack([ones, age])
    age_range = (float(age.min()), float(age.max()))

    measures = {}
    for key in MEASURE_KEYS:
        y = complete.measure(key)
        full = fit_ols(full_design, y, ("intercept", "age_years", "sex"))
        pooled = fit_ols(pooled_design, y, ("intercept", "age_years"))
        measures[key] = MeasureModel(
            _mean_model(full), _sd_model(full, age, age_dependent_sd, key, age_range),
            MeasureModel(_mean_model(pooled), _sd_model(pooled, age, age_dependent_sd, key, age_range),
                         extra={"r2": round(pooled.r_squared, 6), "residual_sd": pooled.residual_sd}),
            extra=_fit_figures(full),
        )
    sd_kind = "SD varying linearly with age" if age_dependent_sd else "constant residual SD"
    reference = Reference(
        name=name or (cohort.source.stem if cohort.source else "site"),
        version=version,
        kind=f"site-fitted (adjusted for age and sex; {sd_kind})",
        citation=f"fitted with lobevol normative fit from {source} (sha256 {cohort.sha256 or 'n/a'}); "
                 f"model of Xi et al. 2025, Front Neurol 16:1573060",
        population=population or f"children of the site cohort {source}",
        n=len(complete),
        age_range_years=age_range,
        sex_coding=SEX_CODING,
        measures=measures,
        metadata={
            "sexes": counts,
            "age_mean_years": round(float(age.mean()), 4),
            "age_sd_years": round(float(age.std(ddof=1)), 4),
            "method": f"ordinary least squares per measure: value = b0 + b_age*age_years + b_sex*sex "
                      f"(sex M=1, F=2), {sd_kind}; pooled model without sex for children of unknown sex",
            "notes": [f"z-scores are adjusted for age and sex; the reference applies to ages "
                      f"{age_range[0]:.2f}-{age_range[1]:.2f} years (the ages of the cohort)"],
            "provenance": {
                "fitted": datetime.now(timezone.utc).isoformat(timespec="seconds"),
                "source_file": source,
                "source_sha256": cohort.sha256,
                "rows_read": len(cohort),
                "rows_excluded_missing_sex_or_age": len(excluded),
                "age_dependent_sd": age_dependent_sd,
                "reference_format_version": FORMAT_VERSION,
            },
        },
    )
    return FitOutcome(reference, tuple(messages))


def _mean_model(fit: OLSResult) -> LinearModel:
    return LinearModel({term: float(value) for term, value in zip(fit.terms, fit.coefficients)})


def _sd_model(fit: OLSResult, age: np.ndarray, age_dependent: bool, key: str,
              age_range: tuple[float, float]) -> LinearModel:
    if not age_dependent:
        return LinearModel({"intercept": fit.residual_sd})
    scale = math.sqrt(math.pi / 2) * math.sqrt(fit.n / fit.df_residual)
    spread = fit_ols(np.column_stack([np.ones_like(age), age]), scale * np.abs(fit.residuals),
                     ("intercept", "age_years"))
    model = LinearModel({"intercept": spread.coefficient("intercept"), "age_years": spread.coefficient("age_years")})
    for a in age_range:
        if not model.predict(a, None) > 0:
            raise ValueError(f"the age-dependent SD of {key} would not be positive at age {a:.2f} years; "
                             f"fit with a constant SD instead (without --age-dependent-sd)")
    return model


def _fit_figures(fit: OLSResult) -> dict:
    """Standard errors and fit quality kept in the file as provenance."""
    return {
        "n": fit.n,
        "se": {term: float(se) for term, se in zip(fit.terms, fit.standard_errors)},
        "p": {term: float(p) for term, p in zip(fit.terms, fit.p_values)},
        "r2": round(fit.r_squared, 6),
        "residual_sd": fit.residual_sd,
    }
