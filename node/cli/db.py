"""``lobevol db``: the job store itself (create or upgrade its schema)."""
from __future__ import annotations

import argparse

from node.cli._options import add_config_option

EPILOG = """\
examples:
  lobevol db init --config config.ini
      create the tables of [storage] database (an SQLite file, or a PostgreSQL database
      given as postgresql://user@host/name), or add what an earlier version lacks

A PostgreSQL database must exist and the user may create tables in it, e.g.:
  sudo -u postgres createuser lobevol && sudo -u postgres createdb -O lobevol lobevol
The password, when one is needed, goes in ~/.pgpass, never in config.ini.
"""


def register(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser(
        "db",
        help="create or upgrade the job store's schema (SQLite or PostgreSQL)",
        description="Manage the job store named by [storage] database.",
        epilog=EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    actions = parser.add_subparsers(dest="action", metavar="ACTION", required=True)
    init = actions.add_parser("init", help="create the tables, or upgrade those of an earlier version (idempotent)",
                              epilog=EPILOG, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_config_option(init)
    init.set_defaults(func=run_init)


def run_init(args: argparse.Namespace) -> int:
    from node.config import load_config
    from node.service.jobs import JobStore

    config = load_config(args.config)
    jobs = JobStore(config.storage.database)
    counts = jobs.counts()
    print(f"job store ready: {jobs.describe()} ({sum(counts.values())} job(s))")
    return 0
