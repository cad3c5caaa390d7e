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

import csv
import io
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from importlib.resources import files
from typing import Any, Literal

import msgspec

from shared.contract import released_ms
from shared.inspection import iso
from shared.payload import ExamResultsReleased, decoder
from shared.settings import Integration, When
from shared.store import Store, now_ms
from worker.filters import matches

State = Literal["delivered", "pending", "failed", "skipped", "superseded"]
STATES: tuple[State, ...] = ("delivered", "pending", "failed", "skipped", "superseded")
# failed first, then pending: what an operator has to look at
_URGENCY = {"failed": 0, "pending": 1, "superseded": 2, "skipped": 3, "delivered": 4}
_CODES: dict[str, State] = {"d": "delivered", "f": "failed", "s": "superseded"}
# events per report.lua call, and calls sent in one pipeline
CHUNK = 500
CALLS_PER_PIPELINE = 4

_REPORT_LUA = (files("shared") / "lua" / "report.lua").read_text(encoding="utf-8")


# -- the little of a body a report shows ---------------------------------------------------


class _User(msgspec.Struct, rename="camel", gc=False):
    id: str
    name: str
    email: str


class _Audit(msgspec.Struct, rename="camel", gc=False):
    released_at: str


class _Attempt(msgspec.Struct, rename="camel", gc=False):
    id: str
    audit: _Audit


class _Exam(msgspec.Struct, rename="camel", gc=False):
    id: str
    name: str


class _Brief(msgspec.Struct, rename="camel", gc=False):
    user: _User
    attempt: _Attempt
    exam: _Exam


_brief_decoder = msgspec.json.Decoder(_Brief)


@dataclass(frozen=True, slots=True)
class Target:
    """An integration as the report sees it: its name and its current filter."""

    name: str
    when: When = field(default_factory=When)

    @classmethod
    def of(cls, integrations: Iterable[Integration]) -> list[Target]:
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
    received: int
    codes: str
    brief: _Brief | None
    full: ExamResultsReleased | None
    released: int = 0


def _state_counts() -> dict[str, int]:
    return dict.fromkeys(STATES, 0)


class Reporter:
    """Reports over one store, for the configured integrations."""

    def __init__(self, store: Store, targets: Sequence[Target]) -> None:
        self.store = store
        self.keys = store.keys
        self.targets = list(targets)
        self._script = store.redis.register_script(_REPORT_LUA)
        # with no filter anywhere, nothing is skipped and the bodies need not be fully decoded
        self._filtered = any(t.when != When() for t in self.targets)

    # -- Redis -------------------------------------------------------------------------------

    async def _codes(self, event_ids: list[str], *, with_body: bool) -> list[tuple[bytes | None, str]]:
        """(body or None, one state character per target) for each event (see report.lua)."""
        k = self.keys
        names = [t.name for t in self.targets]
        out: list[tuple[bytes | None, str]] = []
        chunks = [event_ids[i : i + CHUNK] for i in range(0, len(event_ids), CHUNK)]
        for start in range(0, len(chunks), CALLS_PER_PIPELINE):
            async with self.store.redis.pipeline(transaction=False) as pipe:
                for chunk in chunks[start : start + CALLS_PER_PIPELINE]:
                    keys: list[str] = [k.failures]
                    for event_id in chunk:
                        keys.append(k.event(event_id))
                        for name in names:
                            keys += [k.pair(event_id, name), k.delivered(event_id, name)]
                    args: list[Any] = ["1" if with_body else "0", len(names), *names, *chunk]
                    await self._script(keys=keys, args=args, client=pipe)
                results = await pipe.execute()
            for result in results:
                out += [(body or None, codes.decode()) for body, codes in result]
        return out

    async def _events(self, exam_id: str) -> list[_Event]:
        entries = await self.store.redis.zrange(self.keys.exam(exam_id), 0, -1, withscores=True)
        event_ids = [raw.decode() for raw, _ in entries]
        answers = await self._codes(event_ids, with_body=True)
        events: list[_Event] = []
        for (raw, score), (body, codes) in zip(entries, answers, strict=True):
            brief: _Brief | None = None
            full: ExamResultsReleased | None = None
            released = 0
            if body is not None:
                try:
                    if self._filtered:
                        full = decoder.decode(body)
                        released = released_ms(full)
                    else:
                        brief = _brief_decoder.decode(body)
                        released = _ms_of(brief.attempt.audit.released_at)
                except msgspec.DecodeError:
                    pass
            events.append(_Event(raw.decode(), int(score), codes, brief, full, released))
        return events

    # -- states ------------------------------------------------------------------------------

    def _states(self, event: _Event, newest: dict[str, int]) -> dict[str, str]:
        attempt = _attempt_id(event)
        stale = attempt is not None and newest.get(attempt, 0) > _released(event)
        states: dict[str, str] = {}
        for target, code in zip(self.targets, event.codes, strict=True):
            state = _CODES.get(code)
            if state is None:
                if event.full is not None and not matches(target.when, event.full):
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
            attempt = _attempt_id(event)
            if attempt is not None:
                newest[attempt] = max(newest.get(attempt, 0), _released(event))
        return newest

    # -- reports -----------------------------------------------------------------------------

    async def exam(self, exam_id: str) -> list[ReportRow]:
        """One row per event of the exam: failed first, then pending, then the rest, each
        by arrival."""
        events = await self._events(exam_id)
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
            newest = self._newest(events)
            counts = {t.name: _state_counts() for t in self.targets}
            learners: set[str] = set()
            name = ""
            for event in events:
                for integration, state in self._states(event, newest).items():
                    counts[integration][state] += 1
                user = _user_id(event)
                if user is not None:
                    learners.add(user)
                name = name or _exam_name(event)
            summaries.append(ExamSummary(exam_id, name, len(events), len(learners), counts, iso(int(score))))
        return summaries

    async def event_states(self, event_id: str, body: bytes | None) -> dict[str, str]:
        """Each integration's state for one event (``failures show``)."""
        [(_, codes)] = await self._codes([event_id], with_body=False)
        full = None
        if body is not None:
            try:
                full = decoder.decode(body)
            except msgspec.DecodeError:
                full = None
        event = _Event(event_id, 0, codes, None, full, released_ms(full) if full else 0)
        newest: dict[str, int] = {}
        if full is not None:
            releases = await self.store.redis.zrevrange(
                self.keys.releases(full.attempt.id), 0, 0, withscores=True
            )
            if releases:
                newest[full.attempt.id] = int(releases[0][1])
        return self._states(event, newest)


def _attempt_id(event: _Event) -> str | None:
    if event.full is not None:
        return event.full.attempt.id
    return event.brief.attempt.id if event.brief is not None else None


def _released(event: _Event) -> int:
    return event.released


def _ms_of(released_at: str) -> int:
    """``releasedAt`` as epoch ms, as :func:`shared.contract.released_ms` reads it."""
    try:
        moment = datetime.fromisoformat(released_at)
    except ValueError:
        return 0
    if moment.tzinfo is None:
        moment = moment.replace(tzinfo=UTC)
    return int(moment.timestamp() * 1000)


def _user_id(event: _Event) -> str | None:
    if event.full is not None:
        return event.full.user.id
    return event.brief.user.id if event.brief is not None else None


def _exam_name(event: _Event) -> str:
    if event.full is not None:
        return event.full.exam.name
    return event.brief.exam.name if event.brief is not None else ""


def _row(event: _Event, states: dict[str, str]) -> ReportRow:
    received = iso(event.received) if event.received else None
    if event.full is not None:
        f = event.full
        return ReportRow(
            event.event_id,
            f.attempt.id,
            f.user.id,
            f.user.name,
            f.user.email,
            f.attempt.audit.released_at,
            received,
            states,
        )
    if event.brief is not None:
        b = event.brief
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
    return ReportRow(event.event_id, "", "", "", "", "", received, states, expired=True)


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
    states = await reporter.event_states(event_id, body)
    attempts = {d["integration"]: d for d in detail.get("deliveries", [])}
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
        + ("Deliveries: " + "; ".join(parts) + "." if parts else "No integration is configured.")
    )
    return summary
