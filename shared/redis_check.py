"""Does the configured Redis user have every permission examhook needs?

An ACL that lets examhook write ``P:*`` but not arq's ``arq:*`` keys would make every event
fail to queue (the receiver answers 503) or every job fail to run. Rather than find out under
a cohort's load, ``receive`` and ``worker`` check at start (and ``check-config --redis`` on
demand) by trying each kind of command on a key of each key space examhook uses, under a
probe id that nothing else uses, and removing what they wrote.
"""

from __future__ import annotations

import secrets
from collections.abc import Awaitable, Callable
from typing import Any

from redis.asyncio import Redis
from redis.exceptions import NoPermissionError, ResponseError

from shared.contract import Keys

# what the ACL needs, said once (README, "Redis")
ACL_ADVICE = (
    "grant the user ~{prefix}:* ~arq:* and +@all -@dangerous"
    " (at least +@read +@write +@scripting +@transaction +@connection)"
)


async def missing_permissions(redis: Redis, keys: Keys) -> list[str]:
    """One line per permission the user lacks (empty when all is well). Connection errors are
    raised (the caller decides whether an unreachable Redis is fatal)."""
    probe = f"{keys.prefix}:permission-check-{secrets.token_hex(4)}"
    job_id = f"{keys.prefix}:permission-check-{secrets.token_hex(4)}"
    checks: list[tuple[str, Callable[[], Awaitable[Any]]]] = [
        (f"SET/DEL on {keys.prefix}:* keys", lambda: _set_del(redis, probe)),
        (f"ZADD/ZREM on {keys.prefix}:* keys", lambda: _zadd_zrem(redis, f"{probe}:z")),
        (f"HSET/DEL on {keys.prefix}:* keys", lambda: _hset_del(redis, f"{probe}:h")),
        (f"SET/DEL on arq's job keys ({keys.job(job_id)})", lambda: _set_del(redis, keys.job(job_id))),
        (
            f"SET/DEL on arq's in-progress keys ({keys.in_progress(job_id)})",
            lambda: _set_del(redis, keys.in_progress(job_id)),
        ),
        (
            f"INCR/DEL on arq's retry keys ({keys.job_retry(job_id)})",
            lambda: _incr_del(redis, keys.job_retry(job_id)),
        ),
        ("EVALSHA/SCRIPT LOAD (Lua scripts)", lambda: _script(redis, probe)),
        ("WATCH/MULTI/EXEC (transactions)", lambda: _transaction(redis, f"{probe}:t")),
    ]
    problems = []
    for what, check in checks:
        try:
            await check()
        except NoPermissionError as exc:
            problems.append(f"the Redis user may not use {what}: {exc}")
        except ResponseError as exc:
            if "NOPERM" in str(exc) or "no permissions" in str(exc):
                problems.append(f"the Redis user may not use {what}: {exc}")
            else:
                raise
    return problems


def advice(keys: Keys) -> str:
    return ACL_ADVICE.format(prefix=keys.prefix)


async def _set_del(redis: Redis, key: str) -> None:
    await redis.set(key, b"1", px=10_000)
    await redis.delete(key)


async def _incr_del(redis: Redis, key: str) -> None:
    await redis.incr(key)
    await redis.delete(key)


async def _zadd_zrem(redis: Redis, key: str) -> None:
    await redis.zadd(key, {"probe": 1})
    await redis.zrem(key, "probe")


async def _hset_del(redis: Redis, key: str) -> None:
    await redis.hset(key, "probe", "1")  # type: ignore[misc]
    await redis.delete(key)


async def _script(redis: Redis, key: str) -> None:
    script = redis.register_script(
        "#!lua\nredis.call('SET', KEYS[1], '1', 'PX', 10000) return redis.call('DEL', KEYS[1])"
    )
    await script(keys=[key])


async def _transaction(redis: Redis, key: str) -> None:
    async with redis.pipeline(transaction=True) as pipe:
        await pipe.watch(key)
        pipe.multi()  # type: ignore[no-untyped-call]
        pipe.set(key, b"1", px=10_000)
        pipe.delete(key)
        await pipe.execute()
