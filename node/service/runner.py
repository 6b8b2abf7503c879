"""The job runner: the one owner of a job's life-cycle, whatever receives the studies.

``lobevol serve``, ``lobevol worker`` and the Orthanc plugin each build one
:class:`JobRunner` around a :class:`node.service.jobs.JobStore` and a
:class:`node.service.worker.Worker` (the model loaded once, in its own
process) and differ only in where a job's input comes from and where its
results go (:class:`RunnerSettings`' callables). The runner:

- claims the oldest ready job under a lease (owner = the runner's name, a fresh
  token, an expiry) and renews the lease from a second thread while the worker
  process analyses;
- finishes the job with its token: a runner whose lease expired meanwhile (it
  was frozen, or cut off from the store) is refused and drops its outcome, so a
  study gets one result set whoever analysed it;
- counts a worker process that dies mid-analysis as a crash (the job is analysed
  again by a fresh process, and fails after ``max_crashes``); a lease that
  expires counts the same, when another runner finds it;
- treats a stop (SIGTERM, Ctrl-C, ``systemctl stop``) as a stop, not a crash: the
  running job finishes within the grace time or goes back to selected, and runs
  again at the next start;
- survives every store error: a claim or a finish that fails (database locked,
  disk full, server down) is retried with backoff and logged; the outcome of an
  analysis is kept, and the lease renewed, until it is recorded;
- writes a heartbeat (``workers`` table) saying what it does, so that ``lobevol
  status`` shows, across machines, which runner holds which job since when, and
  a runner whose loop is not running.
"""
from __future__ import annotations

import logging
import socket
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Sequence

from node.service.jobs import LEASE_S, MAX_CRASHES, Delivery, Job, JobState, JobStore, StaleLease, StoreUnavailable
from node.service.worker import JobOutcome, JobRequest, Worker, WorkerCrashed, WorkerStopped, WorkerTimedOut

log = logging.getLogger(__name__)

#: Seconds between heartbeats; ``lobevol status`` calls a runner silent for 3 of them not running.
HEARTBEAT_S = 5.0
IDLE_WAIT_S = 1.0
WORKER_RESTART_DELAY_S = 5.0
#: Backoff of a store operation that failed: first, factor, most (s).
BACKOFF_S = (0.5, 2.0, 10.0)


def default_name(role: str) -> str:
    """A runner's name when none is configured: the host and the role (``imaging-3-serve``)."""
    return f"{socket.gethostname()}-{role}"


@dataclass(frozen=True)
class RunnerSettings:
    """What a runner needs besides its store and worker.

    Attributes:
        name: the lease owner and the ``workers`` row (stable across restarts of the same runner:
            a restarted runner takes back the jobs it held, without counting crashes).
        role: serve, worker or orthanc (shown by ``lobevol status``).
        results_dir: each attempt writes into ``results_dir/<job id>/<attempt>``.
        input_dir: the folder of a job's frozen input.
        deliveries: the result deliveries of a done job from its result files, and notes for its reason.
        from_pacs: run the jobs of studies held by a PACS (the Orthanc plugin's), not the node's.
        job_timeout_s: an analysis running longer is killed and fails the job.
        grace_s: at a stop, how long the running analysis may still finish.
        housekeeping: called before each claim (fetching inputs, sending, retention); its errors are logged.
        on_finished: called after a job's analysis is recorded (e.g. to wake the sender).
    """

    name: str
    role: str
    results_dir: Path
    input_dir: Callable[[Job], Path]
    deliveries: Callable[[Job, Sequence[str]], tuple[list[Delivery], list[str]]]
    job_timeout_s: float
    grace_s: float = 0.0
    from_pacs: bool = False
    lease_s: float = LEASE_S
    max_crashes: int = MAX_CRASHES
    housekeeping: Callable[[], None] | None = None
    on_finished: Callable[[Job, JobState], None] | None = None
    log_prefix: str = ""
    #: the level of "worker ready" (Orthanc shows only warnings without --verbose)
    announce_level: int = logging.INFO


@dataclass
class _Lease:
    """A claimed job's lease, renewed by a thread until released; ``lost`` once another holds the job."""

    jobs: JobStore
    job: Job
    lease_s: float
    lost: threading.Event = field(default_factory=threading.Event)
    _done: threading.Event = field(default_factory=threading.Event)

    def __post_init__(self) -> None:
        self._thread = threading.Thread(target=self._renew, name=f"lobevol-lease-{self.job.id}", daemon=True)
        self._thread.start()

    @property
    def token(self) -> str:
        return self.job.lease_token

    def _renew(self) -> None:
        while not self._done.wait(self.lease_s / 3):
            try:
                self.jobs.renew_lease(self.job.id, self.token, self.lease_s)
            except StaleLease as error:
                log.error("job %d: lease lost: %s", self.job.id, error)
                self.lost.set()
                return
            except StoreUnavailable as error:  # renewed at the next period; the lease may still run out
                log.warning("job %d: cannot renew its lease: %s", self.job.id, error)
            except Exception:
                log.exception("job %d: lease renewal error", self.job.id)

    def release(self) -> None:
        self._done.set()
        self._thread.join()


class JobRunner:
    """Runs the ready jobs of ``jobs`` one at a time in ``worker``'s process, under leases (see the module)."""

    def __init__(self, jobs: JobStore, worker: Worker, settings: RunnerSettings):
        self.jobs, self.worker, self.settings = jobs, worker, settings
        self._stopping = threading.Event()
        self._stop_now = threading.Event()
        self._wake = threading.Event()
        self._threads: list[threading.Thread] = []
        self._loop_thread: threading.Thread | None = None
        self.activity = "starting"
        self.current: Job | None = None

    @property
    def name(self) -> str:
        return self.settings.name

    @property
    def running(self) -> bool:
        """The claim loop is running."""
        return self._loop_thread is not None and self._loop_thread.is_alive()

    def _say(self, level: int, message: str, *args) -> None:
        log.log(level, self.settings.log_prefix + message, *args)

    # -- start, stop ---------------------------------------------------------------------------

    def start(self, *, load_model: bool = True) -> None:
        """Take back the jobs this runner held at its last stop, then run the loop (and load the model first)."""
        self._check_name_is_free()
        resumed = self._store(lambda: self.jobs.recover(from_pacs=self.settings.from_pacs, owner=self.name),
                              "take back its jobs")
        if resumed:
            self._say(logging.WARNING, "resuming %d job(s) interrupted by the last stop: %s", len(resumed), resumed)
        if load_model:
            self._start_worker(wait=False)
        self._loop_thread = threading.Thread(target=self._loop, name="lobevol-runner", daemon=True)
        heartbeat = threading.Thread(target=self._heartbeat_loop, name="lobevol-heartbeat", daemon=True)
        for thread in (self._loop_thread, heartbeat):
            thread.start()
            self._threads.append(thread)

    def _store(self, action: Callable[[], object], what: str):
        """Run a store ``action`` until it succeeds (the store may be down at start); None if stopped first."""
        failures = 0
        while not self._stopping.is_set():
            try:
                return action()
            except StoreUnavailable as error:
                failures += 1
                self._say(logging.WARNING, "cannot %s: %s; trying again in %g s", what, error, _backoff(failures))
                self._stopping.wait(_backoff(failures))
        return None

    def _check_name_is_free(self) -> None:
        """Refuse to run under the name of a runner that is alive (same host: its process exists; another: it
        beat within 3 heartbeats): two runners under one name would take each other's jobs back."""
        import os

        try:
            now, workers = self.jobs.workers()
        except StoreUnavailable:
            return
        host = socket.gethostname()
        for record in workers:
            if record.name != self.name or record.stopped_at is not None or (record.host, record.pid) == (host, os.getpid()):
                continue
            alive = _process_exists(record.pid) if record.host == host else now - record.heartbeat_at < 3 * HEARTBEAT_S
            if alive:
                raise RuntimeError(f"a runner named {self.name} is already running (pid {record.pid} on {record.host}, "
                                   f"seen {now - record.heartbeat_at:.0f} s ago): give this one another name")

    def wake(self) -> None:
        """A job may be ready: claim without waiting for the idle period."""
        self._wake.set()

    def request_stop(self, *, now: bool = False) -> None:
        """Begin stopping (safe from a signal handler); ``now``: checkpoint the running job at once, no grace."""
        self._stopping.set()
        if now:
            self._stop_now.set()
        self._wake.set()

    @property
    def stopping(self) -> bool:
        return self._stopping.is_set()

    def stop(self, timeout_s: float | None = None) -> None:
        """Stop: the running job finishes within the grace time or is checkpointed; then the worker process ends."""
        self.request_stop()
        for thread in self._threads:
            thread.join(timeout_s)
        self._threads.clear()
        self.worker.stop()
        try:
            self.jobs.worker_stopped(self.name, "stopped")
        except StoreUnavailable as error:
            self._say(logging.WARNING, "cannot record the stop in the job store: %s", error)

    # -- the loop ------------------------------------------------------------------------------

    def _loop(self) -> None:
        failures = 0
        while not self._stopping.is_set():
            try:
                if self.settings.housekeeping is not None:
                    self._housekeeping()
                if not self.worker.alive and not self._start_worker(wait=True):
                    continue
                self.activity = "idle"
                job = self.jobs.claim_next(from_pacs=self.settings.from_pacs, owner=self.name,
                                           lease_s=self.settings.lease_s, max_crashes=self.settings.max_crashes)
                failures = 0
            except StoreUnavailable as error:
                failures += 1
                delay = _backoff(failures)
                self.activity = f"job store unavailable, retrying: {error}"
                self._say(logging.WARNING, "cannot claim a job (%s); trying again in %g s", error, delay)
                self._stopping.wait(delay)
                continue
            except Exception:  # a bug must not end the loop silently: logged, then the loop goes on
                failures += 1
                self._say(logging.ERROR, "runner error; going on in %g s", _backoff(failures))
                log.exception("runner error")
                self._stopping.wait(_backoff(failures))
                continue
            if job is None:
                self._wake.wait(IDLE_WAIT_S)
                self._wake.clear()
                continue
            try:
                self._run(job)
            except Exception as unexpected:  # never leave a claimed job behind: fail it with the error
                log.exception("job %d: unexpected error", job.id)
                reason = f"internal error: {type(unexpected).__name__}: {unexpected}"
                self._record(job, lambda: self.jobs.finish_analysis(job.id, JobState.FAILED, reason, "", None, [],
                                                                    token=job.lease_token), "record its failure")
            finally:
                self.current = None

    def _housekeeping(self) -> None:
        try:
            self.settings.housekeeping()
        except StoreUnavailable as error:
            self._say(logging.WARNING, "housekeeping: job store unavailable: %s", error)
        except Exception:
            log.exception("housekeeping error")

    def _start_worker(self, *, wait: bool) -> bool:
        try:
            self.activity = "loading the model"
            description = self.worker.start()
            self.activity = "idle"
            self._say(self.settings.announce_level, "worker ready (process %s): %s", self.worker.pid, description)
            return True
        except RuntimeError as error:
            self.activity = f"cannot start the worker: {error}"
            self._say(logging.ERROR, "cannot start the worker: %s; trying again in %g s", error,
                      WORKER_RESTART_DELAY_S)
            if wait:
                self._stopping.wait(WORKER_RESTART_DELAY_S)
            return False

    def _run(self, job: Job) -> None:
        """Analyse one claimed job and record how it ended (under its lease)."""
        self.current = job
        self.activity = f"analysing job {job.id}"
        output = self.settings.results_dir / str(job.id) / str(job.attempts)
        request = JobRequest(job.id, str(self.settings.input_dir(job)), str(output))
        self._say(logging.INFO, "job %d (study %s): processing (attempt %d, %s)", job.id, job.study_uid, job.attempts,
                  self.name)
        lease = _Lease(self.jobs, job, self.settings.lease_s)
        try:
            try:
                outcome = self.worker.run(request, self.settings.job_timeout_s, self._must_stop(lease),
                                          self._grace_s)
            except WorkerStopped as stopped:
                error = str(stopped)
                if lease.lost.is_set():
                    self._say(logging.WARNING, "job %d: abandoned, another runner holds it now", job.id)
                    return
                self._say(logging.INFO, "job %d: checkpointed at the stop; it runs again at the next start", job.id)
                self._record(job, lambda: self.jobs.requeue(
                    job.id, f"checkpointed at shutdown ({error}); runs again at the next start", token=job.lease_token),
                    "checkpoint it", lease)
                return
            except WorkerTimedOut as timed_out:
                error = str(timed_out)
                self._say(logging.ERROR, "job %d (study %s): failed, %s", job.id, job.study_uid, error)
                self._record(job, lambda: self.jobs.finish_analysis(job.id, JobState.FAILED, error, "",
                                                                    str(output), [], token=job.lease_token),
                             "record its failure", lease)
                return
            except WorkerCrashed as crashed:
                error = str(crashed)
                if self._stopping.is_set():  # Ctrl-C or SIGTERM reached the worker's process group: a stop
                    self._say(logging.INFO, "job %d: the worker ended with the stop; it runs again at the next start",
                              job.id)
                    self._record(job, lambda: self.jobs.requeue(
                        job.id, "checkpointed at shutdown (the worker ended with it); runs again at the next start",
                        token=job.lease_token), "checkpoint it", lease)
                    return
                state = self._record(job, lambda: self.jobs.record_crash(
                    job.id, error, self.settings.max_crashes, token=job.lease_token), "record the crash", lease)
                self._say(logging.ERROR, "job %d (study %s): %s; %s", job.id, job.study_uid, error,
                          "analysed again by a new worker" if state == JobState.SELECTED else
                          f"failed after {self.settings.max_crashes} crashes")
                return
            self._finish(job, outcome, output, lease)
        finally:
            lease.release()

    def _must_stop(self, lease: _Lease) -> Callable[[], bool]:
        return lambda: self._stopping.is_set() or lease.lost.is_set()

    @property
    def _grace_s(self) -> float:
        return 0.0 if self._stop_now.is_set() else self.settings.grace_s

    def _finish(self, job: Job, outcome: JobOutcome, output: Path, lease: _Lease) -> None:
        deliveries, reason = [], outcome.reason
        if outcome.status == JobState.DONE.value:
            deliveries, notes = self.settings.deliveries(job, outcome.result_files)
            if notes:
                reason = "; ".join([*notes, reason] if reason else notes)
        state = self._record(job, lambda: self.jobs.finish_analysis(
            job.id, outcome.status, reason, outcome.summary, str(output), deliveries, token=job.lease_token),
            "record its outcome", lease)
        if state is None:
            return
        self._say(logging.INFO, "job %d (study %s): %s%s", job.id, job.study_uid, state, f", {reason}" if reason else "")
        if self.settings.on_finished is not None:
            self.settings.on_finished(job, state)

    def _record(self, job: Job, action: Callable[[], object], what: str, lease: _Lease | None = None):
        """Run a store ``action`` for ``job`` until it succeeds; None when the lease is lost or the stop gives up.

        A store error (locked, disk full, server down) is retried with backoff,
        the lease renewed meanwhile, never turned into a failed study. At a stop
        the retries go on for the grace time; after that the job stays ours in
        the store and is taken back at the next start.
        """
        failures, deadline = 0, None
        while True:
            try:
                return action()
            except StaleLease as error:
                self._say(logging.WARNING, "job %d: cannot %s: %s", job.id, what, error)
                return None
            except StoreUnavailable as error:
                failures += 1
                if self._stopping.is_set():
                    deadline = deadline or time.monotonic() + max(self._grace_s, 5.0)
                    if time.monotonic() > deadline:
                        self._say(logging.ERROR, "job %d: could not %s before the stop (%s); it is taken back at the "
                                  "next start", job.id, what, error)
                        return None
                delay = _backoff(failures)
                self.activity = f"job {job.id}: cannot {what} (job store unavailable), retrying"
                self._say(logging.WARNING, "job %d: cannot %s: %s; trying again in %g s", job.id, what, error, delay)
                if lease is not None and lease.lost.is_set():
                    return None
                time.sleep(delay)

    # -- heartbeat -----------------------------------------------------------------------------

    def _heartbeat_loop(self) -> None:
        while True:
            running = self.running
            activity = self.activity if running else "not running: its loop ended (see the log)"
            if self._stopping.is_set():
                activity = f"stopping ({activity})"
            current = self.current
            try:
                self.jobs.heartbeat(self.name, self.settings.role, activity, current.id if current else None)
            except StoreUnavailable as error:
                log.debug("heartbeat not written: %s", error)
            except Exception:
                log.exception("heartbeat error")
            if not self._stopping.is_set():
                self._stopping.wait(HEARTBEAT_S)
            elif running:
                time.sleep(1.0)
            else:
                return


def _process_exists(pid: int) -> bool:
    """Whether process ``pid`` of this host runs (a zombie, killed but not yet reaped by its parent, does not)."""
    import os

    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return True  # no /proc: trust kill(0)
    return stat.rsplit(")", 1)[-1].split()[0] not in ("Z", "X")


def _backoff(failures: int) -> float:
    first, factor, most = BACKOFF_S
    return min(first * factor ** (failures - 1), most)
