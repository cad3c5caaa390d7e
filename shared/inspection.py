"""What operators see and repair: queue counts, failures, the rejected quarantine.

Used by the CLI (``examhook queue``, ``failures``, ``rejected``) and the admin pages.
"""

from __future__ import annotations

import time
from collections.abc import AsyncIterator, Awaitable
from datetime import UTC, datetime
from typing import Any, cast

import msgspec
from redis.asyncio import Redis

from shared.contract import Keys, job_deserializer, pair_member, split_pair_member
from shared.payload import decoder
from shared.store import Rejected, Store, now_ms


def iso(ms: int | str | bytes | None) -> str | None:
    if ms in (None, b"", ""):
        return None
    assert ms is not None
    return (
        datetime.fromtimestamp(int(ms) / 1000, tz=UTC)
        .isoformat(timespec="milliseconds")
        .replace("+00:00", "Z")
    )


async def fanout_batches(redis: Redis, keys: Keys) -> AsyncIterator[tuple[str, bytes, dict[str, Any]]]:
    """``handle_events`` jobs in the queue (running ones included): (job id, job as stored,
    job decoded; its events are ``job["a"][0]``, one ``[E, attempt_id, released_ms]`` each)."""
    for raw_id in await redis.zrange(keys.queue, 0, -1):
        job_id = raw_id.decode()
        if keys.is_fanout_batch(job_id) and (raw := await redis.get(keys.job(job_id))) is not None:
            yield job_id, raw, job_deserializer(raw)


async def queued_fanout_jobs(redis: Redis, keys: Keys) -> dict[str, list[str]]:
    """Fan-out jobs in the queue (running ones included) and the event ids each carries."""
    jobs = {
        job_id: [entry[0] for entry in job["a"][0]] async for job_id, _, job in fanout_batches(redis, keys)
    }
    for raw_id in await redis.zrange(keys.queue, 0, -1):
        job_id = raw_id.decode()
        if not keys.is_fanout_batch(job_id) and keys.fanout_job_events(job_id):
            jobs[job_id] = [keys.parse_job_id(job_id)[0]]  # the one-event form: the id names it
    return jobs


# redis-py types its commands as "result or awaitable of it"; the asyncio client awaits.
async def _hgetall(redis: Redis, key: str) -> dict[bytes, bytes]:
    return await cast(Awaitable[dict[bytes, bytes]], redis.hgetall(key))


async def _lrange(redis: Redis, key: str) -> list[bytes]:
    return await cast(Awaitable[list[bytes]], redis.lrange(key, 0, -1))


class FailureRow(msgspec.Struct):
    event_id: str
    integration: str
    attempts: int
    last_error: str
    first_attempt_at: str | None
    last_attempt_at: str | None
    attempt_id: str
    exam_id: str | None = None
    total_attempts: int = 0
    # who is affected (None once the body has expired)
    user_id: str | None = None
    user_name: str | None = None
    user_email: str | None = None
    exam_name: str | None = None


class Inspector:
    def __init__(self, store: Store) -> None:
        self.store = store
        self.redis = store.redis
        self.keys = store.keys

    # -- counts ------------------------------------------------------------------------

    async def counts(self) -> dict[str, Any]:
        k = self.keys
        now = now_ms()
        entries = await self.redis.zrange(k.queue, 0, -1, withscores=True)
        in_progress_ids = {
            k.job_id_in_progress(key.decode())
            async for key in self.redis.scan_iter(match=k.in_progress_pattern, count=1000)
        }
        per: dict[str, dict[str, int]] = {}

        def bucket(name: str) -> dict[str, int]:
            return per.setdefault(name, {"queued": 0, "in_progress": 0, "scheduled_retries": 0, "failed": 0})

        totals = {"queued": 0, "in_progress": 0, "scheduled_retries": 0}
        for raw_id, score in entries:
            job_id = raw_id.decode()
            _, integration = k.parse_job_id(job_id)
            name = integration or "(fan-out)"
            if job_id in in_progress_ids:
                state = "in_progress"
            elif score > now:
                state = "scheduled_retries"
            else:
                state = "queued"
            # a fan-out job counts as the events it carries; a retry job as its one pair
            count = 1 if integration else k.fanout_job_events(job_id)
            totals[state] += count
            bucket(name)[state] += count
        failures = await self.redis.zrange(k.failures, 0, -1)
        for member in failures:
            _, integration = split_pair_member(member.decode())
            bucket(integration)["failed"] += 1
        oldest = await self.redis.zrangebyscore(k.queue, "-inf", now, start=0, num=1, withscores=True)
        stats = {key.decode(): int(v) for key, v in (await _hgetall(self.redis, k.stats)).items()}
        return {
            **totals,
            "failed": len(failures),
            "rejected": await self.redis.zcard(k.rejected),
            "unmatched": await self.redis.zcard(k.unmatched),
            "oldest_queued_age_seconds": round((now - oldest[0][1]) / 1000, 3) if oldest else 0,
            "per_integration": dict(sorted(per.items())),
            "totals_since_start": stats,
        }

    async def integration_stored(self, name: str) -> bool:
        """Does the stored data know an integration of this name (``[a-z0-9-]+``): a failure,
        a running worker's configuration, a delivery record or a delivered marker?"""
        k = self.keys
        async for _ in self.redis.zscan_iter(k.failures, match=f"*:{name}", count=1000):
            return True
        for raw in await cast(Awaitable[list[bytes]], self.redis.hvals(k.workers)):
            try:
                entry = msgspec.json.decode(raw)
            except msgspec.DecodeError:
                continue
            if isinstance(entry, dict) and name in entry.get("integrations", ()):
                return True
        for pattern in (k.pair_pattern("*", name), k.delivered("*", name)):
            async for _ in self.redis.scan_iter(match=pattern, count=1000):
                return True
        return False

    # -- failures ----------------------------------------------------------------------

    async def failure_pairs(
        self,
        event_ids: list[str] | None = None,
        integration: str | None = None,
    ) -> list[tuple[str, str]]:
        """Failed (event, integration) pairs, newest first, optionally narrowed."""
        members = await self.redis.zrevrange(self.keys.failures, 0, -1)
        pairs = [split_pair_member(m.decode()) for m in members]
        if event_ids is not None:
            wanted = set(event_ids)
            pairs = [p for p in pairs if p[0] in wanted]
        if integration is not None:
            pairs = [p for p in pairs if p[1] == integration]
        return pairs

    async def failures(
        self,
        integration: str | None = None,
        exam_id: str | None = None,
        older_than_seconds: float | None = None,
        newer_than_seconds: float | None = None,
    ) -> list[FailureRow]:
        pairs = await self.failure_pairs(integration=integration)
        if not pairs:
            return []
        async with self.redis.pipeline(transaction=False) as pipe:
            for event_id, name in pairs:
                pipe.hgetall(self.keys.pair(event_id, name))
                pipe.get(self.keys.event(event_id))
            results = await pipe.execute()
        rows: list[FailureRow] = []
        now = time.time()
        for (event_id, name), state, body in zip(pairs, results[0::2], results[1::2], strict=True):
            if not state:  # expired
                continue
            fields = {key.decode(): value.decode() for key, value in state.items()}
            event_exam = None
            decoded = None
            if body:
                try:
                    decoded = decoder.decode(body)
                    event_exam = decoded.exam.id
                except msgspec.DecodeError:
                    event_exam = None
            if exam_id is not None and event_exam != exam_id:
                continue
            last = int(fields.get("last_attempt_at") or 0) / 1000
            if older_than_seconds is not None and now - last < older_than_seconds:
                continue
            if newer_than_seconds is not None and now - last > newer_than_seconds:
                continue
            rows.append(
                FailureRow(
                    event_id=event_id,
                    integration=name,
                    attempts=int(fields.get("attempts", 0)),
                    last_error=fields.get("last_error", ""),
                    first_attempt_at=iso(fields.get("first_attempt_at")),
                    last_attempt_at=iso(fields.get("last_attempt_at")),
                    attempt_id=fields.get("attempt_id", ""),
                    exam_id=event_exam,
                    total_attempts=int(fields.get("total_attempts", 0)),
                    user_id=decoded.user.id if decoded else None,
                    user_name=decoded.user.name if decoded else None,
                    user_email=decoded.user.email if decoded else None,
                    exam_name=decoded.exam.name if decoded else None,
                )
            )
        return rows

    async def event_detail(self, event_id: str, integration: str | None = None) -> dict[str, Any] | None:
        """Everything known about one event: payload, and per integration its state and attempts."""
        k = self.keys
        body = await self.redis.get(k.event(event_id))
        pattern = k.pair_pattern(event_id, integration or "*")
        pair_keys = sorted([key.decode() async for key in self.redis.scan_iter(match=pattern, count=1000)])
        if body is None and not pair_keys:
            return None
        deliveries = []
        for pair_key in pair_keys:
            name = pair_key.rsplit(":", 1)[1]
            state = {key.decode(): v.decode() for key, v in (await _hgetall(self.redis, pair_key)).items()}
            attempts = [msgspec.json.decode(a) for a in await _lrange(self.redis, k.attempts(event_id, name))]
            for attempt in attempts:
                attempt["at"] = iso(attempt["at"])
            failed = await self.redis.zscore(k.failures, pair_member(event_id, name)) is not None
            deliveries.append(
                {
                    "integration": name,
                    "status": "failed" if failed else state.get("status"),
                    "attempts": int(state.get("attempts", 0)),
                    "first_attempt_at": iso(state.get("first_attempt_at")),
                    "last_attempt_at": iso(state.get("last_attempt_at")),
                    "last_error": state.get("last_error", ""),
                    "attempt_id": state.get("attempt_id"),
                    "attempt_log": attempts,
                }
            )
        payload: Any = None
        if body is not None:
            try:
                payload = msgspec.json.decode(body)
            except msgspec.DecodeError:
                payload = body.decode("utf-8", "replace")
        return {"event_id": event_id, "payload": payload, "deliveries": deliveries}

    async def retry(self, pairs: list[tuple[str, str]]) -> tuple[int, int]:
        return await self.store.requeue_failures(pairs)

    async def purge(self, pairs: list[tuple[str, str]]) -> int:
        """Forget failed pairs: their failure record, state, attempt log and queued job."""
        return await self.store.purge_failures(pairs)

    # -- rejected ----------------------------------------------------------------------

    async def rejected(self) -> list[Rejected]:
        ids = await self.redis.zrevrange(self.keys.rejected, 0, -1)
        if not ids:
            return []
        raw = await self.redis.mget([self.keys.rejected_item(i.decode()) for i in ids])
        return [msgspec.json.decode(r, type=Rejected) for r in raw if r]

    async def rejected_one(self, reject_id: str) -> Rejected | None:
        raw = await self.redis.get(self.keys.rejected_item(reject_id))
        return msgspec.json.decode(raw, type=Rejected) if raw else None

    async def missing_rejected(self, reject_ids: list[str]) -> list[str]:
        """The ids among ``reject_ids`` that name no quarantined body."""
        if not reject_ids:
            return []
        present = await self.redis.mget([self.keys.rejected_item(i) for i in reject_ids])
        return [i for i, raw in zip(reject_ids, present, strict=True) if raw is None]

    async def purge_rejected(self, reject_ids: list[str] | None = None) -> int:
        if reject_ids is None:
            reject_ids = [i.decode() for i in await self.redis.zrange(self.keys.rejected, 0, -1)]
        if not reject_ids:
            return 0
        async with self.redis.pipeline(transaction=True) as pipe:
            pipe.zrem(self.keys.rejected, *reject_ids)
            pipe.delete(*(self.keys.rejected_item(i) for i in reject_ids))
            removed, _ = await pipe.execute()
        return int(removed)
