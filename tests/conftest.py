"""Shared test fixtures.

``real_ct``: the real scanner samples of ``shared/data/real-ct`` (README there),
unpacked once per test session into a temporary folder, never into the repository.
"""
from __future__ import annotations

import subprocess
from pathlib import Path

import numpy as np
import pytest
import SimpleITK as sitk

from tests.real_ct import real_ct_archive


def phantom_truth_on_source_slices(phantom, datasets) -> np.ndarray:
    """A phantom's true labels (k, row, column), slice k matching ``datasets[k]`` by position."""
    truth = sitk.GetArrayFromImage(phantom.labels)
    if "image_position_patient" in phantom.meta:  # tilted: the true (sheared) positions
        positions = np.asarray(phantom.meta["image_position_patient"], float)
    else:
        positions = np.array([phantom.labels.TransformIndexToPhysicalPoint((0, 0, k)) for k in range(truth.shape[0])])
    order = [int(np.argmin(np.abs(positions - np.asarray(ds.ImagePositionPatient, float)).sum(axis=1)))
             for ds in datasets]
    assert sorted(order) == list(range(len(positions))), "the datasets are not the phantom's slices"
    return truth[order]


REAL_CT_ARCHIVE = real_ct_archive()


@pytest.fixture(scope="session")
def real_ct(tmp_path_factory) -> Path:
    """Folder holding the unpacked samples: ``GE/`` (28 tilted images) and ``Philips/S21570/...``."""
    if not REAL_CT_ARCHIVE.is_file():
        raise FileNotFoundError(f"real CT samples missing: {REAL_CT_ARCHIVE} (see the project README)")
    root = tmp_path_factory.mktemp("real-ct")
    subprocess.run(["tar", "-xJf", str(REAL_CT_ARCHIVE), "-C", str(root)], check=True)
    return root


@pytest.fixture(scope="session")
def tilted_phantom_study(tmp_path_factory):
    """A synthetic head CT with true labels, gantry tilt 18.5 deg, written as a DICOM series.

    Returns (phantom, folder): ``phantom.labels`` (k, j, i) is source slice k, row j, column i,
    and ``phantom.meta["image_position_patient"][k]`` is that slice's position.
    """
    from inference.phantoms.generator import make_phantom
    from inference.phantoms.dicom_series import write_ct_series

    phantom = make_phantom(3, slice_thickness_mm=4.0, pixel_spacing_mm=2.2, matrix=96, tilt_deg=18.5)
    folder = tmp_path_factory.mktemp("tilted-phantom")
    write_ct_series(phantom, folder)
    return phantom, folder
