"""Real DICOM peers for the node tests: DCMTK storescu/storescp, Orthanc, and waiting helpers.

A missing peer is a failure naming the package (CI installs them), never a skip.
"""
from __future__ import annotations

import json
import shutil
import socket
import ssl
import subprocess
import threading
import time
import urllib.request
from collections import Counter
from pathlib import Path
from typing import Callable, Sequence

import pydicom


def tool(name: str, package: str) -> str:
    path = shutil.which(name)
    if path is None:
        raise RuntimeError(f"{name} not found on PATH: install {package} (apt-get install {package})")
    return path


def free_port() -> int:
    """A TCP port free on loopback right now."""
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def wait_for(condition: Callable[[], object], timeout_s: float, what: str, period_s: float = 0.2):
    """Poll ``condition`` until it returns a true value (returned); AssertionError naming ``what`` on timeout."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        value = condition()
        if value:
            return value
        time.sleep(period_s)
    raise AssertionError(f"timed out after {timeout_s:g} s waiting for {what}")


def storescu(port: int, files: Sequence[Path], *, calling: str = "PACS", called: str = "LOBEVOL",
             timeout_s: float = 120, check: bool = True) -> subprocess.CompletedProcess:
    """DCMTK storescu sending ``files`` to 127.0.0.1:port."""
    command = [tool("storescu", "dcmtk"), "-v", "-aet", calling, "-aec", called, "127.0.0.1", str(port), *map(str, files)]
    completed = subprocess.run(command, capture_output=True, text=True, timeout=timeout_s)
    if check and completed.returncode != 0:
        raise AssertionError(f"storescu failed ({completed.returncode}): {completed.stderr[-2000:]}")
    return completed


class StoreSCP:
    """DCMTK storescp as the receiving PACS: every object received goes to its own file (+uf)."""

    def __init__(self, folder: Path, port: int | None = None, ae_title: str = "PACS"):
        self.folder, self.port, self.ae_title = Path(folder), port or free_port(), ae_title
        self.folder.mkdir(parents=True, exist_ok=True)
        self.process: subprocess.Popen | None = None

    def start(self) -> "StoreSCP":
        self.process = subprocess.Popen(
            [tool("storescp", "dcmtk"), "-aet", self.ae_title, "-od", str(self.folder), "+uf", "+xa", str(self.port)],
            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
        wait_for(self._listening, 10, f"storescp on port {self.port}", 0.05)
        return self

    def _listening(self) -> bool:
        if self.process.poll() is not None:
            raise AssertionError(f"storescp exited: {self.process.stderr.read().decode()[-1000:]}")
        with socket.socket() as probe:
            return probe.connect_ex(("127.0.0.1", self.port)) == 0

    def stop(self) -> None:
        if self.process is not None and self.process.poll() is None:
            self.process.terminate()
            self.process.wait(10)
        self.process = None

    def received(self) -> list[pydicom.Dataset]:
        """Headers of every file received so far (duplicates included: one file per C-STORE)."""
        return [pydicom.dcmread(p, stop_before_pixels=True) for p in sorted(self.folder.iterdir()) if p.is_file()]

    def __enter__(self) -> "StoreSCP":
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()


class CountingSCP:
    """A PACS (pynetdicom, in this process) that records every C-STORE it answers, re-sends included.

    Unlike a folder of files named by SOP Instance UID, which a re-send overwrites,
    :attr:`receipts` keeps one entry per C-STORE, so a duplicate delivery shows.
    ``on_store(dataset, receipts)`` is called (in the SCP's thread) after the
    receipt is recorded and before success is answered: a test can kill the
    sender there, after "the PACS stored it" and before the sender hears so.
    """

    def __init__(self, port: int | None = None, ae_title: str = "PACS",
                 on_store: Callable[[pydicom.Dataset, list], None] | None = None):
        self.port, self.ae_title, self.on_store = port or free_port(), ae_title, on_store
        self.receipts: list[tuple[str, str, str]] = []  # (Study, SOP Class, SOP Instance UID) per C-STORE
        self._lock = threading.Lock()
        self._server = None

    def start(self) -> "CountingSCP":
        from pynetdicom import AE, AllStoragePresentationContexts, evt
        from pynetdicom.sop_class import Verification

        ae = AE(ae_title=self.ae_title)
        ae.add_supported_context(Verification)
        for context in AllStoragePresentationContexts:
            ae.add_supported_context(context.abstract_syntax)
        ae.maximum_associations = 32
        self._server = ae.start_server(("127.0.0.1", self.port), block=False,
                                       evt_handlers=[(evt.EVT_C_STORE, self._store)])
        return self

    def _store(self, event) -> int:
        dataset = event.dataset
        with self._lock:
            self.receipts.append((str(dataset.StudyInstanceUID), str(dataset.SOPClassUID),
                                  str(dataset.SOPInstanceUID)))
            snapshot = list(self.receipts)
        if self.on_store is not None:
            self.on_store(dataset, snapshot)
        return 0x0000

    def counts(self) -> Counter:
        """C-STOREs received per SOP Instance UID."""
        with self._lock:
            return Counter(uid for _, _, uid in self.receipts)

    def by_study(self) -> dict[str, list[tuple[str, str]]]:
        """(SOP Class, SOP Instance UID) of every receipt, per study."""
        studies: dict[str, list[tuple[str, str]]] = {}
        with self._lock:
            for study, sop_class, uid in self.receipts:
                studies.setdefault(study, []).append((sop_class, uid))
        return studies

    def stop(self) -> None:
        if self._server is not None:
            self._server.shutdown()
            self._server = None

    def __enter__(self) -> "CountingSCP":
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()


REPO = Path(__file__).resolve().parents[1]


def serve(config: Path, log: Path, segmenter: str = "tests.output_fixtures:PartitionSegmenter") -> subprocess.Popen:
    """``lobevol serve`` as a subprocess with the model-free ``segmenter`` (module:Class), once it listens.

    It runs through :mod:`tests.stand_in_node`, which hands the stand-in to ``node.cli.main``.
    """
    import sys

    from node.config import load_config

    process = subprocess.Popen([sys.executable, "-m", "tests.stand_in_node", segmenter, "-v", "serve", "--config",
                                str(config)], cwd=REPO, stdout=open(log, "ab"), stderr=subprocess.STDOUT)
    port = load_config(config).node.port

    def listening() -> bool:
        if process.poll() is not None:
            raise AssertionError(f"lobevol serve exited {process.returncode}: {Path(log).read_text()[-3000:]}")
        with socket.socket() as probe:
            return probe.connect_ex(("127.0.0.1", port)) == 0

    wait_for(listening, 120, "lobevol serve to listen")
    return process


class Orthanc:
    """An Orthanc server in a temporary folder, knowing the node as modality ``lobevol`` when ``node_port`` is given.

    ``extra`` is merged into Orthanc's configuration (plugins, users...);
    ``credentials`` (user, password) are sent with every REST call; with ``"SslEnabled"`` in
    ``extra``, REST calls use https and trust ``ca_certificates``.
    """

    def __init__(self, folder: Path, node_port: int | None = None, ae_title: str = "PACS", node_ae: str = "LOBEVOL",
                 *, extra: dict | None = None, credentials: tuple[str, str] | None = None,
                 ca_certificates: Path | None = None):
        self.folder = Path(folder)
        self.dicom_port, self.http_port = free_port(), free_port()
        self.config = {
            "Name": "lobevol-test", "StorageDirectory": str(self.folder / "storage"),
            "IndexDirectory": str(self.folder / "index"), "DicomAet": ae_title, "DicomPort": self.dicom_port,
            "HttpPort": self.http_port, "RemoteAccessAllowed": False, "AuthenticationEnabled": False,
            "DicomModalities": {"lobevol": [node_ae, "127.0.0.1", node_port]} if node_port else {},
            "DicomCheckCalledAet": False, "Plugins": [], "HttpServerEnabled": True,
        }
        self.config.update(extra or {})
        self.credentials = credentials
        self.ssl_context = ssl.create_default_context(cafile=str(ca_certificates)) if ca_certificates else None
        self.process: subprocess.Popen | None = None
        self.log = None

    def start(self, timeout_s: float = 30) -> "Orthanc":
        """Start (again, on the same folders, after :meth:`stop` or :meth:`kill`)."""
        self.folder.mkdir(parents=True, exist_ok=True)
        config = self.folder / "orthanc.json"
        config.write_text(json.dumps(self.config))
        self.log = open(self.folder / "orthanc.log", "ab")
        self.process = subprocess.Popen([tool("Orthanc", "orthanc"), str(config)], stdout=self.log,
                                        stderr=subprocess.STDOUT)
        wait_for(self._up, timeout_s, "Orthanc's REST API", 0.2)
        return self

    def _up(self) -> bool:
        if self.process.poll() is not None:
            raise AssertionError(f"Orthanc exited: {self.log_text()[-2000:]}")
        try:
            self.get("/system")
            return True
        except OSError:
            return False

    def log_text(self) -> str:
        return (self.folder / "orthanc.log").read_text(errors="replace")

    def url(self, path: str) -> str:
        scheme = "https" if self.config.get("SslEnabled") else "http"
        return f"{scheme}://127.0.0.1:{self.http_port}{path}"

    def _request(self, path: str, body: bytes | None = None, content_type: str = "application/json"):
        request = urllib.request.Request(self.url(path), data=body)
        if body is not None:
            request.add_header("Content-Type", content_type)
        if self.credentials:
            import base64

            token = base64.b64encode(":".join(self.credentials).encode()).decode()
            request.add_header("Authorization", f"Basic {token}")
        return request

    def get(self, path: str):
        with urllib.request.urlopen(self._request(path), timeout=30, context=self.ssl_context) as response:
            return json.loads(response.read())

    def get_bytes(self, path: str) -> bytes:
        with urllib.request.urlopen(self._request(path), timeout=30, context=self.ssl_context) as response:
            return response.read()

    def post(self, path: str, body: bytes, content_type: str = "application/json"):
        with urllib.request.urlopen(self._request(path, body, content_type), timeout=300,
                                    context=self.ssl_context) as response:
            return json.loads(response.read() or b"null")

    def upload(self, path: Path) -> dict:
        return self.post("/instances", Path(path).read_bytes(), "application/dicom")

    def stop(self) -> None:
        if self.process is not None and self.process.poll() is None:
            self.process.terminate()
            self.process.wait(30)
        self.process = None
        if self.log is not None:
            self.log.close()
            self.log = None

    def kill(self) -> None:
        """``kill -9``: no shutdown of any kind."""
        self.process.kill()
        self.process.wait(10)
        self.process = None
        self.log.close()
        self.log = None


DICOMWEB_PLUGIN = Path("/usr/share/orthanc/plugins/libOrthancDicomWeb.so")


def dicomweb_settings(**extra) -> dict:
    """Orthanc configuration entries enabling its DICOMweb plugin at /dicom-web/ (plus ``extra``)."""
    if not DICOMWEB_PLUGIN.is_file():
        raise RuntimeError(f"{DICOMWEB_PLUGIN} not found: install orthanc-dicomweb (apt-get install orthanc-dicomweb)")
    return {"Plugins": [str(DICOMWEB_PLUGIN)], "DicomWeb": {"Enable": True, "Root": "/dicom-web/"}, **extra}


def write_node_config(folder: Path, *, port: int, pacs_port: int, stability_s: float = 1.0, model: Path | None = None,
                      extra: str = "") -> Path:
    """A node config in ``folder`` (spool, results and database inside it) knowing PACS at ``pacs_port``."""
    folder.mkdir(parents=True, exist_ok=True)
    text = f"""\
[node]
port = {port}
shutdown_grace_s = 30
[storage]
spool = spool
results = results
database = jobs.sqlite
[series]
stability_s = {stability_s}
[inference]
device = cpu
threads = 1
model = {model or ''}
[outputs]
overlays = no
[retry]
first_delay_s = 0.5
max_delay_s = 2
max_attempts = 30
[remote PACS]
host = 127.0.0.1
port = {pacs_port}
may_send = yes
may_receive = yes
{extra}"""
    path = folder / "node.ini"
    path.write_text(text)
    return path


def tiny_checkpoint(path: Path) -> Path:
    """An untrained, tiny ResU-Net checkpoint in the project's format (fast to load and run)."""
    import torch

    from inference.checkpoint import CheckpointMeta, save_checkpoint
    from inference.vocabulary import NUM_CLASSES, REGION_KEYS
    from inference.models import build_model
    from inference.preprocess import PreprocessConfig

    torch.manual_seed(0)
    channels = (4, 8)
    model = build_model("resunet", (3, 3, 3), channels, NUM_CLASSES)
    meta = CheckpointMeta(
        format_version=1, architecture="resunet", kernel_size=(3, 3, 3), channels=channels, num_classes=NUM_CLASSES,
        label_keys=tuple(REGION_KEYS), spacing_mm=PreprocessConfig().spacing_mm,
        preprocessing=PreprocessConfig().to_dict(), trained_on="untrained (test)", metrics={},
        code_version="test", weights_sha256="", created="2026-01-01T00:00:00",
    )
    save_checkpoint(path, model, meta)
    return path


class TLSTerminator:
    """https on a free loopback port in front of a plain-http server on ``target_port`` (bytes forwarded as they come).

    Debian 12's Orthanc (1.10.1) crashes in its web server on the first https
    request (SslEnabled), so tests put this in front of its http port instead.
    """

    def __init__(self, certificate: Path, private_key: Path, target_port: int):
        self.context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
        self.context.load_cert_chain(str(certificate), str(private_key))
        self.target_port, self.port = target_port, free_port()
        self.listener: socket.socket | None = None

    def start(self) -> "TLSTerminator":
        import threading

        self.listener = socket.create_server(("127.0.0.1", self.port))
        threading.Thread(target=self._accept, daemon=True).start()
        return self

    def _accept(self) -> None:
        import threading

        while True:
            try:
                client, _ = self.listener.accept()
            except OSError:  # closed by stop()
                return
            threading.Thread(target=self._serve, args=(client,), daemon=True).start()

    def _serve(self, client: socket.socket) -> None:
        import threading

        try:
            secure = self.context.wrap_socket(client, server_side=True)
        except (ssl.SSLError, OSError):  # the client did not trust us: its problem to report
            client.close()
            return
        upstream = socket.create_connection(("127.0.0.1", self.target_port))
        threading.Thread(target=_pump, args=(upstream, secure), daemon=True).start()
        _pump(secure, upstream)

    def stop(self) -> None:
        if self.listener is not None:
            self.listener.close()
            self.listener = None


def _pump(source: socket.socket, target: socket.socket) -> None:
    try:
        while data := source.recv(65536):
            target.sendall(data)
    except OSError:
        pass
    finally:
        for end in (source, target):
            try:
                end.close()
            except OSError:
                pass
