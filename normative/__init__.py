"""Normative reference: z-scores and percentiles of regional brain volumes,
site-fitted references and the cohort statistics of Xi et al. 2025.

Modules:
    compare: the per-study API the node calls (``compare``, ``load_reference``, result types).
    reference: reference files (bundled ``data/xi2025_whole_cohort.json``, fitted ones).
    cohort: the cohort CSV (``id,sex,age_years,<10 region keys>``), read with checks.
    fit: site-fitted references (volume = b0 + b_age*age + b_sex*sex, residual SD).
    ols: least squares with SE, t, p, R2 (shared by fit and stats).
    stats, stats_report: the paper's cohort statistics as tables and a PDF.
    simulate: synthetic cohorts from known coefficients.

Pure Python with numpy and scipy (reportlab for the PDF): no DICOM, no torch.
"""
