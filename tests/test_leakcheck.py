"""The suite-wide leak check itself (tests/leakcheck.py): every way product output is
collected is live, and a leak in it is found and reported masked."""

from __future__ import annotations

import json
import logging
import secrets
from pathlib import Path

import pytest

from tests import leakcheck
from tests.conftest import _COLLECTOR, clean_env
from tests.test_cli import examhook, invoke


@pytest.fixture
def collector(request: pytest.FixtureRequest) -> leakcheck.Collector:
    found = request.config.stash.get(_COLLECTOR, None)
    assert found is not None, "the leak check is not installed"
    return found


def texts(collector: leakcheck.Collector, origin: str) -> list[tuple[list[str], str]]:
    return [(s.argv, s.path.read_text()) for s in collector.sources() if s.origin == origin]


async def test_every_kind_of_product_output_is_collected(
    collector: leakcheck.Collector, tmp_path: Path
) -> None:
    """An `examhook` process's stdout and stderr (and the secrets of the configuration it
    loaded), a CliRunner invocation's output, and a product log record all reach the
    collector; a test's own log records do not."""
    password = "leakcheck-" + secrets.token_hex(4)
    env = clean_env(EXAMHOOK_BASIC_AUTH_USER="u", EXAMHOOK_BASIC_AUTH_PASSWORD=password)
    done = await examhook(
        "check-config", "--json", "--config", str(tmp_path / "missing.toml"), env=env, cwd=tmp_path
    )
    assert done.code == 2
    assert any("missing.toml" in text for _, text in texts(collector, "stderr"))
    ran = await examhook("check-config", env=env, cwd=tmp_path)
    assert ran.code == 0
    assert any(
        argv[-1:] == ["check-config"] and "configuration OK" in text
        for argv, text in texts(collector, "stdout")
    )
    assert password in collector.all_secrets()  # what the child process loaded

    marker = "runner-" + secrets.token_hex(4)
    invoke("check-config", "--config", str(tmp_path / f"{marker}.toml"))
    assert any(marker in text for _, text in texts(collector, "stderr"))

    product, own = "product-" + secrets.token_hex(4), "own-" + secrets.token_hex(4)
    logging.getLogger("examhook.ingest").info("a line", extra={"marker": product})
    logging.getLogger("tests.mine").warning(own)
    [(_, log)] = texts(collector, "log")
    assert product in log and own not in log


def test_a_leak_is_found_and_reported_masked(tmp_path: Path) -> None:
    """Planted in a fresh collector's transcripts: a configured secret, the sample learner's
    name and an unmasked learner address are found; a masked address, a configured sender
    address and learner data on a learner view's stdout (`report`) are not."""
    planted = leakcheck.Collector(tmp_path)
    planted.secrets.add("planted-secret-123")
    planted.addresses.add("results@example.org")
    (tmp_path / "inprocess.log").write_text('{"msg": "x", "pw": "planted-secret-123"}\n')
    (tmp_path / "1.argv.json").write_text(json.dumps(["python", "-m", "cli.main", "worker"]))
    (tmp_path / "1.stderr").write_text(
        "delivery to Ada Lovelace <learner7@example.org> failed; l***@example.org; from results@example.org\n"
    )
    (tmp_path / "2.argv.json").write_text(
        json.dumps(["/venv/bin/python3", "/venv/bin/examhook", "report", "--exam", "x"])
    )
    (tmp_path / "2.stdout").write_text("Ada Lovelace  learner7@example.org\n")
    found = leakcheck.findings(planted)
    assert sorted((f.kind, f.value, f.source.origin) for f in found) == [
        ("learner address", "learner7@example.org", "stderr"),
        ("learner name", "Ada Lovelace", "stderr"),
        ("secret", "planted-secret-123", "log"),
    ]
    report = "\n".join(map(str, found))
    assert "planted-secret-123" not in report and "pl***" in report
    assert "`examhook worker`" in report
