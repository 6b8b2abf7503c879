"""Cohort CSV reading: the batch format, extra columns, missing sex/age, errors naming line and column."""
from __future__ import annotations

import hashlib

import numpy as np
import pytest

from inference.vocabulary import REGION_KEYS
from normative.cohort import read_cohort, write_cohort
from normative.simulate import simulate_cohort

HEADER = "id,sex,age_years," + ",".join(REGION_KEYS)
VOLUMES = ",".join(["200.1", "204.5", "81.5", "79.4", "53.8", "52.8", "91.9", "94.1", "128.0", "15.5"])


def _write(tmp_path, *lines: str):
    path = tmp_path / "cohort.csv"
    path.write_text("\n".join(lines) + "\n")
    return path


def test_reads_rows_extra_columns_and_unknown_sex_or_age(tmp_path):
    path = _write(tmp_path, HEADER + ",split,site",
                  f"a,M,2.0,{VOLUMES},train,north",
                  f"b,,1.9,{VOLUMES},test,south",
                  "",
                  f"c,f,,{VOLUMES},train,north")
    cohort = read_cohort(path)
    assert cohort.ids == ("a", "b", "c")
    assert cohort.sex == ("M", None, "F")
    assert cohort.age_years[0] == 2.0 and np.isnan(cohort.age_years[2])
    assert cohort.volumes_cm3.shape == (3, 10) and cohort.volumes_cm3[1, 9] == 15.5
    assert cohort.extra == {"split": ("train", "test", "train"), "site": ("north", "south", "north")}
    assert cohort.lines == (2, 3, 5)
    assert cohort.sha256 == hashlib.sha256(path.read_bytes()).hexdigest()
    complete, excluded = cohort.complete()
    assert complete.ids == ("a",) and excluded == (3, 5)
    assert cohort.measure("total")[0] == pytest.approx(sum(map(float, VOLUMES.split(","))))
    assert cohort.measure("asymmetry_frontal_lobe")[0] == pytest.approx((204.5 - 200.1) / ((204.5 + 200.1) / 2))


def test_write_and_read_round_trip(tmp_path):
    cohort = simulate_cohort(25, 3)
    again = read_cohort(write_cohort(tmp_path / "sim.csv", cohort))
    assert again.ids == cohort.ids and again.sex == cohort.sex
    assert again.age_years == pytest.approx(cohort.age_years, abs=5e-4)
    assert again.volumes_cm3 == pytest.approx(cohort.volumes_cm3, abs=5e-4)
    assert again.extra["split"] == cohort.extra["split"]


@pytest.mark.parametrize("lines, message", [
    ((HEADER.replace(",cerebellum", ""), f"a,M,2.0,{VOLUMES}"), "missing column\\(s\\) cerebellum"),
    (("id,sex," + ",".join(REGION_KEYS), f"a,M,{VOLUMES}"), "missing column\\(s\\) age_years"),
    ((HEADER + ",id", f"a,M,2.0,{VOLUMES},b"), "column\\(s\\) id appear more than once"),
    ((HEADER, f"a,M,2.0,{VOLUMES.replace('128.0', 'abc')}"), "line 2, column 'cerebellum': 'abc' is not a number"),
    ((HEADER, f"a,M,2.0,{VOLUMES}", f"b,M,2.0,{VOLUMES.replace('15.5', '')}"),
     "line 3, column 'brainstem': empty"),
    ((HEADER, f"a,M,2.0,{VOLUMES.replace('81.5', '-81.5')}"), "line 2, column 'right_parietal_lobe': negative volume"),
    ((HEADER, f"a,M,2.0,{VOLUMES.replace('81.5', 'nan')}"), "line 2, column 'right_parietal_lobe': 'nan' is not a finite"),
    ((HEADER, f"a,M,-2.0,{VOLUMES}"), "line 2, column 'age_years': negative age -2.0"),
    ((HEADER, f"a,M,two,{VOLUMES}"), "line 2, column 'age_years': 'two' is not a number"),
    ((HEADER, f"a,male,2.0,{VOLUMES}"), "line 2, column 'sex': 'male' is not M, F or empty"),
    ((HEADER, f"a,M,2.0,{VOLUMES},extra"), "line 2: 14 field\\(s\\), the header has 13"),
    ((HEADER, f"a,M,2.0,{VOLUMES}", f"a,F,2.0,{VOLUMES}"), "line 3, column 'id': the same id as line 2"),
    ((HEADER, f",M,2.0,{VOLUMES}"), "line 2, column 'id': empty"),
    ((HEADER,), "no data rows"),
    (("",), "empty file"),
])
def test_bad_input_names_the_line_and_the_column(tmp_path, lines, message):
    with pytest.raises(ValueError, match=message):
        read_cohort(_write(tmp_path, *lines))


def test_missing_file_is_named(tmp_path):
    with pytest.raises(FileNotFoundError, match="cohort file not found: .*absent.csv"):
        read_cohort(tmp_path / "absent.csv")


def test_errors_do_not_print_ids(tmp_path):
    with pytest.raises(ValueError) as error:
        read_cohort(_write(tmp_path, HEADER, f"PATIENT-4711,M,x,{VOLUMES}"))
    assert "PATIENT-4711" not in str(error.value)
