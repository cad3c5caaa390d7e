"""Loading events into a fresh Redis through examhook's own write path (Store.accept_batch)."""

from __future__ import annotations

import asyncio
import json
from typing import Any

from _common import body_with_attempt, sample_body

# Events per group commit: the mean batch the receiver writes under wrk -c64 (receiver.py).
GROUP = 32


async def preload_examhook(settings_raw: dict[str, Any], n: int, tag: str = "pl") -> int:
    """Queue n distinct events exactly as the receiver's group commit does, 32 per
    round trip; returns accepted."""
    from redis.asyncio import Redis

    from shared.contract import Keys
    from shared.payload import decoder
    from shared.settings import settings_from_dict
    from shared.store import Incoming, Store

    settings = settings_from_dict(json.loads(json.dumps(settings_raw)))
    redis = Redis.from_url(settings.redis.url)
    store = Store(redis, Keys(settings.redis.prefix), settings.retention)
    template = sample_body()
    accepted = 0
    try:
        for start in range(0, n, GROUP):
            events = []
            for i in range(start, min(n, start + GROUP)):
                body = body_with_attempt(template, tag, i)
                events.append(Incoming.of(decoder.decode(body), body))
            accepted += sum(await store.accept_batch(events))
    finally:
        await redis.aclose()
    return accepted


async def preload_arq_noop(redis_url: str, n: int, queue: str) -> int:
    from arq import create_pool
    from arq.connections import RedisSettings

    pool = await create_pool(RedisSettings.from_dsn(redis_url), default_queue_name=queue)
    done = 0
    try:
        for start in range(0, n, 500):
            jobs = await asyncio.gather(
                *(pool.enqueue_job("noop") for _ in range(start, min(n, start + 500)))
            )
            done += sum(1 for j in jobs if j is not None)
    finally:
        await pool.aclose()
    return done
