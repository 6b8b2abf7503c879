"""A node an administrator can leave running (issue 29's job life-cycle rows), with the real node and real peers.

- Ctrl-C (SIGINT to the process group) and ``systemctl stop`` (SIGTERM to the
  control group) during an analysis are a stop, not a crash;
- the SQLite database locked by another process (``BEGIN EXCLUSIVE``), or on a
  full disk: instances are refused transiently (0xA7xx), the analysis loop and
  the finish retry, one study stays one job, nothing fails or sticks;
- a PACS that accepts and never answers does not hold a stop;
- ``lobevol status | head`` is quiet.
"""
from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pydicom
import pytest

from node.config import RemoteAE, load_config
from node.service import jobs as jobs_module
from node.service.jobs import JobStore
from node.service.scu import store_files
from node.service.server import Node
from tests.node_peers import CountingSCP, StoreSCP, free_port, storescu, wait_for, write_node_config
from tests.output_fixtures import PartitionSegmenter, region_labels, write_ct_series

pytestmark = pytest.mark.integration
REPO = Path(__file__).resolve().parents[1]


class SlowSegmenter(PartitionSegmenter):
    """The stand-in, slow enough to stop the node, lock or fill its database while it computes."""

    def segment(self, image):
        time.sleep(3)
        return super().segment(image)


@pytest.fixture(scope="module")
def study(tmp_path_factory) -> list[Path]:
    return write_ct_series(tmp_path_factory.mktemp("study") / "ct", region_labels((20, 32, 32)))


@pytest.fixture(scope="module")
def other_study(tmp_path_factory) -> list[Path]:
    return write_ct_series(tmp_path_factory.mktemp("other") / "ct", region_labels((20, 32, 32)))


def start_serve(config: Path, log: Path, segmenter: str = "tests.test_node_lifecycle:SlowSegmenter"):
    """``lobevol serve`` in its own process group (as a terminal or systemd would run it), once it listens."""
    import socket

    process = subprocess.Popen([sys.executable, "-m", "tests.stand_in_node", segmenter, "-v", "serve", "--config",
                                str(config)], cwd=REPO, stdout=open(log, "ab"), stderr=subprocess.STDOUT,
                               start_new_session=True)
    port = load_config(config).node.port

    def listening() -> bool:
        if process.poll() is not None:
            raise AssertionError(f"lobevol serve exited {process.returncode}: {log.read_text()[-3000:]}")
        with socket.socket() as probe:
            return probe.connect_ex(("127.0.0.1", port)) == 0

    wait_for(listening, 60, "lobevol serve to listen")
    return process


def lobevol(*arguments: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "node.cli", *arguments], cwd=REPO, capture_output=True, text=True,
                          timeout=60)


def test_ctrl_c_and_systemctl_stop_during_an_analysis_are_a_stop_not_a_crash(tmp_path, study):
    with StoreSCP(tmp_path / "pacs") as pacs:
        config = write_node_config(tmp_path / "node", port=free_port(), pacs_port=pacs.port)
        config.write_text(config.read_text().replace("shutdown_grace_s = 30", "shutdown_grace_s = 0.5"))
        store = JobStore(load_config(config).storage.database)
        log = tmp_path / "serve.log"
        for n, signum in enumerate((signal.SIGINT, signal.SIGINT, signal.SIGTERM)):
            process = start_serve(config, log)
            if n == 0:
                storescu(load_config(config).node.port, study)
            wait_for(lambda: store.counts().get("processing"), 60, "the analysis to run")
            os.killpg(process.pid, signum)  # the whole group: the node and its worker process
            assert process.wait(20) == 0
            job = store.get(1)
            assert (job.state, job.crashes) == ("selected", 0) and "checkpointed at shutdown" in job.reason, job
        assert "stopped" in lobevol("status", "--config", str(config)).stdout
        process = start_serve(config, log)
        try:
            wait_for(lambda: store.get(1).state == "done", 60, "the analysis to run again and finish")
        finally:
            process.terminate()
            process.wait(20)
        job = store.get(1)
        assert (job.crashes, job.attempts) == (0, 4)
        assert "Traceback" not in log.read_text() and "KeyboardInterrupt" not in log.read_text()
        assert sum(ds.Modality == "SEG" for ds in pacs.received()) == 1


LOCK = """
import sqlite3, sys, time
db = sqlite3.connect(sys.argv[1], isolation_level=None)
db.execute("BEGIN EXCLUSIVE")
print("locked", flush=True)
time.sleep(float(sys.argv[2]))
db.execute("COMMIT")
"""


def test_a_database_locked_by_another_process_delays_but_never_fails_a_study(tmp_path, study, other_study,
                                                                             monkeypatch):
    monkeypatch.setattr(jobs_module._SQLite, "busy_timeout_s", 1.0)  # the 30 s default, shortened to keep it fast
    with StoreSCP(tmp_path / "pacs") as pacs:
        config = load_config(write_node_config(tmp_path / "node", port=free_port(), pacs_port=pacs.port))
        node = Node(config, SlowSegmenter)
        node.start()
        try:
            storescu(node.port, study)
            wait_for(lambda: node.jobs.counts().get("processing"), 60, "the analysis to run")
            locker = subprocess.Popen([sys.executable, "-c", LOCK, str(config.storage.database), "6"],
                                      stdout=subprocess.PIPE, text=True)
            assert locker.stdout.readline().strip() == "locked"
            # Meanwhile the analysis ends (its finish cannot commit) and another study starts arriving.
            refused = store_files(RemoteAE("LOBEVOL", "127.0.0.1", node.port), other_study[:2], "PACS")
            assert [r.outcome for r in refused] == ["retry", "retry"], refused  # 0xA700: send again later
            assert locker.wait(20) == 0
            storescu(node.port, other_study)
            wait_for(lambda: node.jobs.counts().get("done") == 2, 60, "both studies to be done")
        finally:
            node.stop()
        jobs = node.jobs.jobs()
        assert len(jobs) == 2 and {j.study_uid for j in jobs} == {pydicom.dcmread(p).StudyInstanceUID
                                                               for p in (study[0], other_study[0])}
        assert all(j.state == "done" and j.crashes == 0 for j in jobs)
        first = node.jobs.get(1)
        assert [state for _, state, _ in node.jobs.events(1)] == ["received", "selected", "processing", "sending",
                                                                  "done"], node.jobs.events(1)
        assert first.attempts == 1
    assert sum(ds.Modality == "SEG" for ds in pacs.received()) == 2


@pytest.fixture
def small_disk(tmp_path):
    """A 16 MiB tmpfs mounted for the test (root: CI and this machine run the tests as root); larger than the
    receiver's free-space reserve for the job database (node.service.spool.DISK_RESERVE_BYTES), so instances are
    accepted until the test fills it."""
    if os.geteuid() != 0:
        pytest.fail("the full-disk test mounts a tmpfs: run the tests as root (as CI does)")
    folder = tmp_path / "small"
    folder.mkdir()
    subprocess.run(["mount", "-t", "tmpfs", "-o", "size=16m", "tmpfs", str(folder)], check=True)
    yield folder
    subprocess.run(["umount", "-l", str(folder)], check=False)


def _fill(folder: Path) -> Path:
    filler = folder / "filler"
    with open(filler, "wb") as handle:
        try:
            while True:
                handle.write(b"\0" * 65536)
                handle.flush()
        except OSError:
            pass
    return filler


def test_a_job_that_cannot_commit_on_a_full_disk_retries_and_never_sticks(tmp_path, study, other_study, small_disk):
    with StoreSCP(tmp_path / "pacs") as pacs:
        path = write_node_config(tmp_path / "node", port=free_port(), pacs_port=pacs.port)
        path.write_text(path.read_text().replace("database = jobs.sqlite", f"database = {small_disk / 'jobs.sqlite'}"))
        node = Node(load_config(path), SlowSegmenter)
        node.start()
        try:
            storescu(node.port, study)
            wait_for(lambda: node.jobs.counts().get("processing"), 60, "the analysis to run")
            filler = _fill(small_disk)
            refused = store_files(RemoteAE("LOBEVOL", "127.0.0.1", node.port), other_study[:1], "PACS")
            assert [r.outcome for r in refused] == ["retry"], refused  # 0xA700 while the database cannot grow
            time.sleep(5)  # the analysis has ended; its outcome cannot be committed
            assert node.jobs.get(1).state == "processing" and node.runner.running
            filler.unlink()
            wait_for(lambda: node.jobs.get(1).state == "done", 60, "the outcome to be committed and sent")
        finally:
            node.stop()
        assert "failed" not in [state for _, state, _ in node.jobs.events(1)]
    assert sum(ds.Modality == "SEG" for ds in pacs.received()) == 1


def test_a_pacs_that_never_answers_does_not_hold_the_stop(tmp_path, study):
    def hang(dataset, receipts):
        time.sleep(120)  # accepts the C-STORE and never answers

    with CountingSCP(on_store=hang) as pacs:
        config = write_node_config(tmp_path / "node", port=free_port(), pacs_port=pacs.port)
        store = JobStore(load_config(config).storage.database)
        process = start_serve(config, tmp_path / "serve.log", "tests.output_fixtures:PartitionSegmenter")
        storescu(load_config(config).node.port, study)
        wait_for(lambda: pacs.receipts, 60, "the first result to reach the PACS")
        stopping = time.monotonic()
        process.send_signal(signal.SIGTERM)
        assert process.wait(30) == 0
        assert time.monotonic() - stopping < 10
        items = store.outbox(1)
        assert store.get(1).state == "sending" and items and all(i.state == "pending" for i in items), items
        assert all(i.attempts == 0 for i in items)  # a delivery our stop ended is not a failed attempt


def test_status_piped_into_head_is_quiet(tmp_path):
    from node.service.jobs import ReceivedInstance

    config = tmp_path / "node.ini"
    config.write_text("[storage]\ndatabase = jobs.sqlite\n")
    JobStore(tmp_path / "jobs.sqlite").record_instances(
        [ReceivedInstance(f"1.2.{n}", f"1.2.{n}.1", "1.2.840.10008.5.1.4.1.1.2", f"1.2.{n}.1.1", "/x", 1, "CT")
         for n in range(3000)])
    status = subprocess.Popen([sys.executable, "-m", "node.cli", "status", "--config", str(config), "--limit", "3000"],
                              cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    head = subprocess.run(["head", "-n", "2"], stdin=status.stdout, capture_output=True, text=True)
    status.stdout.close()
    assert status.wait(60) == 0
    assert head.stdout.count("\n") == 2 and status.stderr.read() == b""
