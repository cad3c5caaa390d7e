"""The arq job functions. Thin: the work is in :class:`worker.delivery.Deliverer`."""

from __future__ import annotations

from typing import Any

from arq import Retry

from worker.delivery import Deliverer


async def handle_event(
    ctx: dict[str, Any], event_id: str, attempt_id: str | None = None, released_ms: int | None = None
) -> str:
    deliverer: Deliverer = ctx["deliverer"]
    return await deliverer.handle_event(event_id, attempt_id, released_ms)


async def deliver(ctx: dict[str, Any], event_id: str, integration: str) -> str:
    deliverer: Deliverer = ctx["deliverer"]
    outcome = await deliverer.deliver(event_id, integration)
    if outcome.state == "retry" and outcome.retry_in is not None:
        # arq puts the same job back in the queue, due after the backoff
        raise Retry(defer=outcome.retry_in)
    return outcome.state
