"""``lobevol send``: DICOM files to a remote (C-STORE, or STOW-RS when it has a stow_url) or to the node."""
from __future__ import annotations

import argparse
from pathlib import Path

from node.cli._options import add_config_option

EPILOG = """\
examples:
  lobevol send phantom/dicom --to LOBEVOL --config config.ini
      send every DICOM file under the folder to our own node, calling as the first
      remote that may send (PACS in the shipped config.ini)
  lobevol send results/3 --to PACS --config config.ini
      send a job's results again to the PACS
  lobevol send scan/ --to LOBEVOL --as CT01 --config config.ini

Non-DICOM files (and DICOMDIR) under PATH are skipped; an instance found twice is sent once.
Exit status 1 when a file was not stored.
"""


def register(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser(
        "send",
        help="C-STORE (or STOW-RS) files to a remote or to the node (for tests and demos)",
        description="Send the DICOM files under PATH to AE (a remote of the configuration's table, or the "
                    "node itself): by C-STORE, proposing only the presentation contexts needed, or by "
                    "DICOMweb STOW-RS when the remote's section has a stow_url.",
        epilog=EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("path", type=Path, metavar="PATH", help="DICOM file or folder (searched recursively)")
    parser.add_argument("--to", required=True, metavar="AE", help="destination AE title")
    add_config_option(parser)
    parser.add_argument("--as", dest="calling_ae", default=None, metavar="AE", help="calling AE title")
    parser.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from tqdm import tqdm

    from node.cli.echo import peer
    from node.config import load_config
    from node.dicom.files import find_dicom_files
    from node.service.delivery import PeerUnavailable, transport_for

    config = load_config(args.config)
    remote, calling = peer(config, args.to, args.calling_ae)
    files = [header.path for header in find_dicom_files(args.path)]
    if not files:
        raise ValueError(f"no DICOM instance under {args.path}")
    transport = transport_for(remote, config, calling)
    with tqdm(total=len(files), unit="file", desc=f"to {remote.ae_title}", disable=len(files) < 10) as bar:
        try:
            results = transport.send(files, progress=lambda result: bar.update())
        except PeerUnavailable as error:
            raise RuntimeError(f"cannot send: {error}") from None
    problems = [r for r in results if r.outcome != "sent"]
    for result in problems:
        print(f"not stored: {result.path}: {result.detail}")
    print(f"{len(results) - len(problems)} of {len(results)} file(s) stored at {transport.description}")
    return 1 if problems else 0
