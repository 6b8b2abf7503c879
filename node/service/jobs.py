"""The persisted job queue (SQLite, WAL mode): studies, their instances, and the results outbox.

Every study moves through::

    received -> selected -> processing -> sending -> done
                                     \\-> skipped (nothing suitable to analyse)
    any of them -> failed (with the reason)

- received: instances are arriving; the job collects them until the study has
  been quiet for the stability time.
- selected: the study is complete; its instances are frozen as the job's input
  (arrivals from now on start a new job for the same study: a new run, never a
  silent merge). Waiting for the worker.
- processing: the worker analyses it (series selection, segmentation, results).
- sending: the results are in the outbox, being delivered.

Each transition is one SQLite transaction, so a restart (even after kill -9)
finds every job in a state it can resume from: ``processing`` goes back to
``selected`` (:meth:`JobStore.recover`), the outbox resumes where it stopped.
The outbox rows are written in the same transaction that ends the analysis, so
results are never produced without being queued for sending.

Jobs of a study held by a PACS that analyses in place (the Orthanc plugin,
``node/service/orthanc_plugin.py``) start in ``selected`` (the PACS says when
the study is complete) with a ``source_id`` (its id in that PACS): their input is
fetched from there, and fetched again when they are retried.
"""
from __future__ import annotations

import sqlite3
import threading
import time
from contextlib import contextmanager
from dataclasses import dataclass
from enum import Enum
from pathlib import Path
from typing import Iterator, Sequence



class JobState(str, Enum):
    """Where a job is (see the module docstring); the ``state`` column holds the value, as text.

    A ``str`` Enum: a state read from the database compares equal to its member and
    prints as its value (``f"{JobState.DONE}"`` is ``done``).
    """

    RECEIVED = "received"
    SELECTED = "selected"
    PROCESSING = "processing"
    SENDING = "sending"
    DONE = "done"
    SKIPPED = "skipped"
    FAILED = "failed"

    def __str__(self) -> str:
        return self.value

    @property
    def final(self) -> bool:
        """Nothing more happens to the job by itself (an operator may still retry a failed one)."""
        return self in FINAL_STATES


STATES = tuple(JobState)
FINAL_STATES = (JobState.DONE, JobState.SKIPPED, JobState.FAILED)
#: The analysis ends a job in one of these (the pipeline's ``StudyOutcome.status``).
ANALYSIS_STATES = FINAL_STATES
OUTBOX_STATES = ("pending", "sent", "refused", "failed")

SCHEMA = """
CREATE TABLE IF NOT EXISTS jobs (
    id INTEGER PRIMARY KEY AUTOINCREMENT,
    study_uid TEXT NOT NULL,
    state TEXT NOT NULL,
    reason TEXT NOT NULL DEFAULT '',
    summary TEXT NOT NULL DEFAULT '',
    origin_ae TEXT,
    instances INTEGER NOT NULL DEFAULT 0,
    ignored INTEGER NOT NULL DEFAULT 0,
    attempts INTEGER NOT NULL DEFAULT 0,
    input_ready INTEGER NOT NULL DEFAULT 0,
    results_dir TEXT,
    created_at REAL NOT NULL,
    updated_at REAL NOT NULL,
    last_instance_at REAL NOT NULL,
    finished_at REAL,
    images_removed INTEGER NOT NULL DEFAULT 0,
    results_removed INTEGER NOT NULL DEFAULT 0,
    source_id TEXT,
    crashes INTEGER NOT NULL DEFAULT 0
);
CREATE INDEX IF NOT EXISTS jobs_state ON jobs (state);
CREATE INDEX IF NOT EXISTS jobs_study ON jobs (study_uid);
CREATE TABLE IF NOT EXISTS instances (
    sop_instance_uid TEXT PRIMARY KEY,
    study_uid TEXT NOT NULL,
    series_uid TEXT NOT NULL,
    sop_class_uid TEXT NOT NULL,
    path TEXT NOT NULL,
    size INTEGER NOT NULL,
    received_at REAL NOT NULL,
    job_id INTEGER NOT NULL
);
CREATE INDEX IF NOT EXISTS instances_study ON instances (study_uid);
CREATE TABLE IF NOT EXISTS job_inputs (
    job_id INTEGER NOT NULL,
    path TEXT NOT NULL
);
CREATE INDEX IF NOT EXISTS job_inputs_job ON job_inputs (job_id);
CREATE TABLE IF NOT EXISTS outbox (
    id INTEGER PRIMARY KEY AUTOINCREMENT,
    job_id INTEGER NOT NULL,
    destination TEXT NOT NULL,
    path TEXT NOT NULL,
    sop_class_uid TEXT NOT NULL,
    sop_instance_uid TEXT NOT NULL,
    state TEXT NOT NULL DEFAULT 'pending',
    attempts INTEGER NOT NULL DEFAULT 0,
    next_attempt_at REAL NOT NULL,
    detail TEXT NOT NULL DEFAULT ''
);
CREATE INDEX IF NOT EXISTS outbox_state ON outbox (state, next_attempt_at);
CREATE INDEX IF NOT EXISTS outbox_job ON outbox (job_id);
CREATE TABLE IF NOT EXISTS events (
    job_id INTEGER NOT NULL,
    at REAL NOT NULL,
    state TEXT NOT NULL,
    message TEXT NOT NULL DEFAULT ''
);
CREATE INDEX IF NOT EXISTS events_job ON events (job_id);
CREATE TABLE IF NOT EXISTS cursors (
    name TEXT PRIMARY KEY,
    value INTEGER NOT NULL
);
"""

#: Columns added to ``jobs`` after the first release, added to older databases when opened.
ADDED_JOB_COLUMNS = {"source_id": "TEXT", "crashes": "INTEGER NOT NULL DEFAULT 0"}


@dataclass(frozen=True)
class Job:
    """One row of the queue (times are Unix seconds)."""

    id: int
    study_uid: str
    state: JobState
    reason: str
    summary: str
    origin_ae: str | None
    instances: int
    ignored: int
    attempts: int
    input_ready: bool
    results_dir: str | None
    created_at: float
    updated_at: float
    last_instance_at: float
    finished_at: float | None
    images_removed: bool
    results_removed: bool
    source_id: str | None = None
    crashes: int = 0  # times the worker process died while analysing this job


@dataclass(frozen=True)
class OutboxItem:
    """One result file for one destination."""

    id: int
    job_id: int
    destination: str
    path: str
    sop_class_uid: str
    sop_instance_uid: str
    state: str
    attempts: int
    next_attempt_at: float
    detail: str


@dataclass(frozen=True)
class ReceivedInstance:
    """An instance written to the spool, to record in its study's job (what :meth:`JobStore.record_instances` takes)."""

    study_uid: str
    series_uid: str
    sop_class_uid: str
    sop_instance_uid: str
    path: str
    size: int  # bytes
    origin_ae: str


@dataclass(frozen=True)
class Delivery:
    """A result file to queue for a destination (what :meth:`JobStore.finish_analysis` takes)."""

    destination: str
    path: str
    sop_class_uid: str
    sop_instance_uid: str


class JobStore:
    """The queue in one SQLite file; safe to use from several threads and processes.

    Each call opens a short transaction on its own connection (SQLite connections
    are not shared across threads); WAL mode lets ``lobevol status`` read while the
    node writes, and ``synchronous=FULL`` makes a committed transaction durable.
    """

    def __init__(self, path: Path, *, create: bool = True):
        self.path = Path(path)
        if not create and not self.path.exists():
            raise FileNotFoundError(f"job database {self.path} does not exist (has the node run with this config?)")
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._local = threading.local()
        db = self._connection()
        db.executescript(SCHEMA)  # IF NOT EXISTS: idempotent, its own transaction
        columns = {row["name"] for row in db.execute("PRAGMA table_info(jobs)")}
        for name, definition in ADDED_JOB_COLUMNS.items():
            if name not in columns:  # a database made by an earlier version
                db.execute(f"ALTER TABLE jobs ADD COLUMN {name} {definition}")

    def _connection(self) -> sqlite3.Connection:
        connection = getattr(self._local, "connection", None)
        if connection is None:
            connection = sqlite3.connect(self.path, timeout=30.0, isolation_level=None)
            connection.row_factory = sqlite3.Row
            connection.execute("PRAGMA journal_mode=WAL")
            connection.execute("PRAGMA synchronous=FULL")
            self._local.connection = connection
        return connection

    @contextmanager
    def _transaction(self) -> Iterator[sqlite3.Connection]:
        db = self._connection()
        db.execute("BEGIN IMMEDIATE")
        try:
            yield db
        except BaseException:
            db.execute("ROLLBACK")
            raise
        db.execute("COMMIT")

    def _event(self, db: sqlite3.Connection, job_id: int, state: JobState, message: str = "") -> None:
        db.execute("INSERT INTO events (job_id, at, state, message) VALUES (?, ?, ?, ?)",
                   (job_id, time.time(), state, message))

    # -- receiving ---------------------------------------------------------------------------

    def study_instance_count(self, study_uid: str) -> int:
        """Instances of the study currently in the spool."""
        row = self._connection().execute("SELECT COUNT(*) FROM instances WHERE study_uid = ?", (study_uid,)).fetchone()
        return int(row[0])

    def has_instance(self, sop_instance_uid: str) -> bool:
        row = self._connection().execute("SELECT 1 FROM instances WHERE sop_instance_uid = ?",
                                         (sop_instance_uid,)).fetchone()
        return row is not None

    def record_instance(self, study_uid: str, series_uid: str, sop_class_uid: str, sop_instance_uid: str,
                        path: Path, size: int, origin_ae: str) -> int:
        """Record a spooled instance in its study's open job (created when there is none); returns the job id."""
        received = ReceivedInstance(study_uid, series_uid, sop_class_uid, sop_instance_uid, str(path), size, origin_ae)
        return self.record_instances([received])[0]

    def record_instances(self, received: Sequence[ReceivedInstance]) -> list[int]:
        """Record spooled instances in one transaction (one commit, one fsync); returns each one's job id.

        The instances may belong to several studies; each goes to its study's open
        job, created when there is none. Either all are recorded or none.
        """
        now = time.time()
        job_ids = []
        with self._transaction() as db:
            for instance in received:
                job_id = self._open_job(db, instance.study_uid, instance.origin_ae, now)
                previous = db.execute("SELECT job_id FROM instances WHERE sop_instance_uid = ?",
                                      (instance.sop_instance_uid,)).fetchone()
                db.execute(
                    "INSERT OR REPLACE INTO instances (sop_instance_uid, study_uid, series_uid, sop_class_uid, path, "
                    "size, received_at, job_id) VALUES (?, ?, ?, ?, ?, ?, ?, ?)",
                    (instance.sop_instance_uid, instance.study_uid, instance.series_uid, instance.sop_class_uid,
                     instance.path, instance.size, now, job_id))
                if previous is None or previous["job_id"] != job_id:
                    db.execute("UPDATE jobs SET instances = instances + 1 WHERE id = ?", (job_id,))
                job_ids.append(job_id)
        return job_ids

    def record_ignored(self, study_uid: str, origin_ae: str) -> int:
        """Count an instance we do not need (not CT) in its study's open job; returns the job id."""
        now = time.time()
        with self._transaction() as db:
            job_id = self._open_job(db, study_uid, origin_ae, now)
            db.execute("UPDATE jobs SET ignored = ignored + 1 WHERE id = ?", (job_id,))
        return job_id

    def _open_job(self, db: sqlite3.Connection, study_uid: str, origin_ae: str, now: float) -> int:
        row = db.execute("SELECT id FROM jobs WHERE study_uid = ? AND state = 'received' ORDER BY id DESC LIMIT 1",
                         (study_uid,)).fetchone()
        if row is None:
            later_run = db.execute("SELECT COUNT(*) FROM jobs WHERE study_uid = ?", (study_uid,)).fetchone()[0]
            cursor = db.execute(
                "INSERT INTO jobs (study_uid, state, origin_ae, created_at, updated_at, last_instance_at) "
                "VALUES (?, 'received', ?, ?, ?, ?)", (study_uid, origin_ae, now, now, now))
            job_id = int(cursor.lastrowid)
            self._event(db, job_id, JobState.RECEIVED, f"run {later_run + 1} of this study" if later_run else "")
            return job_id
        db.execute("UPDATE jobs SET last_instance_at = ?, updated_at = ?, origin_ae = ? WHERE id = ?",
                   (now, now, origin_ae, row["id"]))
        return int(row["id"])

    def record_complete_study(self, study_uid: str, source_id: str, origin: str) -> tuple[int, bool]:
        """A study its PACS reports complete (``source_id``: its id there): a selected job whose input is to fetch.

        Returns (job id, created): a job of the same study still waiting for its
        input takes the report instead (its fetch will see every instance).
        """
        now = time.time()
        with self._transaction() as db:
            row = db.execute("SELECT id FROM jobs WHERE source_id = ? AND state = 'selected' AND input_ready = 0 "
                             "ORDER BY id DESC LIMIT 1", (source_id,)).fetchone()
            if row is not None:
                return int(row["id"]), False
            earlier = db.execute("SELECT COUNT(*) FROM jobs WHERE study_uid = ?", (study_uid,)).fetchone()[0]
            cursor = db.execute(
                "INSERT INTO jobs (study_uid, state, origin_ae, created_at, updated_at, last_instance_at, source_id) "
                "VALUES (?, 'selected', ?, ?, ?, ?, ?)", (study_uid, origin, now, now, now, source_id))
            job_id = int(cursor.lastrowid)
            self._event(db, job_id, JobState.SELECTED, "study complete in the PACS"
                        + (f", run {earlier + 1} of this study" if earlier else ""))
        return job_id, True

    def latest_job_of_source(self, source_id: str) -> Job | None:
        row = self._connection().execute("SELECT * FROM jobs WHERE source_id = ? ORDER BY id DESC LIMIT 1",
                                         (source_id,)).fetchone()
        return None if row is None else _job(row)

    def cursor(self, name: str) -> int | None:
        """A position kept for a PACS's change log (e.g. the last Orthanc change seen), None when never set."""
        row = self._connection().execute("SELECT value FROM cursors WHERE name = ?", (name,)).fetchone()
        return None if row is None else int(row["value"])

    def set_cursor(self, name: str, value: int) -> None:
        with self._transaction() as db:
            db.execute("INSERT OR REPLACE INTO cursors (name, value) VALUES (?, ?)", (name, int(value)))

    def record_fetched_input(self, job_id: int, instances: int, ignored: int) -> None:
        """The job's input is fetched from its PACS: ``instances`` kept, ``ignored`` not needed (not CT)."""
        with self._transaction() as db:
            db.execute("UPDATE jobs SET instances = ?, ignored = ?, input_ready = 1, updated_at = ? WHERE id = ?",
                       (instances, ignored, time.time(), job_id))

    # -- selection ---------------------------------------------------------------------------

    def select_stable(self, stability_s: float, now: float | None = None) -> list[int]:
        """Move jobs quiet for ``stability_s`` to selected, fixing their input list; returns their ids.

        A job with no CT instance at all (only ignored ones) ends as skipped.
        """
        now = time.time() if now is None else now
        selected = []
        with self._transaction() as db:
            rows = db.execute("SELECT id, study_uid, ignored FROM jobs WHERE state = 'received' "
                              "AND last_instance_at <= ?", (now - stability_s,)).fetchall()
            for row in rows:
                paths = [r["path"] for r in db.execute("SELECT path FROM instances WHERE study_uid = ? ORDER BY path",
                                                       (row["study_uid"],))]
                if not paths:
                    reason = f"no CT instance received ({row['ignored']} other instance(s) ignored)"
                    self._set_state(db, row["id"], JobState.SKIPPED, reason, final=True)
                    continue
                db.executemany("INSERT INTO job_inputs (job_id, path) VALUES (?, ?)", [(row["id"], p) for p in paths])
                self._set_state(db, row["id"], JobState.SELECTED, f"{len(paths)} instance(s)")
                selected.append(int(row["id"]))
        return selected

    def job_inputs(self, job_id: int) -> list[Path]:
        rows = self._connection().execute("SELECT path FROM job_inputs WHERE job_id = ?", (job_id,)).fetchall()
        return [Path(r["path"]) for r in rows]

    def mark_input_ready(self, job_id: int) -> None:
        with self._transaction() as db:
            db.execute("UPDATE jobs SET input_ready = 1, updated_at = ? WHERE id = ?", (time.time(), job_id))

    def jobs_needing_input(self, *, from_pacs: bool = False) -> list[int]:
        """Selected jobs whose input folder was not (completely) built yet, e.g. after a crash.

        ``from_pacs``: jobs of studies analysed in place in a PACS (with a source_id), else the node's own.
        """
        rows = self._connection().execute("SELECT id FROM jobs WHERE state = 'selected' AND input_ready = 0 AND "
                                          + _SOURCE[from_pacs])
        return [int(r["id"]) for r in rows]

    # -- processing --------------------------------------------------------------------------

    def claim_next(self, *, from_pacs: bool = False) -> Job | None:
        """The oldest selected job with its input ready, moved to processing; None when there is none.

        ``from_pacs`` as in :meth:`jobs_needing_input`: a node and the Orthanc plugin may share one database.
        """
        with self._transaction() as db:
            row = db.execute("SELECT id FROM jobs WHERE state = 'selected' AND input_ready = 1 AND "
                             f"{_SOURCE[from_pacs]} ORDER BY id LIMIT 1").fetchone()
            if row is None:
                return None
            db.execute("UPDATE jobs SET attempts = attempts + 1 WHERE id = ?", (row["id"],))
            self._set_state(db, row["id"], JobState.PROCESSING)
        return self.get(row["id"])

    def finish_analysis(self, job_id: int, status: JobState | str, reason: str, summary: str, results_dir: str | None,
                        deliveries: Sequence[Delivery]) -> JobState:
        """End a job's analysis; "done" queues ``deliveries`` in the same transaction. Returns the new state.

        ``status`` is the pipeline's: "done", "skipped" or "failed". A done job
        with nothing to deliver (no destination) ends as done, with ``reason``.
        """
        if status not in ANALYSIS_STATES:
            raise ValueError(f"analysis status {status!r} is not done, skipped or failed")
        status = JobState(status)
        now = time.time()
        with self._transaction() as db:
            db.execute("UPDATE jobs SET summary = ?, results_dir = ? WHERE id = ?", (summary, results_dir, job_id))
            if status == JobState.DONE and deliveries:
                db.executemany(
                    "INSERT INTO outbox (job_id, destination, path, sop_class_uid, sop_instance_uid, next_attempt_at) "
                    "VALUES (?, ?, ?, ?, ?, ?)",
                    [(job_id, d.destination, d.path, d.sop_class_uid, d.sop_instance_uid, now) for d in deliveries])
                self._set_state(db, job_id, JobState.SENDING, reason)
                return JobState.SENDING
            self._set_state(db, job_id, status, reason, final=True)
            return status

    def record_crash(self, job_id: int, reason: str, max_crashes: int) -> JobState:
        """The worker died while analysing the job (killed, out of memory, a segfault); returns the new state.

        The job goes back to selected, to be analysed again by a fresh worker,
        until it has crashed ``max_crashes`` times: it then fails, naming the
        crashes, so that one study that always crashes the worker cannot loop.
        """
        if max_crashes < 1:
            raise ValueError(f"max_crashes must be at least 1, got {max_crashes}")
        with self._transaction() as db:
            db.execute("UPDATE jobs SET crashes = crashes + 1 WHERE id = ?", (job_id,))
            crashes = db.execute("SELECT crashes FROM jobs WHERE id = ?", (job_id,)).fetchone()["crashes"]
            if crashes >= max_crashes:
                self._set_state(db, job_id, JobState.FAILED, f"{reason}; the worker crashed {crashes} times on this study "
                                f"(max_crashes = {max_crashes}): not analysed again", final=True)
                return JobState.FAILED
            self._set_state(db, job_id, JobState.SELECTED, f"{reason}; analysed again (crash {crashes} of at most "
                            f"{max_crashes})")
            return JobState.SELECTED

    def recover(self, *, from_pacs: bool = False) -> list[int]:
        """After a restart: jobs caught in processing go back to selected (their last safe state)."""
        with self._transaction() as db:
            rows = db.execute(f"SELECT id FROM jobs WHERE state = 'processing' AND {_SOURCE[from_pacs]}").fetchall()
            for row in rows:
                self._set_state(db, row["id"], JobState.SELECTED, "resumed after a restart")
        return [int(r["id"]) for r in rows]

    def restart_stability_clock(self) -> int:
        """At start: studies still being received count their quiet time from now.

        A sender cut off by our stop can only resend once we listen again; without
        this, a study interrupted mid-receive would look complete at once.
        """
        now = time.time()
        with self._transaction() as db:
            return db.execute("UPDATE jobs SET last_instance_at = ? WHERE state = 'received'", (now,)).rowcount

    def requeue(self, job_id: int, message: str) -> None:
        """Put a processing job back to selected (shutdown checkpoint)."""
        with self._transaction() as db:
            self._set_state(db, job_id, JobState.SELECTED, message)

    def retry(self, job_id: int) -> str:
        """Retry a failed job: undelivered results are sent again, else the analysis runs again.

        Returns what was done, in words. ValueError when the job cannot be retried.
        """
        job = self.get(job_id)
        if job.state != JobState.FAILED:
            raise ValueError(f"job {job_id} is {job.state}, not failed: only failed jobs can be retried")
        with self._transaction() as db:
            failed = db.execute("UPDATE outbox SET state = 'pending', attempts = 0, next_attempt_at = ?, detail = '' "
                                "WHERE job_id = ? AND state = 'failed'", (time.time(), job_id)).rowcount
            if failed:
                db.execute("UPDATE jobs SET finished_at = NULL WHERE id = ?", (job_id,))
                self._set_state(db, job_id, JobState.SENDING, "retry requested")
                return f"{failed} undelivered result(s) queued again"
        if job.source_id is not None:  # the PACS still holds the study: fetch it again
            with self._transaction() as db:
                db.execute("UPDATE jobs SET finished_at = NULL, input_ready = 0, crashes = 0 WHERE id = ?", (job_id,))
                self._set_state(db, job_id, JobState.SELECTED, "retry requested")
            return "analysis queued again (the study is fetched again)"
        if job.images_removed or not job.input_ready:
            raise ValueError(f"job {job_id}: its input images are gone (retention); send the study again")
        with self._transaction() as db:  # an operator's retry gives a study that crashed the worker a fresh count
            db.execute("UPDATE jobs SET finished_at = NULL, crashes = 0 WHERE id = ?", (job_id,))
            self._set_state(db, job_id, JobState.SELECTED, "retry requested")
        return "analysis queued again"

    # -- outbox ------------------------------------------------------------------------------

    def due_deliveries(self, now: float | None = None, *, from_pacs: bool = False) -> list[OutboxItem]:
        now = time.time() if now is None else now
        rows = self._connection().execute(
            "SELECT * FROM outbox WHERE state = 'pending' AND next_attempt_at <= ? AND job_id IN "
            f"(SELECT id FROM jobs WHERE {_SOURCE[from_pacs]}) ORDER BY id", (now,)).fetchall()
        return [OutboxItem(**dict(r)) for r in rows]

    def next_delivery_time(self, *, from_pacs: bool = False) -> float | None:
        row = self._connection().execute("SELECT MIN(next_attempt_at) FROM outbox WHERE state = 'pending' AND job_id IN "
                                         f"(SELECT id FROM jobs WHERE {_SOURCE[from_pacs]})").fetchone()
        return row[0]

    def record_delivery(self, item_id: int, state: str, detail: str = "") -> None:
        """Record the outcome of one item: sent, refused (not retried) or failed (given up)."""
        if state not in ("sent", "refused", "failed"):
            raise ValueError(f"delivery state {state!r} is not sent, refused or failed")
        with self._transaction() as db:
            db.execute("UPDATE outbox SET state = ?, attempts = attempts + 1, detail = ? WHERE id = ?",
                       (state, detail, item_id))

    def postpone_delivery(self, item_id: int, detail: str, next_attempt_at: float) -> None:
        """One more failed attempt; the item stays pending until ``next_attempt_at``."""
        with self._transaction() as db:
            db.execute("UPDATE outbox SET attempts = attempts + 1, detail = ?, next_attempt_at = ? WHERE id = ?",
                       (detail, next_attempt_at, item_id))

    def outbox(self, job_id: int) -> list[OutboxItem]:
        rows = self._connection().execute("SELECT * FROM outbox WHERE job_id = ? ORDER BY id", (job_id,)).fetchall()
        return [OutboxItem(**dict(r)) for r in rows]

    def settle_delivery(self, job_id: int) -> JobState:
        """When none of the job's results is pending any more, end it: done, or failed naming what was not delivered.

        Refusals (a destination that does not take a SOP class) leave the job done,
        with the refusal in its reason. Returns the job's state.
        """
        items = self.outbox(job_id)
        if any(i.state == "pending" for i in items):
            return JobState.SENDING
        problems = [f"{i.destination} {kind} {_sop_class_name(i.sop_class_uid)}: {i.detail}"
                    for kind, state in (("did not receive", "failed"), ("refused", "refused"))
                    for i in items if i.state == state]
        failed = any(i.state == "failed" for i in items)
        sent = sum(i.state == "sent" for i in items)
        with self._transaction() as db:
            current = db.execute("SELECT state FROM jobs WHERE id = ?", (job_id,)).fetchone()["state"]
            if current != JobState.SENDING:
                return JobState(current)
            reason = f"{sent} of {len(items)} result deliveries made" + ("; " + "; ".join(problems) if problems else "")
            self._set_state(db, job_id, JobState.FAILED if failed else JobState.DONE, reason, final=True)
        return JobState.FAILED if failed else JobState.DONE

    # -- reading, retention ------------------------------------------------------------------

    def get(self, job_id: int) -> Job:
        row = self._connection().execute("SELECT * FROM jobs WHERE id = ?", (job_id,)).fetchone()
        if row is None:
            raise ValueError(f"there is no job {job_id}")
        return _job(row)

    def jobs(self, *, limit: int = 20, states: Sequence[JobState | str] | None = None) -> list[Job]:
        """Most recent jobs first."""
        query, arguments = "SELECT * FROM jobs", []
        if states:
            query += f" WHERE state IN ({', '.join('?' * len(states))})"
            arguments += list(states)
        rows = self._connection().execute(query + " ORDER BY id DESC LIMIT ?", (*arguments, limit)).fetchall()
        return [_job(r) for r in rows]

    def counts(self) -> dict[str, int]:
        rows = self._connection().execute("SELECT state, COUNT(*) AS n FROM jobs GROUP BY state").fetchall()
        return {r["state"]: r["n"] for r in rows}

    def events(self, job_id: int) -> list[tuple[float, str, str]]:
        rows = self._connection().execute("SELECT at, state, message FROM events WHERE job_id = ? ORDER BY rowid",
                                          (job_id,)).fetchall()
        return [(r["at"], r["state"], r["message"]) for r in rows]

    def expired_images(self, older_than: float) -> list[Job]:
        """Done or skipped jobs that ended before ``older_than`` and still hold their input images."""
        rows = self._connection().execute(
            "SELECT * FROM jobs WHERE state IN ('done', 'skipped') AND images_removed = 0 AND finished_at <= ?",
            (older_than,)).fetchall()
        return [_job(r) for r in rows]

    def study_is_idle(self, study_uid: str) -> bool:
        """True when no job of the study is unfinished or failed (its received images may go)."""
        row = self._connection().execute(
            "SELECT COUNT(*) FROM jobs WHERE study_uid = ? AND state NOT IN ('done', 'skipped')", (study_uid,)).fetchone()
        return row[0] == 0

    def forget_study_instances(self, study_uid: str) -> None:
        with self._transaction() as db:
            db.execute("DELETE FROM instances WHERE study_uid = ?", (study_uid,))

    def mark_images_removed(self, job_id: int) -> None:
        with self._transaction() as db:
            db.execute("UPDATE jobs SET images_removed = 1 WHERE id = ?", (job_id,))

    def expired_results(self, older_than: float) -> list[Job]:
        rows = self._connection().execute(
            "SELECT * FROM jobs WHERE state IN ('done', 'skipped', 'failed') AND results_removed = 0 "
            "AND finished_at <= ?", (older_than,)).fetchall()
        return [_job(r) for r in rows]

    def mark_results_removed(self, job_id: int) -> None:
        with self._transaction() as db:
            db.execute("UPDATE jobs SET results_removed = 1 WHERE id = ?", (job_id,))

    def _set_state(self, db: sqlite3.Connection, job_id: int, state: JobState, reason: str = "", *, final: bool = False) -> None:
        if state not in STATES:
            raise ValueError(f"unknown job state {state!r}")
        now = time.time()
        db.execute("UPDATE jobs SET state = ?, reason = ?, updated_at = ?, finished_at = ? WHERE id = ?",
                   (state, reason, now, now if final else None, job_id))
        self._event(db, job_id, state, reason)


#: The node's own jobs, or those of studies analysed in place in a PACS (``from_pacs``).
_SOURCE = {False: "source_id IS NULL", True: "source_id IS NOT NULL"}


def _job(row: sqlite3.Row) -> Job:
    values = dict(row)
    for name in ("input_ready", "images_removed", "results_removed"):
        values[name] = bool(values[name])
    values["state"] = JobState(values["state"])
    return Job(**values)


def _sop_class_name(uid: str) -> str:
    from pydicom.uid import UID

    name = UID(uid).name
    return name if name and name != uid else uid
