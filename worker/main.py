"""arq ``WorkerSettings`` for one worker process, built from examhook's settings, and
``ExamhookWorker``, arq's ``Worker`` with the overrides that keep it alive, correct and
stoppable through Redis trouble.

The overrides were checked against arq 0.28.0 (pinned exactly): tests/test_arq_overrides.py
fails when the arq source under any of them changes.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import signal
from signal import Signals
from typing import Any

import aiohttp
from arq import func
from arq.utils import timestamp_ms
from arq.worker import Worker
from redis.exceptions import AuthenticationError, RedisError, ResponseError, WatchError
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import TimeoutError as RedisTimeoutError

from shared.contract import DELIVER, HANDLE_EVENTS, Keys, job_deserializer, job_serializer
from shared.logs import Repeats
from shared.redis_check import advice, missing_permissions
from shared.redis_conn import arq_pool, close_sentinels, redis_client
from shared.settings import ConfigError, Settings
from shared.store import Store
from worker import integrations, jobs
from worker.delivery import Deliverer
from worker.metrics import WorkerMetrics
from worker.registry import Registry

log = logging.getLogger("examhook.worker")

# Attempts are counted and limited per pair by examhook itself (max_attempts);
# arq's own try counter only has to stay out of the way.
ARQ_MAX_TRIES = 1_000_000  # arq drops a job past it: an accepted event must never go that way
# After the grace period, what is left of a shutdown (requeueing cancelled jobs, closing
# clients) takes well under a second; with Redis away it would wait for Redis forever.
CLOSE_TIMEOUT_SECONDS = 10.0
WAITING_FOR_REDIS_LOG_SECONDS = 30.0  # while Redis is unreachable at start, a warning this often


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
    port = ctx.get("metrics_port", settings.worker.metrics_port)
    if port is not None and "metrics_server" not in ctx:
        ctx["metrics_server"] = _serve_metrics(metrics, settings.worker.metrics_host, port)
    registry = ctx["registry"] = Registry(ctx["redis"], store.keys, settings)
    try:
        await registry.report()
    except (RedisError, OSError) as exc:  # e.g. Redis full: the next health check tries again
        log.warning("could not register this worker in Redis", extra={"error": _describe(exc)})
    lanes = {name: lane.capacity for name, lane in ctx["deliverer"].lanes.items()}
    log.info("worker ready", extra={"integrations": ",".join(f"{n} ({c} at once)" for n, c in lanes.items())})


def _serve_metrics(metrics: WorkerMetrics, host: str, port: int) -> Any:
    """A small thread serving this process's ``/metrics``."""
    from prometheus_client import start_http_server

    try:
        return start_http_server(port, addr=host, registry=metrics.registry)
    except OSError as exc:
        raise ConfigError(
            f"worker.metrics_port: cannot serve metrics on {host}:{port} ({exc.strerror}); every worker"
            " process on a host needs its own port: `examhook worker --metrics-port P`"
        ) from None


async def shutdown(ctx: dict[str, Any]) -> None:
    deliverer: Deliverer | None = ctx.get("deliverer")
    if deliverer is not None:
        await deliverer.drain()
    registry: Registry | None = ctx.get("registry")
    if registry is not None:
        with contextlib.suppress(RedisError, OSError):  # else its entry goes stale by itself
            await registry.leave()
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
    # (no "redis" when the worker never started: e.g. Redis refused its password)
    if "redis" in ctx:
        await close_sentinels(ctx["redis"])


def worker_settings(
    settings: Settings,
    *,
    burst: bool = False,
    concurrency: int | None = None,
    handle_signals: bool = True,
    poll_delay: float | None = None,
    metrics_port: int | None = None,
) -> dict[str, Any]:
    """Keyword arguments for ``arq.worker.Worker`` (what arq calls ``WorkerSettings``).
    A worker without integrations is a configuration error: it would take events and
    deliver them nowhere."""
    if not settings.integrations:
        where = settings.source or "no configuration file found; defaults and environment"
        raise ConfigError(
            f"no integrations configured ({where}): a worker needs at least one [[integrations]] table"
        )
    keys = Keys(settings.redis.prefix)
    concurrency = concurrency or settings.worker.concurrency
    return {
        "functions": [
            func(jobs.handle_events, name=HANDLE_EVENTS),
            func(jobs.deliver, name=DELIVER),
        ],
        "queue_name": keys.queue,
        "health_check_key": keys.health_check,
        "health_check_interval": settings.worker.health_check_interval_seconds,
        # our own pool: timeouts, keepalive and retries in every mode, Sentinel included
        "redis_pool": arq_pool(
            settings,
            queue_name=keys.queue,
            job_serializer=job_serializer,
            job_deserializer=job_deserializer,
        ),
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
        "ctx": {
            "settings": settings,
            "concurrency": concurrency,
            "metrics_port": settings.worker.metrics_port if metrics_port is None else metrics_port,
        },
    }


class ExamhookWorker(Worker):
    """arq's ``Worker``, with changes that keep a worker alive, correct and stoppable through
    Redis trouble.

    * A graceful shutdown tells the deliverer when it begins, so that no attempt starts that
      the grace period would cut midway (and a later run repeat).
    * A Redis error in arq's poll loop no longer ends the process. arq (maintenance-only,
      pinned) catches nothing there: a connection lost between its ``WATCH`` and ``EXEC``
      while claiming a job surfaces as ``WatchError`` from ``EXISTS``/``ZSCORE`` and killed
      the worker (found by the chaos test when Redis was SIGKILLed mid-claim). Connection
      errors themselves are retried by redis-py (see ``shared/redis_conn.py``); what gets
      through (that ``WatchError``, or e.g. an OOM refusal under ``noeviction``) is logged
      and the next poll tries again. A job whose claim failed stays queued; an error in
      arq's bookkeeping around a running job (``run_job``) is logged the same way.
    * Closing is bounded (``CLOSE_TIMEOUT_SECONDS``), so SIGTERM ends a worker whose Redis is gone.
    * At start it logs that it is waiting for Redis, and fails at once if Redis refuses it.
    """

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        # Warnings that could come every poll while Redis refuses writes: one per kind per 30 s.
        self._repeats = Repeats()
        self._keys = Keys(self.ctx["settings"].redis.prefix)

    async def main(self) -> None:
        await self._wait_for_redis()
        await super().main()

    async def _wait_for_redis(self) -> None:
        """Say that the worker is waiting for Redis, and why (arq logged every failed connection
        attempt; our pool retries quietly). A refusal that waiting cannot mend, such as a wrong
        password, is raised, and so is a Redis user lacking a permission examhook needs (a
        ConfigError: exit 2)."""
        settings: Settings = self.ctx["settings"]
        probe = redis_client(settings)  # fails fast, no retries: each failure is seen
        next_warning = 0.0
        try:
            while True:
                try:
                    await probe.ping()
                    keys = Keys(settings.redis.prefix)
                    problems = await missing_permissions(probe, keys)
                    if problems:
                        raise ConfigError("; ".join(problems) + f" ({advice(keys)})")
                    return
                except AuthenticationError:
                    raise
                except (RedisConnectionError, RedisTimeoutError, ResponseError, OSError) as exc:
                    # unreachable, loading, or refusing writes (full, read-only): it may mend
                    if self.loop.time() >= next_warning:
                        log.warning("waiting for Redis", extra={"error": _describe(exc)})
                        next_warning = self.loop.time() + WAITING_FOR_REDIS_LOG_SECONDS
                    await asyncio.sleep(1)
        finally:
            await probe.aclose()

    def handle_sig_wait_for_completion(self, signum: Signals) -> None:
        deliverer: Deliverer | None = self.ctx.get("deliverer")
        if deliverer is not None:
            deliverer.stop_starting(self._job_completion_wait)
        if self._stop_began is None:
            self._stop_began = (self.jobs_complete, self.jobs_retried)
            log.info(
                "worker stopping: taking no new jobs; running ones get the grace period",
                extra={
                    "signal": Signals(signum).name,
                    "jobs_running": sum(not t.done() for t in self.tasks.values()),
                    "grace_seconds": self._job_completion_wait,
                },
            )
        super().handle_sig_wait_for_completion(signum)

    _stop_began: tuple[int, int] | None = None

    async def _wait_for_tasks_to_complete(self, signum: Signals) -> None:
        """arq's wait for the running jobs, then its cancel of the main loop, cancelled again
        until the loop really ends: Python 3.11's ``asyncio.wait_for`` (redis-py sends every
        command through it) loses a cancellation that lands just as the command completes,
        and the worker then went on polling forever (found under load by the shutdown test)."""
        await super()._wait_for_tasks_to_complete(signum)
        await cancel_until_done(self.main_task)

    async def close(self) -> None:
        """arq's ``close``, made safe for a shutdown during a Redis outage.

        arq's re-raises the first error among the job tasks (one cancelled inside a shielded
        Redis call ends "cancelled") and waits for Redis as long as redis-py retries, i.e.
        forever; either way ``on_shutdown`` never ran and the exit code was 1. Here the tasks'
        errors are collected, and the Redis work is given up after ``CLOSE_TIMEOUT_SECONDS``,
        so SIGTERM ends the worker within the grace period plus that, with code 0. What
        could not be recorded is safe: jobs still marked in progress run again once their
        lease expires.
        """
        if not self._handle_signals:
            self.handle_sig(signal.SIGUSR1)
        if self._pool is None:
            return
        ends = self.loop.time() + CLOSE_TIMEOUT_SECONDS
        try:
            async with asyncio.timeout_at(ends):
                await asyncio.gather(*self.tasks.values(), return_exceptions=True)
                self.tasks.clear()
        except (TimeoutError, RedisError, OSError) as exc:
            log.warning(
                "shutdown could not finish its Redis work; exiting anyway (interrupted jobs run"
                " again after their lease expires)",
                extra={"error": _describe(exc)},
            )
        if self.on_shutdown is not None:
            try:
                # integrations and the HTTP session are closed even after a timeout above
                async with asyncio.timeout_at(max(ends, self.loop.time() + 2)):
                    await self.on_shutdown(self.ctx)
            except (TimeoutError, RedisError, OSError) as exc:
                log.warning("shutdown hook did not finish", extra={"error": _describe(exc)})
        try:
            # disconnecting can time out too (an idle TLS connection to a Redis that is gone)
            await self.pool.close(close_connection_pool=True)
        except (RedisError, OSError) as exc:
            log.warning("could not close the Redis connections cleanly", extra={"error": _describe(exc)})
        finally:
            self._pool = None
        deliverer: Deliverer | None = self.ctx.get("deliverer")
        if deliverer is None:
            return  # it never started (e.g. refused by Redis): there was nothing to stop
        complete, retried = self._stop_began or (self.jobs_complete, self.jobs_retried)
        log.info(
            "worker stopped",
            extra={
                "jobs_finished": self.jobs_complete - complete,
                "jobs_requeued": self.jobs_retried - retried,
                "sends_cut": deliverer.sends_cut,
                "outcomes_unwritten": deliverer.outcomes_unwritten,
            },
        )

    async def record_health(self) -> None:
        """arq's health record, and this worker's entry in ``P:workers`` (``worker --check``
        answers for the workers of its own host from it)."""
        before = self._last_health_check
        await super().record_health()
        registry: Registry | None = self.ctx.get("registry")
        if registry is not None and self._last_health_check != before:
            await registry.report()

    async def _poll_iteration(self) -> None:
        try:
            await super()._poll_iteration()
        except (RedisError, OSError) as exc:
            # the next poll (poll_delay later) starts over; nothing queued is lost
            self._repeats.warn(log, "redis error in the poll loop; polling again", {"error": _describe(exc)})

    async def run_job(self, job_id: str, score: int) -> None:
        """arq's ``run_job``; a Redis error in arq's own bookkeeping around the job (e.g. an OOM
        refusal) is logged rather than raised, since arq re-raises it in the poll loop and, in
        burst mode, out of the worker. The job stays queued and runs again after its lease."""
        try:
            await super().run_job(job_id, score)
        except (RedisError, OSError) as exc:
            self._repeats.warn(
                log,
                "redis error around a job; it runs again after its lease",
                {"job_id": job_id, "error": _describe(exc)},
            )

    async def start_jobs(self, job_ids: list[bytes]) -> None:
        """arq's ``start_jobs``, except that

        * a job for one integration (a retry, a job handed on for a lane) is left queued while
          that integration's lane here is full: it waits in Redis, where any worker with room
          takes it, rather than in this process, holding one of its job slots (so a slow
          integration's backlog never takes the slots the others' jobs need);
        * a Redis error while claiming a job gives its slot (``sem`` and ``job_counter``) back
          and leaves the job queued for the next poll; arq's own leaks the slot and lets the
          error end the worker."""
        deliverer: Deliverer | None = self.ctx.get("deliverer")
        keys = self._keys
        for job_id_b in job_ids:
            if deliverer is not None:
                lane = deliverer.lanes.get(keys.lane_of(job_id_b.decode()) or "")
                if lane is not None and lane.full:
                    continue
            await self.sem.acquire()
            if self.job_counter >= self.max_jobs:
                self.sem.release()
                return
            self.job_counter += 1
            job_id = job_id_b.decode()
            try:
                score = await self._claim(job_id)
            except (RedisError, OSError) as exc:
                self.job_counter -= 1
                self.sem.release()
                self._repeats.warn(
                    log,
                    "redis error claiming a job; it stays queued",
                    {"job_id": job_id, "error": _describe(exc)},
                )
                return  # Redis is in trouble: leave the rest of this batch to the next poll
            if score is None:  # running elsewhere, finished, or deferred meanwhile
                self.job_counter -= 1
                self.sem.release()
                continue
            task = self.loop.create_task(self.run_job(job_id, score))
            task.add_done_callback(lambda _: self._release_sem_dec_counter_on_complete())
            self.tasks[job_id] = task

    async def _claim(self, job_id: str) -> int | None:
        """Mark the job in progress (as arq does: WATCH, check, MULTI/EXEC); its score, or None
        if another worker has it or it is no longer due."""
        in_progress_key = self._keys.in_progress(job_id)
        async with self.pool.pipeline(transaction=True) as pipe:
            await pipe.watch(in_progress_key)
            ongoing_exists = await pipe.exists(in_progress_key)
            score = await pipe.zscore(self.queue_name, job_id)
            if ongoing_exists or not score or score > timestamp_ms():
                return None
            pipe.multi()  # type: ignore[no-untyped-call]
            pipe.psetex(in_progress_key, int(self.in_progress_timeout_s * 1000), b"1")
            try:
                await pipe.execute()
            except WatchError:
                return None  # claimed by another worker since the check (or the connection died)
        return int(score)


async def cancel_until_done(task: asyncio.Task[Any] | None, every: float = 0.2) -> None:
    """Cancel ``task`` until it has ended (a cancellation can be lost on Python 3.11, see
    :meth:`ExamhookWorker._wait_for_tasks_to_complete`)."""
    while task is not None and not task.done():
        task.cancel()
        await asyncio.wait({task}, timeout=every)


def _describe(exc: BaseException) -> str:
    return f"{exc.__class__.__name__}: {exc}"


def create_worker(settings: Settings, **kwargs: Any) -> Worker:
    return ExamhookWorker(**worker_settings(settings, **kwargs))
