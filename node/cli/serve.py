"""``lobevol serve``: run the DICOM node."""
from __future__ import annotations

import argparse

from node.cli._node_process import run_until_stopped
from node.cli._options import add_config_option

EPILOG = """\
examples:
  lobevol serve --config config.ini
      listen as configured (default LOBEVOL on 127.0.0.1:11112); stop with Ctrl-C or SIGTERM
  lobevol -v serve --config /etc/lobevol/config.ini --port 104
      log every association and job; listen on port 104 instead of the file's port

Then, from another shell:
  lobevol echo LOBEVOL --config config.ini          is it up?
  lobevol send study/ --to LOBEVOL --config config.ini --as PACS
  lobevol status --config config.ini                jobs and their states

A study is processed once no instance of it arrived for [series] stability_s
seconds; results go back to the sender (when it may receive) and to the extra
destinations. SIGTERM or Ctrl-C (SIGINT) stops accepting associations, ends a
delivery in flight (it goes on at the next start), lets the running job finish
for [node] shutdown_grace_s seconds (else it runs again at the next start: a stop
is never counted as a crash) and exits; a second SIGTERM or Ctrl-C skips the grace.
"""


def register(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser(
        "serve",
        help="run the DICOM node: receive head CT, analyse, send SEG, SR and PDF back",
        description=(
            "Run the lobevol DICOM node: a Storage SCP that receives head CT studies, a job queue "
            "(SQLite) that survives restarts, a worker process that segments and measures each study, "
            "and an outbox that sends the DICOM SEG, TID 1500 SR and Encapsulated PDF back to the "
            "sending AE and to the configured extra destinations, retrying with backoff."
        ),
        epilog=EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    add_config_option(parser)
    parser.add_argument("--port", type=int, default=None, help="listen on this port instead of the file's [node] port")
    parser.add_argument("--receive-only", action="store_true",
                        help="receive and send results, but leave the analyses to 'lobevol worker' processes "
                             "sharing the job store (no model loaded here)")
    parser.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    import dataclasses

    from node.config import load_config
    from node.service.scp import check_port_free
    from node.service.server import Node

    config = load_config(args.config)
    if args.port is not None:
        if not 0 <= args.port <= 65535:
            raise ValueError(f"--port {args.port} is not in 0-65535")
        config = dataclasses.replace(config, node=dataclasses.replace(config.node, port=args.port))
    check_port_free(config.node)  # before the model loads
    node = Node(config, analyse=not args.receive_only)
    return run_until_stopped(node, lambda: f"lobevol node {config.node.ae_title} listening on "
                                           f"{config.node.bind_address}:{node.port} (results in "
                                           f"{config.storage.results_dir}, jobs in {node.jobs.describe()}); "
                                           "stop with Ctrl-C")
