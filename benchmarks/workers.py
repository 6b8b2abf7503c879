"""Throughput of the shared job store: studies per minute with 1, 2 and 4 `lobevol worker` processes.

Each configuration starts afresh: a receiver (``lobevol serve --receive-only``)
and N workers sharing one PostgreSQL database (a server this script starts with
initdb/pg_ctl in a temporary folder, as the tests do) and the spool and results
folders; beside them the embedded default, one ``lobevol serve`` on SQLite that
receives and analyses. The segmenter is a stand-in of fixed cost (it sleeps
``--cost`` seconds, then labels the image by position), so the figures measure
the job runner, the store and the pipeline's own work (reading the series,
writing SEG, SR, PDF), not a model. Every study is sent (DCMTK storescu) once
all runners are ready; the clock runs from the first study sent to the last job
done, and each job's own time (claimed to finished) is reported too.

usage:
  .venv/bin/python benchmarks/workers.py                    # 12 studies, 5 s each, 1/2/4 workers + SQLite
  .venv/bin/python benchmarks/workers.py --studies 16 --cost 5 --workers 1 2
"""
from __future__ import annotations

import argparse
import os
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(REPO)]

from tests.output_fixtures import PartitionSegmenter, region_labels, write_ct_series  # noqa: E402

COST_S = float(os.environ.get("LOBEVOL_BENCH_COST_S", "3"))


class SleepSegmenter(PartitionSegmenter):
    """A model of fixed cost: sleeps (the environment's LOBEVOL_BENCH_COST_S seconds), then labels by position."""

    def segment(self, image):
        time.sleep(COST_S)
        return super().segment(image)


def run_configuration(label: str, database: str, workers: int, studies: list[list[Path]], work: Path,
                      cost_s: float) -> dict:
    from node.service.jobs import JobStore
    from tests.node_peers import free_port, storescu, wait_for, write_node_config

    port = free_port()
    config = write_node_config(work, port=port, pacs_port=free_port(), stability_s=0.5)
    text = config.read_text().replace("database = jobs.sqlite", f"database = {database}")
    config.write_text(text.replace("may_receive = yes", "may_receive = no"))  # results stay in the folder
    environment = {**os.environ, "LOBEVOL_BENCH_COST_S": str(cost_s)}
    command = [sys.executable, "-m", "tests.stand_in_node", "benchmarks.workers:SleepSegmenter"]
    processes = []

    def start(name: str, *arguments: str) -> None:
        processes.append(subprocess.Popen([*command, *arguments, "--config", str(config)], cwd=REPO, env=environment,
                                          stdout=open(work / f"{name}.log", "ab"), stderr=subprocess.STDOUT))

    store = JobStore(database if database.startswith("postgresql://") else work / database)
    try:
        start("receiver", "serve", *(["--receive-only"] if workers else []))
        for n in range(workers):
            start(f"w{n}", "worker", "--name", f"w{n}")
        runners = max(workers, 1)
        wait_for(lambda: sum("idle" in w.activity for w in store.workers()[1]) == runners, 120, "the runners")
        started = time.monotonic()
        for files in studies:
            storescu(port, files)
        wait_for(lambda: len([j for j in store.jobs(limit=1000) if j.state == "done"]) == len(studies), 600,
                 "every study")
        wall = time.monotonic() - started
        jobs = store.jobs(limit=1000)
        per_job = [j.finished_at - j.claimed_at for j in jobs if j.finished_at and j.claimed_at]
        # The runners' own window: the first claim to the last finish (the store's times), without the sending.
        elapsed = max(j.finished_at for j in jobs) - min(j.claimed_at for j in jobs)
    finally:
        for process in processes:
            process.send_signal(signal.SIGTERM)
        for process in processes:
            process.wait(60)
    return {"label": label, "workers": workers or 1, "elapsed_s": elapsed, "wall_s": wall,
            "per_minute": len(studies) / elapsed * 60, "job_s": statistics.median(per_job)}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--studies", type=int, default=12)
    parser.add_argument("--cost", type=float, default=5.0, help="seconds the stand-in model takes per study")
    parser.add_argument("--workers", type=int, nargs="+", default=[1, 2, 4])
    args = parser.parse_args()
    from tests.postgres import PostgresServer

    root = Path(tempfile.mkdtemp(prefix="lobevol-bench-workers-"))
    studies = [write_ct_series(root / "studies" / f"s{n}", region_labels((20, 32, 32))) for n in range(args.studies)]
    server = PostgresServer().init().start()
    rows = []
    try:
        rows.append(run_configuration("SQLite, one lobevol serve", "jobs.sqlite", 0, studies, root / "sqlite",
                                      args.cost))
        for count in args.workers:
            rows.append(run_configuration(f"PostgreSQL, {count} lobevol worker(s)", server.new_database(), count,
                                          studies, root / f"pg{count}", args.cost))
    finally:
        server.remove()
    print(f"{args.studies} studies of 20 x 32 x 32, stand-in model of {args.cost:g} s, on {os.cpu_count()} CPU(s)")
    print("elapsed: the first claim to the last finish; wall: the first study sent to the last done")
    print(f"{'configuration':<36} {'elapsed':>9} {'studies/min':>12} {'speed-up':>9} {'job (median)':>13} "
          f"{'wall':>7}")
    single = next((r for r in rows if r["label"].startswith("PostgreSQL, 1 ")), rows[0])
    for row in rows:
        print(f"{row['label']:<36} {row['elapsed_s']:>8.1f}s {row['per_minute']:>12.1f} "
              f"{row['per_minute'] / single['per_minute']:>8.2f}x {row['job_s']:>12.1f}s {row['wall_s']:>6.1f}s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
