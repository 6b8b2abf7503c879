"""``lobevol normative``: compare, simulate, fit, stats through the real command line."""
from __future__ import annotations

import json

import pytest

from inference.vocabulary import REGION_KEYS
from node.cli import main
from normative.compare import load_reference
from normative.reference import Reference

PAPER_MEANS = dict(zip(REGION_KEYS, (200.64, 204.51, 81.52, 79.42, 53.76, 52.82, 91.92, 94.08, 127.97, 15.47)))


def _run(capsys, *argv: str) -> tuple[int, str, str]:
    code = main(list(argv))
    captured = capsys.readouterr()
    return code, captured.out, captured.err


def test_compare_prints_the_table_from_a_study_volumes_json(tmp_path, capsys):
    volumes = {**PAPER_MEANS, "brainstem": 11.0}
    (tmp_path / "volumes.json").write_text(json.dumps({"id": "x", "volumes_cm3": volumes}))
    code, out, _ = _run(capsys, "normative", "compare", "--sex", "F", "--age", "2.1", str(tmp_path / "volumes.json"))
    assert code == 0
    assert "Xi2025 v1.0, whole-cohort (not adjusted for age or sex)" in out
    brainstem = next(line for line in out.splitlines() if line.startswith("Brainstem"))
    assert brainstem.split()[1:] == ["11.0", "15.5", "1.5", "-2.98", "0.1", "below"]
    assert "no SD for the total" in out
    assert "frontal lobe" in out and "+0.019" in out


def test_compare_from_the_command_line_as_json(capsys):
    code, out, _ = _run(capsys, "normative", "compare", "--age", "2", "--json", "--volumes",
                        *(f"{k}={v}" for k, v in PAPER_MEANS.items()))
    assert code == 0
    data = json.loads(out)
    assert data["regions"][0]["z_score"] == pytest.approx(0.0) and data["sex"] is None


def test_compare_without_age_says_why_there_is_no_z(tmp_path, capsys):
    (tmp_path / "flat.json").write_text(json.dumps(PAPER_MEANS))
    code, out, _ = _run(capsys, "normative", "compare", str(tmp_path / "flat.json"))
    assert code == 0 and "no z-scores: the child's age is unknown" in out


@pytest.mark.parametrize("argv, message", [
    (("--volumes", "cerebellum"), "--volumes: 'cerebellum' is not KEY=CM3"),
    (("--volumes", "cerebellum=big"), "volume of cerebellum is not a number"),
    (("--volumes", "cerebellum=120"), "missing volume\\(s\\) for right_frontal_lobe"),
    (("--sex", "X", "--volumes", *(f"{k}={v}" for k, v in PAPER_MEANS.items())), "sex must be"),
    (("absent.json",), "volumes file not found"),
])
def test_compare_errors_are_clear(capsys, argv, message):
    code, _, err = _run(capsys, "normative", "compare", *argv)
    assert code == 1
    assert err.startswith("lobevol normative: error: ")
    assert __import__("re").search(message, err), err


def test_simulate_fit_stats_compare_round(tmp_path, capsys):
    cohort, truth, ref = tmp_path / "cohort.csv", tmp_path / "truth.json", tmp_path / "site.json"
    code, out, _ = _run(capsys, "normative", "simulate", "-n", "300", "--seed", "1", "-o", str(cohort),
                        "--truth", str(truth))
    assert code == 0 and "300 synthetic children" in out
    assert cohort.read_text().splitlines()[0] == "id,sex,age_years," + ",".join(REGION_KEYS) + ",split"
    assert isinstance(load_reference(truth), Reference)

    code, out, err = _run(capsys, "normative", "fit", str(cohort), "-o", str(ref), "--name", "SiteA",
                          "--version", "3")
    assert code == 0 and "n = 300" in out and "cerebellum" in out
    fitted = load_reference(ref)
    assert fitted.name == "SiteA" and fitted.version == "3" and fitted.n == 300

    code, out, err = _run(capsys, "normative", "stats", str(cohort), "--out", str(tmp_path / "stats"),
                          "--split-column", "split")
    assert code == 0, err
    written = sorted(p.name for p in (tmp_path / "stats").iterdir())
    assert written == ["report.pdf", "spearman_age.csv", "table1_groups.csv", "table1_tests.csv",
                       "table2_descriptive.csv", "table3_regression.csv", "table5_paired_left_right.csv"]

    code, out, _ = _run(capsys, "normative", "compare", "--sex", "M", "--age", "2.0", "--reference", str(ref),
                        "--volumes", *(f"{k}={v}" for k, v in PAPER_MEANS.items()))
    assert code == 0 and "SiteA v3, site-fitted (adjusted for age and sex" in out
    total = next(line for line in out.splitlines() if line.startswith("Total"))
    assert total.split()[-1] in ("below", "within", "above")


def test_fit_reports_excluded_rows_and_refuses_bad_cohorts(tmp_path, capsys):
    cohort = tmp_path / "cohort.csv"
    _run(capsys, "normative", "simulate", "-n", "40", "--seed", "2", "-o", str(cohort))
    lines = cohort.read_text().splitlines()
    fields = lines[4].split(",")
    fields[1] = ""                       # line 5: unknown sex
    lines[4] = ",".join(fields)
    cohort.write_text("\n".join(lines) + "\n")
    code, _, err = _run(capsys, "normative", "fit", str(cohort), "-o", str(tmp_path / "r.json"))
    assert code == 0 and "1 row(s) without sex or age excluded from the fit (line(s) 5)" in err

    fields = lines[6].split(",")
    fields[12] = "n/a"                   # line 7, brainstem
    lines[6] = ",".join(fields)
    cohort.write_text("\n".join(lines) + "\n")
    code, _, err = _run(capsys, "normative", "fit", str(cohort), "-o", str(tmp_path / "r.json"))
    assert code == 1 and "cohort.csv line 7, column 'brainstem': 'n/a' is not a number" in err

    small = tmp_path / "small.csv"
    small.write_text("\n".join(lines[:11]) + "\n")
    code, _, err = _run(capsys, "normative", "fit", str(small), "-o", str(tmp_path / "r.json"))
    assert code == 1 and "line 7" in err
    small.write_text("\n".join(lines[:6]) + "\n")
    code, _, err = _run(capsys, "normative", "fit", str(small), "-o", str(tmp_path / "r.json"))
    assert code == 1 and "too small to fit a reference" in err


def test_stats_split_column_errors(tmp_path, capsys):
    cohort = tmp_path / "cohort.csv"
    _run(capsys, "normative", "simulate", "-n", "30", "--seed", "3", "-o", str(cohort))
    code, _, err = _run(capsys, "normative", "stats", str(cohort), "--out", str(tmp_path / "s"),
                        "--split-column", "site")
    assert code == 1 and "no column 'site'" in err


def test_help_teaches_with_examples(capsys):
    for argv in (("normative", "--help"), ("normative", "fit", "--help"), ("normative", "stats", "--help"),
                 ("normative", "compare", "--help"), ("normative", "simulate", "--help")):
        with pytest.raises(SystemExit) as exit_:
            main(list(argv))
        assert exit_.value.code == 0
        out = capsys.readouterr().out
        assert "examples:" in out and "lobevol normative" in out
    assert _run(capsys, "normative")[0] == 2
