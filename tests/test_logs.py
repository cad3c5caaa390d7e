"""Log helpers: the text format (``examhook dev``, a terminal) renders extra fields as
``key=value``; repeated warnings are rate-limited and say how many were left out."""

from __future__ import annotations

import logging

import pytest

from shared.logs import Repeats, TextFormatter


def record(**extra: object) -> logging.LogRecord:
    made = logging.LogRecord("examhook.ingest", logging.INFO, "", 0, "queued", None, None)
    made.__dict__.update(extra)
    return made


def test_text_log_renders_extra_fields_as_key_value_pairs() -> None:
    """Nested extras (the receiver's `queued` line carries a mapping of event ids to attempt
    ids, and a list of duplicates) become flat `key=value` pairs, never a Python repr; text
    with spaces is quoted."""
    line = TextFormatter().format(
        record(
            accepted={"evt_a": "att_1", "evt_b": "att_2"},
            duplicate=["evt_c", "evt_d"],
            error="ConnectionError: refused",
            port=8080,
        )
    )
    assert "{" not in line and "[" not in line and "'" not in line, line
    assert "accepted.evt_a=att_1 accepted.evt_b=att_2" in line, line
    assert "duplicate=evt_c,evt_d" in line, line
    assert 'error="ConnectionError: refused"' in line, line
    assert line.endswith("port=8080"), line


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
