"""Graceful shutdown with real processes and real signals."""

from __future__ import annotations

import asyncio
import os
import signal
import subprocess
import sys
from pathlib import Path
from typing import Any

import aiohttp
import pytest
from redis.asyncio import Redis

from shared.contract import Keys
from shared.inspection import queued_fanout_jobs
from tests.conftest import WEBHOOK_HEADERS, Destination, eventually, post_event, wait_exit, with_attempt

pytestmark = pytest.mark.slow


def write_config(
    path: Path, redis_url: str, prefix: str, destination: Destination | None = None, grace: int = 25
) -> Path:
    text = (
        f'[redis]\nurl = "{redis_url}"\nprefix = "{prefix}"\n'
        '[receiver]\nbasic_auth_user = "synap"\nbasic_auth_password = "s3cret"\n'
        f"[worker]\nhealth_check_interval_seconds = 1\nshutdown_grace_seconds = {grace}\n"
    )
    if destination is not None:
        text += (
            f'[[integrations]]\nname = "lms"\ntype = "http"\nurl = "{destination.url}"\n'
            "timeout_seconds = 20\nbackoff_base_seconds = 0.05\nbackoff_max_seconds = 0.1\n"
        )
    path.write_text(text)
    return path


def spawn(config: Path, *args: str) -> subprocess.Popen[bytes]:
    env = {**os.environ, "EXAMHOOK_CONFIG": str(config), "EXAMHOOK_LOG_LEVEL": "warning"}
    for name in ("EXAMHOOK_REDIS_URL", "EXAMHOOK_BASIC_AUTH_USER", "EXAMHOOK_BASIC_AUTH_PASSWORD"):
        env.pop(name, None)
    return subprocess.Popen([sys.executable, "-m", "cli.main", *args], env=env)


async def sigterm_mid_delivery(worker: subprocess.Popen[bytes], destination: Destination) -> None:
    """SIGTERM the worker once its first request reached the destination; it must exit 0."""
    try:
        await destination.wait_for_requests(1, timeout=20)
        worker.send_signal(signal.SIGTERM)
        assert await wait_exit(worker, 20) == 0
    finally:
        if worker.poll() is None:
            worker.kill()


async def test_receiver_sigterm_never_accepts_and_loses(
    tmp_path: Path,
    redis_url: str,
    prefix: str,
    redis: Redis,
    sample_body: bytes,
    unused_tcp_port_factory: Any,
) -> None:
    """SIGTERM during a burst: the receiver exits cleanly, and every request answered 202 has its
    event in Redis; the others ended in an error the sender would retry (never accepted-but-lost)."""
    port = unused_tcp_port_factory()
    receiver = spawn(write_config(tmp_path / "c.toml", redis_url, prefix), "receive", "--port", str(port))
    url = f"http://127.0.0.1:{port}"
    try:
        async with aiohttp.ClientSession() as session:

            async def ready() -> bool:
                try:
                    async with session.get(url + "/readyz") as r:
                        return r.status == 200
                except aiohttp.ClientError:
                    return False

            await eventually(ready, timeout=20)

            async def post(i: int) -> tuple[int, str | None]:
                try:
                    async with session.post(
                        url + "/webhooks/exam-results-released",
                        data=with_attempt(sample_body, f"att_shutdown_{i}"),
                        headers=WEBHOOK_HEADERS,
                    ) as r:
                        answer = await r.json() if r.status < 300 else {}
                        return r.status, answer.get("event_id")
                except aiohttp.ClientError:
                    return -1, None

            tasks = [asyncio.create_task(post(i)) for i in range(400)]
            await asyncio.sleep(0)  # let the first requests start before the signal
            await eventually(lambda: _queued_some(redis, prefix), timeout=10, interval=0.001)
            receiver.send_signal(signal.SIGTERM)
            results = await asyncio.gather(*tasks)
        assert await wait_exit(receiver, 40) == 0
    finally:
        if receiver.poll() is None:
            receiver.kill()
    accepted = [event_id for status, event_id in results if status == 202]
    assert accepted, "the burst should have been partly accepted before the signal"
    keys = Keys(prefix)
    for event_id in accepted:
        assert event_id is not None
        assert await redis.exists(keys.event(event_id)), f"{event_id} answered 202 but is not queued"
    assert all(status in (202, 503, -1) for status, _ in results)


async def _queued_some(redis: Redis, prefix: str) -> bool:
    return bool(await redis.zcard(Keys(prefix).queue))


async def test_worker_sigterm_finishes_running_delivery(
    tmp_path: Path,
    redis_url: str,
    prefix: str,
    redis: Redis,
    destination: Destination,
    sample_body: bytes,
    aiohttp_client: Any,
    make_settings: Any,
) -> None:
    """SIGTERM while a delivery is in flight: the worker lets it finish (within the grace period),
    records it delivered after one attempt, and exits 0."""
    from ingest.app import create_app

    destination.hang = 1.0
    config = write_config(tmp_path / "c.toml", redis_url, prefix, destination, grace=20)
    client = await aiohttp_client(create_app(make_settings()))
    event_id = await post_event(client, sample_body)
    worker = spawn(config, "worker")
    await sigterm_mid_delivery(worker, destination)
    keys = Keys(prefix)
    assert await redis.exists(keys.delivered(event_id, "lms"))
    assert await redis.hget(keys.pair(event_id, "lms"), "attempts") == b"1"
    assert len(destination.requests) == 1


async def test_worker_sigterm_requeues_without_spending_an_attempt(
    tmp_path: Path,
    redis_url: str,
    prefix: str,
    redis: Redis,
    destination: Destination,
    sample_body: bytes,
    aiohttp_client: Any,
    make_settings: Any,
) -> None:
    """A delivery still running when the grace period ends is cancelled and requeued; no attempt is
    counted, and the next worker delivers it (same Idempotency-Key)."""
    from ingest.app import create_app

    destination.hang = 30.0
    config = write_config(tmp_path / "c.toml", redis_url, prefix, destination, grace=1)
    client = await aiohttp_client(create_app(make_settings()))
    event_id = await post_event(client, sample_body)
    worker = spawn(config, "worker")
    await sigterm_mid_delivery(worker, destination)
    keys = Keys(prefix)
    assert not await redis.exists(keys.delivered(event_id, "lms"))
    assert await redis.hget(keys.pair(event_id, "lms"), "attempts") in (None, b"0")
    assert [event_id] in (await queued_fanout_jobs(redis, keys)).values()  # back in the queue
    destination.hang = 0
    second = spawn(config, "worker")
    try:
        requests = await destination.wait_for_requests(2, timeout=20)
        assert {r.headers["Idempotency-Key"] for r in requests} == {event_id}
        await eventually(lambda: redis.exists(keys.delivered(event_id, "lms")))
        assert await redis.hget(keys.pair(event_id, "lms"), "attempts") == b"1"
    finally:
        second.send_signal(signal.SIGTERM)
        await wait_exit(second, 20)


async def test_stopping_worker_starts_no_delivery_the_grace_period_would_cut(
    tmp_path: Path, redis_url: str, prefix: str, redis: Redis, destination: Destination, sample_body: bytes
) -> None:
    """On SIGTERM a worker starts no delivery that could not finish within the grace period
    (it would be cut midway and sent again later): an event still waiting for a slot is
    queued again untouched, and the next worker sends it, once."""
    from shared.payload import decoder
    from shared.settings import RetentionConfig
    from shared.store import Incoming, Store

    destination.hang = 2.0  # the 1st send ends 2 s in; the 2nd would then run past the 3 s grace
    config = write_config(tmp_path / "c.toml", redis_url, prefix, destination, grace=3)
    keys = Keys(prefix)
    bodies = [with_attempt(sample_body, f"att_{i}") for i in range(2)]
    events = [Incoming.of(decoder.decode(b), b) for b in bodies]
    assert all(await Store(redis, keys, RetentionConfig()).accept_batch(events))  # one job
    worker = spawn(config, "worker", "--concurrency", "1")
    await sigterm_mid_delivery(worker, destination)
    # the two events of the job go for the one slot at once: either may get it first
    [first] = [r.headers["Idempotency-Key"] for r in destination.requests]
    [second] = {e.event_id for e in events} - {first}
    assert [second] in (await queued_fanout_jobs(redis, keys)).values()
    destination.hang = 0
    again = spawn(config, "worker")
    try:
        requests = await destination.wait_for_requests(2, timeout=20)
        await eventually(lambda: redis.exists(keys.delivered(second, "lms")))
        assert [r.headers["Idempotency-Key"] for r in requests] == [first, second]  # none twice
    finally:
        again.send_signal(signal.SIGTERM)
        await wait_exit(again, 20)


async def test_a_stop_is_logged_when_it_begins_and_when_it_ends(
    tmp_path: Path, redis_url: str, prefix: str, destination: Destination, unused_tcp_port_factory: Any
) -> None:
    """A receiver and a worker each log one line when a stop begins (SIGTERM) and one when it
    ends, the worker's saying what it finished, requeued or cut, the receiver's what it drained."""
    import json

    config = write_config(tmp_path / "c.toml", redis_url, prefix, destination, grace=3)
    env = {**os.environ, "EXAMHOOK_CONFIG": str(config), "EXAMHOOK_LOG_LEVEL": "info"}
    for name in ("EXAMHOOK_REDIS_URL", "EXAMHOOK_BASIC_AUTH_USER", "EXAMHOOK_BASIC_AUTH_PASSWORD"):
        env.pop(name, None)
    port = str(unused_tcp_port_factory())
    processes = {
        "worker": ["worker"],
        "receiver": ["receive", "--host", "127.0.0.1", "--port", port],
    }
    logs: dict[str, list[dict[str, Any]]] = {}
    for name, args in processes.items():
        log_path = tmp_path / f"{name}.log"
        with log_path.open("wb") as out:
            process = subprocess.Popen([sys.executable, "-m", "cli.main", *args], env=env, stderr=out)

        async def started(path: Path = log_path) -> bool:
            return b"ready" in path.read_bytes() or b"listening" in path.read_bytes()

        await eventually(started, timeout=30, interval=0.05)
        process.send_signal(signal.SIGTERM)
        assert await wait_exit(process, 30) == 0
        logs[name] = [json.loads(line) for line in log_path.read_text().splitlines() if line.startswith("{")]
    worker = [r["msg"] for r in logs["worker"]]
    assert any(m.startswith("worker stopping") for m in worker), worker
    [stopped] = [r for r in logs["worker"] if r["msg"] == "worker stopped"]
    assert {"jobs_finished", "jobs_requeued", "sends_cut", "outcomes_unwritten"} <= set(stopped)
    receiver = [r["msg"] for r in logs["receiver"]]
    assert any(m.startswith("receiver stopping") for m in receiver), receiver
    [stopped] = [r for r in logs["receiver"] if r["msg"] == "receiver stopped"]
    assert "drained_events" in stopped


async def test_a_lost_cancellation_does_not_keep_a_stopping_worker_alive(
    make_settings: Any, destination: Destination
) -> None:
    """Python 3.11's asyncio.wait_for (redis-py sends every command through it) loses a
    cancellation that lands just as the command completes; a worker whose stop-time cancel of
    its main loop was lost that way polled on forever after SIGTERM. It is cancelled again until
    the loop ends. (Here the worker's health record swallows the first cancellation, as that
    wait_for does.)"""
    from worker.main import ExamhookWorker, worker_settings

    class LosesACancellation(ExamhookWorker):
        lost = 0

        async def record_health(self) -> None:
            await super().record_health()
            try:
                await asyncio.sleep(0.5)  # the cancellation lands here...
            except asyncio.CancelledError:
                if not self.lost:
                    self.lost += 1  # ...and is lost, once
                    return
                raise

    settings = make_settings([{"name": "lms", "type": "http", "url": destination.url}])
    worker = LosesACancellation(**worker_settings(settings, handle_signals=False, poll_delay=0.01))
    running = asyncio.create_task(worker.async_run())
    try:
        await eventually(lambda: _started(worker), timeout=15)
        worker.handle_sig_wait_for_completion(signal.SIGTERM)
        await asyncio.wait({running}, timeout=10)
        assert worker.lost == 1
        assert running.done(), "the worker's main loop must end after SIGTERM"
    finally:
        running.cancel()
        await asyncio.gather(running, return_exceptions=True)
        await worker.close()


async def _started(worker: Any) -> bool:
    return "deliverer" in worker.ctx
