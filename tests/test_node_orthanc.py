"""Orthanc as the hospital PACS: it sends a study to the node with its own C-STORE, and the
node's SEG, SR and Encapsulated PDF come back into the same study in Orthanc."""
from __future__ import annotations

import json

import pytest

from node.config import load_config
from node.service.server import Node
from tests.node_peers import Orthanc, free_port, wait_for, write_node_config
from tests.output_fixtures import PartitionSegmenter, region_labels, write_ct_series

pytestmark = [pytest.mark.integration, pytest.mark.slow]


def test_orthanc_sends_a_study_and_receives_the_results_in_the_same_study(tmp_path):
    files = write_ct_series(tmp_path / "ct", region_labels((20, 40, 40)))
    node_port = free_port()
    orthanc = Orthanc(tmp_path / "orthanc", node_port).start()
    node = None
    try:
        config = write_node_config(tmp_path / "node", port=node_port, pacs_port=orthanc.dicom_port)
        node = Node(load_config(config), PartitionSegmenter)
        node.start()
        study_id = {orthanc.upload(path)["ParentStudy"] for path in files}.pop()
        assert len(orthanc.get(f"/studies/{study_id}/series")) == 1
        answer = orthanc.post("/modalities/lobevol/store", json.dumps(study_id).encode())
        assert answer is None or answer.get("FailedInstancesCount", 0) == 0, answer
        series = wait_for(lambda: (s := orthanc.get(f"/studies/{study_id}/series")) and len(s) >= 4 and s, 90,
                          "the results in Orthanc's study")
        modalities = sorted(s["MainDicomTags"]["Modality"] for s in series)
        assert modalities == ["CT", "DOC", "SEG", "SR"]
        # Orthanc stores each object as it comes; the job is done once the association is released
        job = wait_for(lambda: next(iter(node.jobs.jobs(states=["done", "failed"])), None), 30, "the job to end")
        assert job.state == "done" and job.origin_ae == "PACS", job.reason
        instances = orthanc.get(f"/studies/{study_id}/instances")
        assert len(instances) == len(files) + 3
    finally:
        if node is not None:
            node.stop()
        orthanc.stop()
