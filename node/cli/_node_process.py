"""How ``lobevol serve`` and ``lobevol worker`` run a node in the foreground until they are told to stop."""
from __future__ import annotations

import logging
import signal
from typing import Callable


def run_until_stopped(node, banner: Callable[[], str]) -> int:
    """Start ``node``, print ``banner()`` and wait; SIGTERM or SIGINT stops it with grace, a second one at once.

    The node's log goes to INFO unless the command asked for more: a server's log is its status line.
    """
    if not logging.getLogger().isEnabledFor(logging.INFO):
        logging.getLogger("node").setLevel(logging.INFO)
    stops = []

    def stop(signum, frame) -> None:
        stops.append(signum)
        node.request_stop(now=len(stops) > 1)

    signal.signal(signal.SIGTERM, stop)
    signal.signal(signal.SIGINT, stop)
    node.start()
    print(banner(), flush=True)
    node.wait()
    node.stop()
    return 0
