"""``lobevol demo``: the node's whole loop on loopback, in one command."""
from __future__ import annotations

import argparse
import logging
import shutil
import subprocess
import tempfile
import time
from pathlib import Path

from node.cli._options import add_config_option

#: The demo's [series] stability_s (s): it sends the whole study itself, in one call that returns once every
#: image is stored, so the study is complete when the call returns; waiting longer would only slow it down.
DEMO_STABILITY_S = 2.0

EPILOG = """\
examples:
  lobevol demo
      start a node (settings of config.ini, on a free port, its files in a new temporary
      folder), start DCMTK storescp as the receiving PACS, send it a phantom head CT,
      wait for the results, print the volumes next to the phantom's truth, their
      z-scores and flags, and the objects the PACS received. The phantom is a typical
      child (its volumes are the reference's means): every region should read 'within'
  lobevol demo --child drawn
      a child whose volumes are drawn from the cohort model (some may be flagged)
  lobevol demo --seed 7 --matrix 256 --workdir demo-out
      another phantom, larger images, files kept in demo-out/
  lobevol demo --port 11112
      the node on 127.0.0.1:11112 (lobevol echo LOBEVOL --as PACS --config config.ini
      reaches it meanwhile)

Needs DCMTK's storescp (apt-get install dcmtk). Not for clinical use: the bundled
model was trained on synthetic phantoms.
"""


def register(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser(
        "demo",
        help="the whole node loop on loopback: node + PACS, send a phantom, print the results",
        description=(
            "Run the node's whole loop on this machine: start the node and a receiving PACS (DCMTK "
            "storescp), send a synthetic head CT phantom by C-STORE as that PACS, wait until the node "
            "has sent back its SEG, SR and PDF, and print the measured volumes next to the truth."
        ),
        epilog=EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    add_config_option(parser, help="node settings to use (default config.ini); port, folders and PACS are replaced")
    parser.add_argument("--seed", type=int, default=2025, help="phantom seed (default 2025): the child's anatomy and scan")
    parser.add_argument("--child", choices=("typical", "drawn"), default="typical",
                        help="typical (default): the phantom's 10 volumes are the reference's means, so every "
                             "region should read 'within'; drawn: volumes drawn from the cohort model")
    parser.add_argument("--matrix", type=int, default=192, help="phantom image matrix (default 192)")
    parser.add_argument("--model", type=Path, default=None, help="checkpoint (default: the config's, else bundled)")
    parser.add_argument("--workdir", type=Path, default=None, help="folder for every file (default: a new temporary one)")
    parser.add_argument("--port", type=int, default=0,
                        help="the node's port on 127.0.0.1 (default: a free one); the PACS takes a free one")
    parser.add_argument("--timeout", type=float, default=900, help="give up after this many seconds (default 900)")
    parser.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    import dataclasses

    from node.config import RemoteAE, load_config
    from node.service.scp import check_port_free

    storescp = shutil.which("storescp")
    if storescp is None:
        raise RuntimeError("storescp not found: the demo's receiving PACS is DCMTK's (apt-get install dcmtk)")
    if args.model is not None and not args.model.is_file():
        raise FileNotFoundError(f"--model {args.model} does not exist")
    work = args.workdir or Path(tempfile.mkdtemp(prefix="lobevol-demo-"))
    work.mkdir(parents=True, exist_ok=True)
    if not 0 <= args.port <= 65535:
        raise ValueError(f"--port {args.port} is not in 0-65535")
    pacs_port, node_port = _free_port(), args.port or _free_port()
    loaded = load_config(args.config)
    config = dataclasses.replace(
        loaded,
        node=dataclasses.replace(loaded.node, port=node_port, bind_address="127.0.0.1"),
        series=dataclasses.replace(loaded.series, stability_s=DEMO_STABILITY_S),
        storage=dataclasses.replace(loaded.storage, spool_dir=work / "spool", results_dir=work / "results",
                                    database=work / "jobs.sqlite"),
        remotes={"PACS": RemoteAE("PACS", "127.0.0.1", pacs_port, may_send=True, may_receive=True)},
        results=dataclasses.replace(loaded.results, extra_destinations=()),
        inference=dataclasses.replace(loaded.inference, model=args.model or loaded.inference.model))
    check_port_free(config.node)
    logging.getLogger("node").setLevel(logging.INFO)
    print(f"demo folder: {work}")
    (work / "pacs").mkdir(exist_ok=True)
    pacs = subprocess.Popen([storescp, "-aet", "PACS", "-od", str(work / "pacs"), "+uf", "+xa", str(pacs_port)],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        return _demo(args, config, work)
    finally:
        pacs.terminate()
        pacs.wait(10)


def _demo(args, config, work: Path) -> int:
    from node.service.jobs import FINAL_STATES, JobState
    from node.service.scu import store_files
    from node.service.server import Node

    reference = _reference(config)
    phantom, files = _write_phantom(args.seed, args.matrix, work / "phantom", reference if args.child == "typical" else None)
    print(f"phantom seed {args.seed}: {len(files)} CT images, {phantom.meta['sex']}, {phantom.meta['age_years']:.2f} years, "
          + ("a typical child: its volumes are the reference's means" if args.child == "typical"
             else "volumes drawn from the cohort model"))
    print(f"reference: {reference.name} ({reference.population}, n = {reference.n}, "
          f"{reference.age_range_years[0]:g}-{reference.age_range_years[1]:g} years), {reference.kind}")
    node = Node(config)
    print("starting the node (loading the model)...")
    node.start()
    print(f"node {config.node.ae_title} listening on 127.0.0.1:{node.port}; the PACS (storescp) on "
          f"127.0.0.1:{config.remotes['PACS'].port}")
    try:
        started = time.monotonic()
        results = store_files(_node_as_remote(config, node.port), files, "PACS")
        if any(r.outcome != "sent" for r in results):
            raise RuntimeError(f"the node did not store every image: {[r.detail for r in results if r.outcome != 'sent']}")
        print(f"sent {len(files)} images to {config.node.ae_title} in {time.monotonic() - started:.1f} s; waiting for results")
        job = None
        deadline = time.monotonic() + args.timeout
        while time.monotonic() < deadline:
            jobs = node.jobs.jobs(limit=1)
            if jobs and jobs[0].state in FINAL_STATES:
                job = jobs[0]
                break
            time.sleep(0.5)
        if job is None:
            raise RuntimeError(f"no result within {args.timeout:g} s (see lobevol status --job 1 with the demo's database)")
        print(f"job {job.id}: {job.state} after {time.monotonic() - started:.0f} s" + (f" ({job.reason})" if job.reason else ""))
        if job.state != JobState.DONE:
            return 1
        _print_volumes(Path(job.results_dir) / "volumes.json", phantom.meta["volumes_cm3"])
        print("the PACS received:")
        for path in sorted((work / "pacs").iterdir()):
            print(f"  {path}")
        print(f"results folder: {job.results_dir}")
        return 0
    finally:
        node.stop()


def _node_as_remote(config, port: int):
    from node.config import RemoteAE

    return RemoteAE(config.node.ae_title, "127.0.0.1", port)


def _reference(config):
    from normative.compare import load_reference

    return load_reference(config.pipeline.outputs.reference_path)


def _write_phantom(seed: int, matrix: int, folder: Path, reference=None):
    """The demo's phantom; with a reference, its volumes are the reference's means for the phantom's sex and age."""
    from inference.phantoms.dicom_series import write_ct_series
    from inference.phantoms.generator import child_of_seed, make_phantom
    from inference.vocabulary import REGION_KEYS

    volumes = None
    if reference is not None:
        sex, age = child_of_seed(seed)
        volumes = {key: reference.expected(key, age, sex).mean for key in REGION_KEYS}
    phantom = make_phantom(seed, matrix=matrix, volumes_cm3=volumes)
    write_ct_series(phantom, folder)
    return phantom, sorted(p for p in folder.rglob("*") if p.is_file())


def _print_volumes(volumes_json: Path, truth: dict[str, float]) -> None:
    import json

    from inference.vocabulary import REGIONS

    summary = json.loads(volumes_json.read_text())
    measured = summary["volumes_cm3"]
    regions = {r["key"]: r for r in summary.get("normative", {}).get("regions", [])}
    print(f"{'region':<22}{'measured':>10}{'true':>10}{'error':>9}{'z':>7}  flag")
    for region in REGIONS:
        result = regions.get(region.key, {})
        z, flag = result.get("z_score"), result.get("flag") or "-"
        uncertain = " (uncertain: the methods differ)" if result.get("uncertain") else ""
        error = 100 * (measured[region.key] - truth[region.key]) / truth[region.key]
        print(f"{region.name:<22}{measured[region.key]:>10.1f}{truth[region.key]:>10.1f}{error:>8.1f}%"
              f"{'' if z is None else f'{z:+.1f}':>7}  {flag}{uncertain}")
    for note in summary.get("normative", {}).get("notes", []):
        print(f"note: {note}")


def _free_port() -> int:
    import socket

    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]
