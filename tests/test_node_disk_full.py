"""`lobevol serve` on a spool disk that fills up: refused before anything is written, never half-committed.

The spool and the job database live on a small tmpfs the test mounts (root, as here and in
CI), with ``disk_high_water_percent = 100`` so that only the free space protects the node.
"""
from __future__ import annotations

import os
import shutil
import signal
import subprocess
from pathlib import Path

import pytest

from node.config import load_config
from node.service.jobs import JobStore
from node.service.spool import DISK_RESERVE_BYTES
from tests.node_peers import CountingSCP, free_port, serve, tool, wait_for, write_node_config
from tests.output_fixtures import region_labels, write_ct_series

pytestmark = pytest.mark.integration

OUT_OF_RESOURCES, CANNOT_STORE = 0xA700, 0xC211


@pytest.fixture
def small_disk(tmp_path):
    """A 24 MiB tmpfs mounted at tmp_path/disk (unmounted at the end)."""
    disk = tmp_path / "disk"
    disk.mkdir()
    mounted = subprocess.run([tool("mount", "mount"), "-t", "tmpfs", "-o", "size=24m", "tmpfs", str(disk)],
                             capture_output=True, text=True)
    if mounted.returncode != 0:
        raise RuntimeError(f"cannot mount a tmpfs for the full-disk test (needs root): {mounted.stderr.strip()}")
    try:
        yield disk
    finally:
        subprocess.run([tool("umount", "mount"), "-l", str(disk)], check=False)


def _send(port: int, files: list[Path]) -> list[int]:
    """C-STORE ``files`` over one association; the status of each."""
    import pydicom
    from pynetdicom import AE
    from pydicom.uid import CTImageStorage

    ae = AE(ae_title="PACS")
    ae.add_requested_context(CTImageStorage)
    assoc = ae.associate("127.0.0.1", port, ae_title="LOBEVOL")
    assert assoc.is_established
    try:
        return [int(assoc.send_c_store(pydicom.dcmread(f)).Status) for f in files]
    finally:
        assoc.release()


def test_full_spool_disk_refuses_out_of_resources_before_writing(tmp_path, small_disk):
    series = write_ct_series(tmp_path / "ct", region_labels((24, 192, 192)), pixel_spacing_mm=1.2,
                             slice_spacing_mm=4)
    instance = max(f.stat().st_size for f in series)
    with CountingSCP() as pacs:
        path = write_node_config(tmp_path / "node", port=free_port(), pacs_port=pacs.port, stability_s=4)
        path.write_text(path.read_text().replace(
            "spool = spool\n", f"spool = {small_disk / 'spool'}\ndisk_high_water_percent = 100\n").replace(
            "database = jobs.sqlite\n", f"database = {small_disk / 'jobs.sqlite'}\n"))
        config = load_config(path)
        log = tmp_path / "serve.log"
        process = serve(path, log)
        try:
            # Leave room for the reserve and four instances and a half (the database's growth takes some).
            filler = small_disk / "filler"
            with open(filler, "wb") as handle:
                os.posix_fallocate(handle.fileno(), 0, shutil.disk_usage(small_disk).free - DISK_RESERVE_BYTES
                                   - int(4.5 * instance))
            statuses = _send(config.node.port, series)
            stored = statuses.count(0)
            assert 2 <= stored <= 4 and statuses[:stored] == [0] * stored, [hex(s) for s in statuses]
            assert statuses[stored:] == [OUT_OF_RESOURCES] * (len(series) - stored), [hex(s) for s in statuses]
            assert "refusing new instances: spool disk full" in log.read_text()
            assert not list((small_disk / "spool").rglob("*.tmp"))  # nothing half-written left behind
            # Room again: the sender's retry is stored, and the study analysed once, whole.
            filler.unlink()
            assert _send(config.node.port, series) == [0] * len(series)
            jobs = JobStore(config.storage.database)
            job = wait_for(lambda: next((j for j in jobs.jobs() if j.state in ("done", "failed", "skipped")), None),
                           120, "the study's job to end")
            assert job.state == "done" and job.instances == len(series), (job.state, job.reason)
            assert [j.id for j in jobs.jobs()] == [job.id]
        finally:
            process.send_signal(signal.SIGTERM)
            assert process.wait(60) == 0, log.read_text()[-3000:]
    assert CANNOT_STORE not in statuses
