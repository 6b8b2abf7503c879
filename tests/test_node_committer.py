"""Group commit of received instances: batches across threads, errors reach every caller, durability order."""
from __future__ import annotations

import threading

import pytest

from node.service import committer as committer_module
from node.service.committer import GroupCommit, InstanceCommitter
from node.service.jobs import JobStore
from node.service.spool import Spool

STUDY, SERIES = "1.2.3.4", "1.2.3.4.5"
CT = "1.2.840.10008.5.1.4.1.1.2"


def _submit_while_a_commit_runs(group: GroupCommit, first, others) -> list:
    """Submit ``first``; while its commit runs, submit ``others`` from their own threads. Returns every outcome."""
    outcomes: dict[object, object] = {}

    def call(item) -> None:
        try:
            outcomes[item] = group.submit(item)
        except Exception as error:  # the test compares what each caller got
            outcomes[item] = error

    leader = threading.Thread(target=call, args=(first,))
    leader.start()
    assert group.started.wait(5), "the first commit did not start"
    followers = [threading.Thread(target=call, args=(item,)) for item in others]
    for thread in followers:
        thread.start()
    # Every follower is waiting once the waiting list holds them all.
    for _ in range(500):
        with group._condition:
            if len(group._waiting) == len(others):
                break
        threading.Event().wait(0.01)
    group.release.set()
    for thread in [leader, *followers]:
        thread.join(5)
    return [outcomes[item] for item in [first, *others]]


class _GatedGroup(GroupCommit):
    """A GroupCommit whose first commit waits for ``release``, so callers pile up behind it."""

    def __init__(self, commit):
        self.started, self.release, self.seen = threading.Event(), threading.Event(), []

        def gated(batch):
            self.seen.append(list(batch))
            self.started.set()
            self.release.wait(5)
            return commit(batch)

        super().__init__(gated)


def test_callers_arriving_during_a_commit_share_the_next_one_and_each_gets_its_own_result():
    group = _GatedGroup(lambda batch: [item * 10 for item in batch])
    assert _submit_while_a_commit_runs(group, 1, [2, 3, 4, 5]) == [10, 20, 30, 40, 50]
    assert group.seen[0] == [1]
    assert sorted(group.seen[1]) == [2, 3, 4, 5]  # one commit for the four that waited
    assert (group.batches, group.items) == (2, 5)


def test_a_failed_commit_raises_in_every_caller_of_its_batch_and_the_next_batch_works():
    def commit(batch):
        if 2 in batch:
            raise OSError("disk full")
        return list(batch)

    group = _GatedGroup(commit)
    outcomes = _submit_while_a_commit_runs(group, 1, [2, 3])
    assert outcomes[0] == 1
    assert all(isinstance(o, OSError) and "disk full" in str(o) for o in outcomes[1:])
    assert group.submit(7) == 7  # no caller is left leading a broken commit


def test_a_lone_caller_commits_at_once():
    group = GroupCommit(lambda batch: [len(batch)] * len(batch))
    assert [group.submit(i) for i in range(3)] == [1, 1, 1]


def test_folders_are_fsynced_before_the_queue_records_the_instances(tmp_path, monkeypatch):
    spool, jobs = Spool(tmp_path / "spool"), JobStore(tmp_path / "jobs.sqlite")
    order: list[tuple[str, object]] = []
    monkeypatch.setattr(committer_module, "sync_folders", lambda folders: order.append(("sync", list(folders))))
    record = jobs.record_instances
    monkeypatch.setattr(jobs, "record_instances", lambda received: order.append(("record", len(received)))
                        or record(received))
    stored = InstanceCommitter(spool, jobs).store(b"DICM", STUDY, SERIES, CT, "1.2.3.4.5.6", 4, "PACS")
    assert [kind for kind, _ in order] == ["sync", "record"]
    # A new study: the file's folder, and the parents of the two folders created for it.
    assert set(order[0][1]) == {spool.incoming, spool.incoming / STUDY, spool.incoming / STUDY / SERIES}
    assert jobs.get(stored.job_id).instances == 1 and not stored.replaced
    assert jobs.has_instance("1.2.3.4.5.6")


def test_a_second_instance_of_the_series_fsyncs_only_its_folder(tmp_path):
    spool = Spool(tmp_path)
    spool.write_instance(b"a", STUDY, SERIES, "1.1")
    written = spool.write_file(b"b", STUDY, SERIES, "1.2")
    assert written.folders == (spool.incoming / STUDY / SERIES,)


def test_concurrent_stores_are_all_recorded_once(tmp_path):
    spool, jobs = Spool(tmp_path / "spool"), JobStore(tmp_path / "jobs.sqlite")
    committer = InstanceCommitter(spool, jobs)
    studies = [f"1.2.3.{n}" for n in range(4)]

    def send(study: str) -> None:
        for k in range(10):
            committer.store(b"DICM", study, f"{study}.1", CT, f"{study}.1.{k}", 4, "PACS")

    threads = [threading.Thread(target=send, args=(study,)) for study in studies]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(30)
    assert committer.items == 40 and committer.batches <= 40
    assert sorted(j.instances for j in jobs.jobs()) == [10, 10, 10, 10]
    assert all(jobs.study_instance_count(study) == 10 for study in studies)


def test_an_unwritable_queue_fails_the_store(tmp_path, monkeypatch):
    import sqlite3

    spool, jobs = Spool(tmp_path / "spool"), JobStore(tmp_path / "jobs.sqlite")

    def locked(received):
        raise sqlite3.OperationalError("database is locked")

    monkeypatch.setattr(jobs, "record_instances", locked)
    with pytest.raises(sqlite3.OperationalError):
        InstanceCommitter(spool, jobs).store(b"DICM", STUDY, SERIES, CT, "1.9", 4, "PACS")
