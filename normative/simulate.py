"""Synthetic cohorts drawn from known coefficients (for tests, demos and checking the fit).

The *truth* is a :class:`~normative.reference.Reference` whose 10 region models are the
generating models: volume = b0 + b_age*age + b_sex*sex + sd(age) * N(0, 1), sex coded
M = 1, F = 2. Any reference with an SD for every region can serve as truth (a fitted
site reference, for instance); :func:`paper_like_truth` builds the default one.

The default truth matches the paper's whole-cohort mean and SD of every region for a
cohort like the paper's (ages uniform over 1.5-2.5 years, 826 boys / 661 girls), with
two *assumed* effects, since the paper's coefficients were published only as images:
boys larger by :data:`BOYS_LARGER_FRACTION` of the mean, and growth per year of
:data:`GROWTH_PER_YEAR` of the mean (cerebellum faster, brainstem slower). These are
illustrative, not the paper's numbers.

Regions of one child are correlated (a bigger head has bigger lobes): each child's
standardised residual mixes a factor shared by all regions, one shared by the two sides
of a lobe, and its own noise, with the variance shares of :data:`RESIDUAL_SHARES`
(correlation 0.7 between structures, 0.9 between the two sides of a lobe). This leaves
each region's mean and SD as the truth says, and gives the total and the asymmetry
indices realistic spreads.
"""
from __future__ import annotations

import math
from typing import Optional

import numpy as np

from inference.vocabulary import REGION_KEYS, region_by_key
from normative.cohort import Cohort
from normative.reference import LinearModel, MeasureModel, Reference, load_reference

#: Boys' volumes exceed girls' by this fraction of the mean (assumed).
BOYS_LARGER_FRACTION = 0.07
#: Growth per year as a fraction of the mean, per structure (assumed).
GROWTH_PER_YEAR = {"frontal lobe": 0.08, "parietal lobe": 0.08, "occipital lobe": 0.07,
                   "temporal lobe": 0.08, "cerebellum": 0.12, "brainstem": 0.06}
#: With an age-dependent SD, the SD grows by this fraction of its mid-range value per year.
SD_GROWTH_PER_YEAR = 0.3
#: Residual variance shares (all regions, the two sides of a lobe, the region alone); assumed.
RESIDUAL_SHARES = {"child": 0.7, "lobe": 0.2, "own": 0.1}
SPLIT_TEST_FRACTION = 0.3  # the paper's 7:3 training/test split


def paper_like_truth(age_dependent_sd: bool = False) -> Reference:
    """Generating models that reproduce the bundled reference's whole-cohort means and SDs."""
    paper = load_reference()
    low, high = paper.age_range_years
    p_boys = paper.metadata["sexes"]["M"] / paper.n
    age_mean, age_var = (low + high) / 2, (high - low) ** 2 / 12   # uniform ages
    sex_mean, sex_var = p_boys * 1 + (1 - p_boys) * 2, p_boys * (1 - p_boys)
    measures = {}
    for key in REGION_KEYS:
        expected = paper.expected(key, age_mean, None)
        b_age = GROWTH_PER_YEAR[region_by_key(key).structure] * expected.mean
        b_sex = -BOYS_LARGER_FRACTION * expected.mean
        residual_var = expected.sd ** 2 - b_age ** 2 * age_var - b_sex ** 2 * sex_var
        if residual_var <= 0:
            raise ValueError(f"assumed effects explain more than the whole SD of {key}")
        sd = math.sqrt(residual_var)
        mean = LinearModel({"intercept": expected.mean - b_age * age_mean - b_sex * sex_mean,
                            "age_years": b_age, "sex": b_sex})
        if age_dependent_sd:
            slope = SD_GROWTH_PER_YEAR * sd
            sd_model = LinearModel({"intercept": sd - slope * age_mean, "age_years": slope})
        else:
            sd_model = LinearModel({"intercept": sd})
        measures[key] = MeasureModel(mean, sd_model)
    return Reference(
        name="simulation-truth", version="1",
        kind="generating model of a synthetic cohort (assumed age and sex effects)",
        citation="lobevol normative simulate: whole-cohort means and SDs of Xi et al. 2025 with assumed effects",
        population="synthetic children", n=paper.n, age_range_years=paper.age_range_years,
        sex_coding={"M": 1, "F": 2}, measures=measures,
        metadata={"sexes": dict(paper.metadata["sexes"]),
                  "assumptions": {"boys_larger_fraction": BOYS_LARGER_FRACTION,
                                  "growth_per_year": GROWTH_PER_YEAR,
                                  "sd_growth_per_year": SD_GROWTH_PER_YEAR if age_dependent_sd else 0.0,
                                  "residual_variance_shares": RESIDUAL_SHARES}},
    )


def simulate_cohort(n: int, seed: int, truth: Optional[Reference] = None, *, split: bool = True,
                    id_prefix: str = "sim") -> Cohort:
    """Draw ``n`` children from ``truth`` (default :func:`paper_like_truth`).

    Ages are uniform over the truth's age range; sexes follow its ``sexes`` counts
    (half and half without them). With ``split``, an extra column ``split`` assigns
    each child to "train" or "test" at random (7:3, as the paper).
    """
    if not isinstance(n, int) or n < 1:
        raise ValueError(f"number of children must be a positive integer, got {n!r}")
    truth = paper_like_truth() if truth is None else truth
    no_sd = [key for key in REGION_KEYS if truth.measures[key].sd is None]
    if no_sd:
        raise ValueError(f"the truth reference has no SD for {', '.join(no_sd)}: cannot draw volumes")
    rng = np.random.default_rng(seed)
    sexes = truth.metadata.get("sexes") or {"M": 1, "F": 1}
    p_boys = sexes["M"] / (sexes["M"] + sexes["F"])
    low, high = truth.age_range_years
    age = rng.uniform(low, high, n)
    sex = np.where(rng.random(n) < p_boys, "M", "F")
    noise = _correlated_noise(rng, n)
    code = np.where(sex == "M", float(truth.sex_coding["M"]), float(truth.sex_coding["F"]))
    volumes = np.empty((n, len(REGION_KEYS)))
    for j, key in enumerate(REGION_KEYS):
        mean, sd = truth.measures[key].mean.coefficients, truth.measures[key].sd.coefficients
        expected = mean.get("intercept", 0.0) + mean.get("age_years", 0.0) * age + mean.get("sex", 0.0) * code
        spread = sd.get("intercept", 0.0) + sd.get("age_years", 0.0) * age
        volumes[:, j] = expected + spread * noise[:, j]
    volumes = np.clip(volumes, 0.0, None)
    extra = {}
    if split:
        extra["split"] = tuple(np.where(rng.random(n) < SPLIT_TEST_FRACTION, "test", "train"))
    width = len(str(n))
    return Cohort(tuple(f"{id_prefix}{i + 1:0{width}d}" for i in range(n)), tuple(str(s) for s in sex),
                  age, volumes, extra)


def _correlated_noise(rng: np.random.Generator, n: int) -> np.ndarray:
    """Standard normal residuals, shape (n, 10), correlated as :data:`RESIDUAL_SHARES` says."""
    structures = sorted({region_by_key(key).structure for key in REGION_KEYS})
    child = rng.standard_normal((n, 1))
    lobe = rng.standard_normal((n, len(structures)))
    own = rng.standard_normal((n, len(REGION_KEYS)))
    column = [structures.index(region_by_key(key).structure) for key in REGION_KEYS]
    return (math.sqrt(RESIDUAL_SHARES["child"]) * child + math.sqrt(RESIDUAL_SHARES["lobe"]) * lobe[:, column]
            + math.sqrt(RESIDUAL_SHARES["own"]) * own)
