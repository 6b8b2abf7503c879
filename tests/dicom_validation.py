"""Validate DICOM files with dicom3tools' ``dciodvfy`` (a real peer, not a mock).

``validate(path)`` runs dciodvfy and returns its errors and warnings; a
missing dciodvfy is a failure with a clear message (CI installs dicom3tools),
never a skip.
"""
from __future__ import annotations

import shutil
import subprocess
from dataclasses import dataclass, field
from pathlib import Path


@dataclass
class Validation:
    """dciodvfy's verdict on one file."""

    path: Path
    errors: list[str] = field(default_factory=list)
    warnings: list[str] = field(default_factory=list)
    output: str = ""

    def unexplained_warnings(self, explained: tuple[str, ...] = ()) -> list[str]:
        """Warnings whose text contains none of the ``explained`` fragments."""
        return [w for w in self.warnings if not any(fragment in w for fragment in explained)]


def dciodvfy_path() -> str:
    """Path of dciodvfy; raises RuntimeError naming the package when it is missing."""
    path = shutil.which("dciodvfy")
    if path is None:
        raise RuntimeError(
            "dciodvfy not found on PATH: install dicom3tools (apt-get install dicom3tools); "
            "the DICOM validation tests need it"
        )
    return path


def validate(path: Path | str, *, timeout_s: float = 120.0) -> Validation:
    """Run dciodvfy on ``path`` and collect its ``Error`` and ``Warning`` lines."""
    completed = subprocess.run(
        [dciodvfy_path(), "-new", str(path)],
        capture_output=True, text=True, timeout=timeout_s, check=False,
    )
    output = completed.stdout + completed.stderr
    result = Validation(Path(path), output=output)
    for line in output.splitlines():
        if line.startswith("Error"):
            result.errors.append(line)
        elif line.startswith("Warning"):
            result.warnings.append(line)
    return result
