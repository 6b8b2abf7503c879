"""Spool and job queue without the network: atomic files, UID-only paths, the job states, the outbox."""
from __future__ import annotations

import sqlite3
import time

import pytest

from node.config import NodeConfig, RemoteAE, ResultsSettings, RetentionSettings, RetryPolicy, StorageSettings
from node.service.jobs import Delivery, JobStore
from node.service.spool import Spool, check_uid
pytest_plugins = ("tests.postgres",)  # fixtures: postgres, store_location

STUDY, SERIES = "1.2.3.4", "1.2.3.4.5"
CT = "1.2.840.10008.5.1.4.1.1.2"
SEG = "1.2.840.10008.5.1.4.1.1.66.4"


@pytest.fixture
def store(store_location) -> JobStore:
    """The job store on each back end (SQLite, PostgreSQL)."""
    return JobStore(store_location)


def _receive(store: JobStore, spool: Spool, sop: str, study: str = STUDY, origin: str = "PACS") -> int:
    path, _ = spool.write_instance(b"DICM" + sop.encode(), study, SERIES, sop)
    return store.record_instance(study, SERIES, CT, sop, path, 8, origin)


@pytest.mark.parametrize("bad", ["", "../etc", "1.2.3/../../x", "1..2", "1.2.a", "1." * 40 + "1", ".", None])
def test_invalid_uids_never_name_a_path(tmp_path, bad):
    spool = Spool(tmp_path)
    with pytest.raises(ValueError, match="UID"):
        spool.write_instance(b"x", bad, SERIES, "1.2")
    with pytest.raises(ValueError, match="SOP Instance UID"):
        check_uid(bad, "SOP Instance UID")
    assert not any(p.is_file() for p in tmp_path.rglob("*"))


def test_write_is_atomic_and_a_duplicate_replaces_the_copy(tmp_path):
    spool = Spool(tmp_path)
    path, replaced = spool.write_instance(b"first", STUDY, SERIES, "1.2.9")
    assert (path, replaced) == (tmp_path / "incoming" / STUDY / SERIES / "1.2.9.dcm", False)
    path, replaced = spool.write_instance(b"second", STUDY, SERIES, "1.2.9")
    assert replaced and path.read_bytes() == b"second"
    assert sorted(p.name for p in path.parent.iterdir()) == ["1.2.9.dcm"]  # no temporary left


def test_study_moves_through_the_states_and_results_are_queued_with_the_outcome(tmp_path, store):
    spool = Spool(tmp_path / "spool")
    job_id = _receive(store, spool, "1.1")
    assert _receive(store, spool, "1.2") == job_id
    assert _receive(store, spool, "1.2") == job_id  # duplicate: same job, counted once
    assert store.get(job_id).instances == 2
    assert store.select_stable(stability_s=3600) == []  # not quiet long enough
    assert store.select_stable(stability_s=0) == [job_id]
    assert store.get(job_id).state == "selected"
    frozen = spool.freeze_job_input(job_id, store.job_inputs(job_id))
    store.mark_input_ready(job_id)
    assert sorted(p.name for p in frozen.rglob("*.dcm")) == ["1.1.dcm", "1.2.dcm"]
    job = store.claim_next()
    assert (job.id, job.state, job.attempts) == (job_id, "processing", 1)
    assert store.claim_next() is None
    deliveries = [Delivery("PACS", f"/r/{n}.dcm", SEG, f"9.{n}") for n in range(3)]
    assert store.finish_analysis(job_id, "done", "", "ok", "/r", deliveries) == "sending"
    assert len(store.due_deliveries()) == 3
    for item in store.due_deliveries()[:2]:
        store.record_delivery(item.id, "sent")
    assert store.settle_delivery(job_id) == "sending"
    store.record_delivery(store.due_deliveries()[0].id, "refused", "PACS does not accept Segmentation Storage")
    assert store.settle_delivery(job_id) == "done"
    job = store.get(job_id)
    assert "2 of 3" in job.reason and "refused" in job.reason and "Segmentation Storage" in job.reason
    assert [state for _, state, _ in store.events(job_id)] == ["received", "selected", "processing", "sending", "done"]


def test_instances_after_selection_start_a_new_run_with_the_whole_study(tmp_path, store):
    spool = Spool(tmp_path / "spool")
    first = _receive(store, spool, "1.1")
    store.select_stable(0)
    frozen = spool.freeze_job_input(first, store.job_inputs(first))
    second = _receive(store, spool, "1.2")
    _receive(store, spool, "1.1")  # a resent duplicate of the first run
    assert second != first
    assert sorted(p.name for p in frozen.rglob("*.dcm")) == ["1.1.dcm"]  # the first run is not touched
    assert store.get(second).instances == 2
    assert store.select_stable(0) == [second]
    assert sorted(p.name for p in store.job_inputs(second)) == ["1.1.dcm", "1.2.dcm"]
    assert "run 2" in store.events(second)[0][2]


def test_only_ignored_instances_end_as_skipped(store):
    job_id = store.record_ignored(STUDY, "PACS")
    store.record_ignored(STUDY, "PACS")
    store.select_stable(0)
    job = store.get(job_id)
    assert job.state == "skipped" and "2 other instance(s) ignored" in job.reason


def test_restart_resumes_processing_jobs_and_keeps_committed_states(tmp_path):
    spool = Spool(tmp_path / "spool")
    store = JobStore(tmp_path / "jobs.sqlite")
    job_id = _receive(store, spool, "1.1")
    store.select_stable(0)
    store.mark_input_ready(job_id)
    store.claim_next()
    del store  # as after kill -9: nothing but what was committed
    reopened = JobStore(tmp_path / "jobs.sqlite")
    assert reopened.get(job_id).state == "processing"
    assert reopened.recover() == [job_id]
    assert reopened.claim_next().attempts == 2
    mode = sqlite3.connect(tmp_path / "jobs.sqlite").execute("PRAGMA journal_mode").fetchone()[0]
    assert mode == "wal"


def test_retry_of_failed_deliveries_and_of_failed_analysis(tmp_path, store):
    spool = Spool(tmp_path / "spool")
    job_id = _receive(store, spool, "1.1")
    store.select_stable(0)
    store.mark_input_ready(job_id)
    store.claim_next()
    store.finish_analysis(job_id, "done", "", "", "/r", [Delivery("PACS", "/r/seg.dcm", SEG, "9.1")])
    (item,) = store.due_deliveries()
    store.record_delivery(item.id, "failed", "PACS down (gave up after 8 attempts)")
    assert store.settle_delivery(job_id) == "failed"
    assert "PACS did not receive Segmentation Storage" in store.get(job_id).reason
    assert "queued again" in store.retry(job_id)
    assert store.get(job_id).state == "sending" and store.due_deliveries()[0].attempts == 0
    with pytest.raises(ValueError, match="not failed"):
        store.retry(job_id)
    other = _receive(store, spool, "2.1", study="1.2.3.5")
    store.select_stable(0)
    store.mark_input_ready(other)
    store.claim_next()
    store.finish_analysis(other, "failed", "worker crashed", "", None, [])
    assert store.retry(other) == "analysis queued again"
    assert store.get(other).state == "selected"


def test_missing_database_is_reported_for_readers(tmp_path):
    with pytest.raises(FileNotFoundError, match="has the node run"):
        JobStore(tmp_path / "none.sqlite", create=False)


def test_retry_policy_doubles_up_to_the_limit():
    policy = RetryPolicy(first_delay_s=2, max_delay_s=10, max_attempts=5)
    assert [policy.delay_after(n) for n in range(1, 6)] == [2, 4, 8, 10, 10]
    with pytest.raises(ValueError, match="max_attempts"):
        RetryPolicy(max_attempts=0)


def test_result_destinations_follow_the_remote_table():
    remotes = {"PACS": RemoteAE("PACS", "h", 1, True, True), "CT": RemoteAE("CT", "h", 2, True, False),
               "ARCHIVE": RemoteAE("ARCHIVE", "h", 3, False, True)}
    config = NodeConfig(remotes=remotes, results=ResultsSettings(extra_destinations=("ARCHIVE",)))
    assert [r.ae_title for r in config.result_destinations("PACS")[0]] == ["PACS", "ARCHIVE"]
    destinations, notes = config.result_destinations("CT")
    assert [r.ae_title for r in destinations] == ["ARCHIVE"] and "may_receive = no" in notes[0]


def test_retention_removes_images_of_done_jobs_and_old_results(tmp_path):
    from node.service.server import Node
    from tests.output_fixtures import PartitionSegmenter

    config = NodeConfig(storage=StorageSettings(spool_dir=tmp_path / "spool", results_dir=tmp_path / "results",
                                                database=tmp_path / "jobs.sqlite"),
                        retention=RetentionSettings(images_hours=1, results_days=1))
    node = Node(config, PartitionSegmenter)  # not started: retention works on the database and the disk
    done = _receive(node.jobs, node.spool, "1.1")
    failed = _receive(node.jobs, node.spool, "2.1", study="1.2.3.5")
    node.jobs.select_stable(0)
    for job_id in (done, failed):
        node.spool.freeze_job_input(job_id, node.jobs.job_inputs(job_id))
        node.jobs.mark_input_ready(job_id)
        node.jobs.claim_next()
        (config.storage.results_dir / str(job_id)).mkdir(parents=True)
    node.jobs.finish_analysis(done, "done", "", "", None, [])
    node.jobs.finish_analysis(failed, "failed", "bad series", "", None, [])
    assert node.apply_retention() == (0, 0)  # nothing old enough yet
    assert node.apply_retention(now=time.time() + 7200) == (1, 0)
    assert not node.spool.job_input(done).exists() and not node.spool.study_folder(STUDY).exists()
    assert node.spool.job_input(failed).exists()  # failed jobs keep their images for a retry
    assert node.apply_retention(now=time.time() + 2 * 86400) == (0, 2)
    assert not (config.storage.results_dir / str(done)).exists() and node.jobs.get(done).results_removed
