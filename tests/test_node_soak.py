"""kill -9 soak of `lobevol serve` and its worker, and 16 concurrent senders (tests/soak.py).

Every acknowledged study must end with exactly one set of results at the PACS,
which counts every C-STORE. ``benchmarks/soak.py`` runs the same soak longer.
"""
from __future__ import annotations

import pytest

from tests.soak import POINTS, Soak

pytestmark = [pytest.mark.integration, pytest.mark.slow]


def test_kill_9_soak_and_16_concurrent_senders_end_with_one_set_of_results_per_study(tmp_path):
    lines: list[str] = []
    report = Soak(tmp_path, seed=22, say=lines.append).run(rounds=2 * len(POINTS), senders=16)
    story = "\n".join([*lines, report.summary()])
    assert report.ok, story
    assert report.studies == 16 + 2 * len(POINTS), story
    assert sum(report.kills.values()) == 2 * len(POINTS), story
    assert report.pacs_outages == 3 and report.kills["analysing/worker"] == 1, story
    # At-least-once: an object is received twice only when the node was killed with it in flight.
    assert report.resent_same_uid <= report.kills["sending/node"], story
