"""Results day: who got their result, everywhere it should go (``examhook report``, the
admin Exams pages).

The exam index (``P:exams``, ``P:exam:X``, written at ingest with the payload retention)
names an exam's events; one read-only Lua call per chunk of events (``report.lua``) answers
every pair's state and the bodies, so a cohort of 20,000 events costs a few dozen round
trips, never a scan of the keyspace.

A pair (event, integration) is, in this order:

* ``delivered`` — its delivered marker is set;
* ``failed`` — it is in ``P:failures`` (or its record says failed);
* ``superseded`` — its record says so, or a newer release of the same attempt exists;
* ``skipped`` — the integration's current filter does not take the event;
* ``pending`` — everything else: queued, being sent, waiting for a retry, not yet attempted.
"""

from __future__ import annotations

import asyncio
import csv
import gc
import io
from collections.abc import Iterable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any, Literal, cast

import msgspec

from shared.inspection import iso
from shared.payload import CustomValue, ExamResultsReleased, decoder, parse_time
from shared.settings import IntegrationConfig, When
from shared.store import Store, lua_script, now_ms
from worker.filters import matches

State = Literal["delivered", "pending", "failed", "skipped", "superseded"]
STATES: tuple[State, ...] = ("delivered", "pending", "failed", "skipped", "superseded")
# failed first, then pending: what an operator has to look at
_URGENCY = {"failed": 0, "pending": 1, "superseded": 2, "skipped": 3, "delivered": 4}
_CODES: dict[str, State] = {"d": "delivered", "f": "failed", "s": "superseded"}
# events per report.lua call, and calls in flight at once
CHUNK = 250
CALLS_AT_ONCE = 4

_REPORT_LUA = lua_script("report")


# -- the little of a body a report reads -----------------------------------------------------
# What a row shows and what ``[integrations.when]`` filters look at, with the payload's own
# attribute names (worker/filters.py reads them), and nothing else: decoding only this is a
# fraction of decoding the whole body.


class _Ref(msgspec.Struct, rename="camel", gc=False):
    id: str


class _User(msgspec.Struct, rename="camel", gc=False):
    id: str
    name: str
    email: str
    sub_portal_id: str | None = None
    custom_attributes: dict[str, CustomValue] = {}


class _Grade(msgspec.Struct, rename="camel", gc=False):
    label: str
    is_pass: bool


class _Audit(msgspec.Struct, rename="camel", gc=False):
    released_at: str


class _Attempt(msgspec.Struct, rename="camel", gc=False):
    id: str
    grade: _Grade
    audit: _Audit


class _Exam(msgspec.Struct, rename="camel", gc=False):
    id: str
    name: str
    user_group: _Ref


class _Brief(msgspec.Struct, rename="camel", gc=False):
    user: _User
    portal: _Ref
    attempt: _Attempt
    test: _Ref
    exam: _Exam


_brief_decoder = msgspec.json.Decoder(_Brief)


@dataclass(frozen=True, slots=True)
class Target:
    """An integration as the report sees it: its name and its current filter."""

    name: str
    when: When = field(default_factory=When)

    @classmethod
    def of(cls, integrations: Iterable[IntegrationConfig]) -> list[Target]:
        return [cls(i.name, i.when) for i in integrations]


class ReportRow(msgspec.Struct):
    """One event of an exam and each integration's state."""

    event_id: str
    attempt_id: str
    user_id: str
    user_name: str
    user_email: str
    released_at: str
    received_at: str | None
    integrations: dict[str, str]
    # the body is gone (retention): the learner is unknown, the states still hold
    expired: bool = False


class ExamSummary(msgspec.Struct):
    exam_id: str
    exam_name: str
    events: int
    learners: int
    integrations: dict[str, dict[str, int]]
    newest_event_at: str | None = None


@dataclass(slots=True)
class _Event:
    event_id: str
    received: int  # ms
    codes: str  # report.lua's, one character per target
    brief: _Brief | None  # None: the body is gone
    released: int = 0  # ms
    taken: tuple[bool, ...] = ()  # per target: its filter takes the event


def _state_counts() -> dict[str, int]:
    return dict.fromkeys(STATES, 0)


@contextmanager
def _gc_paused() -> Iterator[None]:
    """Decoding tens of thousands of bodies into objects kept alive would make CPython's
    collector walk them over and over (a 20,000-event report took 5x as long); nothing in the
    loop makes cycles. Only around code that does not await."""
    enabled = gc.isenabled()
    gc.disable()
    try:
        yield
    finally:
        if enabled:
            gc.enable()


class Reporter:
    """Reports over one store, for the configured integrations."""

    def __init__(self, store: Store, targets: Sequence[Target]) -> None:
        self.store = store
        self.keys = store.keys
        self.targets = list(targets)
        self._script = store.redis.register_script(_REPORT_LUA)
        self._everything = When()

    # -- Redis -------------------------------------------------------------------------------

    async def _codes(self, event_ids: list[str], *, with_body: bool) -> list[tuple[bytes | None, str]]:
        """(body or None, one state character per target) for each event (see report.lua):
        one call per CHUNK events, packed by the store's own packer (redis-py's generic one
        costs seconds for the 140,000 keys of 20,000 events x 3 integrations)."""
        k = self.keys
        names = [t.name for t in self.targets]
        gate = asyncio.Semaphore(CALLS_AT_ONCE)

        async def call(chunk: list[str]) -> list[tuple[bytes | None, str]]:
            keys: list[Any] = [k.failures]
            for event_id in chunk:
                keys.append(k.event(event_id))
                for name in names:
                    keys += [k.pair(event_id, name), k.delivered(event_id, name)]
            args: list[Any] = ["1" if with_body else "0", len(names), *names, *chunk]
            async with gate:
                result = await self.store.run_script(self._script, keys, args)
            return [(body or None, codes.decode()) for body, codes in result]

        chunks = [event_ids[i : i + CHUNK] for i in range(0, len(event_ids), CHUNK)]
        # a few calls in flight: Redis answers one while this process reads another
        answers = await asyncio.gather(*(call(chunk) for chunk in chunks))
        return [answer for chunk_answers in answers for answer in chunk_answers]

    async def _events(self, exam_id: str) -> list[_Event]:
        entries = await self.store.redis.zrange(self.keys.exam(exam_id), 0, -1, withscores=True)
        answers = await self._codes([raw.decode() for raw, _ in entries], with_body=True)
        events: list[_Event] = []
        with _gc_paused():
            for (raw, score), (body, codes) in zip(entries, answers, strict=True):
                events.append(self._event(raw.decode(), int(score), codes, body))
        return events

    def _event(self, event_id: str, received: int, codes: str, body: bytes | None) -> _Event:
        brief: _Brief | None = None
        if body is not None:
            try:
                brief = _brief_decoder.decode(body)
            except msgspec.DecodeError:
                brief = None
        if brief is None:
            return _Event(event_id, received, codes, None)
        # the filters read these attributes only, with the payload's names (worker/filters.py)
        view = cast(ExamResultsReleased, brief)
        taken = tuple(t.when == self._everything or matches(t.when, view) for t in self.targets)
        return _Event(event_id, received, codes, brief, _ms_of(brief.attempt.audit.released_at), taken)

    # -- states ------------------------------------------------------------------------------

    def _states(self, event: _Event, newest: dict[str, int]) -> dict[str, str]:
        brief = event.brief
        stale = brief is not None and newest.get(brief.attempt.id, 0) > event.released
        states: dict[str, str] = {}
        for n, (target, code) in enumerate(zip(self.targets, event.codes, strict=True)):
            state = _CODES.get(code)
            if state is None:
                if brief is not None and not event.taken[n]:
                    state = "skipped"
                elif stale:
                    state = "superseded"  # a newer release of the attempt wins; this one is not sent
                else:
                    state = "pending"
            states[target.name] = state
        return states

    @staticmethod
    def _newest(events: list[_Event]) -> dict[str, int]:
        """Per attempt, the latest ``releasedAt`` among the exam's events (ms)."""
        newest: dict[str, int] = {}
        for event in events:
            if event.brief is not None:
                attempt = event.brief.attempt.id
                newest[attempt] = max(newest.get(attempt, 0), event.released)
        return newest

    # -- reports -----------------------------------------------------------------------------

    async def exam(self, exam_id: str) -> list[ReportRow]:
        """One row per event of the exam: failed first, then pending, then the rest, each
        by arrival."""
        events = await self._events(exam_id)
        with _gc_paused():
            newest = self._newest(events)
            rows = [_row(event, self._states(event, newest)) for event in events]
            rows.sort(key=lambda r: min((_URGENCY[s] for s in r.integrations.values()), default=9))
        return rows

    async def summary(self, since_seconds: float) -> list[ExamSummary]:
        """One row per exam with an event in the window, newest first."""
        cutoff = now_ms() - int(since_seconds * 1000)
        entries = await self.store.redis.zrevrangebyscore(self.keys.exams, "+inf", cutoff, withscores=True)
        summaries = []
        for raw, score in entries:
            exam_id = raw.decode()
            events = await self._events(exam_id)
            with _gc_paused():
                newest = self._newest(events)
                counts = {t.name: _state_counts() for t in self.targets}
                learners: set[str] = set()
                name = ""
                for event in events:
                    for integration, state in self._states(event, newest).items():
                        counts[integration][state] += 1
                    if event.brief is not None:
                        learners.add(event.brief.user.id)
                        name = name or event.brief.exam.name
            summaries.append(ExamSummary(exam_id, name, len(events), len(learners), counts, iso(int(score))))
        return summaries

    async def exam_name(self, exam_id: str) -> str:
        """The exam's name, from its newest event still held ('' if none is)."""
        for raw in await self.store.redis.zrevrange(self.keys.exam(exam_id), 0, 9):
            body = await self.store.redis.get(self.keys.event(raw.decode()))
            if body is not None:
                try:
                    return _brief_decoder.decode(body).exam.name
                except msgspec.DecodeError:
                    continue
        return ""

    async def event_states(self, event_id: str, body: bytes | None) -> dict[str, str]:
        """Each integration's state for one event (``failures show``)."""
        [(_, codes)] = await self._codes([event_id], with_body=False)
        event = self._event(event_id, 0, codes, body)
        newest: dict[str, int] = {}
        if event.brief is not None:
            attempt = event.brief.attempt.id
            releases = await self.store.redis.zrevrange(self.keys.releases(attempt), 0, 0, withscores=True)
            if releases:
                newest[attempt] = int(releases[0][1])
        return self._states(event, newest)


def _ms_of(released_at: str) -> int:
    """``releasedAt`` as epoch ms, as :func:`shared.contract.released_ms` reads it."""
    moment = parse_time(released_at)
    return int(moment.timestamp() * 1000) if moment is not None else 0


def _row(event: _Event, states: dict[str, str]) -> ReportRow:
    received = iso(event.received) if event.received else None
    b = event.brief
    if b is None:
        return ReportRow(event.event_id, "", "", "", "", "", received, states, expired=True)
    return ReportRow(
        event.event_id,
        b.attempt.id,
        b.user.id,
        b.user.name,
        b.user.email,
        b.attempt.audit.released_at,
        received,
        states,
    )


# -- CSV -------------------------------------------------------------------------------------


def exam_csv(rows: list[ReportRow], names: list[str]) -> str:
    """The per-exam report as CSV: one row per event, one column per integration."""
    out = io.StringIO()
    writer = csv.writer(out, lineterminator="\r\n")
    writer.writerow(
        ["event_id", "attempt_id", "user_id", "user_name", "user_email", "released_at", "received_at", *names]
    )
    for r in rows:
        writer.writerow(
            [
                r.event_id,
                r.attempt_id,
                r.user_id,
                _safe_cell(r.user_name),
                _safe_cell(r.user_email),
                r.released_at,
                r.received_at or "",
                *(r.integrations.get(n, "") for n in names),
            ]
        )
    return out.getvalue()


def summary_csv(summaries: list[ExamSummary], names: list[str]) -> str:
    """The exams report as CSV: one row per exam, a column per integration and state."""
    out = io.StringIO()
    writer = csv.writer(out, lineterminator="\r\n")
    writer.writerow(
        ["exam_id", "exam_name", "events", "learners", *(f"{n}:{s}" for n in names for s in STATES)]
    )
    for s in summaries:
        counts = [s.integrations.get(n, {}).get(state, 0) for n in names for state in STATES]
        writer.writerow([s.exam_id, _safe_cell(s.exam_name), s.events, s.learners, *counts])
    return out.getvalue()


def _safe_cell(value: str) -> str:
    """A spreadsheet must never run a learner's name as a formula (CSV injection)."""
    return "'" + value if value[:1] in ("=", "+", "-", "@", "\t", "\r") else value


async def event_summary(reporter: Reporter, event_id: str, detail: dict[str, Any]) -> dict[str, Any]:
    """``failures show``'s opening: who, which exam, what result, when released, and each
    integration's state, as fields and as one paragraph."""
    payload = detail.get("payload")
    body = msgspec.json.encode(payload) if isinstance(payload, dict) else None
    attempts = {d["integration"]: d for d in detail.get("deliveries", [])}
    if reporter.targets:
        states = await reporter.event_states(event_id, body)
    else:  # no configuration at hand: what the delivery records say
        final = {"delivered", "failed", "superseded"}
        states = {n: d["status"] if d["status"] in final else "pending" for n, d in attempts.items()}
    parts = []
    for name, state in states.items():
        known = attempts.get(name)
        extra = ""
        if known is not None and state in ("failed", "pending") and known.get("attempts"):
            extra = f" after {known['attempts']} attempt(s)"
            if known.get("last_error"):
                extra += f": {known['last_error']}"
        parts.append(f"{name} {state}{extra}")
    event = None
    if body is not None:
        try:
            event = decoder.decode(body)
        except msgspec.DecodeError:
            event = None
    summary: dict[str, Any] = {"integrations": states}
    if event is None:
        summary["text"] = "The body has expired: the learner is no longer known. " + "; ".join(parts) + "."
        return summary
    a = event.attempt
    summary.update(
        user_id=event.user.id,
        user_name=event.user.name,
        user_email=event.user.email,
        exam_id=event.exam.id,
        exam_name=event.exam.name,
        grade=a.grade.label,
        passed=a.grade.is_pass,
        score_percent=round(a.score_frac * 100, 1),
        released_at=a.audit.released_at,
    )
    summary["text"] = (
        f"{event.user.name} ({event.user.id}, {event.user.email}) sat {event.exam.name} ({event.exam.id}), "
        f"attempt {a.id}: {a.grade.label} ({'pass' if a.grade.is_pass else 'fail'}, "
        f"{summary['score_percent']:g}%), released {a.audit.released_at}. "
        + ("Deliveries: " + "; ".join(parts) + "." if parts else "No delivery is known.")
    )
    return summary
