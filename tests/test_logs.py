"""The text log format (``examhook dev``, a terminal): extra fields as ``key=value``."""

from __future__ import annotations

import logging

from shared.logs import TextFormatter


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
