"""``examhook erase``: remove every trace of one learner that examhook holds in Redis.

A learner is found by ``user.id`` or ``user.email`` in stored bodies. For each of their
events this removes the body, the dedup record, the releases record, every delivery
record and attempt log, failure entries, and queued or scheduled jobs; and any rejected
body of theirs (see :func:`rejected_body_matches`). What was already delivered to
destinations (LMS, email, database, files) is outside Redis and is not touched: the report
says so.

Matching is exact: ``user.id`` equal, ``user.email`` equal ignoring case; ``usr_1`` never
finds ``usr_12``. A dry run reports exactly what the erase would remove (the same keys,
queue entries, failure entries and rejected bodies, each counted once and only if present),
so its counts equal the real erase's unless the data changes in between (a fan-out job that
starts meanwhile is left to find the bodies gone).
"""

from __future__ import annotations

import re
from collections.abc import Awaitable
from typing import Any, cast

import msgspec
from redis.asyncio import Redis

from shared.contract import Keys, job_serializer
from shared.inspection import fanout_batches
from shared.payload import decoder
from shared.store import Rejected, Store, lua_script


class ErasureReport(msgspec.Struct):
    events: list[str]
    keys_deleted: int
    queued_jobs_removed: int
    failures_removed: int
    rejected_removed: int
    dry_run: bool = False
    not_covered: str = (
        "copies already delivered to destinations (http, email, postgres, file integrations) "
        "are outside examhook's Redis and must be erased there"
    )


async def erase_learner(
    store: Store, *, user_id: str | None = None, email: str | None = None, dry_run: bool = False
) -> ErasureReport:
    if not user_id and not email:
        raise ValueError("give a user id or an email address")
    redis, keys = store.redis, store.keys
    wanted_email = email.casefold() if email else None

    events: dict[str, tuple[str, str]] = {}  # event id -> (attempt id, exam id)
    async for key in redis.scan_iter(match=keys.event_pattern, count=1000):
        body = await redis.get(key)
        if body is None:
            continue
        try:
            event = decoder.decode(body)
        except msgspec.DecodeError:
            continue
        if (user_id and event.user.id == user_id) or (
            wanted_email and event.user.email.casefold() == wanted_email
        ):
            events[key.decode().rsplit(":", 1)[1]] = (event.attempt.id, event.exam.id)

    rejected_ids = await _matching_rejected(store, user_id, wanted_email)

    to_delete: list[str] = []
    queue_members: list[str] = []
    failure_members: list[str] = []
    exam_members: list[tuple[str, str]] = []
    for event_id, (attempt_id, exam_id) in events.items():
        to_delete += [keys.event(event_id), keys.seen(event_id), keys.releases(attempt_id)]
        exam_members.append((keys.exam(exam_id), event_id))
        for pattern in keys.per_pair_patterns(event_id):
            to_delete += [k.decode() async for k in redis.scan_iter(match=pattern, count=1000)]
        # the event's retry jobs (P:E:I)
        async for job_key in redis.scan_iter(match=keys.job(keys.deliver_job_id(event_id, "*")), count=1000):
            job_id = job_key.decode().removeprefix(Keys.ARQ_JOB)
            queue_members.append(job_id)
            to_delete += [job_key.decode(), keys.job_retry(job_id)]
        failure_members += [
            m.decode()
            for m in await redis.zrange(keys.failures, 0, -1)
            if m.decode().startswith(f"{event_id}:")
        ]
        # retry jobs whose job key already expired still sit in the queue
        queue_members += [
            m.decode()
            for m in await redis.zrange(keys.queue, 0, -1)
            if m.decode().startswith(keys.deliver_job_id(event_id, ""))
        ]
    to_delete += [keys.rejected_item(r) for r in rejected_ids]
    batches = await _fanout_jobs_carrying(store, set(events)) if events else []
    # each counted once, and only what is there: what DEL and ZREM will count
    to_delete = list(dict.fromkeys(to_delete))
    queue_members = await _present(redis, keys.queue, queue_members)
    failure_members = await _present(redis, keys.failures, failure_members)
    rejected_ids = await _present(redis, keys.rejected, rejected_ids)

    if dry_run:
        existing = int(await redis.exists(*to_delete)) if to_delete else 0
        return ErasureReport(
            sorted(events),
            existing,
            len(queue_members) + len(batches),
            len(failure_members),
            len(rejected_ids),
            dry_run=True,
        )

    deleted = queued = failures = rejected = 0
    async with redis.pipeline(transaction=True) as pipe:
        if to_delete:
            pipe.delete(*to_delete)
        if queue_members:
            pipe.zrem(keys.queue, *queue_members)
        if failure_members:
            pipe.zrem(keys.failures, *failure_members)
        for exam_key, event_id in exam_members:
            pipe.zrem(exam_key, event_id)
        if events:
            pipe.zrem(keys.unmatched, *events)
        if rejected_ids:
            pipe.zrem(keys.rejected, *rejected_ids)
        results = await pipe.execute() if (to_delete or rejected_ids or queue_members) else []
    index = 0
    if to_delete:
        deleted, index = int(results[0]), 1
    if queue_members:
        queued, index = int(results[index]), index + 1
    if failure_members:
        failures, index = int(results[index]), index + 1
    index += len(exam_members)
    if events:
        index += 1
    if rejected_ids:
        rejected = int(results[index])
    # a fan-out job that also carries other learners' events goes back without these
    rewrite = redis.register_script(lua_script("rewrite_job"))
    payload_ttl = store.payload_ttl_ms
    for job_id, raw, job, keep in batches:
        new_id = keys.new_fanout_job_id(len(keep)) if keep else ""
        done = await rewrite(
            keys=[
                keys.queue,
                keys.job(job_id),
                keys.in_progress(job_id),
                keys.job_retry(job_id),
                keys.job(new_id),
            ],
            args=[job_id, raw, new_id, job_serializer({**job, "a": [keep, *job["a"][1:]]}), payload_ttl],
        )
        queued += int(done)  # 0: it started meanwhile (README, Personal data)
    return ErasureReport(sorted(events), deleted, queued, failures, rejected)


async def _fanout_jobs_carrying(
    store: Store, event_ids: set[str]
) -> list[tuple[str, bytes, dict[str, Any], list[Any]]]:
    """Queued ``handle_events`` jobs that carry any of these events, not yet started:
    (job id, job as stored, job decoded, the entries to keep)."""
    redis, keys = store.redis, store.keys
    found = []
    async for job_id, raw, job in fanout_batches(redis, keys):
        if await redis.exists(keys.in_progress(job_id)):
            continue  # a running job finds the bodies gone (README, Personal data)
        entries = job["a"][0]
        keep = [entry for entry in entries if entry[0] not in event_ids]
        if len(keep) < len(entries):
            found.append((job_id, raw, job, keep))
    return found


async def _present(redis: Redis, key: str, members: list[str]) -> list[str]:
    """``members`` (each once) that are in the sorted set ``key``."""
    unique = list(dict.fromkeys(members))
    if not unique:
        return []
    scores = await cast(Awaitable[list[float | None]], redis.zmscore(key, unique))
    return [m for m, score in zip(unique, scores, strict=True) if score is not None]


async def _matching_rejected(store: Store, user_id: str | None, email: str | None) -> list[str]:
    """The quarantined bodies of this learner (see :func:`rejected_body_matches`)."""
    redis, keys = store.redis, store.keys
    found = []
    for raw_id in await redis.zrange(keys.rejected, 0, -1):
        reject_id = raw_id.decode()
        raw = await redis.get(keys.rejected_item(reject_id))
        if raw is None:
            continue
        try:
            text = msgspec.json.decode(raw, type=Rejected).body
        except msgspec.DecodeError:
            continue
        if rejected_body_matches(text, user_id, email):
            found.append(reject_id)
    return found


# Characters that can be part of an id or an address: a match must not continue into them.
_TOKEN_CHARS = r"A-Za-z0-9_.@+\-"


def rejected_body_matches(text: str, user_id: str | None, email: str | None) -> bool:
    """Is this quarantined body (text) the learner's?

    A body that is JSON (most are: they were rejected for not fitting the payload model)
    matches when any string value in it equals the user id exactly, or the address ignoring
    case (``user.id``/``user.email`` where Synap puts them, or wherever a malformed body put
    them). A body that is not JSON (truncated, not UTF-8) matches only where the id or the
    address stands as a whole token, bounded by characters that cannot be part of one
    (quotes, spaces, punctuation other than ``. _ - + @``): ``"usr_1"`` matches ``usr_1``;
    ``usr_12``, ``xusr_1`` and ``ann@example.org.uk`` do not match ``usr_1`` or
    ``ann@example.org``. So another learner's body is never taken for theirs; what is left
    of theirs is a body mentioning them only inside a longer token, which expires with the
    quarantine (``retention.rejected_seconds``).
    """
    wanted_email = email.casefold() if email else None
    try:
        document = msgspec.json.decode(text)
    except msgspec.DecodeError:
        document = _NOT_JSON
    if document is not _NOT_JSON:
        return any(
            (user_id is not None and value == user_id)
            or (wanted_email is not None and value.casefold() == wanted_email)
            for value in _strings(document)
        )
    for needle, flags in ((user_id, 0), (email, re.IGNORECASE)):
        if needle and re.search(
            rf"(?<![{_TOKEN_CHARS}]){re.escape(needle)}(?![{_TOKEN_CHARS}])", text, flags
        ):
            return True
    return False


_NOT_JSON = object()


def _strings(value: Any) -> list[str]:
    """Every string in a decoded JSON document (keys excepted)."""
    found: list[str] = []
    stack = [value]
    while stack:
        item = stack.pop()
        if isinstance(item, str):
            found.append(item)
        elif isinstance(item, dict):
            stack.extend(item.values())
        elif isinstance(item, list):
            stack.extend(item)
    return found
