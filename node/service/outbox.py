"""Delivering results from the persisted outbox, with exponential backoff.

The outbox rows live in the job database (written with the analysis outcome,
see :meth:`node.service.jobs.JobStore.finish_analysis`), so a restart resumes delivery
where it stopped. :meth:`Outbox.deliver_due` sends every due item, one
association (C-STORE) or one run of STOW-RS requests per destination, through
the destination's :class:`node.service.delivery.Transport`, and commits each
item's outcome as soon as the destination answers it (its C-STORE, or the
STOW-RS request that carried it). Delivery is therefore at-least-once: a crash
between the destination's answer and that commit re-sends the object(s) in
flight (one C-STORE, or one STOW-RS request), with the same SOP Instance UIDs
(the files are sent as they were written), so a PACS that stores by SOP
Instance UID keeps one copy:
  - a destination that is down (or breaks the association) is retried after
    ``RetryPolicy.delay_after(attempts)`` seconds; after ``max_attempts`` the
    item ends as failed and its job fails with the reason: never an endless loop;
  - a destination that refuses a SOP class (some PACS refuse SEG) gets the
    other objects; the refusal is recorded and shown in the job's reason.

Items are claimed under a lease (:meth:`JobStore.claim_deliveries`): several
senders sharing one store (nodes, workers) never send the same item at once,
and a sender that dies leaves its items to the others once the lease runs out.
At a stop (:meth:`Outbox.stop`) the association in flight is aborted: its items
stay pending, not counted as attempts, and go at the next start.
"""
from __future__ import annotations

import logging
import threading
import time
from collections import defaultdict
from pathlib import Path
from typing import Callable

from node.config import NodeConfig
from node.service.delivery import PeerUnavailable, StoreResult, Transport, transport_for
from node.service.jobs import LEASE_S, JobState, JobStore, OutboxItem, StaleLease, default_owner

log = logging.getLogger(__name__)


class Outbox:
    """Sends due outbox items of ``jobs`` with the node's AE title and TLS settings.

    Args:
        config: the node's settings (``[retry]``, and the remote table for the default ``transports``).
        jobs: the queue.
        transports: the transport of a destination, None when it is not one (its items fail);
            default: the remote table's AEs that may receive (:func:`transport_for`).
        from_pacs: deliver the results of jobs of studies held by a PACS (the Orthanc plugin's),
            not the node's (see :meth:`JobStore.claim_next`).
    """

    def __init__(self, config: NodeConfig, jobs: JobStore, *,
                 transports: Callable[[str], Transport | None] | None = None, from_pacs: bool = False,
                 owner: str | None = None, lease_s: float = LEASE_S):
        self.config, self.jobs, self.from_pacs = config, jobs, from_pacs
        self.transports = transports or self._remote_transport
        self.owner, self.lease_s = owner or default_owner(), lease_s
        self._stopping = threading.Event()

    def stop(self) -> None:
        """End the delivery in flight (its association is aborted; its items stay pending for the next start)."""
        self._stopping.set()
        _abort_requested_associations()

    def _remote_transport(self, destination: str) -> Transport | None:
        remote = self.config.remotes.get(destination)
        return transport_for(remote, self.config) if remote is not None and remote.may_receive else None

    def deliver_due(self, now: float | None = None) -> int:
        """Claim every due item no other sender holds and try it once; returns how many items were attempted."""
        if self._stopping.is_set():
            return 0
        due = self.jobs.claim_deliveries(self.owner, self.lease_s, now, from_pacs=self.from_pacs)
        by_destination: dict[str, list[OutboxItem]] = defaultdict(list)
        for item in due:
            by_destination[item.destination].append(item)
        try:
            for destination, items in by_destination.items():
                if self._stopping.is_set():
                    break
                self._deliver(destination, items)
        finally:
            if due:  # what was not sent (a stop, an error) goes back to every sender at once
                self.jobs.release_deliveries(due[0].lease_token)
        for job_id in sorted({item.job_id for item in due}):
            state = self.jobs.settle_delivery(job_id)
            if state != JobState.SENDING:
                job = self.jobs.get(job_id)
                log.log(logging.INFO if state == JobState.DONE else logging.WARNING, "job %d (study %s): %s, %s",
                        job_id, job.study_uid, state, job.reason)
        return len(due)

    def _deliver(self, destination: str, items: list[OutboxItem]) -> None:
        transport = self.transports(destination)
        if transport is None:
            for item in items:
                self._settle(item, "failed", f"{destination} is no longer a destination in the config")
            return
        present = [i for i in items if Path(i.path).is_file()]
        for item in items:
            if item not in present:
                self._settle(item, "failed", "result file is missing (removed by retention?)")
        if not present:
            return
        outcomes: list[str] = []

        def record(result: StoreResult) -> None:
            # Called as the destination answers each file: its outcome is committed before the
            # next file goes, so a crash re-sends at most the file in flight.
            self._record(present[len(outcomes)], result)
            outcomes.append(result.outcome)
            self.jobs.renew_delivery_leases(present[0].lease_token, self.lease_s)

        try:
            transport.send([Path(i.path) for i in present], progress=record)
        except PeerUnavailable as error:
            if self._stopping.is_set():
                log.info("delivery to %s ended by the stop; %d item(s) go at the next start", destination,
                         len(present) - len(outcomes))
                return
            log.warning("results for %s not sent: %s", destination, error)
            for item in present[len(outcomes):]:
                self._postpone(item, str(error))
            return
        log.info("sent %d of %d result object(s) to %s", outcomes.count("sent"), len(present), destination)

    def _record(self, item: OutboxItem, result: StoreResult) -> None:
        if result.outcome == "sent":
            self._settle(item, "sent", result.detail)
        elif result.outcome == "refused":
            log.warning("job %d: %s", item.job_id, result.detail)
            self._settle(item, "refused", result.detail)
        elif not self._stopping.is_set():  # a retry caused by our own stop is not an attempt
            self._postpone(item, result.detail)

    def _settle(self, item: OutboxItem, state: str, detail: str) -> None:
        try:
            self.jobs.record_delivery(item.id, state, detail, token=item.lease_token)
        except StaleLease as error:  # another sender took it over (our lease ran out): its outcome counts
            log.warning("job %d: %s", item.job_id, error)

    def _postpone(self, item: OutboxItem, detail: str) -> None:
        attempts = item.attempts + 1
        policy = self.config.retry
        if attempts >= policy.max_attempts:
            self._settle(item, "failed", f"{detail} (gave up after {attempts} attempts)")
            return
        delay = policy.delay_after(attempts)
        try:
            self.jobs.postpone_delivery(item.id, f"{detail} (attempt {attempts}, next in {delay:g} s)",
                                        time.time() + delay, token=item.lease_token)
        except StaleLease as error:
            log.warning("job %d: %s", item.job_id, error)


def _abort_requested_associations() -> None:
    """Abort the associations this process opened as a requestor (a C-STORE waiting for an answer included).

    pynetdicom runs each association as a thread. After the A-ABORT, the sending
    thread still waits for its C-STORE response until the DIMSE timeout: an empty
    message, what pynetdicom queues when the peer aborts, ends that wait at once.
    """
    from pynetdicom.association import Association

    for thread in threading.enumerate():
        if isinstance(thread, Association) and thread.is_requestor and thread.is_established:
            try:
                thread.abort()
            except Exception:  # already ending
                pass
            thread.dimse.msg_queue.put((None, None))
