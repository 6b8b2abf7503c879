"""The outbox against real receivers: backoff while a destination is down, limits, SOP-class refusals."""
from __future__ import annotations

import time
from pathlib import Path

import pydicom
import pytest
from pydicom.uid import CTImageStorage, SecondaryCaptureImageStorage, generate_uid
from pynetdicom import AE

from node.config import NodeConfig, RemoteAE, RetryPolicy
from node.service.jobs import Delivery, JobStore
from node.service.outbox import Outbox
from node.service.spool import Spool
from tests.node_peers import StoreSCP, free_port
from tests.output_fixtures import region_labels, write_ct_series

pytestmark = pytest.mark.integration


@pytest.fixture(scope="module")
def results(tmp_path_factory) -> list[Path]:
    """Three 'result' files: two CT instances and one Secondary Capture."""
    folder = tmp_path_factory.mktemp("results")
    files = write_ct_series(folder / "ct", region_labels((2, 16, 16)))
    capture = pydicom.dcmread(files[0])
    capture.SOPClassUID = capture.file_meta.MediaStorageSOPClassUID = SecondaryCaptureImageStorage
    capture.SOPInstanceUID = capture.file_meta.MediaStorageSOPInstanceUID = generate_uid()
    capture.save_as(folder / "capture.dcm")
    return [*files, folder / "capture.dcm"]


def _sending_job(tmp_path: Path, port: int, results: list[Path], retry: RetryPolicy) -> tuple[Outbox, JobStore, int]:
    config = NodeConfig(remotes={"PACS": RemoteAE("PACS", "127.0.0.1", port, True, True)}, retry=retry)
    jobs = JobStore(tmp_path / "jobs.sqlite")
    spool = Spool(tmp_path / "spool")
    path, _ = spool.write_instance(b"x", "1.2.3", "1.2.3.4", "1.2.3.4.5")
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


def test_destination_down_at_first_receives_after_it_comes_up(tmp_path, results):
    port = free_port()
    outbox, jobs, job_id = _sending_job(tmp_path, port, results, RetryPolicy(0.3, 5, 5))
    assert outbox.deliver_due() == 3
    items = jobs.outbox(job_id)
    assert {i.state for i in items} == {"pending"} and {i.attempts for i in items} == {1}
    assert "next in 0.3 s" in items[0].detail
    assert outbox.deliver_due() == 0  # backing off: nothing due yet
    with StoreSCP(tmp_path / "pacs", port) as pacs:
        time.sleep(0.35)
        assert outbox.deliver_due() == 3
        received = sorted(ds.SOPInstanceUID for ds in pacs.received())
    assert received == sorted(i.sop_instance_uid for i in items)
    assert jobs.get(job_id).state == "done"


def test_destination_that_stays_down_ends_as_a_visible_failure(tmp_path, results):
    outbox, jobs, job_id = _sending_job(tmp_path, free_port(), results, RetryPolicy(0.05, 0.05, 2))
    outbox.deliver_due()
    time.sleep(0.1)
    outbox.deliver_due()
    job = jobs.get(job_id)
    assert job.state == "failed"
    assert "0 of 3 result deliveries made" in job.reason and "gave up after 2 attempts" in job.reason
    time.sleep(0.1)
    assert outbox.deliver_due() == 0  # no endless loop


def test_refused_sop_class_is_reported_and_the_others_delivered(tmp_path, results):
    received = []
    ae = AE(ae_title="PACS")
    ae.add_supported_context(CTImageStorage)  # a PACS that takes CT but not Secondary Capture
    handlers = [(__import__("pynetdicom").evt.EVT_C_STORE, lambda event: received.append(event.dataset.SOPInstanceUID) or 0)]
    server = ae.start_server(("127.0.0.1", 0), block=False, evt_handlers=handlers)
    try:
        outbox, jobs, job_id = _sending_job(tmp_path, server.server_address[1], results, RetryPolicy(1, 5, 3))
        outbox.deliver_due()
    finally:
        server.shutdown()
    assert len(received) == 2
    job = jobs.get(job_id)
    assert job.state == "done"
    assert "2 of 3" in job.reason and "PACS refused Secondary Capture Image Storage" in job.reason
    assert [i.state for i in jobs.outbox(job_id)] == ["sent", "sent", "refused"]
