"""`lobevol serve` killed with -9 while it delivers results: at-least-once, by SOP Instance UID.

The PACS is a pynetdicom SCP that records every C-STORE (tests/node_peers.py
CountingSCP), so a re-sent object shows even though it carries the same UID.
"""
from __future__ import annotations

import os
import signal
import threading
from pathlib import Path

import pytest

from node.config import load_config
from node.service.jobs import JobStore
from tests.node_peers import CountingSCP, free_port, serve, storescu, wait_for, write_node_config
from tests.output_fixtures import region_labels, write_ct_series

pytestmark = [pytest.mark.integration, pytest.mark.slow]


@pytest.fixture(scope="module")
def study(tmp_path_factory) -> list[Path]:
    return write_ct_series(tmp_path_factory.mktemp("study") / "ct", region_labels((20, 40, 40)))


def test_kill_9_after_the_pacs_stored_the_first_result_resends_only_the_object_in_flight(tmp_path, study):
    log = tmp_path / "serve.log"
    node: dict[str, object] = {}
    killed = threading.Event()

    def kill_at_the_second_object(dataset, receipts) -> None:
        # The first object was answered; the second is stored but not yet answered.
        if len(receipts) == 2 and not killed.is_set():
            os.kill(node["process"].pid, signal.SIGKILL)
            killed.set()

    with CountingSCP(on_store=kill_at_the_second_object) as pacs:
        config = write_node_config(tmp_path / "node", port=free_port(), pacs_port=pacs.port, stability_s=1)
        jobs = JobStore(load_config(config).storage.database)
        node["process"] = serve(config, log)
        storescu(load_config(config).node.port, study)
        wait_for(killed.is_set, 120, "the PACS to receive the second result object")
        node["process"].wait(10)
        (first, in_flight) = [uid for _, _, uid in pacs.receipts[:2]]

        node["process"] = serve(config, log)
        try:
            job = wait_for(lambda: next(iter(jobs.jobs(states=["done", "failed"])), None), 120, "the job to end")
        finally:
            node["process"].send_signal(signal.SIGTERM)
            assert node["process"].wait(60) == 0, log.read_text()[-3000:]
        assert job.state == "done", job.reason
        counts = pacs.counts()
        outbox = jobs.outbox(job.id)
        assert len(outbox) == 3 and {item.sop_instance_uid for item in outbox} == set(counts)  # the same UIDs
        assert counts[first] == 1, "an object the PACS had acknowledged was sent again"
        assert counts[in_flight] == 2  # the one in flight at the kill: at least once
        assert sum(counts.values()) == len(outbox) + 1
