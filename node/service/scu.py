"""The node's SCU: C-ECHO and C-STORE to a remote AE, proposing only the contexts needed.

:func:`store_files` is used by the outbox (results) and by ``lobevol send``.
Each file's outcome is one of:
  sent     the peer answered success or a warning (0x0000, 0xB000, 0xB006, 0xB007)
  refused  the peer will not take it: it rejected the SOP class's presentation
           context, or answered a failure other than out of resources
  retry    a transient failure (0xA7xx out of resources, or the association broke)
An association that cannot be established raises :class:`PeerUnavailable`.
:class:`CStoreTransport` is this SCU as a :class:`node.service.delivery.Transport`.
"""
from __future__ import annotations

import logging
import socket
import ssl
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Sequence

import pydicom
from pydicom.uid import ExplicitVRLittleEndian, ImplicitVRLittleEndian, UID
from pynetdicom import AE
from pynetdicom.sop_class import Verification

from node.config import RemoteAE, TLSSettings
from node.service.delivery import PeerUnavailable, StoreResult

log = logging.getLogger(__name__)

WARNING_STATUSES = (0xB000, 0xB006, 0xB007)
#: PS3.7 limits a requestor to 128 presentation contexts per association.
MAX_CONTEXTS = 128


@dataclass(frozen=True)
class FileHeader:
    path: Path
    sop_class_uid: str
    sop_instance_uid: str
    transfer_syntax_uid: str


def read_file_header(path: Path) -> FileHeader:
    """SOP class, instance and transfer syntax of a DICOM file; ValueError when it is not one."""
    try:
        ds = pydicom.dcmread(path, stop_before_pixels=True, specific_tags=["SOPClassUID", "SOPInstanceUID"])
        return FileHeader(Path(path), str(ds.SOPClassUID), str(ds.SOPInstanceUID), str(ds.file_meta.TransferSyntaxUID))
    except (pydicom.errors.InvalidDicomError, AttributeError, OSError) as error:
        raise ValueError(f"{path} is not a DICOM file with SOP class and instance UIDs ({error})") from None


def _application_entity(calling_ae: str) -> AE:
    ae = AE(ae_title=calling_ae)
    ae.acse_timeout = ae.dimse_timeout = ae.network_timeout = 60
    return ae


def _associate(ae: AE, remote: RemoteAE, tls: TLSSettings | None):
    tls_arguments = tls.client_context(remote.host) if tls is not None else None
    try:
        assoc = ae.associate(remote.host, remote.port, ae_title=remote.ae_title, tls_args=tls_arguments)
    except OSError as error:  # TLS handshake failures and the like
        raise PeerUnavailable(f"{remote.ae_title} at {remote.host}:{remote.port}: {error}") from None
    if assoc.is_established:
        return assoc
    if assoc.is_rejected:
        reason = f"association rejected (does it know our AE title {ae.ae_title} and answer to {remote.ae_title}?)"
    else:  # pynetdicom reports a refused or timed-out connection, and a failed TLS handshake, as an abort
        reason = ((tls_arguments and tls_handshake_problem(remote, *tls_arguments))
                  or "no association: connection refused, timed out or aborted (is it running?)")
    raise PeerUnavailable(f"{remote.ae_title} at {remote.host}:{remote.port}: {reason}")


#: OpenSSL's verify messages, said in the node's terms.
_VERIFY_HINTS = {
    "unable to get local issuer certificate": "signed by a CA not in [tls] ca_certificates",
    "self-signed certificate": "self-signed, and not in [tls] ca_certificates",
    "self-signed certificate in certificate chain": "its chain ends at a CA not in [tls] ca_certificates",
}


def tls_handshake_problem(remote: RemoteAE, context: ssl.SSLContext, server_name: str,
                          timeout_s: float = 10.0) -> str | None:
    """Why a TLS handshake with ``remote`` fails, or None when it succeeds or the peer cannot be reached.

    pynetdicom logs a failed handshake and reports an abort; this handshake, made
    again only after a failure, gives the delivery's reason the certificate's problem
    (expired, another CA, another host name) instead of "no association".
    """
    try:
        with socket.create_connection((remote.host, remote.port), timeout=timeout_s) as raw:
            with context.wrap_socket(raw, server_hostname=server_name):
                return None
    except ssl.SSLCertVerificationError as error:
        message = str(error.verify_message or error.reason).rstrip(".")
        hint = _VERIFY_HINTS.get(message)
        return (f"TLS: {remote.ae_title}'s certificate is not trusted: {message}"
                + (f" ({hint})" if hint else ""))
    except ssl.SSLError as error:
        return f"TLS handshake failed: {error.reason or error}"
    except OSError:
        return None


def echo(remote: RemoteAE, calling_ae: str, tls: TLSSettings | None = None) -> int:
    """C-ECHO the remote; returns the status (0 = success). PeerUnavailable when it cannot be reached."""
    ae = _application_entity(calling_ae)
    ae.add_requested_context(Verification)
    assoc = _associate(ae, remote, tls)
    try:
        response = assoc.send_c_echo()
    finally:
        assoc.release()
    if "Status" not in response:
        raise PeerUnavailable(f"{remote.ae_title}: no C-ECHO response (connection lost)")
    return int(response.Status)


def store_files(remote: RemoteAE, paths: Sequence[Path], calling_ae: str, tls: TLSSettings | None = None,
                progress: Callable[[StoreResult], None] | None = None) -> list[StoreResult]:
    """C-STORE ``paths`` to ``remote`` over as few associations as the 128-context limit allows.

    Each SOP class is proposed with the file's own transfer syntax (plus both
    uncompressed little-endian ones for uncompressed files, which pydicom can
    convert between). Raises PeerUnavailable when no association can be made.
    """
    headers = [read_file_header(Path(p)) for p in paths]
    results: list[StoreResult] = []
    for batch in _batches(headers):
        results += _store_batch(remote, batch, calling_ae, tls, progress)
    return results


@dataclass(frozen=True)
class CStoreTransport:
    """C-STORE to ``remote`` calling as ``calling_ae``, with TLS when ``tls`` is enabled."""

    remote: RemoteAE
    calling_ae: str
    tls: TLSSettings | None = None

    @property
    def description(self) -> str:
        return f"{self.remote.ae_title} at {self.remote.host}:{self.remote.port} (C-STORE)"

    def send(self, paths: Sequence[Path], progress: Callable[[StoreResult], None] | None = None) -> list[StoreResult]:
        return store_files(self.remote, paths, self.calling_ae, self.tls, progress)


def _contexts_for(headers: Sequence[FileHeader]) -> dict[str, set[str]]:
    syntaxes: dict[str, set[str]] = {}
    for header in headers:
        wanted = syntaxes.setdefault(header.sop_class_uid, set())
        wanted.add(header.transfer_syntax_uid)
        if not UID(header.transfer_syntax_uid).is_compressed:
            wanted.update((ExplicitVRLittleEndian, ImplicitVRLittleEndian))
    return syntaxes


def _batches(headers: list[FileHeader]) -> list[list[FileHeader]]:
    """Split files so that no association needs more than MAX_CONTEXTS contexts."""
    batches: list[list[FileHeader]] = []
    current: list[FileHeader] = []
    for header in headers:
        if sum(len(s) for s in _contexts_for([*current, header]).values()) > MAX_CONTEXTS:
            batches.append(current)
            current = []
        current.append(header)
    if current:
        batches.append(current)
    return batches


def _store_batch(remote: RemoteAE, headers: list[FileHeader], calling_ae: str, tls: TLSSettings | None,
                 progress) -> list[StoreResult]:
    ae = _application_entity(calling_ae)
    for sop_class, syntaxes in _contexts_for(headers).items():
        for syntax in sorted(syntaxes):
            ae.add_requested_context(sop_class, syntax)
    assoc = _associate(ae, remote, tls)
    accepted = {(c.abstract_syntax, c.transfer_syntax[0]) for c in assoc.accepted_contexts}
    accepted_classes = {sop for sop, _ in accepted}
    results = []
    try:
        for header in headers:
            result = _store_one(assoc, header, accepted_classes, remote)
            results.append(result)
            if progress is not None:
                progress(result)
    finally:
        if assoc.is_established:
            assoc.release()
    return results


def _store_one(assoc, header: FileHeader, accepted_classes: set[str], remote: RemoteAE) -> StoreResult:
    name = UID(header.sop_class_uid).name
    if header.sop_class_uid not in accepted_classes:
        return StoreResult(header.path, "refused", f"{remote.ae_title} does not accept {name}")
    if not assoc.is_established:
        return StoreResult(header.path, "retry", "association ended before this file was sent")
    try:
        response = assoc.send_c_store(header.path)
    except ValueError as error:  # no context for this transfer syntax
        return StoreResult(header.path, "refused", f"{remote.ae_title} does not accept {name} as sent: {error}")
    if "Status" not in response:
        return StoreResult(header.path, "retry", "no C-STORE response (association aborted or timed out)")
    status = int(response.Status)
    comment = f" ({response.ErrorComment})" if "ErrorComment" in response else ""
    if status == 0 or status in WARNING_STATUSES:
        return StoreResult(header.path, "sent", f"status 0x{status:04X}" if status else "")
    if 0xA700 <= status <= 0xA7FF:
        return StoreResult(header.path, "retry", f"{remote.ae_title} out of resources, status 0x{status:04X}{comment}")
    return StoreResult(header.path, "refused", f"{remote.ae_title} refused {name}, status 0x{status:04X}{comment}")
