"""Node round trip on a full-size series: DCMTK storescu -> lobevol serve -> DCMTK storescp.

Prints, for one phantom series (default 512 x 512 x 300), the time to receive
it, the time from the last instance to the results being acknowledged by the
receiving PACS (with and without the stability wait), the seconds of each stage
of the analysis (the segmenters' ``timings_s``), the node's peak memory
(network process and worker process, from /proc VmHWM) and the machine's load
average (other processes on the CPU lengthen every figure).

Target on a 2-core CPU, with the default cross-check: results within 20 s of the
last instance, under 1.5 GiB (see the README for where it stands).

usage:
  .venv/bin/python benchmarks/node_roundtrip.py                  # 512 x 512 x 300, bundled model
  .venv/bin/python benchmarks/node_roundtrip.py --matrix 256 --slices 120 --model runs/x/best.pt
  .venv/bin/python benchmarks/node_roundtrip.py --keep           # keeps the folder, its series included
  .venv/bin/python benchmarks/node_roundtrip.py --series /tmp/lobevol-bench-xxx/series   # that series again
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def listening(port: int) -> bool:
    with socket.socket() as probe:
        return probe.connect_ex(("127.0.0.1", port)) == 0


def peak_memory_bytes(pid: int) -> int:
    """VmHWM (peak resident set) of a process, in bytes; 0 when it is gone."""
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) * 1024
    except OSError:
        pass
    return 0


def children(pid: int) -> list[int]:
    found = []
    for task in Path(f"/proc/{pid}/task").glob("*"):
        try:
            found += [int(c) for c in (task / "children").read_text().split()]
        except OSError:
            pass
    return found


def _role(pid: int, serve_pid: int) -> str:
    """network (the serve process), worker, or the multiprocessing helper it is."""
    if pid == serve_pid:
        return "network"
    try:
        command = Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode()
    except OSError:
        command = ""
    return "resource tracker" if "resource_tracker" in command else f"worker (pid {pid})"


def write_phantom_series(folder: Path, matrix: int, slices: int, seed: int) -> list[Path]:
    """A phantom head CT of ``matrix`` x ``matrix`` x ``slices`` written as a CT series."""
    from inference.phantoms.generator import make_phantom
    from inference.phantoms.dicom_series import write_ct_series

    thickness = 190.0 / slices  # 300 slices: 0.633 mm, the paper's protocol (0.625 mm) over a toddler's head
    phantom = make_phantom(seed, matrix=matrix, n_slices=slices, slice_thickness_mm=round(thickness, 3))
    write_ct_series(phantom, folder)
    return sorted(p for p in folder.rglob("*") if p.is_file())


def print_stage_timings(results: Path) -> None:
    """The analysis's seconds per stage, from the job's volumes.json (wall clock, in the worker)."""
    for path in results.rglob("volumes.json"):
        timings = json.loads(path.read_text()).get("timings_s", {})
        stages = ", ".join(f"{name} {seconds:.1f}" for name, seconds in timings.items())
        print(f"  stages (s; cross_check: the other method, run beside the first): {stages}")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--matrix", type=int, default=512)
    parser.add_argument("--slices", type=int, default=300)
    parser.add_argument("--seed", type=int, default=2025)
    parser.add_argument("--stability", type=float, default=2.0, help="[series] stability_s for the run (s)")
    parser.add_argument("--model", default="", help="checkpoint (default: the bundled model)")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--keep", action="store_true", help="keep the temporary folder")
    parser.add_argument("--series", default="", help="send this folder's series (one a --keep run wrote) "
                                                     "instead of writing a phantom")
    args = parser.parse_args()
    for tool in ("storescu", "storescp"):
        if shutil.which(tool) is None:
            raise SystemExit(f"{tool} not found: install dcmtk")

    work = Path(tempfile.mkdtemp(prefix="lobevol-bench-"))
    print(f"working in {work}")
    if args.series:
        files = sorted(p for p in Path(args.series).rglob("*") if p.is_file())
        if not files:
            raise SystemExit(f"no files under {args.series}")
        print(f"series: {len(files)} files from {args.series}")
    else:
        started = time.monotonic()
        files = write_phantom_series(work / "series", args.matrix, args.slices, args.seed)
        print(f"phantom: {len(files)} files of {args.matrix} x {args.matrix} in {time.monotonic() - started:.0f} s")

    pacs_port, node_port = free_port(), free_port()
    pacs = subprocess.Popen(["storescp", "-aet", "PACS", "-od", str(work / "pacs"), "+uf", "+xa", str(pacs_port)],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    (work / "pacs").mkdir()
    config = work / "node.ini"
    config.write_text(f"""\
[node]
port = {node_port}
[storage]
spool = spool
results = results
database = jobs.sqlite
[series]
stability_s = {args.stability}
[inference]
device = auto
threads = {args.threads}
model = {args.model}
[retry]
first_delay_s = 1
max_delay_s = 2
max_attempts = 5
[remote PACS]
host = 127.0.0.1
port = {pacs_port}
may_send = yes
may_receive = yes
""")
    log = open(work / "serve.log", "wb")
    serve = subprocess.Popen([sys.executable, "-m", "node.cli", "-v", "serve", "--config", str(config)], cwd=REPO,
                             stdout=log, stderr=subprocess.STDOUT)
    peaks: dict[int, int] = {}
    try:
        while not listening(node_port):
            if serve.poll() is not None:
                raise SystemExit(f"lobevol serve exited: {(work / 'serve.log').read_text()[-2000:]}")
            time.sleep(0.2)
        from node.service.jobs import JobStore

        jobs = JobStore(work / "jobs.sqlite")
        load_before = os.getloadavg()[0]
        sent = time.monotonic()
        subprocess.run(["storescu", "-aet", "PACS", "-aec", "LOBEVOL", "127.0.0.1", str(node_port), *map(str, files)],
                       check=True)
        receive_s = time.monotonic() - sent
        print(f"received {len(files)} instances in {receive_s:.1f} s "
              f"({sum(f.stat().st_size for f in files) / 2**20 / receive_s:.0f} MiB/s)")
        while True:
            for pid in [serve.pid, *children(serve.pid)]:
                peaks[pid] = max(peaks.get(pid, 0), peak_memory_bytes(pid))
            finished = [j for j in jobs.jobs() if j.state in ("done", "failed", "skipped")]
            if finished:
                break
            if serve.poll() is not None:
                raise SystemExit(f"lobevol serve exited: {(work / 'serve.log').read_text()[-2000:]}")
            time.sleep(0.2)
        (job,) = finished
        if job.state != "done":
            raise SystemExit(f"job {job.state}: {job.reason}")
        after_last = job.finished_at - job.last_instance_at
        print(f"results acknowledged by the PACS {after_last:.1f} s after the last instance "
              f"({after_last - args.stability:.1f} s without the {args.stability:g} s stability wait)")
        print(f"  {job.summary}")
        print(f"  load average (1 min) {load_before:.1f} before sending, {os.getloadavg()[0]:.1f} at the end")
        print_stage_timings(work / "results")
        received = sorted(p.name for p in (work / "pacs").iterdir())
        print(f"  the PACS received {len(received)} object(s): {', '.join(n.split('.')[0] for n in received)}")
        memory = {_role(pid, serve.pid): peak for pid, peak in peaks.items() if peak}
        print("peak memory: " + ", ".join(f"{name} {peak / 2**30:.2f} GiB" for name, peak in memory.items())
              + f"; together {sum(memory.values()) / 2**30:.2f} GiB")
    finally:
        serve.send_signal(signal.SIGTERM)
        serve.wait(120)
        pacs.terminate()
        pacs.wait(10)
        if not args.keep:
            shutil.rmtree(work, ignore_errors=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
