"""The persisted job store: studies, their instances, the results outbox, the workers, on SQLite or PostgreSQL.

Every study moves through::

    received -> selected -> processing -> sending -> done
                                     \\-> skipped (nothing suitable or nothing new to analyse)
    any of them -> failed (with the reason)

- received: instances are arriving; the job collects them until the study has
  been quiet for the stability time.
- selected: the study is complete; its instances are frozen as the job's input
  (arrivals from now on start a new job for the same study: a new run, never a
  silent merge). Waiting for a worker. A study whose instances are all identical
  to those an earlier job analysed, or whose new objects are none of them CT
  (lobevol's own results sent back, a report...), is skipped instead: its
  results are already in the study (:mod:`node.service.intake`).
- processing: a worker holds the job under a *lease* (owner, token, expiry) that
  it renews while it analyses (:mod:`node.service.runner`).
- sending: the results are in the outbox, being delivered.

Each transition is one transaction, so a restart (even after kill -9) finds
every job in a state it can resume from. The leases make that hold across
machines:

- a job is claimed by one worker (SQLite: the write lock of ``BEGIN
  IMMEDIATE``; PostgreSQL: ``SELECT ... FOR UPDATE SKIP LOCKED``), with a fresh
  token; only a call carrying that token may renew the lease, finish the job,
  report its crash or put it back (:class:`StaleLease` otherwise), so a worker
  frozen past its lease cannot deliver a second result set;
- a lease that expires (its worker was killed, frozen or cut off) counts as a
  crash and the job goes back to selected, for any worker, until it has crashed
  ``max_crashes`` times: it then fails, naming the crashes;
- the outbox rows are written in the transaction that ends the analysis (one
  row per destination and SOP Instance UID: a repeated finish adds nothing), and
  are claimed for sending under leases as well.

Two back ends, one schema (:data:`SCHEMA`) and the same SQL: ``[storage]
database`` a file path is an embedded SQLite database (WAL, ``synchronous=FULL``),
``postgresql://...`` a shared PostgreSQL (psycopg 3). A database that cannot be
reached or written (locked past the busy timeout, disk full, server down)
raises :class:`StoreUnavailable`: transient, the caller retries or refuses
transiently; nothing half-done is committed.

Jobs of a study held by a PACS that analyses in place (the Orthanc plugin,
``node/service/orthanc_plugin.py``) start in ``selected`` (the PACS says when
the study is complete) with a ``source_id`` (its id in that PACS): their input is
fetched from there, and fetched again when they are retried.
"""
from __future__ import annotations

import os
import socket
import sqlite3
import threading
import time
import uuid
from contextlib import contextmanager
from dataclasses import dataclass, fields
from enum import Enum
from pathlib import Path
from typing import Any, Iterator, Sequence


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
#: The analysis ends a job in one of these (the pipeline's ``Outcome`` values).
ANALYSIS_STATES = FINAL_STATES
OUTBOX_STATES = ("pending", "sent", "refused", "failed")
#: The origin of the jobs of an offline cohort (``lobevol segment --queue``): their results stay in the results folder.
COHORT_ORIGIN = "COHORT"
#: A worker that crashes this many times on one job fails it (one poison study must not loop).
MAX_CRASHES = 3
#: How long a claim holds a job or a delivery without renewal (s); the holder renews it every third of it.
LEASE_S = 30.0


class StoreUnavailable(RuntimeError):
    """The job store cannot be reached or written now (locked, disk full, server down): try again later."""


class StaleLease(RuntimeError):
    """The caller no longer holds the job's (or delivery's) lease: another worker took it over."""


def default_owner() -> str:
    """The lease owner of this process when none is given: ``host:pid``."""
    return f"{socket.gethostname()}:{os.getpid()}"


def describe_location(location: Path | str) -> str:
    """The store's location for messages: the file, or the URL without any password."""
    if isinstance(location, str):
        from urllib.parse import urlsplit

        parts = urlsplit(location)
        host = parts.hostname or "local socket"
        return f"PostgreSQL {parts.path.lstrip('/') or '(default database)'} on {host}" + (
            f":{parts.port}" if parts.port else "")
    return f"SQLite {location}"


# -- schema ------------------------------------------------------------------------------------
# {pk}: an auto-numbered primary key; {real}: seconds as a float; {int}: a counter or an id.
SCHEMA = """
CREATE TABLE IF NOT EXISTS jobs (
    id {pk},
    study_uid TEXT NOT NULL,
    state TEXT NOT NULL,
    reason TEXT NOT NULL DEFAULT '',
    summary TEXT NOT NULL DEFAULT '',
    origin_ae TEXT,
    instances {int} NOT NULL DEFAULT 0,
    ignored {int} NOT NULL DEFAULT 0,
    attempts {int} NOT NULL DEFAULT 0,
    input_ready {int} NOT NULL DEFAULT 0,
    results_dir TEXT,
    created_at {real} NOT NULL,
    updated_at {real} NOT NULL,
    last_instance_at {real} NOT NULL,
    finished_at {real},
    images_removed {int} NOT NULL DEFAULT 0,
    results_removed {int} NOT NULL DEFAULT 0,
    source_id TEXT,
    crashes {int} NOT NULL DEFAULT 0,
    new_instances {int} NOT NULL DEFAULT 0,
    lease_owner TEXT,
    lease_token TEXT,
    lease_expires_at {real},
    claimed_at {real}
);
CREATE INDEX IF NOT EXISTS jobs_state ON jobs (state);
CREATE INDEX IF NOT EXISTS jobs_study ON jobs (study_uid);
CREATE TABLE IF NOT EXISTS instances (
    sop_instance_uid TEXT PRIMARY KEY,
    study_uid TEXT NOT NULL,
    series_uid TEXT NOT NULL,
    sop_class_uid TEXT NOT NULL,
    path TEXT NOT NULL,
    size {int} NOT NULL,
    received_at {real} NOT NULL,
    job_id {int} NOT NULL,
    digest TEXT NOT NULL DEFAULT ''
);
CREATE INDEX IF NOT EXISTS instances_study ON instances (study_uid);
CREATE TABLE IF NOT EXISTS job_inputs (
    job_id {int} NOT NULL,
    path TEXT NOT NULL
);
CREATE INDEX IF NOT EXISTS job_inputs_job ON job_inputs (job_id);
CREATE TABLE IF NOT EXISTS outbox (
    id {pk},
    job_id {int} NOT NULL,
    destination TEXT NOT NULL,
    path TEXT NOT NULL,
    sop_class_uid TEXT NOT NULL,
    sop_instance_uid TEXT NOT NULL,
    state TEXT NOT NULL DEFAULT 'pending',
    attempts {int} NOT NULL DEFAULT 0,
    next_attempt_at {real} NOT NULL,
    detail TEXT NOT NULL DEFAULT '',
    lease_owner TEXT,
    lease_token TEXT,
    lease_expires_at {real}
);
CREATE INDEX IF NOT EXISTS outbox_state ON outbox (state, next_attempt_at);
CREATE INDEX IF NOT EXISTS outbox_job ON outbox (job_id);
CREATE TABLE IF NOT EXISTS events (
    id {pk},
    job_id {int} NOT NULL,
    at {real} NOT NULL,
    state TEXT NOT NULL,
    message TEXT NOT NULL DEFAULT ''
);
CREATE INDEX IF NOT EXISTS events_job ON events (job_id);
CREATE TABLE IF NOT EXISTS cursors (
    name TEXT PRIMARY KEY,
    value {int} NOT NULL
);
CREATE TABLE IF NOT EXISTS workers (
    name TEXT PRIMARY KEY,
    host TEXT NOT NULL,
    pid {int} NOT NULL,
    role TEXT NOT NULL,
    started_at {real} NOT NULL,
    heartbeat_at {real} NOT NULL,
    activity TEXT NOT NULL DEFAULT '',
    job_id {int},
    since {real},
    stopped_at {real}
);
"""

#: One study has at most one job still receiving (two receivers sharing a store fill the same job).
#: One result object is queued once per destination (a finish repeated after a lost answer adds nothing).
UNIQUE_INDEXES = """
CREATE UNIQUE INDEX IF NOT EXISTS jobs_one_receiving ON jobs (study_uid) WHERE state = 'received';
CREATE UNIQUE INDEX IF NOT EXISTS outbox_once ON outbox (job_id, destination, sop_instance_uid);
"""

#: Columns added after the first release, added to older databases when opened (``lobevol db init``).
ADDED_COLUMNS = {
    "jobs": {"source_id": "TEXT", "crashes": "{int} NOT NULL DEFAULT 0", "new_instances": "{int} NOT NULL DEFAULT 0",
             "lease_owner": "TEXT", "lease_token": "TEXT", "lease_expires_at": "{real}", "claimed_at": "{real}"},
    "instances": {"digest": "TEXT NOT NULL DEFAULT ''"},
    "outbox": {"lease_owner": "TEXT", "lease_token": "TEXT", "lease_expires_at": "{real}"},
}


# -- rows --------------------------------------------------------------------------------------

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
    crashes: int = 0  # times the job's worker died (or lost its lease) while analysing it
    new_instances: int = 0  # CT instances new or changed since the study's earlier jobs
    lease_owner: str | None = None  # the worker holding the job (processing)
    lease_token: str | None = None
    lease_expires_at: float | None = None
    claimed_at: float | None = None


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
    lease_owner: str | None = None
    lease_token: str | None = None
    lease_expires_at: float | None = None


@dataclass(frozen=True)
class WorkerRecord:
    """One process that runs jobs or receives (``workers`` table): who, where, doing what since when."""

    name: str
    host: str
    pid: int
    role: str
    started_at: float
    heartbeat_at: float
    activity: str
    job_id: int | None
    since: float | None
    stopped_at: float | None


@dataclass(frozen=True)
class ReceivedInstance:
    """An instance written to the spool, to record in its study's job (what :meth:`JobStore.record_instances` takes).

    ``digest``: a hash of the file's bytes; an instance sent again with the same
    digest is not new (empty: unknown, always new).
    """

    study_uid: str
    series_uid: str
    sop_class_uid: str
    sop_instance_uid: str
    path: str
    size: int  # bytes
    origin_ae: str
    digest: str = ""


@dataclass(frozen=True)
class Delivery:
    """A result file to queue for a destination (what :meth:`JobStore.finish_analysis` takes)."""

    destination: str
    path: str
    sop_class_uid: str
    sop_instance_uid: str


# -- back ends ---------------------------------------------------------------------------------

class _Transaction:
    """The statements of one transaction (rows as dicts; ``?`` placeholders whatever the back end)."""

    def __init__(self, backend: "_Backend", connection):
        self.backend, self.connection = backend, connection

    def run(self, sql: str, parameters: Sequence = ()) -> Any:
        return self.connection.execute(self.backend.sql(sql), tuple(parameters))

    def one(self, sql: str, parameters: Sequence = ()) -> dict | None:
        return self.run(sql, parameters).fetchone()

    def all(self, sql: str, parameters: Sequence = ()) -> list[dict]:
        return self.run(sql, parameters).fetchall()

    def count(self, sql: str, parameters: Sequence = ()) -> int:
        return self.run(sql, parameters).rowcount

    def now(self) -> float:
        """The database's clock (PostgreSQL: the server's, the same for every machine)."""
        return self.backend.now(self)


class _Backend:
    """What differs between SQLite and PostgreSQL; the SQL is shared."""

    types: dict[str, str]
    lock_rows = ""  # appended to a SELECT whose rows the transaction will change, skipping rows others hold
    lock_row = ""  # appended to a SELECT of one row the transaction will change, waiting for it
    event_order = "id"

    def sql(self, text: str) -> str:
        return text

    def now(self, db: _Transaction) -> float:
        return time.time()

    def transaction(self):
        raise NotImplementedError

    def read(self):
        raise NotImplementedError

    def create_schema(self) -> None:
        raise NotImplementedError


def _dict_row(cursor: sqlite3.Cursor, row: tuple) -> dict:
    return {column[0]: value for column, value in zip(cursor.description, row)}


class _SQLite(_Backend):
    """One file; a connection per thread; ``BEGIN IMMEDIATE`` takes the write lock at once (it is the claim lock)."""

    types = {"pk": "INTEGER PRIMARY KEY AUTOINCREMENT", "real": "REAL", "int": "INTEGER"}
    event_order = "rowid"  # events tables made before events.id existed have only the rowid
    #: How long a statement waits for another process's lock before StoreUnavailable (s).
    busy_timeout_s = 30.0

    def __init__(self, path: Path, create: bool):
        self.path = Path(path)
        if not create and not self.path.exists():
            raise FileNotFoundError(f"job database {self.path} does not exist (has the node run with this config?)")
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._local = threading.local()

    def _connection(self) -> sqlite3.Connection:
        connection = getattr(self._local, "connection", None)
        if connection is None:
            connection = sqlite3.connect(self.path, timeout=self.busy_timeout_s, isolation_level=None,
                                         check_same_thread=False)
            connection.row_factory = _dict_row
            connection.execute("PRAGMA journal_mode=WAL")
            connection.execute("PRAGMA synchronous=FULL")
            self._local.connection = connection
        return connection

    @contextmanager
    def transaction(self) -> Iterator[_Transaction]:
        try:
            db = self._connection()
            db.execute("BEGIN IMMEDIATE")
        except sqlite3.OperationalError as error:
            raise StoreUnavailable(f"job database {self.path}: {error}") from error
        try:
            yield _Transaction(self, db)
            db.execute("COMMIT")
        except BaseException as error:
            try:
                db.execute("ROLLBACK")
            except sqlite3.Error:
                pass  # nothing open any more
            if isinstance(error, sqlite3.OperationalError):
                raise StoreUnavailable(f"job database {self.path}: {error}") from error
            raise

    @contextmanager
    def read(self) -> Iterator[_Transaction]:
        try:
            yield _Transaction(self, self._connection())
        except sqlite3.OperationalError as error:
            raise StoreUnavailable(f"job database {self.path}: {error}") from error

    def create_schema(self) -> None:
        with self.read() as db:
            db.connection.executescript(SCHEMA.format(**self.types))  # IF NOT EXISTS: idempotent
        _add_columns(self, lambda db, table: {r["name"] for r in db.all(f"PRAGMA table_info({table})")})
        with self.read() as db:
            db.connection.executescript(UNIQUE_INDEXES)


class _PostgreSQL(_Backend):
    """A shared server; a connection per thread, reconnected after an outage; ``FOR UPDATE SKIP LOCKED`` claims."""

    types = {"pk": "BIGSERIAL PRIMARY KEY", "real": "DOUBLE PRECISION", "int": "BIGINT"}
    lock_rows = " FOR UPDATE SKIP LOCKED"
    lock_row = " FOR UPDATE"
    connect_timeout_s = 10

    def __init__(self, url: str, create: bool):
        try:
            import psycopg
        except ImportError:
            raise RuntimeError("[storage] database is a PostgreSQL URL but psycopg is not installed "
                               "(pip install 'psycopg[binary]')") from None
        self.url, self.psycopg = url, psycopg
        self._local = threading.local()
        if not create:
            with self.read() as db:
                if db.one("SELECT to_regclass('jobs') AS jobs")["jobs"] is None:
                    raise FileNotFoundError(f"{describe_location(url)} has no job tables (run lobevol db init)")

    def sql(self, text: str) -> str:
        return text.replace("?", "%s")

    def now(self, db: _Transaction) -> float:
        return float(db.one("SELECT EXTRACT(EPOCH FROM clock_timestamp())::float8 AS now")["now"])

    def _connection(self):
        connection = getattr(self._local, "connection", None)
        if connection is None or connection.closed or connection.broken:
            from psycopg.rows import dict_row

            connection = self.psycopg.connect(self.url, autocommit=True, row_factory=dict_row,
                                              connect_timeout=self.connect_timeout_s)
            self._local.connection = connection
        return connection

    def _unavailable(self, error: Exception) -> StoreUnavailable:
        connection = getattr(self._local, "connection", None)
        if connection is not None and (connection.broken or isinstance(error, self.psycopg.OperationalError)):
            try:
                connection.close()
            except Exception:
                pass
            self._local.connection = None
        first_line = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
        return StoreUnavailable(f"{describe_location(self.url)}: {first_line}")

    def _transient(self) -> tuple[type[Exception], ...]:
        errors = self.psycopg.errors
        return (self.psycopg.OperationalError, errors.SerializationFailure, errors.DeadlockDetected,
                errors.LockNotAvailable, errors.AdminShutdown, errors.DiskFull)

    @contextmanager
    def transaction(self) -> Iterator[_Transaction]:
        try:
            connection = self._connection()
            with connection.transaction():
                yield _Transaction(self, connection)
        except self._transient() as error:
            raise self._unavailable(error) from error

    @contextmanager
    def read(self) -> Iterator[_Transaction]:
        try:
            yield _Transaction(self, self._connection())
        except self._transient() as error:
            raise self._unavailable(error) from error

    def create_schema(self) -> None:
        with self.transaction() as db:
            db.run("SELECT pg_advisory_xact_lock(872143)")  # one creator at a time (several nodes starting)
            for statement in (SCHEMA.format(**self.types) + UNIQUE_INDEXES).split(";"):
                if statement.strip():
                    db.run(statement)
        _add_columns(self, lambda db, table: {r["column_name"] for r in db.all(
            "SELECT column_name FROM information_schema.columns WHERE table_name = ?", (table,))})


def _add_columns(backend: _Backend, columns_of) -> None:
    with backend.transaction() as db:
        for table, added in ADDED_COLUMNS.items():
            present = columns_of(db, table)
            for name, definition in added.items():
                if name not in present:  # a database made by an earlier version
                    db.run(f"ALTER TABLE {table} ADD COLUMN {name} {definition.format(**backend.types)}")


def open_backend(location: Path | str, create: bool) -> _Backend:
    if isinstance(location, str) and location.lower().startswith(("postgresql://", "postgres://")):
        return _PostgreSQL(location, create)
    return _SQLite(Path(location), create)


#: The node's own jobs, or those of studies analysed in place in a PACS (``from_pacs``).
_SOURCE = {False: "source_id IS NULL", True: "source_id IS NOT NULL"}


class JobStore:
    """The job store at ``location`` (an SQLite file or a ``postgresql://`` URL); safe from threads and processes.

    Each call is one short transaction on the calling thread's own connection.
    ``create``: make or upgrade the schema (idempotent); without it the store
    must exist already (FileNotFoundError naming it otherwise).
    """

    def __init__(self, location: Path | str, *, create: bool = True):
        self.location = location
        #: how many calls found the store unavailable (a receiver restarts the stability clock after them)
        self.outages = 0
        self._backend = open_backend(location, create)
        if create:
            self._backend.create_schema()

    @property
    def shared(self) -> bool:
        """A server several machines may use (PostgreSQL), not a file of this machine."""
        return isinstance(self._backend, _PostgreSQL)

    def describe(self) -> str:
        return describe_location(self.location)

    def upgrade(self) -> None:
        """Create the tables, or add what an earlier version's database lacks (``lobevol db init``)."""
        self._backend.create_schema()

    @contextmanager
    def _transaction(self) -> Iterator[_Transaction]:
        try:
            with self._backend.transaction() as db:
                yield db
        except StoreUnavailable:
            self.outages += 1
            raise

    @contextmanager
    def _read(self) -> Iterator[_Transaction]:
        try:
            with self._backend.read() as db:
                yield db
        except StoreUnavailable:
            self.outages += 1
            raise

    def _event(self, db: _Transaction, job_id: int, state: JobState, message: str = "") -> None:
        db.run("INSERT INTO events (job_id, at, state, message) VALUES (?, ?, ?, ?)",
               (job_id, time.time(), state.value, message))

    # -- receiving ---------------------------------------------------------------------------

    def study_instance_count(self, study_uid: str) -> int:
        """Instances of the study currently in the spool."""
        with self._read() as db:
            return int(db.one("SELECT COUNT(*) AS n FROM instances WHERE study_uid = ?", (study_uid,))["n"])

    def has_instance(self, sop_instance_uid: str) -> bool:
        with self._read() as db:
            return db.one("SELECT 1 AS x FROM instances WHERE sop_instance_uid = ?", (sop_instance_uid,)) is not None

    def record_instance(self, study_uid: str, series_uid: str, sop_class_uid: str, sop_instance_uid: str,
                        path: Path, size: int, origin_ae: str, digest: str = "") -> int:
        """Record a spooled instance in its study's open job (created when there is none); returns the job id."""
        received = ReceivedInstance(study_uid, series_uid, sop_class_uid, sop_instance_uid, str(path), size, origin_ae,
                                    digest)
        return self.record_instances([received])[0]

    def record_instances(self, received: Sequence[ReceivedInstance]) -> list[int]:
        """Record spooled instances in one transaction (one commit, one fsync); returns each one's job id.

        The instances may belong to several studies; each goes to its study's open
        job, created when there is none. Either all are recorded or none. An
        instance counts as new for its job (``new_instances``) unless the study
        already had it with the same digest.
        """
        now = time.time()
        job_ids = []
        with self._transaction() as db:
            for instance in received:
                job_id = self._open_job(db, instance.study_uid, instance.origin_ae, now)
                previous = db.one("SELECT job_id, digest FROM instances WHERE sop_instance_uid = ?",
                                  (instance.sop_instance_uid,))
                db.run(
                    "INSERT INTO instances (sop_instance_uid, study_uid, series_uid, sop_class_uid, path, size, "
                    "received_at, job_id, digest) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?) ON CONFLICT (sop_instance_uid) "
                    "DO UPDATE SET study_uid = excluded.study_uid, series_uid = excluded.series_uid, "
                    "sop_class_uid = excluded.sop_class_uid, path = excluded.path, size = excluded.size, "
                    "received_at = excluded.received_at, job_id = excluded.job_id, digest = excluded.digest",
                    (instance.sop_instance_uid, instance.study_uid, instance.series_uid, instance.sop_class_uid,
                     instance.path, instance.size, now, job_id, instance.digest))
                counted = previous is not None and previous["job_id"] == job_id
                new = previous is None or not instance.digest or previous["digest"] != instance.digest
                if not counted or new:
                    db.run("UPDATE jobs SET instances = instances + ?, new_instances = new_instances + ? WHERE id = ?",
                           (int(not counted), int(new), job_id))
                job_ids.append(job_id)
        return job_ids

    def record_ignored(self, study_uid: str, origin_ae: str) -> int:
        """Count an instance we do not need (not CT) in its study's open job; returns the job id."""
        now = time.time()
        with self._transaction() as db:
            job_id = self._open_job(db, study_uid, origin_ae, now)
            db.run("UPDATE jobs SET ignored = ignored + 1 WHERE id = ?", (job_id,))
        return job_id

    def _open_job(self, db: _Transaction, study_uid: str, origin_ae: str, now: float) -> int:
        row = db.one("SELECT id FROM jobs WHERE study_uid = ? AND state = 'received' ORDER BY id DESC LIMIT 1",
                     (study_uid,))
        if row is None:
            later_run = db.one("SELECT COUNT(*) AS n FROM jobs WHERE study_uid = ?", (study_uid,))["n"]
            # Two receivers of one shared store may open the study's job at once: the unique index keeps one.
            row = db.one(
                "INSERT INTO jobs (study_uid, state, origin_ae, created_at, updated_at, last_instance_at) "
                "VALUES (?, 'received', ?, ?, ?, ?) ON CONFLICT (study_uid) WHERE state = 'received' DO NOTHING "
                "RETURNING id", (study_uid, origin_ae, now, now, now))
            if row is not None:
                job_id = int(row["id"])
                self._event(db, job_id, JobState.RECEIVED, f"run {later_run + 1} of this study" if later_run else "")
                return job_id
            row = db.one("SELECT id FROM jobs WHERE study_uid = ? AND state = 'received'", (study_uid,))
        db.run("UPDATE jobs SET last_instance_at = ?, updated_at = ?, origin_ae = ? WHERE id = ?",
               (now, now, origin_ae, row["id"]))
        return int(row["id"])

    def record_complete_study(self, study_uid: str, source_id: str, origin: str) -> tuple[int, bool]:
        """A study its PACS reports complete (``source_id``: its id there): a selected job whose input is to fetch.

        Returns (job id, created): a job of the same study still waiting for its
        input takes the report instead (its fetch will see every instance).
        """
        now = time.time()
        with self._transaction() as db:
            row = db.one("SELECT id FROM jobs WHERE source_id = ? AND state = 'selected' AND input_ready = 0 "
                         "ORDER BY id DESC LIMIT 1", (source_id,))
            if row is not None:
                return int(row["id"]), False
            earlier = db.one("SELECT COUNT(*) AS n FROM jobs WHERE study_uid = ?", (study_uid,))["n"]
            row = db.one(
                "INSERT INTO jobs (study_uid, state, origin_ae, created_at, updated_at, last_instance_at, source_id) "
                "VALUES (?, 'selected', ?, ?, ?, ?, ?) RETURNING id", (study_uid, origin, now, now, now, source_id))
            job_id = int(row["id"])
            self._event(db, job_id, JobState.SELECTED, "study complete in the PACS"
                        + (f", run {earlier + 1} of this study" if earlier else ""))
        return job_id, True

    def queue_cohort_study(self, study_uid: str, paths: Sequence[str], cohort: str) -> tuple[int, bool]:
        """Queue one study of an offline cohort (``lobevol segment --queue``): a selected job whose input is
        ``paths`` (frozen by the caller, then :meth:`mark_input_ready`).

        Returns (job id, created). A study the cohort queued before, whose latest
        job did not fail, is not queued again: an interrupted cohort resumes
        without redoing what is finished or under way. ``cohort`` names it
        (``origin_ae``: ``COHORT``, the cohort in the first event).
        """
        now = time.time()
        with self._transaction() as db:
            row = db.one("SELECT id, state FROM jobs WHERE study_uid = ? AND origin_ae = ? AND source_id IS NULL "
                         "ORDER BY id DESC LIMIT 1", (study_uid, COHORT_ORIGIN))
            if row is not None and row["state"] != JobState.FAILED.value:
                return int(row["id"]), False
            row = db.one("INSERT INTO jobs (study_uid, state, origin_ae, instances, new_instances, created_at, "
                         "updated_at, last_instance_at) VALUES (?, 'selected', ?, ?, ?, ?, ?, ?) RETURNING id",
                         (study_uid, COHORT_ORIGIN, len(paths), len(paths), now, now, now))
            job_id = int(row["id"])
            for path in paths:
                db.run("INSERT INTO job_inputs (job_id, path) VALUES (?, ?)", (job_id, str(path)))
            self._event(db, job_id, JobState.SELECTED, f"queued with cohort {cohort}, {len(paths)} instance(s)")
        return job_id, True

    def latest_job_of_source(self, source_id: str) -> Job | None:
        with self._read() as db:
            row = db.one("SELECT * FROM jobs WHERE source_id = ? ORDER BY id DESC LIMIT 1", (source_id,))
        return None if row is None else _job(row)

    def cursor(self, name: str) -> int | None:
        """A position kept for a PACS's change log (e.g. the last Orthanc change seen), None when never set."""
        with self._read() as db:
            row = db.one("SELECT value FROM cursors WHERE name = ?", (name,))
        return None if row is None else int(row["value"])

    def set_cursor(self, name: str, value: int) -> None:
        with self._transaction() as db:
            db.run("INSERT INTO cursors (name, value) VALUES (?, ?) ON CONFLICT (name) DO UPDATE SET value = "
                   "excluded.value", (name, int(value)))

    def record_fetched_input(self, job_id: int, instances: int, ignored: int) -> None:
        """The job's input is fetched from its PACS: ``instances`` kept, ``ignored`` not needed (not CT)."""
        with self._transaction() as db:
            db.run("UPDATE jobs SET instances = ?, ignored = ?, input_ready = 1, updated_at = ? WHERE id = ?",
                   (instances, ignored, time.time(), job_id))

    # -- selection ---------------------------------------------------------------------------

    def select_stable(self, stability_s: float, now: float | None = None) -> list[int]:
        """Move jobs quiet for ``stability_s`` to selected, fixing their input list; returns their ids.

        A job with no CT instance at all (only ignored ones) ends as skipped; so
        does one with nothing new since an earlier job that was not failed
        (:func:`node.service.intake.nothing_new`): its results are already in the study.
        """
        from node.service.intake import nothing_new

        now = time.time() if now is None else now
        selected = []
        with self._transaction() as db:
            rows = db.all("SELECT id, study_uid, ignored, new_instances FROM jobs WHERE state = 'received' "
                          "AND last_instance_at <= ? ORDER BY id" + self._backend.lock_rows, (now - stability_s,))
            for row in rows:
                paths = [r["path"] for r in db.all("SELECT path FROM instances WHERE study_uid = ? ORDER BY path",
                                                   (row["study_uid"],))]
                if not paths:
                    reason = f"no CT instance received ({row['ignored']} other instance(s) ignored)"
                    self._set_state(db, row["id"], JobState.SKIPPED, reason, final=True)
                    continue
                for path in paths:
                    db.run("INSERT INTO job_inputs (job_id, path) VALUES (?, ?)", (row["id"], path))
                earlier = db.one("SELECT id FROM jobs WHERE study_uid = ? AND id < ? AND state IN "
                                 "('selected', 'processing', 'sending', 'done') ORDER BY id DESC LIMIT 1",
                                 (row["study_uid"], row["id"]))
                reason = nothing_new(row["new_instances"], len(paths), row["ignored"],
                                     None if earlier is None else f"job {earlier['id']}",
                                     f"lobevol retry {row['id']} analyses it again")
                if reason is not None:
                    self._set_state(db, row["id"], JobState.SKIPPED, reason, final=True)
                    continue
                self._set_state(db, row["id"], JobState.SELECTED, f"{len(paths)} instance(s)")
                selected.append(int(row["id"]))
        return selected

    def job_inputs(self, job_id: int) -> list[Path]:
        with self._read() as db:
            rows = db.all("SELECT path FROM job_inputs WHERE job_id = ?", (job_id,))
        return [Path(r["path"]) for r in rows]

    def mark_input_ready(self, job_id: int) -> None:
        with self._transaction() as db:
            db.run("UPDATE jobs SET input_ready = 1, updated_at = ? WHERE id = ?", (time.time(), job_id))

    def jobs_needing_input(self, *, from_pacs: bool = False, quiet_s: float = 0.0) -> list[int]:
        """Selected jobs whose input folder was not (completely) built yet, e.g. after a crash or a retry.

        ``from_pacs``: jobs of studies analysed in place in a PACS (with a source_id), else the node's own.
        ``quiet_s``: only jobs unchanged for that long (several receivers share a store: the one that
        selected a job builds its input at once; the others step in only when it did not).
        """
        with self._read() as db:
            rows = db.all("SELECT id FROM jobs WHERE state = 'selected' AND input_ready = 0 AND updated_at <= ? AND "
                          + _SOURCE[from_pacs], (time.time() - quiet_s,))
        return [int(r["id"]) for r in rows]

    # -- processing under leases -------------------------------------------------------------

    def claim_next(self, *, from_pacs: bool = False, owner: str | None = None, lease_s: float = LEASE_S,
                   max_crashes: int = MAX_CRASHES) -> Job | None:
        """The oldest selected job with its input ready, moved to processing under a fresh lease; None when none.

        Jobs whose lease expired first count a crash each (their worker was killed,
        frozen or cut off) and go back to selected, or fail after ``max_crashes``.
        ``owner`` names the claiming worker (default ``host:pid``); ``from_pacs`` as
        in :meth:`jobs_needing_input`: a node and the Orthanc plugin may share one store.
        """
        owner = owner or default_owner()
        with self._transaction() as db:
            now = db.now()
            expired = db.all("SELECT id, lease_owner FROM jobs WHERE state = 'processing' AND lease_expires_at < ? "
                             f"AND {_SOURCE[from_pacs]}" + self._backend.lock_rows, (now,))
            for row in expired:
                self._count_crash(db, row["id"], f"its worker {row['lease_owner']} stopped renewing its lease "
                                  "(killed, frozen or cut off)", max_crashes)
            row = db.one("SELECT id FROM jobs WHERE state = 'selected' AND input_ready = 1 AND "
                         f"{_SOURCE[from_pacs]} ORDER BY id LIMIT 1" + self._backend.lock_rows)
            if row is None:
                return None
            db.run("UPDATE jobs SET attempts = attempts + 1, lease_owner = ?, lease_token = ?, lease_expires_at = ?, "
                   "claimed_at = ? WHERE id = ?", (owner, uuid.uuid4().hex, now + lease_s, now, row["id"]))
            self._set_state(db, row["id"], JobState.PROCESSING, f"claimed by {owner}")
            job = _job(db.one("SELECT * FROM jobs WHERE id = ?", (row["id"],)))
        return job

    def renew_lease(self, job_id: int, token: str, lease_s: float = LEASE_S) -> float:
        """Extend the lease of a job the caller holds; returns the new expiry. StaleLease when it is no longer held."""
        with self._transaction() as db:
            expires = db.now() + lease_s
            if not db.count("UPDATE jobs SET lease_expires_at = ? WHERE id = ? AND lease_token = ? AND "
                            "state = 'processing'", (expires, job_id, token)):
                raise StaleLease(f"job {job_id} is no longer held by this worker (its lease expired and another "
                                 "worker took it over, or an operator moved it)")
        return expires

    def _check_lease(self, db: _Transaction, job_id: int, token: str | None) -> None:
        if token is None:
            return
        row = db.one("SELECT state, lease_token, lease_owner FROM jobs WHERE id = ?" + self._backend.lock_row, (job_id,))
        if row is None or row["state"] != JobState.PROCESSING.value or row["lease_token"] != token:
            holder = f"now {row['state']}" + (f", held by {row['lease_owner']}" if row and row["lease_owner"] else "") \
                if row else "gone"
            raise StaleLease(f"job {job_id} is no longer held by this worker ({holder}): its outcome is discarded")

    def finish_analysis(self, job_id: int, status: JobState | str, reason: str, summary: str, results_dir: str | None,
                        deliveries: Sequence[Delivery], *, token: str | None = None) -> JobState:
        """End a job's analysis; "done" queues ``deliveries`` in the same transaction. Returns the new state.

        ``status`` is the pipeline's: done, skipped or failed. A done job with
        nothing to deliver (no destination) ends as done, with ``reason``.
        ``token``: the caller's lease; StaleLease when it no longer holds the job
        (nothing is recorded: the worker that took the job over records its own).
        """
        value = getattr(status, "value", status)
        if value not in [s.value for s in ANALYSIS_STATES]:
            raise ValueError(f"analysis status {status!r} is not done, skipped or failed")
        status = JobState(value)
        now = time.time()
        with self._transaction() as db:
            self._check_lease(db, job_id, token)
            db.run("UPDATE jobs SET summary = ?, results_dir = ?, lease_token = NULL, lease_expires_at = NULL "
                   "WHERE id = ?", (summary, results_dir, job_id))
            if status == JobState.DONE and deliveries:
                for d in deliveries:
                    db.run("INSERT INTO outbox (job_id, destination, path, sop_class_uid, sop_instance_uid, "
                           "next_attempt_at) VALUES (?, ?, ?, ?, ?, ?) ON CONFLICT (job_id, destination, "
                           "sop_instance_uid) DO NOTHING",
                           (job_id, d.destination, d.path, d.sop_class_uid, d.sop_instance_uid, now))
                self._set_state(db, job_id, JobState.SENDING, reason)
                return JobState.SENDING
            self._set_state(db, job_id, status, reason, final=True)
            return status

    def record_crash(self, job_id: int, reason: str, max_crashes: int = MAX_CRASHES, *,
                     token: str | None = None) -> JobState:
        """The worker died while analysing the job (killed, out of memory, a segfault); returns the new state.

        The job goes back to selected, to be analysed again by a fresh worker,
        until it has crashed ``max_crashes`` times: it then fails, naming the
        crashes, so that one study that always crashes the worker cannot loop.
        """
        if max_crashes < 1:
            raise ValueError(f"max_crashes must be at least 1, got {max_crashes}")
        with self._transaction() as db:
            self._check_lease(db, job_id, token)
            return self._count_crash(db, job_id, reason, max_crashes)

    def _count_crash(self, db: _Transaction, job_id: int, reason: str, max_crashes: int) -> JobState:
        db.run("UPDATE jobs SET crashes = crashes + 1, lease_token = NULL, lease_expires_at = NULL WHERE id = ?",
               (job_id,))
        crashes = db.one("SELECT crashes FROM jobs WHERE id = ?", (job_id,))["crashes"]
        if crashes >= max_crashes:
            self._set_state(db, job_id, JobState.FAILED, f"{reason}; the worker crashed {crashes} times on this study "
                            f"(max_crashes = {max_crashes}): not analysed again", final=True)
            return JobState.FAILED
        self._set_state(db, job_id, JobState.SELECTED, f"{reason}; analysed again (crash {crashes} of at most "
                        f"{max_crashes})")
        return JobState.SELECTED

    def recover(self, *, from_pacs: bool = False, owner: str | None = None) -> list[int]:
        """After a restart: jobs ``owner`` (default: this host's) held in processing go back to selected.

        Not a crash: the worker stopped with its node (a kill -9 of the node
        included). Jobs other workers hold stay theirs until their leases expire.
        """
        with self._transaction() as db:
            holders = ("lease_owner IS NULL OR lease_owner = ?", (owner,)) if owner else (
                "lease_owner IS NULL OR lease_owner LIKE ?", (f"{socket.gethostname()}:%",))
            rows = db.all(f"SELECT id FROM jobs WHERE state = 'processing' AND {_SOURCE[from_pacs]} AND "
                          f"({holders[0]})" + self._backend.lock_rows, holders[1])
            for row in rows:
                db.run("UPDATE jobs SET lease_token = NULL, lease_expires_at = NULL WHERE id = ?", (row["id"],))
                self._set_state(db, row["id"], JobState.SELECTED, "resumed after a restart")
        return [int(r["id"]) for r in rows]

    def restart_stability_clock(self) -> int:
        """Studies still being received count their quiet time from now (at start, after a store outage).

        A sender cut off by our stop (or refused while the store was unavailable)
        can only resend later; without this, a study interrupted mid-receive would
        look complete at once and split into two jobs.
        """
        now = time.time()
        with self._transaction() as db:
            return db.count("UPDATE jobs SET last_instance_at = ? WHERE state = 'received'", (now,))

    def requeue(self, job_id: int, message: str, *, token: str | None = None) -> None:
        """Put a processing job back to selected, not as a crash (a stop's checkpoint)."""
        with self._transaction() as db:
            self._check_lease(db, job_id, token)
            db.run("UPDATE jobs SET lease_token = NULL, lease_expires_at = NULL WHERE id = ?", (job_id,))
            self._set_state(db, job_id, JobState.SELECTED, message)

    def retry(self, job_id: int) -> str:
        """Retry a failed job (undelivered results are sent again, else the analysis runs again) or force a
        skipped one whose input was unchanged to be analysed again.

        Returns what was done, in words. ValueError when the job cannot be retried.
        """
        job = self.get(job_id)
        if job.state == JobState.SKIPPED and self.job_inputs(job_id):
            with self._transaction() as db:
                db.run("UPDATE jobs SET finished_at = NULL, input_ready = 0, crashes = 0 WHERE id = ?", (job_id,))
                self._set_state(db, job_id, JobState.SELECTED, "retry requested: analysed although nothing changed")
            return "analysis queued again (forced: the input had not changed)"
        if job.state != JobState.FAILED:
            raise ValueError(f"job {job_id} is {job.state}, not failed: only failed jobs (and skipped ones that "
                             "had images) can be retried")
        with self._transaction() as db:
            failed = db.count("UPDATE outbox SET state = 'pending', attempts = 0, next_attempt_at = ?, detail = '', "
                              "lease_token = NULL, lease_expires_at = NULL WHERE job_id = ? AND state = 'failed'",
                              (time.time(), job_id))
            if failed:
                db.run("UPDATE jobs SET finished_at = NULL WHERE id = ?", (job_id,))
                self._set_state(db, job_id, JobState.SENDING, "retry requested")
                return f"{failed} undelivered result(s) queued again"
        if job.source_id is not None:  # the PACS still holds the study: fetch it again
            with self._transaction() as db:
                db.run("UPDATE jobs SET finished_at = NULL, input_ready = 0, crashes = 0 WHERE id = ?", (job_id,))
                self._set_state(db, job_id, JobState.SELECTED, "retry requested")
            return "analysis queued again (the study is fetched again)"
        if job.images_removed or not job.input_ready:
            raise ValueError(f"job {job_id}: its input images are gone (retention); send the study again")
        with self._transaction() as db:  # an operator's retry gives a study that crashed the worker a fresh count
            db.run("UPDATE jobs SET finished_at = NULL, crashes = 0 WHERE id = ?", (job_id,))
            self._set_state(db, job_id, JobState.SELECTED, "retry requested")
        return "analysis queued again"

    # -- outbox ------------------------------------------------------------------------------

    def due_deliveries(self, now: float | None = None, *, from_pacs: bool = False) -> list[OutboxItem]:
        """Pending items due by ``now`` (read only: senders claim them with :meth:`claim_deliveries`)."""
        now = time.time() if now is None else now
        with self._read() as db:
            rows = db.all("SELECT * FROM outbox WHERE state = 'pending' AND next_attempt_at <= ? AND job_id IN "
                          f"(SELECT id FROM jobs WHERE {_SOURCE[from_pacs]}) ORDER BY id", (now,))
        return [OutboxItem(**r) for r in rows]

    def claim_deliveries(self, owner: str | None = None, lease_s: float = LEASE_S, now: float | None = None, *,
                         from_pacs: bool = False) -> list[OutboxItem]:
        """Due pending items no other sender holds, leased to ``owner`` under one token (on each item)."""
        now = time.time() if now is None else now
        owner = owner or default_owner()
        with self._transaction() as db:
            clock = db.now()
            rows = db.all("SELECT id FROM outbox WHERE state = 'pending' AND next_attempt_at <= ? AND "
                          "(lease_expires_at IS NULL OR lease_expires_at < ?) AND job_id IN "
                          f"(SELECT id FROM jobs WHERE {_SOURCE[from_pacs]}) ORDER BY id" + self._backend.lock_rows,
                          (now, clock))
            if not rows:
                return []
            token = uuid.uuid4().hex
            for row in rows:
                db.run("UPDATE outbox SET lease_owner = ?, lease_token = ?, lease_expires_at = ? WHERE id = ?",
                       (owner, token, clock + lease_s, row["id"]))
            claimed = db.all(f"SELECT * FROM outbox WHERE id IN ({', '.join('?' * len(rows))}) ORDER BY id",
                             [r["id"] for r in rows])
        return [OutboxItem(**r) for r in claimed]

    def renew_delivery_leases(self, token: str, lease_s: float = LEASE_S) -> int:
        """Extend the leases of the pending items claimed with ``token``; returns how many are still held."""
        with self._transaction() as db:
            return db.count("UPDATE outbox SET lease_expires_at = ? WHERE lease_token = ? AND state = 'pending'",
                            (db.now() + lease_s, token))

    def next_delivery_time(self, *, from_pacs: bool = False) -> float | None:
        with self._read() as db:
            row = db.one("SELECT MIN(next_attempt_at) AS t FROM outbox WHERE state = 'pending' AND job_id IN "
                         f"(SELECT id FROM jobs WHERE {_SOURCE[from_pacs]})")
        return row["t"]

    def record_delivery(self, item_id: int, state: str, detail: str = "", *, token: str | None = None) -> None:
        """Record the outcome of one item: sent, refused (not retried) or failed (given up).

        ``token``: the caller's delivery lease; StaleLease when another sender took the item over.
        """
        if state not in ("sent", "refused", "failed"):
            raise ValueError(f"delivery state {state!r} is not sent, refused or failed")
        with self._transaction() as db:
            self._delivery_update(db, item_id, token, "state = ?, attempts = attempts + 1, detail = ?", (state, detail))

    def postpone_delivery(self, item_id: int, detail: str, next_attempt_at: float, *, token: str | None = None) -> None:
        """One more failed attempt; the item stays pending until ``next_attempt_at`` (its lease released)."""
        with self._transaction() as db:
            self._delivery_update(db, item_id, token, "attempts = attempts + 1, detail = ?, next_attempt_at = ?",
                                  (detail, next_attempt_at))

    def release_deliveries(self, token: str) -> int:
        """Give back the pending items claimed with ``token`` (a stop): due again at once for any sender."""
        with self._transaction() as db:
            return db.count("UPDATE outbox SET lease_token = NULL, lease_expires_at = NULL WHERE lease_token = ?",
                            (token,))

    def _delivery_update(self, db: _Transaction, item_id: int, token: str | None, assignments: str,
                         values: tuple) -> None:
        condition, extra = ("id = ?", ()) if token is None else ("id = ? AND lease_token = ?", (token,))
        changed = db.count(f"UPDATE outbox SET {assignments}, lease_token = NULL, lease_expires_at = NULL "
                           f"WHERE {condition}", (*values, item_id, *extra))
        if not changed and token is not None:
            raise StaleLease(f"delivery {item_id} is no longer held by this sender (another took it over)")

    def outbox(self, job_id: int) -> list[OutboxItem]:
        with self._read() as db:
            rows = db.all("SELECT * FROM outbox WHERE job_id = ? ORDER BY id", (job_id,))
        return [OutboxItem(**r) for r in rows]

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
            current = db.one("SELECT state FROM jobs WHERE id = ?" + self._backend.lock_row, (job_id,))["state"]
            if current != JobState.SENDING.value:
                return JobState(current)
            reason = f"{sent} of {len(items)} result deliveries made" + ("; " + "; ".join(problems) if problems else "")
            self._set_state(db, job_id, JobState.FAILED if failed else JobState.DONE, reason, final=True)
        return JobState.FAILED if failed else JobState.DONE

    # -- workers -----------------------------------------------------------------------------

    def heartbeat(self, name: str, role: str, activity: str, job_id: int | None = None) -> None:
        """Say that worker ``name`` (this process) is alive and what it does (``job_id``: the job it holds)."""
        host, pid = socket.gethostname(), os.getpid()
        with self._transaction() as db:
            now = db.now()
            row = db.one("SELECT host, pid, job_id, since, stopped_at FROM workers WHERE name = ?", (name,))
            if row is not None and (row["host"], row["pid"]) == (host, pid) and row["stopped_at"] is None:
                since = row["since"] if row["job_id"] == job_id else now
                db.run("UPDATE workers SET heartbeat_at = ?, activity = ?, job_id = ?, since = ? WHERE name = ?",
                       (now, activity, job_id, since, name))
                return
            db.run("INSERT INTO workers (name, host, pid, role, started_at, heartbeat_at, activity, job_id, since) "
                   "VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?) ON CONFLICT (name) DO UPDATE SET host = excluded.host, "
                   "pid = excluded.pid, role = excluded.role, started_at = excluded.started_at, "
                   "heartbeat_at = excluded.heartbeat_at, activity = excluded.activity, job_id = excluded.job_id, "
                   "since = excluded.since, stopped_at = NULL", (name, host, pid, role, now, now, activity, job_id, now))

    def worker_stopped(self, name: str, activity: str) -> None:
        with self._transaction() as db:
            now = db.now()
            db.run("UPDATE workers SET stopped_at = ?, heartbeat_at = ?, activity = ?, job_id = NULL, since = ? "
                   "WHERE name = ? AND pid = ?", (now, now, activity, now, name, os.getpid()))

    def workers(self) -> tuple[float, list[WorkerRecord]]:
        """(the store's clock now, every worker ever seen), most recent heartbeat first."""
        with self._read() as db:
            now = db.now()
            rows = db.all("SELECT * FROM workers ORDER BY heartbeat_at DESC")
        return now, [WorkerRecord(**r) for r in rows]

    def holders(self) -> list[Job]:
        """Jobs in processing, with who holds them since when (``lease_owner``, ``claimed_at``)."""
        return self.jobs(limit=1000, states=[JobState.PROCESSING])

    # -- reading, retention ------------------------------------------------------------------

    def get(self, job_id: int) -> Job:
        with self._read() as db:
            row = db.one("SELECT * FROM jobs WHERE id = ?", (job_id,))
        if row is None:
            raise ValueError(f"there is no job {job_id}")
        return _job(row)

    def jobs(self, *, limit: int = 20, states: Sequence[JobState | str] | None = None) -> list[Job]:
        """Most recent jobs first."""
        query, arguments = "SELECT * FROM jobs", []
        if states:
            query += f" WHERE state IN ({', '.join('?' * len(states))})"
            arguments += [getattr(s, "value", s) for s in states]
        with self._read() as db:
            rows = db.all(query + " ORDER BY id DESC LIMIT ?", (*arguments, limit))
        return [_job(r) for r in rows]

    def counts(self) -> dict[str, int]:
        with self._read() as db:
            rows = db.all("SELECT state, COUNT(*) AS n FROM jobs GROUP BY state")
        return {r["state"]: int(r["n"]) for r in rows}

    def events(self, job_id: int) -> list[tuple[float, str, str]]:
        with self._read() as db:
            rows = db.all(f"SELECT at, state, message FROM events WHERE job_id = ? ORDER BY {self._backend.event_order}",
                          (job_id,))
        return [(r["at"], r["state"], r["message"]) for r in rows]

    def expired_images(self, older_than: float) -> list[Job]:
        """Done or skipped jobs that ended before ``older_than`` and still hold their input images."""
        with self._read() as db:
            rows = db.all("SELECT * FROM jobs WHERE state IN ('done', 'skipped') AND images_removed = 0 AND "
                          "finished_at <= ?", (older_than,))
        return [_job(r) for r in rows]

    def study_is_idle(self, study_uid: str) -> bool:
        """True when no job of the study is unfinished or failed (its received images may go)."""
        with self._read() as db:
            row = db.one("SELECT COUNT(*) AS n FROM jobs WHERE study_uid = ? AND state NOT IN ('done', 'skipped')",
                         (study_uid,))
        return row["n"] == 0

    def forget_study_instances(self, study_uid: str) -> None:
        with self._transaction() as db:
            db.run("DELETE FROM instances WHERE study_uid = ?", (study_uid,))

    def mark_images_removed(self, job_id: int) -> None:
        with self._transaction() as db:
            db.run("UPDATE jobs SET images_removed = 1 WHERE id = ?", (job_id,))

    def expired_results(self, older_than: float) -> list[Job]:
        with self._read() as db:
            rows = db.all("SELECT * FROM jobs WHERE state IN ('done', 'skipped', 'failed') AND results_removed = 0 "
                          "AND finished_at <= ?", (older_than,))
        return [_job(r) for r in rows]

    def mark_results_removed(self, job_id: int) -> None:
        with self._transaction() as db:
            db.run("UPDATE jobs SET results_removed = 1 WHERE id = ?", (job_id,))

    def _set_state(self, db: _Transaction, job_id: int, state: JobState, reason: str = "", *,
                   final: bool = False) -> None:
        if state not in STATES:
            raise ValueError(f"unknown job state {state!r}")
        now = time.time()
        if state != JobState.PROCESSING:
            db.run("UPDATE jobs SET lease_owner = NULL WHERE id = ?", (job_id,))
        db.run("UPDATE jobs SET state = ?, reason = ?, updated_at = ?, finished_at = ? WHERE id = ?",
               (state.value, reason, now, now if final else None, job_id))
        self._event(db, job_id, state, reason)


_JOB_FIELDS = {f.name for f in fields(Job)}


def _job(row: dict) -> Job:
    values = {k: v for k, v in row.items() if k in _JOB_FIELDS}
    for name in ("input_ready", "images_removed", "results_removed"):
        values[name] = bool(values[name])
    values["state"] = JobState(values["state"])
    return Job(**values)


def _sop_class_name(uid: str) -> str:
    from pydicom.uid import UID

    name = UID(uid).name
    return name if name and name != uid else uid
