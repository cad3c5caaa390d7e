"""Connections to Redis, from one URL, for our own client and for arq's.

Besides ``redis://``, ``rediss://`` (TLS) and ``unix://``, Redis Sentinel is supported
with ``redis+sentinel://[user:password@]host1:26379,host2:26379/<service>/<db>``
(``rediss+sentinel://`` for TLS to the master): clients ask the sentinels for the
current master, and find the new one after a failover. (arq does not support Redis
Cluster, so neither does examhook.)
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any
from urllib.parse import unquote

from arq.connections import ArqRedis
from redis.asyncio import Redis
from redis.asyncio.retry import Retry
from redis.backoff import ExponentialBackoff
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import TimeoutError as RedisTimeoutError

from shared.settings import Settings

# Fail fast when Redis is down: the receiver answers 503 rather than hanging.
SOCKET_TIMEOUT_SECONDS = 5.0
CONNECT_TIMEOUT_SECONDS = 2.0


SENTINEL_SCHEMES = ("redis+sentinel", "rediss+sentinel")


@dataclass(frozen=True)
class SentinelTarget:
    sentinels: list[tuple[str, int]]
    service: str
    db: int
    username: str | None
    password: str | None
    ssl: bool


def parse_sentinel_url(url: str) -> SentinelTarget | None:
    """The parts of a ``redis+sentinel://`` URL; None for other schemes; ValueError if malformed."""
    scheme, sep, rest = url.partition("://")
    if not sep or scheme not in SENTINEL_SCHEMES:
        return None
    netloc, _, path = rest.partition("/")
    username = password = None
    if "@" in netloc:
        credentials, netloc = netloc.rsplit("@", 1)
        user, _, secret = credentials.partition(":")
        username, password = unquote(user) or None, unquote(secret) or None
    sentinels = []
    for host_port in netloc.split(","):
        host, _, port = host_port.rpartition(":")
        if not host or not port.isdigit():
            raise ValueError(f"sentinel address {host_port!r} is not host:port")
        sentinels.append((host.strip("[]"), int(port)))
    service, _, db = path.strip("/").partition("/")
    if not service:
        raise ValueError("the sentinel URL needs a service name: redis+sentinel://host:26379/<service>/<db>")
    if db and not db.isdigit():
        raise ValueError(f"database {db!r} is not a number")
    return SentinelTarget(sentinels, service, int(db or 0), username, password, scheme.startswith("rediss"))


class _SentinelMaster(Redis):
    """The master found through sentinels; closing it closes the sentinel connections too."""

    async def aclose(self, close_connection_pool: bool | None = None) -> None:
        await super().aclose(close_connection_pool)
        await close_sentinels(self)


async def close_sentinels(client: Redis) -> None:
    """Close the connections a sentinel-managed client keeps to its sentinels."""
    manager = getattr(client.connection_pool, "sentinel_manager", None)
    for sentinel in getattr(manager, "sentinels", []):
        await sentinel.aclose()


def redis_client(settings: Settings, redis_class: type[Redis] = Redis, **overrides: object) -> Redis:
    """A client for ``settings.redis.url``: failing fast (socket and connect timeouts), with
    periodic health checks of idle connections; ``overrides`` are redis-py options."""
    options: dict[str, object] = {
        "socket_timeout": SOCKET_TIMEOUT_SECONDS,
        "socket_connect_timeout": CONNECT_TIMEOUT_SECONDS,
        "health_check_interval": 30,
        **overrides,
    }
    target = parse_sentinel_url(settings.redis.url)
    if target is not None:
        from redis.asyncio.sentinel import Sentinel

        sentinel = Sentinel(  # type: ignore[no-untyped-call]
            target.sentinels,
            socket_timeout=SOCKET_TIMEOUT_SECONDS,
            socket_connect_timeout=CONNECT_TIMEOUT_SECONDS,
        )
        master: Redis = sentinel.master_for(
            target.service,
            redis_class=_sentinel_class(redis_class),
            db=target.db,
            username=target.username,
            password=target.password,
            ssl=target.ssl,
            **options,  # type: ignore[arg-type]
        )
        return master
    client: Redis = redis_class.from_url(settings.redis.url, **options)  # type: ignore[arg-type]
    return client


def _sentinel_class(redis_class: type[Redis]) -> type[Redis]:
    if redis_class is Redis:
        return _SentinelMaster
    return type(f"Sentinel{redis_class.__name__}", (_SentinelMaster, redis_class), {})


def arq_pool(
    settings: Settings,
    *,
    queue_name: str,
    job_serializer: Callable[[dict[str, Any]], bytes],
    job_deserializer: Callable[[bytes], dict[str, Any]],
) -> ArqRedis:
    """arq's connection for a worker, built like :func:`redis_client` rather than by arq.

    arq's own pool has no socket timeout, keepalive or health checks (a connection that
    silently stops answering would stall the worker for the kernel's retransmission time,
    or forever behind a proxy), and for Sentinel it ignores the retry options. Here every
    mode gets the timeouts, and connection errors and timeouts are retried forever, with
    backoff capped at 2 s, so a worker rides out a Redis restart or failover by itself: arq's
    poll loop has no error handling of its own. A job stuck meanwhile is bounded by its
    own deadline.
    """
    # TCP keepalive notices a vanished peer; unix sockets have no such option
    tcp = {} if settings.redis.url.startswith("unix://") else {"socket_keepalive": True}
    pool = redis_client(
        settings,
        redis_class=ArqRedis,
        **tcp,
        retry=Retry(ExponentialBackoff(cap=2.0, base=0.05), retries=-1),
        retry_on_error=[RedisConnectionError, RedisTimeoutError, OSError],
    )
    assert isinstance(pool, ArqRedis)
    pool.job_serializer = job_serializer
    pool.job_deserializer = job_deserializer
    pool.default_queue_name = queue_name
    return pool
