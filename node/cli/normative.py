"""``lobevol normative``: compare volumes with a reference, fit a site reference, cohort statistics."""
from __future__ import annotations

import argparse
import json
import sys
import textwrap
from pathlib import Path

EPILOG = """\
examples:
  lobevol normative compare --sex F --age 2.1 results/case1/volumes.json
  lobevol normative compare --age 1.9 --volumes right_frontal_lobe=198.2 left_frontal_lobe=201.0 ...
  lobevol normative simulate -n 3000 --seed 1 -o cohort.csv --truth truth.json
  lobevol normative fit cohort.csv -o site_reference.json --name SiteA --version 2026.1
  lobevol normative fit cohort.csv -o site_reference.json --age-dependent-sd
  lobevol normative stats cohort.csv --out stats/ --split-column split

Cohort CSV: header id,sex,age_years followed by the 10 region keys (volumes in cm3),
exactly as 'lobevol segment' writes results/volumes.csv; sex M or F, or empty when
unknown; extra columns (a split, a site) are kept. Rows with unknown sex or age are
left out of fits and regressions, and the command says which lines.

The bundled reference (Xi et al. 2025, n = 1487, ages 1.5-2.5 years) is whole-cohort:
its z-scores are not adjusted for age or sex. A site-fitted reference is; point the
node at it with 'reference = site_reference.json' in the [outputs] section of
config.ini, or 'lobevol segment --reference site_reference.json'.
"""


def register(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser(
        "normative",
        help="normative reference: compare volumes, fit a site reference, cohort statistics",
        description=textwrap.fill(
            "Turn regional volumes into z-scores, percentiles and flags against a normative reference "
            "(compare); fit a reference adjusted for age and sex to your own cohort (fit); reproduce "
            "the paper's cohort statistics as CSV tables and a PDF (stats); draw a synthetic cohort "
            "from known coefficients (simulate).", 79),
        epilog=EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.set_defaults(func=lambda args: _print_help(parser))
    actions = parser.add_subparsers(dest="action", metavar="ACTION")
    _register_compare(actions)
    _register_fit(actions)
    _register_stats(actions)
    _register_simulate(actions)


def _print_help(parser: argparse.ArgumentParser) -> int:
    parser.print_help()
    return 2


def _subparser(actions, name: str, help_text: str, description: str, epilog: str) -> argparse.ArgumentParser:
    return actions.add_parser(name, help=help_text, description=textwrap.fill(description, 79), epilog=epilog,
                              formatter_class=argparse.RawDescriptionHelpFormatter)


# ---- compare -------------------------------------------------------------------------------

def _register_compare(actions) -> None:
    parser = _subparser(
        actions, "compare", "z-scores, percentiles and flags of one child's volumes",
        "Compare one child's 10 regional volumes (cm3) with a reference and print, per region, the "
        "reference mean and SD used, the z-score, the percentile and the flag (below / within / above "
        "normal limits), then the total and each lobe's asymmetry index AI = (L - R) / ((L + R) / 2). "
        "Without an age, or with an age outside the reference's range, no z-score is given and the "
        "notes say why.",
        "examples:\n"
        "  lobevol normative compare --sex F --age 2.1 results/case1/volumes.json\n"
        "  lobevol normative compare --sex M --age 1.8 --reference site.json --json volumes.json\n"
        "  lobevol normative compare --age 2 --volumes right_frontal_lobe=200 left_frontal_lobe=204 \\\n"
        "      right_parietal_lobe=81 left_parietal_lobe=79 right_occipital_lobe=54 \\\n"
        "      left_occipital_lobe=53 right_temporal_lobe=92 left_temporal_lobe=94 \\\n"
        "      cerebellum=128 brainstem=15.5\n\n"
        "VOLUMES.json is either the volumes.json that 'lobevol segment' writes (its\n"
        "'volumes_cm3' is used) or an object of region key -> volume in cm3.\n",
    )
    source = parser.add_mutually_exclusive_group(required=True)
    source.add_argument("volumes_file", nargs="?", type=Path, metavar="VOLUMES.json",
                        help="volumes.json of a study, or {region key: cm3}")
    source.add_argument("--volumes", nargs="+", metavar="KEY=CM3", help="the 10 volumes on the command line")
    parser.add_argument("--sex", default=None, help="M or F (O or empty: unknown)")
    parser.add_argument("--age", type=float, default=None, metavar="YEARS", help="age at scan in years")
    parser.add_argument("--reference", type=Path, default=None, metavar="REF.json",
                        help="reference file (default: bundled Xi et al. 2025)")
    parser.add_argument("--z-threshold", type=float, default=2.0, metavar="Z",
                        help="flag values with |z| above this (default 2)")
    parser.add_argument("--json", action="store_true", help="print the full result as JSON instead of a table")
    parser.set_defaults(func=run_compare)


def run_compare(args: argparse.Namespace) -> int:
    from normative.compare import compare, load_reference

    volumes = _volumes_from_args(args)
    result = compare(volumes, args.sex, args.age, load_reference(args.reference), z_threshold=args.z_threshold)
    if args.json:
        print(json.dumps(result.to_dict(), indent=2))
    else:
        print(format_result(result))
    return 0


def _volumes_from_args(args: argparse.Namespace) -> dict[str, float]:
    if args.volumes:
        volumes = {}
        for item in args.volumes:
            key, sep, value = item.partition("=")
            if not sep:
                raise ValueError(f"--volumes: {item!r} is not KEY=CM3")
            try:
                volumes[key.strip()] = float(value)
            except ValueError:
                raise ValueError(f"--volumes: volume of {key.strip()} is not a number: {value!r}") from None
        return volumes
    path: Path = args.volumes_file
    if not path.is_file():
        raise FileNotFoundError(f"volumes file not found: {path}")
    try:
        data = json.loads(path.read_text())
    except json.JSONDecodeError as error:
        raise ValueError(f"{path}: not valid JSON ({error})") from None
    if isinstance(data, dict) and isinstance(data.get("volumes_cm3"), dict):
        data = data["volumes_cm3"]
    if not isinstance(data, dict):
        raise ValueError(f"{path}: expected an object of region key -> volume in cm3")
    return data


def format_result(result) -> str:
    """The comparison as a plain-text table (what ``normative compare`` prints)."""
    from inference.vocabulary import region_by_key

    def number(value, spec):
        return "-" if value is None else format(value, spec)

    sex = {"M": "male", "F": "female"}.get(result.sex or "", "unknown")
    age = "unknown" if result.age_years is None else f"{result.age_years:g} years"
    reference = result.reference
    lines = [f"reference: {reference.name} v{reference.version}, {reference.kind}; n = {reference.n}, "
             f"ages {reference.age_range_years[0]:g}-{reference.age_range_years[1]:g} years",
             f"child: sex {sex}, age {age}; flags at |z| > {result.z_threshold:g}", ""]
    header = f"{'region':<22}{'volume':>9}{'ref mean':>10}{'ref SD':>8}{'z':>8}{'pct':>7}  flag"
    lines += [header + "   (cm3)", "-" * len(header)]
    for item in (*result.regions, result.total):
        name = "Total (10 regions)" if item.key == "total" else region_by_key(item.key).name
        lines.append(f"{name:<22}{item.volume_cm3:>9.1f}{number(item.reference_mean_cm3, '.1f'):>10}"
                     f"{number(item.reference_sd_cm3, '.1f'):>8}{number(item.z_score, '+.2f'):>8}"
                     f"{number(item.percentile, '.1f'):>7}  {item.flag or '-'}")
    lines += ["", f"{'asymmetry (L-R)/mean':<22}{'index':>9}{'ref mean':>10}{'ref SD':>8}{'z':>8}{'pct':>7}  flag",
              "-" * len(header)]
    for item in result.asymmetry:
        lines.append(f"{item.structure:<22}{item.index:>+9.3f}{number(item.reference_mean, '+.3f'):>10}"
                     f"{number(item.reference_sd, '.3f'):>8}{number(item.z_score, '+.2f'):>8}"
                     f"{number(item.percentile, '.1f'):>7}  {item.flag or '-'}")
    if result.notes:
        lines += ["", "notes:"] + [f"  - {note}" for note in result.notes]
    return "\n".join(lines)


# ---- fit -----------------------------------------------------------------------------------

def _register_fit(actions) -> None:
    parser = _subparser(
        actions, "fit", "fit a site reference (age- and sex-adjusted) to a cohort CSV",
        "Fit, for every region, the total and each lobe's asymmetry index, the paper's model "
        "volume = b0 + b_age*age + b_sex*sex (sex M=1, F=2) with its residual SD, plus a pooled model "
        "without sex for children of unknown sex, and save it as a reference file (same format as the "
        "bundled one, with provenance: n, sexes, age range, fit date, sha256 of the CSV). z-scores "
        "from it are adjusted for age and sex.",
        "examples:\n"
        "  lobevol normative fit results/volumes.csv -o site_reference.json --name SiteA\n"
        "  lobevol normative fit cohort.csv -o ref.json --age-dependent-sd\n"
        "  lobevol segment incoming/ --out results --reference site_reference.json\n\n"
        "Rows with unknown sex or age are left out (their lines are listed); at least\n"
        "20 complete rows and 5 children of each sex are needed. The reference applies\n"
        "only to ages within the cohort's range.\n",
    )
    parser.add_argument("cohort", type=Path, metavar="COHORT.csv", help="one row per child (see 'lobevol normative --help')")
    parser.add_argument("-o", "--output", type=Path, required=True, metavar="REF.json", help="reference file to write")
    parser.add_argument("--age-dependent-sd", action="store_true",
                        help="let the SD change linearly with age (default: one residual SD)")
    parser.add_argument("--name", default=None, help="reference name (default: the CSV's file name)")
    parser.add_argument("--version", default="1", help="reference version (default 1)")
    parser.add_argument("--population", default=None, help="who the cohort is, in words (stored in the file)")
    parser.set_defaults(func=run_fit)


def run_fit(args: argparse.Namespace) -> int:
    from normative.cohort import read_cohort
    from normative.fit import fit_reference

    cohort = read_cohort(args.cohort)
    outcome = fit_reference(cohort, age_dependent_sd=args.age_dependent_sd, name=args.name,
                            version=args.version, population=args.population)
    for message in outcome.messages:
        print(f"note: {message}", file=sys.stderr)
    reference = outcome.reference
    reference.save(args.output)
    low, high = reference.age_range_years
    sexes = reference.metadata["sexes"]
    print(f"wrote {args.output}: {reference.name} v{reference.version}, {reference.kind}; n = {reference.n} "
          f"({sexes['M']} boys, {sexes['F']} girls), ages {low:.2f}-{high:.2f} years")
    print(f"{'measure':<26}{'b0':>10}{'b_age/yr':>10}{'b_sex(F-M)':>12}{'SD':>10}{'R2':>7}")
    for key, measure in reference.measures.items():
        c = measure.mean.coefficients
        sd = measure.sd.predict((low + high) / 2, None)
        print(f"{key:<26}{c['intercept']:>10.3f}{c['age_years']:>10.3f}{c['sex']:>12.3f}{sd:>10.3f}"
              f"{measure.extra['r2']:>7.3f}")
    return 0


# ---- stats ---------------------------------------------------------------------------------

def _register_stats(actions) -> None:
    parser = _subparser(
        actions, "stats", "the paper's cohort statistics: CSV tables and a PDF report",
        "Reproduce the statistical analysis of Xi et al. 2025 on a cohort CSV: mean and SD per region "
        "overall and by sex (Table 2); balance of two groups of a split column (t-test on age, "
        "chi-square on sex; Table 1); multiple linear regression of each region on sex and age (Tables "
        "3-4); paired t-test left vs right per lobe with mean difference, 95% CI and Cohen's dz (Table "
        "5); Spearman correlation with age; scatter plots of volume against age by sex (Figure 3).",
        "examples:\n"
        "  lobevol normative stats results/volumes.csv --out stats/\n"
        "  lobevol normative stats cohort.csv --out stats/ --split-column split\n\n"
        "Writes into DIR: table1_groups.csv and table1_tests.csv (with --split-column),\n"
        "table2_descriptive.csv, table3_regression.csv, table5_paired_left_right.csv,\n"
        "spearman_age.csv and report.pdf.\n",
    )
    parser.add_argument("cohort", type=Path, metavar="COHORT.csv", help="one row per child")
    parser.add_argument("--out", type=Path, required=True, metavar="DIR", help="output folder (created)")
    parser.add_argument("--split-column", default=None, metavar="NAME",
                        help="extra column with two groups (e.g. train/test) to compare for Table 1")
    parser.add_argument("--no-pdf", action="store_true", help="CSV tables only")
    parser.set_defaults(func=run_stats)


def run_stats(args: argparse.Namespace) -> int:
    from tqdm import tqdm

    from normative.cohort import read_cohort
    from normative.stats import all_tables
    from normative.stats_report import render_stats_pdf

    cohort = read_cohort(args.cohort)
    _, excluded = cohort.complete()
    message = cohort.describe_excluded(excluded, "the regression and the plots")
    if message:
        print(f"note: {message}", file=sys.stderr)
    steps = ["tables"] + ([] if args.no_pdf else ["pdf"])
    written = []
    with tqdm(total=len(steps), desc="normative stats", unit="step", disable=None) as progress:
        tables = all_tables(cohort, args.split_column)
        args.out.mkdir(parents=True, exist_ok=True)
        written += [table.write_csv(args.out) for table in tables]
        progress.update()
        if not args.no_pdf:
            pdf_path = args.out / "report.pdf"
            pdf_path.write_bytes(render_stats_pdf(cohort, tables, split_column=args.split_column))
            written.append(pdf_path)
            progress.update()
    print(f"{len(cohort)} children; wrote {len(written)} file(s) to {args.out}: "
          + ", ".join(path.name for path in written))
    return 0


# ---- simulate ------------------------------------------------------------------------------

def _register_simulate(actions) -> None:
    parser = _subparser(
        actions, "simulate", "draw a synthetic cohort CSV from known coefficients",
        "Draw children from known generating models (volume = b0 + b_age*age + b_sex*sex + noise) and "
        "write them as a cohort CSV with a random 7:3 train/test 'split' column. The default truth "
        "reproduces the paper's whole-cohort mean and SD of every region with assumed age and sex "
        "effects (the paper's own coefficients are not available); --truth-from uses any reference "
        "file (e.g. a fitted one) as the truth instead.",
        "examples:\n"
        "  lobevol normative simulate -n 3000 --seed 1 -o cohort.csv\n"
        "  lobevol normative simulate -n 3000 --seed 1 -o cohort.csv --truth truth.json\n"
        "  lobevol normative simulate -n 500 --seed 2 -o site_like.csv --truth-from site_reference.json\n\n"
        "Synthetic children, not patients: for tests, demos and checking 'fit' and 'stats'.\n",
    )
    parser.add_argument("-n", type=int, required=True, help="number of children")
    parser.add_argument("--seed", type=int, default=0, help="random seed (default 0)")
    parser.add_argument("-o", "--output", type=Path, required=True, metavar="COHORT.csv", help="CSV to write")
    parser.add_argument("--age-dependent-sd", action="store_true", help="default truth with an SD growing with age")
    parser.add_argument("--truth-from", type=Path, default=None, metavar="REF.json",
                        help="draw from this reference file instead of the default truth")
    parser.add_argument("--truth", type=Path, default=None, metavar="TRUTH.json",
                        help="also write the generating models as a reference file")
    parser.set_defaults(func=run_simulate)


def run_simulate(args: argparse.Namespace) -> int:
    from normative.cohort import write_cohort
    from normative.reference import load_reference
    from normative.simulate import paper_like_truth, simulate_cohort

    if args.truth_from and args.age_dependent_sd:
        raise ValueError("--age-dependent-sd applies to the default truth, not with --truth-from")
    truth = load_reference(args.truth_from) if args.truth_from else paper_like_truth(args.age_dependent_sd)
    cohort = simulate_cohort(args.n, args.seed, truth)
    write_cohort(args.output, cohort)
    if args.truth:
        truth.save(args.truth)
    boys = cohort.sex.count("M")
    print(f"wrote {args.output}: {len(cohort)} synthetic children ({boys} boys, {len(cohort) - boys} girls), "
          f"ages {cohort.age_years.min():.2f}-{cohort.age_years.max():.2f} years, truth {truth.name}"
          + (f" (written to {args.truth})" if args.truth else ""))
    return 0
