"""The queue contract: what the receiver writes and the worker reads.

Everything examhook stores in Redis lives under one prefix (``examhook`` by default),
except the keys arq itself owns (``arq:job:<job id>``, ``arq:in-progress:<job id>``,
``arq:retry:<job id>``, ``arq:result:<job id>``, and the ``arq:abort`` set arq's worker
removes finished job ids from); those are made unique by putting the prefix into every job
id. arq's default queue ``arq:queue`` is not used: the queue is ``P:queue``. A Redis ACL
user for examhook therefore needs ``~P:*`` and ``~arq:*`` (see the README's "Redis"
section; ``examhook check-config --redis`` checks it).

Keys (``P`` is the prefix, ``E`` an event id, ``I`` an integration name, ``A`` an attempt
id, ``X`` an exam id); :class:`Keys` is the one place that spells them:

======================  =========  =====================================================
key                     type       holds
======================  =========  =====================================================
P:queue                 zset       arq's queue of job ids, scored by run time (ms)
P:seen:E                string     dedup record: the event was accepted (dedup window)
P:event:E               string     the body exactly as received (payload retention)
P:releases:A            zset       the releases of attempt A: event ids by ``releasedAt`` (ms)
P:exams                 zset       exam ids, scored by their newest event (ms)
P:exam:X                zset       the exam's event ids, scored by arrival (ms)
P:pair:E:I              hash       delivery state of (event, integration)
P:attempts:E:I          list       one JSON record per attempt
P:delivered:E:I         string     set once the pair succeeded: never deliver again
P:lock:E:I              string     held while one worker sends the pair
P:failures              zset       ``E:I`` of failed pairs, scored by last attempt (ms)
P:unmatched             zset       events that matched no integration, by time (ms)
P:rejected              zset       ids of quarantined bodies, by time (µs)
P:rejected:R            string     one quarantined body with its error (JSON)
P:stats                 hash       counters (accepted, duplicate, rejected, ...)
P:workers               hash       one entry per running worker: host, integrations, last report
======================  =========  =====================================================

Jobs are arq jobs serialised with msgpack (see :func:`encode_job`):

* ``handle_events([[E, attempt_id, released_ms], ...], integration=None)`` fans up to
  :data:`MAX_EVENTS_PER_JOB` events out to their integrations: the first attempt of every
  pair. The receiver writes one per chunk of the events one group commit accepted (job id
  ``P:b<count>-<token>``), so a burst costs arq's per-job work once per chunk, not per event.
  A worker whose lane for one integration is busy hands that integration's pairs on in a job
  of the same form naming the integration (see ``worker/lanes.py``).
* ``deliver(E, I)`` retries one pair (job id ``P:E:I``).
"""

from __future__ import annotations

import hashlib
import re
import secrets
from typing import Any

import msgspec
from arq.constants import (
    health_check_key_suffix,
    in_progress_key_prefix,
    job_key_prefix,
    result_key_prefix,
    retry_key_prefix,
)

from shared.payload import ExamResultsReleased, parse_time

HANDLE_EVENTS = "handle_events"
DELIVER = "deliver"

# Events per fan-out job. Each job's events are sent at once, so a worker has up to
# ``concurrency`` x this many deliveries in flight; at most 15 (see ingest.lua).
MAX_EVENTS_PER_JOB = 8
assert 0 < MAX_EVENTS_PER_JOB <= 15, "ingest.lua writes the event list with a msgpack fixarray header"

# P:b<count>-<token> (the receiver's), P:b<count>@<integration>-<token> (handed on for one lane)
_FANOUT_JOB_RE = re.compile(r"b(\d+)(?:@([a-z0-9-]+))?-")

_msgpack_encoder = msgspec.msgpack.Encoder()
_msgpack_decoder = msgspec.msgpack.Decoder()
_json_encoder = msgspec.json.Encoder()


def event_id_of(event: ExamResultsReleased) -> str:
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
    moment = parse_time(event.attempt.audit.released_at)
    return int(moment.timestamp() * 1000) if moment is not None else 0


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
    """Key names under one prefix, arq's own keys for our jobs, and the patterns that find
    them: the one place that spells them (the Lua scripts get their keys from here)."""

    # arq's keys, prefixed by job id (arq.constants)
    ARQ_JOB = job_key_prefix
    ARQ_IN_PROGRESS = in_progress_key_prefix
    ARQ_RETRY = retry_key_prefix
    ARQ_RESULT = result_key_prefix

    def __init__(self, prefix: str) -> None:
        self.prefix = prefix
        self.queue = f"{prefix}:queue"
        self.failures = f"{prefix}:failures"
        self.unmatched = f"{prefix}:unmatched"
        self.rejected = f"{prefix}:rejected"
        self.stats = f"{prefix}:stats"
        self.exams = f"{prefix}:exams"
        self.workers = f"{prefix}:workers"
        self.health_check = f"{prefix}:queue{health_check_key_suffix}"
        self.readyz = f"{prefix}:readyz"  # the receiver's /readyz write probe (10 s)
        # prefixes the Lua scripts complete themselves (the attempt id is read from Redis)
        self.releases_prefix = f"{prefix}:releases:"
        # job ids are made inside ingest.lua: P:b<count>-<token>-<n>
        self.fanout_job_id_prefix = f"{prefix}:b"
        # a key in arq's job key space that is never written: ingest.lua declares it so an ACL
        # user without arq's keys is refused before anything is written
        self.job_key_space = f"{job_key_prefix}{prefix}:b-acl-check"
        # every key of ours, and every arq key of one of our jobs (for SCAN and ACL advice)
        self.all_pattern = f"{prefix}:*"
        self.arq_patterns = tuple(
            f"{p}{prefix}:*"
            for p in (job_key_prefix, in_progress_key_prefix, retry_key_prefix, result_key_prefix)
        )

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

    def releases(self, attempt_id: str) -> str:
        """The releases of one attempt: event ids scored by ``releasedAt`` (the newest wins)."""
        return f"{self.releases_prefix}{attempt_id}"

    def exam(self, exam_id: str) -> str:
        """The exam's event ids, by arrival."""
        return f"{self.prefix}:exam:{exam_id}"

    def rejected_item(self, reject_id: str) -> str:
        return f"{self.prefix}:rejected:{reject_id}"

    def job(self, job_id: str) -> str:
        """arq's key holding a job."""
        return f"{job_key_prefix}{job_id}"

    def in_progress(self, job_id: str) -> str:
        return f"{in_progress_key_prefix}{job_id}"

    def job_retry(self, job_id: str) -> str:
        return f"{retry_key_prefix}{job_id}"

    def pair_pattern(self, event_id: str = "*", integration: str = "*") -> str:
        """SCAN pattern of pair records (``P:pair:E:I``)."""
        return f"{self.prefix}:pair:{event_id}:{integration}"

    def per_pair_patterns(self, event_id: str) -> tuple[str, ...]:
        """SCAN patterns of every per-pair key of one event."""
        return tuple(
            f"{self.prefix}:{kind}:{event_id}:*" for kind in ("pair", "attempts", "delivered", "lock")
        )

    @property
    def in_progress_pattern(self) -> str:
        """SCAN pattern of arq's in-progress keys of our jobs."""
        return f"{in_progress_key_prefix}{self.prefix}:*"

    @staticmethod
    def job_id_in_progress(key: str) -> str:
        """The job id of an arq in-progress key."""
        return key.removeprefix(in_progress_key_prefix)

    @property
    def event_pattern(self) -> str:
        """SCAN pattern of queued bodies (``P:event:E``)."""
        return f"{self.prefix}:event:*"

    def new_fanout_job_id(self, count: int, integration: str | None = None) -> str:
        """A fresh ``handle_events`` job id for ``count`` events: ``P:b<count>-<random>``, or
        ``P:b<count>@<integration>-<random>`` for a job handed on for one integration's lane
        (the count is for ``examhook queue``; ingest.lua spells the first form)."""
        lane = f"@{integration}" if integration else ""
        return f"{self.fanout_job_id_prefix}{count}{lane}-{secrets.token_hex(12)}"

    def is_fanout_batch(self, job_id: str) -> bool:
        """A ``handle_events`` job id (see :meth:`new_fanout_job_id`)?"""
        start = len(self.prefix) + 1
        return job_id.startswith(f"{self.prefix}:") and _FANOUT_JOB_RE.match(job_id, start) is not None

    def fanout_job_events(self, job_id: str) -> int:
        """How many events a fan-out job id carries, 0 for other jobs."""
        match = _FANOUT_JOB_RE.match(job_id[len(self.prefix) + 1 :])
        return int(match[1]) if match is not None else 0

    def deliver_job_id(self, event_id: str, integration: str) -> str:
        return f"{self.prefix}:{event_id}:{integration}"

    def parse_job_id(self, job_id: str) -> tuple[str, str | None]:
        """(event id, integration) of a ``deliver`` job; integration None for fan-out jobs."""
        rest = job_id[len(self.prefix) + 1 :]
        event, _, integration = rest.partition(":")
        return event, integration or None

    def lane_of(self, job_id: str) -> str | None:
        """The one integration a job is for (a retry job, a job handed on for a lane), or None
        (the receiver's fan-out jobs, for every integration)."""
        rest = job_id[len(self.prefix) + 1 :]
        match = _FANOUT_JOB_RE.match(rest)
        if match is not None:
            return match[2]
        _, _, integration = rest.partition(":")
        return integration or None


def pair_member(event_id: str, integration: str) -> str:
    return f"{event_id}:{integration}"


def split_pair_member(member: str) -> tuple[str, str]:
    event, _, integration = member.partition(":")
    return event, integration
