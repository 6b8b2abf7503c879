"""Sending result files to one destination, whatever the transport: the interface the outbox uses.

A destination of the remote table is reached by DICOM C-STORE
(:class:`node.service.scu.CStoreTransport`) or, when its section has a
``stow_url``, by DICOMweb STOW-RS (:class:`node.service.stow.StowTransport`).
Both answer with one :class:`StoreResult` per file, outcome:
  sent     the destination stored it (possibly with a warning)
  refused  it will not take this file: not retried, the reason is recorded
  retry    a transient failure for this file: retried with backoff
and raise :class:`PeerUnavailable` when the destination cannot be reached at
all (down, timed out, rejected us): every file is retried with backoff.
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Callable, Protocol, Sequence

if TYPE_CHECKING:
    from node.config import NodeConfig, RemoteAE


class PeerUnavailable(ConnectionError):
    """The destination could not be reached or would not talk to us (down, timed out, rejected us)."""


@dataclass(frozen=True)
class StoreResult:
    """The outcome of sending one file."""

    path: Path
    outcome: str  # sent | refused | retry
    detail: str = ""


class Transport(Protocol):
    """One destination reached one way; ``description`` says where (for messages, never with secrets)."""

    description: str

    def send(self, paths: Sequence[Path], progress: Callable[[StoreResult], None] | None = None) -> list[StoreResult]:
        """Send ``paths``; one result per path, in order. PeerUnavailable when nothing could be sent."""
        ...


def transport_for(remote: "RemoteAE", config: "NodeConfig", calling_ae: str | None = None) -> Transport:
    """How results reach ``remote``: STOW-RS when it has a ``stow_url``, else C-STORE as ``calling_ae``.

    ``calling_ae`` defaults to the node's AE title; C-STORE uses the node's [tls] settings.
    """
    # imported here: both transport modules import StoreResult and PeerUnavailable from this one
    if remote.stow is not None:
        from node.service.stow import StowTransport

        return StowTransport(remote.ae_title, remote.stow)
    from node.service.scu import CStoreTransport

    return CStoreTransport(remote, calling_ae or config.node.ae_title, config.tls)
