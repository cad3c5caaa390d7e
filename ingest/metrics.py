"""Prometheus metrics of one receiver process (its own registry, so tests can run many).

``receive --processes N`` runs N processes behind one port, and a scrape reaches one of
them. So that every scrape shows the receiver as a whole (counters that never jump
between two processes' values, which Prometheus would take for resets), the parent gives
its children a private directory in ``PROMETHEUS_MULTIPROC_DIR`` (removed when it stops):
prometheus_client then keeps each process's values in a file there, and /metrics of any
process sums them all (its multiprocess mode). The queue gauges, read from Redis at
scrape time, show the most recent reading.
"""

from __future__ import annotations

import os
from bisect import bisect_left
from typing import Any

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest
from prometheus_client.multiprocess import MultiProcessCollector

from shared.contract import MAX_EVENTS_PER_JOB

MULTIPROCESS_ENV = "PROMETHEUS_MULTIPROC_DIR"


class ReceiverMetrics:
    def __init__(self, registry: CollectorRegistry | None = None) -> None:
        self.registry = registry or CollectorRegistry()
        # what /metrics shows: this process's registry, or every process's values
        self.exposed = self.registry
        directory = os.environ.get(MULTIPROCESS_ENV)
        if directory:
            self.exposed = CollectorRegistry()
            MultiProcessCollector(self.exposed, path=directory)  # type: ignore[no-untyped-call]
        self.requests = Counter(
            "examhook_receiver_requests",
            "Webhook requests answered, by HTTP status.",
            ["status"],
            registry=self.registry,
        )
        self.events = Counter(
            "examhook_receiver_events",
            "Webhook bodies by result: accepted, duplicate, rejected.",
            ["result"],
            registry=self.registry,
        )
        # label children looked up once, not per request
        self.accepted = self.events.labels("accepted")
        self.duplicate = self.events.labels("duplicate")
        self.rejected_events = self.events.labels("rejected")
        self._by_status: dict[int, Any] = {}
        self.enqueue_seconds = Histogram(
            "examhook_receiver_enqueue_seconds",
            "Time from request start to Redis confirming the write.",
            buckets=(0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5),
            registry=self.registry,
        )
        self.batch_size = Histogram(
            "examhook_receiver_batch_events",
            "Events written per Redis round trip (group commit).",
            buckets=(1, 2, 4, 8, 16, 32, 64, 128, 256),
            registry=self.registry,
        )
        self.batch_bytes = Histogram(
            "examhook_receiver_batch_bytes",
            "Body bytes written per Redis round trip (group commit).",
            buckets=(4096, 16384, 65536, 262144, 1 << 20, 2 << 20, 4 << 20, 8 << 20, 16 << 20),
            registry=self.registry,
        )
        # Read from Redis at scrape time (the queue is shared by every receiver and worker).
        self.queue_depth = Gauge(
            "examhook_queue_jobs",
            "Jobs in the queue: due now (queued, including running; a fan-out job carries up to"
            f" {MAX_EVENTS_PER_JOB} events) or scheduled retries.",
            ["state"],
            registry=self.registry,
            multiprocess_mode="mostrecent",
        )
        self.oldest_age = Gauge(
            "examhook_queue_oldest_age_seconds",
            "Age of the oldest job that is due (0 when none).",
            registry=self.registry,
            multiprocess_mode="mostrecent",
        )
        self.failures = Gauge(
            "examhook_failures",
            "Failed deliveries kept for inspection.",
            registry=self.registry,
            multiprocess_mode="mostrecent",
        )
        self.rejected = Gauge(
            "examhook_rejected",
            "Bodies in the quarantine.",
            registry=self.registry,
            multiprocess_mode="mostrecent",
        )

    def exposition(self) -> bytes:
        """The Prometheus text of /metrics."""
        return generate_latest(self.exposed)

    def answered(self, status: int, count: int = 1) -> None:
        child = self._by_status.get(status)
        if child is None:
            child = self._by_status[status] = self.requests.labels(str(status))
        child.inc(count)


def observe_many(histogram: Histogram, values: list[float]) -> None:
    """``histogram.observe(v)`` for every value, with one update per bucket touched rather
    than one per value (each update takes a lock; per request, they cost ~8% of the
    receiver's CPU). prometheus_client keeps each observation in its first matching bucket
    (the cumulative counts are made at scrape time); this does the same. Its ``_buckets``,
    ``_sum`` and ``_upper_bounds`` are private: prometheus-client is pinned (pyproject.toml),
    and tests/test_metrics.py checks the exposition against ``observe``'s."""
    bounds = histogram._upper_bounds
    counts = [0] * len(bounds)
    for value in values:
        counts[bisect_left(bounds, value)] += 1
    for index, count in enumerate(counts):
        if count:
            histogram._buckets[index].inc(count)
    histogram._sum.inc(sum(values))
