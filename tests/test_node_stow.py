"""Results by DICOMweb STOW-RS to Orthanc's DICOMweb plugin: the same outbox, backoff and refusals as C-STORE.

Orthanc runs with its DICOMweb plugin (Debian orthanc-dicomweb) on loopback; its
own REST API checks where the objects landed.
"""
from __future__ import annotations

import io
import json
import logging
import subprocess
import time
from pathlib import Path

import pydicom
import pytest
from pydicom.dataset import Dataset
from pydicom.uid import CTImageStorage, SecondaryCaptureImageStorage, generate_uid

from node.config import NodeConfig, RemoteAE, RetryPolicy, StowSettings
from node.service.jobs import Delivery, JobStore
from node.service.outbox import Outbox
from node.service.spool import Spool
from tests.node_peers import Orthanc, TLSTerminator, dicomweb_settings, free_port, tool
from tests.output_fixtures import region_labels, write_ct_series

pytestmark = pytest.mark.integration

SECRET = "s3cret-Pass"


@pytest.fixture(scope="module")
def results(tmp_path_factory) -> list[Path]:
    """Three 'result' files of one study: two CT instances and one Secondary Capture."""
    folder = tmp_path_factory.mktemp("results")
    files = write_ct_series(folder / "ct", region_labels((2, 16, 16)))
    capture = pydicom.dcmread(files[0])
    capture.SOPClassUID = capture.file_meta.MediaStorageSOPClassUID = SecondaryCaptureImageStorage
    capture.SOPInstanceUID = capture.file_meta.MediaStorageSOPInstanceUID = generate_uid()
    capture.save_as(folder / "capture.dcm")
    return [*files, folder / "capture.dcm"]


def _sending_job(tmp_path: Path, stow: StowSettings, results: list[Path], retry: RetryPolicy):
    config = NodeConfig(retry=retry,
                        remotes={"PACS": RemoteAE("PACS", "", 0, may_receive=True, stow=stow)})
    jobs = JobStore(tmp_path / "jobs.sqlite")
    path, _ = Spool(tmp_path / "spool").write_instance(b"x", "1.2.3", "1.2.3.4", "1.2.3.4.5")
    job_id = jobs.record_instance("1.2.3", "1.2.3.4", CTImageStorage, "1.2.3.4.5", path, 1, "PACS")
    jobs.select_stable(0)
    jobs.mark_input_ready(job_id)
    jobs.claim_next()
    deliveries = []
    for file in results:
        ds = pydicom.dcmread(file, stop_before_pixels=True)
        deliveries.append(Delivery("PACS", str(file), ds.SOPClassUID, ds.SOPInstanceUID))
    jobs.finish_analysis(job_id, "done", "", "", str(tmp_path), deliveries)
    return Outbox(config, jobs), jobs, job_id


def _instances_in_orthanc(orthanc: Orthanc) -> set[str]:
    return {orthanc.get(f"/instances/{i}/simplified-tags")["SOPInstanceUID"] for i in orthanc.get("/instances")}


def test_server_down_at_first_receives_after_it_comes_up(tmp_path, results):
    orthanc = Orthanc(tmp_path / "orthanc", extra=dicomweb_settings())
    stow = StowSettings(f"http://127.0.0.1:{orthanc.http_port}/dicom-web")
    outbox, jobs, job_id = _sending_job(tmp_path, stow, results, RetryPolicy(0.3, 5, 5))
    assert outbox.deliver_due() == 3
    items = jobs.outbox(job_id)
    assert {i.state for i in items} == {"pending"} and {i.attempts for i in items} == {1}
    assert "cannot connect" in items[0].detail and "next in 0.3 s" in items[0].detail
    assert outbox.deliver_due() == 0  # backing off: nothing due yet
    orthanc.start()
    try:
        time.sleep(0.35)
        assert outbox.deliver_due() == 3
        stored = _instances_in_orthanc(orthanc)
        study = {s["MainDicomTags"]["StudyInstanceUID"] for s in orthanc.get("/studies?expand")}
    finally:
        orthanc.stop()
    assert stored == {i.sop_instance_uid for i in items}
    assert study == {str(pydicom.dcmread(results[0]).StudyInstanceUID)}  # one study: the source study
    job = jobs.get(job_id)
    assert job.state == "done" and job.reason == "3 of 3 result deliveries made"
    assert [i.detail for i in jobs.outbox(job_id)] == ["STOW-RS HTTP 200"] * 3


def test_refused_instance_is_reported_with_the_servers_reason_and_the_others_delivered(tmp_path, results):
    broken = pydicom.dcmread(results[2])
    del broken.StudyInstanceUID  # Orthanc cannot index an instance without its study
    broken.save_as(tmp_path / "broken.dcm")
    orthanc = Orthanc(tmp_path / "orthanc", extra=dicomweb_settings()).start()
    try:
        stow = StowSettings(f"http://127.0.0.1:{orthanc.http_port}/dicom-web")
        outbox, jobs, job_id = _sending_job(tmp_path, stow, [*results[:2], tmp_path / "broken.dcm"],
                                            RetryPolicy(1, 5, 3))
        assert outbox.deliver_due() == 3
        stored = _instances_in_orthanc(orthanc)
    finally:
        orthanc.stop()
    items = jobs.outbox(job_id)
    assert [i.state for i in items] == ["sent", "sent", "refused"]
    assert stored == {i.sop_instance_uid for i in items[:2]}
    job = jobs.get(job_id)
    assert job.state == "done" and "2 of 3" in job.reason
    # Orthanc answers 400 with a Failed SOP Sequence naming the instance and its Failure Reason
    assert "PACS refused Secondary Capture Image Storage: HTTP 400, failure reason 0xC000 (cannot understand)" \
        in job.reason
    assert outbox.deliver_due() == 0  # a refusal is not retried


def test_basic_authentication_and_a_wrong_password_retried_then_failed_without_leaking_it(tmp_path, results,
                                                                                           caplog):
    users = {"AuthenticationEnabled": True, "RegisteredUsers": {"lobevol": SECRET}}
    orthanc = Orthanc(tmp_path / "orthanc", extra=dicomweb_settings(**users), credentials=("lobevol", SECRET)).start()
    good, wrong = tmp_path / "good-password", tmp_path / "wrong-password"
    good.write_text(SECRET + "\n")
    wrong.write_text("not-" + SECRET + "\n")
    url = f"http://127.0.0.1:{orthanc.http_port}/dicom-web"
    caplog.set_level(logging.DEBUG)
    try:
        outbox, jobs, job_id = _sending_job(tmp_path / "wrong", StowSettings(url, "lobevol", wrong), results,
                                            RetryPolicy(0.05, 0.05, 2))
        outbox.deliver_due()
        time.sleep(0.1)
        outbox.deliver_due()
        assert orthanc.get("/instances") == []
        refused = jobs.get(job_id)
        outbox, jobs, job_id = _sending_job(tmp_path / "good", StowSettings(url, "lobevol", good), results,
                                            RetryPolicy(1, 5, 3))
        outbox.deliver_due()
        stored = _instances_in_orthanc(orthanc)
    finally:
        orthanc.stop()
    # 401 is the server not talking to us (like a rejected association): retried, then a visible failure
    assert refused.state == "failed" and "HTTP 401 Unauthorized" in refused.reason
    assert "gave up after 2 attempts" in refused.reason
    assert jobs.get(job_id).state == "done" and stored == {i.sop_instance_uid for i in jobs.outbox(job_id)}
    assert SECRET not in caplog.text and SECRET not in refused.reason


@pytest.fixture(scope="module")
def server_certificate(tmp_path_factory) -> Path:
    """A self-signed certificate for 127.0.0.1 (cert.pem) and its key (key.pem)."""
    folder = tmp_path_factory.mktemp("pki")
    subprocess.run([tool("openssl", "openssl"), "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-keyout", "key.pem",
                    "-out", "cert.pem", "-days", "1", "-subj", "/CN=127.0.0.1", "-addext",
                    "subjectAltName=IP:127.0.0.1"], cwd=folder, check=True, capture_output=True)
    return folder


def test_tls_with_the_servers_ca_and_a_tls_failure_retried_without_it(tmp_path, results, server_certificate):
    orthanc = Orthanc(tmp_path / "orthanc", extra=dicomweb_settings()).start()
    https = TLSTerminator(server_certificate / "cert.pem", server_certificate / "key.pem", orthanc.http_port).start()
    url = f"https://127.0.0.1:{https.port}/dicom-web"
    try:
        outbox, jobs, untrusted = _sending_job(tmp_path / "system-cas", StowSettings(url), results,
                                               RetryPolicy(5, 5, 3))
        outbox.deliver_due()
        detail = jobs.outbox(untrusted)[0].detail
        trusting = StowSettings(url, ca_certificates=server_certificate / "cert.pem")
        outbox, jobs, job_id = _sending_job(tmp_path / "our-ca", trusting, results, RetryPolicy(1, 5, 3))
        outbox.deliver_due()
        stored = _instances_in_orthanc(orthanc)
    finally:
        https.stop()
        orthanc.stop()
    assert "TLS failure" in detail and "certificate verify failed" in detail and "attempt 1" in detail
    assert jobs.get(job_id).state == "done" and stored == {i.sop_instance_uid for i in jobs.outbox(job_id)}


class _ScriptedDICOMweb:
    """A loopback HTTP server answering each STOW-RS POST with the next scripted (status, failures, delay_s).

    For the answers Orthanc does not give (409 and 202 with a Failed SOP Sequence,
    503, a server that does not answer in time). ``failures`` maps a position in
    the request to a Failure Reason: the answer's Failed SOP Sequence lists those
    instances (the others are in its Referenced SOP Sequence).
    """

    def __init__(self, answers: list[tuple[int, dict[int, int], float]]):
        import http.server
        import threading

        script, self.requests, self.authorizations = list(answers), [], []

        class Handler(http.server.BaseHTTPRequestHandler):
            def do_POST(handler):  # noqa: N802 (the http.server API)
                body = handler.rfile.read(int(handler.headers["Content-Length"]))
                uids = [str(pydicom.dcmread(io.BytesIO(part)).SOPInstanceUID)
                        for part in _dicom_parts(body, handler.headers["Content-Type"])]
                self.requests.append((handler.path, uids))
                self.authorizations.append(handler.headers.get("Authorization"))
                status, failures, delay = script.pop(0)
                time.sleep(delay)
                answer = json.dumps(_store_response(uids, failures)).encode()
                handler.send_response(status)
                handler.send_header("Content-Type", "application/dicom+json")
                handler.send_header("Content-Length", str(len(answer)))
                handler.end_headers()
                handler.wfile.write(answer)

            def log_message(handler, *args):
                pass

        self.server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}/dicom-web"
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    def stop(self) -> None:
        self.server.shutdown()
        self.server.server_close()


def _dicom_parts(body: bytes, content_type: str) -> list[bytes]:
    boundary = content_type.split("boundary=")[1].strip('"').encode()
    parts = body.split(b"--" + boundary)[1:-1]
    return [part.split(b"\r\n\r\n", 1)[1].rsplit(b"\r\n", 1)[0] for part in parts]


def _store_response(uids: list[str], failures: dict[int, int]) -> dict:
    """A Store Instances Response Module (PS3.18 10.5.3) in DICOM JSON."""
    answer = Dataset()
    answer.FailedSOPSequence, answer.ReferencedSOPSequence = [], []
    for position, uid in enumerate(uids):
        item = Dataset()
        item.ReferencedSOPClassUID, item.ReferencedSOPInstanceUID = CTImageStorage, uid
        if position in failures:
            item.FailureReason = failures[position]
            answer.FailedSOPSequence.append(item)
        else:
            answer.ReferencedSOPSequence.append(item)
    return answer.to_json_dict()


def test_409_202_503_and_a_timeout_as_the_standard_says(tmp_path, results):
    server = _ScriptedDICOMweb([(503, {}, 0), (200, {}, 2), (409, {0: 0xC000, 1: 0xA700, 2: 0xC000}, 0),
                                (202, {0: 0xA900}, 0)])
    try:
        stow = StowSettings(server.url, timeout_s=0.5)
        outbox, jobs, job_id = _sending_job(tmp_path, stow, results, RetryPolicy(0.05, 0.05, 5))
        outbox.deliver_due()  # 503
        assert {i.state for i in jobs.outbox(job_id)} == {"pending"}
        assert "HTTP 503 Service Unavailable (attempt 1" in jobs.outbox(job_id)[0].detail
        time.sleep(0.1)
        outbox.deliver_due()  # answered after 2 s, we wait 0.5 s
        assert "timed out" in jobs.outbox(job_id)[0].detail and "(attempt 2" in jobs.outbox(job_id)[0].detail
        time.sleep(0.1)
        outbox.deliver_due()  # 409: the first and third refused, the second out of resources (retried)
        items = jobs.outbox(job_id)
        assert [i.state for i in items] == ["refused", "pending", "refused"]
        assert items[0].detail == "PACS refused CT Image Storage: HTTP 409, failure reason 0xC000 (cannot understand)"
        assert "failure reason 0xA700 (out of resources)" in items[1].detail
        assert "Secondary Capture Image Storage: HTTP 409, failure reason 0xC000" in items[2].detail
        time.sleep(0.1)
        outbox.deliver_due()  # 202 for the one retried: listed as failed, not out of resources
        item = jobs.outbox(job_id)[1]
        assert item.state == "refused" and "HTTP 202, failure reason 0xA900" in item.detail
    finally:
        server.stop()
    assert [path for path, _ in server.requests] == ["/dicom-web/studies"] * 4
    assert [len(uids) for _, uids in server.requests] == [3, 3, 3, 1]
    assert jobs.get(job_id).state == "done" and "0 of 3" in jobs.get(job_id).reason


def test_bearer_token_read_from_its_file_at_each_delivery(tmp_path, results):
    token = tmp_path / "token"
    token.write_text("first-token\n")
    server = _ScriptedDICOMweb([(503, {}, 0), (200, {}, 0)])
    try:
        stow = StowSettings(server.url, token_file=token)
        outbox, jobs, job_id = _sending_job(tmp_path, stow, results, RetryPolicy(0.05, 0.05, 3))
        outbox.deliver_due()
        token.write_text("rotated-token\n")  # e.g. by a program renewing short-lived tokens
        time.sleep(0.1)
        outbox.deliver_due()
    finally:
        server.stop()
    assert server.authorizations == ["Bearer first-token", "Bearer rotated-token"]
    assert jobs.get(job_id).state == "done"


def test_a_202_stores_the_instances_it_does_not_list_as_failed(tmp_path, results):
    server = _ScriptedDICOMweb([(202, {1: 0xC000}, 0)])
    try:
        outbox, jobs, job_id = _sending_job(tmp_path, StowSettings(server.url), results, RetryPolicy(1, 5, 3))
        outbox.deliver_due()
    finally:
        server.stop()
    items = jobs.outbox(job_id)
    assert [i.state for i in items] == ["sent", "refused", "sent"]
    assert items[0].detail == "STOW-RS HTTP 202"


@pytest.mark.slow
def test_orthanc_sends_a_study_by_c_store_and_gets_the_results_by_stow_rs_with_basic_auth(tmp_path, capsys):
    from node.cli import main
    from node.config import load_config
    from node.service.server import Node
    from tests.node_peers import wait_for, write_node_config
    from tests.output_fixtures import PartitionSegmenter

    files = write_ct_series(tmp_path / "ct", region_labels((20, 40, 40)))
    node_port = free_port()
    users = {"AuthenticationEnabled": True, "RegisteredUsers": {"lobevol": SECRET}}
    orthanc = Orthanc(tmp_path / "orthanc", node_port, extra=dicomweb_settings(**users),
                      credentials=("lobevol", SECRET)).start()
    (tmp_path / "password").write_text(SECRET + "\n")
    stow = (f"stow_url = http://127.0.0.1:{orthanc.http_port}/dicom-web\nstow_username = lobevol\n"
            f"stow_password_file = {tmp_path / 'password'}\n")
    config = write_node_config(tmp_path / "node", port=node_port, pacs_port=orthanc.dicom_port, extra=stow)
    node = None
    try:
        node = Node(load_config(config), PartitionSegmenter)
        node.start()
        study_id = {orthanc.upload(path)["ParentStudy"] for path in files}.pop()
        answer = orthanc.post("/modalities/lobevol/store", json.dumps(study_id).encode())
        assert answer is None or answer.get("FailedInstancesCount", 0) == 0, answer
        job = wait_for(lambda: next(iter(node.jobs.jobs(states=["done", "failed"])), None), 120, "the job to end")
        series = orthanc.get(f"/studies/{study_id}/series")
        instances = orthanc.get(f"/studies/{study_id}/instances")
        capsys.readouterr()
        assert main(["send", str(tmp_path / "ct"), "--to", "PACS", "--config", str(config)]) == 0  # stored again
        sent = capsys.readouterr().out
    finally:
        if node is not None:
            node.stop()
        orthanc.stop()
    assert job.state == "done" and job.origin_ae == "PACS", job.reason
    # the results are in the source study in Orthanc (write_node_config turns the key images off)
    assert sorted(s["MainDicomTags"]["Modality"] for s in series) == ["CT", "DOC", "SEG", "SR"]
    assert len(instances) == len(files) + 3
    assert f"{len(files)} of {len(files)} file(s) stored at PACS at http://127.0.0.1:" in sent and "(STOW-RS)" in sent
    assert main(["status", "--config", str(config), "--job", str(job.id)]) == 0
    deliveries = capsys.readouterr().out.split("deliveries:")[1].strip().splitlines()
    assert len(deliveries) == 3
    assert all(line.split()[0] == "PACS" and "sent" in line and "STOW-RS HTTP 200" in line for line in deliveries)
