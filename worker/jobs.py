"""The arq job functions. Thin: the work is in :class:`worker.delivery.Deliverer`.

arq deletes a job that raises anything but ``Retry`` (a timeout included), which would
silently drop an accepted event. So every job runs under a deadline shorter than arq's
job timeout, and a timeout, a Redis outage or an unexpected error becomes ``Retry``: the
job stays queued and runs again; the pair's records make the next run safe.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable
from typing import Any, TypeVar

from arq import Retry

from worker.delivery import Deliverer

log = logging.getLogger("examhook.worker")

T = TypeVar("T")

# How soon a job interrupted by an outage or an error runs again.
RERUN_SECONDS = 2.0


def _deadline(ctx: dict[str, Any]) -> float:
    """When this run must end: examhook gives up on it (and keeps the job) before arq would
    (shared/timing.py)."""
    deliverer: Deliverer = ctx["deliverer"]
    return asyncio.get_running_loop().time() + deliverer.budget.deadline


async def _guarded(ctx: dict[str, Any], job: str, deadline: float, work: Awaitable[T]) -> T:
    try:
        async with asyncio.timeout_at(deadline):
            return await work
    except Retry:
        raise
    except TimeoutError:
        log.warning("job ran out of time; it will run again", extra={"job": job})
    except Exception as exc:  # Redis away, or a bug: keep the job rather than lose the event
        log.warning("job interrupted (%s); it will run again", exc.__class__.__name__, extra={"job": job})
    raise Retry(defer=RERUN_SECONDS)


async def handle_events(
    ctx: dict[str, Any], events: list[tuple[str, str, int]], integration: str | None = None
) -> str:
    deliverer: Deliverer = ctx["deliverer"]
    deadline = _deadline(ctx)
    return await _guarded(
        ctx, "handle_events", deadline, deliverer.handle_events(events, integration, deadline=deadline)
    )


async def deliver(ctx: dict[str, Any], event_id: str, integration: str) -> str:
    deliverer: Deliverer = ctx["deliverer"]
    deadline = _deadline(ctx)
    outcome = await _guarded(
        ctx, "deliver", deadline, deliverer.deliver(event_id, integration, deadline=deadline)
    )
    if outcome.state in ("retry", "waiting") and outcome.retry_in is not None:
        # arq puts the same job back in the queue, due after the backoff (or when the pair's
        # lane should have room, or its lock expires: then no attempt was spent)
        raise Retry(defer=outcome.retry_in)
    return outcome.state
