"""Exponential backoff with jitter, bounded by an integration's base and max."""

from __future__ import annotations

import random

# However long a destination asks us to wait, check again within a day.
MAX_RETRY_AFTER_SECONDS = 86_400.0


def backoff_seconds(attempt: int, base: float, maximum: float, retry_after: float | None = None) -> float:
    """Delay before attempt ``attempt + 1``: ``base * 2**(attempt-1)`` capped at ``maximum``,
    jittered into its upper half, never below ``base``; at least ``retry_after`` when given."""
    ceiling = min(maximum, base * 2 ** min(attempt - 1, 60))
    delay = max(base, random.uniform(ceiling / 2, ceiling))
    if retry_after is not None:
        delay = max(delay, min(retry_after, MAX_RETRY_AFTER_SECONDS))
    return delay
