"""arq ``WorkerSettings`` for one worker process, built from examhook's settings."""

from __future__ import annotations

import logging
from signal import Signals
from typing import Any

import aiohttp
from arq import func
from arq.worker import Worker

from shared.contract import DELIVER, HANDLE_EVENT, HANDLE_EVENTS, Keys, job_deserializer, job_serializer
from shared.redis_conn import arq_redis_settings, close_sentinels
from shared.settings import Settings
from shared.store import Store
from worker import integrations, jobs
from worker.delivery import Deliverer
from worker.metrics import WorkerMetrics

log = logging.getLogger("examhook.worker")

# Attempts are counted and limited per pair by examhook itself (max_attempts);
# arq's own try counter only has to stay out of the way.
ARQ_MAX_TRIES = 1_000_000  # arq drops a job past it: an accepted event must never go that way


async def startup(ctx: dict[str, Any]) -> None:
    settings: Settings = ctx["settings"]
    session = aiohttp.ClientSession(
        connector=aiohttp.TCPConnector(limit=200, limit_per_host=100),
        headers={"User-Agent": "examhook"},
    )
    built = {c.name: integrations.build(c, session) for c in settings.integrations}
    for integration in built.values():
        await integration.start()
    metrics: WorkerMetrics = ctx.setdefault("metrics", WorkerMetrics())
    store = Store(ctx["redis"], Keys(settings.redis.prefix), settings.retention)
    ctx["session"] = session
    ctx["integrations"] = built
    ctx["deliverer"] = Deliverer(settings, store, built, metrics, concurrency=ctx["concurrency"])
    if settings.worker.metrics_port is not None and "metrics_server" not in ctx:
        from prometheus_client import start_http_server

        # a small thread serving this process's /metrics (each worker needs its own port)
        ctx["metrics_server"] = start_http_server(settings.worker.metrics_port, registry=metrics.registry)
    log.info("worker ready", extra={"integrations": ",".join(built) or "(none)"})


async def shutdown(ctx: dict[str, Any]) -> None:
    deliverer: Deliverer | None = ctx.get("deliverer")
    if deliverer is not None:
        await deliverer.drain()
    for integration in ctx.get("integrations", {}).values():
        await integration.close()
    session = ctx.get("session")
    if session is not None:
        await session.close()
    server = ctx.pop("metrics_server", None)
    if server is not None:
        http_server, thread = server
        http_server.shutdown()
        http_server.server_close()
        thread.join(timeout=5)
    # arq closes its own pool after this, but not a sentinel-managed pool's sentinel connections
    await close_sentinels(ctx["redis"])


def worker_settings(
    settings: Settings,
    *,
    burst: bool = False,
    concurrency: int | None = None,
    handle_signals: bool = True,
    poll_delay: float | None = None,
) -> dict[str, Any]:
    """Keyword arguments for ``arq.worker.Worker`` (what arq calls ``WorkerSettings``)."""
    keys = Keys(settings.redis.prefix)
    concurrency = concurrency or settings.worker.concurrency
    return {
        "functions": [
            func(jobs.handle_events, name=HANDLE_EVENTS),
            func(jobs.handle_event, name=HANDLE_EVENT),
            func(jobs.deliver, name=DELIVER),
        ],
        "queue_name": keys.queue,
        "health_check_key": keys.health_check,
        "health_check_interval": settings.worker.health_check_interval_seconds,
        "redis_settings": arq_redis_settings(settings),
        "on_startup": startup,
        "on_shutdown": shutdown,
        "job_serializer": job_serializer,
        "job_deserializer": job_deserializer,
        # a fan-out job carries several events; the Deliverer keeps events in flight to
        # `concurrency` (what the destinations are promised), arq keeps as many jobs going
        "max_jobs": concurrency,
        "job_timeout": settings.job_timeout_seconds,
        "max_tries": ARQ_MAX_TRIES,
        # examhook keeps its own delivery records; arq's results would only block
        # re-enqueueing a job id (``failures retry``).
        "keep_result": 0,
        "poll_delay": settings.worker.poll_delay_seconds if poll_delay is None else poll_delay,
        # SIGTERM: finish running deliveries within the grace period, then requeue the rest
        "job_completion_wait": settings.worker.shutdown_grace_seconds,
        "burst": burst,
        "handle_signals": handle_signals,
        "ctx": {"settings": settings, "concurrency": concurrency},
    }


class ExamhookWorker(Worker):
    """arq's ``Worker``, telling the deliverer when a graceful shutdown begins, so that no
    attempt starts that the grace period would cut midway (and a later run repeat)."""

    def handle_sig_wait_for_completion(self, signum: Signals) -> None:
        deliverer: Deliverer | None = self.ctx.get("deliverer")
        if deliverer is not None:
            deliverer.stop_starting(self._job_completion_wait)
        super().handle_sig_wait_for_completion(signum)


def create_worker(settings: Settings, **kwargs: Any) -> Worker:
    return ExamhookWorker(**worker_settings(settings, **kwargs))
