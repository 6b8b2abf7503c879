"""The worker process: one model load, crashes and timeouts fail one job, shutdown checkpoints a job."""
from __future__ import annotations

import functools
import os
import signal
import time
from pathlib import Path

import pydicom
import pytest

from node.config import OutputSettings, load_config
from node.pipeline import PipelineSettings
from node.service.server import Node
from node.service.worker import MAX_WORKER_CRASHES, JobRequest, Worker, WorkerCrashed, WorkerStopped
from tests.node_peers import StoreSCP, free_port, storescu, wait_for, write_node_config
from tests.output_fixtures import PartitionSegmenter, region_labels, write_ct_series

SETTINGS = PipelineSettings(outputs=OutputSettings(write_overlays=False))


class CountingSegmenter(PartitionSegmenter):
    """PartitionSegmenter that records each model load (construction) in a file."""

    def __init__(self, loads: str):
        with open(loads, "a") as handle:
            handle.write(f"{os.getpid()}\n")


class SlowSegmenter(PartitionSegmenter):
    def segment(self, image):
        time.sleep(30)
        return super().segment(image)


class CrashingSegmenter(PartitionSegmenter):
    """Dies like a segfault (no Python exception) while a marker file exists, removing it."""

    def __init__(self, marker: str):
        self.marker = Path(marker)

    def segment(self, image):
        if self.marker.exists():
            self.marker.unlink()
            os._exit(11)
        return super().segment(image)


@pytest.fixture(scope="module")
def study_folder(tmp_path_factory) -> Path:
    folder = tmp_path_factory.mktemp("input")
    write_ct_series(folder / "1.2.3", region_labels((20, 32, 32)))
    return folder


def test_one_model_load_for_several_jobs(tmp_path, study_folder):
    loads = tmp_path / "loads.txt"
    worker = Worker(functools.partial(CountingSegmenter, str(loads)), SETTINGS)
    worker.start()
    try:
        for job_id in (1, 2):
            outcome = worker.run(JobRequest(job_id, str(study_folder), str(tmp_path / str(job_id))), 60)
            assert (outcome.job_id, outcome.status) == (job_id, "done"), outcome.reason
            assert {Path(p).name for p in outcome.result_files} == {"seg.dcm", "sr.dcm", "report.dcm"}
    finally:
        worker.stop()
    assert len(loads.read_text().split()) == 1


def test_crash_timeout_and_shutdown(tmp_path, study_folder):
    marker = tmp_path / "crash"
    marker.touch()
    worker = Worker(functools.partial(CrashingSegmenter, str(marker)), SETTINGS)
    worker.start()
    with pytest.raises(WorkerCrashed, match="exit code 11"):
        worker.run(JobRequest(1, str(study_folder), str(tmp_path / "1")), 60)
    assert not worker.alive
    slow = Worker(SlowSegmenter, SETTINGS)
    slow.start()
    with pytest.raises(WorkerCrashed, match="longer than job_timeout_s"):
        slow.run(JobRequest(2, str(study_folder), str(tmp_path / "2")), timeout_s=1.5)
    slow.start()
    started = time.monotonic()
    with pytest.raises(WorkerStopped):
        slow.run(JobRequest(3, str(study_folder), str(tmp_path / "3")), 60, stop_requested=lambda: True, grace_s=0.5)
    assert time.monotonic() - started < 10 and not slow.alive


def test_unloadable_model_is_reported_at_start():
    worker = Worker(functools.partial(CountingSegmenter, "/nonexistent/dir/loads.txt"), SETTINGS)
    with pytest.raises(RuntimeError, match="cannot load the model: FileNotFoundError"):
        worker.start()


class PoisonStudySegmenter(PartitionSegmenter):
    """SIGKILLed on images of exactly ``poison_slices`` slices; analyses every other study."""

    def __init__(self, poison_slices: int):
        self.poison_slices = poison_slices

    def segment(self, image):
        if image.GetSize()[2] == self.poison_slices:
            os.kill(os.getpid(), signal.SIGKILL)
        return super().segment(image)


@pytest.mark.integration
@pytest.mark.slow
def test_a_job_the_worker_crashed_in_is_analysed_again_by_a_new_worker(tmp_path):
    marker = tmp_path / "crash"
    marker.touch()
    study = write_ct_series(tmp_path / "a", region_labels((20, 32, 32)))
    with StoreSCP(tmp_path / "pacs") as pacs:
        config = write_node_config(tmp_path / "node", port=free_port(), pacs_port=pacs.port)
        node = Node(load_config(config), functools.partial(CrashingSegmenter, str(marker)))
        node.start()
        try:
            storescu(node.port, study)
            job = wait_for(lambda: next(iter(node.jobs.jobs(states=["done", "failed"])), None), 90, "the job")
        finally:
            node.stop()
        assert job.state == "done", job.reason
        assert (job.crashes, job.attempts) == (1, 2)
        messages = [message for _, _, message in node.jobs.events(job.id)]
        assert any("worker process ended unexpectedly (exit code 11)" in m and "analysed again (crash 1 of at most 3)"
                   in m for m in messages)
        assert {ds.StudyInstanceUID for ds in pacs.received()} == {pydicom.dcmread(study[0]).StudyInstanceUID}


@pytest.mark.integration
@pytest.mark.slow
def test_a_study_that_always_kills_the_worker_fails_after_max_crashes_and_the_node_goes_on(tmp_path):
    poison = write_ct_series(tmp_path / "a", region_labels((21, 32, 32)))
    healthy = write_ct_series(tmp_path / "b", region_labels((20, 32, 32)))
    with StoreSCP(tmp_path / "pacs") as pacs:
        config = write_node_config(tmp_path / "node", port=free_port(), pacs_port=pacs.port)
        node = Node(load_config(config), functools.partial(PoisonStudySegmenter, 21))
        node.start()
        try:
            storescu(node.port, poison)
            failed = wait_for(lambda: next(iter(node.jobs.jobs(states=["failed"])), None), 120, "the poison job")
            storescu(node.port, healthy)
            wait_for(lambda: node.jobs.counts().get("done") == 1, 60, "the next job after the poison study")
        finally:
            node.stop()
        assert (failed.crashes, failed.attempts) == (MAX_WORKER_CRASHES, MAX_WORKER_CRASHES)
        assert "exit code -9" in failed.reason and f"crashed {MAX_WORKER_CRASHES} times" in failed.reason
        assert {ds.StudyInstanceUID for ds in pacs.received()} == {pydicom.dcmread(healthy[0]).StudyInstanceUID}


def test_a_crash_counts_against_the_job_until_max_crashes_and_a_retry_resets_it(tmp_path):
    from node.service.jobs import JobStore

    jobs = JobStore(tmp_path / "jobs.sqlite")
    jobs.record_instance("1.2", "1.2.1", "1.2.840.10008.5.1.4.1.1.2", "1.2.1.1", tmp_path / "x.dcm", 1, "PACS")
    (job_id,) = jobs.select_stable(0)
    jobs.mark_input_ready(job_id)
    for crash in (1, 2):
        assert jobs.claim_next().id == job_id
        assert jobs.record_crash(job_id, "killed", max_crashes=3) == "selected"
        assert jobs.get(job_id).crashes == crash
    assert jobs.claim_next().id == job_id
    assert jobs.record_crash(job_id, "killed", max_crashes=3) == "failed"
    job = jobs.get(job_id)
    assert job.state == "failed" and "crashed 3 times" in job.reason and job.finished_at is not None
    assert jobs.claim_next() is None  # a failed job is not picked up again
    assert jobs.retry(job_id) == "analysis queued again" and jobs.get(job_id).crashes == 0
    with pytest.raises(ValueError, match="at least 1"):
        jobs.record_crash(job_id, "killed", max_crashes=0)


@pytest.mark.integration
def test_node_receives_while_computing_and_sigterm_checkpoints_the_running_job(tmp_path):
    with StoreSCP(tmp_path / "pacs") as pacs:
        config = write_node_config(tmp_path / "node", port=free_port(), pacs_port=pacs.port)
        config.write_text(config.read_text().replace("shutdown_grace_s = 30", "shutdown_grace_s = 0.5"))
        node = Node(load_config(config), SlowSegmenter)
        node.start()
        try:
            storescu(node.port, write_ct_series(tmp_path / "a", region_labels((20, 32, 32))))
            wait_for(lambda: node.jobs.counts().get("processing"), 30, "processing")
            # the network process keeps receiving while the worker computes
            started = time.monotonic()
            storescu(node.port, write_ct_series(tmp_path / "b", region_labels((20, 32, 32))))
            assert time.monotonic() - started < 10 and node.jobs.counts().get("received") == 1
        finally:
            started = time.monotonic()
            node.stop()
        assert time.monotonic() - started < 15
        first = node.jobs.get(1)
        assert first.state == "selected" and "checkpointed at shutdown" in first.reason
