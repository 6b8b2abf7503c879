"""Group commit of received instances: many associations' instances made durable and queued together.

A C-STORE is answered only once its instance is on disk and in the job queue.
Done one instance at a time, that costs per instance a file fsync, a folder
fsync and an SQLite commit (itself an fsync of the write-ahead log), one after
the other. :class:`InstanceCommitter` keeps the file's own write and fsync in
the association's thread (several run at once; fsync releases the GIL), and
shares the rest: the instances waiting at the same moment have their folders
fsynced once each and are recorded in one SQLite transaction.

:class:`GroupCommit` is the leader/follower scheme behind it: the first caller
to arrive while no commit runs commits at once whatever is waiting (itself
included, so a lone sender never waits for a timer or another thread); callers
arriving during a commit wait, and one of them commits all of them next.
"""
from __future__ import annotations

import hashlib
import threading
from dataclasses import dataclass, field
from typing import Callable, Generic, Sequence, TypeVar

from node.service.jobs import JobStore, ReceivedInstance
from node.service.spool import Spool, SpooledFile, sync_folders

Item = TypeVar("Item")
Result = TypeVar("Result")


@dataclass
class _Entry(Generic[Item, Result]):
    item: Item
    done: bool = False
    result: Result | None = None
    error: BaseException | None = None


class GroupCommit(Generic[Item, Result]):
    """Runs ``commit`` on batches of items submitted from many threads; each caller gets its own result.

    Args:
        commit: takes a batch (in submission order) and returns one result per
            item, in the same order. When it raises, every caller of that batch
            gets the exception.
    """

    def __init__(self, commit: Callable[[Sequence[Item]], Sequence[Result]]):
        self._commit = commit
        self._condition = threading.Condition()
        self._waiting: list[_Entry[Item, Result]] = []
        self._committing = False
        self.batches = 0  # commits run (for the log and the tests)
        self.items = 0  # items committed

    def submit(self, item: Item) -> Result:
        """Commit ``item`` with whatever else is waiting; blocks until it is committed and returns its result."""
        entry = _Entry(item)
        with self._condition:
            self._waiting.append(entry)
            while self._committing and not entry.done:
                self._condition.wait()
            if not entry.done:  # no commit running: lead one for everything waiting
                self._committing = True
                batch, self._waiting = self._waiting, []
        if not entry.done:
            try:
                self._run(batch)
            finally:
                with self._condition:
                    self._committing = False
                    self._condition.notify_all()
        if entry.error is not None:
            raise entry.error
        return entry.result

    def _run(self, batch: list[_Entry[Item, Result]]) -> None:
        try:
            results = list(self._commit([entry.item for entry in batch]))
            if len(results) != len(batch):
                raise RuntimeError(f"group commit returned {len(results)} results for {len(batch)} items")
        except BaseException as error:  # every waiter of this batch must learn it failed
            for entry in batch:
                entry.error, entry.done = error, True
            return
        for entry, result in zip(batch, results):
            entry.result, entry.done = result, True
        self.batches += 1
        self.items += len(batch)


@dataclass(frozen=True)
class Stored:
    """Where a received instance went: its file, whether it replaced an earlier copy, its job."""

    path: str
    replaced: bool
    job_id: int


@dataclass(frozen=True)
class _Pending:
    written: SpooledFile
    instance: ReceivedInstance = field(repr=False)


class InstanceCommitter:
    """Writes received instances into a :class:`Spool` and records them in a :class:`JobStore`, in groups."""

    def __init__(self, spool: Spool, jobs: JobStore):
        self.spool, self.jobs = spool, jobs
        self._group: GroupCommit[_Pending, int] = GroupCommit(self._commit)

    @property
    def batches(self) -> int:
        return self._group.batches

    @property
    def items(self) -> int:
        return self._group.items

    def store(self, data: bytes | memoryview, study_uid: str, series_uid: str, sop_class_uid: str,
              sop_instance_uid: str, size: int, origin_ae: str) -> Stored:
        """Write ``data`` (DICOM file bytes) and record it; returns once it is durable and queued.

        Raises OSError when the spool cannot be written, StoreUnavailable when the
        store cannot be; the instance must then be refused (the sender resends).
        The file's digest tells an instance sent again unchanged from a new one.
        """
        written = self.spool.write_file(data, study_uid, series_uid, sop_instance_uid)
        instance = ReceivedInstance(study_uid, series_uid, sop_class_uid, sop_instance_uid, str(written.path), size,
                                    origin_ae, hashlib.sha256(data).hexdigest())
        job_id = self._group.submit(_Pending(written, instance))
        return Stored(str(written.path), written.replaced, job_id)

    def _commit(self, batch: Sequence[_Pending]) -> list[int]:
        # The renames must be durable before the queue says the files are there.
        sync_folders(folder for pending in batch for folder in pending.written.folders)
        return self.jobs.record_instances([pending.instance for pending in batch])
