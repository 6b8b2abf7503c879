"""Normative reference: z-scores and percentiles of regional brain volumes,
site-fitted references and the cohort statistics of Xi et al. 2025.

Pure Python with numpy and scipy: no DICOM, no torch.
"""
