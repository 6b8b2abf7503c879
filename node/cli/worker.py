"""``lobevol worker``: analyse the jobs of a shared job store, on any machine that sees its folders."""
from __future__ import annotations

import argparse

from node.cli._node_process import run_until_stopped
from node.cli._options import add_config_option

EPILOG = """\
examples:
  lobevol worker --config /etc/lobevol/config.ini
      analyse jobs of [storage] database (postgresql://...) one at a time, on [inference] device
  lobevol worker --config /etc/lobevol/config.ini --device cuda:1 --name gpu-2-cuda1
      a second worker on the same machine, on the second GPU, under its own name

Several workers, and several 'lobevol serve' receivers, may share one store: a job
is claimed by one of them under a lease renewed while it runs; a worker that dies
or freezes loses its jobs to the others when the lease runs out (counted as a
crash: a study that crashes 3 workers fails). The [storage] spool and results
folders must be the same shared folders as the receivers' (a file system that
honours fsync and rename, e.g. NFS exported with 'sync'). Workers also send
results ([remote ...] destinations). SIGTERM or Ctrl-C: the running job finishes
within [node] shutdown_grace_s or goes back to the queue; a second one stops at once.
See who runs what: lobevol status --config FILE
"""


def register(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser(
        "worker",
        help="analyse the jobs of a shared job store (no DICOM listener)",
        description="Run a job runner without a DICOM listener: claim the jobs that receivers ('lobevol "
                    "serve') put in the shared job store, analyse them with the configured model and send "
                    "their results.",
        epilog=EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    add_config_option(parser)
    parser.add_argument("--device", default=None, help="run the model here instead of [inference] device "
                                                       "(cpu, cuda, cuda:N)")
    parser.add_argument("--name", default=None,
                        help="this worker's name in the job store (default: <host>-worker; unique per worker)")
    parser.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    import dataclasses

    from node.config import DEVICE, load_config
    from node.service.server import Node

    config = load_config(args.config)
    if args.device is not None:
        if not DEVICE.fullmatch(args.device):
            raise ValueError(f"--device {args.device!r} is not auto, cpu, cuda or cuda:N")
        config = dataclasses.replace(config, inference=dataclasses.replace(config.inference, device=args.device))
    node = Node(config, name=args.name, receive=False)
    return run_until_stopped(node, lambda: f"lobevol worker {node.runner.name} analysing jobs of "
                                           f"{node.jobs.describe()} on {config.inference.device}; stop with Ctrl-C")
