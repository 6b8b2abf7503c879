"""`lobevol demo`: node + DCMTK storescp + a phantom over loopback, in one command."""
from __future__ import annotations

import pytest

from node.cli import main
from tests.node_peers import free_port
from tests.output_fixtures import PartitionSegmenter

pytestmark = [pytest.mark.integration, pytest.mark.slow]


def test_demo_prints_volumes_next_to_the_truth_and_the_received_objects(tmp_path, capsys, monkeypatch):
    # The model-free stand-in keeps this test fast; the real model runs in test_node_roundtrip.
    port = free_port()
    monkeypatch.setattr("inference.factory.segmenter_factory", lambda settings: PartitionSegmenter)
    status = main(["demo", "--matrix", "64", "--seed", "5", "--workdir", str(tmp_path), "--timeout", "120",
                   "--port", str(port)])
    out = capsys.readouterr().out
    assert status == 0, out
    assert f"node LOBEVOL listening on 127.0.0.1:{port};" in out
    assert "job 1: done" in out
    assert "right frontal lobe" in out.lower() and "brainstem" in out.lower() and "measured" in out and "true" in out
    # A typical child by default, and the reference said plainly: the whole cohort, not adjusted for age or sex.
    assert "a typical child: its volumes are the reference's means" in out
    assert "reference: Xi2025" in out and "n = 1487" in out and "not adjusted for age or sex" in out
    received = sorted((tmp_path / "pacs").iterdir())
    assert len(received) >= 3 and all(str(path) in out for path in received)
    assert (tmp_path / "results" / "1" / "1" / "report.pdf").is_file()  # job 1, attempt 1
