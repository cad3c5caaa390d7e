"""The outcome journal: outcomes of finished sends on their way to Redis, kept until written.

An attempt hands its outcome here and waits for it to be written. Outcomes of concurrent
attempts share one round trip. When Redis refuses the write (it cannot write: a replica,
``MISCONF``, ``NOREPLICAS``) or is away, the outcome stays here and is written as soon as
Redis takes it again, while the pair's lock is kept alive so that nobody sends the pair
again meanwhile (and a claim that finds the pair unfinished waits a recovery grace first,
see claim.lua). So an outcome, once known, is never lost: only a process that dies holding
one can make a pair be sent twice.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from dataclasses import dataclass, field

from redis.exceptions import RedisError

from shared.store import OutcomeRecord, Store

log = logging.getLogger("examhook.worker")

MAX_BATCH = 256
# Between tries while Redis refuses: from the first to the last, doubling.
RETRY_FIRST_SECONDS = 0.05
RETRY_MAX_SECONDS = 1.0
# While outcomes wait, a warning this often (not one per try).
WARN_EVERY_SECONDS = 30.0


@dataclass(eq=False)
class _Pending:
    outcome: OutcomeRecord
    future: asyncio.Future[int]
    since: float = field(default_factory=time.monotonic)


class OutcomeJournal:
    def __init__(self, store: Store, *, lock_ttl_ms: int, keep_locks_every: float) -> None:
        self.store = store
        self.lock_ttl_ms = lock_ttl_ms
        # how often the locks of waiting outcomes are extended: well inside their TTL
        self.keep_locks_every = keep_locks_every
        self._pending: list[_Pending] = []
        self._writer: asyncio.Task[None] | None = None

    @property
    def waiting(self) -> int:
        """Outcomes not written yet."""
        return len(self._pending)

    def write(self, outcome: OutcomeRecord) -> asyncio.Future[int]:
        """Queue an outcome; the future gives the pair's attempt count once it is written."""
        future: asyncio.Future[int] = asyncio.get_running_loop().create_future()
        self._pending.append(_Pending(outcome, future))
        if self._writer is None or self._writer.done():
            self._writer = asyncio.create_task(self._run(), name="examhook-outcome-journal")
        return future

    async def close(self, within: float) -> list[OutcomeRecord]:
        """Wait (up to ``within`` seconds) until every outcome is written; the ones that could not
        be are logged and returned (their pairs may be sent again)."""
        writer = self._writer
        if writer is not None and not writer.done():
            done, _ = await asyncio.wait({writer}, timeout=within)
            if not done:
                writer.cancel()
                await asyncio.gather(writer, return_exceptions=True)
        left = [p.outcome for p in self._pending]
        for outcome in left:
            log.error(
                "outcome could not be recorded before exit; the pair may be sent again",
                extra={
                    "event_id": outcome.event_id,
                    "integration": outcome.integration,
                    "outcome": outcome.record.outcome,
                },
            )
        for pending in self._pending:
            if not pending.future.done():
                pending.future.cancel()
        self._pending.clear()
        return left

    async def _run(self) -> None:
        delay = RETRY_FIRST_SECONDS
        failing_since: float | None = None
        next_warning = 0.0
        last_kept = time.monotonic()
        while self._pending:
            batch = self._pending[:MAX_BATCH]
            error: BaseException | None = None
            try:
                results = await self.store.record_many([p.outcome for p in batch])
            except (RedisError, OSError) as exc:
                results, error = [], exc
            written = set()
            for pending, result in zip(batch, results, strict=False):
                if isinstance(result, BaseException):
                    error = result
                    continue
                written.add(id(pending))
                if not pending.future.done():
                    pending.future.set_result(result)
            if written:
                self._pending = [p for p in self._pending if id(p) not in written]
            if error is None:
                if failing_since is not None:
                    log.warning(
                        "outcomes recorded again after Redis refused them",
                        extra={"waited_seconds": round(time.monotonic() - failing_since, 1)},
                    )
                    failing_since = None
                delay = RETRY_FIRST_SECONDS
                continue
            now = time.monotonic()
            if failing_since is None:
                failing_since = now
            if now >= next_warning:
                log.warning(
                    "could not record delivery outcomes; keeping them and trying again",
                    extra={"waiting": len(self._pending), "error": _describe(error)},
                )
                next_warning = now + WARN_EVERY_SECONDS
            if now - last_kept >= self.keep_locks_every:
                await self._keep_locks()
                last_kept = now
            # a new outcome does not make a refusing Redis try sooner
            await asyncio.sleep(delay)
            delay = min(delay * 2, RETRY_MAX_SECONDS)

    async def _keep_locks(self) -> None:
        locks = [(p.outcome.event_id, p.outcome.integration, p.outcome.token) for p in self._pending]
        with contextlib.suppress(RedisError, OSError):  # Redis away: nobody else can claim them either
            await self.store.keep_locks(locks, self.lock_ttl_ms)


def _describe(exc: BaseException) -> str:
    return f"{exc.__class__.__name__}: {exc}"
