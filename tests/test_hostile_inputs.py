"""`lobevol serve` against hostile and malformed input: association, dataset and study level.

One node process serves the whole table (module fixture; model-free stand-in
segmenter), its results going to a PACS that counts every C-STORE
(tests/node_peers.py CountingSCP). For every input the test asserts the answer
the sender gets, that the node still answers C-ECHO, that its log names the
problem, and that nothing was written outside the node's spool, results and
database. At the end, the log holds no raw control character.
"""
from __future__ import annotations

import signal
import struct
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import numpy as np
import pydicom
import pytest
from pydicom.uid import RLELossless, SecondaryCaptureImageStorage, generate_uid

from node.config import load_config
from node.service.jobs import JobStore
from tests.node_peers import CountingSCP, free_port, serve, storescu, wait_for, write_node_config
from tests.output_fixtures import region_labels, write_ct_series
from tests.raw_dicom import associate_rq, closed_by_peer, connect, pdu, read_pdu_type

pytestmark = pytest.mark.integration

REQUEST_TIMEOUT_S = 1
MAX_ASSOCIATIONS = 4
NOT_ASKED = f"no complete association request within {REQUEST_TIMEOUT_S:g} s"


@dataclass
class Node:
    folder: Path
    port: int
    log: Path
    jobs: JobStore
    pacs: CountingSCP
    series: list[Path]      # a 12-slice 128 x 128 head CT: dataset-level inputs are made from its slices
    scratch: Path           # where the tests write the studies they send (outside the node's folder)

    def log_text(self) -> str:
        return self.log.read_text(errors="replace")

    def final_job(self, study_uid: str, timeout_s: float = 90):
        def ended():
            jobs = [j for j in self.jobs.jobs(limit=200) if j.study_uid == study_uid]
            return next((j for j in jobs if j.state in ("done", "skipped", "failed")), None)
        return wait_for(ended, timeout_s, f"the job of study {study_uid} to end")


@pytest.fixture(scope="module")
def node(tmp_path_factory):
    root = tmp_path_factory.mktemp("hostile")
    scratch = root / "scratch"
    series = write_ct_series(scratch / "base", region_labels((24, 128, 128)), pixel_spacing_mm=1.5)
    with CountingSCP() as pacs:
        path = write_node_config(root / "node", port=free_port(), pacs_port=pacs.port, stability_s=1)
        path.write_text(path.read_text()
                        .replace("[node]\n", f"[node]\nmax_associations = {MAX_ASSOCIATIONS}\n"
                                             f"association_request_timeout_s = {REQUEST_TIMEOUT_S}\n"
                                             "network_timeout_s = 5\n")
                        .replace("[storage]\n", "[storage]\nmax_instance_mb = 1\n"))
        config = load_config(path)
        log = root / "serve.log"
        process = serve(path, log)
        try:
            yield Node(root / "node", config.node.port, log, JobStore(config.storage.database), pacs, series, scratch)
        finally:
            process.send_signal(signal.SIGTERM)
            assert process.wait(60) == 0, log.read_text()[-3000:]
    text = log.read_text(errors="replace")
    raw = [c for c in text if (ord(c) < 0x20 and c != "\n") or 0x7f <= ord(c) <= 0x9f]
    assert not raw, f"raw control characters in the log: {raw[:10]}"


# ---------------------------------------------------------------- senders

def _echo(port: int, calling: str = "PACS"):
    from pynetdicom import AE
    from pynetdicom.sop_class import Verification

    ae = AE(ae_title=calling)
    ae.add_requested_context(Verification)
    ae.acse_timeout = ae.network_timeout = 10
    return ae.associate("127.0.0.1", port, ae_title="LOBEVOL")


def _alive(port: int) -> bool:
    assoc = _echo(port)
    try:
        return assoc.is_established and assoc.send_c_echo().Status == 0x0000
    finally:
        if assoc.is_established:
            assoc.release()


def _c_store(node: Node, dataset_or_path) -> pydicom.Dataset:
    """The C-STORE response status of one instance (pynetdicom sends what it is given, as it is)."""
    from pynetdicom import AE

    if isinstance(dataset_or_path, Path):
        meta = pydicom.dcmread(dataset_or_path, stop_before_pixels=True, force=True).file_meta
        sop_class, syntax = meta.MediaStorageSOPClassUID, meta.TransferSyntaxUID
    else:
        sop_class, syntax = dataset_or_path.SOPClassUID, dataset_or_path.file_meta.TransferSyntaxUID
    from pynetdicom import _config

    ae = AE(ae_title="PACS")
    ae.add_requested_context(sop_class, [syntax])
    assoc = ae.associate("127.0.0.1", node.port, ae_title="LOBEVOL")
    assert assoc.is_established
    # A file is sent as its bytes, the request's UIDs from its file meta: nothing checked on our side.
    chunked, _config.STORE_SEND_CHUNKED_DATASET = _config.STORE_SEND_CHUNKED_DATASET, True
    try:
        return assoc.send_c_store(dataset_or_path)
    finally:
        _config.STORE_SEND_CHUNKED_DATASET = chunked
        assoc.release()


def _slice(node: Node, change: Callable[[pydicom.Dataset], None] | None = None) -> pydicom.Dataset:
    """A slice of the base series in a study of its own, changed by ``change``."""
    ds = pydicom.dcmread(node.series[len(node.series) // 2])
    ds.StudyInstanceUID, ds.SeriesInstanceUID = generate_uid(), generate_uid()
    ds.SOPInstanceUID = ds.file_meta.MediaStorageSOPInstanceUID = generate_uid()
    if change is not None:
        change(ds)
    return ds


def _study(node: Node, name: str, change=None, keep=lambda index: True) -> tuple[str, list[Path]]:
    """The base series as a new study, every header changed by ``change(ds, index)``; (study uid, files)."""
    folder = node.scratch / name
    folder.mkdir()
    study, series_uid = generate_uid(), generate_uid()
    paths = []
    for index, source in enumerate(node.series):
        if not keep(index):
            continue
        ds = pydicom.dcmread(source)
        ds.StudyInstanceUID, ds.SeriesInstanceUID = study, series_uid
        ds.SOPInstanceUID = ds.file_meta.MediaStorageSOPInstanceUID = generate_uid()
        if change is not None:
            change(ds, index)
        ds.save_as(folder / source.name)
        paths.append(folder / source.name)
    return study, paths


# ---------------------------------------------------------------- association level

def _stall(data: bytes) -> Callable[[Node], None]:
    def run(node: Node) -> None:
        socks = [connect(node.port) for _ in range(MAX_ASSOCIATIONS * 2)]  # more than the slots
        for sock in socks:
            sock.sendall(data)
        assert _alive(node.port)  # a caller that has not asked holds no slot
        assert all(closed_by_peer(sock, REQUEST_TIMEOUT_S + 3) for sock in socks)
        for sock in socks:
            sock.close()
    return run


def _trickle(node: Node) -> None:
    sock = connect(node.port)
    started = time.monotonic()
    with pytest.raises(OSError):
        for byte in associate_rq():
            sock.sendall(bytes([byte]))
            time.sleep(0.2)
    assert time.monotonic() - started < REQUEST_TIMEOUT_S + 3
    sock.close()


def _answer(data: bytes, expected: tuple[int | None, ...]) -> Callable[[Node], None]:
    """Send raw bytes; the node answers with one of the PDU types ``expected`` (None: closes)."""
    def run(node: Node) -> None:
        sock = connect(node.port)
        sock.sendall(data)
        assert read_pdu_type(sock) in expected
        sock.close()
    return run


def _rejected_as(calling: str, called: str = "LOBEVOL") -> Callable[[Node], None]:
    def run(node: Node) -> None:
        from pynetdicom import AE
        from pynetdicom.sop_class import Verification

        ae = AE(ae_title=calling)
        ae.add_requested_context(Verification)
        assoc = ae.associate("127.0.0.1", node.port, ae_title=called)
        assert assoc.is_rejected and assoc.acceptor.primitive.result == 0x01  # permanent
    return run


def _full_house(callers: int) -> Callable[[Node], None]:
    def run(node: Node) -> None:
        release = threading.Event()

        def call(_):
            assoc = _echo(node.port)
            if assoc.is_established:
                release.wait(30)
                assoc.release()
                return "served"
            rejection = assoc.acceptor.primitive
            transient = assoc.is_rejected and (rejection.result, rejection.diagnostic) == (0x02, 0x02)
            return "transient" if transient else "other"

        with ThreadPoolExecutor(callers) as pool:
            futures = [pool.submit(call, n) for n in range(callers)]
            wait_for(lambda: sum(f.done() for f in futures) == callers - MAX_ASSOCIATIONS, 60, "the rejections")
            release.set()
            outcomes = [f.result() for f in futures]
        assert outcomes.count("served") == MAX_ASSOCIATIONS
        assert outcomes.count("transient") == callers - MAX_ASSOCIATIONS
    return run


# ---------------------------------------------------------------- dataset level

def _refused(status: int, change: Callable[[pydicom.Dataset], None]) -> Callable[[Node], None]:
    def run(node: Node) -> None:
        assert _c_store(node, _slice(node, change)).Status == status
    return run


def _stored(change: Callable[[pydicom.Dataset], None]) -> Callable[[Node], None]:
    def run(node: Node) -> None:
        assert _c_store(node, _slice(node, change)).Status == 0x0000
    return run


def _cut(nbytes: int):
    def change(ds):
        ds.PixelData = ds.PixelData[:-nbytes]
    return change


def _rle_cut(ds):
    ds.compress(RLELossless)
    ds.PixelData = ds.PixelData[:-64]


def _set(**values):
    def change(ds):
        for keyword, value in values.items():
            setattr(ds, keyword, value)
    return change


def _delete(*keywords):
    def change(ds):
        for keyword in keywords:
            delattr(ds, keyword)
    return change


def _large(ds):
    ds.Rows = ds.Columns = 1024
    ds.PixelData = np.zeros((1024, 1024), np.uint16).tobytes()  # 2 MiB, max_instance_mb = 1


def _as_capture(ds):
    ds.SOPClassUID = ds.file_meta.MediaStorageSOPClassUID = SecondaryCaptureImageStorage


def _ends_inside_a_tag(node: Node) -> None:
    ds = _slice(node)
    path = node.scratch / f"cut-{ds.SOPInstanceUID}.dcm"
    ds.save_as(path)
    data = path.read_bytes()
    path.write_bytes(data[: data.rindex(b"\xe0\x7f\x10\x00") + 3])  # ends inside the Pixel Data tag
    assert _c_store(node, path).Status == 0xA900


def _uid_mismatch(node: Node) -> None:
    ds = _slice(node)
    path = node.scratch / f"mismatch-{ds.SOPInstanceUID}.dcm"
    ds.file_meta.MediaStorageSOPInstanceUID = generate_uid()  # what the request will say
    ds.save_as(path)
    assert _c_store(node, path).Status == 0xA900


# ---------------------------------------------------------------- study level

def _study_ends(state: str, results: int, change=None, keep=lambda i: True) -> Callable[[Node], None]:
    """Send a whole study; its job ends in ``state`` and the PACS receives ``results`` objects for it."""
    def run(node: Node) -> None:
        study, paths = _study(node, f"study-{generate_uid()}", change, keep)
        storescu(node.port, paths)
        job = node.final_job(study)
        assert job.state == state, job.reason
        if results:
            wait_for(lambda: len(node.pacs.by_study().get(study, [])) >= results, 30, "the results at the PACS")
        time.sleep(0.5)
        assert len(node.pacs.by_study().get(study, [])) == results
        if results:
            for sop_class, uid in node.pacs.by_study()[study]:
                assert node.pacs.counts()[uid] == 1
    return run


def _blank_head_words(ds, index):
    for keyword in ("BodyPartExamined", "StudyDescription", "SeriesDescription", "ProtocolName"):
        if keyword in ds:
            delattr(ds, keyword)


def _pelvis(ds, index):
    _blank_head_words(ds, index)
    yy, xx = np.mgrid[: ds.Rows, : ds.Columns]
    r = np.hypot((yy - ds.Rows / 2) / (0.45 * ds.Rows), (xx - ds.Columns / 2) / (0.35 * ds.Columns))
    hu = np.full((ds.Rows, ds.Columns), -1000.0)
    hu[r < 1.0] = -100.0
    hu[r < 0.5] = 35.0
    hu[(r >= 0.9) & (r < 1.0)] = 700.0
    ds.PixelData = (hu - float(ds.RescaleIntercept)).astype(np.uint16).tobytes()


def _hostile_names(ds, index):
    ds.PatientName = "Doe^John\\Smith^Jane"
    ds.PatientID = "ID\x1b[31m\x00"
    ds.InstitutionName = "Hospital\r\nINFO forged line"


def _mixed_sizes(ds, index):
    if index == 7:
        ds.Rows = ds.Columns = 64
        ds.PixelData = np.full((64, 64), 1024, np.uint16).tobytes()


# ---------------------------------------------------------------- the table

@dataclass(frozen=True)
class Case:
    id: str
    run: Callable[[Node], None]
    logged: str  # what the node's log must say


CASES = [
    # association level
    Case("silent-connections", _stall(b""), NOT_ASKED),
    Case("half-associate-rq-unknown-ae", _stall(associate_rq(b"STRANGER")[:40]), NOT_ASKED),
    Case("half-pdu-header", _stall(pdu(0x04, b"", length=100_000)[:6] + b"x"), NOT_ASKED),
    Case("associate-rq-announcing-4-gib", _stall(struct.pack(">BBI", 1, 0, 0xFFFFFFF0) + bytes(100)), NOT_ASKED),
    Case("trickling-associate-rq", _trickle, NOT_ASKED),
    Case("unknown-pdu-type", _answer(pdu(0x09, bytes(20)), (0x07, None)), "Unknown PDU type received '0x09'"),
    Case("garbage-bytes", _answer(b"\xff" * 64, (0x07, None)), "Unknown PDU type received '0xFF'"),
    Case("http-request", _answer(b"GET / HTTP/1.1\r\nHost: lobevol\r\n\r\n", (0x07, None)),
         "Unknown PDU type received '0x47'"),
    Case("tls-client-hello-to-plain-port", _answer(b"\x16\x03\x01\x00\xa5\x01\x00\x00\xa1\x03\x03" + bytes(60),
                                                   (0x07, None)), "Unknown PDU type received '0x16'"),
    Case("a-abort-before-association", _answer(pdu(0x07, bytes(4)), (None,)), "without an association request"),
    Case("a-release-before-association", _answer(pdu(0x05, bytes(4)), (0x07, None)),
         "without an association request"),
    Case("p-data-before-association", _answer(pdu(0x04, b"\x00\x00\x00\x02\x01\x03"), (0x07, None)),
         "without an association request"),
    Case("unknown-calling-ae", _rejected_as("STRANGER"), "'STRANGER' is not in the remote table"),
    Case("wrong-called-ae", _rejected_as("PACS", "SOMEONEELSE"), "'SOMEONEELSE' is not ours"),
    Case("calling-ae-with-cr-lf", _answer(associate_rq(b"EVIL\r\nINFO forged"), (0x03, 0x07)),
         "EVIL\\r\\nINFO forge"),  # pynetdicom quotes the 16 bytes of the field
    Case("calling-ae-with-escape", _answer(associate_rq(b"A\x1b[2JB"), (0x03, 0x07)), "A\\x1b[2JB"),
    Case("calling-ae-with-nul", _answer(associate_rq(b"NUL\x00AE"), (0x03, 0x07)), "NUL\\x00AE"),
    Case("associate-rq-from-unknown-ae-then-silence", _answer(associate_rq(b"NOBODY"), (0x03,)),
         "'NOBODY' is not in the remote table"),
    Case("all-slots-held-one-more-caller", _full_house(MAX_ASSOCIATIONS + 1),
         f"all {MAX_ASSOCIATIONS} association slots are held (PACS@127.0.0.1:"),
    Case("twelve-callers-at-once", _full_house(12), f"all {MAX_ASSOCIATIONS} association slots are held"),
    # dataset level
    Case("ct-cut-10-kb-inside-pixel-data", _refused(0xA900, _cut(10_000)), "short of the 32768"),
    Case("ct-cut-by-one-byte", _refused(0xA900, _cut(2)), "short of the 32768"),
    Case("rle-fragments-cut", _refused(0xA900, _rle_cut), "fragments do not parse"),
    Case("rows-columns-65535", _refused(0xA900, _set(Rows=65535, Columns=65535)), "65535 x 65535 pixels"),
    Case("a-million-frames-claimed", _refused(0xA900, _set(NumberOfFrames=1_000_000)),
         "1000000 frame(s) of 128 x 128"),
    Case("no-pixel-data", _refused(0xA900, _delete("PixelData")), "no pixel data"),
    Case("no-bits-allocated", _refused(0xA900, _delete("BitsAllocated")), "Bits Allocated missing"),
    Case("study-uid-path-traversal", _refused(0xA900, _set(StudyInstanceUID="../../../../tmp/evil")),
         "is not a valid UID"),
    Case("series-uid-with-slash", _refused(0xA900, _set(SeriesInstanceUID="1.2/../../x")), "is not a valid UID"),
    Case("series-uid-of-80-digits", _refused(0xA900, _set(SeriesInstanceUID="1." + "9" * 78)),
         "is not a valid UID"),
    Case("no-study-uid", _refused(0xA900, _delete("StudyInstanceUID")), "Study Instance UID is missing"),
    Case("sop-uid-differs-from-request", _uid_mismatch, "differs from the request's"),
    Case("dataset-ending-inside-the-pixel-data-tag", _ends_inside_a_tag, "no pixel data"),
    Case("instance-above-max-instance-mb", _refused(0xA700, _large), "above max_instance_mb"),
    Case("secondary-capture-is-acknowledged-not-kept", _stored(_as_capture), "1 ignored (not CT)"),
    # study level
    Case("patient-name-of-10000-characters",
         _study_ends("done", 3, lambda ds, i: setattr(ds, "PatientName", "Longname" * 1250 + "^Jo")),
         "PatientName of the source cleaned for the results: shortened to 64 characters"),
    Case("two-names-control-bytes-in-id-and-institution", _study_ends("done", 3, _hostile_names),
         "PatientName of the source cleaned for the results: 2 values, the first kept"),
    Case("no-frame-of-reference", _study_ends("done", 1, lambda ds, i: delattr(ds, "FrameOfReferenceUID")),
         "no DICOM SEG or SR"),
    Case("head-without-head-words", _study_ends("done", 3, _blank_head_words),
         "recognised as a head CT from the image"),
    Case("pelvis-without-head-words", _study_ends("skipped", 0, _pelvis), "the image shows no skull around brain"),
    Case("three-slices-only", _study_ends("skipped", 0, keep=lambda i: i < 3), "too few images to cover a head"),
    Case("mixed-image-sizes-in-a-series", _study_ends("failed", 0, _mixed_sizes), "cannot be analysed"),
]


@pytest.mark.parametrize("case", CASES, ids=[case.id for case in CASES])
def test_hostile_input(node, case):
    before = len(node.log_text())
    case.run(node)
    wait_for(lambda: case.logged in node.log_text()[before:], 15, f"the log to say {case.logged!r}")
    assert _alive(node.port)
    _assert_nothing_outside_the_spool(node)


def _assert_nothing_outside_the_spool(node: Node) -> None:
    root = node.folder
    allowed = ("spool/incoming/", "spool/jobs/", "results/")
    for path in root.rglob("*"):
        relative = path.relative_to(root).as_posix()
        if path.is_dir() or relative in ("node.ini",) or relative.startswith("jobs.sqlite"):
            continue
        assert relative.startswith(allowed), f"{relative} written outside the spool"
        if relative.startswith("spool/"):
            *_, study, series, name = relative.split("/")
            assert all(part.replace(".", "").isdigit() for part in (study, series, name.removesuffix(".dcm")))
    assert sorted(p.name for p in node.folder.parent.iterdir()) == ["node", "scratch", "serve.log"]
    assert not Path("/tmp/evil").exists()
