"""lobevol inside Orthanc (the Python plugin) on a full-size phantom series, with the bundled model.

Uploads one phantom series (default 512 x 512 x 300) to Orthanc over REST and prints
the time from the last instance to the results stored in Orthanc's study (StableAge
excluded), split into fetching the study from Orthanc, the analysis and storing the
results; and memory: Orthanc's resident memory without the plugin (idle, and its peak
receiving the same series and result objects), with it loaded (idle), and the peaks
(VmHWM) of Orthanc and of the worker process during the run.

usage:
  .venv/bin/python benchmarks/orthanc_plugin.py                   # 512 x 512 x 300, bundled model
  .venv/bin/python benchmarks/orthanc_plugin.py --matrix 256 --slices 120 --threads 1
"""
from __future__ import annotations

import argparse
import json
import shutil
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(REPO), str(REPO / "benchmarks")]

from node_roundtrip import children, peak_memory_bytes, write_phantom_series  # noqa: E402


def resident_bytes(pid: int) -> int:
    """VmRSS of a process, in bytes."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) * 1024
    return 0


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--matrix", type=int, default=512)
    parser.add_argument("--slices", type=int, default=300)
    parser.add_argument("--seed", type=int, default=2025)
    parser.add_argument("--stable-age", type=int, default=2, help="Orthanc's StableAge for the run (s)")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--keep", action="store_true", help="keep the temporary folder")
    args = parser.parse_args()
    from node.cli.orthanc import orthanc_configuration
    from tests.node_peers import Orthanc, wait_for

    work = Path(tempfile.mkdtemp(prefix="lobevol-orthanc-bench-"))
    print(f"working in {work}")
    started = time.monotonic()
    files = write_phantom_series(work / "series", args.matrix, args.slices, args.seed)
    print(f"phantom: {len(files)} files of {args.matrix} x {args.matrix} in {time.monotonic() - started:.0f} s")
    config = work / "config.ini"
    config.write_text(f"[storage]\nspool = spool\nresults = results\ndatabase = jobs.sqlite\n"
                      f"[inference]\ndevice = auto\nthreads = {args.threads}\n")

    settings = orthanc_configuration(work / "orthanc", config, http_port=0, dicom_port=0, aet="PACS",
                                     stable_age_s=args.stable_age)
    orthanc = Orthanc(work / "orthanc", extra={k: v for k, v in settings.items()
                                               if k not in ("HttpPort", "DicomPort", "StorageDirectory",
                                                            "IndexDirectory")})
    orthanc.start()
    try:
        wait_for(lambda: "worker ready" in orthanc.log_text(), 300, "the worker's model", 0.5)
        idle_rss = resident_bytes(orthanc.process.pid)
        peaks: dict[int, int] = {}
        sent = time.monotonic()
        for path in files:
            orthanc.upload(path)
        last_instance = time.time()
        print(f"uploaded {len(files)} instances over REST in {time.monotonic() - sent:.1f} s")

        def finished():
            for pid in [orthanc.process.pid, *children(orthanc.process.pid)]:
                peaks[pid] = max(peaks.get(pid, 0), peak_memory_bytes(pid))
            jobs = orthanc.get("/lobevol/jobs")["jobs"]
            return jobs if jobs and jobs[-1]["state"] in ("done", "skipped", "failed") else None

        job = wait_for(finished, 1200, "the job to end", 0.5)[-1]
        if job["state"] != "done":
            raise SystemExit(f"job {job['state']}: {job['reason']}")
        history = {h["state"]: h["at"] for h in orthanc.get(f"/lobevol/jobs/{job['id']}")["history"]}
        after_last = job["finished_at"] - last_instance
        print(f"results stored in Orthanc {after_last:.1f} s after the last instance, "
              f"{after_last - args.stable_age:.1f} s without the {args.stable_age:g} s StableAge "
              f"(stable event to job {history['selected'] - last_instance - args.stable_age:.1f} s, fetch "
              f"{history['processing'] - history['selected']:.1f} s, analysis "
              f"{history['sending'] - history['processing']:.1f} s, storing {history['done'] - history['sending']:.1f} s)")
        print(f"  {job['summary']}")
        stored = json.loads(urllib.request.urlopen(orthanc.url(f"/studies/{job['orthanc_study']}/series")).read())
        print("  series in the study: " + ", ".join(sorted(s["MainDicomTags"]["Modality"] for s in stored)))
        orthanc_pid = orthanc.process.pid
        worker = max((p for p in peaks if p != orthanc_pid), key=lambda p: peaks[p], default=None)
        results = sorted((work / "results" / str(job["id"])).glob("*.dcm"))
    finally:
        orthanc.stop()
    try:
        plain = Orthanc(work / "plain").start()  # Orthanc without the plugin, receiving the same objects
        time.sleep(2)
        plain_rss = resident_bytes(plain.process.pid)
        for path in [*files, *results]:
            plain.upload(path)
        plain_peak = peak_memory_bytes(plain.process.pid)
        plain.stop()
        print(f"memory: Orthanc without the plugin {plain_rss / 2**20:.0f} MiB resident idle, peak "
              f"{plain_peak / 2**30:.2f} GiB receiving the series and the {len(results)} result objects; with the "
              f"plugin loaded {idle_rss / 2**20:.0f} MiB idle, peaks during the run: Orthanc "
              f"{peaks[orthanc_pid] / 2**30:.2f} GiB, worker {peaks.get(worker, 0) / 2**30:.2f} GiB")
    finally:
        if not args.keep:
            shutil.rmtree(work, ignore_errors=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
