"""Chaos: SIGKILL workers and Redis during a burst; nothing acknowledged is lost.

The harness (processes, flaky destination, retrying sender, checks, summary) is in
``tests/chaos_harness.py``; ``scripts/chaos.py`` runs longer variants by hand.

Redis runs with ``appendonly yes`` + ``appendfsync everysec``: the harness SIGKILLs the
Redis *process*, and everything Redis wrote to its AOF before answering is still in the
kernel's page cache, so a process crash loses nothing acknowledged. (``always`` only adds
safety against a machine crash, which is not simulated here; ``scripts/chaos.py --fsync
always`` runs it that way.)
"""

from __future__ import annotations

import pytest

from tests.chaos_harness import ChaosOptions, run_chaos

pytestmark = pytest.mark.slow


async def test_chaos_nothing_acknowledged_is_lost(tmp_path_factory: pytest.TempPathFactory) -> None:
    """During a paced burst of 1,200 distinct events (20 connections, the sender retrying every
    non-2xx or connection error), with a destination answering 5xx to 10% of requests and hanging
    past the timeout on 2%: worker 1 is SIGKILLed, Redis (AOF, everysec) is SIGKILLed mid-send and
    restarted on the same port and data dir after 1 s, worker 1 restarted, worker 2 SIGKILLed and
    replaced. Without any manual step: every event that got a 2xx is delivered (its Idempotency-Key
    reached the destination and its ``delivered`` marker exists), the destination saw no key of an
    event that was not accepted, every repeat follows a hang or a crash, no failure is recorded, the
    queue drains to empty and no process exited by itself."""
    options = ChaosOptions(
        events=1200, duration=20.0, concurrency=20, seed=1, workdir=tmp_path_factory.mktemp("chaos")
    )
    report = await run_chaos(options)
    print("\n" + report.summary())
    assert report.accepted == options.events
    assert report.problems == [], report.summary()


async def test_chaos_redis_outage_longer_than_job_timeout_loses_nothing(
    tmp_path_factory: pytest.TempPathFactory,
) -> None:
    """Redis SIGKILLed while a send is in flight and kept down longer than job_timeout_seconds
    (6 s > 5 s), with the same workers, sender and flaky destination: every accepted event is
    still delivered; in particular no undelivered event is left without a job that would deliver it."""
    options = ChaosOptions(
        events=800,
        duration=20.0,
        concurrency=20,
        seed=2,
        redis_outage_seconds=6.0,
        settle_timeout=25.0,
        workdir=tmp_path_factory.mktemp("chaos-outage"),
    )
    report = await run_chaos(options)
    print("\n" + report.summary())
    assert report.accepted == options.events
    assert set(report.undelivered) == set(report.orphaned), report.summary()  # nothing else is late
    assert report.orphaned == [], report.summary()
    assert report.problems == [], report.summary()
