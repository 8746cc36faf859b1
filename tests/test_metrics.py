"""Counters and the limit on how often an event is logged (a tier's failures, a server's refused writes)."""

from __future__ import annotations

import logging

from kvstore.metrics import LogLimit
from kvstore.tiers.base import RefusalLog


def test_a_log_limit_reports_the_events_it_held_back_with_the_next_line(monkeypatch):
    now = [100.0]
    monkeypatch.setattr("kvstore.metrics.time.monotonic", lambda: now[0])
    limit = LogLimit(10.0)
    assert limit.due() == 1  # the first event is logged at once
    assert [limit.due(), limit.due(3)] == [0, 0]  # within the interval: held back, counted
    now[0] += 10.0
    assert limit.due() == 5  # the next line reports these and the held ones
    assert limit.due() == 0


def test_refusals_of_one_reason_do_not_hide_another(caplog):
    refusals = RefusalLog(logging.getLogger("kvstore.tiers.test"), "test")
    with caplog.at_level(logging.WARNING, logger="kvstore.tiers.test"):
        refusals.refused(2, "too large")
        refusals.refused(1, "too large")  # held back
        refusals.refused(1, "quota")
    assert [r.getMessage() for r in caplog.records] == ["test tier: the server refused 2 blocks: too large",
                                                        "test tier: the server refused 1 block: quota"]
