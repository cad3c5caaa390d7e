"""Process-wide tuning for the long-running services (``receive`` and ``worker``)."""

from __future__ import annotations

import gc

# Young-generation threshold: a request or job allocates ~100 container objects (a decoded
# body alone is ~55), so CPython's default of 700 runs a collection every few requests.
GEN0_THRESHOLD = 10_000


def tune_gc() -> None:
    """Keep the cyclic garbage collector off the hot path of a service process.

    Everything alive after start-up (modules, settings, the app) lives until exit. ``freeze``
    moves it out of the collector's sight, so a full collection no longer walks ~100k
    long-lived objects (the receiver's p99 latency halved); collecting the young generation
    less often cuts the rest. Call once, after start-up, in the process's own entry point
    (never in a library or a test process, where objects frozen stay for good).
    """
    gc.collect()
    gc.freeze()
    _, gen1, gen2 = gc.get_threshold()
    gc.set_threshold(GEN0_THRESHOLD, gen1, gen2)
