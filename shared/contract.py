"""The queue contract: what the receiver writes and the worker reads.

Everything examhook stores in Redis lives under one prefix (``examhook`` by default),
except the keys arq itself owns (``arq:job:<job id>``, ``arq:in-progress:<job id>``,
``arq:retry:<job id>``); those are made unique by putting the prefix into every job id.

Keys (``P`` is the prefix, ``E`` an event id, ``I`` an integration name):

======================  =========  =====================================================
key                     type       holds
======================  =========  =====================================================
P:queue                 zset       arq's queue of job ids, scored by run time (ms)
P:seen:E                string     dedup record: the event was accepted (dedup window)
P:event:E               string     the body exactly as received (payload retention)
P:latest:A              string     newest ``releasedAt`` (ms) seen for attempt id A
P:pair:E:I              hash       delivery state of (event, integration)
P:attempts:E:I          list       one JSON record per attempt
P:delivered:E:I         string     set once the pair succeeded: never deliver again
P:lock:E:I              string     held while one worker sends the pair
P:failures              zset       ``E:I`` of failed pairs, scored by last attempt (ms)
P:unmatched             zset       events that matched no integration, by time (ms)
P:rejected              zset       ids of quarantined bodies, by time (µs)
P:rejected:R            hash       one quarantined body with its error
P:stats                 hash       counters (accepted, duplicate, rejected, ...)
======================  =========  =====================================================

Jobs are arq jobs serialised with msgpack (see :func:`encode_job`):

* ``handle_events([[E, attempt_id, released_ms], ...])`` fans up to
  :data:`MAX_EVENTS_PER_JOB` events out to their integrations: the first attempt of every
  pair. The receiver writes one per chunk of the events one group commit accepted (job id
  ``P:b<count>-<token>``), so a burst costs arq's per-job work once per chunk, not per event.
* ``deliver(E, I)`` retries one pair (job id ``P:E:I``).
* ``handle_event(E, attempt_id, released_ms)`` (job id ``P:E``) is the one-event form, still
  run for jobs queued by an earlier version.
"""

from __future__ import annotations

import hashlib
import re
import secrets
from datetime import UTC, datetime
from typing import Any

import msgspec

from shared.payload import ExamResultsReleased

HANDLE_EVENT = "handle_event"
HANDLE_EVENTS = "handle_events"
DELIVER = "deliver"

# Events per fan-out job. Each job's events are sent at once, so a worker has up to
# ``concurrency`` x this many deliveries in flight; at most 15 (see ingest.lua).
MAX_EVENTS_PER_JOB = 8
assert 0 < MAX_EVENTS_PER_JOB <= 15, "ingest.lua writes the event list with a msgpack fixarray header"

_FANOUT_JOB_RE = re.compile(r"b(\d+)-")

_msgpack_encoder = msgspec.msgpack.Encoder()
_msgpack_decoder = msgspec.msgpack.Decoder()
_json_encoder = msgspec.json.Encoder()


def event_id(event: ExamResultsReleased) -> str:
    """The event's identity: ``meta.eventName`` + ``attempt.id`` + ``attempt.audit.releasedAt``.

    A resend with another ``meta.timestamp`` gets the same id (a duplicate); a re-release
    of the same attempt (later ``releasedAt``) gets a new one.
    """
    # a JSON array: unambiguous whatever characters the three values contain
    material = _json_encoder.encode(
        [event.meta.event_name, event.attempt.id, event.attempt.audit.released_at]
    )
    return "evt_" + hashlib.sha256(material).hexdigest()[:32]


def released_ms(event: ExamResultsReleased) -> int:
    """``attempt.audit.releasedAt`` as epoch milliseconds (0 when it is not ISO 8601)."""
    try:
        moment = datetime.fromisoformat(event.attempt.audit.released_at)
    except ValueError:
        return 0
    if moment.tzinfo is None:  # no offset given: read as UTC, never as this machine's zone
        moment = moment.replace(tzinfo=UTC)
    return int(moment.timestamp() * 1000)


def encode_job(
    function: str, args: tuple[Any, ...], enqueue_time_ms: int, job_try: int | None = None
) -> bytes:
    """An arq job exactly as ``arq.jobs.serialize_job`` would write it with our serializer."""
    return _msgpack_encoder.encode({"t": job_try, "f": function, "a": args, "k": {}, "et": enqueue_time_ms})


def fanout_job_template(enqueue_time_ms: int) -> tuple[bytes, bytes]:
    """A ``handle_events`` job cut where its event list goes: ingest.lua writes the list
    (a msgpack array of the pre-encoded ``[E, attempt_id, released_ms]`` of every accepted
    event) between the two halves."""
    marker = "\x00events\x00"
    job = encode_job(HANDLE_EVENTS, (marker,), enqueue_time_ms)
    head, found, tail = job.partition(_msgpack_encoder.encode(marker))
    assert found and tail
    return head, tail


def fanout_entry(event_id: str, attempt_id: str, released: int) -> bytes:
    """One event of a ``handle_events`` job, msgpack-encoded."""
    return _msgpack_encoder.encode((event_id, attempt_id, released))


def job_serializer(obj: Any) -> bytes:
    """arq ``job_serializer``: msgpack; exceptions (in job results) become their text."""
    return msgspec.msgpack.encode(obj, enc_hook=repr)


def job_deserializer(data: bytes) -> Any:
    return _msgpack_decoder.decode(data)


class Keys:
    """Key names under one prefix; the single place that spells them."""

    def __init__(self, prefix: str) -> None:
        self.prefix = prefix
        self.queue = f"{prefix}:queue"
        self.failures = f"{prefix}:failures"
        self.unmatched = f"{prefix}:unmatched"
        self.rejected = f"{prefix}:rejected"
        self.stats = f"{prefix}:stats"
        self.health_check = f"{prefix}:queue:health-check"

    def event(self, event_id: str) -> str:
        return f"{self.prefix}:event:{event_id}"

    def seen(self, event_id: str) -> str:
        return f"{self.prefix}:seen:{event_id}"

    def pair(self, event_id: str, integration: str) -> str:
        return f"{self.prefix}:pair:{event_id}:{integration}"

    def attempts(self, event_id: str, integration: str) -> str:
        return f"{self.prefix}:attempts:{event_id}:{integration}"

    def delivered(self, event_id: str, integration: str) -> str:
        return f"{self.prefix}:delivered:{event_id}:{integration}"

    def lock(self, event_id: str, integration: str) -> str:
        return f"{self.prefix}:lock:{event_id}:{integration}"

    def latest(self, attempt_id: str) -> str:
        return f"{self.prefix}:latest:{attempt_id}"

    def rejected_item(self, reject_id: str) -> str:
        return f"{self.prefix}:rejected:{reject_id}"

    def handle_job_id(self, event_id: str) -> str:
        """The one-event fan-out job of earlier versions (see :data:`HANDLE_EVENT`)."""
        return f"{self.prefix}:{event_id}"

    def new_fanout_job_id(self, count: int) -> str:
        """A fresh ``handle_events`` job id for ``count`` events: ``P:b<count>-<random>``
        (the count is for ``examhook queue``; ingest.lua spells the same form)."""
        return f"{self.prefix}:b{count}-{secrets.token_hex(12)}"

    def is_fanout_batch(self, job_id: str) -> bool:
        """A ``handle_events`` job id (see :meth:`new_fanout_job_id`)?"""
        start = len(self.prefix) + 1
        return job_id.startswith(f"{self.prefix}:") and _FANOUT_JOB_RE.match(job_id, start) is not None

    def fanout_job_events(self, job_id: str) -> int:
        """How many events a fan-out job id carries (1 for the one-event form), 0 for others."""
        rest = job_id[len(self.prefix) + 1 :]
        match = _FANOUT_JOB_RE.match(rest)
        if match is not None:
            return int(match[1])
        return 0 if ":" in rest else 1

    def deliver_job_id(self, event_id: str, integration: str) -> str:
        return f"{self.prefix}:{event_id}:{integration}"

    def parse_job_id(self, job_id: str) -> tuple[str, str | None]:
        """(event id, integration) of a ``deliver`` job; integration None for fan-out jobs."""
        rest = job_id[len(self.prefix) + 1 :]
        event, _, integration = rest.partition(":")
        return event, integration or None


def pair_member(event_id: str, integration: str) -> str:
    return f"{event_id}:{integration}"


def split_pair_member(member: str) -> tuple[str, str]:
    event, _, integration = member.partition(":")
    return event, integration
