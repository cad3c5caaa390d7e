"""Connections to Redis, from one URL, for our own client and for arq's."""

from __future__ import annotations

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


def redis_client(settings: Settings, **overrides: object) -> Redis:
    options: dict[str, object] = {
        "socket_timeout": SOCKET_TIMEOUT_SECONDS,
        "socket_connect_timeout": CONNECT_TIMEOUT_SECONDS,
        "health_check_interval": 30,
        **overrides,
    }
    return Redis.from_url(settings.redis.url, **options)  # type: ignore[arg-type]


def arq_redis_settings(settings: Settings) -> RedisSettings:
    redis_settings = RedisSettings.from_dsn(settings.redis.url)
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
