"""``lobevol echo``: C-ECHO a remote AE (or our own node) to check that it answers."""
from __future__ import annotations

import argparse
import time

from node.cli._options import add_config_option

EPILOG = """\
examples:
  lobevol echo PACS --config config.ini
      C-ECHO the remote AE named PACS in config.ini (its [remote PACS] section)
  lobevol echo LOBEVOL --config config.ini --as PACS
      C-ECHO our own node (its AE title and port from config.ini), calling as PACS
      (the node only answers AE titles of its remote table with may_send = yes)
"""


def register(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser(
        "echo",
        help="C-ECHO a remote AE from the config (or the node itself)",
        description="Send a C-ECHO (DICOM verification) to AE, looked up in the configuration's remote "
                    "table, or to the node itself when AE is the node's own AE title.",
        epilog=EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("ae", metavar="AE", help="AE title of a [remote AE] section, or the node's own AE title")
    add_config_option(parser)
    parser.add_argument("--as", dest="calling_ae", default=None, metavar="AE",
                        help="calling AE title (default: the node's AE title)")
    parser.set_defaults(func=run)


def peer(config, ae_title: str, calling_ae: str | None):
    """(remote, calling AE) for AE: a remote of the table, or the node itself."""
    from node.config import RemoteAE

    if ae_title == config.node.ae_title:
        host = "127.0.0.1" if config.node.bind_address in ("0.0.0.0", "") else config.node.bind_address
        caller = calling_ae or next((r.ae_title for r in config.remotes.values() if r.may_send), None)
        if caller is None:
            raise ValueError("no remote may send to the node: give --as with an AE title of the remote table")
        return RemoteAE(config.node.ae_title, host, config.node.port), caller
    try:
        return config.remote(ae_title), calling_ae or config.node.ae_title
    except KeyError as error:
        raise ValueError(error.args[0]) from None


def run(args: argparse.Namespace) -> int:
    from node.config import load_config
    from node.service.scu import PeerUnavailable, echo

    config = load_config(args.config)
    remote, calling = peer(config, args.ae, args.calling_ae)
    if not remote.host:
        raise ValueError(f"remote {remote.ae_title} has no host and port (results go to it by STOW-RS at "
                         f"{remote.stow.url}): there is nothing to C-ECHO")
    started = time.monotonic()
    try:
        status = echo(remote, calling, config.tls)
    except PeerUnavailable as error:
        raise RuntimeError(f"C-ECHO failed: {error}") from None
    if status != 0:
        raise RuntimeError(f"{remote.ae_title} answered C-ECHO with status 0x{status:04X}")
    print(f"{remote.ae_title} at {remote.host}:{remote.port} answered C-ECHO in "
          f"{1000 * (time.monotonic() - started):.0f} ms (called as {calling})")
    return 0
