"""Ordinary least squares with the figures a regression table reports (SPSS-like).

One function, :func:`fit_ols`, used by both ``normative fit`` (reference models) and
``normative stats`` (Tables 3 and 4 of the paper).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

import numpy as np
from scipy import stats


@dataclass(frozen=True)
class OLSResult:
    """A fitted linear model ``y = X b + e``.

    Attributes:
        terms: name of each column of X (the first is usually "intercept").
        coefficients: b, in units of y per unit of each term.
        standard_errors: SE of b, from the residual variance (n - p degrees of freedom).
        t_values, p_values: t = b / SE and its two-sided p-value.
        standardized: standardized coefficients (beta = b * SD(x) / SD(y); NaN
            for the intercept).
        r_squared, adjusted_r_squared: coefficient of determination.
        f_statistic, f_p_value: overall F test of the non-intercept terms.
        residual_sd: sqrt(RSS / (n - p)), units of y.
        residuals: y - X b.
        n: observations; df_residual: n - p.
    """

    terms: tuple[str, ...]
    coefficients: np.ndarray
    standard_errors: np.ndarray
    t_values: np.ndarray
    p_values: np.ndarray
    standardized: np.ndarray
    r_squared: float
    adjusted_r_squared: float
    f_statistic: float
    f_p_value: float
    residual_sd: float
    residuals: np.ndarray
    n: int
    df_residual: int

    def coefficient(self, term: str) -> float:
        return float(self.coefficients[self.terms.index(term)])

    def standard_error(self, term: str) -> float:
        return float(self.standard_errors[self.terms.index(term)])


def fit_ols(design: np.ndarray, y: np.ndarray, terms: Sequence[str]) -> OLSResult:
    """Fit ``y`` on the columns of ``design`` (which must include an intercept column of ones
    named "intercept" for R2 and F to have their usual meaning).

    Raises:
        ValueError: shapes disagree, too few observations (n <= p), non-finite
            values, or collinear predictors (e.g. every child of the same sex).
    """
    design = np.asarray(design, dtype=float)
    y = np.asarray(y, dtype=float)
    terms = tuple(terms)
    if design.ndim != 2 or y.shape != (design.shape[0],) or design.shape[1] != len(terms):
        raise ValueError(f"design {design.shape}, y {y.shape} and {len(terms)} term names do not fit together")
    n, p = design.shape
    if n <= p:
        raise ValueError(f"{n} observation(s) cannot fit {p} coefficients ({', '.join(terms)})")
    if not (np.isfinite(design).all() and np.isfinite(y).all()):
        raise ValueError("regression data contain missing or non-finite values")
    if np.linalg.matrix_rank(design) < p:
        raise ValueError(f"the predictors ({', '.join(t for t in terms if t != 'intercept')}) are collinear or "
                         f"constant (e.g. every child of the same sex or age): the model cannot be fitted")
    coefficients, *_ = np.linalg.lstsq(design, y, rcond=None)
    residuals = y - design @ coefficients
    df = n - p
    rss = float(residuals @ residuals)
    sigma2 = rss / df
    covariance = sigma2 * np.linalg.inv(design.T @ design)
    standard_errors = np.sqrt(np.diag(covariance))
    with np.errstate(divide="ignore", invalid="ignore"):
        t_values = coefficients / standard_errors
    p_values = 2 * stats.t.sf(np.abs(t_values), df)
    tss = float(((y - y.mean()) ** 2).sum())
    r_squared = 1 - rss / tss if tss > 0 else float("nan")
    adjusted = 1 - (1 - r_squared) * (n - 1) / df
    k = p - 1  # non-intercept terms
    f_statistic = ((tss - rss) / k) / sigma2 if k > 0 and sigma2 > 0 else float("nan")
    f_p_value = float(stats.f.sf(f_statistic, k, df)) if k > 0 else float("nan")
    y_sd = y.std(ddof=1)
    standardized = np.array([
        np.nan if term == "intercept" else coefficients[j] * design[:, j].std(ddof=1) / y_sd
        for j, term in enumerate(terms)
    ])
    return OLSResult(terms, coefficients, standard_errors, t_values, p_values, standardized, r_squared, adjusted,
                     float(f_statistic), f_p_value, float(np.sqrt(sigma2)), residuals, n, df)
