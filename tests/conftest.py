"""Shared test fixtures.

``real_ct``: the real scanner samples of ``shared/data/real-ct`` (README there),
unpacked once per test session into a temporary folder, never into the repository.
"""
from __future__ import annotations

import os
import subprocess
from pathlib import Path

import pytest

#: ``../shared/data/real-ct`` next to the repository; LOBEVOL_REAL_CT overrides it (another checkout layout).
REAL_CT_ARCHIVE = Path(os.environ.get(
    "LOBEVOL_REAL_CT", Path(__file__).resolve().parents[2] / "shared" / "data" / "real-ct" / "dcm_qa_ct.tar.xz"))


@pytest.fixture(scope="session")
def real_ct(tmp_path_factory) -> Path:
    """Folder holding the unpacked samples: ``GE/`` (28 tilted images) and ``Philips/S21570/...``."""
    if not REAL_CT_ARCHIVE.is_file():
        raise FileNotFoundError(f"real CT samples missing: {REAL_CT_ARCHIVE} (see the project README)")
    root = tmp_path_factory.mktemp("real-ct")
    subprocess.run(["tar", "-xJf", str(REAL_CT_ARCHIVE), "-C", str(root)], check=True)
    return root
