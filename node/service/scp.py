"""The node's SCP: Verification and Storage of every storage SOP class, into the spool.

Admission (at association time, before any data): the called AE title must be
ours and the calling AE title must be a remote with ``may_send = yes`` (and,
when ``check_host = yes``, call from that remote's address). Others are
rejected with A-ASSOCIATE-RJ "rejected-permanent, service user, calling (or
called) AE title not recognised" and logged. An admitted caller takes one of
``max_associations`` slots; when all are held it is rejected transient (local
limit exceeded) and the log names the holders. Connections that are not yet
associated hold no slot, and are closed when their A-ASSOCIATE-RQ is not complete
after ``association_request_timeout_s``; every read and write on an accepted socket
times out after ``network_timeout_s`` (node.service.connections).

C-STORE status codes we answer (PS3.4 Annex B.2.3):
  0x0000  stored in the spool (file fsynced and renamed, folder fsynced, job
          updated; the last two shared by the instances of every association
          arriving together: node.service.committer), or a SOP
          class we do not need (not CT): acknowledged, counted and logged, not kept
  0xA700  out of resources: the instance is larger than max_instance_mb, the
          study already has max_instances_per_study instances, or the spool's
          disk is above its high-water mark or has not room for the instance and
          a reserve (checked before writing: node.service.spool.Spool.room_problem;
          a disk that fills during the write is answered so too), or the job
          store is unavailable for now (locked past its busy timeout, disk full,
          server down): the sender may send it again later
  0xA900  dataset does not match SOP class: a Study/Series/SOP Instance UID is
          missing or invalid, the SOP Instance UID differs from the request's, or
          a CT image's pixel data is not what its header says (shorter than Rows x
          Columns x samples x bits, fragments that do not parse, an image larger
          than any CT: node.dicom.pixels)
  0xC210  cannot understand: the dataset cannot be decoded
  0xC211  cannot understand: writing to the spool or the job queue failed (a disk error other
          than a full disk)
"""
from __future__ import annotations

import errno
import logging
import socket
import sqlite3
import threading
from pathlib import Path
from dataclasses import dataclass

from pydicom.dataset import Dataset
from pydicom.uid import (
    CTImageStorage, DeflatedExplicitVRLittleEndian, EnhancedCTImageStorage, ExplicitVRBigEndian,
    ExplicitVRLittleEndian, ImplicitVRLittleEndian, JPEG2000, JPEG2000Lossless, JPEGBaseline8Bit,
    JPEGExtended12Bit, JPEGLossless, JPEGLosslessSV1, JPEGLSLossless, JPEGLSNearLossless,
    LegacyConvertedEnhancedCTImageStorage, RLELossless,
)
from pynetdicom import AE, AllStoragePresentationContexts, evt
from pynetdicom.sop_class import Verification

from node.config import NodeConfig, NodeSettings
from node.dicom.pixels import pixel_data_problem
from node.logsafe import printable
from node.service.committer import InstanceCommitter
from node.service.connections import ConnectionGuard, GuardedAssociationServer
from node.service.jobs import JobStore, StoreUnavailable
from node.service.spool import Spool, check_uid

log = logging.getLogger(__name__)

#: Transfer syntaxes we accept: those pydicom (with pylibjpeg) decodes.
TRANSFER_SYNTAXES = [
    ExplicitVRLittleEndian, ImplicitVRLittleEndian, DeflatedExplicitVRLittleEndian, ExplicitVRBigEndian,
    JPEGBaseline8Bit, JPEGExtended12Bit, JPEGLossless, JPEGLosslessSV1, JPEGLSLossless, JPEGLSNearLossless,
    JPEG2000Lossless, JPEG2000, RLELossless,
]
#: SOP classes we keep; every other storage SOP class is acknowledged and ignored (counted in the job).
KEPT_SOP_CLASSES = frozenset({CTImageStorage, EnhancedCTImageStorage, LegacyConvertedEnhancedCTImageStorage})

SUCCESS = 0x0000
OUT_OF_RESOURCES = 0xA700
DATASET_DOES_NOT_MATCH = 0xA900
CANNOT_DECODE = 0xC210
CANNOT_STORE = 0xC211

#: Largest P-DATA PDU we take (sent in the A-ASSOCIATE-AC). Senders cut each instance into PDUs of at
#: most this size; pynetdicom handles every PDU in Python, so 256 KiB instead of its 16 KiB default
#: means 2 PDUs for a 512 x 512 CT slice instead of 33 (fewer PDUs: less CPU per instance).
MAX_PDU_BYTES = 256 * 1024

# A-ASSOCIATE-RJ (result, source, diagnostic): permanent, service user, calling / called AE not recognised.
REJECT_CALLING = (0x01, 0x01, 0x03)
REJECT_CALLED = (0x01, 0x01, 0x07)
# A-ASSOCIATE-RJ: transient, service provider (presentation), local limit exceeded.
REJECT_BUSY = (0x02, 0x03, 0x02)


def admission_refusal(config: NodeConfig, calling_ae: str, called_ae: str,
                      address: str) -> tuple[tuple[int, int, int], str] | None:
    """Why an association must be rejected ((result, source, diagnostic), reason), or None to accept it."""
    calling_ae, called_ae = calling_ae.strip(), called_ae.strip()
    if called_ae != config.node.ae_title:
        return REJECT_CALLED, f"called AE title {called_ae!r} is not ours ({config.node.ae_title})"
    remote = config.remotes.get(calling_ae)
    if remote is None:
        return REJECT_CALLING, f"calling AE title {calling_ae!r} is not in the remote table"
    if not remote.may_send:
        return REJECT_CALLING, f"calling AE title {calling_ae!r} may not send to us (may_send = no)"
    if remote.check_host and address not in _addresses(remote.host):
        return REJECT_CALLING, f"calling AE title {calling_ae!r} called from {address}, not from {remote.host}"
    return None


def check_port_free(settings: NodeSettings) -> None:
    """RuntimeError in one line when [node] bind_address:port cannot be listened on.

    Called before anything slow (the model) is loaded, so that a second ``lobevol serve``
    on the same port says so at once. The probe binds as the SCP will (SO_REUSEADDR: a
    port left in TIME_WAIT by a node just stopped is free) and closes again.
    """
    if settings.port == 0:
        return  # any free port
    try:
        family = socket.getaddrinfo(settings.bind_address, settings.port, type=socket.SOCK_STREAM)[0][0]
        with socket.socket(family, socket.SOCK_STREAM) as probe:
            probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            probe.bind((settings.bind_address, settings.port))
    except OSError as error:
        if error.errno == errno.EADDRINUSE:
            reason = "is already in use (another lobevol serve, or another DICOM server?)"
        elif error.errno == errno.EACCES:
            reason = "needs privileges (ports below 1024: run as root or give CAP_NET_BIND_SERVICE)"
        elif error.errno == errno.EADDRNOTAVAIL:
            reason = "is not an address of this machine"
        else:
            reason = f"cannot be listened on ({error.strerror or error})"
        raise RuntimeError(f"{settings.bind_address}:{settings.port} {reason}: set another [node] port or "
                           f"bind_address, or --port") from None


def _addresses(host: str) -> set[str]:
    try:
        return {info[4][0] for info in socket.getaddrinfo(host, None)}
    except socket.gaierror:
        return {host}


@dataclass
class AssociationTally:
    """What one association brought, logged when it ends."""

    calling_ae: str
    stored: int = 0
    duplicates: int = 0
    ignored: int = 0
    refused: int = 0


class StorageSCP:
    """Verification + Storage SCP writing into a :class:`Spool` and recording in a :class:`JobStore`."""

    def __init__(self, config: NodeConfig, spool: Spool, jobs: JobStore):
        self.config, self.spool, self.jobs = config, spool, jobs
        self.committer = InstanceCommitter(spool, jobs)
        self._server = None
        self._tallies: dict[int, AssociationTally] = {}
        self._lock = threading.Lock()
        self.connections = ConnectionGuard(config.node.max_associations, config.node.association_request_timeout_s)

    @property
    def port(self) -> int:
        """The port we listen on (the real one when the config asks for port 0)."""
        if self._server is None:
            raise RuntimeError("the SCP is not started")
        return self._server.server_address[1]

    def start(self) -> None:
        """Listen (non-blocking); associations are served on pynetdicom's threads."""
        ae = AE(ae_title=self.config.node.ae_title)
        # pynetdicom's count includes connections not yet associated: ours (ConnectionGuard) hands out the
        # max_associations slots; its own only bounds the threads of connections still asking.
        ae.maximum_associations = self.config.node.max_associations + self.config.node.max_pending_connections
        ae.acse_timeout = self.config.node.association_request_timeout_s  # also the ARTIM timer
        ae.network_timeout = self.config.node.network_timeout_s  # idle time of an association
        ae.maximum_pdu_size = MAX_PDU_BYTES
        ae.add_supported_context(Verification)
        for context in AllStoragePresentationContexts:
            ae.add_supported_context(context.abstract_syntax, TRANSFER_SYNTAXES)
        handlers = [
            (evt.EVT_CONN_OPEN, lambda event: self.connections.opened(event.assoc, event.address)),
            (evt.EVT_CONN_CLOSE, lambda event: self.connections.closed(event.assoc)),
            (evt.EVT_REQUESTED, self._on_requested),
            (evt.EVT_ACCEPTED, self._on_accepted),
            (evt.EVT_REJECTED, self._on_rejected),
            (evt.EVT_RELEASED, self._on_ended),
            (evt.EVT_ABORTED, self._on_ended),
            (evt.EVT_C_ECHO, lambda event: SUCCESS),
            (evt.EVT_C_STORE, self._on_store),
        ]
        server = ae.make_server((self.config.node.bind_address, self.config.node.port), evt_handlers=handlers,
                                ssl_context=self.config.tls.server_context(), server_class=GuardedAssociationServer)
        server.network_timeout_s = self.config.node.network_timeout_s
        # What AE.start_server(block=False) does, with our server class (it cannot take one).
        ae._servers.append(server)
        threading.Thread(target=server.serve_forever, name="lobevol-scp-accept", daemon=True).start()
        self._server = server
        self.connections.start()
        log.info("listening as %s on %s:%d%s", self.config.node.ae_title, self.config.node.bind_address, self.port,
                 " (TLS)" if self.config.tls.enabled else "")

    def stop(self) -> None:
        """Stop accepting associations and close the listening socket."""
        if self._server is not None:
            self._server.shutdown()
            self._server = None
            self.connections.stop()

    # -- association events ------------------------------------------------------------------

    def _on_requested(self, event) -> None:
        primitive = event.assoc.requestor.primitive
        calling = primitive.calling_ae_title
        address = event.assoc.requestor.address
        self.connections.requested(event.assoc, calling)
        refusal = admission_refusal(self.config, calling, primitive.called_ae_title, address)
        if refusal is None:
            busy = self.connections.admit(event.assoc)
            if busy is not None:
                refusal = REJECT_BUSY, f"calling AE title {printable(calling.strip())!r}: {busy}"
        if refusal is not None:
            (result, source, diagnostic), reason = refusal
            log.warning("association from %s rejected: %s", address, reason)
            event.assoc.acse.send_reject(result, source, diagnostic)
            # As pynetdicom does for its own rejections: wait until the DUL has sent the
            # A-ASSOCIATE-RJ and the peer closed, else the socket closes first (an abort).
            event.assoc.kill()

    def _on_accepted(self, event) -> None:
        calling = event.assoc.requestor.ae_title.strip()
        with self._lock:
            self._tallies[id(event.assoc)] = AssociationTally(calling)  # admitted: a configured AE title
        log.info("association from %s (%s) accepted", calling, event.assoc.requestor.address)

    def _on_rejected(self, event) -> None:
        log.warning("association from %s rejected by the connection limit (%d associations + %d not yet "
                    "associated): %s", event.assoc.requestor.address, self.config.node.max_associations,
                    self.config.node.max_pending_connections, "; ".join(self.connections.holders()))

    def _on_ended(self, event) -> None:
        with self._lock:
            tally = self._tallies.pop(id(event.assoc), None)
        if tally is not None and (tally.stored or tally.ignored or tally.refused):
            log.info("association from %s ended: %d stored (%d duplicate), %d ignored (not CT), %d refused",
                     tally.calling_ae, tally.stored, tally.duplicates, tally.ignored, tally.refused)

    # -- C-STORE -----------------------------------------------------------------------------

    def _on_store(self, event) -> Dataset | int:
        tally = self._tallies.get(id(event.assoc)) or AssociationTally(event.assoc.requestor.ae_title.strip())
        try:
            status = self._store(event, tally)
        except StoreUnavailable as error:  # transient: the sender keeps the instance and sends it again
            log.error("instance from %s refused: the job store is unavailable: %s", tally.calling_ae, error)
            status = _refusal(OUT_OF_RESOURCES, "job store unavailable, send again later")
        if isinstance(status, Dataset):
            tally.refused += 1
        return status

    def _store(self, event, tally: AssociationTally) -> Dataset | int:
        size = event.request.DataSet.getbuffer().nbytes
        if size > self.config.storage.max_instance_bytes:
            log.warning("instance from %s refused: %.1f MiB, above max_instance_mb", tally.calling_ae, size / 2**20)
            return _refusal(OUT_OF_RESOURCES, f"instance of {size / 2**20:.0f} MiB is above max_instance_mb")
        database = self.config.storage.database
        # Only an embedded SQLite file lives on a disk of ours; a PostgreSQL server minds its own.
        full = self.spool.room_problem(size, self.config.storage.disk_high_water_percent,
                                       database if isinstance(database, Path) else None)
        if full is not None:
            log.error("refusing new instances: %s", full)
            return _refusal(OUT_OF_RESOURCES, full)
        try:
            dataset = event.dataset
            study_uid = check_uid(dataset.get("StudyInstanceUID"), "Study Instance UID")
            series_uid = check_uid(dataset.get("SeriesInstanceUID"), "Series Instance UID")
            sop_uid = check_uid(dataset.get("SOPInstanceUID"), "SOP Instance UID")
        except ValueError as error:
            log.warning("instance from %s refused: %s", tally.calling_ae, error)
            return _refusal(DATASET_DOES_NOT_MATCH, str(error))
        except Exception as error:  # pydicom raises many types on corrupt data
            log.warning("instance from %s cannot be decoded: %s", tally.calling_ae, error)
            return _refusal(CANNOT_DECODE, "dataset cannot be decoded")
        if sop_uid != str(event.request.AffectedSOPInstanceUID).strip():
            log.warning("instance from %s refused: its SOP Instance UID %s differs from the request's %s",
                        tally.calling_ae, sop_uid, printable(event.request.AffectedSOPInstanceUID))
            return _refusal(DATASET_DOES_NOT_MATCH, "SOP Instance UID differs from the request's")
        sop_class = str(event.request.AffectedSOPClassUID)
        if self.config.node.log_patient_identifiers:
            log.debug("study %s: patient %s, id %s", study_uid, dataset.get("PatientName"), dataset.get("PatientID"))
        if sop_class not in KEPT_SOP_CLASSES:
            self.jobs.record_ignored(study_uid, tally.calling_ae)
            tally.ignored += 1
            log.debug("study %s: ignored a %s instance", study_uid, getattr(event.request.AffectedSOPClassUID, "name", sop_class))
            return SUCCESS
        try:
            problem = pixel_data_problem(dataset)
        except Exception as error:  # the pixel data element itself does not decode
            log.warning("instance from %s cannot be decoded: %s", tally.calling_ae, error)
            return _refusal(CANNOT_DECODE, "pixel data cannot be decoded")
        if problem is not None:
            log.warning("study %s: instance %s from %s refused: %s", study_uid, sop_uid, tally.calling_ae, problem)
            return _refusal(DATASET_DOES_NOT_MATCH, problem)
        if (self.jobs.study_instance_count(study_uid) >= self.config.storage.max_instances_per_study
                and not self.jobs.has_instance(sop_uid)):  # a resend of one it holds replaces it
            log.warning("study %s refused an instance: already %d instances (max_instances_per_study)",
                        study_uid, self.config.storage.max_instances_per_study)
            return _refusal(OUT_OF_RESOURCES, "study has max_instances_per_study instances")
        try:
            stored = self.committer.store(event.encoded_dataset(), study_uid, series_uid, sop_class, sop_uid, size,
                                          tally.calling_ae)
        except OSError as error:
            log.error("study %s: writing an instance to the spool failed: %s", study_uid, error)
            if error.errno in (errno.ENOSPC, errno.EDQUOT):  # another association took the last room first
                return _refusal(OUT_OF_RESOURCES, "spool disk full")
            return _refusal(CANNOT_STORE, "writing to the spool failed")
        except sqlite3.Error as error:  # not a transient condition (a corrupt database file...)
            log.error("study %s: recording an instance in the job queue failed: %s", study_uid, error)
            if getattr(error, "sqlite_errorcode", None) == sqlite3.SQLITE_FULL:
                return _refusal(OUT_OF_RESOURCES, "job database disk full")
            return _refusal(CANNOT_STORE, "recording in the job queue failed")
        tally.stored += 1
        tally.duplicates += int(stored.replaced)
        return SUCCESS


def _refusal(status: int, comment: str) -> Dataset:
    """A C-STORE response status with an Error Comment (LO: at most 64 characters)."""
    response = Dataset()
    response.Status = status
    response.ErrorComment = comment[:64]
    return response
