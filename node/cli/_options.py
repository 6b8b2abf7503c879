"""Options several commands share, each defined once so that it reads and behaves alike everywhere."""
from __future__ import annotations

import argparse
from pathlib import Path
from typing import Optional

DEFAULT_CONFIG = Path("config.ini")


def add_config_option(parser: argparse.ArgumentParser, *, default: Optional[Path] = DEFAULT_CONFIG,
                      help: str = "configuration file (default: config.ini in the current folder)") -> None:
    """``--config FILE``: the node's settings (see ``lobevol config check``)."""
    parser.add_argument("--config", type=Path, default=default, metavar="FILE", help=help)


def add_device_options(parser: argparse.ArgumentParser, *, tta: bool = False) -> None:
    """``--device`` and ``--threads`` for commands that run a network; ``--tta`` for those that segment."""
    parser.add_argument("--device", default="auto",
                        help="auto (CUDA with mixed precision when present, else CPU), cpu or cuda[:N] (default auto)")
    parser.add_argument("--threads", type=int, default=None, metavar="N",
                        help="CPU threads for torch and SimpleITK (default: torch's choice)")
    if tta:
        parser.add_argument("--tta", action=argparse.BooleanOptionalAction, default=True,
                            help="average with the left-right mirrored prediction (default on; about twice "
                                 "the network time; on the held-out phantoms it adds up to 0.02 Dice "
                                 "per region)")
        parser.add_argument("--refine-surface", action=argparse.BooleanOptionalAction, default=True,
                            help="move the cerebral lobes' edge to the CSF/brain contrast of the image, on "
                                 "series with slices up to 2 mm (default on; on held-out 1.25 mm phantoms "
                                 "it brought every total within 3 %%)")
