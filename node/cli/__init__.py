"""``lobevol``: the command line.

One module per subcommand lives in this package (``node/cli/<command>.py``).
Each defines ``register(subparsers)``, which adds its parser and sets ``func``
(a callable taking the parsed ``argparse.Namespace`` and returning an exit
status). This module discovers them (no list to edit; :data:`COMMAND_ORDER`
only sets the order of ``--help``), assembles one parser and runs the chosen
command. Heavy imports belong inside the handlers, so ``--help`` stays fast.
Modules whose names start with ``_`` are helpers, not commands.
"""
from __future__ import annotations

import argparse
import importlib
import logging
import os
import sys
from typing import Optional, Sequence

from inference.vocabulary import __version__
from node.logsafe import configure_logging

#: Subcommands listed first in ``--help``, in this order (the daily work of a node);
#: every other module of this package follows alphabetically.
COMMAND_ORDER: tuple[str, ...] = (
    "serve", "worker", "orthanc", "status", "echo", "send", "retry", "db", "config", "demo", "segment", "normative",
    "phantom", "train", "evaluate", "compare", "run",
)


def command_modules() -> list[str]:
    """Module names of every subcommand: each module of this package with a ``register`` function."""
    import pkgutil

    names = [m.name for m in pkgutil.iter_modules(__path__) if not m.name.startswith("_")]
    ranked = sorted(names, key=lambda n: (COMMAND_ORDER.index(n) if n in COMMAND_ORDER else len(COMMAND_ORDER), n))
    return [f"{__name__}.{name}" for name in ranked]

DESCRIPTION = """\
lobevol: brain-region volumetry of pediatric head CT.

Segments 10 brain regions (right/left frontal, parietal, occipital and
temporal lobes, cerebellum, brainstem) with a 3D ResU-Net, measures their
volumes in cm3 and compares them with a normative reference for the child's
age and sex (Xi et al. 2025, Front. Neurol. 16:1573060).
"""

EPILOG = """\
examples:
  lobevol serve --config config.ini             the DICOM node (what make run starts)
  lobevol worker --config config.ini            analyse jobs of a shared job store (PostgreSQL)
  lobevol orthanc --config config.ini           Orthanc with lobevol inside it (make run-orthanc)
  lobevol demo                                  node + PACS + phantom on loopback, in one command
  lobevol run                                   phantom -> segment -> volumes vs truth
  lobevol phantom --out phantoms --count 3 --seed 1 --montage
  lobevol segment phantoms/case_0000/dicom --out results
  lobevol train --phantoms 40 --out runs/resunet --epochs 50
  lobevol evaluate inference/weights/resunet333_phantom.pt phantoms/
  lobevol normative stats cohort.csv --out stats/

Run 'lobevol COMMAND --help' for the options of each command.
Not for clinical use: the bundled model was trained on synthetic phantoms.
"""


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="lobevol",
        description=DESCRIPTION,
        epilog=EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--version", action="version", version=f"lobevol {__version__}")
    parser.add_argument(
        "-v", "--verbose", action="count", default=0,
        help="more log output (-v info, -vv debug)",
    )
    subparsers = parser.add_subparsers(dest="command", metavar="COMMAND")
    for name in command_modules():
        importlib.import_module(name).register(subparsers)
    return parser


def main(argv: Optional[Sequence[str]] = None) -> int:
    """Run one command; returns its exit status."""
    parser = build_parser()
    args = parser.parse_args(argv)
    # Logged values come from the network too (AE titles, UIDs): control characters escaped.
    configure_logging((logging.WARNING, logging.INFO, logging.DEBUG)[min(args.verbose, 2)],
                      "%(asctime)s %(levelname)s %(name)s: %(message)s")
    if not getattr(args, "func", None):
        parser.print_help()
        return 2
    try:
        return int(args.func(args) or 0)
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130
    except BrokenPipeError:
        # The reader went away (lobevol status | head): nothing more to say, and no traceback at exit.
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 0
    except (ValueError, FileNotFoundError, RuntimeError) as error:
        # Errors raised by our own validation carry a message meant for the user.
        logging.getLogger("lobevol").debug("error", exc_info=True)
        print(f"lobevol {args.command}: error: {error}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
