"""Cohort tables: one row per child with sex, age and the 10 regional volumes.

The CSV format is the one lobevol's batch segmentation writes
(``node.pipeline.write_volumes_csv``)::

    id,sex,age_years,right_frontal_lobe,...,brainstem[,any extra column...]

- ``sex``: ``M`` or ``F``, or empty when unknown;
- ``age_years``: age in years (>= 0), or empty when unknown;
- the 10 volumes in cm3 (numbers >= 0, never empty);
- extra columns (a split, a site...) are kept as text.

Rows with an unknown sex or age are read; analyses that need them (fits, regressions)
exclude them and say so (:meth:`Cohort.complete`). Anything else that is wrong stops the
reading with an error naming the line and the column. Messages name lines, never ids
(ids may be patient identifiers).
"""
from __future__ import annotations

import csv
import hashlib
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Mapping, Optional, Sequence

import numpy as np

from inference.vocabulary import LOBE_PAIRS, REGION_KEYS
from normative.compare import asymmetry_index
from normative.reference import asymmetry_key

REQUIRED_COLUMNS: tuple[str, ...] = ("id", "sex", "age_years", *REGION_KEYS)


@dataclass(frozen=True)
class Cohort:
    """Children's volumes with their sex and age.

    Attributes:
        ids: one identifier per child.
        sex: "M", "F" or None (unknown) per child.
        age_years: age in years, NaN when unknown (float array, shape (n,)).
        volumes_cm3: shape (n, 10), columns in inference.vocabulary.REGION_KEYS order.
        extra: extra column name -> its text values.
        lines: line number of each child in the source file (for messages).
        source: the file read (None for a cohort built in memory).
        sha256: hex digest of the source file's bytes (None in memory).
    """

    ids: tuple[str, ...]
    sex: tuple[Optional[str], ...]
    age_years: np.ndarray
    volumes_cm3: np.ndarray
    extra: Mapping[str, tuple[str, ...]] = field(default_factory=dict)
    lines: tuple[int, ...] = ()
    source: Optional[Path] = None
    sha256: Optional[str] = None

    def __post_init__(self) -> None:
        n = len(self.ids)
        if len(self.sex) != n or self.age_years.shape != (n,) or self.volumes_cm3.shape != (n, len(REGION_KEYS)):
            raise ValueError(f"cohort columns disagree in length: {n} ids, {len(self.sex)} sexes, "
                             f"ages {self.age_years.shape}, volumes {self.volumes_cm3.shape} (expected (n, 10))")
        if any(s not in ("M", "F", None) for s in self.sex):
            raise ValueError("cohort sex values must be 'M', 'F' or None")
        if not self.lines:
            object.__setattr__(self, "lines", tuple(range(2, n + 2)))
        for name, values in self.extra.items():
            if len(values) != n:
                raise ValueError(f"extra column {name!r} has {len(values)} values for {n} children")

    def __len__(self) -> int:
        return len(self.ids)

    def measure(self, key: str) -> np.ndarray:
        """Values of a measure per child: a region key, "total" (cm3) or an asymmetry key (no unit)."""
        if key in REGION_KEYS:
            return self.volumes_cm3[:, REGION_KEYS.index(key)]
        if key == "total":
            return self.volumes_cm3.sum(axis=1)
        for structure, right_key, left_key in LOBE_PAIRS:
            if key == asymmetry_key(structure):
                left, right = self.measure(left_key), self.measure(right_key)
                return np.array([asymmetry_index(a, b) for a, b in zip(left, right)])
        raise KeyError(f"unknown measure {key!r}")

    def sex_codes(self, coding: Mapping[str, float]) -> np.ndarray:
        """Sex as numbers by ``coding`` (e.g. M = 1, F = 2); NaN when unknown."""
        return np.array([np.nan if s is None else float(coding[s]) for s in self.sex])

    def subset(self, mask: np.ndarray) -> "Cohort":
        """The children where ``mask`` (boolean, shape (n,)) is True."""
        mask = np.asarray(mask, dtype=bool)
        pick = np.flatnonzero(mask)
        return Cohort(
            ids=tuple(self.ids[i] for i in pick), sex=tuple(self.sex[i] for i in pick),
            age_years=self.age_years[mask], volumes_cm3=self.volumes_cm3[mask],
            extra={k: tuple(v[i] for i in pick) for k, v in self.extra.items()},
            lines=tuple(self.lines[i] for i in pick), source=self.source, sha256=self.sha256,
        )

    def complete(self) -> tuple["Cohort", tuple[int, ...]]:
        """(children with both sex and age known, line numbers of the others)."""
        known = np.array([s is not None for s in self.sex], dtype=bool) & ~np.isnan(self.age_years)
        return self.subset(known), tuple(line for line, ok in zip(self.lines, known) if not ok)

    def describe_excluded(self, lines: Sequence[int], purpose: str) -> Optional[str]:
        """A message like '3 row(s) without sex or age excluded from the fit (lines 4, 9, 12)'."""
        if not lines:
            return None
        shown = ", ".join(map(str, lines[:20])) + (", ..." if len(lines) > 20 else "")
        name = self.source.name if self.source else "cohort"
        return f"{name}: {len(lines)} row(s) without sex or age excluded from {purpose} (line(s) {shown})"


def read_cohort(path: str | Path) -> Cohort:
    """Read and check a cohort CSV (see the module docstring for the format).

    Raises:
        FileNotFoundError: no such file.
        ValueError: missing columns, or a bad value (the message names the
            line and the column), or no data rows.
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"cohort file not found: {path}")
    raw = path.read_bytes()
    try:
        text = raw.decode("utf-8-sig")
    except UnicodeDecodeError as error:
        raise ValueError(f"{path.name}: not a UTF-8 text file ({error})") from None
    reader = csv.reader(text.splitlines())
    header = next(reader, None)
    if not header or not any(h.strip() for h in header):
        raise ValueError(f"{path.name}: empty file (expected the header {','.join(REQUIRED_COLUMNS)})")
    header = [h.strip() for h in header]
    duplicated = sorted({h for h in header if header.count(h) > 1})
    if duplicated:
        raise ValueError(f"{path.name}: column(s) {', '.join(duplicated)} appear more than once in the header")
    missing = [c for c in REQUIRED_COLUMNS if c not in header]
    if missing:
        raise ValueError(f"{path.name}: missing column(s) {', '.join(missing)}; "
                         f"the header must start with {','.join(REQUIRED_COLUMNS)}")
    extra_names = [h for h in header if h not in REQUIRED_COLUMNS]
    ids, sexes, ages, volumes, lines = [], [], [], [], []
    extra: dict[str, list[str]] = {name: [] for name in extra_names}
    first_line_of_id: dict[str, int] = {}
    for fields in reader:
        line = reader.line_num
        if not any(f.strip() for f in fields):
            continue  # blank line
        if len(fields) != len(header):
            raise ValueError(f"{path.name} line {line}: {len(fields)} field(s), the header has {len(header)}")
        row = dict(zip(header, (f.strip() for f in fields)))
        where = f"{path.name} line {line}"
        if not row["id"]:
            raise ValueError(f"{where}, column 'id': empty")
        if row["id"] in first_line_of_id:
            raise ValueError(f"{where}, column 'id': the same id as line {first_line_of_id[row['id']]}")
        first_line_of_id[row["id"]] = line
        ids.append(row["id"])
        sexes.append(_parse_sex(row["sex"], where))
        ages.append(_parse_age(row["age_years"], where))
        volumes.append([_parse_volume(row[key], where, key) for key in REGION_KEYS])
        for name in extra_names:
            extra[name].append(row[name])
        lines.append(line)
    if not ids:
        raise ValueError(f"{path.name}: no data rows after the header")
    return Cohort(tuple(ids), tuple(sexes), np.array(ages, dtype=float), np.array(volumes, dtype=float),
                  {k: tuple(v) for k, v in extra.items()}, tuple(lines), path, hashlib.sha256(raw).hexdigest())


def write_cohort(path: str | Path, cohort: Cohort) -> Path:
    """Write a cohort in the CSV format :func:`read_cohort` reads (volumes to 0.001 cm3)."""
    path = Path(path)
    with open(path, "w", newline="") as handle:
        writer = csv.writer(handle)
        writer.writerow([*REQUIRED_COLUMNS, *cohort.extra])
        for i, child in enumerate(cohort.ids):
            age = cohort.age_years[i]
            writer.writerow([child, cohort.sex[i] or "", "" if math.isnan(age) else f"{age:.3f}",
                             *(f"{v:.3f}" for v in cohort.volumes_cm3[i]),
                             *(values[i] for values in cohort.extra.values())])
    return path


def _parse_sex(text: str, where: str) -> Optional[str]:
    if text == "":
        return None
    if text.upper() in ("M", "F"):
        return text.upper()
    raise ValueError(f"{where}, column 'sex': {text!r} is not M, F or empty")


def _parse_age(text: str, where: str) -> float:
    if text == "":
        return math.nan
    value = _number(text, where, "age_years")
    if value < 0:
        raise ValueError(f"{where}, column 'age_years': negative age {text}")
    return value


def _parse_volume(text: str, where: str, column: str) -> float:
    if text == "":
        raise ValueError(f"{where}, column {column!r}: empty (every volume is needed)")
    value = _number(text, where, column)
    if value < 0:
        raise ValueError(f"{where}, column {column!r}: negative volume {text}")
    return value


def _number(text: str, where: str, column: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise ValueError(f"{where}, column {column!r}: {text!r} is not a number") from None
    if not math.isfinite(value):
        raise ValueError(f"{where}, column {column!r}: {text!r} is not a finite number")
    return value
