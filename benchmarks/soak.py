"""A longer kill -9 soak of `lobevol serve` (tests/soak.py): prints lost / duplicated / stuck.

Rounds go through the kill points in turn (receiving, stability wait, analysing, sending;
the node, or the worker while analysing; the PACS down in every third round), after
concurrent senders; every acknowledged study must end with exactly one set of results at
the PACS, which counts every C-STORE (re-sends of one SOP Instance UID included). The
suite runs 8 rounds (tests/test_node_soak.py); this runs 24 by default.

usage:
  .venv/bin/python benchmarks/soak.py                      # 16 concurrent senders, 24 rounds
  .venv/bin/python benchmarks/soak.py --rounds 40 --seed 7 --keep
"""
from __future__ import annotations

import argparse
import shutil
import sys
import tempfile
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rounds", type=int, default=24, help="kill rounds (one study each)")
    parser.add_argument("--senders", type=int, default=16, help="studies sent at once before the rounds")
    parser.add_argument("--seed", type=int, default=0, help="random choices (instances before a kill, delays)")
    parser.add_argument("--keep", action="store_true", help="keep the working folder (logs, database)")
    args = parser.parse_args()
    from tests.soak import Soak

    folder = Path(tempfile.mkdtemp(prefix="lobevol-soak-"))
    print(f"working in {folder}", flush=True)
    try:
        report = Soak(folder, seed=args.seed, say=lambda line: print(line, flush=True)).run(args.rounds,
                                                                                           args.senders)
        print(report.summary())
        for name in ("lost", "duplicated", "stuck"):
            for study in getattr(report, name):
                print(f"  {name}: study {study}")
    finally:
        if not args.keep:
            shutil.rmtree(folder, ignore_errors=True)
    return 0 if report.ok else 1


if __name__ == "__main__":
    raise SystemExit(main())
