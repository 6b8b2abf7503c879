"""lobevol as an Orthanc Python plugin (node/service/orthanc_plugin.py), with a real Orthanc and orthanc-python.

Each test starts Orthanc with the plugin on a lobevol configuration in a temporary
folder; the segmenter is the model-free stand-in (the plumbing is under test, not
the model), and StableAge is 1 s.
"""
from __future__ import annotations

import os
import sqlite3
import time
import urllib.error
from collections import Counter
from pathlib import Path

import pydicom
import pytest
from pydicom.uid import MRImageStorage, generate_uid

from node.cli import main
from node.config import load_config
from node.service.orthanc_plugin import PluginSettings, already_analysed, load_applicable_config
from tests.dicom_validation import validate
from tests.node_peers import Orthanc, storescu, wait_for
from tests.output_fixtures import PartitionSegmenter, region_labels, write_ct_series

PLUGIN = Path(__file__).resolve().parents[1] / "node" / "service" / "orthanc_plugin.py"
#: The real plugin run with a model-free stand-in segmenter (tests/stand_in_orthanc_plugin.py).
STAND_IN_PLUGIN = Path(__file__).resolve().parent / "stand_in_orthanc_plugin.py"
ORTHANC_PYTHON = "/usr/share/orthanc/plugins/libOrthancPython.so"
SITE_PACKAGES = [str(p) for p in map(Path, __import__("sys").path) if p.name == "site-packages" and p.is_dir()]
EXPLAINED_WARNINGS = ("<99LOBEVOL>", "would be needed to build DICOMDIR")
FINAL = ("done", "skipped", "failed")


class SlowSegmenter(PartitionSegmenter):
    """The stand-in, taking long enough to kill Orthanc while it computes."""

    def segment(self, image):
        time.sleep(6)
        return super().segment(image)


def lobevol_config(folder: Path, overlays: bool = False) -> Path:
    """A config.ini for the plugin (and for ``lobevol status``), with a network section the plugin does not read."""
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / "config.ini"
    path.write_text(f"""\
[storage]
spool = spool
results = results
database = jobs.sqlite
[inference]
device = cpu
threads = 1
[outputs]
overlays = {'yes' if overlays else 'no'}
[retry]
first_delay_s = 0.5
max_delay_s = 2
[remote SOMEPACS]
host = 127.0.0.1
port = 4242
""")
    return path


def plugin_orthanc(folder: Path, config: Path, segmenter: str = "tests.output_fixtures:PartitionSegmenter",
                   **extra) -> Orthanc:
    lobevol = {"Configuration": str(config), "SitePackages": SITE_PACKAGES}
    settings = {"Plugins": [ORTHANC_PYTHON], "PythonScript": str(STAND_IN_PLUGIN), "StableAge": 1, "Lobevol": lobevol,
                "LobevolStandIn": segmenter}
    settings.update(extra.pop("settings", {}))
    return Orthanc(folder, extra=settings, **extra)


def lobevol_jobs(orthanc: Orthanc, query: str = "") -> dict:
    return orthanc.get(f"/lobevol/jobs{query}")


def study_modalities(orthanc: Orthanc, study_id: str) -> Counter:
    return Counter(orthanc.get(f"/instances/{i['ID']}/simplified-tags")["Modality"]
                   for i in orthanc.get(f"/studies/{study_id}/instances"))


def wait_for_job(orthanc: Orthanc, timeout_s: float = 60, count: int = 1) -> list[dict]:
    """The first ``count`` jobs once all have ended (oldest first)."""
    def ended():
        jobs = lobevol_jobs(orthanc, "?limit=100")["jobs"][::-1]
        return jobs[:count] if len(jobs) >= count and all(j["state"] in FINAL for j in jobs[:count]) else None
    return wait_for(ended, timeout_s, f"{count} lobevol job(s) to end", 0.3)


def check_results_valid(orthanc: Orthanc, study_id: str, tmp_path: Path) -> None:
    """SEG, SR and Encapsulated PDF of the study pass dciodvfy."""
    checked = 0
    for instance in orthanc.get(f"/studies/{study_id}/instances"):
        tags = orthanc.get(f"/instances/{instance['ID']}/simplified-tags")
        if tags["Modality"] not in ("SEG", "SR", "DOC"):
            continue
        path = tmp_path / f"{tags['Modality']}-{instance['ID']}.dcm"
        path.write_bytes(orthanc.get_bytes(f"/instances/{instance['ID']}/file"))
        result = validate(path)
        assert result.errors == [], result.output
        assert result.unexplained_warnings(EXPLAINED_WARNINGS) == [], result.output
        assert tags["StudyInstanceUID"] == orthanc.get(f"/studies/{study_id}")["MainDicomTags"]["StudyInstanceUID"]
        checked += 1
    assert checked == 3


@pytest.fixture(scope="module")
def head_study(tmp_path_factory) -> list[Path]:
    return write_ct_series(tmp_path_factory.mktemp("study") / "ct", region_labels((20, 40, 40)))


# -- unit checks (no Orthanc) ------------------------------------------------------------------

def test_already_analysed_tells_our_series_and_fresh_images_apart():
    ct = {"MainDicomTags": {"Manufacturer": "TestVendor", "Modality": "CT"}, "LastUpdate": "20261202T100000"}
    seg = {"MainDicomTags": {"Manufacturer": "lobevol", "Modality": "SEG"}, "LastUpdate": "20261202T100100"}
    assert already_analysed([ct]) is None
    assert "already in the study" in already_analysed([ct, seg])
    assert "every series" in already_analysed([seg])
    assert already_analysed([dict(ct, LastUpdate="20261202T100200"), seg]) is None  # new images after ours


def test_plugin_settings_name_what_is_wrong(tmp_path):
    config = lobevol_config(tmp_path)
    with pytest.raises(ValueError, match='no "Lobevol" section'):
        PluginSettings.from_orthanc({}, tmp_path)
    with pytest.raises(ValueError, match="unknown key.*Confguration"):
        PluginSettings.from_orthanc({"Lobevol": {"Confguration": "x"}}, tmp_path)
    with pytest.raises(ValueError, match="does not exist"):
        PluginSettings.from_orthanc({"Lobevol": {"Configuration": "missing.ini"}}, tmp_path)
    with pytest.raises(ValueError, match="SitePackages.*not a folder"):
        PluginSettings.from_orthanc({"Lobevol": {"Configuration": "config.ini", "SitePackages": ["nope"]}}, tmp_path)
    (tmp_path / "lib" / "python3.7" / "site-packages").mkdir(parents=True)
    with pytest.raises(ValueError, match="is for python3.7, but Orthanc embeds"):
        PluginSettings.from_orthanc({"Lobevol": {"Configuration": "config.ini",
                                                 "SitePackages": "lib/python3.7/site-packages"}}, tmp_path)
    settings = PluginSettings.from_orthanc({"Lobevol": {"Configuration": "config.ini"}}, tmp_path)
    assert settings.configuration == config and settings.worker_python.is_file()


def test_plugin_jobs_and_node_jobs_share_a_database_without_crossing(tmp_path):
    from node.service.jobs import Delivery, JobStore

    jobs = JobStore(tmp_path / "jobs.sqlite")
    node_job = jobs.record_instance("1.2.3", "1.2.3.1", "1.2.840.10008.5.1.4.1.1.2", "1.2.3.1.1", tmp_path / "a.dcm",
                                    10, "PACS")
    jobs.select_stable(0.0, now=time.time() + 1)
    jobs.mark_input_ready(node_job)
    pacs_job, created = jobs.record_complete_study("1.2.4", "orthanc-id", "RestApi")
    assert created and jobs.record_complete_study("1.2.4", "orthanc-id", "RestApi") == (pacs_job, False)
    assert jobs.jobs_needing_input() == [] and jobs.jobs_needing_input(from_pacs=True) == [pacs_job]
    jobs.record_fetched_input(pacs_job, 20, 1)
    assert jobs.claim_next(from_pacs=True).id == pacs_job and jobs.claim_next(from_pacs=True) is None
    assert jobs.recover() == [] and jobs.recover(from_pacs=True) == [pacs_job]
    assert jobs.claim_next(from_pacs=True).attempts == 2
    jobs.finish_analysis(pacs_job, "done", "", "", None, [Delivery("ORTHANC", "seg.dcm", "1.2", "1.2.4.9")])
    assert jobs.due_deliveries() == [] and len(jobs.due_deliveries(from_pacs=True)) == 1
    assert jobs.next_delivery_time() is None and jobs.claim_next().id == node_job
    item, = jobs.due_deliveries(from_pacs=True)
    jobs.record_delivery(item.id, "failed", "Orthanc refused it")
    assert jobs.settle_delivery(pacs_job) == "failed"
    assert "1 undelivered result(s) queued again" in jobs.retry(pacs_job)
    # A failed analysis of a study in a PACS fetches it again on retry (the PACS holds its images).
    other, _ = jobs.record_complete_study("1.2.5", "other-id", "SCANNER")
    jobs.record_fetched_input(other, 5, 0)
    assert jobs.claim_next(from_pacs=True).id == other
    jobs.finish_analysis(other, "failed", "analysis error", "", None, [])
    assert "fetched again" in jobs.retry(other)
    assert jobs.jobs_needing_input(from_pacs=True) == [other]
    assert jobs.latest_job_of_source("other-id").id == other and jobs.cursor("x") is None
    jobs.set_cursor("x", 41)
    assert jobs.cursor("x") == 41


def test_only_the_sections_that_apply_inside_orthanc_are_read(tmp_path):
    config = lobevol_config(tmp_path)
    config.write_text(config.read_text() + "[tls]\nenabled = yes\n[node]\nport = not a port\n")
    with pytest.raises(ValueError):
        load_config(config)  # a node could not run on it
    loaded = load_applicable_config(config)
    assert loaded.storage.database == tmp_path / "jobs.sqlite" and loaded.inference.threads == 1 and not loaded.tls.enabled
    assert loaded.remotes == {} and loaded.outputs.write_overlays is False
    config.write_text(config.read_text().replace("threads = 1", "threads = none"))
    with pytest.raises(ValueError, match=r"\[inference\] threads"):
        load_applicable_config(config)


# -- with a real Orthanc -----------------------------------------------------------------------

@pytest.mark.integration
def test_rest_upload_comes_back_with_valid_results_in_the_same_study_once(tmp_path, head_study, capsys):
    config = lobevol_config(tmp_path / "lobevol", overlays=True)
    orthanc = plugin_orthanc(tmp_path / "orthanc", config).start()
    try:
        study_id = {orthanc.upload(p)["ParentStudy"] for p in head_study}.pop()
        job, = wait_for_job(orthanc)
        assert job["state"] == "done", job["reason"]
        assert lobevol_jobs(orthanc)["worker"] == "ready: PartitionSegmenter"
        assert job["orthanc_study"] == study_id and job["origin"] == "RestApi" and job["instances"] == len(head_study)
        assert study_modalities(orthanc, study_id) == {"CT": len(head_study), "SEG": 1, "SR": 1, "DOC": 1, "OT": 3}
        check_results_valid(orthanc, study_id, tmp_path)
        # Storing the results made the study stable again: that job must not analyse it a second time.
        echo = wait_for_job(orthanc, count=2)[1]
        assert echo["state"] == "skipped" and "already in the study" in echo["reason"], echo
        detail = orthanc.get(f"/lobevol/jobs/{job['id']}")
        assert [h["state"] for h in detail["history"]] == ["selected", "processing", "sending", "done"]
        assert all(d["state"] == "sent" for d in detail["deliveries"]) and len(detail["deliveries"]) == 6
        with pytest.raises(urllib.error.HTTPError) as refused:
            orthanc.post(f"/lobevol/jobs/{job['id']}/retry", b"")
        assert refused.value.code == 409 and b"only failed jobs" in refused.value.read()
        assert study_modalities(orthanc, study_id)["SEG"] == 1
    finally:
        orthanc.stop()
    assert main(["status", "--config", str(config)]) == 0
    out = capsys.readouterr().out
    assert "done 1" in out and "skipped 1" in out and "already in the study" in out


@pytest.mark.integration
def test_c_store_to_orthanc_with_authentication(tmp_path, head_study):
    config = lobevol_config(tmp_path / "lobevol")
    users = {"AuthenticationEnabled": True, "RegisteredUsers": {"radiology": "s3cret"}}
    orthanc = plugin_orthanc(tmp_path / "orthanc", config, settings=users, credentials=("radiology", "s3cret"))
    orthanc.start()
    try:
        storescu(orthanc.dicom_port, head_study, calling="SCANNER", called="PACS")
        job, = wait_for_job(orthanc)
        assert job["state"] == "done" and job["origin"] == "SCANNER", job
        assert study_modalities(orthanc, job["orthanc_study"]) == {"CT": len(head_study), "SEG": 1, "SR": 1, "DOC": 1}
        check_results_valid(orthanc, job["orthanc_study"], tmp_path)
        anonymous = Orthanc(tmp_path / "unused")
        anonymous.http_port = orthanc.http_port
        with pytest.raises(urllib.error.HTTPError) as refused:
            anonymous.get("/lobevol/jobs")
        assert refused.value.code == 401
    finally:
        orthanc.stop()


@pytest.mark.integration
def test_stop_and_kill_9_mid_analysis_and_restarts_end_with_one_set_of_results(tmp_path, head_study):
    config = lobevol_config(tmp_path / "lobevol")
    orthanc = plugin_orthanc(tmp_path / "orthanc", config, "tests.test_orthanc_plugin:SlowSegmenter").start()
    try:
        study_id = {orthanc.upload(p)["ParentStudy"] for p in head_study}.pop()
        wait_for(lambda: lobevol_jobs(orthanc)["counts"]["processing"] == 1, 60, "the analysis to start", 0.2)
        stopping = time.monotonic()
        orthanc.stop()  # SIGTERM: the running job is checkpointed, Orthanc does not wait for it
        assert time.monotonic() - stopping < 5
        orthanc.start()
        wait_for(lambda: lobevol_jobs(orthanc)["counts"]["processing"] == 1, 60, "the analysis to resume", 0.2)
        worker = _worker_pids(orthanc.process.pid)
        assert worker, "no worker process under Orthanc"
        orthanc.kill()
        wait_for(lambda: not any(_alive(p) for p in worker), 10, "the orphaned worker to exit")
        orthanc.start()
        job, = wait_for_job(orthanc, 90)
        assert job["state"] == "done" and job["attempts"] == 3, job
        messages = [h["message"] for h in orthanc.get(f"/lobevol/jobs/{job['id']}")["history"]]
        assert any(m.startswith("checkpointed at shutdown") for m in messages), messages
        assert "resumed after a restart" in messages
        assert study_modalities(orthanc, study_id) == {"CT": len(head_study), "SEG": 1, "SR": 1, "DOC": 1}
        # Killed after Orthanc stored the results but before the queue recorded it: they are not stored again.
        orthanc.kill()
        with sqlite3.connect(tmp_path / "lobevol" / "jobs.sqlite") as db:
            db.execute("UPDATE outbox SET state = 'pending', attempts = 0, detail = ''")
            db.execute("UPDATE jobs SET state = 'sending', finished_at = NULL WHERE id = ?", (job["id"],))
        orthanc.start()
        wait_for(lambda: orthanc.get(f"/lobevol/jobs/{job['id']}")["state"] == "done", 30, "the outbox to resume")
        deliveries = orthanc.get(f"/lobevol/jobs/{job['id']}")["deliveries"]
        assert [d["detail"] for d in deliveries] == ["already in Orthanc"] * 3, deliveries
        assert study_modalities(orthanc, study_id) == {"CT": len(head_study), "SEG": 1, "SR": 1, "DOC": 1}
    finally:
        orthanc.stop()


@pytest.mark.integration
def test_non_head_and_mr_studies_are_skipped_with_their_reason(tmp_path, head_study):
    # A chest: no head word in any header, and no skull in the images (soft tissue, fat around it).
    chest = _rewritten(head_study, tmp_path / "chest", BodyPartExamined="CHEST", SeriesDescription="CHEST 5MM",
                       StudyDescription="CT CHEST", PixelData=_soft_tissue_slab(40, 40))
    mr = _rewritten(head_study, tmp_path / "mr", Modality="MR", SOPClassUID=MRImageStorage)
    config = lobevol_config(tmp_path / "lobevol")
    orthanc = plugin_orthanc(tmp_path / "orthanc", config).start()
    try:
        for path in chest:
            orthanc.upload(path)
        wait_for_job(orthanc)
        for path in mr:
            orthanc.upload(path)
        first, second = wait_for_job(orthanc, count=2)
        assert first["state"] == "skipped" and "no suitable head CT series" in first["reason"], first
        assert second["state"] == "skipped" and second["reason"].startswith("no CT series in the study"), second
        assert "MR" in second["reason"] and second["ignored"] == len(mr)
        assert lobevol_jobs(orthanc, "?state=skipped")["counts"]["skipped"] == 2
    finally:
        orthanc.stop()


@pytest.mark.integration
def test_a_bad_lobevol_configuration_leaves_orthanc_running_and_the_plugin_idle(tmp_path, head_study):
    config = lobevol_config(tmp_path / "lobevol")
    config.write_text(config.read_text().replace("device = cpu", "device = tpu"))
    orthanc = plugin_orthanc(tmp_path / "orthanc", config).start()
    try:
        orthanc.upload(head_study[0])  # Orthanc itself works
        with pytest.raises(urllib.error.HTTPError) as idle:
            lobevol_jobs(orthanc)
        assert idle.value.code == 503 and b"device = 'tpu'" in idle.value.read()
        assert "the plugin stays idle" in orthanc.log_text() and "tpu" in orthanc.log_text()
    finally:
        orthanc.stop()


def _rewritten(paths: list[Path], folder: Path, **attributes) -> list[Path]:
    """A copy of a series as a new study, with ``attributes`` changed."""
    folder.mkdir(parents=True)
    study, series = generate_uid(), generate_uid()
    written = []
    for path in paths:
        ds = pydicom.dcmread(path)
        ds.StudyInstanceUID, ds.SeriesInstanceUID = study, series
        ds.SOPInstanceUID = ds.file_meta.MediaStorageSOPInstanceUID = generate_uid()
        for keyword, value in attributes.items():
            setattr(ds, keyword, value)
        ds.file_meta.MediaStorageSOPClassUID = ds.SOPClassUID
        ds.save_as(folder / path.name)
        written.append(folder / path.name)
    return written


def _soft_tissue_slab(rows: int, columns: int) -> bytes:
    """One slice of a body without bone: 40 HU inside an ellipse, fat (-100 HU) around it (stored HU + 1024)."""
    import numpy as np

    y, x = np.mgrid[-1:1:rows * 1j, -1:1:columns * 1j]
    hu = np.where(x ** 2 / 0.9 ** 2 + y ** 2 / 0.7 ** 2 <= 1, 40, -100)
    return (hu + 1024).astype(np.uint16).tobytes()


def _worker_pids(parent: int) -> list[int]:
    """Child processes of ``parent`` (the plugin's worker), from /proc."""
    pids = []
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        if int(fields[1]) == parent:
            pids.append(int(stat.parent.name))
    return pids


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    state = Path(f"/proc/{pid}/stat").read_text().split()[2] if Path(f"/proc/{pid}/stat").exists() else "X"
    return state not in ("Z", "X")


@pytest.mark.integration
def test_a_study_interrupted_before_it_was_stable_is_analysed_after_a_restart(tmp_path, head_study):
    """Orthanc's stability timers live in memory: killed during StableAge, it never sends that study's event."""
    config = lobevol_config(tmp_path / "lobevol")
    orthanc = plugin_orthanc(tmp_path / "orthanc", config, settings={"StableAge": 3}).start()
    try:
        wait_for(lambda: "worker ready" in orthanc.log_text(), 30, "the plugin's worker")
        study_id = {orthanc.upload(p)["ParentStudy"] for p in head_study}.pop()
        orthanc.kill()
        assert lobevol_jobs_from_database(config) == []
        orthanc.start()
        job, = wait_for_job(orthanc, 60)
        assert job["state"] == "done" and job["orthanc_study"] == study_id, job
        assert study_modalities(orthanc, study_id) == {"CT": len(head_study), "SEG": 1, "SR": 1, "DOC": 1}
        orthanc.stop()
        orthanc.start()  # nothing new: the catch-up queues nothing
        time.sleep(5)
        assert lobevol_jobs(orthanc)["counts"]["done"] == 1 and len(lobevol_jobs(orthanc)["jobs"]) <= 2
    finally:
        orthanc.stop()


def lobevol_jobs_from_database(config: Path) -> list:
    from node.config import load_config
    from node.service.jobs import JobStore

    return JobStore(load_config(config).storage.database).jobs()


@pytest.mark.integration
def test_lobevol_orthanc_ports_are_settable_and_dicom_answers_known_modalities_only(tmp_path):
    import json
    import subprocess

    from pynetdicom import AE
    from pynetdicom.sop_class import Verification

    from tests.node_peers import free_port, tool

    config = lobevol_config(tmp_path / "lobevol")
    http_port, dicom_port = free_port(), free_port()
    assert main(["orthanc", "--config", str(config), "--folder", str(tmp_path / "orthanc"), "--http-port",
                 str(http_port), "--dicom-port", str(dicom_port), "--write-only"]) == 0
    written = json.loads((tmp_path / "orthanc" / "orthanc.json").read_text())
    assert written["StableAge"] == 15  # the config's [series] stability_s (its default)
    log = open(tmp_path / "orthanc.log", "wb")
    process = subprocess.Popen([tool("Orthanc", "orthanc"), str(tmp_path / "orthanc" / "orthanc.json")], stdout=log,
                               stderr=subprocess.STDOUT)
    try:
        import urllib.request

        def up() -> bool:
            try:
                with urllib.request.urlopen(f"http://127.0.0.1:{http_port}/system", timeout=5) as answer:
                    return json.loads(answer.read())["DicomPort"] == dicom_port
            except OSError:
                return False

        wait_for(up, 60, "Orthanc on the ports asked for")

        def echo(calling: str) -> bool:
            ae = AE(ae_title=calling)
            ae.add_requested_context(Verification)
            assoc = ae.associate("127.0.0.1", dicom_port, ae_title="PACS")
            try:
                return assoc.is_established and assoc.send_c_echo().Status == 0
            finally:
                if assoc.is_established:
                    assoc.release()

        assert echo("LOBEVOL")  # the modality of its configuration, from its host
        assert not echo("STRANGER")  # not even C-ECHO for an unknown AE title
    finally:
        process.terminate()
        process.wait(30)
        log.close()
