"""Delivery of events to integrations: the fan-out of an event, and one attempt of a pair.

The steps are the same for every integration type:

1. **claim** (one Lua call per event): skip a pair already delivered, superseded by a
   newer release or being sent elsewhere; otherwise take its lock and mark it in flight;
2. **wait for the integration's lane** (worker/lanes.py): its own share of this process,
   so a slow integration never holds up another; a pair whose lane cannot start it soon is
   handed on to a later job instead (durably, before the job ends);
3. **send** through the integration, bounded by its timeout;
4. **decide** (worker/decisions.py): delivered, retry after a backoff, or failed;
5. **record** (worker/outcomes.py, one Lua call per batch): the outcome, and atomically
   with it the "delivered" marker, the failure record or the retry job; kept and written
   later if Redis refuses it, never dropped.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import logging
import time
from collections import defaultdict
from dataclasses import dataclass
from typing import Literal

from redis.exceptions import RedisError

from shared.contract import DELIVER, MAX_EVENTS_PER_JOB, Keys, encode_job, pair_member, released_ms
from shared.logs import scrub
from shared.payload import ExamResultsReleased, decoder
from shared.settings import Settings, When
from shared.store import AttemptRecord, Claim, Mode, OutcomeRecord, Store, new_token, now_ms
from shared.timing import BACKSTOP_SECONDS, RECOVERY_GRACE_MS, RELEASE_WAIT_SECONDS, JobBudget
from worker.decisions import Decision, decide
from worker.filters import matches
from worker.integrations.base import (
    Delivery,
    DeliveryError,
    Integration,
    TransientError,
    UnknownOutcome,
)
from worker.integrations.releases import EarlierRelease, find_earlier_release
from worker.lanes import Lane
from worker.metrics import WorkerMetrics
from worker.outcomes import OutcomeJournal

log = logging.getLogger("examhook.worker")

# A fan-out job sends a pair itself only when its lane would start it within this long;
# otherwise the pair is handed on to a job of its own (a slow integration never keeps the
# job, and so the worker's job slots, waiting).
INLINE_WAIT_SECONDS = 0.1
# A job handed on for one integration waits for its lane up to this long.
HANDED_ON_WAIT_SECONDS = 2.0
EXPIRED_ERROR = "payload expired before delivery (retention.payload_seconds)"

OutcomeState = Literal["delivered", "retry", "failed", "skipped", "waiting"]
Event = tuple[str, str, int]  # (event id, attempt id, released ms), as in a fan-out job


@dataclasses.dataclass(frozen=True, slots=True)
class ClaimedPair:
    """A pair this worker has claimed (it holds the lock, ``token``), with its body, ready for
    an attempt: the first (``mode`` "first", from a fan-out job) or a retry job's."""

    event_id: str
    integration: str
    claim: Claim
    token: str
    body: bytes
    event: ExamResultsReleased
    mode: Mode


@dataclass(frozen=True, slots=True)
class Outcome:
    """What became of one pair in one job: ``waiting`` means not attempted (its lane was
    busy, or it is being sent elsewhere) and due again in ``retry_in`` seconds."""

    state: OutcomeState
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
        # the time limits and how they nest: shared/timing.py
        self.budget = JobBudget.of(settings).check()
        self.lock_ttl_ms = self.budget.lock_ttl_ms
        self.lanes = {
            name: Lane(name, i.config.lane_capacity(concurrency)) for name, i in integrations.items()
        }
        self.journal = OutcomeJournal(
            store, lock_ttl_ms=self.lock_ttl_ms, keep_locks_every=self.budget.keep_locks_every
        )
        metrics.outcomes_waiting.set_function(lambda: self.journal.waiting)
        # with no filter anywhere, every integration takes every event: no need to read the body first
        self._all_take_all = all(i.config.when == When() for i in integrations.values())
        self._stop_starting_at: float | None = None  # loop time: shutdown grace ends
        self._in_flight: set[asyncio.Future[Outcome]] = set()  # attempts sending now
        # what a shutdown had to cut (for its log line)
        self.sends_cut = 0
        self.outcomes_unwritten = 0

    def stop_starting(self, grace_seconds: float) -> None:
        """Shutdown began: running attempts get ``grace_seconds``; no attempt that could not
        finish by then is started. A second signal does not move that moment later."""
        if self._stop_starting_at is None:
            self._stop_starting_at = asyncio.get_running_loop().time() + grace_seconds

    def _start_by(self, name: str, deadline: float | None) -> float:
        """The latest loop time an attempt of ``name`` may start and still end before the job's
        ``deadline`` and the end of a shutdown grace (else the cut would make it run again)."""
        ends = [t for t in (deadline, self._stop_starting_at) if t is not None]
        end: float = min(ends) if ends else float("inf")
        return end - self.budget.attempts[name]

    async def _take_lane(self, name: str, deadline: float | None) -> bool:
        """A slot of the lane of ``name`` in time for a whole attempt (see :meth:`_start_by`,
        checked again once the slot came: a shutdown may have begun meanwhile)."""
        lane = self.lanes[name]
        if not await lane.acquire(self._start_by(name, deadline)):
            return False
        if asyncio.get_running_loop().time() > self._start_by(name, deadline):
            lane.release()
            return False
        return True

    async def drain(self, within: float = 10.0) -> None:
        """Shutdown: attempts still sending get until the end of the grace period (only those
        that could finish by then were started), the rest is cancelled (no outcome, no attempt
        spent: the pair runs again); then the outcomes still waiting are written."""
        if self._in_flight:
            loop = asyncio.get_running_loop()
            grace = (self._stop_starting_at or loop.time()) - loop.time()
            _, cut = await asyncio.wait(set(self._in_flight), timeout=max(0.0, grace))
            for task in cut:
                task.cancel()
            await asyncio.gather(*cut, return_exceptions=True)
            self.sends_cut += len(cut)
        self.outcomes_unwritten += len(await self.journal.close(within))

    # -- the handle_events job -----------------------------------------------------------

    async def handle_events(
        self, events: list[Event], integration: str | None = None, *, deadline: float | None = None
    ) -> str:
        """The ``handle_events`` job: the first attempt of each event's pairs (only
        ``integration``'s, for a job handed on), all at once.

        Every event runs to its end even if another fails (nothing is left running unowned);
        the pairs whose lanes were busy are handed on to new jobs; then a failure fails the
        job, which runs again: pairs already attempted are skipped by their claims."""
        handed_on: dict[str, list[Event]] = defaultdict(list)
        results = await asyncio.gather(
            *(self._fan_out(event, integration, deadline, handed_on) for event in events),
            return_exceptions=True,
        )
        await self._hand_on(handed_on)
        for result in results:
            if isinstance(result, BaseException):
                raise result
        moved = sum(len(v) for v in handed_on.values())
        return f"{len(events)} events" + (f", {moved} pairs handed on" if moved else "")

    async def _fan_out(
        self,
        event: Event,
        only: str | None,
        deadline: float | None,
        handed_on: dict[str, list[Event]],
    ) -> None:
        event_id, attempt_id, released = event
        names = [only] if only is not None else list(self.integrations)
        names = [n for n in names if n in self.integrations]
        if only is not None and not names:
            await self._not_configured(event_id, only)
            return
        body: bytes | None = None
        decoded: ExamResultsReleased | None = None
        filtered = not (self._all_take_all or all(self.integrations[n].config.when == When() for n in names))
        if filtered:
            body = await self.store.redis.get(self.keys.event(event_id))
            if body is None:
                await self._expired(event_id, names)
                return
            decoded = decoder.decode(body)
            names = [n for n in names if matches(self.integrations[n].config.when, decoded)]
            if not names:
                if only is None and await self.store.record_unmatched(event_id):  # not on a rerun
                    self.metrics.unmatched.inc()
                    log.info("matched no integration", extra={"event_id": event_id})
                return
            attempt_id, released = decoded.attempt.id, released_ms(decoded)
        loop = asyncio.get_running_loop()
        budget = HANDED_ON_WAIT_SECONDS if only is not None else INLINE_WAIT_SECONDS
        now_here: list[str] = []
        for name in names:
            start_by = self._start_by(name, deadline)
            wait = self.lanes[name].expected_wait()
            if wait <= budget and loop.time() + wait <= start_by:
                now_here.append(name)
            else:
                handed_on[name].append((event_id, attempt_id, released))
        if not now_here:
            return
        token = new_token()
        fetched, claims = await self.store.claim(
            event_id,
            now_here,
            token=token,
            lock_ttl_ms=self.lock_ttl_ms,
            mode="first",
            with_body=body is None,
            attempt_id=attempt_id,
            released_ms=released,
            recovery_grace_ms=RECOVERY_GRACE_MS,
        )
        if body is None:
            body = fetched
            if body is None:
                await self._expired(event_id, now_here)
                return
            decoded = decoder.decode(body)
        assert decoded is not None
        # every attempt runs to its end even if one fails: no sibling is left running unowned
        results = await asyncio.gather(
            *(
                self._first_attempt(event_id, name, claim, token, body, decoded, deadline, handed_on)
                for name, claim in zip(now_here, claims, strict=True)
            ),
            return_exceptions=True,
        )
        for result in results:
            if isinstance(result, BaseException):
                raise result

    async def _first_attempt(
        self,
        event_id: str,
        name: str,
        claim: Claim,
        token: str,
        body: bytes,
        event: ExamResultsReleased,
        deadline: float | None,
        handed_on: dict[str, list[Event]],
    ) -> Outcome:
        if claim.state in ("locked", "recovering"):
            # being sent elsewhere (or its sender may still record it): look again later, in a
            # job of its own
            wait_ms = claim.wait_ms if claim.state == "recovering" else self.lock_ttl_ms
            await self.store.enqueue_deliver(event_id, name, defer_ms=wait_ms)
            return Outcome("waiting", wait_ms / 1000)
        if claim.state != "ok":
            return await self._not_sent(event_id, name, claim, token)
        if not await self._take_lane(name, deadline):
            # the lane stayed busy longer than expected: nothing was sent, hand it on
            await self.store.release(event_id, name, token, may_have_sent=False)
            handed_on[name].append((event_id, event.attempt.id, released_ms(event)))
            return Outcome("waiting")
        return await self._run_attempt(ClaimedPair(event_id, name, claim, token, body, event, "first"))

    async def _hand_on(self, handed_on: dict[str, list[Event]]) -> None:
        """Queue jobs for the pairs whose lanes were busy: one ``handle_events`` job per
        integration and up to MAX_EVENTS_PER_JOB events, due when the lane should have room."""
        for name, events in handed_on.items():
            lane = self.lanes.get(name)
            for start in range(0, len(events), MAX_EVENTS_PER_JOB):
                chunk = events[start : start + MAX_EVENTS_PER_JOB]
                delay = lane.book(len(chunk)) if lane is not None else 0.0
                await self.store.enqueue_fanout(chunk, integration=name, defer_ms=int(delay * 1000))
                self.metrics.handed_on.labels(name).inc(len(chunk))
            log.info(
                "lane busy: pairs handed on to a later job", extra={"integration": name, "pairs": len(events)}
            )

    # -- the deliver job -------------------------------------------------------------------

    async def deliver(self, event_id: str, name: str, *, deadline: float | None = None) -> Outcome:
        """The ``deliver`` job: one more attempt of a pair (retries, ``failures retry``)."""
        integration = self.integrations.get(name)
        if integration is None:
            await self._not_configured(event_id, name)
            return Outcome("failed")
        lane = self.lanes[name]
        start_by = self._start_by(name, deadline)
        loop = asyncio.get_running_loop()
        if loop.time() + lane.expected_wait() > start_by or not await self._take_lane(name, deadline):
            return Outcome("waiting", max(lane.book(1), 0.5))  # not attempted: no attempt spent
        slot_passed_on = False
        try:
            token = new_token()
            body, [claim] = await self.store.claim(
                event_id,
                [name],
                token=token,
                lock_ttl_ms=self.lock_ttl_ms,
                mode="retry",
                with_body=True,
                recovery_grace_ms=RECOVERY_GRACE_MS,
            )
            if claim.state in ("locked", "recovering"):
                wait_ms = claim.wait_ms if claim.state == "recovering" else self.lock_ttl_ms
                return Outcome("waiting", wait_ms / 1000)
            if claim.state != "ok":
                return await self._not_sent(event_id, name, claim, token)
            assert body is not None
            slot_passed_on = True
            event = decoder.decode(body)
            return await self._run_attempt(ClaimedPair(event_id, name, claim, token, body, event, "retry"))
        finally:
            if not slot_passed_on:
                lane.release()

    # -- one attempt -----------------------------------------------------------------------

    async def _run_attempt(self, pair: ClaimedPair) -> Outcome:
        """The attempt as a task of its own, holding its lane slot until it ends: the job's
        deadline stops the job waiting for it, never the send itself (a send cut after its
        hand-over would leave an unknown outcome). Only a shutdown past its grace cancels it
        (:meth:`drain`)."""
        task = asyncio.ensure_future(self._attempt(pair))
        self._in_flight.add(task)
        lane = self.lanes[pair.integration]

        def ended(finished: asyncio.Future[Outcome]) -> None:
            self._in_flight.discard(finished)
            lane.release()

        task.add_done_callback(ended)
        return await asyncio.shield(task)

    async def _attempt(self, pair: ClaimedPair) -> Outcome:
        """Send one claimed pair (its lane slot held), decide, and record the outcome."""
        config = self.integrations[pair.integration].config
        number = pair.claim.attempts_so_far + 1
        started_at = now_ms()
        started = time.perf_counter()
        result = await self._send(pair, number)
        duration = time.perf_counter() - started
        if not pair.claim.handed_over or config.unknown_outcome_policy == "retry":
            self.lanes[pair.integration].observe(duration)
        decision = decide(result, attempt=number, config=config)
        if decision.error:
            # a destination's answer may quote the learner: never into logs or records as is
            user = pair.event.user
            error = scrub(decision.error, personal=(user.name, user.email))
            decision = dataclasses.replace(decision, error=error)
        await self._record(pair, number, started_at, duration, decision)
        self._count(pair, number, duration, decision)
        if decision.outcome == "retry" and pair.mode == "retry":
            return Outcome("retry", decision.retry_in)
        return Outcome(decision.outcome)

    async def _send(self, pair: ClaimedPair, number: int) -> str | DeliveryError:
        """The integration's answer to one send: its status text, or the error it ended in
        (a timeout, an unforeseen exception: :class:`UnknownOutcome`, :class:`TransientError`)."""
        event_id, name, token, claim = pair.event_id, pair.integration, pair.token, pair.claim
        integration = self.integrations[name]
        config = integration.config
        if claim.handed_over and config.unknown_outcome_policy != "retry":
            # the previous attempt handed the message over and its worker stopped before
            # hearing back: the policy, not a second copy
            return UnknownOutcome("an earlier attempt handed it over, then its worker stopped")
        handed = False

        async def hand_over() -> None:
            nonlocal handed
            await self.store.mark_handed_over(event_id, name, token)
            handed = True

        delivery = Delivery(event_id, pair.body, pair.event, number, claim.interrupted, hand_over)
        try:
            if integration.wants_earlier_release:
                delivery = dataclasses.replace(delivery, earlier=await self._earlier_release(pair.event))
            # the integration enforces its own timeout; this is the backstop
            async with asyncio.timeout(config.timeout_seconds + BACKSTOP_SECONDS):
                return await integration.deliver(delivery)
        except DeliveryError as exc:
            return exc
        except TimeoutError:
            return UnknownOutcome(f"timed out after {config.timeout_seconds:g}s")
        except Exception as exc:  # a bug or an unforeseen error: retry, and say so loudly
            log.exception(
                "integration raised unexpectedly", extra={"event_id": event_id, "integration": name}
            )
            return TransientError(f"{exc.__class__.__name__}: {exc}")
        except asyncio.CancelledError:
            # shutting down or out of time: no outcome, no attempt spent; the job runs again.
            # Freeing the lock is a courtesy (it expires anyway): never wait long for Redis
            # here, and well inside the smallest margin between the job's deadline and arq's
            # timeout (shared/timing.py), past which arq would drop the job.
            may_have_sent = handed or not integration.marks_hand_over
            release = self.store.release(event_id, name, token, may_have_sent=may_have_sent)
            with contextlib.suppress(Exception):  # Redis away: the lock expires by itself
                await asyncio.wait_for(asyncio.shield(release), RELEASE_WAIT_SECONDS)
            raise

    async def _earlier_release(self, event: ExamResultsReleased) -> EarlierRelease | None:
        """The release this one replaces (a re-release), for the message to say so; never
        holds up a send: without Redis's answer the message reads as a first release."""
        try:
            async with asyncio.timeout(1.0):
                return await find_earlier_release(self.store, event)
        except (RedisError, OSError, TimeoutError):
            return None

    async def _record(
        self, pair: ClaimedPair, number: int, started_at: int, duration: float, decision: Decision
    ) -> None:
        event_id, name = pair.event_id, pair.integration
        retry_in = decision.retry_in
        record = AttemptRecord(
            attempt=number,
            at=started_at,
            duration_ms=round(duration * 1000, 2),
            outcome=decision.outcome,
            status=decision.status,
            error=decision.error,
            retry_in_seconds=round(retry_in, 3) if retry_in is not None else None,
            outcome_unknown=decision.unknown,
        )
        retry_job = None
        if retry_in is not None and pair.mode == "first":
            retry_job = encode_job(DELIVER, (event_id, name), now_ms())
        outcome = OutcomeRecord(
            event_id,
            name,
            pair.token,
            record,
            retry_in_ms=int((retry_in or 0) * 1000),
            retry_job=retry_job,
            maybe_sent=decision.maybe_sent,
            unknown=decision.unknown,
        )
        # The send happened: its record lands even if this job is cancelled meanwhile (the
        # journal keeps it), or the pair would be sent again.
        await asyncio.shield(self.journal.write(outcome))

    def _count(self, pair: ClaimedPair, number: int, duration: float, decision: Decision) -> None:
        event_id, name, claim = pair.event_id, pair.integration, pair.claim
        metrics = self.metrics
        metrics.deliveries.labels(name, decision.outcome).inc()
        metrics.attempt_seconds.labels(name).observe(duration)
        if decision.unknown:
            metrics.unknown_outcomes.labels(name).inc()
        if decision.outcome == "delivered" and claim.received_ms:
            metrics.lag_seconds.labels(name).observe(max(0.0, (now_ms() - claim.received_ms) / 1000))
        level = logging.WARNING if decision.outcome == "failed" or decision.unknown else logging.INFO
        extra: dict[str, object] = {
            "event_id": event_id,
            "integration": name,
            "attempt": number,
            "outcome": decision.outcome,
            "status": decision.status,
            "duration_ms": round(duration * 1000, 2),
        }
        if decision.retry_in is not None:
            extra["retry_in"] = round(decision.retry_in, 3)
        if decision.unknown:
            extra["outcome_unknown"] = True
        if decision.error and decision.outcome != "delivered":
            extra["error"] = decision.error
        log.log(level, "delivery %s", decision.outcome, extra=extra)

    # -- pairs not sent ----------------------------------------------------------------------

    async def _not_sent(self, event_id: str, name: str, claim: Claim, token: str) -> Outcome:
        """A claim that did not take the pair: delivered, superseded, scheduled, purged, expired."""
        if claim.state == "expired":
            log.warning("payload expired before delivery", extra={"event_id": event_id, "integration": name})
            await self._record_failure(event_id, name, EXPIRED_ERROR, token)
            return Outcome("failed")
        self.metrics.skipped.labels(name, claim.state).inc()
        log.info("not sent: %s", claim.state, extra={"event_id": event_id, "integration": name})
        return Outcome("skipped")

    async def _not_configured(self, event_id: str, name: str) -> None:
        log.error("integration is not configured here", extra={"event_id": event_id, "integration": name})
        await self._record_failure(event_id, name, f"integration {name!r} is not configured on this worker")

    async def _expired(self, event_id: str, names: list[str]) -> None:
        """The body is gone before the first attempt (retention ran out while queued): make it
        a visible failure for each integration rather than drop it silently."""
        failures = self.keys.failures
        redis = self.store.redis
        # a rerun of the job (a sibling event failed, or ran out of time) records nothing twice
        names = [n for n in names if await redis.zscore(failures, pair_member(event_id, n)) is None]
        if names:
            log.warning("event expired before delivery", extra={"event_id": event_id})
        for name in names:
            await self._record_failure(event_id, name, EXPIRED_ERROR)

    async def _record_failure(self, event_id: str, name: str, error: str, token: str = "") -> None:
        record = AttemptRecord(attempt=0, at=now_ms(), duration_ms=0, outcome="failed", error=error)
        # a token of its own when it holds no claim: a re-sent record is then recognised
        outcome = OutcomeRecord(event_id, name, token or new_token(), record)
        await asyncio.shield(self.journal.write(outcome))
        self.metrics.deliveries.labels(name, "failed").inc()
