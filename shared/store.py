"""Redis operations both sides perform, each one round trip (mostly one Lua script).

The receiver calls :meth:`Store.accept_batch` and :meth:`Store.quarantine`; the worker
:meth:`Store.claim` and :meth:`Store.record`; the CLI and admin pages the rest
(through :mod:`shared.inspection`).
"""

from __future__ import annotations

import asyncio
import secrets
import time
from collections.abc import Awaitable
from dataclasses import dataclass
from importlib.resources import files
from typing import Any, Literal, cast

import hiredis
import msgspec
from redis.asyncio import Redis
from redis.commands.core import AsyncScript
from redis.exceptions import NoScriptError, ResponseError
from redis.exceptions import TimeoutError as RedisTimeoutError

from shared import contract
from shared.contract import (
    DELIVER,
    HANDLE_EVENTS,
    MAX_EVENTS_PER_JOB,
    Keys,
    encode_job,
    fanout_entry,
    fanout_job_template,
    pair_member,
)
from shared.payload import ExamResultsReleased
from shared.redis_conn import SOCKET_TIMEOUT_SECONDS
from shared.settings import RetentionConfig


def lua_script(name: str) -> str:
    """The text of ``shared/lua/<name>.lua``."""
    return (files("shared") / "lua" / f"{name}.lua").read_text(encoding="utf-8")


def now_ms() -> int:
    return int(time.time() * 1000)


def _pack(args: tuple[Any, ...]) -> bytes:
    """One command in RESP (bytes, str and int arguments), packed by hiredis (in C: half the
    time of packing it in Python, for the receiver's batches)."""
    return bytes(hiredis.pack_command(args))


def _resp(args: list[Any]) -> bytes:
    return _pack(tuple(args))


_MULTI = _pack(("MULTI",))
ScriptCall = tuple[list[Any], list[Any]]  # (keys, args) of one run of a Lua script
_EXEC = _pack(("EXEC",))


@dataclass(frozen=True, slots=True)
class Incoming:
    """One decoded, identified event ready to be queued."""

    event_id: str
    attempt_id: str
    released_ms: int
    body: bytes
    exam_id: str = ""
    started: float = 0.0  # time.perf_counter() when its request began (the receiver's metrics)

    @classmethod
    def of(
        cls, event: ExamResultsReleased, body: bytes, released_ms: int | None = None, started: float = 0.0
    ) -> Incoming:
        """The decoded ``event`` as received in ``body``, with its identity (``released_ms``:
        its release time, when the caller has it already)."""
        released = contract.released_ms(event) if released_ms is None else released_ms
        return cls(contract.event_id_of(event), event.attempt.id, released, body, event.exam.id, started)


ClaimState = Literal[
    "ok", "delivered", "superseded", "purged", "scheduled", "expired", "locked", "recovering"
]


@dataclass(frozen=True, slots=True)
class Claim:
    """What claim.lua answered for one pair."""

    state: ClaimState
    attempts_so_far: int = 0
    # a previous attempt may have reached the destination (it never recorded an outcome,
    # or its outcome was unknown)
    interrupted: bool = False
    # a previous attempt that never recorded an outcome had handed its message over
    handed_over: bool = False
    # locked / recovering: how long until the pair may be tried (ms)
    wait_ms: int = 0
    # when the receiver accepted the event (ms; 0 once unknown)
    received_ms: int = 0


@dataclass(frozen=True, slots=True)
class OutcomeRecord:
    """One attempt's outcome, as written by :meth:`Store.record_many`."""

    event_id: str
    integration: str
    token: str
    record: AttemptRecord
    retry_in_ms: int = 0
    retry_job: bytes | None = None
    maybe_sent: bool = False  # the destination may have it: the next attempt is told
    unknown: bool = False  # the outcome itself was unknown (counted)


AttemptOutcome = Literal["delivered", "retry", "failed"]
# A claim for a fan-out job's first attempt, or for a retry job's.
Mode = Literal["first", "retry"]


class AttemptRecord(msgspec.Struct, omit_defaults=True):
    """One attempt's outcome, as kept in ``P:attempts:E:I`` and shown by ``failures show``."""

    attempt: int
    at: int  # epoch ms
    duration_ms: float
    outcome: AttemptOutcome
    status: str | None = None  # HTTP status, SMTP code...
    error: str | None = None
    retry_in_seconds: float | None = None
    # the attempt's outcome was unknown (sent, no answer); see on_unknown_outcome
    outcome_unknown: bool = False


class Rejected(msgspec.Struct):
    """A body that passed authentication but was rejected (400/422), kept for inspection."""

    id: str
    received_at: int
    error: str
    detail: str
    path: str | None
    content_type: str
    body: str  # as received, decoded leniently
    # the bytes as received, kept only when ``body`` is not them (they are not UTF-8)
    raw: bytes | None = None

    @property
    def received_bytes(self) -> bytes:
        """The body exactly as received (for a record written before ``raw`` was kept and
        not UTF-8: its lenient decoding)."""
        return self.raw if self.raw is not None else self.body.encode("utf-8")


_attempt_encoder = msgspec.json.Encoder()


class Store:
    def __init__(self, redis: Redis, keys: Keys, retention: RetentionConfig) -> None:
        self.redis = redis
        self.keys = keys
        self.retention = retention
        self._ingest = redis.register_script(lua_script("ingest"))
        self._claim = redis.register_script(lua_script("claim"))
        # a fan-out job claims its events all at once: their claims share one round trip
        self._claims = _SameTurn(self, self._claim)
        self._record = redis.register_script(lua_script("record"))
        self._release = redis.register_script(lua_script("release"))
        self._keep_lock = redis.register_script(lua_script("keep_lock"))
        self._enqueue = redis.register_script(lua_script("enqueue"))
        self._unmatched = redis.register_script(lua_script("unmatched"))
        self._retry = redis.register_script(lua_script("retry"))
        self._purge = redis.register_script(lua_script("purge"))

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
        """Queue events, in ``handle_events`` jobs; True = accepted, False = duplicate.

        One MULTI/EXEC transaction, one round trip: each body with ``SET NX`` (kept out of
        the script: Lua hashes every byte of every string it is handed, a fifth of Redis's
        work per event), then ingest.lua for everything else. All or nothing where it
        matters (see ingest.lua): when this raises, no event of the batch is recorded as
        seen, so the sender's retry is accepted (and finds its body written already)."""
        k = self.keys
        now = now_ms()
        payload_ttl = self.payload_ttl_ms
        head, tail = fanout_job_template(now)
        keys: list[Any] = [k.queue, k.stats, k.exams, k.job_key_space]
        args: list[Any] = [
            now,
            self.retention.dedup_window_seconds * 1000,
            payload_ttl,
            self.delivered_ttl_ms,  # the releases record outlives any older release's records
            MAX_EVENTS_PER_JOB,
            head,
            tail,
            Keys.ARQ_JOB,
            k.fanout_job_id_prefix,
            secrets.token_hex(12),  # job ids from every receiver never meet
        ]
        packed = [_MULTI]
        for e in events:
            packed.append(_pack(("SET", k.event(e.event_id), e.body, "NX", "PX", payload_ttl)))
            keys += [k.seen(e.event_id), k.releases(e.attempt_id), k.exam(e.exam_id)]
            args += [
                e.event_id,
                e.released_ms,
                fanout_entry(e.event_id, e.attempt_id, e.released_ms),
                e.exam_id,
            ]
        script = self._ingest
        result = await self._transaction(packed, ("EVALSHA", script.sha, len(keys), *keys, *args), script)
        return [bool(r) for r in result]

    async def _transaction(self, packed: list[bytes], evalsha: tuple[Any, ...], script: AsyncScript) -> Any:
        """MULTI (already first in ``packed``), the packed commands, ``evalsha``, EXEC, sent
        at once on a pooled connection: the script's result. A refused command (an ACL, an
        OOM) aborts the whole transaction; an unknown script (a restarted or another server)
        is loaded and the transaction sent once more."""
        pool = self.redis.connection_pool
        connection = await pool.get_connection()
        try:
            for _ in range(2):
                command = (evalsha[0], script.sha, *evalsha[2:])
                replies = await _exchange(connection, [*packed, _pack(command), _EXEC])
                # MULTI's OK, one QUEUED per command, then EXEC's array (or its EXECABORT)
                refused = next((r for r in replies if isinstance(r, BaseException)), None)
                if refused is not None:
                    raise refused
                outcome = replies[-1][-1]
                if _unknown_script(outcome):
                    await _load_script(connection, script)
                    continue
                if isinstance(outcome, BaseException):
                    raise outcome
                return outcome
            raise ResponseError("NOSCRIPT: the ingest script could not be loaded")
        finally:
            await pool.release(connection)

    async def run_script(self, script: AsyncScript, keys: list[Any], args: list[Any]) -> Any:
        """``script(keys, args)``, packed here and sent on a pooled connection (see
        :meth:`scripts_at_once`): redis-py's general packer and command path cost ~12 µs more
        per event of the receiver's batch, a tenth of its CPU."""
        [reply] = await self.scripts_at_once(script, [(keys, args)])
        if isinstance(reply, BaseException):
            raise reply
        return reply

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
        mode: Mode,
        with_body: bool,
        attempt_id: str = "",
        released_ms: int | str = "",
        recovery_grace_ms: int = 5000,
    ) -> tuple[bytes | None, list[Claim]]:
        """Claim pairs of one event in one round trip: (body if asked for, one Claim per name)."""
        k = self.keys
        keys = [k.event(event_id), k.stats, k.failures, k.seen(event_id)]
        for name in integrations:
            keys += [k.pair(event_id, name), k.lock(event_id, name), k.delivered(event_id, name)]
        result = await self._claims(
            keys,
            [
                event_id,
                attempt_id,
                released_ms,
                token,
                lock_ttl_ms,
                now_ms(),
                self.payload_ttl_ms,
                mode,
                "1" if with_body else "0",
                k.releases_prefix,
                recovery_grace_ms,
                *integrations,
            ],
        )
        body, received = result[0] or None, int(result[1])
        claims = [
            Claim(state.decode(), int(attempts), interrupted == b"1", handed == b"1", int(wait), received)
            for state, attempts, interrupted, handed, wait in result[2:]
        ]
        return body, claims

    def _record_call(self, outcome: OutcomeRecord) -> tuple[list[Any], list[Any]]:
        k = self.keys
        e, i, record = outcome.event_id, outcome.integration, outcome.record
        job_id = k.deliver_job_id(e, i)
        keys = [
            k.pair(e, i),
            k.attempts(e, i),
            k.event(e),
            k.failures,
            k.stats,
            k.lock(e, i),
            k.delivered(e, i),
            k.queue,
            k.job(job_id),
        ]
        args: list[Any] = [
            pair_member(e, i),
            outcome.token,
            record.at,
            record.outcome,
            _attempt_encoder.encode(record),
            record.error or "",
            self.payload_ttl_ms,
            self.delivered_ttl_ms,
            self.failure_ttl_ms,
            "1" if outcome.maybe_sent else "0",
            outcome.retry_in_ms,
            outcome.retry_job or b"",
            job_id,
            k.releases_prefix,
            "1" if outcome.unknown else "0",
        ]
        return keys, args

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
        unknown: bool = False,
    ) -> int:
        """Record one attempt's outcome (see record.lua). ``retry_job``: enqueue the pair's
        retry job, due in ``retry_in_ms``; ``uncertain``: it may have been sent (a timeout)."""
        outcome = OutcomeRecord(
            event_id,
            integration,
            token,
            record,
            retry_in_ms,
            retry_job,
            maybe_sent=uncertain,
            unknown=unknown,
        )
        keys, args = self._record_call(outcome)
        return int(await self._record(keys=keys, args=args))

    async def record_many(self, outcomes: list[OutcomeRecord]) -> list[int | BaseException]:
        """Record several outcomes in one round trip. Each is its own atomic script: the
        answer per outcome is its attempt count, or the error Redis gave for it (a refused
        write); a lost connection raises (which of them ran is unknown: each is idempotent)."""
        calls = [self._record_call(outcome) for outcome in outcomes]
        results = await self.scripts_at_once(self._record, calls)
        return [r if isinstance(r, BaseException) else int(r) for r in results]

    async def scripts_at_once(self, script: AsyncScript, calls: list[ScriptCall]) -> list[Any]:
        """Run ``script`` once per (keys, args) call, all sent in one round trip on a pooled
        connection: each run's reply, or the error Redis gave for it. An unknown script (a
        restarted or another server) is loaded and its runs sent once more."""
        pool = self.redis.connection_pool
        connection = await pool.get_connection()
        try:
            replies: list[Any] = [None] * len(calls)
            todo = list(range(len(calls)))
            for _ in range(2):
                packed = [
                    _pack(("EVALSHA", script.sha, len(calls[n][0]), *calls[n][0], *calls[n][1])) for n in todo
                ]
                answers = await _exchange(connection, packed)
                unknown = []
                for n, answer in zip(todo, answers, strict=True):
                    if _unknown_script(answer):
                        unknown.append(n)
                    replies[n] = answer
                if not unknown:
                    break
                await _load_script(connection, script)
                todo = unknown
            return replies
        finally:
            await pool.release(connection)

    async def release(self, event_id: str, integration: str, token: str, *, may_have_sent: bool) -> bool:
        """Give up a pair's claim without recording an outcome (see release.lua)."""
        k = self.keys
        released = await self._release(
            keys=[k.lock(event_id, integration), k.pair(event_id, integration)],
            args=[token, "1" if may_have_sent else "0"],
        )
        return bool(released)

    async def keep_locks(self, locks: list[tuple[str, str, str]], ttl_ms: int) -> None:
        """Extend (or take again) the locks of pairs whose outcomes wait to be recorded:
        (event id, integration, token) each (see keep_lock.lua)."""
        async with self.redis.pipeline(transaction=False) as pipe:
            for event_id, integration, token in locks:
                lock = self.keys.lock(event_id, integration)
                await self._keep_lock(keys=[lock], args=[token, ttl_ms], client=pipe)
            await pipe.execute(raise_on_error=False)

    async def mark_handed_over(self, event_id: str, integration: str, token: str) -> None:
        """Note, before an irrevocable hand-over (an email's DATA), that this attempt is
        handing its message over: should the worker die before recording an outcome, the
        next attempt knows the message may have arrived."""
        await cast(Awaitable[int], self.redis.hset(self.keys.pair(event_id, integration), "handed", token))

    async def enqueue_jobs(self, jobs: list[tuple[str, bytes, int]]) -> int:
        """Queue arq jobs (job id, job bytes, run at ms), each unless one of that id exists."""
        if not jobs:
            return 0
        keys = [self.keys.queue, *(self.keys.job(job_id) for job_id, _, _ in jobs)]
        args: list[Any] = [self.payload_ttl_ms]
        for job_id, job, run_at in jobs:
            args += [job, run_at, job_id]
        return int(await self._enqueue(keys=keys, args=args))

    async def enqueue_deliver(self, event_id: str, integration: str, *, defer_ms: int = 0) -> None:
        """Schedule the pair's ``deliver`` job unless it is already queued."""
        now = now_ms()
        job_id = self.keys.deliver_job_id(event_id, integration)
        await self.enqueue_jobs([(job_id, encode_job(DELIVER, (event_id, integration), now), now + defer_ms)])

    async def enqueue_fanout(
        self, events: list[tuple[str, str, int]], *, integration: str | None = None, defer_ms: int = 0
    ) -> None:
        """Queue a new ``handle_events`` job for these events (at most MAX_EVENTS_PER_JOB),
        for every integration or only ``integration``."""
        now = now_ms()
        args: tuple[Any, ...] = (events,) if integration is None else (events, integration)
        job_id = self.keys.new_fanout_job_id(len(events), integration)
        await self.enqueue_jobs([(job_id, encode_job(HANDLE_EVENTS, args, now), now + defer_ms)])

    async def record_unmatched(self, event_id: str) -> bool:
        """Note an event no integration's filter matched; False if it was noted already."""
        now = now_ms()
        added = await self._unmatched(
            keys=[self.keys.unmatched, self.keys.stats], args=[now, event_id, now - self.payload_ttl_ms]
        )
        return bool(added)

    # -- operators ---------------------------------------------------------------------

    async def requeue_failures(self, pairs: list[tuple[str, str]]) -> tuple[int, int]:
        """Queue failed pairs again; returns (queued, skipped). See retry.lua."""
        queued = skipped = 0
        now = now_ms()
        k = self.keys
        for start in range(0, len(pairs), 500):
            keys: list[str] = [k.failures, k.queue]
            args: list[Any] = [now, self.payload_ttl_ms]
            for event_id, integration in pairs[start : start + 500]:
                job_id = k.deliver_job_id(event_id, integration)
                keys += [
                    k.delivered(event_id, integration),
                    k.pair(event_id, integration),
                    k.event(event_id),
                    k.in_progress(job_id),
                    k.job(job_id),
                ]
                job = encode_job(DELIVER, (event_id, integration), now)
                args += [pair_member(event_id, integration), job_id, job]
            q, s = await self._retry(keys=keys, args=args)
            queued += int(q)
            skipped += int(s)
        return queued, skipped

    async def earlier_release(
        self, attempt_id: str, released_ms: int
    ) -> tuple[str, int, bytes | None] | None:
        """The release of ``attempt_id`` just before the one released at ``released_ms`` (a
        re-release replaces it): (its event id, its release time in ms, its body while still
        held, else None); None when this is the attempt's first release examhook knows."""
        found = await self.redis.zrevrangebyscore(
            self.keys.releases(attempt_id), f"({released_ms}", "-inf", start=0, num=1, withscores=True
        )
        if not found:
            return None
        raw_id, score = found[0]
        event_id = raw_id.decode()
        return event_id, int(score), await self.redis.get(self.keys.event(event_id))

    async def purge_failures(self, pairs: list[tuple[str, str]]) -> int:
        """Forget failed pairs; returns how many failures were removed. See purge.lua."""
        removed = 0
        k = self.keys
        for start in range(0, len(pairs), 500):
            keys: list[str] = [k.failures, k.queue]
            args: list[Any] = []
            for event_id, integration in pairs[start : start + 500]:
                job_id = k.deliver_job_id(event_id, integration)
                keys += [
                    k.pair(event_id, integration),
                    k.attempts(event_id, integration),
                    k.in_progress(job_id),
                    k.job(job_id),
                    k.job_retry(job_id),
                ]
                args += [pair_member(event_id, integration), job_id]
            removed += int(await self._purge(keys=keys, args=args))
        return removed


async def _exchange(connection: Any, packed: list[bytes]) -> list[Any]:
    """Send packed commands at once and read one reply each; an error reply is returned in
    its place (every reply is read, so the connection stays usable).

    The replies are taken from the connection's parser under one timeout for the lot:
    redis-py's ``read_response`` sets up a timeout per reply, which cost more than the
    batch's SET commands themselves (redis-py is pinned, see pyproject.toml)."""
    try:
        async with asyncio.timeout(SOCKET_TIMEOUT_SECONDS):
            await connection.send_packed_command(packed, check_health=False)
            parser = connection._parser
            return [await parser.read_response() for _ in packed]
    except TimeoutError:
        await connection.disconnect()
        raise RedisTimeoutError(f"no answer from Redis within {SOCKET_TIMEOUT_SECONDS:g}s") from None
    except BaseException:
        # a reply may still be on its way (timeout, cancellation): never reuse the connection
        await connection.disconnect()
        raise


def _unknown_script(reply: Any) -> bool:
    """Redis does not know the script (restarted, or another server): load it and send again."""
    return isinstance(reply, NoScriptError) or (
        isinstance(reply, ResponseError) and str(reply).startswith("NOSCRIPT")
    )


async def _load_script(connection: Any, script: AsyncScript) -> None:
    sha = await _command(connection, ["SCRIPT", "LOAD", script.script])
    script.sha = sha.decode() if isinstance(sha, bytes) else sha


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


class _SameTurn:
    """Runs of one Lua script asked for in the same event-loop turn, sent to Redis together
    (:meth:`Store.scripts_at_once`): a fan-out job's events each claim their pairs, and
    those claims share one round trip instead of one each. Each run is still atomic alone."""

    def __init__(self, store: Store, script: AsyncScript) -> None:
        self._store = store
        self._script = script
        self._waiting: list[tuple[list[Any], list[Any], asyncio.Future[Any]]] = []
        self._sending: set[asyncio.Task[None]] = set()

    async def __call__(self, keys: list[Any], args: list[Any]) -> Any:
        loop = asyncio.get_running_loop()
        answer: asyncio.Future[Any] = loop.create_future()
        self._waiting.append((keys, args, answer))
        if len(self._waiting) == 1:
            # the others of this turn join before it runs (call_soon: after this turn)
            loop.call_soon(self._send_waiting)
        return await answer

    def _send_waiting(self) -> None:
        batch, self._waiting = self._waiting, []
        task = asyncio.get_running_loop().create_task(self._send(batch))
        self._sending.add(task)
        task.add_done_callback(self._sending.discard)

    async def _send(self, batch: list[tuple[list[Any], list[Any], asyncio.Future[Any]]]) -> None:
        try:
            replies = await self._store.scripts_at_once(self._script, [(k, a) for k, a, _ in batch])
        except Exception as exc:  # no answer for any of them (the connection, a timeout)
            for _, _, answer in batch:
                if not answer.done():
                    answer.set_exception(exc)
            return
        except asyncio.CancelledError:
            for _, _, answer in batch:
                answer.cancel()
            raise
        for (_, _, answer), reply in zip(batch, replies, strict=True):
            if answer.done():
                continue  # its caller gave up waiting
            if isinstance(reply, BaseException):
                answer.set_exception(reply)
            else:
                answer.set_result(reply)
