"""``lobevol orthanc``: run Orthanc with lobevol as its Python plugin, on loopback, in a folder of its own."""
from __future__ import annotations

import argparse
import json
import os
import shutil
import sysconfig
from pathlib import Path

from node.cli._options import add_config_option

PYTHON_PLUGIN = Path("/usr/share/orthanc/plugins/libOrthancPython.so")

EPILOG = """\
examples:
  lobevol orthanc --config config.ini
      Orthanc on http://127.0.0.1:8042/ (DICOM: AE PACS, port 4242), its database in var/orthanc/
  lobevol orthanc --config config.ini --http-port 18042 --dicom-port 14242
      the same on other ports (make run-orthanc ORTHANC_HTTP_PORT=18042 ORTHANC_DICOM_PORT=14242)
  lobevol orthanc --config config.ini --write-only
      only write var/orthanc/orthanc.json (to run Orthanc yourself: Orthanc var/orthanc/orthanc.json)

Then, from another shell:
  lobevol phantom --out phantoms --count 1 --seed 1
  curl -X POST http://127.0.0.1:8042/instances --data-binary @phantoms/case_0000/dicom/CT000001.dcm (each file)
  lobevol send phantoms/case_0000/dicom --to PACS --config config.ini                              (or C-STORE)
  curl http://127.0.0.1:8042/lobevol/jobs                jobs, states and reasons
  lobevol status --config config.ini                     the same queue

Orthanc (1.10) cannot choose the address it listens on: its two ports listen on every interface,
but it answers HTTP to loopback clients only (RemoteAccessAllowed false) and DICOM (C-ECHO and
C-STORE) only to the AE titles in its DicomModalities, from their host: LOBEVOL at 127.0.0.1,
what `lobevol send` calls as. A study is analysed once Orthanc reports it stable (StableAge:
--stable-age, by default the config's [series] stability_s); the SEG, SR, PDF and key images
are stored into the same study. lobevol's settings come from --config
([storage], [inference], [outputs], [selection], [retry], [retention]).
"""


def register(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser(
        "orthanc",
        help="run Orthanc with lobevol inside it (the Python plugin), on loopback",
        description="Write an Orthanc configuration that loads lobevol's Python plugin "
                    "(node/service/orthanc_plugin.py) with this configuration file and this Python "
                    "environment, then run Orthanc on it. Every stable head-CT study stored in that Orthanc "
                    "is analysed and its results stored into the same study.",
        epilog=EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    add_config_option(parser)
    parser.add_argument("--folder", type=Path, default=Path("var/orthanc"),
                        help="Orthanc's configuration and database (default var/orthanc)")
    parser.add_argument("--http-port", type=int, default=8042, help="Orthanc's REST API and explorer (default 8042)")
    parser.add_argument("--dicom-port", type=int, default=4242, help="Orthanc's DICOM port (default 4242)")
    parser.add_argument("--aet", default="PACS", help="Orthanc's AE title (default PACS, as in config.ini)")
    parser.add_argument("--stable-age", type=int, default=None, metavar="S",
                        help="seconds without a new instance after which Orthanc calls a study stable "
                             "(default: the config's [series] stability_s)")
    parser.add_argument("--write-only", action="store_true", help="write the configuration, do not run Orthanc")
    parser.set_defaults(func=run)


def orthanc_configuration(folder: Path, lobevol_config: Path, *, http_port: int, dicom_port: int, aet: str,
                          stable_age_s: int, node_port: int = 11112) -> dict:
    """Orthanc's configuration (a dict for its JSON file) loading the plugin with this environment.

    ``node_port``: where the modality LOBEVOL (``lobevol send``, ``lobevol serve``) listens.
    """
    from node.service import orthanc_plugin

    folder = folder.resolve()
    return {
        "Name": "lobevol", "StorageDirectory": str(folder / "db"), "IndexDirectory": str(folder / "db"),
        "HttpPort": http_port, "DicomPort": dicom_port, "DicomAet": aet,
        "RemoteAccessAllowed": False, "AuthenticationEnabled": False,  # loopback only
        # DICOM from the known modalities only, from their host (Orthanc 1.10 cannot bind to loopback).
        "DicomAlwaysAllowStore": False, "DicomAlwaysAllowEcho": False, "DicomCheckModalityHost": True,
        "DicomModalities": {"lobevol": ["LOBEVOL", "127.0.0.1", node_port]},
        "StableAge": stable_age_s,
        "Plugins": [str(PYTHON_PLUGIN)], "PythonScript": str(Path(orthanc_plugin.__file__).resolve()),
        "Lobevol": {"Configuration": str(lobevol_config.resolve()), "SitePackages": [sysconfig.get_paths()["purelib"]]},
    }


def run(args: argparse.Namespace) -> int:
    from node.config import load_config

    config = load_config(args.config)  # the plugin would only log a bad one: say it here
    for name, port in (("--http-port", args.http_port), ("--dicom-port", args.dicom_port)):
        if not 1 <= port <= 65535:
            raise ValueError(f"{name} {port} is not in 1-65535")
    stable_age = args.stable_age if args.stable_age is not None else round(config.series.stability_s)
    if not PYTHON_PLUGIN.is_file():
        raise FileNotFoundError(f"{PYTHON_PLUGIN} not found: install orthanc-python (apt-get install orthanc-python)")
    binary = shutil.which("Orthanc") or shutil.which("Orthanc", path="/usr/sbin:/usr/bin")
    if binary is None:
        raise FileNotFoundError("Orthanc not found: install orthanc (apt-get install orthanc)")
    args.folder.mkdir(parents=True, exist_ok=True)
    path = args.folder / "orthanc.json"
    path.write_text(json.dumps(orthanc_configuration(args.folder, args.config, http_port=args.http_port,
                                                     dicom_port=args.dicom_port, aet=args.aet,
                                                     stable_age_s=stable_age, node_port=config.node.port),
                               indent=2))
    if args.write_only:
        print(f"wrote {path}")
        return 0
    print(f"Orthanc with lobevol: http://127.0.0.1:{args.http_port}/ (explorer: /app/explorer.html, "
          f"jobs: /lobevol/jobs); DICOM: AE {args.aet} on port {args.dicom_port}; database in {args.folder}/db",
          flush=True)
    os.execv(binary, [binary, str(path)])
    return 0  # not reached
