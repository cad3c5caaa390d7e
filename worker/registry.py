"""Which workers run, where, with which integrations: ``P:workers``, one entry per process.

* ``examhook worker --check`` answers for the workers on its own host (in a container,
  that container's worker), not for any worker anywhere: a worker on another machine, or
  another worker stopping, changes nothing.
* Workers that disagree on their integrations are a silent loss in the making (an event
  taken by one is never delivered to an integration only the other has): every worker
  says so, loudly, at start and whenever it refreshes its entry.
"""

from __future__ import annotations

import hashlib
import logging
import os
import secrets
import socket
import time
from collections.abc import Awaitable
from dataclasses import dataclass
from typing import cast

import msgspec
from redis.asyncio import Redis

from shared.contract import Keys
from shared.settings import Settings

log = logging.getLogger("examhook.worker")

# An entry not refreshed for this many health-check intervals (a worker that died without
# leaving) is removed.
FORGET_INTERVALS = 30


class WorkerEntry(msgspec.Struct):
    host: str
    pid: int
    integrations: list[str]
    fingerprint: str  # of the integrations' names, types and filters
    started_ms: int
    seen_ms: int
    interval_seconds: float


def fingerprint(settings: Settings) -> str:
    """A short digest of what decides where events go: each integration's name, type and filter."""
    data = [(i.name, i.__struct_config__.tag, msgspec.to_builtins(i.when)) for i in settings.integrations]
    return hashlib.sha256(msgspec.json.encode(sorted(data, key=lambda d: str(d[0])))).hexdigest()[:12]


def this_host() -> str:
    return socket.gethostname()


@dataclass
class Registry:
    redis: Redis
    keys: Keys
    settings: Settings

    def __post_init__(self) -> None:
        self.worker_id = f"{this_host()}:{os.getpid()}:{secrets.token_hex(3)}"
        self.started_ms = _now_ms()
        self._warned: set[str] = set()

    def _entry(self) -> WorkerEntry:
        return WorkerEntry(
            host=this_host(),
            pid=os.getpid(),
            integrations=sorted(i.name for i in self.settings.integrations),
            fingerprint=fingerprint(self.settings),
            started_ms=self.started_ms,
            seen_ms=_now_ms(),
            interval_seconds=float(self.settings.worker.health_check_interval_seconds),
        )

    async def report(self) -> None:
        """Refresh this worker's entry, drop long-dead ones, and warn about disagreement."""
        mine = self._entry()
        await cast(
            Awaitable[int],
            self.redis.hset(self.keys.workers, self.worker_id, msgspec.json.encode(mine).decode()),
        )
        await self.redis.pexpire(self.keys.workers, int(mine.interval_seconds * FORGET_INTERVALS * 1000))
        others = await read_entries(self.redis, self.keys)
        forget = [
            worker_id
            for worker_id, entry in others.items()
            if mine.seen_ms - entry.seen_ms > entry.interval_seconds * FORGET_INTERVALS * 1000
        ]
        if forget:
            await cast(Awaitable[int], self.redis.hdel(self.keys.workers, *forget))
        for worker_id, entry in others.items():
            if worker_id == self.worker_id or not is_alive(entry, mine.seen_ms):
                continue
            if entry.fingerprint != mine.fingerprint and entry.fingerprint not in self._warned:
                self._warned.add(entry.fingerprint)
                log.error(
                    "workers disagree on their integrations: an event one of them takes is not delivered"
                    " to an integration only the other has (give every worker the same configuration;"
                    " `examhook replay` delivers what was missed)",
                    extra={
                        "this_worker": ",".join(mine.integrations) or "(none)",
                        "other_worker": f"{worker_id}: " + (",".join(entry.integrations) or "(none)"),
                    },
                )

    async def leave(self) -> None:
        await cast(Awaitable[int], self.redis.hdel(self.keys.workers, self.worker_id))


async def read_entries(redis: Redis, keys: Keys) -> dict[str, WorkerEntry]:
    raw = await cast(Awaitable[dict[bytes, bytes]], redis.hgetall(keys.workers))
    entries = {}
    for worker_id, value in raw.items():
        try:
            entries[worker_id.decode()] = msgspec.json.decode(value, type=WorkerEntry)
        except msgspec.DecodeError:
            continue
    return entries


def is_alive(entry: WorkerEntry, now_ms: int) -> bool:
    """Reported within its health-check interval (and a second of slack)."""
    return now_ms - entry.seen_ms <= (entry.interval_seconds + 1) * 1000


def _now_ms() -> int:
    return int(time.time() * 1000)
