"""``lobevol`` with a model-free stand-in segmenter, for tests that run the node as a subprocess (kill -9).

    python -m tests.stand_in_node MODULE:CLASS ARGUMENTS...

runs ``node.cli.main(ARGUMENTS, segmenter_factory=MODULE.CLASS)``: the production
worker reads no test hook; the stand-in comes in through main's parameter.
"""
from __future__ import annotations

import sys

from node.cli import main
from node.service.worker import stand_in_factory

if __name__ == "__main__":
    if len(sys.argv) < 2:
        raise SystemExit(__doc__)
    sys.exit(main(sys.argv[2:], segmenter_factory=stand_in_factory(sys.argv[1], "tests.stand_in_node")))
