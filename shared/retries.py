"""Deliveries waiting for a retry (``examhook retries``): who, where, how often tried, why,
and when next; and making them due now once the destination is back.

A pair waiting for a retry is its ``deliver`` job (id ``P:E:I``) in ``P:queue``, scored by
when it is due (ms) in the future. Making it due now only lowers that score (``ZADD XX
LT``): a job that ran meanwhile or was removed is never added back, and its pair's claim
decides, as always, whether anything is sent.
"""

from __future__ import annotations

from typing import Any

import msgspec

from shared.inspection import iso
from shared.store import Store, now_ms


class _User(msgspec.Struct, gc=False):
    id: str
    name: str
    email: str


class _Exam(msgspec.Struct, gc=False):
    id: str
    name: str


class _Brief(msgspec.Struct, gc=False):
    user: _User
    exam: _Exam


_brief = msgspec.json.Decoder(_Brief)


class RetryRow(msgspec.Struct):
    event_id: str
    integration: str
    user_id: str | None
    user_name: str | None
    user_email: str | None
    exam_id: str | None
    exam_name: str | None
    attempts: int
    last_error: str
    last_attempt_at: str | None
    due_at: str | None
    due_in_seconds: float


async def _waiting(store: Store, integration: str | None) -> list[tuple[str, str, str, float]]:
    """(job id, event id, integration, due ms) of the pairs waiting for a retry, soonest first."""
    keys = store.keys
    entries = await store.redis.zrangebyscore(keys.queue, f"({now_ms()}", "+inf", withscores=True)
    out = []
    for raw, score in entries:
        job_id = raw.decode()
        if keys.is_fanout_batch(job_id):
            continue  # a fan-out job handed on for a busy lane, not a retry
        event_id, name = keys.parse_job_id(job_id)
        if name is None or (integration is not None and name != integration):
            continue
        out.append((job_id, event_id, name, score))
    return out


async def waiting_retries(store: Store, integration: str | None = None) -> list[RetryRow]:
    """Every delivery waiting for a retry (optionally of one integration), soonest first."""
    waiting = await _waiting(store, integration)
    keys = store.keys
    now = now_ms()
    rows: list[RetryRow] = []
    for start in range(0, len(waiting), 500):
        chunk = waiting[start : start + 500]
        async with store.redis.pipeline(transaction=False) as pipe:
            for _, event_id, name, _ in chunk:
                pipe.hmget(keys.pair(event_id, name), ["attempts", "last_error", "last_attempt_at"])
                pipe.get(keys.event(event_id))
            results = await pipe.execute()
        for (_, event_id, name, due), fields, body in zip(chunk, results[0::2], results[1::2], strict=True):
            attempts, last_error, last_at = (f.decode() if f is not None else None for f in fields)
            brief: Any = None
            if body is not None:
                try:
                    brief = _brief.decode(body)
                except msgspec.DecodeError:
                    brief = None
            rows.append(
                RetryRow(
                    event_id=event_id,
                    integration=name,
                    user_id=brief.user.id if brief else None,
                    user_name=brief.user.name if brief else None,
                    user_email=brief.user.email if brief else None,
                    exam_id=brief.exam.id if brief else None,
                    exam_name=brief.exam.name if brief else None,
                    attempts=int(attempts or 0),
                    last_error=last_error or "",
                    last_attempt_at=iso(last_at),
                    due_at=iso(int(due)),
                    due_in_seconds=round(max(0.0, (due - now) / 1000), 1),
                )
            )
    return rows


async def hurry(store: Store, integration: str | None = None, event_ids: list[str] | None = None) -> int:
    """Make waiting retries due now (of one integration, or of some events); returns how many."""
    waiting = await _waiting(store, integration)
    if event_ids is not None:
        wanted = set(event_ids)
        waiting = [w for w in waiting if w[1] in wanted]
    moved = 0
    now = now_ms()
    for start in range(0, len(waiting), 500):
        mapping = {job_id: now for job_id, _, _, _ in waiting[start : start + 500]}
        moved += int(await store.redis.zadd(store.keys.queue, mapping, xx=True, lt=True, ch=True))
    return moved
