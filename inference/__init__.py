"""Segmentation engine: models, preprocessing, prediction, training, phantoms.

Knows nothing of DICOM networking. Importing this package is cheap; heavy
modules (torch) are imported by the submodules that need them.
"""
