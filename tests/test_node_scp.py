"""The node's Storage SCP against DCMTK storescu over loopback: spool, admission, limits, status codes."""
from __future__ import annotations

import logging
import threading
import time
from pathlib import Path

import pydicom
import pytest
from pydicom.uid import SecondaryCaptureImageStorage, generate_uid

from node.config import NodeConfig, NodeSettings, RemoteAE, StorageSettings
from node.service.jobs import JobStore
from node.service.scp import StorageSCP
from node.service.spool import Spool
from tests.node_peers import storescu, wait_for
from tests.raw_dicom import associate_rq, closed_by_peer, connect, pdu, read_pdu_type
from tests.output_fixtures import region_labels, write_ct_series

pytestmark = pytest.mark.integration

REMOTES = {
    "PACS": RemoteAE("PACS", "127.0.0.1", 4242, may_send=True, may_receive=True),
    "VIEWER": RemoteAE("VIEWER", "127.0.0.1", 4243, may_send=False, may_receive=True),
    "CT01": RemoteAE("CT01", "10.255.255.1", 104, may_send=True, check_host=True),
}


@pytest.fixture(scope="module")
def series(tmp_path_factory) -> list[Path]:
    return write_ct_series(tmp_path_factory.mktemp("ct") / "s", region_labels((6, 24, 24)))


@pytest.fixture
def scp_factory(tmp_path):
    started = []

    def start(storage: dict | None = None, **node) -> StorageSCP:
        config = NodeConfig(
            node=NodeSettings(**{"port": 0, **node}),
            storage=StorageSettings(spool_dir=tmp_path / "spool", results_dir=tmp_path / "results",
                                    database=tmp_path / "jobs.sqlite", **(storage or {})),
            remotes=REMOTES)
        scp = StorageSCP(config, Spool(config.storage.spool_dir), JobStore(config.storage.database))
        scp.start()
        started.append(scp)
        return scp

    yield start
    for scp in started:
        scp.stop()


def _spooled(scp: StorageSCP) -> list[Path]:
    return sorted(scp.spool.incoming.rglob("*.dcm"))


def test_series_is_spooled_by_uid_and_a_resend_replaces_it(scp_factory, series):
    scp = scp_factory()
    storescu(scp.port, series)
    files = _spooled(scp)
    assert len(files) == len(series)
    source = pydicom.dcmread(series[0])
    stored = scp.spool.instance_path(source.StudyInstanceUID, source.SeriesInstanceUID, source.SOPInstanceUID)
    assert stored in files
    assert pydicom.dcmread(stored).PixelData == source.PixelData  # bit for bit, as sent
    storescu(scp.port, series)  # the PACS sends the study again
    assert _spooled(scp) == files
    (job,) = scp.jobs.jobs()
    assert (job.state, job.instances, job.origin_ae) == ("received", len(series), "PACS")
    assert not list(scp.spool.incoming.rglob("*.tmp"))


def test_concurrent_associations_are_stored_and_queued_in_shared_commits(scp_factory, series, tmp_path):
    import subprocess

    from tests.node_peers import tool

    copies = []
    for n in range(4):  # four studies, as four scanners would send them at once
        study, series_uid = generate_uid(), generate_uid()
        folder = tmp_path / f"study{n}"
        folder.mkdir()
        for path in series:
            ds = pydicom.dcmread(path)
            ds.StudyInstanceUID, ds.SeriesInstanceUID = study, series_uid
            ds.SOPInstanceUID = ds.file_meta.MediaStorageSOPInstanceUID = generate_uid()
            ds.save_as(folder / path.name)
        copies.append(sorted(folder.iterdir()))
    scp = scp_factory()
    senders = [subprocess.Popen([tool("storescu", "dcmtk"), "-aet", "PACS", "-aec", "LOBEVOL", "127.0.0.1",
                                 str(scp.port), *map(str, files)], stderr=subprocess.PIPE) for files in copies]
    for sender in senders:
        assert sender.wait(120) == 0, sender.stderr.read().decode()[-2000:]
    total = 4 * len(series)
    assert len(_spooled(scp)) == total
    assert sorted(job.instances for job in scp.jobs.jobs()) == [len(series)] * 4
    assert scp.committer.items == total and 1 <= scp.committer.batches <= total


@pytest.mark.parametrize("calling, called, reason", [
    ("STRANGER", "LOBEVOL", "Calling AE Title Not Recognized"),
    ("VIEWER", "LOBEVOL", "Calling AE Title Not Recognized"),   # known, but may_send = no
    ("CT01", "LOBEVOL", "Calling AE Title Not Recognized"),     # host checked: not from 10.255.255.1
    ("PACS", "OTHERNODE", "Called AE Title Not Recognized"),
])
def test_association_is_rejected_unless_configured(scp_factory, series, calling, called, reason, caplog):
    scp = scp_factory()
    result = storescu(scp.port, series[:1], calling=calling, called=called, check=False)
    assert result.returncode != 0
    assert "Association Rejected" in result.stderr and reason in result.stderr
    assert _spooled(scp) == []
    assert "rejected" in caplog.text


def test_other_sop_classes_are_acknowledged_counted_and_not_kept(scp_factory, series, tmp_path):
    scp = scp_factory()
    capture = pydicom.dcmread(series[0])
    capture.SOPClassUID = capture.file_meta.MediaStorageSOPClassUID = SecondaryCaptureImageStorage
    capture.SOPInstanceUID = capture.file_meta.MediaStorageSOPInstanceUID = generate_uid()
    capture.save_as(tmp_path / "capture.dcm")
    result = storescu(scp.port, [tmp_path / "capture.dcm", *series[:2]])
    assert "Failed" not in result.stderr
    assert len(_spooled(scp)) == 2
    (job,) = scp.jobs.jobs()
    assert (job.instances, job.ignored) == (2, 1)


def test_limits_answer_out_of_resources(scp_factory, series):
    scp = scp_factory(storage={"max_instances_per_study": 2})
    result = storescu(scp.port, series[:4], check=False)
    assert "Refused: OutOfResources" in result.stderr
    assert len(_spooled(scp)) == 2
    scp.stop()
    scp = scp_factory(storage={"max_instance_mb": 0.001})
    result = storescu(scp.port, series[:1], check=False)
    assert "Refused: OutOfResources" in result.stderr


def test_disk_high_water_mark_refuses_new_data(scp_factory, series):
    scp = scp_factory(storage={"disk_high_water_percent": 1})
    scp.spool.disk_used_percent = lambda: 50.0  # a test disk may be almost empty; the mark is at least 1 %
    result = storescu(scp.port, series[:1], check=False)
    assert "Refused: OutOfResources" in result.stderr
    assert _spooled(scp) == []


@pytest.mark.filterwarnings("ignore:Invalid value for VR UI")
def test_missing_uid_is_refused_as_not_matching_the_sop_class(scp_factory, series, tmp_path):
    scp = scp_factory()
    broken = pydicom.dcmread(series[0])
    broken.SeriesInstanceUID = "1.2.abc"
    broken.save_as(tmp_path / "broken.dcm")
    result = storescu(scp.port, [tmp_path / "broken.dcm"], check=False)
    assert "Error: DataSetDoesNotMatchSOPClass" in result.stderr
    assert _spooled(scp) == []


def test_associations_beyond_the_limit_are_rejected_transiently(scp_factory, series):
    from pynetdicom import AE
    from pynetdicom.sop_class import Verification

    scp = scp_factory(max_associations=1)
    ae = AE(ae_title="PACS")
    ae.add_requested_context(Verification)
    held = ae.associate("127.0.0.1", scp.port, ae_title="LOBEVOL")
    try:
        assert held.is_established
        result = storescu(scp.port, series[:1], check=False)
        assert "Association Rejected" in result.stderr and "Local Limit Exceeded" in result.stderr
    finally:
        held.release()
    storescu(scp.port, series[:1])  # free again


def _echo(port: int, calling: str = "PACS"):
    """A C-ECHO association; returns the (established or rejected) association after release."""
    from pynetdicom import AE
    from pynetdicom.sop_class import Verification

    ae = AE(ae_title=calling)
    ae.add_requested_context(Verification)
    ae.acse_timeout = ae.network_timeout = 10
    return ae.associate("127.0.0.1", port, ae_title="LOBEVOL")


def test_fifty_callers_at_once_get_all_eight_slots_and_the_rest_a_transient_rejection(scp_factory):
    from concurrent.futures import ThreadPoolExecutor

    scp = scp_factory(max_associations=8)
    release = threading.Event()

    def call(_):
        assoc = _echo(scp.port)
        if assoc.is_established:
            release.wait(30)  # hold the slot until every caller had its answer
            assoc.release()
            return "served"
        rejection = assoc.acceptor.primitive
        return "transient" if assoc.is_rejected and (rejection.result, rejection.diagnostic) == (0x02, 0x02) else "other"

    with ThreadPoolExecutor(50) as pool:
        futures = [pool.submit(call, n) for n in range(50)]
        wait_for(lambda: sum(f.done() for f in futures) == 42, 60, "42 callers answered")
        release.set()
        outcomes = [f.result() for f in futures]
    assert outcomes.count("served") == 8 and outcomes.count("transient") == 42
    assert _echo(scp.port).is_established  # the slots came back


@pytest.mark.parametrize("sent", [
    b"",                                          # connects, says nothing
    associate_rq(b"STRANGER")[:40],               # half an A-ASSOCIATE-RQ from an unknown AE, then silence
    pdu(0x04, b"", length=100_000)[:6] + b"x",    # a P-DATA header announcing 100 kB, one byte of it
], ids=["silent", "half-associate-rq", "half-pdu"])
def test_stalled_connections_hold_no_slot_and_are_closed_after_the_request_timeout(scp_factory, series, caplog, sent):
    caplog.set_level(logging.INFO, logger="node")
    scp = scp_factory(max_associations=2, association_request_timeout_s=1.0)
    stalled = [connect(scp.port) for _ in range(8)]
    for sock in stalled:
        sock.sendall(sent)
    storescu(scp.port, series[:2])  # served at once: the 8 stalled callers hold no slot
    assert len(_spooled(scp)) == 2
    ports = [sock.getsockname()[1] for sock in stalled]
    assert all(closed_by_peer(sock, 5) for sock in stalled)  # 1 s timeout, reaper every 0.25 s
    for sock in stalled:
        sock.close()
    wait_for(lambda: caplog.text.count("no complete association request within 1 s") >= 8, 5, "the log lines")
    assert all(f"connection from 127.0.0.1:{port} closed" in caplog.text for port in ports)


def test_a_trickling_caller_is_cut_off_at_the_request_timeout(scp_factory):
    scp = scp_factory(association_request_timeout_s=1.0)
    sock = connect(scp.port)
    started = time.monotonic()
    request = associate_rq()
    with pytest.raises(OSError):
        for byte in request:  # one byte every 0.2 s: each read progresses, the request never completes
            sock.sendall(bytes([byte]))
            time.sleep(0.2)
            if time.monotonic() - started > 10:
                break
    assert time.monotonic() - started < 5
    sock.close()


def test_a_full_house_is_logged_with_who_holds_the_slots(scp_factory, caplog):
    scp = scp_factory(max_associations=1)
    held = _echo(scp.port)
    try:
        assert held.is_established
        assert _echo(scp.port).is_rejected
    finally:
        held.release()
    holder_port = held.requestor.port
    assert f"all 1 association slots are held (PACS@127.0.0.1:{holder_port} for" in caplog.text


@pytest.mark.parametrize("calling", [b"EVIL\r\nINFO ok", b"A\x1b[2JB", b"NUL\x00AE", b"\x85NEL\x7f"])
def test_control_characters_from_the_network_are_escaped_in_the_log(scp_factory, caplog, calling):
    from node.logsafe import PrintableFormatter

    caplog.set_level(logging.INFO)
    scp = scp_factory()
    sock = connect(scp.port)
    sock.sendall(associate_rq(calling))
    assert read_pdu_type(sock) in (0x03, 0x07)  # rejected (not in the remote table) or aborted (pynetdicom)
    sock.close()
    wait_for(lambda: "rejected" in caplog.text or "Unable to decode" in caplog.text, 5, "the refusal logged")
    formatter = PrintableFormatter("%(levelname)s %(name)s: %(message)s")
    for record in caplog.records:
        first, *rest = formatter.format(record).split("\n")
        assert all(line.startswith("  | ") for line in rest), rest  # a traceback cannot forge a record
        for line in (first, *rest):
            assert not any(ord(c) < 0x20 or 0x7f <= ord(c) <= 0x9f for c in line), line


def _cut_pixels(ds):
    ds.PixelData = ds.PixelData[:-200]  # as a sender cut 200 bytes into the pixel data would send it


def _rle_cut(ds):
    ds.compress(pydicom.uid.RLELossless)
    ds.PixelData = ds.PixelData[:-64]  # the last fragment runs past the end


def _huge_header(ds):
    ds.Rows = ds.Columns = 65535


@pytest.mark.parametrize("change, reason", [
    (_cut_pixels, "short of the"),
    (_rle_cut, "fragments do not parse"),
    (_huge_header, "65535 x 65535 pixels"),
], ids=["native-cut", "encapsulated-cut", "rows-columns-65535"])
def test_ct_whose_pixel_data_is_not_what_its_header_says_is_refused_at_c_store(scp_factory, series, tmp_path,
                                                                                 caplog, change, reason):
    from pynetdicom import AE

    scp = scp_factory()
    bad = pydicom.dcmread(series[0])
    bad.SOPInstanceUID = generate_uid()
    change(bad)
    ae = AE(ae_title="PACS")
    ae.add_requested_context(bad.SOPClassUID, [bad.file_meta.TransferSyntaxUID])
    assoc = ae.associate("127.0.0.1", scp.port, ae_title="LOBEVOL")
    try:
        status = assoc.send_c_store(bad)
    finally:
        assoc.release()
    assert status.Status == 0xA900 and reason.split()[0] in status.ErrorComment
    assert _spooled(scp) == []
    storescu(scp.port, series[:1])  # the next one is stored as usual
    assert reason in caplog.text and bad.SOPInstanceUID in caplog.text


def test_an_admitted_caller_stalled_inside_a_pdu_is_closed_after_the_network_timeout(scp_factory):
    scp = scp_factory(max_associations=1, network_timeout_s=1.0)
    sock = connect(scp.port)
    sock.sendall(associate_rq(b"PACS"))
    assert read_pdu_type(sock) == 0x02  # accepted: it holds the only slot
    sock.recv(65536)  # the rest of the A-ASSOCIATE-AC
    sock.sendall(pdu(0x04, b"", length=50_000)[:6] + b"\x00\x00")  # half a P-DATA-TF, then nothing
    started = time.monotonic()
    assert closed_by_peer(sock, 10)
    assert 0.8 < time.monotonic() - started < 5
    sock.close()
    assoc = _echo(scp.port)  # the slot is free again
    assert assoc.is_established
    assoc.release()


def test_serve_on_a_port_in_use_says_so_in_one_line_before_loading_anything(tmp_path):
    import subprocess
    import sys

    from tests.node_peers import StoreSCP

    with StoreSCP(tmp_path / "other") as other:  # another DICOM server holds the port
        config = tmp_path / "node.ini"
        config.write_text(f"[node]\nport = {other.port}\n[storage]\nspool = spool\nresults = results\n"
                          "database = jobs.sqlite\n")
        started = time.monotonic()
        run = subprocess.run([sys.executable, "-m", "node.cli", "serve", "--config", str(config)], capture_output=True,
                             text=True, timeout=120, cwd=Path(__file__).resolve().parents[1])
        took = time.monotonic() - started
    assert run.returncode == 1 and run.stderr.strip().splitlines() == [
        f"lobevol serve: error: 127.0.0.1:{other.port} is already in use (another lobevol serve, or another DICOM "
        "server?): set another [node] port or bind_address, or --port"], run.stderr
    assert not (tmp_path / "jobs.sqlite").exists() and not (tmp_path / "spool").exists()  # nothing opened or loaded
    assert took < 30, took
