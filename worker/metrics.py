"""Prometheus metrics of one worker process."""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram


class WorkerMetrics:
    def __init__(self, registry: CollectorRegistry | None = None) -> None:
        self.registry = registry or CollectorRegistry()
        self.deliveries = Counter(
            "examhook_worker_deliveries",
            "Delivery attempts by integration and outcome (delivered, retry, failed).",
            ["integration", "outcome"],
            registry=self.registry,
        )
        self.attempt_seconds = Histogram(
            "examhook_worker_attempt_seconds",
            "Duration of one delivery attempt.",
            ["integration"],
            buckets=(0.001, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30),
            registry=self.registry,
        )
        self.skipped = Counter(
            "examhook_worker_skipped",
            "Pairs not sent: already delivered, superseded by a newer release, expired.",
            ["integration", "reason"],
            registry=self.registry,
        )
        self.unmatched = Counter(
            "examhook_worker_unmatched_events",
            "Events that matched no integration's filter.",
            registry=self.registry,
        )
        self.unknown_outcomes = Counter(
            "examhook_worker_unknown_outcomes",
            "Sends whose outcome was unknown (handed over, no answer): see on_unknown_outcome.",
            ["integration"],
            registry=self.registry,
        )
        self.handed_on = Counter(
            "examhook_worker_handed_on",
            "Pairs a fan-out job handed on to a later job because the integration's lane was busy.",
            ["integration"],
            registry=self.registry,
        )
        self.lag_seconds = Histogram(
            "examhook_worker_delivery_lag_seconds",
            "End to end: the receiver accepting the event to its delivery being recorded.",
            ["integration"],
            buckets=(0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120, 300, 900, 1800, 3600, 14400, 86400),
            registry=self.registry,
        )
        self.outcomes_waiting = Gauge(
            "examhook_worker_outcomes_waiting",
            "Outcomes of finished sends this worker could not record yet (Redis refused them).",
            registry=self.registry,
        )
