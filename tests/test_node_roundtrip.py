"""The whole node over loopback: DCMTK storescu -> node -> DCMTK storescp (the originating PACS).

The in-process tests use the model-free PartitionSegmenter (the worker is
still a real spawned process); the kill -9 test runs ``lobevol serve`` as a
subprocess with the real Segmenter (bundled model, else a tiny untrained one).
"""
from __future__ import annotations

import os
import signal
import subprocess
import time
from collections import Counter
from pathlib import Path

import pydicom
import pytest
from pydicom.uid import EncapsulatedPDFStorage, SegmentationStorage
from pynetdicom import AE
from pynetdicom.sop_class import CTImageStorage

from node.cli import main
from node.config import load_config
from node.service.jobs import JobStore
from node.service.server import Node
from tests.dicom_validation import validate
from tests.node_peers import StoreSCP, free_port, storescu, tiny_checkpoint, wait_for, write_node_config
from tests.node_peers import serve as serve_node  # `serve` names the subprocess in the tests
from tests.output_fixtures import PartitionSegmenter, region_labels, write_ct_series

pytestmark = pytest.mark.integration

COMPREHENSIVE_3D_SR = "1.2.840.10008.5.1.4.1.1.88.34"
# dciodvfy warnings we accept (same reasons as tests/test_pipeline.py): our private asymmetry code.
EXPLAINED_WARNINGS = ("<99LOBEVOL>", "would be needed to build DICOMDIR")


@pytest.fixture(scope="module")
def study(tmp_path_factory) -> list[Path]:
    """A small head CT series (20 slices of 40 x 40: 95 mm, enough to cover a head)."""
    return write_ct_series(tmp_path_factory.mktemp("study") / "ct", region_labels((20, 40, 40)))


def _results_by_class(datasets) -> Counter:
    return Counter(str(ds.SOPClassUID) for ds in datasets)


def _one_result_set(pacs: StoreSCP, study_uid: str) -> list[pydicom.Dataset]:
    """The objects the PACS received: each SOP instance once, all in the source study, one SEG/SR/PDF."""
    received = pacs.received()
    uids = Counter(ds.SOPInstanceUID for ds in received)
    assert max(uids.values()) == 1, f"duplicates delivered: {[u for u, n in uids.items() if n > 1]}"
    assert {ds.StudyInstanceUID for ds in received} == {study_uid}
    classes = _results_by_class(received)
    assert (classes[SegmentationStorage], classes[COMPREHENSIVE_3D_SR], classes[EncapsulatedPDFStorage]) == (1, 1, 1)
    return received


@pytest.fixture
def node_factory(tmp_path):
    nodes = []

    def start(config_path: Path) -> Node:
        node = Node(load_config(config_path), PartitionSegmenter)
        node.start()
        nodes.append(node)
        return node

    yield start
    for node in nodes:
        node.stop()


def test_storescu_to_node_to_storescp_valid_results_in_the_source_study(tmp_path, study, node_factory, capsys):
    pacs = StoreSCP(tmp_path / "pacs").start()
    try:
        config = write_node_config(tmp_path / "node", port=free_port(), pacs_port=pacs.port)
        node = node_factory(config)
        storescu(node.port, study)
        jobs = JobStore(load_config(config).storage.database)
        job = wait_for(lambda: next((j for j in jobs.jobs() if j.state in ("done", "failed", "skipped")), None),
                       60, "the job to end")
        assert job.state == "done", job.reason
        source_study = pydicom.dcmread(study[0]).StudyInstanceUID
        received = _one_result_set(pacs, source_study)
    finally:
        pacs.stop()
    for path in sorted((tmp_path / "pacs").iterdir()):
        result = validate(path)
        assert result.errors == [], result.output
        assert result.unexplained_warnings(EXPLAINED_WARNINGS) == [], result.output
    assert len(received) == 3  # SEG, SR, PDF (overlays off in this config)
    assert main(["status", "--config", str(config)]) == 0
    out = capsys.readouterr().out
    assert "done 1" in out and source_study in out and "3 of 3 result deliveries made" in out
    assert main(["status", "--config", str(config), "--job", str(job.id)]) == 0
    history = capsys.readouterr().out
    for state in ("received", "selected", "processing", "sending", "done"):
        assert state in history


def test_echo_send_and_a_destination_that_comes_up_late_even_after_a_restart(tmp_path, study, node_factory, capsys):
    pacs_port = free_port()
    config = write_node_config(tmp_path / "node", port=free_port(), pacs_port=pacs_port)
    node = node_factory(config)
    assert main(["echo", "LOBEVOL", "--config", str(config), "--as", "PACS"]) == 0
    assert "answered C-ECHO" in capsys.readouterr().out
    assert main(["echo", "PACS", "--config", str(config)]) == 1  # the PACS is down
    assert "C-ECHO failed" in capsys.readouterr().err
    assert main(["send", str(study[0].parent), "--to", "LOBEVOL", "--config", str(config)]) == 0
    assert f"{len(study)} of {len(study)} file(s) stored" in capsys.readouterr().out
    jobs = node.jobs
    wait_for(lambda: any(i.attempts >= 1 for j in jobs.jobs() for i in jobs.outbox(j.id)), 60,
             "a first failed delivery")
    (job,) = jobs.jobs()
    assert job.state == "sending"
    node.stop()  # the outbox is persisted: a restarted node goes on retrying
    jobs = node_factory(config).jobs
    with StoreSCP(tmp_path / "pacs", pacs_port) as pacs:
        wait_for(lambda: jobs.get(job.id).state == "done", 30, "delivery after the PACS came up")
        _one_result_set(pacs, pydicom.dcmread(study[0]).StudyInstanceUID)


def test_results_sent_back_and_the_same_study_again_start_no_analysis_a_change_does(tmp_path, study, node_factory):
    """Issue 29: a PACS that routes our results back, or the identical study sent again, must not loop."""
    with StoreSCP(tmp_path / "pacs") as pacs:
        config = write_node_config(tmp_path / "node", port=free_port(), pacs_port=pacs.port)
        node = node_factory(config)
        storescu(node.port, study)
        wait_for(lambda: node.jobs.counts().get("done") == 1, 60, "the first run")
        results = sorted((tmp_path / "pacs").iterdir())
        from node.config import RemoteAE
        from node.service.scu import store_files

        sent_back = store_files(RemoteAE("LOBEVOL", "127.0.0.1", node.port), results, "PACS")
        assert [r.outcome for r in sent_back] == ["sent"] * len(results)  # the PACS routes our results back
        wait_for(lambda: node.jobs.counts().get("skipped") == 1, 60, "our results to be ignored")
        storescu(node.port, study)  # the scanner sends the identical study again
        wait_for(lambda: node.jobs.counts().get("skipped") == 2, 60, "the identical study to be ignored")
        back, again = sorted(node.jobs.jobs(states=["skipped"]), key=lambda j: j.id)
        assert "its results are already in the study (job 1)" in back.reason and back.ignored == len(results)
        assert "identical to those job 1 analysed" in again.reason, again.reason
        assert _results_by_class(pacs.received())[SegmentationStorage] == 1
        changed = pydicom.dcmread(study[0])
        changed.ImageComments = "reconstructed again"  # a real change: same SOP Instance UID, other content
        changed.save_as(tmp_path / "changed.dcm")
        storescu(node.port, [tmp_path / "changed.dcm"])
        wait_for(lambda: node.jobs.counts().get("done") == 2, 60, "the changed study's run")
        latest = node.jobs.jobs(limit=1)[0]
        assert (latest.instances, latest.new_instances) == (1, 1)
        assert len(node.jobs.job_inputs(latest.id)) == len(study)  # the new run sees the whole study
        assert main(["retry", str(again.id), "--config", str(config)]) == 0  # forcing the identical one
        wait_for(lambda: node.jobs.counts().get("done") == 3, 60, "the forced run")
        assert _results_by_class(pacs.received())[SegmentationStorage] == 3


def test_study_without_an_eligible_series_is_skipped_with_the_reason(tmp_path, study, node_factory):
    with StoreSCP(tmp_path / "pacs") as pacs:
        config = write_node_config(tmp_path / "node", port=free_port(), pacs_port=pacs.port)
        node = node_factory(config)
        storescu(node.port, study[:6])  # 6 images, 25 mm: not enough to cover a head
        job = wait_for(lambda: next(iter(node.jobs.jobs(states=["skipped"])), None), 60, "the skipped job")
        assert "no suitable head CT series" in job.reason and "not eligible" in job.reason
        assert pacs.received() == [] and node.jobs.outbox(job.id) == []


def _send_some_then_kill(port: int, files: list[Path], count: int, process: subprocess.Popen) -> None:
    """Open an association, store ``count`` files, kill the node with -9 while the association is open."""
    ae = AE(ae_title="PACS")
    ae.add_requested_context(CTImageStorage)
    assoc = ae.associate("127.0.0.1", port, ae_title="LOBEVOL")
    assert assoc.is_established
    for path in files[:count]:
        assert assoc.send_c_store(path).Status == 0
    os.kill(process.pid, signal.SIGKILL)
    process.wait(10)
    assoc.abort()


@pytest.fixture(scope="module")
def phantom_study(tmp_path_factory) -> list[Path]:
    """A small synthetic head CT (64 x 64, 5 mm slices) with skull and brain, for the real model."""
    from inference.phantoms.generator import make_phantom
    from inference.phantoms.dicom_series import write_ct_series

    return write_ct_series(make_phantom(3, matrix=64, slice_thickness_mm=5.0),
                           tmp_path_factory.mktemp("phantom") / "ct", patient_name="Kill^Test", patient_id="KILL-0003")


@pytest.fixture(scope="module")
def real_model(tmp_path_factory) -> Path:
    from inference.checkpoint import BUNDLED_CHECKPOINT

    if Path(BUNDLED_CHECKPOINT).exists():
        return Path(BUNDLED_CHECKPOINT)
    return tiny_checkpoint(tmp_path_factory.mktemp("model") / "tiny.pt")


@pytest.mark.slow
def test_kill_9_mid_receive_and_mid_processing_delivers_every_result_once(tmp_path, study):
    log = tmp_path / "serve.log"
    with StoreSCP(tmp_path / "pacs") as pacs:
        config = write_node_config(tmp_path / "node", port=free_port(), pacs_port=pacs.port, stability_s=3)
        node_port = load_config(config).node.port
        jobs = JobStore(load_config(config).storage.database)
        serve = serve_node(config, log)
        _send_some_then_kill(node_port, study, 5, serve)
        assert [j.instances for j in jobs.jobs()] == [5]  # what was acknowledged is on disk

        serve = serve_node(config, log)
        storescu(node_port, study)  # the PACS sends the study again after the failure
        wait_for(lambda: jobs.counts().get("processing"), 120, "processing to start", 0.05)
        os.kill(serve.pid, signal.SIGKILL)
        serve.wait(10)
        assert pacs.received() == []

        serve = serve_node(config, log)
        try:
            job = wait_for(lambda: next((j for j in jobs.jobs() if j.state in ("done", "failed")), None), 300,
                           "the job to end after the restarts")
        finally:
            serve.send_signal(signal.SIGTERM)
            assert serve.wait(60) == 0, log.read_text()[-3000:]
        assert job.state == "done", job.reason
        assert len(jobs.jobs()) == 1 and job.instances == len(study) and job.attempts == 2
        assert any("resumed after a restart" in message for _, _, message in jobs.events(job.id))
        _one_result_set(pacs, pydicom.dcmread(study[0]).StudyInstanceUID)
        time.sleep(2)  # nothing more arrives later (no orphan worker, no second delivery)
        assert len(pacs.received()) == len(jobs.outbox(job.id))
    text = log.read_text()
    assert "Test^Child" not in text and "LV-TEST-0001" not in text  # no patient identifiers in the log


@pytest.mark.slow
def test_real_segmenter_end_to_end(tmp_path, phantom_study, real_model):
    """storescu -> node with the real Segmenter in its worker -> storescp, on a small phantom."""
    from inference.checkpoint import BUNDLED_CHECKPOINT

    with StoreSCP(tmp_path / "pacs") as pacs:
        config = write_node_config(tmp_path / "node", port=free_port(), pacs_port=pacs.port, model=real_model)
        node = Node(load_config(config))  # the configured model, loaded once in the worker
        node.start()
        try:
            assert "Segmenter" in node.worker.description and real_model.name in node.worker.description
            storescu(node.port, phantom_study)
            job = wait_for(lambda: next((j for j in node.jobs.jobs() if j.state in ("done", "failed", "skipped")),
                                        None), 300, "the job to end")
        finally:
            node.stop()
        if real_model == Path(BUNDLED_CHECKPOINT) or job.state == "done":
            assert job.state == "done", job.reason
            _one_result_set(pacs, pydicom.dcmread(phantom_study[0]).StudyInstanceUID)
        else:
            # The tiny untrained model can miss both sides of a lobe, which the normative
            # comparison refuses: the job must then fail with the analysis's reason, not crash.
            assert job.state == "failed" and job.reason.startswith("analysis failed:"), job.reason
            assert pacs.received() == []
