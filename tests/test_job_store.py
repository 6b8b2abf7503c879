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
