"""Connections to Redis, from one URL, for our own client and for arq's.

Besides ``redis://``, ``rediss://`` (TLS) and ``unix://``, Redis Sentinel is supported
with ``redis+sentinel://[user:password@]host1:26379,host2:26379/<service>/<db>``
(``rediss+sentinel://`` for TLS to the master): clients ask the sentinels for the
current master, and find the new one after a failover. (arq does not support Redis
Cluster, so neither does examhook.)
"""

from __future__ import annotations

from dataclasses import dataclass
from urllib.parse import unquote, urlsplit

from arq.connections import RedisSettings
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


def redis_client(settings: Settings, **overrides: object) -> Redis:
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
            redis_class=_SentinelMaster,
            db=target.db,
            username=target.username,
            password=target.password,
            ssl=target.ssl,
            **options,  # type: ignore[arg-type]
        )
        return master
    client: Redis = Redis.from_url(settings.redis.url, **options)  # type: ignore[arg-type]
    return client


def arq_redis_settings(settings: Settings) -> RedisSettings:
    target = parse_sentinel_url(settings.redis.url)
    if target is not None:
        redis_settings = RedisSettings(
            host=target.sentinels,
            sentinel=True,
            sentinel_master=target.service,
            database=target.db,
            username=target.username,
            password=target.password,
            ssl=target.ssl,
        )
    else:
        redis_settings = RedisSettings.from_dsn(settings.redis.url)
        # arq's from_dsn does not percent-decode credentials; redis-py's from_url does
        parts = urlsplit(settings.redis.url)
        redis_settings.username = unquote(parts.username) if parts.username else None
        redis_settings.password = unquote(parts.password) if parts.password else None
    redis_settings.conn_timeout = int(CONNECT_TIMEOUT_SECONDS)
    # keep retrying while Redis is away, so a worker survives a restart by itself
    redis_settings.conn_retries = 1_000_000
    redis_settings.conn_retry_delay = 1
    # arq's poll loop has no error handling of its own: a command that fails because Redis
    # restarted would end the worker. Retry connection errors forever instead (with backoff
    # up to 2 s), so a worker rides out a Redis restart; a job stuck meanwhile is bounded
    # by its job timeout.
    redis_settings.retry = Retry(ExponentialBackoff(cap=2.0, base=0.05), retries=-1)
    redis_settings.retry_on_error = [RedisConnectionError, RedisTimeoutError, OSError]
    return redis_settings
