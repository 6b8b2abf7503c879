"""``lobevol`` with a model-free stand-in segmenter, for tests that run the node as a subprocess (kill -9).

    python -m tests.stand_in_node MODULE:CLASS ARGUMENTS...

runs ``lobevol ARGUMENTS`` (``node.cli.main``, the production entry point) with
``inference.factory.segmenter_factory``, where every node gets its segmenter,
replaced by one returning ``MODULE.CLASS``: no test hook in the shipped code.
"""
from __future__ import annotations

import importlib
import logging
import sys

import inference.factory


def use_stand_in(spec: str) -> type:
    """Make every node of this process (and its spawned workers) segment with ``module:Class``; returns the class."""
    module, _, name = spec.partition(":")
    stand_in = getattr(importlib.import_module(module), name)
    inference.factory.segmenter_factory = lambda settings: stand_in
    logging.getLogger("tests").warning("results come from the test stand-in %s, not from a model", spec)
    return stand_in


if __name__ == "__main__":
    if len(sys.argv) < 2:
        raise SystemExit(__doc__)
    use_stand_in(sys.argv[1])
    from node.cli import main

    sys.exit(main(sys.argv[2:]))
