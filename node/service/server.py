"""The node: SCP, job store, job runner and outbox, composed and run together.

:class:`Node` runs, in the network process:
  - the SCP (pynetdicom's threads), writing into the spool and the job store;
  - a dispatcher thread: jobs quiet for the stability time become selected and
    get their input frozen; retention runs every minute;
  - the job runner (:mod:`node.service.runner`): claims selected jobs under
    leases, analyses them in the worker process one at a time and records each
    outcome (results go to the outbox in the same transaction);
  - a sending thread: delivers due outbox items.

With a shared job store (``[storage] database = postgresql://...``), several
nodes and ``lobevol worker`` processes share the jobs: any runner may analyse a
study any node received (the spool and results folders must then be shared too).

:meth:`Node.stop` (SIGTERM or Ctrl-C in ``lobevol serve``) stops accepting
associations first, ends a delivery in flight (its items stay pending), then lets
the running job finish for ``shutdown_grace_s`` or puts it back to selected (it
runs again at the next start), then stops the worker.
"""
from __future__ import annotations

import logging
import shutil
import threading
import time
from pathlib import Path
from typing import Callable, Sequence

from node.config import NodeConfig
from node.service.jobs import COHORT_ORIGIN, Delivery, Job, JobStore, StoreUnavailable
from node.service.outbox import Outbox
from node.service.runner import JobRunner, RunnerSettings, default_name
from node.service.scp import StorageSCP
from node.service.scu import read_file_header
from node.service.spool import Spool
from node.service.worker import Worker

log = logging.getLogger(__name__)

DISPATCH_PERIOD_S = 0.5
RETENTION_PERIOD_S = 60.0
#: A selected job whose input no dispatcher built for this long (its receiver died, or a retry) is built by any.
INPUT_TAKEOVER_S = 5.0


class Node:
    """One DICOM node as configured.

    Args:
        config: the validated configuration.
        factory: picklable callable returning the segmenter in the worker process;
            default: the configured one (``inference.factory.segmenter_factory``).
        name: the runner's name in the job store (default: host and role, ``<host>-serve``).
        receive: run the SCP and the dispatcher (``lobevol serve``); without, the node only
            analyses and sends the jobs of a shared store (``lobevol worker``).
        analyse: run a job runner and its worker process; without (``lobevol serve --receive-only``),
            the node receives and sends, and ``lobevol worker`` processes analyse.
    """

    def __init__(self, config: NodeConfig, factory: Callable[[], object] | None = None, *, name: str | None = None,
                 receive: bool = True, analyse: bool = True):
        from inference import factory as segmenters

        if not (receive or analyse):
            raise ValueError("a node that neither receives nor analyses has nothing to do")
        self.config, self.receive, self.analyse = config, receive, analyse
        role = "serve" if receive else "worker"
        self.spool = Spool(config.storage.spool_dir)
        config.storage.results_dir.mkdir(parents=True, exist_ok=True)
        self.jobs = JobStore(config.storage.database)
        name = name or default_name(role)
        self.outbox = Outbox(config, self.jobs, owner=name, lease_s=config.storage.lease_s)
        self.scp = StorageSCP(config, self.spool, self.jobs) if receive else None
        self.worker = Worker(factory or segmenters.segmenter_factory(config.inference), config.pipeline)
        self.runner = None if not analyse else JobRunner(self.jobs, self.worker, RunnerSettings(
            name=name, role=role, results_dir=config.storage.results_dir,
            input_dir=lambda job: self.spool.job_input(job.id), deliveries=self._deliveries,
            job_timeout_s=config.inference.job_timeout_s, grace_s=config.node.shutdown_grace_s,
            lease_s=config.storage.lease_s,
            on_finished=lambda job, state: self._wake_sender.set()))
        self._stopping = threading.Event()
        self._wake_sender = threading.Event()
        self._threads: list[threading.Thread] = []
        self._intake_failures_seen = 0

    @property
    def port(self) -> int:
        if self.scp is None:
            raise RuntimeError("this node does not receive (a worker)")
        return self.scp.port

    def start(self) -> None:
        """Resume unfinished jobs, load the model in the worker, then listen and run the loops."""
        if self.runner is not None:
            self.runner.start()
        loops = [("sender", self._send_loop)]
        if self.scp is not None:
            self._store_call(self.jobs.restart_stability_clock)
            self.scp.start()
            loops.append(("dispatcher", self._dispatch_loop))
        for name, target in loops:
            thread = threading.Thread(target=target, name=f"lobevol-{name}", daemon=True)
            thread.start()
            self._threads.append(thread)

    def request_stop(self, *, now: bool = False) -> None:
        """Begin a clean shutdown (safe to call from a signal handler); ``now``: no grace for the running job."""
        self._stopping.set()
        if self.runner is not None:
            self.runner.request_stop(now=now)
        self.outbox.stop()
        self._wake_sender.set()

    def wait(self) -> None:
        """Block until :meth:`request_stop` is called."""
        while not self._stopping.wait(1.0):
            pass

    def stop(self) -> None:
        """Stop accepting associations, end deliveries, finish or checkpoint the running job, stop the worker."""
        if self.scp is not None:
            self.scp.stop()
        self.request_stop()
        for thread in self._threads:
            thread.join()
        self._threads.clear()
        if self.runner is not None:
            self.runner.stop()
        log.info("node stopped")

    def _store_call(self, action: Callable[[], object]) -> object:
        try:
            return action()
        except StoreUnavailable as error:
            log.warning("job store unavailable: %s", error)
            return None

    # -- loops -------------------------------------------------------------------------------

    def _dispatch_loop(self) -> None:
        next_retention = 0.0
        while not self._stopping.is_set():
            try:
                self._after_intake_failures()
                self.dispatch()
                if time.monotonic() >= next_retention:
                    self.apply_retention()
                    next_retention = time.monotonic() + RETENTION_PERIOD_S
            except StoreUnavailable as error:
                log.warning("dispatcher: job store unavailable: %s", error)
            except Exception:  # a bug here must not silently stop the node's intake
                log.exception("dispatcher error")
            self._stopping.wait(DISPATCH_PERIOD_S)

    def _after_intake_failures(self) -> None:
        """After instances were refused because the store was unavailable, studies being received wait again.

        Their senders resend the refused instances later: without this, the
        study would look complete meanwhile and split into two jobs.
        """
        outages = self.jobs.outages
        if outages != self._intake_failures_seen:
            self.jobs.restart_stability_clock()
            self._intake_failures_seen = outages

    def dispatch(self) -> list[int]:
        """Select stable studies and freeze their input; returns the job ids made ready."""
        ready = []
        stranded = self.jobs.jobs_needing_input(quiet_s=INPUT_TAKEOVER_S)
        for job_id in self.jobs.select_stable(self.config.series.stability_s) + stranded:
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
            if self.runner is not None:
                self.runner.wake()
        return ready

    def _deliveries(self, job: Job, result_files: Sequence[str]) -> tuple[list[Delivery], list[str]]:
        if job.origin_ae == COHORT_ORIGIN:
            return [], ["a cohort study: its results stay in the results folder (lobevol segment --queue collects them)"]
        destinations, notes = self.config.result_destinations(job.origin_ae)
        if not destinations:
            notes.append("no destination for the results (they stay in the results folder)")
        headers = [read_file_header(Path(p)) for p in result_files]
        deliveries = [Delivery(remote.ae_title, str(h.path), h.sop_class_uid, h.sop_instance_uid)
                      for remote in destinations for h in headers]
        return deliveries, notes

    def _send_loop(self) -> None:
        while not self._stopping.is_set():
            wait = 1.0
            try:
                self.outbox.deliver_due()
                next_due = self.jobs.next_delivery_time()
                wait = 1.0 if next_due is None else min(max(next_due - time.time(), 0.05), 1.0)
            except StoreUnavailable as error:
                log.warning("sender: job store unavailable: %s", error)
            except Exception:
                log.exception("sender error")
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
