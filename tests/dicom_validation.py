"""Validate DICOM files with real validators (peers, not mocks).

``validate(path)`` runs dicom3tools' dciodvfy and returns its errors and
warnings; ``validate_sr_templates(path)`` runs PixelMed's DicomSRValidator,
which also checks an SR against its templates (TID 1500 and below), as
dciodvfy does not. A missing validator is a failure with a clear message
naming its package (CI installs dicom3tools and libpixelmed-java), never a skip.
"""
from __future__ import annotations

import os
import re
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


#: Debian's libpixelmed-java puts the jar here; ``PIXELMED_JAR`` names another.
PIXELMED_JAR = Path("/usr/share/java/pixelmed.jar")
#: JDK 17's default XPath limits stop PixelMed's compiled template tables half-way.
_JAVA_XPATH_UNLIMITED = ("-Djdk.xml.xpathExprGrpLimit=0", "-Djdk.xml.xpathExprOpLimit=0",
                         "-Djdk.xml.xpathTotalOpLimit=0")


@dataclass
class SRValidation(Validation):
    """PixelMed DicomSRValidator's verdict on one SR: its Error and Warning lines."""

    def unexplained_errors(self, explained: tuple[str, ...]) -> list[str]:
        """Errors matching none of the ``explained`` regular expressions."""
        return [e for e in self.errors if not any(re.search(pattern, e) for pattern in explained)]


def pixelmed_jar() -> Path:
    """PixelMed's jar; raises RuntimeError naming the package when it (or java) is missing."""
    jar = Path(os.environ.get("PIXELMED_JAR", PIXELMED_JAR))
    if not jar.is_file() or shutil.which("java") is None:
        raise RuntimeError(
            f"PixelMed ({jar}) or java not found: install libpixelmed-java (apt-get install libpixelmed-java); "
            "the SR template validation test needs it"
        )
    return jar


def validate_sr_templates(path: Path | str, *, timeout_s: float = 300.0) -> SRValidation:
    """Run PixelMed's ``DicomSRValidator`` (IOD and TID 1500 template checks) on ``path``."""
    completed = subprocess.run(
        ["java", *_JAVA_XPATH_UNLIMITED, "-cp", str(pixelmed_jar()), "com.pixelmed.validate.DicomSRValidator",
         str(path)],
        capture_output=True, text=True, timeout=timeout_s, check=False,
    )
    output = completed.stdout + completed.stderr
    if "Root Template Validation Complete" not in output:
        raise RuntimeError(f"DicomSRValidator did not finish (exit {completed.returncode}):\n{output[-2000:]}")
    result = SRValidation(Path(path), output=output)
    for line in output.splitlines():
        if line.startswith("Error"):
            result.errors.append(line)
        elif line.startswith("Warning"):
            result.warnings.append(line)
    return result
