"""One delivery attempt of one (event, integration) pair, and the fan-out of an event.

The steps are the same for every integration type:

1. **claim** (one Lua call): skip if already delivered or superseded by a newer
   release; otherwise take the pair's lock and mark the attempt in flight;
2. **send** through the integration, bounded by its timeout;
3. **record** (one Lua call): the attempt's outcome, and atomically with it the
   "delivered" marker, the failure record, or the retry job.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass

from shared.contract import DELIVER, Keys, encode_job, pair_member, released_ms
from shared.payload import ExamResultsReleased, decoder
from shared.settings import Settings, When, job_deadline_seconds
from shared.store import AttemptRecord, Claim, Store, new_token, now_ms
from worker.backoff import backoff_seconds
from worker.filters import matches
from worker.integrations.base import Delivery, Integration, PermanentError, TransientError
from worker.metrics import WorkerMetrics

log = logging.getLogger("examhook.worker")

# When another worker holds a pair's lock, look again after this long.
LOCKED_RETRY_SECONDS = 5.0
# Events a fan-out job had no time left for are queued again, due after this long.
POSTPONED_DEFER_MS = 1000
EXPIRED_ERROR = "payload expired before delivery (retention.payload_seconds)"


class NoTimeLeft(Exception):
    """Too little of the job's run (or of the shutdown grace) is left to start another
    attempt after waiting for a slot; nothing was claimed. The job runs again."""


@dataclass(frozen=True, slots=True)
class Outcome:
    state: str  # delivered | retry | failed | skipped
    retry_in: float | None = None


class Deliverer:
    def __init__(
        self,
        settings: Settings,
        store: Store,
        integrations: dict[str, Integration],  # type: ignore[type-arg]
        metrics: WorkerMetrics,
        *,
        concurrency: int,
    ) -> None:
        self.store = store
        self.keys: Keys = store.keys
        self.integrations = integrations
        self.metrics = metrics
        self.lock_ttl_ms = int(settings.job_timeout_seconds * 1000)
        # with no filter anywhere, every integration takes every event: no need to read the body first
        self._all_take_all = all(i.config.when == When() for i in integrations.values())
        self._recording: set[asyncio.Future[int]] = set()  # records finishing after a cancel
        # Events (fan-out) or pairs (retries) being handled at once, whatever the jobs carry:
        # a destination never sees more than workers x concurrency requests from examhook.
        self._slots = asyncio.Semaphore(concurrency)
        # What an attempt may take: the slowest integration's timeout, plus claim and record
        # (up to 1 s, less when the job's run leaves less: a run always has room for one).
        slowest = max((i.config.timeout_seconds for i in integrations.values()), default=0.0)
        run = job_deadline_seconds(settings.job_timeout_seconds)
        self.attempt_seconds = slowest + min(1.0, max(0.0, run - slowest) / 2)
        self._stop_starting_at: float | None = None  # loop time: shutdown grace ends

    def stop_starting(self, grace_seconds: float) -> None:
        """Shutdown began: running attempts get ``grace_seconds``; no attempt that could not
        finish by then is started. A second signal does not move that moment later."""
        if self._stop_starting_at is None:
            self._stop_starting_at = asyncio.get_running_loop().time() + grace_seconds

    @contextlib.asynccontextmanager
    async def _slot(self, deadline: float | None) -> AsyncIterator[None]:
        """One of ``concurrency`` slots, taken before the claim.

        The slot is used only if a whole attempt still fits before the job's ``deadline``
        (loop time) and the end of a shutdown grace; otherwise the deadline would cut the
        send midway and the job's next run would send it again. ``NoTimeLeft`` instead:
        nothing claimed, nothing sent. (An event that gets its slot at once always fits.)
        """
        async with self._slots:
            ends = [t for t in (deadline, self._stop_starting_at) if t is not None]
            if ends and min(ends) - asyncio.get_running_loop().time() < self.attempt_seconds:
                raise NoTimeLeft
            yield

    async def drain(self) -> None:
        """Wait for records still being written after their job was cancelled (shutdown)."""
        if self._recording:
            await asyncio.wait(set(self._recording), timeout=10)

    async def handle_events(
        self, events: list[tuple[str, str, int]], *, deadline: float | None = None
    ) -> str:
        """The ``handle_events`` job: :meth:`handle_event` for each of its events, all at once.

        Every event runs to its end even if another fails (nothing is left running unowned);
        then a failure fails the job, which runs again: events already attempted are skipped
        by their claims, the rest are sent. Events left for lack of time go to a new job
        (any worker may take it; this job's try count does not grow while slots are busy).
        """
        results = await asyncio.gather(
            *(
                self.handle_event(e, attempt_id, released, deadline=deadline)
                for e, attempt_id, released in events
            ),
            return_exceptions=True,
        )
        for result in results:
            if isinstance(result, BaseException) and not isinstance(result, NoTimeLeft):
                raise result
        postponed = [
            (e, attempt_id, released)
            for (e, attempt_id, released), result in zip(events, results, strict=True)
            if isinstance(result, NoTimeLeft)
        ]
        if postponed:
            await self.store.enqueue_fanout(postponed, defer_ms=POSTPONED_DEFER_MS)
            log.info("no time left in this run: events queued again", extra={"events": len(postponed)})
        return f"{len(results) - len(postponed)} events, {len(postponed)} queued again"

    async def handle_event(
        self,
        event_id: str,
        attempt_id: str | None = None,
        released: int | None = None,
        *,
        deadline: float | None = None,
    ) -> str:
        """The ``handle_event`` job: first attempt for every integration whose filter matches.

        When no integration filters and the job carries the attempt id and release time,
        the body comes back with the claims: one round trip before sending.
        """
        async with self._slot(deadline):
            return await self._handle_event(event_id, attempt_id, released)

    async def _handle_event(self, event_id: str, attempt_id: str | None, released: int | None) -> str:
        everyone = list(self.integrations.values())
        token = new_token()
        if attempt_id is not None and released is not None and self._all_take_all:
            targets = everyone
            body, claims = await self.store.claim(
                event_id,
                [i.name for i in targets],
                token=token,
                lock_ttl_ms=self.lock_ttl_ms,
                mode="first",
                with_body=True,
                attempt_id=attempt_id,
                released_ms=released,
            )
            if body is None:
                return await self._expired(event_id)
            event = decoder.decode(body)
        else:
            body = await self.store.redis.get(self.keys.event(event_id))
            if body is None:
                return await self._expired(event_id)
            event = decoder.decode(body)
            targets = [i for i in everyone if matches(i.config.when, event)]
            claims = []
            if targets:
                _, claims = await self.store.claim(
                    event_id,
                    [i.name for i in targets],
                    token=token,
                    lock_ttl_ms=self.lock_ttl_ms,
                    mode="first",
                    with_body=False,
                    attempt_id=event.attempt.id,
                    released_ms=released_ms(event),
                )
        if not targets:
            if await self.store.record_unmatched(event_id):  # not on a rerun of the job
                self.metrics.unmatched.inc()
                log.info("matched no integration", extra={"event_id": event_id})
            return "unmatched"
        # every attempt runs to its end even if one fails: no sibling is left running unowned
        results = await asyncio.gather(
            *(
                self.attempt(event_id, i, c, token=token, mode="first", body=body, event=event)
                for i, c in zip(targets, claims, strict=True)
            ),
            return_exceptions=True,
        )
        for result in results:
            if isinstance(result, BaseException):
                raise result
        outcomes = [r for r in results if isinstance(r, Outcome)]
        return ",".join(f"{i.name}={o.state}" for i, o in zip(targets, outcomes, strict=True))

    async def _expired(self, event_id: str) -> str:
        """The body is gone before the first attempt (retention ran out while queued): make it
        a visible failure for every integration rather than drop it silently."""
        failures = self.keys.failures
        redis = self.store.redis
        # a rerun of the job (a sibling event failed, or ran out of time) records nothing twice
        names = [
            n for n in self.integrations if await redis.zscore(failures, pair_member(event_id, n)) is None
        ]
        if names:
            log.warning("event expired before delivery", extra={"event_id": event_id})
        for name in names:
            await self._record_failure(event_id, name, EXPIRED_ERROR)
        return "expired"

    async def _record_failure(self, event_id: str, name: str, error: str, token: str = "") -> None:
        record = AttemptRecord(attempt=0, at=now_ms(), duration_ms=0, outcome="failed", error=error)
        # a token of its own when it holds no claim: a re-sent record is then recognised
        await self.store.record(event_id, name, token=token or new_token(), record=record)
        self.metrics.deliveries.labels(name, "failed").inc()

    async def deliver(self, event_id: str, name: str, *, deadline: float | None = None) -> Outcome:
        """The ``deliver`` job: one more attempt of a pair (retries, ``failures retry``)."""
        integration = self.integrations.get(name)
        if integration is None:
            log.error("integration is not configured here", extra={"event_id": event_id, "integration": name})
            await self._record_failure(
                event_id, name, f"integration {name!r} is not configured on this worker"
            )
            return Outcome("failed")
        async with self._slot(deadline):
            token = new_token()
            body, [claim] = await self.store.claim(
                event_id, [name], token=token, lock_ttl_ms=self.lock_ttl_ms, mode="retry", with_body=True
            )
            event = decoder.decode(body) if body is not None else None
            return await self.attempt(
                event_id, integration, claim, token=token, mode="retry", body=body, event=event
            )

    async def attempt(
        self,
        event_id: str,
        integration: Integration,  # type: ignore[type-arg]
        claim: Claim,
        *,
        token: str,
        mode: str,
        body: bytes | None,
        event: ExamResultsReleased | None,
    ) -> Outcome:
        """Send one claimed pair and record the outcome."""
        name = integration.name
        config = integration.config
        if claim.state == "locked":
            if mode == "retry":
                return Outcome("retry", LOCKED_RETRY_SECONDS)
            await self.store.enqueue_deliver(event_id, name, defer_ms=self.lock_ttl_ms)
            return Outcome("skipped")
        if claim.state == "expired":
            log.warning("payload expired before delivery", extra={"event_id": event_id, "integration": name})
            await self._record_failure(event_id, name, EXPIRED_ERROR, token)
            return Outcome("failed")
        if claim.state != "ok":  # delivered, superseded, scheduled, purged
            self.metrics.skipped.labels(name, claim.state).inc()
            log.info("not sent: %s", claim.state, extra={"event_id": event_id, "integration": name})
            return Outcome("skipped")
        assert body is not None
        assert event is not None
        number = claim.attempts_so_far + 1
        delivery = Delivery(event_id, body, event, number, claim.interrupted)

        started_at = now_ms()
        started = time.perf_counter()
        status: str | None = None
        error: str | None = None
        retry_after: float | None = None
        uncertain = False  # the outcome is unknown: it may have been sent
        try:
            try:
                # the integration enforces its own timeout; this is the backstop
                async with asyncio.timeout(config.timeout_seconds + 5):
                    status = await integration.deliver(delivery)
                outcome = "delivered"
            except TransientError as exc:
                outcome, status, error, retry_after = "retry", exc.status, exc.message, exc.retry_after
            except PermanentError as exc:
                outcome, status, error = "failed", exc.status, exc.message
            except TimeoutError:
                outcome, error = "retry", f"timed out after {config.timeout_seconds:g}s"
                uncertain = True
            except Exception as exc:  # a bug or an unforeseen error: retry, and say so loudly
                log.exception(
                    "integration raised unexpectedly", extra={"event_id": event_id, "integration": name}
                )
                outcome, error = "retry", f"{exc.__class__.__name__}: {exc}"
        except asyncio.CancelledError:
            # shutting down or out of time: no outcome, no attempt spent; the job runs again.
            # Freeing the lock is a courtesy (it expires anyway): never wait long for Redis here,
            # and well inside the smallest margin between the job's deadline and arq's timeout
            # (20% of job_timeout_seconds), past which arq would drop the job.
            with contextlib.suppress(Exception):
                await asyncio.wait_for(asyncio.shield(self.store.release(event_id, name, token)), 0.2)
            raise
        duration = time.perf_counter() - started

        retry_in: float | None = None
        if outcome == "retry":
            if number >= config.max_attempts:
                outcome = "failed"
                error = f"{error} (gave up after {number} attempts)"
            else:
                retry_in = backoff_seconds(
                    number, config.backoff_base_seconds, config.backoff_max_seconds, retry_after
                )
        record = AttemptRecord(
            attempt=number,
            at=started_at,
            duration_ms=round(duration * 1000, 2),
            outcome=outcome,
            status=status,
            error=error,
            retry_in_seconds=round(retry_in, 3) if retry_in is not None else None,
        )
        retry_job = None
        if retry_in is not None and mode == "first":
            retry_job = encode_job(DELIVER, (event_id, name), now_ms())
        # The send happened: its record must land even if this job is cancelled meanwhile
        # (deadline, shutdown, Redis slow to come back), or the pair would be sent again.
        recording = asyncio.ensure_future(
            self.store.record(
                event_id,
                name,
                token=token,
                record=record,
                retry_in_ms=int((retry_in or 0) * 1000),
                retry_job=retry_job,
                uncertain=uncertain,
            )
        )
        self._recording.add(recording)
        recording.add_done_callback(self._recording.discard)
        await asyncio.shield(recording)

        self.metrics.deliveries.labels(name, outcome).inc()
        self.metrics.attempt_seconds.labels(name).observe(duration)
        log_level = logging.WARNING if outcome == "failed" else logging.INFO
        log.log(
            log_level,
            "delivery %s",
            outcome,
            extra={
                "event_id": event_id,
                "integration": name,
                "attempt": number,
                "outcome": outcome,
                "status": status,
                "duration_ms": record.duration_ms,
                **({"retry_in": record.retry_in_seconds} if retry_in is not None else {}),
                **({"error": _short(error)} if error and outcome != "delivered" else {}),
            },
        )
        if outcome == "retry" and mode == "retry":
            return Outcome("retry", retry_in)
        return Outcome(outcome)


def _short(error: str) -> str:
    # error text may quote a destination's answer; keep log lines short
    return error if len(error) <= 120 else error[:117] + "..."
