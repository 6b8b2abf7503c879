"""Connections to our SCP: who holds them, how long a caller may take to ask, and the association slots.

pynetdicom (3.0) counts every acceptor thread against ``AE.maximum_associations``,
connections that have not sent (or never will send) an A-ASSOCIATE-RQ included,
and checks the count only once a request arrived. So 50 callers at once see 50
threads and most are refused although few are served; 8 silent sockets take
every slot until its ACSE timeout (30 s); and a caller that stalls inside a PDU
blocks the reader thread in ``recv()`` for ever (accepted sockets have no
timeout), so its association can never end, and nothing is logged.

Here instead:

- every accepted socket gets a timeout (``network_timeout_s``): a read or a write
  that makes no progress for that long closes the connection;
- the TLS handshake runs in the connection's own thread under that timeout, not
  in the accept loop (where one silent TLS client would stop every accept);
- a slot is taken only by an admitted caller (AE titles checked, see
  :meth:`ConnectionGuard.admit`); admitted associations beyond ``max_associations``
  are rejected transient (local limit exceeded), naming who holds the slots;
- a connection without a complete A-ASSOCIATE-RQ after
  ``association_request_timeout_s`` is shut down by a reaper thread whatever it is
  doing (silent, half a PDU, one byte at a time), and logged;
- connections not yet admitted are bounded by pynetdicom's own count
  (``max_associations + max_pending_connections``), so a flood costs threads for
  at most the request timeout.
"""
from __future__ import annotations

import logging
import socket
import ssl
import threading
import time
from dataclasses import dataclass

from pynetdicom.transport import ThreadedAssociationServer

from node.logsafe import printable

log = logging.getLogger(__name__)

#: How often the reaper looks at connections not yet admitted (s).
REAPER_PERIOD_S = 0.25


@dataclass
class Connection:
    """One accepted TCP connection, from accept to close.

    Attributes:
        assoc: pynetdicom's acceptor Association (a thread).
        address: the caller's "host:port".
        opened: when it was accepted (time.monotonic(), s).
        calling_ae: the calling AE title of its A-ASSOCIATE-RQ (escaped), None until one arrived.
        admitted: it passed admission and holds an association slot.
        reaped: the reaper shut it down for not asking in time.
    """

    assoc: object
    address: str
    opened: float
    calling_ae: str | None = None
    admitted: bool = False
    reaped: bool = False

    def describe(self, now: float) -> str:
        who = f"{self.calling_ae}@{self.address}" if self.calling_ae else self.address
        return f"{who} for {now - self.opened:.0f} s"


class ConnectionGuard:
    """Tracks our SCP's connections and hands out the association slots.

    Args:
        max_associations: admitted associations served at once.
        request_timeout_s: from accept to a complete A-ASSOCIATE-RQ, at most (s).
    """

    def __init__(self, max_associations: int, request_timeout_s: float):
        if max_associations < 1 or not request_timeout_s > 0:
            raise ValueError("ConnectionGuard needs max_associations >= 1 and request_timeout_s > 0")
        self.max_associations, self.request_timeout_s = max_associations, request_timeout_s
        self._connections: dict[int, Connection] = {}
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._reaper: threading.Thread | None = None

    # -- pynetdicom events (the handlers call these) -----------------------------------------

    def opened(self, assoc, address: tuple) -> None:
        """EVT_CONN_OPEN: a caller connected."""
        with self._lock:
            self._connections[id(assoc)] = Connection(assoc, f"{address[0]}:{address[1]}", time.monotonic())

    def requested(self, assoc, calling_ae: str) -> None:
        """EVT_REQUESTED: its A-ASSOCIATE-RQ arrived (before admission)."""
        with self._lock:
            connection = self._connections.get(id(assoc))
            if connection is not None:
                connection.calling_ae = printable(calling_ae.strip())

    def admit(self, assoc) -> str | None:
        """Take a slot for an association that passed admission; None, or why there is none free."""
        now = time.monotonic()
        with self._lock:
            self._forget_ended()
            connection = self._connections.get(id(assoc))
            holders = [c for c in self._connections.values() if c.admitted]
            if len(holders) >= self.max_associations:
                pending = sum(1 for c in self._connections.values() if c.calling_ae is None)
                return (f"all {self.max_associations} association slots are held ("
                        + ", ".join(c.describe(now) for c in sorted(holders, key=lambda c: c.opened))
                        + f"); {pending} connection(s) not yet associated")
            if connection is not None:
                connection.admitted = True
            return None

    def closed(self, assoc) -> None:
        """EVT_CONN_CLOSE (where pynetdicom sends it; the reaper also forgets ended threads)."""
        with self._lock:
            connection = self._connections.pop(id(assoc), None)
        if connection is not None:
            _log_unasked(connection, time.monotonic(), self.request_timeout_s)

    # -- views -------------------------------------------------------------------------------

    def holders(self) -> list[str]:
        """Who holds connections now, one "AE@host:port for N s" (or "host:port for N s") each."""
        now = time.monotonic()
        with self._lock:
            return [c.describe(now) + ("" if c.admitted else " (not associated)")
                    for c in sorted(self._connections.values(), key=lambda c: c.opened)]

    # -- the reaper --------------------------------------------------------------------------

    def start(self) -> None:
        self._stop.clear()
        self._reaper = threading.Thread(target=self._reap_loop, name="lobevol-connection-reaper", daemon=True)
        self._reaper.start()

    def stop(self) -> None:
        self._stop.set()
        if self._reaper is not None:
            self._reaper.join()
            self._reaper = None

    def _reap_loop(self) -> None:
        while not self._stop.wait(REAPER_PERIOD_S):
            try:
                self.reap()
            except Exception:  # the reaper must outlive any one odd connection
                log.exception("connection reaper error")

    def reap(self) -> None:
        """Shut down connections that did not ask in time; forget ended ones."""
        now = time.monotonic()
        late = []
        with self._lock:
            self._forget_ended(now)
            for connection in self._connections.values():
                if (connection.calling_ae is None and not connection.reaped
                        and now - connection.opened > self.request_timeout_s):
                    connection.reaped = True
                    late.append(connection)
        for connection in late:
            # shutdown() wakes a reader blocked in recv() (half a PDU), which close() would not.
            sock = getattr(getattr(connection.assoc.dul, "socket", None), "socket", None)
            if sock is not None:
                try:
                    sock.shutdown(socket.SHUT_RDWR)
                except OSError:
                    pass

    def _forget_ended(self, now: float | None = None) -> None:
        """Drop connections whose association thread ended (caller holds the lock)."""
        now = time.monotonic() if now is None else now
        for key, connection in list(self._connections.items()):
            if not connection.assoc.is_alive() and connection.assoc.ident is not None:
                del self._connections[key]
                _log_unasked(connection, now, self.request_timeout_s)


def _log_unasked(connection: Connection, now: float, timeout_s: float) -> None:
    """Log a connection that ended without ever sending a complete A-ASSOCIATE-RQ."""
    if connection.calling_ae is not None:
        return
    age = now - connection.opened
    if connection.reaped or age >= timeout_s:
        log.warning("connection from %s closed: no complete association request within %g s (silent, or "
                    "stalled inside a PDU)", connection.address, timeout_s)
    else:
        log.info("connection from %s ended after %.1f s without an association request", connection.address, age)


class GuardedAssociationServer(ThreadedAssociationServer):
    """pynetdicom's threaded server with a timeout on every accepted socket and TLS off the accept loop.

    ``network_timeout_s`` must be set before the server is started.
    """

    network_timeout_s: float = 60.0

    def get_request(self) -> tuple[socket.socket, tuple[str, int]]:
        client, address = self.socket.accept()
        client.settimeout(self.network_timeout_s)
        return client, address

    def process_request_thread(self, request, client_address) -> None:
        if self.ssl_context is not None:
            try:
                request = self.ssl_context.wrap_socket(request, server_side=True)
            except (OSError, ssl.SSLError) as error:
                log.warning("connection from %s:%s closed: TLS handshake failed: %s", client_address[0],
                            client_address[1], printable(str(error)))
                request.close()
                return
        super().process_request_thread(request, client_address)
