"""Where the real scanner samples (``shared/data/real-ct``) are: one locator for the tests and the benchmarks."""
from __future__ import annotations

import os
from pathlib import Path


def real_ct_archive() -> Path:
    """LOBEVOL_REAL_CT, else ``../shared/data/real-ct`` next to the repository, else the workplace's
    ``/work/shared`` (a clean clone elsewhere, as in CI)."""
    if os.environ.get("LOBEVOL_REAL_CT"):
        return Path(os.environ["LOBEVOL_REAL_CT"])
    relative = Path("shared") / "data" / "real-ct" / "dcm_qa_ct.tar.xz"
    beside = Path(__file__).resolve().parents[2] / relative
    return beside if beside.is_file() else Path("/work") / relative
