"""The inference worker: a separate process that loads the model once and analyses jobs one at a time.

The network process keeps receiving while the worker computes, and a crash
in the worker (a segfault, the kernel's out-of-memory killer, kill -9) costs
the node nothing but that analysis: :class:`Worker` notices the dead process
and reports :class:`WorkerCrashed`; the job runner (:mod:`node.service.runner`)
counts the crash against the job, starts a fresh worker and analyses the job
again, until the job has crashed the worker ``max_crashes`` times (then it
fails, naming the crashes). The process ignores SIGINT and SIGTERM: Ctrl-C in a
terminal and ``systemctl stop`` signal the whole process group, and a stop is
the runner's to carry out (finish or checkpoint), not a crash.

The worker never touches the job store: it gets a :class:`JobRequest`
through a pipe and answers a :class:`JobOutcome`; the runner records it. When
the node itself dies (even by kill -9) the worker notices its parent is gone
and exits, so a restarted node never races an orphan.
"""
from __future__ import annotations

import logging
import multiprocessing
import os
import signal
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Callable

from node.service.jobs import MAX_CRASHES

if TYPE_CHECKING:
    from node.pipeline import Outcome

if TYPE_CHECKING:  # the network process does not import the engine
    from inference.predict import RegionSegmenter
    from node.pipeline import PipelineSettings

log = logging.getLogger(__name__)

READY_TIMEOUT_S = 600.0
#: A job that kills the worker this many times fails (one poison study must not crash it forever).
MAX_WORKER_CRASHES = MAX_CRASHES


@dataclass(frozen=True)
class JobRequest:
    """Analyse the instances under ``input_dir`` (one study) into ``output_dir``."""

    job_id: int
    input_dir: str
    output_dir: str


@dataclass(frozen=True)
class JobOutcome:
    """The pipeline's outcome of one job (``status``: :class:`node.pipeline.Outcome`)."""

    job_id: int
    status: Outcome
    reason: str = ""
    summary: str = ""
    result_files: list[str] = field(default_factory=list)


class WorkerCrashed(RuntimeError):
    """The worker process ended or was stopped while analysing a job."""


class WorkerTimedOut(WorkerCrashed):
    """The job ran longer than its time limit; the worker process was killed."""


class WorkerStopped(RuntimeError):
    """The node asked to stop before the job finished: the job must be checkpointed (re-run later)."""


class Worker:
    """The node's handle on one worker process (spawned, so no state is inherited by fork).

    Args:
        factory: picklable callable returning an object with ``segment(sitk_image)``
            (``inference.predict.Segmenter``); called once, in the worker process.
        settings: ``node.pipeline.PipelineSettings`` for every job.
    """

    def __init__(self, factory: Callable[[], object], settings):
        self.factory, self.settings = factory, settings
        self._process = None
        self._connection = None
        self.description = ""

    @property
    def pid(self) -> int | None:
        return None if self._process is None else self._process.pid

    @property
    def alive(self) -> bool:
        return self._process is not None and self._process.is_alive()

    def start(self, timeout_s: float = READY_TIMEOUT_S) -> str:
        """Start the process and wait until its model is loaded; returns the model's description.

        Raises RuntimeError with the worker's message when the model cannot be loaded.
        """
        context = multiprocessing.get_context("spawn")
        parent_end, child_end = context.Pipe()
        self._process = context.Process(
            target=_worker_main, args=(child_end, self.factory, self.settings, logging.getLogger().level),
            name="lobevol-worker", daemon=True)
        self._process.start()
        child_end.close()
        self._connection = parent_end
        deadline = time.monotonic() + timeout_s
        while not parent_end.poll(0.2):
            if not self._process.is_alive():
                raise RuntimeError(f"the worker process ended while loading the model (exit code {self._process.exitcode})")
            if time.monotonic() > deadline:
                self.kill()
                raise RuntimeError(f"the worker did not load the model within {timeout_s:g} s")
        kind, message = parent_end.recv()
        if kind != "ready":
            self.stop()
            raise RuntimeError(f"the worker cannot load the model: {message}")
        self.description = message
        return message

    def run(self, request: JobRequest, timeout_s: float, stop_requested: Callable[[], bool] = lambda: False,
            grace_s: float = 0.0) -> JobOutcome:
        """Send one job and wait for its outcome.

        Raises:
            WorkerCrashed: the process died, or the job ran longer than ``timeout_s``
                (the process is killed); start a new worker before the next job.
            WorkerStopped: ``stop_requested()`` became true and the job did not finish
                within ``grace_s`` more seconds (the process is killed).
        """
        if not self.alive:
            raise WorkerCrashed("the worker process is not running")
        self._connection.send(request)
        started = time.monotonic()
        stop_deadline = None
        while True:
            if self._connection.poll(0.5):
                try:
                    return self._connection.recv()
                except EOFError:
                    pass  # the process died while answering: reported below
            if not self._process.is_alive():
                code = self._process.exitcode
                self._process = None
                raise WorkerCrashed(f"the worker process ended unexpectedly (exit code {code}) during the analysis")
            if time.monotonic() - started > timeout_s:
                self.kill()
                raise WorkerTimedOut(f"the analysis took longer than job_timeout_s ({timeout_s:g} s) and was stopped")
            if stop_deadline is None and stop_requested():
                stop_deadline = time.monotonic() + grace_s
                log.info("shutting down: letting job %d finish for up to %g s", request.job_id, grace_s)
            if stop_deadline is not None and time.monotonic() > stop_deadline:
                self.kill()
                raise WorkerStopped(f"job {request.job_id} did not finish within the shutdown grace time")

    def stop(self, timeout_s: float = 10.0) -> None:
        """Ask the process to exit after its current job; kill it if it does not."""
        if self._process is None:
            return
        try:
            self._connection.send(None)
        except (BrokenPipeError, OSError):
            pass
        self._process.join(timeout_s)
        if self._process.is_alive():
            self.kill()
        self._process = None

    def kill(self) -> None:
        if self._process is not None:
            self._process.kill()
            self._process.join(5)
            self._process = None


def _worker_main(connection, factory, settings, log_level: int) -> None:
    """The worker process: load the model, then answer job requests until told to stop."""
    from node.logsafe import configure_logging

    # A stop is the node's to handle: Ctrl-C in a terminal (SIGINT to the process group) and systemctl stop
    # (SIGTERM to the control group) reach this process too; it finishes or is stopped by the node.
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    configure_logging(log_level or logging.WARNING, "%(asctime)s %(levelname)s worker %(name)s: %(message)s")
    from node.pipeline import Outcome

    _exit_when_orphaned(os.getppid())
    try:
        segmenter = factory()
    except Exception as error:  # the message goes to the node, which reports it
        connection.send(("failed", f"{type(error).__name__}: {error}"))
        return
    connection.send(("ready", _describe(segmenter)))
    while True:
        try:
            request = connection.recv()
        except EOFError:
            return
        if request is None:
            return
        try:
            outcome = analyse_job(request, segmenter, settings)
        except Exception as error:  # one bad study must not end the worker
            log.exception("job %d failed", request.job_id)
            outcome = JobOutcome(request.job_id, Outcome.FAILED, f"analysis error: {type(error).__name__}: {error}")
        connection.send(outcome)


def _describe(segmenter) -> str:
    """E.g. "Segmenter (resunet333_phantom.pt on cpu)", "... cross-checked by AtlasSegmenter"."""
    if hasattr(segmenter, "primary") and hasattr(segmenter, "other"):
        return f"{_describe(segmenter.primary)} cross-checked by {_describe(segmenter.other)}"
    details = [str(getattr(segmenter, name)) for name in ("checkpoint", "device") if hasattr(segmenter, name)]
    if details and hasattr(segmenter, "checkpoint"):
        details[0] = Path(details[0]).name
    return type(segmenter).__name__ + (f" ({' on '.join(details)})" if details else "")


def _exit_when_orphaned(parent_pid: int) -> None:
    """Exit as soon as the node process is gone (killed with -9 included)."""
    def watch() -> None:
        while os.getppid() == parent_pid:
            time.sleep(0.5)
        os._exit(3)

    threading.Thread(target=watch, name="orphan-watch", daemon=True).start()


def analyse_job(request: JobRequest, segmenter: RegionSegmenter, settings: PipelineSettings) -> JobOutcome:
    """Read the job's frozen input and run the study pipeline on it."""
    import shutil

    from node.dicom.files import find_dicom_files, group_by_study
    from node.pipeline import Outcome, analyse_study

    output = Path(request.output_dir)
    if output.exists():
        shutil.rmtree(output)  # an interrupted earlier attempt: its files were never sent
    instances = find_dicom_files(Path(request.input_dir))
    studies = group_by_study(instances)
    if len(studies) != 1:
        return JobOutcome(request.job_id, Outcome.FAILED, f"the job's input holds {len(studies)} studies, expected one")
    outcome = analyse_study(instances, output, segmenter, settings)
    return JobOutcome(request.job_id, outcome.status, outcome.reason, outcome.summary,
                      [str(p) for p in outcome.result_files])
