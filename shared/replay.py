"""``examhook replay`` and ``examhook rejected replay``: send again on purpose.

Replay bypasses "never deliver twice" deliberately (a destination restored from backup, an
integration added after the release, events that matched nothing until now). For every
event of an exam (or every unmatched event) whose body is still held and which the
integration's current filter takes, ``replay.lua`` decides and starts a fresh round for the
pair atomically: a pair being sent or waiting for a retry is left alone (skipped), any other
gets its delivered marker and failure entry cleared, its attempts reset, and a ``deliver``
job queued. The event ids, and so the ``Idempotency-Key``\\s, stay the same.
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass, field
from typing import Any

import msgspec

from shared.contract import DELIVER, encode_job, released_ms
from shared.payload import ExamResultsReleased, decoder, error_path
from shared.report import Target
from shared.store import Incoming, Store, lua_script, now_ms
from worker.filters import matches

PAIRS_PER_CALL = 200
_REPLAY_LUA = lua_script("replay")
SKIP_REASONS = ("pending", "locked", "superseded", "expired")


@dataclass
class ReplayResult:
    queued: int = 0
    skipped: dict[str, int] = field(default_factory=lambda: dict.fromkeys(SKIP_REASONS, 0))
    events: int = 0  # events looked at
    dry_run: bool = False
    # (event id, integration, answer) for each pair considered
    pairs: list[tuple[str, str, str]] = field(default_factory=list)

    @property
    def skipped_total(self) -> int:
        return sum(self.skipped.values())

    def as_dict(self) -> dict[str, Any]:
        per: dict[str, Counter[str]] = {}
        for _, integration, answer in self.pairs:
            per.setdefault(integration, Counter())[answer] += 1
        return {
            "dry_run": self.dry_run,
            "events": self.events,
            "queued": self.queued,
            "skipped": self.skipped_total,
            "skipped_by_reason": self.skipped,
            "per_integration": {name: dict(counts) for name, counts in sorted(per.items())},
        }


class Replayer:
    def __init__(self, store: Store, targets: list[Target]) -> None:
        self.store = store
        self.keys = store.keys
        self.targets = targets
        self._script = store.redis.register_script(_REPLAY_LUA)

    async def exam(
        self,
        exam_id: str,
        *,
        integration: str | None = None,
        since_seconds: float | None = None,
        dry_run: bool = False,
    ) -> ReplayResult:
        """Replay the events of ``exam_id`` (those that arrived within ``since_seconds``)."""
        low: float | str = "-inf" if since_seconds is None else now_ms() - int(since_seconds * 1000)
        raw = await self.store.redis.zrangebyscore(self.keys.exam(exam_id), low, "+inf")
        return await self._replay([r.decode() for r in raw], integration, dry_run)

    async def unmatched(self, *, integration: str | None = None, dry_run: bool = False) -> ReplayResult:
        """Deliver the events that matched no integration and that one takes now."""
        raw = await self.store.redis.zrange(self.keys.unmatched, 0, -1)
        return await self._replay([r.decode() for r in raw], integration, dry_run)

    async def _replay(self, event_ids: list[str], only: str | None, dry_run: bool) -> ReplayResult:
        targets = [t for t in self.targets if only is None or t.name == only]
        result = ReplayResult(events=len(event_ids), dry_run=dry_run)
        for start in range(0, len(event_ids), 500):
            chunk = event_ids[start : start + 500]
            bodies = await self.store.redis.mget([self.keys.event(e) for e in chunk])
            pairs: list[tuple[str, str, str, int]] = []
            for event_id, body in zip(chunk, bodies, strict=True):
                event = _decode(body)
                if event is None:
                    for target in targets:
                        result.pairs.append((event_id, target.name, "expired"))
                        result.skipped["expired"] += 1
                    continue
                for target in targets:
                    if matches(target.when, event):
                        pairs.append((event_id, target.name, event.attempt.id, released_ms(event)))
            for p in range(0, len(pairs), PAIRS_PER_CALL):
                await self._call(pairs[p : p + PAIRS_PER_CALL], dry_run, result)
        return result

    async def _call(
        self, pairs: list[tuple[str, str, str, int]], dry_run: bool, result: ReplayResult
    ) -> None:
        k = self.keys
        now = now_ms()
        keys: list[str] = [k.queue, k.failures, k.unmatched, k.stats]
        args: list[Any] = [now, self.store.payload_ttl_ms, "1" if dry_run else "0"]
        for event_id, name, attempt_id, released in pairs:
            job_id = k.deliver_job_id(event_id, name)
            keys += [
                k.event(event_id),
                k.pair(event_id, name),
                k.attempts(event_id, name),
                k.delivered(event_id, name),
                k.lock(event_id, name),
                k.releases(attempt_id),
                k.job(job_id),
                k.in_progress(job_id),
            ]
            args += [event_id, name, attempt_id, released, encode_job(DELIVER, (event_id, name), now), job_id]
        answers = await self._script(keys=keys, args=args)
        for (event_id, name, _, _), raw in zip(pairs, answers, strict=True):
            answer = raw.decode()
            result.pairs.append((event_id, name, answer))
            if answer == "queued":
                result.queued += 1
            else:
                result.skipped[answer] = result.skipped.get(answer, 0) + 1


def _decode(body: bytes | None) -> ExamResultsReleased | None:
    if body is None:
        return None
    try:
        return decoder.decode(body)
    except msgspec.DecodeError:
        return None


# -- the quarantine ----------------------------------------------------------------------------


@dataclass(frozen=True)
class RejectedReplay:
    reject_id: str
    result: str  # accepted | duplicate | rejected | unknown
    event_id: str | None = None
    error: str | None = None
    detail: str | None = None
    path: str | None = None


async def replay_rejected(store: Store, reject_ids: list[str]) -> list[RejectedReplay]:
    """Submit quarantined bodies again, as the receiver would take them now: decoded by the
    current payload model, identified, and queued with dedup in one atomic write. An accepted
    (or duplicate) body leaves the quarantine; one still rejected stays, with its old error."""
    from shared.inspection import Inspector

    inspector = Inspector(store)
    out: list[RejectedReplay] = []
    for reject_id in reject_ids:
        item = await inspector.rejected_one(reject_id)
        if item is None:
            out.append(RejectedReplay(reject_id, "unknown", error="no such rejected body (or expired)"))
            continue
        if item.error == "invalid_json" and item.detail.startswith("body is not valid UTF-8"):
            # the quarantine holds a lenient decoding, not the bytes that were sent
            out.append(
                RejectedReplay(
                    reject_id,
                    "rejected",
                    error="invalid_json",
                    detail="the body was not UTF-8; its quarantined copy is not what was sent: "
                    "have it sent again",
                )
            )
            continue
        body = item.body.encode("utf-8")
        try:
            event = decoder.decode(body)
        except msgspec.ValidationError as exc:
            detail, path = error_path(exc)
            out.append(
                RejectedReplay(reject_id, "rejected", error="invalid_payload", detail=detail, path=path)
            )
            continue
        except (msgspec.DecodeError, RecursionError) as exc:
            out.append(RejectedReplay(reject_id, "rejected", error="invalid_json", detail=str(exc)))
            continue
        incoming = Incoming.of(event, body)
        [accepted] = await store.accept_batch([incoming])
        await inspector.purge_rejected([reject_id])
        out.append(
            RejectedReplay(reject_id, "accepted" if accepted else "duplicate", event_id=incoming.event_id)
        )
    return out
