"""Redis operations both sides perform, each one round trip (mostly one Lua script).

The receiver calls :meth:`Store.accept_batch` and :meth:`Store.quarantine`; the worker
:meth:`Store.claim` and :meth:`Store.record`; the CLI and admin pages the rest
(through :mod:`shared.inspection`).
"""

from __future__ import annotations

import secrets
import time
from dataclasses import dataclass
from importlib.resources import files
from typing import Any

import msgspec
from redis.asyncio import Redis
from redis.commands.core import AsyncScript
from redis.exceptions import NoScriptError, ResponseError

from shared.contract import (
    DELIVER,
    HANDLE_EVENTS,
    MAX_EVENTS_PER_JOB,
    Keys,
    encode_job,
    fanout_entry,
    fanout_job_template,
)
from shared.contract import event_id as identify
from shared.contract import released_ms as release_time
from shared.payload import ExamResultsReleased
from shared.settings import RetentionConfig


def _script(name: str) -> str:
    return (files("shared") / "lua" / f"{name}.lua").read_text(encoding="utf-8")


def now_ms() -> int:
    return int(time.time() * 1000)


def _resp(args: list[Any]) -> bytes:
    """One command in RESP (bytes, str and int arguments)."""
    out = [b"*%d\r\n" % len(args)]
    for arg in args:
        data = arg if isinstance(arg, bytes) else str(arg).encode()
        out += (b"$%d\r\n" % len(data), data, b"\r\n")
    return b"".join(out)


@dataclass(frozen=True, slots=True)
class Incoming:
    """One decoded, identified event ready to be queued."""

    event_id: str
    attempt_id: str
    released_ms: int
    body: bytes

    @classmethod
    def of(cls, event: ExamResultsReleased, body: bytes) -> Incoming:
        """The decoded ``event`` as received in ``body``, with its identity."""
        return cls(identify(event), event.attempt.id, release_time(event), body)


@dataclass(frozen=True, slots=True)
class Claim:
    state: str
    attempts_so_far: int = 0
    interrupted: bool = False


class AttemptRecord(msgspec.Struct, omit_defaults=True):
    """One attempt's outcome, as kept in ``P:attempts:E:I`` and shown by ``failures show``."""

    attempt: int
    at: int  # epoch ms
    duration_ms: float
    outcome: str  # delivered | retry | failed
    status: str | None = None  # HTTP status, SMTP code...
    error: str | None = None
    retry_in_seconds: float | None = None


class Rejected(msgspec.Struct):
    """A body that passed authentication but was rejected (400/422), kept for inspection."""

    id: str
    received_at: int
    error: str
    detail: str
    path: str | None
    content_type: str
    body: str  # as received, decoded leniently


_attempt_encoder = msgspec.json.Encoder()


class Store:
    def __init__(self, redis: Redis, keys: Keys, retention: RetentionConfig) -> None:
        self.redis = redis
        self.keys = keys
        self.retention = retention
        self._ingest = redis.register_script(_script("ingest"))
        self._claim = redis.register_script(_script("claim"))
        self._record = redis.register_script(_script("record"))
        self._retry = redis.register_script(_script("retry"))
        self._purge = redis.register_script(_script("purge"))
        self._release = redis.register_script(
            "if redis.call('GET', KEYS[1]) == ARGV[1] then return redis.call('DEL', KEYS[1]) end return 0"
        )
        self._unmatched = redis.register_script(
            "local added = redis.call('ZADD', KEYS[1], 'NX', ARGV[1], ARGV[2])"
            " redis.call('ZREMRANGEBYSCORE', KEYS[1], '-inf', ARGV[3])"
            " if added == 1 then redis.call('HINCRBY', KEYS[2], 'unmatched', 1) end return added"
        )
        self._enqueue = redis.register_script(
            "if redis.call('SET', KEYS[1], ARGV[1], 'NX', 'PX', ARGV[2]) then"
            " redis.call('ZADD', KEYS[2], 'NX', ARGV[3], ARGV[4]) return 1 end return 0"
        )

    @property
    def payload_ttl_ms(self) -> int:
        return self.retention.payload_seconds * 1000

    @property
    def failure_ttl_ms(self) -> int:
        return self.retention.failure_seconds * 1000

    @property
    def delivered_ttl_ms(self) -> int:
        # A delivered marker outlives every way the pair could be sent again.
        r = self.retention
        return max(r.dedup_window_seconds, r.payload_seconds, r.failure_seconds) * 1000

    # -- receiver ----------------------------------------------------------------------

    async def accept_batch(self, events: list[Incoming]) -> list[bool]:
        """Queue events, in ``handle_events`` jobs; True = accepted, False = duplicate."""
        now = now_ms()
        head, tail = fanout_job_template(now)
        args: list[Any] = [
            self.keys.prefix,
            now,
            self.retention.dedup_window_seconds * 1000,
            self.payload_ttl_ms,
            self.delivered_ttl_ms,  # the newest-release marker outlives any older release's records
            MAX_EVENTS_PER_JOB,
            head,
            tail,
            secrets.token_hex(12),  # job ids from every receiver never meet
        ]
        for e in events:
            args += [
                e.event_id,
                e.attempt_id,
                e.released_ms,
                e.body,
                fanout_entry(e.event_id, e.attempt_id, e.released_ms),
            ]
        result = await self._evalsha_packed(self._ingest, args)
        return [bool(r) for r in result]

    async def _evalsha_packed(self, script: AsyncScript, args: list[Any]) -> Any:
        """``script(args=args)``, with the command packed here and sent on a pooled connection.

        The receiver's batch has five arguments per event; redis-py's general packer and
        command path cost ~12 µs per event more than this (a tenth of the receiver's CPU).
        """
        pool = self.redis.connection_pool
        connection = await pool.get_connection()
        try:
            try:
                return await _command(connection, ["EVALSHA", script.sha, 0, *args])
            except NoScriptError:
                # a restarted or another server: load the script, then once more
                sha = await _command(connection, ["SCRIPT", "LOAD", script.script])
                script.sha = sha.decode() if isinstance(sha, bytes) else sha
                return await _command(connection, ["EVALSHA", script.sha, 0, *args])
        finally:
            await pool.release(connection)

    async def quarantine(self, rejected: Rejected) -> None:
        """Keep a rejected body, bounded in count and time."""
        k = self.keys
        # scored in microseconds: bodies rejected within the same millisecond still have an
        # order, so trimming to rejected_max always drops the oldest
        cutoff = (now_ms() - self.retention.rejected_seconds * 1000) * 1000
        async with self.redis.pipeline(transaction=True) as pipe:
            pipe.set(
                k.rejected_item(rejected.id),
                msgspec.json.encode(rejected),
                px=self.retention.rejected_seconds * 1000,
            )
            pipe.zadd(k.rejected, {rejected.id: time.time_ns() // 1000})
            pipe.zremrangebyscore(k.rejected, "-inf", cutoff)
            pipe.zrange(k.rejected, 0, -(self.retention.rejected_max + 1))
            pipe.hincrby(k.stats, "rejected", 1)
            results = await pipe.execute()
        overflow = results[3]
        if overflow:
            async with self.redis.pipeline(transaction=True) as pipe:
                pipe.zrem(k.rejected, *overflow)
                pipe.delete(*(k.rejected_item(r.decode()) for r in overflow))
                await pipe.execute()

    # -- worker ------------------------------------------------------------------------

    async def claim(
        self,
        event_id: str,
        integrations: list[str],
        *,
        token: str,
        lock_ttl_ms: int,
        mode: str,
        with_body: bool,
        attempt_id: str = "",
        released_ms: int | str = "",
    ) -> tuple[bytes | None, list[Claim]]:
        """Claim pairs of one event in one round trip: (body if asked for, one Claim per name)."""
        result = await self._claim(
            args=[
                self.keys.prefix,
                event_id,
                attempt_id,
                released_ms,
                token,
                lock_ttl_ms,
                now_ms(),
                self.payload_ttl_ms,
                mode,
                "1" if with_body else "0",
                *integrations,
            ]
        )
        body = result[0] or None
        claims = [
            Claim(state.decode(), int(attempts), interrupted == b"1")
            for state, attempts, interrupted in result[1:]
        ]
        return body, claims

    async def record(
        self,
        event_id: str,
        integration: str,
        *,
        token: str,
        record: AttemptRecord,
        retry_in_ms: int = 0,
        retry_job: bytes | None = None,
        uncertain: bool = False,
    ) -> int:
        """Record one attempt's outcome (see record.lua). ``retry_job``: enqueue the pair's
        retry job, due in ``retry_in_ms``; ``uncertain``: it may have been sent (a timeout)."""
        args: list[Any] = [
            self.keys.prefix,
            event_id,
            integration,
            token,
            record.at,
            record.outcome,
            _attempt_encoder.encode(record),
            record.error or "",
            self.payload_ttl_ms,
            self.delivered_ttl_ms,
            self.failure_ttl_ms,
            "1" if uncertain else "0",
            retry_in_ms,
            retry_job or b"",
        ]
        return int(await self._record(args=args))

    async def release(self, event_id: str, integration: str, token: str) -> None:
        """Give up a pair's lock without recording an outcome (shutdown mid-attempt)."""
        await self._release(keys=[self.keys.lock(event_id, integration)], args=[token])

    async def enqueue_deliver(self, event_id: str, integration: str, *, defer_ms: int = 0) -> None:
        """Schedule the pair's ``deliver`` job unless it is already queued."""
        run_at = now_ms() + defer_ms
        job_id = self.keys.deliver_job_id(event_id, integration)
        await self._enqueue(
            keys=[f"arq:job:{job_id}", self.keys.queue],
            args=[
                encode_job(DELIVER, (event_id, integration), now_ms()),
                self.payload_ttl_ms,
                run_at,
                job_id,
            ],
        )

    async def enqueue_fanout(self, events: list[tuple[str, str, int]], *, defer_ms: int = 0) -> None:
        """Queue a new ``handle_events`` job for these events (at most MAX_EVENTS_PER_JOB)."""
        job_id = self.keys.new_fanout_job_id(len(events))
        await self._enqueue(
            keys=[f"arq:job:{job_id}", self.keys.queue],
            args=[
                encode_job(HANDLE_EVENTS, (events,), now_ms()),
                self.payload_ttl_ms,
                now_ms() + defer_ms,
                job_id,
            ],
        )

    async def record_unmatched(self, event_id: str) -> bool:
        """Note an event no integration's filter matched; False if it was noted already."""
        now = now_ms()
        added = await self._unmatched(
            keys=[self.keys.unmatched, self.keys.stats], args=[now, event_id, now - self.payload_ttl_ms]
        )
        return bool(added)

    # -- operators ---------------------------------------------------------------------

    async def requeue_failures(self, pairs: list[tuple[str, str]]) -> tuple[int, int]:
        """Queue failed pairs again; returns (queued, skipped)."""
        queued = skipped = 0
        now = now_ms()
        for start in range(0, len(pairs), 500):
            args: list[Any] = [self.keys.prefix, now, self.payload_ttl_ms]
            for event_id, integration in pairs[start : start + 500]:
                args += [event_id, integration, encode_job(DELIVER, (event_id, integration), now)]
            q, s = await self._retry(args=args)
            queued += int(q)
            skipped += int(s)
        return queued, skipped

    async def purge_failures(self, pairs: list[tuple[str, str]]) -> int:
        """Forget failed pairs; returns how many failures were removed."""
        removed = 0
        for start in range(0, len(pairs), 500):
            args: list[Any] = [self.keys.prefix]
            for event_id, integration in pairs[start : start + 500]:
                args += [event_id, integration]
            removed += int(await self._purge(args=args))
        return removed


async def _command(connection: Any, command: list[Any]) -> Any:
    try:
        await connection.send_packed_command(_resp(command))
        return await connection.read_response()
    except ResponseError:
        raise  # an error reply: the connection is fine
    except BaseException:
        # a reply may still be on its way (timeout, cancellation): never reuse the connection
        await connection.disconnect()
        raise


def new_token() -> str:
    return secrets.token_hex(8)
