"""Real scanner DICOM through the node: a whole Philips study as a scanner sends it (localizer,
three reconstructions, screen captures, directory files), and a Philips series sent JPEG-lossless."""
from __future__ import annotations

import subprocess
import tarfile
from pathlib import Path

import pydicom
import pytest
from pydicom.uid import JPEGLosslessSV1, SegmentationStorage

from node.config import load_config
from node.service.server import Node
from tests.conftest import REAL_CT_ARCHIVE as REAL_CT
from tests.node_peers import StoreSCP, free_port, tool, wait_for, write_node_config
from tests.output_fixtures import PartitionSegmenter

pytestmark = [pytest.mark.integration, pytest.mark.slow]


@pytest.fixture(scope="module")
def real_ct(tmp_path_factory) -> Path:
    if not REAL_CT.is_file():
        raise AssertionError(f"{REAL_CT} is missing (the real scanner samples of shared/data/real-ct)")
    folder = tmp_path_factory.mktemp("real-ct")
    with tarfile.open(REAL_CT) as archive:
        archive.extractall(folder, filter="data")
    return folder


@pytest.fixture
def node_and_pacs(tmp_path):
    pacs = StoreSCP(tmp_path / "pacs").start()
    config = write_node_config(tmp_path / "node", port=free_port(), pacs_port=pacs.port)
    node = Node(load_config(config), PartitionSegmenter)
    node.start()
    yield node, pacs
    node.stop()
    pacs.stop()


def _study_root(real_ct: Path, name: str) -> Path:
    (root,) = [p for p in real_ct.rglob(name) if p.is_dir()]
    return root


def test_whole_philips_study_keeps_ct_ignores_the_rest_and_analyses_the_soft_tissue_series(real_ct, node_and_pacs):
    node, pacs = node_and_pacs
    study = _study_root(real_ct, "S21570")
    result = subprocess.run([tool("storescu", "dcmtk"), "-aet", "PACS", "-aec", "LOBEVOL", "+sd", "+r", "-nh",
                             "127.0.0.1", str(node.port), str(study)], capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-2000:]
    job = wait_for(lambda: next((j for j in node.jobs.jobs() if j.state in ("done", "failed", "skipped")), None),
                   240, "the Philips study's job")
    assert job.state == "done", job.reason
    assert (job.instances, job.ignored) == (1 + 28 + 140 + 140, 6)  # CT kept; the 6 screen captures ignored
    (seg,) = [ds for ds in pacs.received() if ds.SOPClassUID == SegmentationStorage]
    soft_1mm = pydicom.dcmread(next((study / "S2020").iterdir()), stop_before_pixels=True)
    assert seg.StudyInstanceUID == soft_1mm.StudyInstanceUID
    referenced = {item.SeriesInstanceUID for item in seg.ReferencedSeriesSequence}
    assert referenced == {soft_1mm.SeriesInstanceUID}


def test_series_received_jpeg_lossless_is_decoded_and_analysed(real_ct, node_and_pacs, tmp_path):
    node, pacs = node_and_pacs
    compressed = tmp_path / "jpeg"
    compressed.mkdir()
    for source in sorted(p for p in (_study_root(real_ct, "S21570") / "S2010").iterdir() if p.name != "DIRFILE"):
        subprocess.run([tool("dcmcjpeg", "dcmtk"), "+e1", str(source), str(compressed / source.name)], check=True,
                       capture_output=True)
    files = sorted(compressed.iterdir())
    assert pydicom.dcmread(files[0], stop_before_pixels=True).file_meta.TransferSyntaxUID == JPEGLosslessSV1
    result = subprocess.run([tool("storescu", "dcmtk"), "-v", "-xs", "-aet", "PACS", "-aec", "LOBEVOL", "127.0.0.1",
                             str(node.port), *map(str, files)], capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-2000:]
    spooled = sorted(node.spool.incoming.rglob("*.dcm"))
    assert len(spooled) == len(files)
    assert pydicom.dcmread(spooled[0], stop_before_pixels=True).file_meta.TransferSyntaxUID == JPEGLosslessSV1
    job = wait_for(lambda: next((j for j in node.jobs.jobs() if j.state in ("done", "failed", "skipped")), None),
                   240, "the job of the JPEG-lossless series")
    assert job.state == "done", job.reason
    assert any(ds.SOPClassUID == SegmentationStorage for ds in pacs.received())
