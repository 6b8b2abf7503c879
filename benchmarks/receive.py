"""Receive speed: DCMTK storescu sending one CT series to storescp, Orthanc and `lobevol serve`.

One run, the three receivers side by side: each round starts every receiver
afresh on an empty folder, times ``storescu`` sending the whole series over
loopback (one association, the wall time of the storescu process), checks that
the receiver holds every instance, and stops it. Rounds are interleaved
(each round starting with the next receiver, the disk synced before each) so a
machine that slows down slows all three alike; the medians are printed with
every round's figure.

What each receiver promises when it answers a C-STORE differs:
  storescp  the file is written (not fsynced);
  Orthanc   the file is written (SyncStorageArea: fsynced) and indexed in SQLite;
  lobevol   the file is fsynced and renamed, its folder fsynced, and the instance
            committed to the job queue (SQLite, synchronous=FULL).

usage:
  .venv/bin/python benchmarks/receive.py                     # 300 instances of 512 x 512, 3 rounds
  .venv/bin/python benchmarks/receive.py --rounds 5 --slices 600
  .venv/bin/python benchmarks/receive.py --associations 4    # the series split over 4 concurrent storescu
  .venv/bin/python benchmarks/receive.py --also ../main       # also time another checkout (before a change)
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path
from typing import Callable

REPO = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(REPO), str(REPO / "benchmarks")]

from node_roundtrip import free_port, listening  # noqa: E402  (the loopback helpers of the benchmarks)


def dcmtk(name: str) -> str:
    """The DCMTK tool ``name`` (not pynetdicom's app of the same name, which a venv puts on PATH)."""
    for folder in ("/usr/bin", "/usr/local/bin"):
        candidate = Path(folder) / name
        if candidate.is_file():
            return str(candidate)
    raise SystemExit(f"DCMTK {name} not found in /usr/bin or /usr/local/bin: apt-get install dcmtk")


def wait_until(condition: Callable[[], bool], timeout_s: float, what: str, process: subprocess.Popen,
               log: Path) -> None:
    deadline = time.monotonic() + timeout_s
    while not condition():
        if process.poll() is not None:
            raise SystemExit(f"{what}: the process exited ({process.returncode}): {log.read_text()[-2000:]}")
        if time.monotonic() > deadline:
            raise SystemExit(f"{what}: not ready within {timeout_s:g} s")
        time.sleep(0.05)


class Receiver:
    """One receiver run in a fresh folder: start(), then count() after sending, then stop()."""

    name = ""
    #: working folder of the process (None: the receiver's own folder)
    cwd: Path | None = None
    #: environment variables added for the process
    environment: dict[str, str] = {}

    def __init__(self, folder: Path):
        self.folder = folder
        self.folder.mkdir(parents=True)
        self.port = free_port()
        self.log = folder / "log.txt"
        self.process: subprocess.Popen | None = None

    def command(self) -> list[str]:
        raise NotImplementedError

    def ready(self) -> bool:
        return listening(self.port)

    def start(self) -> None:
        with open(self.log, "wb") as log:
            self.process = subprocess.Popen(self.command(), cwd=self.cwd or self.folder, stdout=log,
                                            stderr=subprocess.STDOUT, env={**os.environ, **self.environment})
        wait_until(self.ready, 600, self.name, self.process, self.log)

    def count(self) -> int:
        raise NotImplementedError

    def stop(self) -> None:
        if self.process is not None and self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(60)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()


#: Debian's DCMTK leaves Nagle's algorithm on unless TCP_NODELAY=1 is set: each C-STORE-RSP then
#: waits for the sender's delayed ACK (about 40 ms an instance). DCMTK-based receivers get it on.
DCMTK_NODELAY = {"TCP_NODELAY": "1"}


class DcmtkStorescp(Receiver):
    name = "storescp"
    environment = DCMTK_NODELAY

    #: serve concurrent associations in forked children (``--fork``), as the other two serve them in threads
    concurrent = False

    def command(self) -> list[str]:
        (self.folder / "in").mkdir()
        fork = ["--fork"] if self.concurrent else []
        return [dcmtk("storescp"), *fork, "-aet", "LOBEVOL", "-od", str(self.folder / "in"), str(self.port)]

    def count(self) -> int:
        return sum(1 for _ in (self.folder / "in").iterdir())


class OrthancServer(Receiver):
    name = "Orthanc"
    environment = DCMTK_NODELAY

    def command(self) -> list[str]:
        self.http_port = free_port()
        config = {
            "Name": "receive-bench", "StorageDirectory": str(self.folder / "storage"),
            "IndexDirectory": str(self.folder / "index"), "DicomAet": "LOBEVOL", "DicomPort": self.port,
            "HttpPort": self.http_port, "RemoteAccessAllowed": False, "AuthenticationEnabled": False,
            "DicomCheckCalledAet": False, "Plugins": [], "HttpServerEnabled": True,
        }
        (self.folder / "orthanc.json").write_text(json.dumps(config))
        executable = shutil.which("Orthanc") or "/usr/sbin/Orthanc"
        if not Path(executable).is_file():
            raise SystemExit("Orthanc not found: apt-get install orthanc")
        return [executable, str(self.folder / "orthanc.json")]

    def ready(self) -> bool:
        try:
            self._get("/system")
        except OSError:
            return False
        return listening(self.port)

    def _get(self, path: str):
        with urllib.request.urlopen(f"http://127.0.0.1:{self.http_port}{path}", timeout=30) as response:
            return json.loads(response.read())

    def count(self) -> int:
        return int(self._get("/statistics")["CountInstances"])


class LobevolServe(Receiver):
    name = "lobevol"
    cwd = REPO  # `python -m node.cli` runs this checkout's code

    def command(self) -> list[str]:
        # stability_s of an hour: the worker stays idle, only receiving is measured.
        (self.folder / "node.ini").write_text(f"""\
[node]
port = {self.port}
max_associations = 32
[storage]
spool = spool
results = results
database = jobs.sqlite
[series]
stability_s = 3600
[inference]
device = cpu
threads = 1
[remote STORESCU]
host = 127.0.0.1
port = 104
may_send = yes
may_receive = no
""")
        return [sys.executable, "-m", "node.cli", "serve", "--config", str(self.folder / "node.ini")]

    def count(self) -> int:
        from node.service.jobs import JobStore

        return sum(job.instances for job in JobStore(self.folder / "jobs.sqlite", create=False).jobs(limit=1000))


def write_series(folder: Path, matrix: int, slices: int) -> list[Path]:
    """A phantom head CT series of ``slices`` images of ``matrix`` x ``matrix`` (Int16, uncompressed)."""
    from inference.phantoms.dicom_series import write_ct_series
    from inference.phantoms.generator import make_phantom

    phantom = make_phantom(2025, matrix=matrix, n_slices=slices, slice_thickness_mm=round(190.0 / slices, 3))
    return write_ct_series(phantom, folder)


def send(port: int, files: list[Path], associations: int) -> float:
    """Wall seconds for ``associations`` concurrent storescu processes to send ``files`` (split evenly)."""
    shares = [files[i::associations] for i in range(associations)]
    started = time.monotonic()
    senders = [subprocess.Popen([dcmtk("storescu"), "-aet", "STORESCU", "-aec", "LOBEVOL", "127.0.0.1", str(port),
                                 *map(str, share)], stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
               for share in shares]
    for sender in senders:
        _, error = sender.communicate()
        if sender.returncode != 0:
            raise SystemExit(f"storescu failed ({sender.returncode}): {error.decode()[-2000:]}")
    return time.monotonic() - started


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--matrix", type=int, default=512, help="rows = columns of each image")
    parser.add_argument("--slices", type=int, default=300, help="instances sent")
    parser.add_argument("--rounds", type=int, default=3, help="interleaved rounds (at least 3 for a median)")
    parser.add_argument("--associations", type=int, default=1, help="concurrent storescu processes")
    parser.add_argument("--only", choices=("storescp", "Orthanc", "lobevol"), action="append",
                        help="measure only these receivers (repeatable)")
    parser.add_argument("--also", type=Path, action="append", default=[], metavar="CHECKOUT",
                        help="another lobevol checkout to time alongside this one (e.g. before a change)")
    parser.add_argument("--keep", action="store_true", help="keep the temporary folder")
    args = parser.parse_args()
    DcmtkStorescp.concurrent = args.associations > 1
    work = Path(tempfile.mkdtemp(prefix="lobevol-receive-bench-"))
    kinds = {kind.name: kind for kind in (DcmtkStorescp, OrthancServer, LobevolServe)
             if not args.only or kind.name in args.only}
    for checkout in args.also:
        name = f"lobevol@{checkout.name}"
        kinds[name] = type(name, (LobevolServe,), {"name": name, "cwd": checkout.resolve()})
    try:
        started = time.monotonic()
        files = write_series(work / "series", args.matrix, args.slices)
        megabytes = sum(f.stat().st_size for f in files) / 2**20
        print(f"series: {len(files)} instances of {args.matrix} x {args.matrix} ({megabytes:.0f} MiB), written in "
              f"{time.monotonic() - started:.0f} s; {args.associations} association(s); {args.rounds} rounds")
        times: dict[str, list[float]] = {name: [] for name in kinds}
        for round_number in range(args.rounds):
            # Each round starts with the next receiver, so that none always follows the same one (a
            # receiver's data still being written back slows the next), and the disk is synced between.
            names = list(kinds)
            names = names[round_number % len(names):] + names[:round_number % len(names)]
            for name in names:
                kind = kinds[name]
                os.sync()
                receiver = kind(work / f"{name}-{round_number}")
                try:
                    receiver.start()
                    seconds = send(receiver.port, files, args.associations)
                    held = receiver.count()
                finally:
                    receiver.stop()
                if held != len(files):
                    raise SystemExit(f"{name} holds {held} of the {len(files)} instances sent")
                times[name].append(seconds)
                shutil.rmtree(receiver.folder, ignore_errors=True)
            print(f"round {round_number + 1}: " + ", ".join(f"{n} {t[-1]:.2f} s" for n, t in times.items()), flush=True)
        medians = {name: statistics.median(t) for name, t in times.items()}
        print("median: " + ", ".join(f"{name} {m:.2f} s ({len(files) / m:.0f} instances/s)"
                                     for name, m in medians.items()))
        if "lobevol" in medians:
            ratios = [f"{medians['lobevol'] / medians[n]:.2f}x {n}" for n in ("storescp", "Orthanc") if n in medians]
            if ratios:
                print("lobevol: " + ", ".join(ratios))
    finally:
        if not args.keep:
            shutil.rmtree(work, ignore_errors=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
