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


def inference_settings(args: argparse.Namespace, base=None):
    """``InferenceSettings`` from ``--model``, ``--device``, ``--threads``, ``--tta``, ``--refine-surface``,
    ``--method`` and ``--cross-check``.

    ``--model bundled`` or no ``--model`` is the bundled model. ``--method`` and ``--cross-check``, when
    a command has them and they are given, win over ``base`` (a config file's [inference]); without a
    base the method is the network, without cross-check. Options a command lacks keep their default.
    """
    import dataclasses

    from node.config import InferenceSettings

    base = base if base is not None else InferenceSettings(cross_check=False)
    model = getattr(args, "model", None)
    method = getattr(args, "method", None)
    cross_check = getattr(args, "cross_check", None)
    return dataclasses.replace(
        base, device=args.device, threads=args.threads, model=None if model in (None, "bundled") else Path(model),
        tta=getattr(args, "tta", True), refine_surface=getattr(args, "refine_surface", True),
        method=base.method if method is None else method,
        cross_check=base.cross_check if cross_check is None else cross_check)
