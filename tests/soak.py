"""A kill -9 soak of `lobevol serve`: studies sent while the node or its worker is killed at random points.

Each round sends one new study and kills, with SIGKILL, at one of:
  receiving   the node, after 1..n-1 of the study's instances were acknowledged on an
              open association (the sender then sends the whole study again, as a PACS
              does after a failure);
  stability   the node, during the stability wait (the study complete, not yet selected);
  analysing   the node or its worker process (in turn), while the job is processing;
  sending     the node, from inside the PACS's C-STORE handler of the study's k-th result
              object (stored, not yet acknowledged);
and, in every third round, the PACS is down when the results are ready and comes
back 0.5-2 s later. The PACS is a :class:`tests.node_peers.CountingSCP`: every C-STORE counts,
re-sends of one SOP Instance UID included.

At the end every study whose instances the node acknowledged must hold exactly
one set of results in the PACS (one SEG, one SR, one Encapsulated PDF: the
outbox's objects of the study's one job), each object received once, or twice
when the node was killed with it in flight. A study is:
  lost        when its set is incomplete;
  duplicated  when the PACS got more than one set (objects of another analysis, or
              more than one job) or an object more often than the kills in flight allow;
  stuck       when its job did not end as done in time.

``tests/test_node_soak.py`` runs a few rounds in the suite; ``benchmarks/soak.py``
runs 20 or more and prints the figures.
"""
from __future__ import annotations

import os
import random
import signal
import subprocess
import threading
import time
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

from pydicom.uid import EncapsulatedPDFStorage, SegmentationStorage

from node.config import load_config
from node.service.jobs import JobStore
from tests.node_peers import CountingSCP, free_port, serve, storescu, wait_for, write_node_config
from tests.output_fixtures import PartitionSegmenter, region_labels, write_ct_series

COMPREHENSIVE_3D_SR = "1.2.840.10008.5.1.4.1.1.88.34"
RESULT_CLASSES = (SegmentationStorage, COMPREHENSIVE_3D_SR, EncapsulatedPDFStorage)
POINTS = ("receiving", "stability", "analysing", "sending")
STABILITY_S = 1.0
JOB_TIMEOUT_S = 90.0


class SlowPartitionSegmenter(PartitionSegmenter):
    """The model-free stand-in, taking 0.5 s more per study: a kill while analysing has a window to land in."""

    def segment(self, image):
        time.sleep(0.5)
        return super().segment(image)


@dataclass
class SoakReport:
    """What a soak found (study UIDs per finding)."""

    rounds: int = 0
    kills: Counter = field(default_factory=Counter)  # "point/target" -> kills
    pacs_outages: int = 0
    studies: int = 0
    lost: list[str] = field(default_factory=list)
    duplicated: list[str] = field(default_factory=list)
    stuck: list[str] = field(default_factory=list)
    transient_rejections: int = 0  # concurrent senders told to come back later (the association limit)
    resent_same_uid: int = 0  # objects received twice with the same UID (the one in flight at a kill)
    receipts: int = 0  # C-STOREs the PACS answered
    seconds: float = 0.0

    @property
    def ok(self) -> bool:
        return not (self.lost or self.duplicated or self.stuck)

    def summary(self) -> str:
        kills = ", ".join(f"{name} {count}" for name, count in sorted(self.kills.items()))
        return (f"{self.rounds} rounds in {self.seconds:.0f} s; kills: {kills}; PACS down in {self.pacs_outages}; "
                f"{self.studies} acknowledged studies: lost {len(self.lost)}, duplicated {len(self.duplicated)}, "
                f"stuck {len(self.stuck)}; {self.transient_rejections} transient rejection(s) of concurrent senders; "
                f"{self.receipts} C-STOREs at the PACS, {self.resent_same_uid} of them a "
                f"re-send of the object in flight (same UID)")


class Soak:
    """The node, its PACS and the rounds, in ``folder``.

    Args:
        folder: working folder (config, spool, database, studies, logs).
        seed: the random choices (how many instances before a kill, delays, which result object).
        say: where a line per round goes (None: nowhere).
    """

    def __init__(self, folder: Path, seed: int = 0, say: Callable[[str], None] | None = None):
        self.folder, self.random, self.say = Path(folder), random.Random(seed), say or (lambda line: None)
        self.folder.mkdir(parents=True, exist_ok=True)
        self.log = self.folder / "serve.log"
        self.pacs = CountingSCP(on_store=self._on_result)
        self.config_path = write_node_config(
            self.folder / "node", port=free_port(), pacs_port=self.pacs.port, stability_s=STABILITY_S,
            extra="")
        # A long outage must not fail a job: retry every 0.5-2 s, many times.
        text = self.config_path.read_text().replace("max_attempts = 30", "max_attempts = 200")
        self.config_path.write_text(text.replace("[node]\n", "[node]\nmax_associations = 16\n", 1))
        config = load_config(self.config_path)
        self.port = config.node.port
        self.jobs = JobStore(config.storage.database)
        self.node: subprocess.Popen | None = None
        self._kill_at: tuple[str, int] | None = None  # (study, k): kill the node at the study's k-th result
        self._killed_in_flight = threading.Event()
        self.in_flight_kills: Counter = Counter()  # study -> node kills with one of its results in flight
        self.acknowledged: set[str] = set()
        self.report = SoakReport()
        self._lock = threading.Lock()

    # -- the node ----------------------------------------------------------------------------

    def start_node(self) -> None:
        self.node = serve(self.config_path, self.log, "tests.soak:SlowPartitionSegmenter")

    def kill_node(self) -> None:
        os.kill(self.node.pid, signal.SIGKILL)
        self.node.wait(10)

    def worker_pid(self) -> int | None:
        """The node's worker process (its spawned child that is not multiprocessing's resource tracker)."""
        for task in Path(f"/proc/{self.node.pid}/task").glob("*"):
            try:
                children = (task / "children").read_text().split()
            except OSError:
                continue
            for child in map(int, children):
                try:
                    command = Path(f"/proc/{child}/cmdline").read_bytes()
                except OSError:
                    continue
                if b"resource_tracker" not in command:
                    return child
        return None

    # -- the PACS ----------------------------------------------------------------------------

    def _on_result(self, dataset, receipts) -> None:
        if self._kill_at is None:
            return
        study, k = self._kill_at
        if sum(1 for s, _, _ in receipts if s == study) == k:
            self._kill_at = None
            self.in_flight_kills[study] += 1
            os.kill(self.node.pid, signal.SIGKILL)
            self._killed_in_flight.set()

    # -- rounds ------------------------------------------------------------------------------

    def run(self, rounds: int, senders: int = 0) -> SoakReport:
        """``senders`` concurrent studies first (none: 0), then ``rounds`` kill rounds; then the check."""
        started = time.monotonic()
        self.pacs.start()
        self.start_node()
        try:
            if senders:
                self.concurrent_senders(senders)
            for number in range(rounds):
                # Every point as often as the others, the PACS down in every third round (so with
                # each point in turn), the node and the worker killed in turn while analysing.
                point = POINTS[number % len(POINTS)]
                self._round(number, point, pacs_down=number % 3 == 1)
            self._settle()
        finally:
            if self.node is not None and self.node.poll() is None:
                self.node.send_signal(signal.SIGTERM)
                try:
                    self.node.wait(60)
                except subprocess.TimeoutExpired:
                    self.kill_node()
            self.pacs.stop()
        self.report.seconds = time.monotonic() - started
        return self.report

    def _round(self, number: int, point: str, pacs_down: bool) -> None:
        files = write_ct_series(self.folder / "studies" / str(number), region_labels((20, 40, 40)))
        study = _study_uid(files[0])
        target = "node"
        if pacs_down:
            self.pacs.stop()
            self.report.pacs_outages += 1
        if point == "receiving":
            acknowledged = self._send_some_then_kill(files, self.random.randint(1, len(files) - 1))
            if acknowledged:
                self.acknowledged.add(study)
            self.start_node()
            storescu(self.port, files)  # the sender's retry: the whole study again
        else:
            storescu(self.port, files)
        self.acknowledged.add(study)
        if point == "stability":
            time.sleep(self.random.uniform(0.0, 0.8 * STABILITY_S))
            self.kill_node()
            self.start_node()
        elif point == "analysing":
            job = wait_for(lambda: self._job_in(study, ("processing",)), 60, f"round {number}: processing", 0.05)
            time.sleep(self.random.uniform(0.0, 0.3))
            target = ("node", "worker")[number // len(POINTS) % 2]
            if target == "worker":
                pid = self.worker_pid()
                if pid is not None and self.jobs.get(job.id).state == "processing":
                    os.kill(pid, signal.SIGKILL)
                else:
                    target = "worker (missed: analysis over)"
            else:
                self.kill_node()
                self.start_node()
        elif point == "sending":
            self._killed_in_flight.clear()
            self._kill_at = (study, self.random.randint(1, len(RESULT_CLASSES)))
        if pacs_down:
            wait_for(lambda: self._job_in(study, ("sending", "done", "failed", "skipped")), 60,
                     f"round {number}: results waiting", 0.05)
            time.sleep(self.random.uniform(0.5, 2.0))  # the node retries meanwhile
            self.pacs.start()
        if point == "sending":
            wait_for(self._killed_in_flight.is_set, 60, f"round {number}: kill at a result object", 0.05)
            self.start_node()
        self.report.kills[f"{point}/{target}"] += 1
        self.report.rounds += 1
        ended = self._wait_for_end(study)
        self.say(f"round {number + 1}: killed {target} while {point}{', PACS down' if pacs_down else ''}; "
                 f"job {ended.state if ended else 'not ended'}")

    def concurrent_senders(self, senders: int) -> None:
        """``senders`` studies sent at once, each by its own storescu (as many scanners would).

        A sender rejected transiently (the node's association limit) tries again
        after a pause, as a PACS does; the report counts those rejections.
        """
        studies = [write_ct_series(self.folder / "concurrent" / str(n), region_labels((20, 40, 40)))
                   for n in range(senders)]
        failures: list[str] = []
        threads = [threading.Thread(target=self._send_until_accepted, args=(files, failures)) for files in studies]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join()
        if failures:
            raise AssertionError(f"{len(failures)} sender(s) failed: {failures[0]}")
        uids = [_study_uid(files[0]) for files in studies]
        self.acknowledged.update(uids)
        ended = [self._wait_for_end(study) for study in uids]
        self.say(f"{senders} concurrent senders ({self.report.transient_rejections} transient rejection(s) "
                 f"retried): {sum(1 for job in ended if job and job.state == 'done')} job(s) done")

    def _send_until_accepted(self, files: list[Path], failures: list[str]) -> None:
        for _ in range(40):
            result = storescu(self.port, files, check=False)
            if result.returncode == 0:
                return
            if "Rejected Transient" not in result.stderr:
                failures.append(result.stderr[-2000:])
                return
            with self._lock:
                self.report.transient_rejections += 1
            time.sleep(self.random.uniform(0.2, 1.0))
        failures.append("still rejected after 40 tries")

    def _send_some_then_kill(self, files: list[Path], count: int) -> int:
        """Store ``count`` files on one association, then kill the node; returns how many were acknowledged."""
        from pynetdicom import AE
        from pynetdicom.sop_class import CTImageStorage

        ae = AE(ae_title="PACS")
        ae.add_requested_context(CTImageStorage)
        assoc = ae.associate("127.0.0.1", self.port, ae_title="LOBEVOL")
        acknowledged = 0
        if assoc.is_established:
            for path in files[:count]:
                response = assoc.send_c_store(path)
                acknowledged += int(response.get("Status", -1) == 0)
        self.kill_node()
        assoc.abort()
        return acknowledged

    def _job_in(self, study: str, states: tuple[str, ...]):
        return next((job for job in self.jobs.jobs(limit=1000) if job.study_uid == study and job.state in states),
                    None)

    def _wait_for_end(self, study: str):
        deadline = time.monotonic() + JOB_TIMEOUT_S
        while time.monotonic() < deadline:
            job = self._job_in(study, ("done", "failed", "skipped"))
            if job is not None:
                return job
            time.sleep(0.1)
        return None

    # -- the check ---------------------------------------------------------------------------

    def _settle(self) -> None:
        """Judge every acknowledged study (a quiet second first: nothing more may arrive)."""
        time.sleep(1.0)
        by_study = self.pacs.by_study()
        self.report.receipts = len(self.pacs.receipts)
        for study in sorted(self.acknowledged):
            self.report.studies += 1
            jobs = [job for job in self.jobs.jobs(limit=1000) if job.study_uid == study]
            received = by_study.get(study, [])
            counts = Counter(uid for _, uid in received)
            expected = {item.sop_instance_uid for job in jobs for item in self.jobs.outbox(job.id)}
            classes = Counter(sop_class for sop_class, uid in set(received))
            resent = sum(n - 1 for n in counts.values())
            self.report.resent_same_uid += resent
            if len(jobs) != 1 or jobs[0].state != "done":
                self.report.stuck.append(study)
            if (len(jobs) > 1 or set(counts) - expected or any(classes[c] > 1 for c in RESULT_CLASSES)
                    or resent > self.in_flight_kills[study]):
                self.report.duplicated.append(study)
            if any(classes[c] < 1 for c in RESULT_CLASSES):
                self.report.lost.append(study)


def _study_uid(path: Path) -> str:
    import pydicom

    return str(pydicom.dcmread(path, stop_before_pixels=True).StudyInstanceUID)
