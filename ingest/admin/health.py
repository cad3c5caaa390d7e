"""Per-integration health for the dashboard: recent outcomes and the newest error.

The Inspector has counts and failures but no per-integration success figures (``P:stats``
counters are global), so this reads the delivery state hashes (``P:pair:E:I``) through
the Inspector's Redis client. It is a bounded scan: on a very large keyspace the figures
come from a sample, and the page says so.
"""

from __future__ import annotations

from dataclasses import dataclass

from shared.inspection import Inspector, iso
from shared.store import now_ms

WINDOW_SECONDS = 24 * 3600
MAX_KEYS = 20_000
MAX_SCAN_CALLS = 200


@dataclass
class IntegrationHealth:
    delivered: int = 0  # latest attempt within the window, delivered
    failed: int = 0  # latest attempt within the window, failed for good
    retrying: int = 0  # latest attempt within the window failed, another one is scheduled
    last_error: str = ""
    last_error_ms: int = 0

    @property
    def finished(self) -> int:
        return self.delivered + self.failed

    @property
    def success_rate(self) -> float | None:
        return self.delivered / self.finished if self.finished else None

    @property
    def last_error_at(self) -> str | None:
        return iso(self.last_error_ms) if self.last_error_ms else None


@dataclass
class HealthReport:
    per_integration: dict[str, IntegrationHealth]
    window_seconds: int
    scanned: int
    sampled: bool  # True when the scan stopped at its bound


async def recent_health(
    inspector: Inspector,
    window_seconds: int = WINDOW_SECONDS,
    max_keys: int = MAX_KEYS,
    max_scan_calls: int = MAX_SCAN_CALLS,
) -> HealthReport:
    redis = inspector.redis
    pattern = inspector.keys.pair_pattern()
    keys: list[bytes] = []
    cursor: int = 0
    calls = 0
    sampled = False
    while True:
        cursor, batch = await redis.scan(cursor, match=pattern, count=1000)
        keys.extend(batch)
        calls += 1
        if cursor == 0:
            break
        if len(keys) >= max_keys or calls >= max_scan_calls:
            sampled = True
            break
    keys = keys[:max_keys]
    per: dict[str, IntegrationHealth] = {}
    cutoff = now_ms() - window_seconds * 1000
    for start in range(0, len(keys), 1000):
        chunk = keys[start : start + 1000]
        async with redis.pipeline(transaction=False) as pipe:
            for key in chunk:
                pipe.hmget(key.decode(), ["status", "last_attempt_at", "last_error"])
            results = await pipe.execute()
        for key, (status, last_at, last_error) in zip(chunk, results, strict=True):
            if status is None:  # expired between SCAN and HMGET
                continue
            name = key.decode().rsplit(":", 1)[1]
            health = per.setdefault(name, IntegrationHealth())
            at = int(last_at or 0)
            if last_error and at > health.last_error_ms:
                health.last_error_ms = at
                health.last_error = last_error.decode("utf-8", "replace")
            if at < cutoff:
                continue
            state = status.decode()
            if state == "delivered":
                health.delivered += 1
            elif state == "failed":
                health.failed += 1
            elif state == "retry":
                health.retrying += 1
    return HealthReport(dict(sorted(per.items())), window_seconds, len(keys), sampled)
