"""Hand-made DICOM upper-layer bytes for hostile-input tests: PDUs no well-behaved library would send."""
from __future__ import annotations

import socket
import struct

from pydicom.uid import ExplicitVRLittleEndian, ImplicitVRLittleEndian

APPLICATION_CONTEXT = b"1.2.840.10008.3.1.1.1"
VERIFICATION = b"1.2.840.10008.1.1"
CT_IMAGE_STORAGE = b"1.2.840.10008.5.1.4.1.1.2"


def _item(item_type: int, body: bytes) -> bytes:
    return struct.pack(">BBH", item_type, 0, len(body)) + body


def associate_rq(calling: bytes = b"PACS", called: bytes = b"LOBEVOL",
                 abstract_syntaxes: tuple[bytes, ...] = (VERIFICATION, CT_IMAGE_STORAGE)) -> bytes:
    """An A-ASSOCIATE-RQ PDU (PS3.8 9.3.2) with the AE title bytes exactly as given (padded to 16)."""
    contexts = b"".join(
        _item(0x20, struct.pack(">BBBB", 2 * n + 1, 0, 0, 0) + _item(0x30, syntax)
              + _item(0x40, ExplicitVRLittleEndian.encode()) + _item(0x40, ImplicitVRLittleEndian.encode()))
        for n, syntax in enumerate(abstract_syntaxes))
    user = _item(0x50, _item(0x51, struct.pack(">I", 16384)) + _item(0x52, b"1.2.826.0.1.3680043.9.7433.1"))
    body = (struct.pack(">HH", 1, 0) + called.ljust(16, b" ")[:16] + calling.ljust(16, b" ")[:16] + bytes(32)
            + _item(0x10, APPLICATION_CONTEXT) + contexts + user)
    return struct.pack(">BBI", 0x01, 0, len(body)) + body


def pdu(pdu_type: int, body: bytes, length: int | None = None) -> bytes:
    """A PDU of any type; ``length`` overrides the length field (to lie about it)."""
    return struct.pack(">BBI", pdu_type, 0, len(body) if length is None else length) + body


def connect(port: int, timeout_s: float = 5.0) -> socket.socket:
    """A TCP connection to 127.0.0.1:port."""
    sock = socket.create_connection(("127.0.0.1", port), timeout=timeout_s)
    return sock


def read_pdu_type(sock: socket.socket) -> int | None:
    """The type of the next PDU the node sends (2 accept, 3 reject, 7 abort), None when it closed."""
    header = b""
    try:
        while len(header) < 6:
            chunk = sock.recv(6 - len(header))
            if not chunk:
                return None
            header += chunk
    except (ConnectionResetError, TimeoutError):
        return None
    return header[0]


def closed_by_peer(sock: socket.socket, timeout_s: float) -> bool:
    """Whether the node closes this connection within ``timeout_s`` (reading and discarding what it sends)."""
    sock.settimeout(timeout_s)
    try:
        while sock.recv(4096):
            pass
        return True
    except ConnectionResetError:
        return True
    except TimeoutError:
        return False
