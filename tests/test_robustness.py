"""Edge cases of the delivery records: retention vs long retries, expired payloads,
operators' retry/purge racing with jobs, uncertain outcomes, and odd destinations."""

from __future__ import annotations

import asyncio
import json
from typing import Any

import pytest
from redis.asyncio import Redis

from ingest.app import create_app
from shared.contract import Keys
from shared.inspection import Inspector
from shared.payload import decoder
from shared.settings import ConfigError, settings_from_dict
from shared.store import AttemptRecord, Incoming, Store, now_ms
from tests.conftest import (
    Destination,
    eventually,
    http_integration,
    post_event,
    queue_empty,
    with_attempt,
)


def store_for(settings: Any, redis: Redis) -> Store:
    return Store(redis, Keys(settings.redis.prefix), settings.retention)


async def test_retry_wait_longer_than_payload_retention_keeps_the_payload(
    aiohttp_client: Any, make_settings: Any, start_worker: Any, destination: Destination, sample_body: bytes
) -> None:
    """A retry scheduled further out than retention.payload_seconds still finds the body
    (the record step keeps it for the wait plus the retention) and delivers."""
    destination.responses = [(503, {"Retry-After": "2"})]
    settings = make_settings(
        [http_integration(destination)], retention={"payload_seconds": 1, "dedup_window_seconds": 1}
    )
    client = await aiohttp_client(create_app(settings))
    event_id = await post_event(client, sample_body)
    await start_worker(settings)
    requests = await destination.wait_for_requests(2, timeout=15)
    assert [r.body for r in requests] == [sample_body, sample_body]
    assert requests[1].headers["Idempotency-Key"] == event_id


async def test_payload_gone_before_delivery_is_a_visible_failure(
    aiohttp_client: Any,
    make_settings: Any,
    start_worker: Any,
    destination: Destination,
    sample_body: bytes,
    redis: Redis,
    prefix: str,
) -> None:
    """An event whose body expired while it waited in the queue becomes a failure record
    per integration ("payload expired"), not a silent drop."""
    settings = make_settings([http_integration(destination)])
    client = await aiohttp_client(create_app(settings))
    event_id = await post_event(client, sample_body)
    await redis.delete(Keys(prefix).event(event_id))  # as if retention ran out
    await start_worker(settings)
    rows = await eventually(Inspector(store_for(settings, redis)).failures)
    assert rows[0].event_id == event_id
    assert "payload expired" in rows[0].last_error
    assert destination.requests == []


async def test_a_fanout_job_run_again_records_expired_and_unmatched_events_once(
    make_settings: Any, start_worker: Any, destination: Destination, sample_body: bytes, redis: Redis
) -> None:
    """A fan-out job runs again when a sibling failed or ran out of time: an event whose body
    expired keeps one failure record (one attempt logged), and an unmatched event is counted once."""
    elsewhere = {"exam_ids": ["some-other-exam"]}  # no integration takes the sample
    settings = make_settings(
        [
            http_integration(destination, name="lms", when=elsewhere),
            http_integration(destination, name="other", when=elsewhere),
        ]
    )
    store = store_for(settings, redis)
    keys = store.keys
    expired, unmatched = (
        Incoming.of(decoder.decode(body), body)
        for body in (sample_body, with_attempt(sample_body, "att_unmatched"))
    )
    assert await store.accept_batch([expired, unmatched]) == [True, True]
    await redis.delete(keys.event(expired.event_id))  # as if retention ran out while queued
    await start_worker(settings)
    await eventually(lambda: queue_empty(redis, keys))
    assert await redis.zcard(keys.failures) == 2
    # the same events again, as in the next run of a job one of whose events failed
    await store.enqueue_fanout([(e.event_id, e.attempt_id, e.released_ms) for e in (expired, unmatched)])
    await eventually(lambda: queue_empty(redis, keys))
    for name in ("lms", "other"):
        assert await redis.llen(keys.attempts(expired.event_id, name)) == 1
    assert await redis.zcard(keys.failures) == 2
    assert await redis.hget(keys.stats, "unmatched") == b"1"
    assert destination.requests == []


async def test_failures_retry_never_shortens_another_integrations_payload(
    aiohttp_client: Any,
    make_settings: Any,
    start_worker: Any,
    destination: Destination,
    sample_body: bytes,
    redis: Redis,
    prefix: str,
) -> None:
    """Retrying one integration's failure leaves the body kept for the other's failure record."""
    destination.responses = [(400, {}), (400, {})]
    settings = make_settings([http_integration(destination, "lms"), http_integration(destination, "crm")])
    client = await aiohttp_client(create_app(settings))
    event_id = await post_event(client, sample_body)
    await start_worker(settings)
    inspector = Inspector(store_for(settings, redis))
    await eventually(lambda: _count(inspector, 2))
    failure_ttl = settings.retention.failure_seconds * 1000
    assert await redis.pttl(Keys(prefix).event(event_id)) > failure_ttl - 60_000
    assert await inspector.retry([(event_id, "lms")]) == (1, 0)
    assert await redis.pttl(Keys(prefix).event(event_id)) > failure_ttl - 60_000
    await eventually(lambda: _count(inspector, 1))  # lms delivered; crm still failed
    assert [r.integration for r in await inspector.failures()] == ["crm"]


async def _count(inspector: Inspector, n: int) -> bool:
    return len(await inspector.failures()) == n


async def test_purged_failure_is_never_sent_by_a_stray_job(
    aiohttp_client: Any,
    make_settings: Any,
    start_worker: Any,
    destination: Destination,
    sample_body: bytes,
    redis: Redis,
    prefix: str,
) -> None:
    """After `failures purge`, a retry job for that pair that still turns up sends nothing."""
    destination.responses = [(400, {})]
    settings = make_settings([http_integration(destination)])
    client = await aiohttp_client(create_app(settings))
    event_id = await post_event(client, sample_body)
    worker = await start_worker(settings)
    store = store_for(settings, redis)
    inspector = Inspector(store)
    await eventually(inspector.failures)
    assert await inspector.purge([(event_id, "lms")]) == 1
    assert await inspector.purge([(event_id, "lms")]) == 0  # nothing left to purge
    await store.enqueue_deliver(event_id, "lms")  # a stray job
    keys = Keys(prefix)
    await eventually(lambda: queue_empty(redis, keys))
    assert worker.jobs_complete >= 2
    assert len(destination.requests) == 1
    assert not await redis.exists(keys.pair(event_id, "lms"))


async def test_failures_retry_skips_a_pair_whose_job_is_running(
    make_settings: Any, sample_body: bytes, redis: Redis, prefix: str
) -> None:
    """`failures retry` leaves a failure alone while that pair's job is running (its finish
    would otherwise delete the new job), and reports it as skipped."""
    settings = make_settings([{"name": "lms", "type": "http", "url": "http://127.0.0.1:1/"}])
    store = store_for(settings, redis)
    keys = Keys(prefix)
    await redis.set(keys.event("evt_x"), sample_body)
    await redis.zadd(keys.failures, {"evt_x:lms": now_ms()})
    await redis.set(f"arq:in-progress:{keys.deliver_job_id('evt_x', 'lms')}", b"1", px=60_000)
    assert await store.requeue_failures([("evt_x", "lms")]) == (0, 1)
    assert await redis.zscore(keys.failures, "evt_x:lms") is not None
    await redis.delete(f"arq:in-progress:{keys.deliver_job_id('evt_x', 'lms')}")
    assert await store.requeue_failures([("evt_x", "lms")]) == (1, 0)


async def test_timed_out_attempt_makes_the_next_one_check_for_a_repeat(
    make_settings: Any, sample_body: bytes, redis: Redis, prefix: str
) -> None:
    """An attempt whose outcome is unknown (it timed out) tells the next attempt that the
    event may have been sent already, as a crash mid-send does."""
    settings = make_settings([{"name": "f", "type": "file", "path": "/tmp/unused"}])
    store = store_for(settings, redis)
    keys = Keys(prefix)
    await redis.set(keys.event("evt_t"), sample_body)
    _, [claim] = await store.claim(
        "evt_t",
        ["f"],
        token="a",
        lock_ttl_ms=5000,
        mode="first",
        with_body=False,
        attempt_id="att",
        released_ms=1,
    )
    assert claim.state == "ok" and not claim.interrupted
    record = AttemptRecord(attempt=1, at=now_ms(), duration_ms=1, outcome="retry", error="timed out")
    await store.record("evt_t", "f", token="a", record=record, retry_in_ms=10, uncertain=True)
    _, [again] = await store.claim("evt_t", ["f"], token="b", lock_ttl_ms=5000, mode="retry", with_body=True)
    assert again.state == "ok" and again.interrupted


async def test_2xx_with_a_broken_body_counts_as_delivered(
    aiohttp_client: Any,
    make_settings: Any,
    start_worker: Any,
    sample_body: bytes,
    redis: Redis,
    prefix: str,
) -> None:
    """A destination that answers 200 and then breaks the connection mid-body has the event:
    it is delivered once, not retried."""
    hits: list[bytes] = []

    async def handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        head = await reader.readuntil(b"\r\n\r\n")
        length = int(
            next(
                line.split(b":")[1]
                for line in head.split(b"\r\n")
                if line.lower().startswith(b"content-length")
            )
        )
        await reader.readexactly(length)
        hits.append(head)
        writer.write(b"HTTP/1.1 200 OK\r\nContent-Length: 1000\r\n\r\npartial")
        await writer.drain()
        writer.close()

    server = await asyncio.start_server(handle, "127.0.0.1", 0)
    port = server.sockets[0].getsockname()[1]
    try:
        settings = make_settings([http_integration(f"http://127.0.0.1:{port}/hook")])
        client = await aiohttp_client(create_app(settings))
        event_id = await post_event(client, sample_body)
        await start_worker(settings)
        await eventually(lambda: redis.exists(Keys(prefix).delivered(event_id, "lms")))
        assert len(hits) == 1
    finally:
        server.close()
        await server.wait_closed()


def test_job_timeout_shorter_than_an_integration_is_a_config_error() -> None:
    """worker.job_timeout_seconds must leave room for the slowest integration's timeout."""
    with pytest.raises(ConfigError, match=r"worker\.job_timeout_seconds"):
        settings_from_dict(
            {
                "worker": {"job_timeout_seconds": 10},
                "integrations": [{"name": "lms", "type": "http", "url": "http://x/", "timeout_seconds": 10}],
            }
        )
    settings_from_dict(
        {
            "worker": {"job_timeout_seconds": 30},
            "integrations": [{"name": "lms", "type": "http", "url": "http://x/", "timeout_seconds": 10}],
        }
    )


async def test_newest_release_marker_outlives_older_failures(
    aiohttp_client: Any, make_settings: Any, sample_body: bytes, redis: Redis, prefix: str
) -> None:
    """The newest-release marker of an attempt lives as long as an older release's failure
    could be retried, so a stale grade can never be sent over a newer one."""
    settings = make_settings()
    client = await aiohttp_client(create_app(settings))
    await post_event(client, sample_body)
    attempt_id = json.loads(sample_body)["attempt"]["id"]
    ttl = await redis.pttl(Keys(prefix).releases(attempt_id))
    assert ttl > settings.retention.failure_seconds * 1000 - 60_000


async def test_claim_and_record_sent_twice_count_once(
    make_settings: Any, redis: Redis, prefix: str, sample_body: bytes
) -> None:
    """redis-py re-sends a command whose reply was lost (connection dropped or timed out after
    Redis ran it), possibly much later. The same claim again still owns the pair (it is not
    "locked", nor "maybe sent before", because of itself), and the same record again, even
    after a later attempt's record, counts the attempt once: one attempt-log line, one retry
    statistic."""
    settings = make_settings()
    store = store_for(settings, redis)
    keys = Keys(prefix)
    event = decoder.decode(sample_body)
    incoming = Incoming.of(event, sample_body)
    assert await store.accept_batch([incoming]) == [True]
    event_id = incoming.event_id

    async def claim() -> tuple[str, bool]:
        _, claims = await store.claim(
            event_id,
            ["lms"],
            token="tok-1",
            lock_ttl_ms=60_000,
            mode="first",
            with_body=False,
            attempt_id=incoming.attempt_id,
            released_ms=incoming.released_ms,
        )
        return claims[0].state, claims[0].interrupted

    assert await claim() == ("ok", False)
    # not "locked" by itself, and not "maybe sent before" because of its own first run
    assert await claim() == ("ok", False), "a re-sent claim is the same claim"
    record = AttemptRecord(attempt=1, at=now_ms(), duration_ms=1.0, outcome="retry", error="503")
    first = await store.record(event_id, "lms", token="tok-1", record=record, retry_in_ms=1000)
    again = await store.record(event_id, "lms", token="tok-1", record=record, retry_in_ms=1000)
    assert first == again == 1
    assert await redis.hget(keys.pair(event_id, "lms"), "attempts") == b"1"
    assert await redis.llen(keys.attempts(event_id, "lms")) == 1
    assert await redis.hget(keys.stats, "retries") == b"1"
    # the next attempt, with its own token, counts; the first one re-sent after it does not
    assert await store.record(event_id, "lms", token="tok-2", record=record, retry_in_ms=1000) == 2
    assert await store.record(event_id, "lms", token="tok-1", record=record, retry_in_ms=1000) == 2
    assert await redis.llen(keys.attempts(event_id, "lms")) == 2


async def test_a_superseded_release_is_counted_once(
    make_settings: Any, redis: Redis, prefix: str, sample_body: bytes
) -> None:
    """An older release found superseded is counted once in the stats, however often its claim
    runs (its job re-run after a sibling failed, or the command re-sent by redis-py)."""
    store = store_for(make_settings(), redis)
    old_body = with_attempt(sample_body, "att_s", "2026-11-23T09:00:00.000Z")
    new_body = with_attempt(sample_body, "att_s", "2026-11-24T09:00:00.000Z")
    old, new = (Incoming.of(decoder.decode(b), b) for b in (old_body, new_body))
    assert await store.accept_batch([old, new]) == [True, True]
    for token in ("run-1", "run-1", "run-2"):
        _, claims = await store.claim(
            old.event_id,
            ["lms"],
            token=token,
            lock_ttl_ms=60_000,
            mode="first",
            with_body=False,
            attempt_id=old.attempt_id,
            released_ms=old.released_ms,
        )
        assert claims[0].state == "superseded"
    assert await redis.hget(Keys(prefix).stats, "superseded") == b"1"
