"""Soak of the shared job store: many studies through a receiver and several workers while they are killed,
frozen, and PostgreSQL is stopped; prints lost, duplicated and stuck.

A receiver (``lobevol serve --receive-only``) and ``--workers`` ``lobevol worker``
processes share a PostgreSQL database (a server started here with initdb/pg_ctl)
and their folders; a stand-in model of fixed cost (``benchmarks/workers.py``)
analyses; the PACS (``tests.node_peers.CountingSCP``) counts every C-STORE.
While ``--studies`` studies are sent (pynetdicom, every instance the receiver
refuses is sent again, as a PACS would), a chaos thread, every few seconds, kills
a worker with -9 (restarted at once under its name), freezes one (SIGSTOP) past
its lease then resumes it, and once stops PostgreSQL for a while. At the end:

  lost        instances the receiver acknowledged that the job store does not hold
  duplicated  studies with more than one result set (more than one SEG UID)
  stuck       jobs not done, skipped or failed when everything has settled
  failed      studies failed visibly, with their reasons (3 kills of their worker count as a poison study)

usage:
  .venv/bin/python benchmarks/workers_soak.py                      # 60 studies, 3 workers
  .venv/bin/python benchmarks/workers_soak.py --studies 100 --workers 4 --seed 2
"""
from __future__ import annotations

import argparse
import os
import random
import signal
import sys
import tempfile
import threading
import time
from collections import Counter
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(REPO)]
os.environ.setdefault("LOBEVOL_BENCH_COST_S", "1")

from node.config import RemoteAE  # noqa: E402
from node.service.jobs import StoreUnavailable  # noqa: E402
from node.service.scu import store_files  # noqa: E402
from tests.node_peers import CountingSCP, wait_for  # noqa: E402
from tests.output_fixtures import region_labels, write_ct_series  # noqa: E402
from tests.postgres import PostgresServer  # noqa: E402
from tests.test_node_workers import LEASE_S, SEG, Site  # noqa: E402


def send_all(site: Site, studies: list[list[Path]], acknowledged: dict[str, set[str]]) -> None:
    """Send every study, each refused (or cut) instance again until the receiver acknowledged it."""
    import pydicom

    target = RemoteAE("LOBEVOL", "127.0.0.1", site.port)
    for files in studies:
        pending = list(files)
        while pending:
            try:
                results = store_files(target, pending, "PACS")
            except Exception:  # the receiver refused the association: later
                time.sleep(1)
                continue
            for result in results:
                if result.outcome == "sent":
                    header = pydicom.dcmread(result.path, stop_before_pixels=True)
                    acknowledged.setdefault(str(header.StudyInstanceUID), set()).add(str(header.SOPInstanceUID))
            pending = [r.path for r in results if r.outcome != "sent"]
            if pending:
                time.sleep(1)


def chaos(site: Site, server: PostgresServer, names: list[str], stop: threading.Event, rng: random.Random,
          log: list[str]) -> None:
    outage_done = False
    while not stop.wait(rng.uniform(3, 6)):
        action = rng.choice(["kill", "kill", "freeze"] + ([] if outage_done else ["outage"]))
        name = rng.choice(names)
        process = site.processes[name]
        if action == "kill":
            process.kill()
            process.wait(10)
            site.start(name, "worker", "--name", name)
            log.append(f"kill -9 {name}")
        elif action == "freeze":
            os.kill(process.pid, signal.SIGSTOP)
            stop.wait(LEASE_S + 2)
            os.kill(process.pid, signal.SIGCONT)
            log.append(f"SIGSTOP {name} {LEASE_S + 2} s")
        else:
            server.stop()
            stop.wait(6)
            server.start()
            outage_done = True
            log.append("PostgreSQL stopped 6 s")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--studies", type=int, default=60)
    parser.add_argument("--workers", type=int, default=3)
    parser.add_argument("--seed", type=int, default=1)
    args = parser.parse_args()
    rng = random.Random(args.seed)
    root = Path(tempfile.mkdtemp(prefix="lobevol-workers-soak-"))
    studies = [write_ct_series(root / "studies" / f"s{n}", region_labels((20, 32, 32))) for n in range(args.studies)]
    server = PostgresServer().init().start()
    acknowledged: dict[str, set[str]] = {}
    events: list[str] = []
    started = time.monotonic()
    with CountingSCP() as pacs:
        site = Site(root / "site", server.new_database(), pacs, "benchmarks.workers:SleepSegmenter")
        try:
            site.receiver()
            names = [f"w{n}" for n in range(args.workers)]
            for name in names:
                site.worker(name)
            stop = threading.Event()
            chaos_thread = threading.Thread(target=chaos, args=(site, server, names, stop, rng, events), daemon=True)
            chaos_thread.start()
            send_all(site, studies, acknowledged)
            wait_for(lambda: site.all_final(len(studies)), 900, "every study to end", 1.0)
            stop.set()
            chaos_thread.join()
            time.sleep(2 * LEASE_S)
            wait_for(lambda: _settled(site), 300, "the deliveries to settle", 1.0)
            jobs = site.store.jobs(limit=100000)
            lost = sum(not site.store.has_instance(uid) for uids in acknowledged.values() for uid in uids)
        finally:
            site.stop()
            server.remove()
        segs: dict[str, set[str]] = {}
        for study, objects in pacs.by_study().items():
            segs[study] = {uid for sop_class, uid in objects if sop_class == SEG}
        repeated = sum(n - 1 for n in pacs.counts().values())
    duplicated = sum(len(uids) > 1 for uids in segs.values())
    stuck = [j for j in jobs if j.state not in ("done", "skipped", "failed")]
    failed = [j for j in jobs if j.state == "failed"]
    done_studies = {j.study_uid for j in jobs if j.state == "done"}
    missing = [s for s in done_studies if len(segs.get(s, ())) != 1]
    print(f"{args.studies} studies, {args.workers} workers, {time.monotonic() - started:.0f} s; chaos: "
          f"{Counter(e.split()[0] for e in events)}")
    print(f"acknowledged instances {sum(map(len, acknowledged.values()))}, lost {lost}")
    print(f"jobs {len(jobs)}: {Counter(j.state for j in jobs)}; stuck {len(stuck)}")
    print(f"duplicated result sets {duplicated}; done studies without exactly one SEG at the PACS {len(missing)}; "
          f"C-STOREs repeated with the same UID (at least once) {repeated}")
    for job in failed:
        print(f"  failed job {job.id}: {job.reason}")
    return 0 if lost == duplicated == len(stuck) == len(missing) == 0 else 1


def _settled(site: Site) -> bool:
    try:
        return all(j.state in ("done", "skipped", "failed") for j in site.store.jobs(limit=100000))
    except StoreUnavailable:
        return False


if __name__ == "__main__":
    sys.exit(main())
