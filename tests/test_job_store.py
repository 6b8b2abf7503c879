"""The job store's guarantees on both back ends (SQLite file, PostgreSQL server started by the tests).

Leases: one holder per job, renewed while it runs; a stale token is refused;
an expired lease counts as a crash and the job goes to another worker; three
crashes fail it. Claims never hand one job (or one delivery) to two workers,
two receivers fill one job per study, and a finish queues each result once.
"""
from __future__ import annotations

import threading
import time

import pytest

from node.service.jobs import Delivery, JobStore, ReceivedInstance, StaleLease
pytest_plugins = ("tests.postgres",)  # fixtures: postgres, store_location

CT = "1.2.840.10008.5.1.4.1.1.2"
SEG = "1.2.840.10008.5.1.4.1.1.66.4"


def _ready_job(store: JobStore, study: str = "1.2.3", instances: int = 2) -> int:
    for n in range(instances):
        job_id = store.record_instance(study, f"{study}.1", CT, f"{study}.1.{n}", f"/spool/{study}/{n}.dcm", 10,
                                       "PACS", digest=f"{study}-{n}")
    assert store.select_stable(0) == [job_id]
    store.mark_input_ready(job_id)
    return job_id


def test_a_lease_holds_the_job_and_a_stale_token_is_refused(store_location):
    store = JobStore(store_location)
    job_id = _ready_job(store)
    first = store.claim_next(owner="gpu-1", lease_s=0.3)
    assert (first.id, first.lease_owner, first.state) == (job_id, "gpu-1", "processing") and first.lease_token
    assert store.renew_lease(job_id, first.lease_token, 0.3) > first.claimed_at
    assert store.claim_next(owner="gpu-2") is None  # held
    time.sleep(0.5)  # gpu-1 froze past its lease
    second = store.claim_next(owner="gpu-2", lease_s=30)
    assert (second.id, second.lease_owner, second.crashes, second.attempts) == (job_id, "gpu-2", 1, 2)
    assert "gpu-1 stopped renewing its lease" in store.events(job_id)[-2][2]
    deliveries = [Delivery("PACS", "/r/seg.dcm", SEG, "9.1"), Delivery("PACS", "/r/sr.dcm", SEG, "9.2")]
    with pytest.raises(StaleLease):
        store.renew_lease(job_id, first.lease_token)
    with pytest.raises(StaleLease, match="held by gpu-2"):
        store.finish_analysis(job_id, "done", "", "", "/r/1", deliveries, token=first.lease_token)
    assert store.outbox(job_id) == []  # the frozen worker's results are not queued
    assert store.finish_analysis(job_id, "done", "", "", "/r/2", deliveries, token=second.lease_token) == "sending"
    assert len(store.outbox(job_id)) == 2 and store.get(job_id).results_dir == "/r/2"
    with pytest.raises(StaleLease):  # finished: nobody holds it any more
        store.record_crash(job_id, "late", token=second.lease_token)


def test_three_expired_leases_fail_a_poison_job_and_a_retry_gives_a_fresh_count(store_location):
    store = JobStore(store_location)
    job_id = _ready_job(store)
    for worker in ("a", "b", "c"):
        assert store.claim_next(owner=worker, lease_s=0.1).id == job_id
        time.sleep(0.2)
    assert store.claim_next(owner="d") is None  # the third expiry failed it
    job = store.get(job_id)
    assert (job.state, job.crashes) == ("failed", 3) and "crashed 3 times" in job.reason
    store.retry(job_id)
    assert store.claim_next(owner="d").crashes == 0


def test_concurrent_claims_never_hand_one_job_to_two_workers(store_location):
    store = JobStore(store_location)
    ids = {_ready_job(store, f"1.2.{n}", 1) for n in range(24)}
    claimed: list[tuple[str, int]] = []

    def worker(name: str) -> None:
        own = JobStore(store_location)  # each worker its own connection, as on its own machine
        while (job := own.claim_next(owner=name)) is not None:
            claimed.append((name, job.id))

    threads = [threading.Thread(target=worker, args=(f"w{n}",)) for n in range(4)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert sorted(job for _, job in claimed) == sorted(ids)


def test_two_receivers_of_one_study_fill_one_job(store_location):
    stores = [JobStore(store_location) for _ in range(4)]
    jobs: list[int] = []

    def receive(store: JobStore, first: int) -> None:
        for n in range(first, first + 10):
            jobs.extend(store.record_instances([ReceivedInstance("1.9", "1.9.1", CT, f"1.9.1.{n}", f"/s/{n}", 1, "CT",
                                                                 f"d{n}")]))

    threads = [threading.Thread(target=receive, args=(store, 10 * n)) for n, store in enumerate(stores)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert len(set(jobs)) == 1 and stores[0].get(jobs[0]).instances == 40


def test_deliveries_are_claimed_by_one_sender_and_a_stale_sender_is_refused(store_location):
    store = JobStore(store_location)
    job_id = _ready_job(store)
    job = store.claim_next()
    deliveries = [Delivery("PACS", f"/r/{n}.dcm", SEG, f"9.{n}") for n in range(3)]
    store.finish_analysis(job_id, "done", "", "", "/r", deliveries, token=job.lease_token)
    store.finish_analysis(job_id, "done", "", "", "/r", deliveries)  # repeated (an answer lost): nothing added
    assert len(store.outbox(job_id)) == 3
    mine = store.claim_deliveries("node-a", lease_s=0.2)
    assert len(mine) == 3 and store.claim_deliveries("node-b") == []
    time.sleep(0.3)
    theirs = store.claim_deliveries("node-b", lease_s=30)
    assert [i.id for i in theirs] == [i.id for i in mine]
    with pytest.raises(StaleLease):
        store.record_delivery(mine[0].id, "sent", token=mine[0].lease_token)
    for item in theirs:
        store.record_delivery(item.id, "sent", token=item.lease_token)
    assert store.settle_delivery(job_id) == "done"


def test_identical_instances_sent_again_are_not_new_changed_ones_are(store_location):
    store = JobStore(store_location)
    first = _ready_job(store)
    store.finish_analysis(first, "done", "", "", None, [], token=store.claim_next().lease_token)
    _ready = store.record_instance("1.2.3", "1.2.3.1", CT, "1.2.3.1.0", "/spool/0.dcm", 10, "PACS", digest="1.2.3-0")
    assert store.select_stable(0) == [] and "identical to those job 1 analysed" in store.get(_ready).reason
    changed = store.record_instance("1.2.3", "1.2.3.1", CT, "1.2.3.1.0", "/spool/0.dcm", 10, "PACS", digest="other")
    assert store.select_stable(0) == [changed] and store.get(changed).new_instances == 1
    assert store.retry(_ready).startswith("analysis queued again (forced")


def test_the_workers_table_says_who_holds_what_since_when(store_location):
    store = JobStore(store_location)
    job_id = _ready_job(store)
    job = store.claim_next(owner="gpu-1")
    store.heartbeat("gpu-1", "worker", f"analysing job {job_id}", job_id)
    time.sleep(0.05)
    store.heartbeat("gpu-1", "worker", f"analysing job {job_id}", job_id)
    now, (record,) = store.workers()
    assert (record.name, record.role, record.job_id) == ("gpu-1", "worker", job_id)
    assert record.since < record.heartbeat_at <= now
    assert [j.lease_owner for j in store.holders()] == ["gpu-1"] and job.claimed_at <= now
    store.worker_stopped("gpu-1", "stopped")
    assert store.workers()[1][0].stopped_at is not None


#: The job database of the release before leases (115f1fb): what `lobevol db init` (and any start) upgrades.
OLD_SCHEMA = """
CREATE TABLE jobs (id INTEGER PRIMARY KEY AUTOINCREMENT, study_uid TEXT NOT NULL, state TEXT NOT NULL,
    reason TEXT NOT NULL DEFAULT '', summary TEXT NOT NULL DEFAULT '', origin_ae TEXT,
    instances INTEGER NOT NULL DEFAULT 0, ignored INTEGER NOT NULL DEFAULT 0, attempts INTEGER NOT NULL DEFAULT 0,
    input_ready INTEGER NOT NULL DEFAULT 0, results_dir TEXT, created_at REAL NOT NULL, updated_at REAL NOT NULL,
    last_instance_at REAL NOT NULL, finished_at REAL, images_removed INTEGER NOT NULL DEFAULT 0,
    results_removed INTEGER NOT NULL DEFAULT 0, source_id TEXT, crashes INTEGER NOT NULL DEFAULT 0);
CREATE TABLE instances (sop_instance_uid TEXT PRIMARY KEY, study_uid TEXT NOT NULL, series_uid TEXT NOT NULL,
    sop_class_uid TEXT NOT NULL, path TEXT NOT NULL, size INTEGER NOT NULL, received_at REAL NOT NULL,
    job_id INTEGER NOT NULL);
CREATE TABLE job_inputs (job_id INTEGER NOT NULL, path TEXT NOT NULL);
CREATE TABLE outbox (id INTEGER PRIMARY KEY AUTOINCREMENT, job_id INTEGER NOT NULL, destination TEXT NOT NULL,
    path TEXT NOT NULL, sop_class_uid TEXT NOT NULL, sop_instance_uid TEXT NOT NULL,
    state TEXT NOT NULL DEFAULT 'pending', attempts INTEGER NOT NULL DEFAULT 0, next_attempt_at REAL NOT NULL,
    detail TEXT NOT NULL DEFAULT '');
CREATE TABLE events (job_id INTEGER NOT NULL, at REAL NOT NULL, state TEXT NOT NULL, message TEXT NOT NULL DEFAULT '');
CREATE TABLE cursors (name TEXT PRIMARY KEY, value INTEGER NOT NULL);
INSERT INTO jobs (study_uid, state, created_at, updated_at, last_instance_at, input_ready)
    VALUES ('1.2.3', 'processing', 1, 1, 1, 1);
INSERT INTO events (job_id, at, state, message) VALUES (1, 1, 'selected', ''), (1, 2, 'processing', '');
"""


def test_db_init_creates_and_upgrades_on_both_back_ends(tmp_path, postgres):
    import sqlite3
    import subprocess
    import sys

    old = tmp_path / "old.sqlite"
    with sqlite3.connect(old) as db:
        db.executescript(OLD_SCHEMA)
    for database in (str(old), postgres.new_database()):
        config = tmp_path / "node.ini"
        config.write_text(f"[storage]\ndatabase = {database}\n")
        for _ in range(2):  # idempotent
            done = subprocess.run([sys.executable, "-m", "node.cli", "db", "init", "--config", str(config)],
                                  capture_output=True, text=True, timeout=60)
            assert done.returncode == 0 and done.stdout.startswith("job store ready"), done.stderr
    store = JobStore(old, create=False)
    assert store.recover() == [1] and [state for _, state, _ in store.events(1)][-1] == "selected"
    assert store.claim_next(owner="new").lease_owner == "new"
    empty = tmp_path / "missing.ini"
    empty.write_text(f"[storage]\ndatabase = {postgres.new_database()}\n")
    refused = subprocess.run([sys.executable, "-m", "node.cli", "status", "--config", str(empty)],
                             capture_output=True, text=True, timeout=60)
    assert refused.returncode == 1 and "run lobevol db init" in refused.stderr and "Traceback" not in refused.stderr
