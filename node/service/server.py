"""The node: SCP, job queue, worker process and outbox, composed and run together.

:class:`Node` runs, in the network process:
  - the SCP (pynetdicom's threads), writing into the spool and the job database;
  - a dispatcher thread: jobs quiet for the stability time become selected and
    get their input frozen; retention runs every minute;
  - a processing thread: hands selected jobs to the worker process one at a
    time and records each outcome (results go to the outbox in the same
    transaction); a job whose analysis the worker died in is analysed again by
    a fresh worker, up to MAX_WORKER_CRASHES crashes;
  - a sending thread: delivers due outbox items.

:meth:`Node.stop` (SIGTERM in ``lobevol serve``) stops accepting associations
first, then lets the running job finish for ``shutdown_grace_s`` or puts it back
to selected (it runs again at the next start), then stops the worker.
"""
from __future__ import annotations

import logging
import shutil
import threading
import time
from pathlib import Path
from typing import Callable

from node.config import NodeConfig
from node.service.jobs import Delivery, JobState, JobStore
from node.service.outbox import Outbox
from node.service.scp import StorageSCP
from node.service.scu import read_file_header
from node.service.spool import Spool
from node.service.worker import (
    MAX_WORKER_CRASHES, JobRequest, Worker, WorkerCrashed, WorkerStopped, WorkerTimedOut, segmenter_factory,
)

log = logging.getLogger(__name__)

DISPATCH_PERIOD_S = 0.5
RETENTION_PERIOD_S = 60.0
WORKER_RESTART_DELAY_S = 5.0


class Node:
    """One DICOM node as configured.

    Args:
        config: the validated configuration.
        factory: picklable callable returning the segmenter in the worker process;
            default: the configured model (``[inference]``). Tests pass a model-free one.
    """

    def __init__(self, config: NodeConfig, factory: Callable[[], object] | None = None):
        self.config = config
        self.spool = Spool(config.storage.spool_dir)
        config.storage.results_dir.mkdir(parents=True, exist_ok=True)
        self.jobs = JobStore(config.storage.database)
        self.outbox = Outbox(config, self.jobs)
        self.scp = StorageSCP(config, self.spool, self.jobs)
        self.worker = Worker(factory or segmenter_factory(config), config.pipeline)
        self._stopping = threading.Event()
        self._wake_processor = threading.Event()
        self._wake_sender = threading.Event()
        self._threads: list[threading.Thread] = []

    @property
    def port(self) -> int:
        return self.scp.port

    def start(self) -> None:
        """Resume unfinished jobs, load the model in the worker, then listen and run the loops."""
        resumed = self.jobs.recover()
        if resumed:
            log.info("resuming %d job(s) interrupted by the last stop: %s", len(resumed), resumed)
        self.worker.start()
        self.jobs.restart_stability_clock()
        self.scp.start()
        for name, target in (("dispatcher", self._dispatch_loop), ("processor", self._process_loop),
                             ("sender", self._send_loop)):
            thread = threading.Thread(target=target, name=f"lobevol-{name}", daemon=True)
            thread.start()
            self._threads.append(thread)

    def request_stop(self) -> None:
        """Begin a clean shutdown (safe to call from a signal handler)."""
        self._stopping.set()
        self._wake_processor.set()
        self._wake_sender.set()

    def wait(self) -> None:
        """Block until :meth:`request_stop` is called."""
        while not self._stopping.wait(1.0):
            pass

    def stop(self) -> None:
        """Stop accepting associations, finish or checkpoint the running job, stop the loops and the worker."""
        self.scp.stop()
        self.request_stop()
        for thread in self._threads:
            thread.join()
        self._threads.clear()
        self.worker.stop()
        log.info("node stopped")

    # -- loops -------------------------------------------------------------------------------

    def _dispatch_loop(self) -> None:
        next_retention = 0.0
        while not self._stopping.is_set():
            try:
                self.dispatch()
                if time.monotonic() >= next_retention:
                    self.apply_retention()
                    next_retention = time.monotonic() + RETENTION_PERIOD_S
            except Exception:  # a bug here must not silently stop the node's intake
                log.exception("dispatcher error")
            self._stopping.wait(DISPATCH_PERIOD_S)

    def dispatch(self) -> list[int]:
        """Select stable studies and freeze their input; returns the job ids made ready."""
        ready = []
        for job_id in self.jobs.select_stable(self.config.series.stability_s) + self.jobs.jobs_needing_input():
            if job_id in ready:
                continue
            paths = [p for p in self.jobs.job_inputs(job_id) if p.is_file()]
            self.spool.freeze_job_input(job_id, paths)
            self.jobs.mark_input_ready(job_id)
            job = self.jobs.get(job_id)
            log.info("job %d (study %s): selected, %d instance(s)%s", job_id, job.study_uid, len(paths),
                     f", {job.ignored} ignored (not CT)" if job.ignored else "")
            ready.append(job_id)
        if ready:
            self._wake_processor.set()
        return ready

    def _process_loop(self) -> None:
        while not self._stopping.is_set():
            if not self.worker.alive and not self._restart_worker():
                continue
            job = self.jobs.claim_next()
            if job is None:
                self._wake_processor.wait(1.0)
                self._wake_processor.clear()
                continue
            try:
                self._process(job)
            except Exception as error:  # a bug must fail one job, not stop the processing loop
                log.exception("job %d: unexpected error", job.id)
                self.jobs.finish_analysis(job.id, JobState.FAILED, f"internal error: {type(error).__name__}: {error}",
                                          "", None, [])

    def _restart_worker(self) -> bool:
        try:
            self.worker.start()
            return True
        except RuntimeError as error:
            log.error("cannot restart the worker: %s; trying again in %g s", error, WORKER_RESTART_DELAY_S)
            self._stopping.wait(WORKER_RESTART_DELAY_S)
            return False

    def _process(self, job) -> None:
        output = self.config.storage.results_dir / str(job.id)
        request = JobRequest(job.id, str(self.spool.job_input(job.id)), str(output))
        log.info("job %d (study %s): processing (attempt %d)", job.id, job.study_uid, job.attempts)
        try:
            outcome = self.worker.run(request, self.config.inference.job_timeout_s, self._stopping.is_set,
                                      self.config.node.shutdown_grace_s)
        except WorkerStopped as error:
            self.jobs.requeue(job.id, f"checkpointed at shutdown ({error}); runs again at the next start")
            return
        except WorkerTimedOut as error:
            log.error("job %d (study %s): failed, %s", job.id, job.study_uid, error)
            self.jobs.finish_analysis(job.id, JobState.FAILED, str(error), "", str(output), [])
            return
        except WorkerCrashed as error:
            state = self.jobs.record_crash(job.id, str(error), MAX_WORKER_CRASHES)
            log.error("job %d (study %s): %s; %s", job.id, job.study_uid, error,
                      "analysed again by a new worker" if state == JobState.SELECTED else
                      f"failed after {MAX_WORKER_CRASHES} crashes")
            return
        deliveries, reason = [], outcome.reason
        if outcome.status == JobState.DONE:
            deliveries, notes = self._deliveries(job.origin_ae, outcome.result_files)
            if notes:
                reason = "; ".join([*notes, reason] if reason else notes)
        state = self.jobs.finish_analysis(job.id, outcome.status, reason, outcome.summary, str(output), deliveries)
        log.info("job %d (study %s): %s%s", job.id, job.study_uid, state, f", {reason}" if reason else "")
        if deliveries:
            self._wake_sender.set()

    def _deliveries(self, origin_ae: str | None, result_files: list[str]) -> tuple[list[Delivery], list[str]]:
        destinations, notes = self.config.result_destinations(origin_ae)
        if not destinations:
            notes.append("no destination for the results (they stay in the results folder)")
        headers = [read_file_header(Path(p)) for p in result_files]
        deliveries = [Delivery(remote.ae_title, str(h.path), h.sop_class_uid, h.sop_instance_uid)
                      for remote in destinations for h in headers]
        return deliveries, notes

    def _send_loop(self) -> None:
        while not self._stopping.is_set():
            try:
                self.outbox.deliver_due()
            except Exception:
                log.exception("sender error")
            next_due = self.jobs.next_delivery_time()
            wait = 1.0 if next_due is None else min(max(next_due - time.time(), 0.05), 1.0)
            self._wake_sender.wait(wait)
            self._wake_sender.clear()

    # -- retention ---------------------------------------------------------------------------

    def apply_retention(self, now: float | None = None) -> tuple[int, int]:
        """Delete expired received images and result folders; returns (jobs whose images, whose results went)."""
        return apply_retention(self.jobs, self.spool, self.config, now)


def apply_retention(jobs: JobStore, spool: Spool, config: NodeConfig, now: float | None = None) -> tuple[int, int]:
    """Delete expired received images and result folders (``[retention]``); returns (jobs whose images, whose results went)."""
    now = time.time() if now is None else now
    images = jobs.expired_images(now - config.retention.images_retention_s)
    for job in images:
        spool.remove_job_input(job.id)
        if jobs.study_is_idle(job.study_uid):
            spool.remove_study(job.study_uid)
            jobs.forget_study_instances(job.study_uid)
        jobs.mark_images_removed(job.id)
    results = jobs.expired_results(now - config.retention.results_retention_s)
    for job in results:
        shutil.rmtree(config.storage.results_dir / str(job.id), ignore_errors=True)
        jobs.mark_results_removed(job.id)
    if images or results:
        log.info("retention: removed the images of %d job(s) and the results of %d", len(images), len(results))
    return len(images), len(results)
