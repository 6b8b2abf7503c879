"""Results to a DICOMweb server by STOW-RS (PS3.18 10.5), through the ``dicomweb-client`` library.

:class:`StowTransport` is a :class:`node.service.delivery.Transport`. Files go
in requests of at most ``MAX_REQUEST_BYTES`` (at least one file each) to
``{url}/studies``. How an answer becomes outcomes (PS3.18 10.5.3):
  - 200 (all stored) or 202 (some stored): each instance in the Failed SOP
    Sequence is refused with its Failure Reason, or retried when that reason is
    out of resources (0xA7xx, as for C-STORE); the others are sent;
  - 409 or another 4xx about the content (400, 413, 415, ...): refused; instances
    the answer lists as stored are sent, those it lists as failed carry their
    Failure Reason, the rest the HTTP reason;
  - 5xx, 401/403/407 (the server will not talk to us: wrong credentials, like a
    rejected association), 404/405 (wrong URL), 408, 429, a timeout, a connection
    or TLS error: :class:`PeerUnavailable`, so every file is retried with backoff.
The library's own retries are off: the outbox's backoff is persisted and visible.
Secrets (password, token) never reach a message or a log line.
"""
from __future__ import annotations

import json
import logging
from http import HTTPStatus
from pathlib import Path
from typing import Callable, Sequence

import pydicom
import requests
from dicomweb_client.api import DICOMwebClient
from pydicom.uid import UID

from node.config import StowSettings
from node.service.delivery import PeerUnavailable, StoreResult

log = logging.getLogger(__name__)

#: Keep each request's message (held in memory by the library) bounded.
MAX_REQUEST_BYTES = 64 * 2**20
#: HTTP answers that say nothing about our objects: the server is unreachable for us now.
UNAVAILABLE_STATUSES = (401, 403, 404, 405, 407, 408, 429)
#: Failure Reasons (0008,1197) worth naming (PS3.18 Table 10.5.3-2, PS3.4 C-STORE statuses).
FAILURE_REASONS = {
    0x0110: "processing failure",
    0x0112: "no such object instance",
    0x0122: "SOP class not supported",
    0x0124: "not authorized",
    0x0211: "unrecognized operation",
    0xA700: "out of resources",
    0xA900: "data set does not match SOP class",
    0xC000: "cannot understand",
    0xC122: "referenced transfer syntax not supported",
}


class StowTransport:
    """STOW-RS to the DICOMweb server of remote ``name``."""

    def __init__(self, name: str, settings: StowSettings):
        self.name, self.settings = name, settings
        self.description = f"{name} at {settings.url} (STOW-RS)"

    def send(self, paths: Sequence[Path], progress: Callable[[StoreResult], None] | None = None) -> list[StoreResult]:
        """POST ``paths`` in bounded requests; PeerUnavailable when the first request cannot be made."""
        results: list[StoreResult] = []
        with _Session() as session:
            client, last_status = self._client(session)
            for batch in _batches([Path(p) for p in paths]):
                try:
                    batch_results = self._post(client, last_status, batch)
                except PeerUnavailable as error:
                    if not results:
                        raise
                    batch_results = [StoreResult(p, "retry", str(error)) for p in batch]
                for result in batch_results:
                    results.append(result)
                    if progress is not None:
                        progress(result)
        return results

    def _client(self, session: requests.Session) -> tuple[DICOMwebClient, list[int]]:
        """The library's client on ``session`` with our TLS and credentials, and the last HTTP status it got."""
        last_status = [0]  # store_instances returns the answer's dataset, not its status (200 or 202)
        session.hooks["response"].append(lambda response, *args, **kwargs: last_status.__setitem__(
            0, response.status_code))
        session.verify = str(self.settings.ca_certificates) if self.settings.ca_certificates else True
        try:
            if self.settings.username is not None:
                session.auth = (self.settings.username, _secret(self.settings.password_file))
            elif self.settings.token_file is not None:
                session.headers["Authorization"] = f"Bearer {_secret(self.settings.token_file)}"
        except (OSError, ValueError) as error:  # a token file being rewritten: try again later
            raise PeerUnavailable(f"{self.description}: {error}") from None
        timeout = self.settings.timeout_s
        client = DICOMwebClient(self.settings.url, session=session, timeout=(min(timeout, 10.0), timeout))
        client.set_http_retry_params(retry=False)
        return client, last_status

    def _post(self, client: DICOMwebClient, last_status: list[int], paths: list[Path]) -> list[StoreResult]:
        datasets = [_read(p) for p in paths]
        readable = [(p, ds) for p, ds in zip(paths, datasets) if isinstance(ds, pydicom.Dataset)]
        unreadable = {p: StoreResult(p, "refused", ds) for p, ds in zip(paths, datasets) if isinstance(ds, str)}
        outcomes: dict[Path, StoreResult] = dict(unreadable)
        if readable:
            outcomes.update(self._store(client, last_status, readable))
        return [outcomes[p] for p in paths]

    def _store(self, client: DICOMwebClient, last_status: list[int],
               items: list[tuple[Path, pydicom.Dataset]]) -> dict[Path, StoreResult]:
        try:
            answer = client.store_instances([ds for _, ds in items])
            status = last_status[0]
        except requests.HTTPError as error:
            status = error.response.status_code
            if status >= 500 or status in UNAVAILABLE_STATUSES:
                raise PeerUnavailable(f"{self.description}: HTTP {status} {_phrase(status)}") from None
            answer = _answer_dataset(error.response)
        except requests.RequestException as error:  # connection refused, timeout, TLS failure
            raise PeerUnavailable(f"{self.description}: {_reason(error)}") from None
        except (KeyError, ValueError, json.JSONDecodeError) as error:  # stored or not: unknown, so send again
            raise PeerUnavailable(f"{self.description}: unreadable STOW-RS answer ({error})") from None
        failed = {str(i.get("ReferencedSOPInstanceUID", "")): i for i in answer.get("FailedSOPSequence", [])}
        stored = {str(i.get("ReferencedSOPInstanceUID", "")) for i in answer.get("ReferencedSOPSequence", [])}
        return {path: self._outcome(path, ds, status, failed, stored) for path, ds in items}

    def _outcome(self, path: Path, ds: pydicom.Dataset, status: int, failed: dict, stored: set[str]) -> StoreResult:
        uid, name = str(ds.SOPInstanceUID), _sop_class_name(str(ds.SOPClassUID))
        if uid in failed:
            reason = failed[uid].get("FailureReason")
            if reason is not None and 0xA700 <= reason <= 0xA7FF:
                return StoreResult(path, "retry", f"{self.name} could not store {name} now: HTTP {status}"
                                   + _failure_reason(reason))
            return StoreResult(path, "refused", f"{self.name} refused {name}: HTTP {status}" + _failure_reason(reason))
        if status < 300 or uid in stored:
            return StoreResult(path, "sent", f"STOW-RS HTTP {status}")
        return StoreResult(path, "refused", f"{self.name} refused {name}: HTTP {status} {_phrase(status)}")


class _Session(requests.Session):
    """A session whose own CA bundle wins: requests lets REQUESTS_CA_BUNDLE or CURL_CA_BUNDLE in the
    environment replace ``session.verify``, which would silently ignore stow_ca_certificates."""

    def merge_environment_settings(self, url, proxies, stream, verify, cert):
        settings = super().merge_environment_settings(url, proxies, stream, verify, cert)
        if self.verify is not True:
            settings["verify"] = self.verify
        return settings


def _batches(paths: list[Path]) -> list[list[Path]]:
    batches: list[list[Path]] = []
    size = 0
    for path in paths:
        length = path.stat().st_size if path.is_file() else 0
        if not batches or size + length > MAX_REQUEST_BYTES:
            batches.append([])
            size = 0
        batches[-1].append(path)
        size += length
    return batches


def _read(path: Path) -> pydicom.Dataset | str:
    """The file's dataset, or why it cannot be sent."""
    try:
        ds = pydicom.dcmread(path)
        ds.SOPInstanceUID, ds.SOPClassUID  # noqa: B018 (both are needed to match the answer)
        return ds
    except (pydicom.errors.InvalidDicomError, AttributeError, OSError) as error:
        return f"{path.name} cannot be sent: not a readable DICOM file with SOP class and instance ({error})"


def _answer_dataset(response: requests.Response) -> pydicom.Dataset:
    """The Store Instances Response Module of an error answer (empty when the body has none)."""
    try:
        return pydicom.Dataset.from_json(response.json())
    except (ValueError, TypeError, KeyError):  # not DICOM JSON (XML or plain text): nothing per instance
        return pydicom.Dataset()


def _secret(path: Path) -> str:
    lines = Path(path).read_text(encoding="utf-8").splitlines()
    if not lines or not lines[0].strip():
        raise ValueError(f"secret file {path} is empty")
    return lines[0].strip()


def _failure_reason(reason: int | None) -> str:
    if reason is None:
        return ""
    return f", failure reason 0x{reason:04X}" + (f" ({FAILURE_REASONS[reason]})" if reason in FAILURE_REASONS else "")


def _phrase(status: int) -> str:
    try:
        return HTTPStatus(status).phrase
    except ValueError:
        return ""


def _reason(error: requests.RequestException) -> str:
    if isinstance(error, requests.exceptions.SSLError):
        return f"TLS failure (is stow_ca_certificates the CA of its certificate?): {error}"
    if isinstance(error, requests.Timeout):
        return f"timed out: {error}"
    return f"cannot connect: {error}"


def _sop_class_name(uid: str) -> str:
    name = UID(uid).name
    return name if name and name != uid else uid
