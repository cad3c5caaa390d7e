"""Log helpers: repeated warnings are rate-limited and say how many were left out."""

from __future__ import annotations

import logging

import pytest

from shared.logs import Repeats


def test_a_repeating_warning_is_logged_once_per_period_with_the_count_left_out(
    caplog: pytest.LogCaptureFixture,
) -> None:
    """The first warning of a kind goes out; the same kind again within the period does not;
    the next one after the period carries ``similar_left_out``; other kinds are independent."""
    now = [100.0]
    repeats = Repeats(every=30.0, clock=lambda: now[0])
    logger = logging.getLogger("examhook.test")
    with caplog.at_level(logging.WARNING, logger="examhook.test"):
        for _ in range(20):
            repeats.warn(logger, "redis error", {"error": "OOM"})
        repeats.warn(logger, "another kind", {})
        now[0] += 30.0
        repeats.warn(logger, "redis error", {"error": "OOM"})
    lines = [(r.getMessage(), getattr(r, "similar_left_out", 0)) for r in caplog.records]
    assert lines == [("redis error", 0), ("another kind", 0), ("redis error", 19)]
