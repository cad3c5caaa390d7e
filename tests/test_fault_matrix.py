"""The fault matrix in the suite: each fault once, with all four integration types at once.

The harness is ``tests/fault_matrix.py`` (what is checked, and how); ``scripts/fault_matrix.py``
runs longer variants by hand. PostgreSQL is used when one answers (CI has one); without it the
other three types are still checked and the report says so.
"""

from __future__ import annotations

import dataclasses

import pytest

from tests.fault_matrix import SCENARIOS, run_matrix

pytestmark = pytest.mark.slow


@pytest.mark.parametrize("fault", list(SCENARIOS))
async def test_fault_matrix(fault: str, tmp_path_factory: pytest.TempPathFactory) -> None:
    """Under this fault, every event that got a 2xx reaches every integration: exactly once
    for email, postgres and file; for http a second request only where the first one's
    outcome was unknown (a hang past the timeout, a worker or Redis gone mid-send), with the
    same Idempotency-Key; an email whose outcome was unknown is never sent twice, and shows as
    such a failure; nothing else fails, the queue drains, no process ends by itself."""
    scenario = dataclasses.replace(SCENARIOS[fault], workdir=tmp_path_factory.mktemp(fault))
    report = await run_matrix(scenario)
    print("\n" + report.summary())
    assert report.accepted == scenario.events
    assert report.problems == [], report.summary()
