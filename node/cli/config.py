"""``lobevol config check``: validate a node configuration file and print the effective settings."""
from __future__ import annotations

import argparse
from pathlib import Path

EPILOG = """\
examples:
  lobevol config check config.ini
      prints every effective setting (defaults filled in, paths resolved) and the
      remote AE table; exit status 1 with the section and key at fault otherwise
"""


def register(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser(
        "config",
        help="check a node configuration file and print the effective settings",
        description="Validate a lobevol node configuration file (unknown sections or keys and invalid "
                    "values are errors) and print the settings the node would run with.",
        epilog=EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    actions = parser.add_subparsers(dest="action", metavar="ACTION", required=True)
    check = actions.add_parser("check", help="validate FILE and print the effective settings",
                               description="Validate FILE and print the effective settings.", epilog=EPILOG,
                               formatter_class=argparse.RawDescriptionHelpFormatter)
    check.add_argument("file", type=Path, metavar="FILE", help="configuration file (e.g. config.ini)")
    check.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from node.config import load_config

    print(load_config(args.file).describe())
    print("configuration is valid")
    return 0
