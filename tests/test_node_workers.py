"""Several machines' worth of node on one shared PostgreSQL job store (started by the tests), with faults.

A receiver (``lobevol serve --receive-only``) and two ``lobevol worker``
processes share one PostgreSQL store and the spool and results folders, as
they would across machines; the PACS (:class:`tests.node_peers.CountingSCP`)
counts every C-STORE. Faults: a worker killed with -9 mid-job (three times), a
study that kills every worker that takes it (poison), a worker frozen (SIGSTOP)
past its lease then resumed, PostgreSQL stopped while instances arrive and
while a worker analyses. Every study must end with exactly one result set.
"""
from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from collections import Counter
from pathlib import Path

import pydicom
import pytest

from node.config import RemoteAE, load_config
from node.service.jobs import JobStore, StoreUnavailable
from node.service.scu import store_files
from tests.node_peers import CountingSCP, free_port, storescu, wait_for, write_node_config
from tests.output_fixtures import PartitionSegmenter, region_labels, write_ct_series

pytestmark = pytest.mark.integration
pytest_plugins = ("tests.postgres",)  # fixture: postgres
REPO = Path(__file__).resolve().parents[1]
SEG = "1.2.840.10008.5.1.4.1.1.66.4"
LEASE_S = 2


class SlowSegmenter(PartitionSegmenter):
    """A fixed-cost stand-in: long enough to kill, freeze or cut off a worker mid-job."""

    def segment(self, image):
        time.sleep(3)
        return super().segment(image)


class PoisonSegmenter(SlowSegmenter):
    """Kills its own process on a study of 24 slices (a poison study); analyses the others."""

    def segment(self, image):
        if image.GetSize()[2] == 24:
            os.kill(os.getpid(), signal.SIGKILL)
        return super().segment(image)


def _studies(folder: Path, count: int, slices: int = 20) -> list[list[Path]]:
    return [write_ct_series(folder / f"s{n}", region_labels((slices, 32, 32))) for n in range(count)]


class Site:
    """A receiver and workers sharing a fresh PostgreSQL database and folders, sending to ``pacs``."""

    def __init__(self, folder: Path, url: str, pacs: CountingSCP, segmenter: str):
        self.folder, self.segmenter = folder, segmenter
        self.config = write_node_config(folder, port=free_port(), pacs_port=pacs.port)
        self.config.write_text(self.config.read_text().replace(
            "database = jobs.sqlite", f"database = {url}\nlease_s = {LEASE_S}").replace(
            "shutdown_grace_s = 30", "shutdown_grace_s = 1"))
        self.port = load_config(self.config).node.port
        self.store = JobStore(url)
        self.processes: dict[str, subprocess.Popen] = {}

    def start(self, name: str, *arguments: str) -> subprocess.Popen:
        log = open(self.folder / f"{name}.log", "ab")
        process = subprocess.Popen([sys.executable, "-m", "tests.stand_in_node", self.segmenter, "-v", *arguments,
                                    "--config", str(self.config)], cwd=REPO, stdout=log, stderr=subprocess.STDOUT,
                                   start_new_session=True)
        self.processes[name] = process
        return process

    def receiver(self) -> None:
        import socket

        process = self.start("receiver", "serve", "--receive-only")

        def listening() -> bool:
            assert process.poll() is None, self.log("receiver")
            with socket.socket() as probe:
                return probe.connect_ex(("127.0.0.1", self.port)) == 0

        wait_for(listening, 60, "the receiver to listen")

    def worker(self, name: str) -> subprocess.Popen:
        process = self.start(name, "worker", "--name", name)
        wait_for(lambda: any(w.name == name and "idle" in w.activity for w in self.store.workers()[1]), 60,
                 f"worker {name} to be ready")
        return process

    def log(self, name: str) -> str:
        return (self.folder / f"{name}.log").read_text(errors="replace")[-3000:]

    def holder(self, files: list[Path] | None = None) -> str | None:
        """The worker holding the job of the study of ``files`` (default: any job)."""
        study = pydicom.dcmread(files[0]).StudyInstanceUID if files else None
        try:
            held = [j for j in self.store.holders() if study in (None, j.study_uid)]
        except StoreUnavailable:  # our own connection did not survive a server restart: the next one will
            return None
        return held[0].lease_owner if held else None

    def stop(self) -> None:
        for process in self.processes.values():
            if process.poll() is None:
                os.kill(process.pid, signal.SIGCONT)
                process.terminate()
        for process in self.processes.values():
            try:
                process.wait(30)
            except subprocess.TimeoutExpired:
                process.kill()

    def all_final(self, count: int) -> bool:
        try:
            jobs = self.store.jobs(limit=1000)
        except StoreUnavailable:
            return False
        return len(jobs) >= count and all(j.state in ("done", "failed", "skipped") for j in jobs)


def segs(pacs: CountingSCP) -> int:
    """Distinct SEG objects the PACS holds (a re-sent one, same UID, counts once)."""
    return len({uid for objects in pacs.by_study().values() for sop_class, uid in objects if sop_class == SEG})


def one_result_set_each(pacs: CountingSCP, studies: list[list[Path]]) -> int:
    """Each study got one result set: one SEG (one SOP Instance UID), every object from one analysis.

    Returns the C-STOREs repeated with the same SOP Instance UID: a sender killed
    between the PACS's answer and its commit sends that object again (at least
    once, the same UID: the PACS keeps one copy); a second *set* would carry new UIDs.
    """
    by_study = pacs.by_study()
    for files in studies:
        uid = pydicom.dcmread(files[0]).StudyInstanceUID
        objects = set(by_study.get(uid, []))
        assert Counter(sop_class for sop_class, _ in objects)[SEG] == 1, (uid, objects)
        assert len(objects) == 3, objects  # SEG, SR, PDF of one analysis (overlays off)
    return sum(n - 1 for n in pacs.counts().values())


@pytest.fixture
def site(tmp_path, postgres, request):
    sites = []

    def make(pacs: CountingSCP, segmenter: str = "tests.test_node_workers:SlowSegmenter") -> Site:
        made = Site(tmp_path / "site", postgres.new_database(), pacs, segmenter)
        sites.append(made)
        return made

    yield make
    for made in sites:
        made.stop()


def test_two_workers_and_kill_9_of_the_one_holding_a_job_three_times(tmp_path, site):
    studies = _studies(tmp_path / "studies", 3)
    with CountingSCP() as pacs:
        node = site(pacs)
        node.receiver()
        for name in ("w1", "w2"):
            node.worker(name)
        for files in studies:
            storescu(node.port, files)
            holder = wait_for(lambda: node.holder(files), 60, "a worker to take the study")
            node.processes[holder].kill()  # kill -9 mid-job; its worker process exits with it
            node.processes[holder].wait(10)
            node.worker(holder)  # restarted (a systemd Restart=), under the same name
        wait_for(lambda: node.all_final(3), 120, "every study to end")
        jobs = node.store.jobs()
        assert [j.state for j in jobs] == ["done"] * 3, [(j.state, j.reason) for j in jobs]
        wait_for(lambda: segs(pacs) == 3, 30, "delivery")
        one_result_set_each(pacs, studies)
        assert all(j.attempts >= 2 for j in jobs), [(j.attempts, j.crashes) for j in jobs]  # taken over or back


def test_a_poison_study_fails_after_three_crashes_and_the_others_are_analysed(tmp_path, site):
    poison = write_ct_series(tmp_path / "poison", region_labels((24, 32, 32)))
    healthy = _studies(tmp_path / "studies", 2)
    with CountingSCP() as pacs:
        node = site(pacs, "tests.test_node_workers:PoisonSegmenter")
        node.receiver()
        for name in ("w1", "w2"):
            node.worker(name)
        for files in (poison, *healthy):
            storescu(node.port, files)
        wait_for(lambda: node.all_final(3), 120, "every study to end")
        states = {j.study_uid: j for j in node.store.jobs()}
        failed = states[pydicom.dcmread(poison[0]).StudyInstanceUID]
        assert failed.state == "failed" and failed.crashes == 3 and "crashed 3 times" in failed.reason
        assert sorted(j.state for j in states.values()) == ["done", "done", "failed"]
        wait_for(lambda: segs(pacs) == 2, 30, "delivery")
        one_result_set_each(pacs, healthy)


def test_a_worker_frozen_past_its_lease_loses_the_job_and_its_finish_is_refused(tmp_path, site):
    (files,) = _studies(tmp_path / "studies", 1)
    with CountingSCP() as pacs:
        node = site(pacs)
        node.receiver()
        for name in ("w1", "w2"):
            node.worker(name)
        storescu(node.port, files)
        frozen = wait_for(node.holder, 60, "a worker to take the study")
        os.kill(node.processes[frozen].pid, signal.SIGSTOP)  # the runner only: its worker process goes on
        try:
            wait_for(lambda: node.store.jobs()[0].state == "done", 60, "the other worker to take over and finish")
            wait_for(lambda: "NOT RUNNING" in _status(node), 30, "status to show the frozen worker not running")
        finally:
            os.kill(node.processes[frozen].pid, signal.SIGCONT)
        wait_for(lambda: "no longer held by this worker" in node.log(frozen), 30, "the frozen worker's finish refused")
        job = node.store.jobs()[0]
        assert job.crashes == 1 and job.attempts == 2
        time.sleep(2)
        one_result_set_each(pacs, [files])


def _status(node: Site) -> str:
    return subprocess.run([sys.executable, "-m", "node.cli", "status", "--config", str(node.config)], cwd=REPO,
                          capture_output=True, text=True, timeout=60).stdout


def test_postgresql_stopped_while_instances_arrive_and_while_a_worker_runs(tmp_path, site, postgres):
    first, second = _studies(tmp_path / "studies", 2)
    with CountingSCP() as pacs:
        node = site(pacs)
        node.receiver()
        node.worker("w1")
        to_node = RemoteAE("LOBEVOL", "127.0.0.1", node.port)
        assert [r.outcome for r in store_files(to_node, first[:10], "PACS")] == ["sent"] * 10
        postgres.stop()
        try:
            refused = store_files(to_node, first[10:], "PACS")
            assert [r.outcome for r in refused] == ["retry"] * 10, refused  # 0xA700: nothing acknowledged is lost
        finally:
            postgres.start()
        assert [r.outcome for r in store_files(to_node, first[10:], "PACS")] == ["sent"] * 10
        wait_for(lambda: node.holder(), 60, "the worker to take the study")
        postgres.stop()  # while the worker analyses: it cannot renew, finish or claim; it waits
        time.sleep(5)
        postgres.start()
        storescu(node.port, second)
        wait_for(lambda: node.all_final(2), 120, "both studies to end")
        jobs = node.store.jobs()
        assert [j.state for j in jobs] == ["done", "done"], [(j.state, j.reason) for j in jobs]
        assert sorted(j.instances for j in jobs) == [20, 20]
        wait_for(lambda: segs(pacs) == 2, 30, "delivery")
        one_result_set_each(pacs, [first, second])


def test_a_cohort_queued_for_the_workers_is_collected_and_resumes_without_redoing(tmp_path):
    studies = _studies(tmp_path / "cohort", 2)
    config = write_node_config(tmp_path / "node", port=free_port(), pacs_port=free_port())
    worker = subprocess.Popen([sys.executable, "-m", "tests.stand_in_node", "tests.output_fixtures:PartitionSegmenter",
                               "worker", "--config", str(config)], cwd=REPO, stdout=subprocess.DEVNULL,
                              stderr=subprocess.STDOUT, start_new_session=True)
    store = JobStore(load_config(config).storage.database)
    try:
        command = [sys.executable, "-m", "node.cli", "segment", str(tmp_path / "cohort"), "--queue", "--config",
                   str(config), "--out", str(tmp_path / "out")]
        first = subprocess.run(command, cwd=REPO, capture_output=True, text=True, timeout=180)
        assert first.returncode == 0, first.stderr[-2000:]
        assert "volumes of 2 of 2 studies" in first.stdout
        rows = (tmp_path / "out" / "volumes.csv").read_text().splitlines()
        assert len(rows) == 3 and rows[0].startswith("id,sex,age_years")
        for files in studies:
            assert (tmp_path / "out" / pydicom.dcmread(files[0]).StudyInstanceUID / "seg.dcm").is_file()
        again = subprocess.run(command, cwd=REPO, capture_output=True, text=True, timeout=60)
        assert again.returncode == 0 and "volumes of 2 of 2 studies" in again.stdout
        jobs = store.jobs()
        assert len(jobs) == 2 and all(j.state == "done" and j.attempts == 1 for j in jobs)  # nothing redone
        assert all("results stay in the results folder" in j.reason for j in jobs)
    finally:
        worker.terminate()
        worker.wait(30)


def test_a_study_received_by_two_receivers_is_analysed_once(tmp_path, site):
    (files,) = _studies(tmp_path / "studies", 1)
    with CountingSCP() as pacs:
        node = site(pacs)
        node.receiver()
        second = node.folder / "second.ini"  # the same store and folders, another port (another machine)
        second_port = free_port()
        second.write_text(node.config.read_text().replace(f"port = {node.port}\n", f"port = {second_port}\n", 1))
        log = open(node.folder / "second.log", "ab")
        node.processes["second"] = subprocess.Popen(
            [sys.executable, "-m", "tests.stand_in_node", node.segmenter, "-v", "serve", "--receive-only", "--config",
             str(second)], cwd=REPO, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
        node.worker("w1")
        wait_for(lambda: _listening(second_port), 60, "the second receiver")
        to_first, to_second = (RemoteAE("LOBEVOL", "127.0.0.1", p) for p in (node.port, second_port))
        assert {r.outcome for r in store_files(to_first, files[::2], "PACS")} == {"sent"}
        assert {r.outcome for r in store_files(to_second, files[1::2], "PACS")} == {"sent"}
        wait_for(lambda: node.all_final(1) and segs(pacs) == 1, 60, "the study's one analysis and delivery")
        (job,) = node.store.jobs()
        assert (job.state, job.instances) == ("done", len(files))
        one_result_set_each(pacs, [files])


def _listening(port: int) -> bool:
    import socket

    with socket.socket() as probe:
        return probe.connect_ex(("127.0.0.1", port)) == 0
