"""Exactly once at the edges: an ingest that fails part-way, a slow SMTP server, Redis refusing
the record of a finished send, misconfigured workers, and a slow integration beside fast ones.

Each test pins one finding of the exactly-once issue and failed before its fix."""

from __future__ import annotations

import asyncio
import json
import os
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import redis as sync_redis
from redis.asyncio import Redis

from ingest.app import WEBHOOK_PATH, create_app
from shared.contract import Keys, event_id_of
from shared.inspection import Inspector
from shared.payload import decoder
from shared.store import AttemptRecord, Store, now_ms
from tests.conftest import (
    WEBHOOK_HEADERS,
    Destination,
    delivered,
    email_integration,
    eventually,
    http_integration,
    learner_bodies,
    post_event,
    queue_empty,
)
from tests.smtp_sink import SmtpServer


def _acl_url(url: str, user: str, password: str) -> str:
    return url.replace("redis://", f"redis://{user}:{password}@", 1)


async def _run_cli(*args: str, config: Path) -> tuple[int, str]:
    env = {**os.environ, "EXAMHOOK_CONFIG": str(config)}
    env.pop("EXAMHOOK_REDIS_URL", None)
    process = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "cli.main", *args, env=env, stderr=asyncio.subprocess.PIPE
    )
    _, err = await asyncio.wait_for(process.communicate(), 60)
    assert process.returncode is not None
    return process.returncode, err.decode()


# -- ingest is all or nothing -------------------------------------------------------------


async def test_ingest_refused_by_the_acl_leaves_no_trace_and_the_retry_is_accepted(
    private_valkey: str,
    aiohttp_client: Any,
    make_settings: Callable[..., Any],
    start_worker: Any,
    destination: Destination,
    sample_body: bytes,
) -> None:
    """With a Redis user that may write examhook's keys but not arq's (the ACL an operator
    writes from "every key starts with the prefix"), the POST gets 503 and Redis holds nothing
    of it: no dedup record, no body. Once the ACL is fixed, the sender's retry is accepted
    (202, not "duplicate") and delivered."""
    admin = Redis.from_url(private_valkey)
    prefix = "acl"
    await admin.acl_setuser(
        "examhook", enabled=True, passwords=["+pw"], keys=[f"{prefix}:*"], categories=["+@all"]
    )
    settings = make_settings(
        [http_integration(destination)],
        redis={"url": _acl_url(private_valkey, "examhook", "pw"), "prefix": prefix},
    )
    client = await aiohttp_client(create_app(settings))
    refused = await client.post(WEBHOOK_PATH, data=sample_body, headers=WEBHOOK_HEADERS)
    assert refused.status == 503
    assert await admin.dbsize() == 0, "nothing half-accepted"
    await admin.acl_setuser("examhook", enabled=True, keys=["arq:*"])  # the fix: arq's keys too
    accepted = await post_event(client, sample_body)
    await start_worker(settings)
    requests = await destination.wait_for_requests(1)
    assert [r.headers["Idempotency-Key"] for r in requests] == [accepted]
    await admin.aclose()


async def test_a_failure_part_way_through_ingest_leaves_no_dedup_record(
    aiohttp_client: Any, make_settings: Callable[..., Any], redis: Redis, prefix: str, sample_body: bytes
) -> None:
    """An error in the middle of the ingest script (here the attempt's releases key holds a
    hash, so the script fails after it wrote the body) leaves no dedup record behind:
    the answer is 503, and the retry once the obstacle is gone is accepted, not a duplicate."""
    keys = Keys(prefix)
    event = decoder.decode(sample_body)
    await redis.hset(keys.releases(event.attempt.id), "in", "the way")
    client = await aiohttp_client(create_app(make_settings()))
    refused = await client.post(WEBHOOK_PATH, data=sample_body, headers=WEBHOOK_HEADERS)
    assert refused.status == 503
    assert not await redis.exists(keys.seen(event_id_of(event)))
    await redis.delete(keys.releases(event.attempt.id))
    assert await post_event(client, sample_body) == event_id_of(event)


async def test_a_redis_user_without_arqs_keys_stops_the_worker_and_fails_check_config(
    private_valkey: str, tmp_path: Path
) -> None:
    """A worker whose Redis user lacks a permission examhook needs does not start (exit 2,
    one line naming what is missing and the ACL to grant, no traceback, no password), nor
    does a receiver, and `check-config --redis` says the same."""
    admin = Redis.from_url(private_valkey)
    await admin.acl_setuser(
        "examhook", enabled=True, passwords=["+s3cret-pw"], keys=["acl:*"], categories=["+@all"]
    )
    await admin.aclose()
    config = tmp_path / "examhook.toml"
    config.write_text(
        f'[redis]\nurl = "{_acl_url(private_valkey, "examhook", "s3cret-pw")}"\nprefix = "acl"\n'
        f'[[integrations]]\nname = "f"\ntype = "file"\npath = "{tmp_path / "out.jsonl"}"\n'
    )
    code, err = await _run_cli("worker", config=config)
    assert code == 2, err
    assert "arq:job:acl:" in err and "~arq:*" in err
    assert "Traceback" not in err and "s3cret-pw" not in err
    assert len(err.strip().splitlines()) == 1, err
    code, err = await _run_cli("check-config", "--redis", config=config)
    assert code == 2, err
    assert "~arq:*" in err and "s3cret-pw" not in err
    code, err = await _run_cli("receive", "--no-auth", config=config)
    assert code == 2, err
    assert "~arq:*" in err and "s3cret-pw" not in err and "Traceback" not in err


# -- email under a slow server ------------------------------------------------------------


async def test_a_slow_smtp_server_gets_each_learners_email_exactly_once(
    smtp: SmtpServer,
    aiohttp_client: Any,
    make_settings: Callable[..., Any],
    start_worker: Any,
    redis: Redis,
    prefix: str,
    sample_body: bytes,
) -> None:
    """An SMTP server that answers each message after 0.3 s, timeout_seconds 1, 24 learners
    and two workers at the default concurrency: every learner gets exactly one email. The
    timeout covers each conversation on its own pool connection, never the wait for one, so
    no send is cut off after the server stored it; nothing failed, nothing is unknown."""
    smtp.handler.data_delay = 0.3
    settings = make_settings([email_integration(smtp, timeout_seconds=1)])
    client = await aiohttp_client(create_app(settings))
    bodies = learner_bodies(sample_body, 24)
    for body in bodies:
        await post_event(client, body)
    await start_worker(settings)
    await start_worker(settings)
    await eventually(lambda: delivered(redis, prefix, 24), timeout=30)
    recipients = sorted(m.rcpt_tos[0] for m in smtp.handler.mails)
    assert recipients == sorted(json.loads(b)["user"]["email"] for b in bodies)
    keys = Keys(prefix)
    assert await redis.zcard(keys.failures) == 0
    assert await redis.hget(keys.stats, "unknown_outcomes") is None


# -- an outcome, once known, is never lost -------------------------------------------------


async def test_the_outcome_of_an_http_send_is_kept_while_redis_refuses_writes(
    private_valkey: str,
    aiohttp_client: Any,
    make_settings: Callable[..., Any],
    start_worker: Any,
    destination: Destination,
    sample_body: bytes,
    caplog: pytest.LogCaptureFixture,
) -> None:
    """Redis starts refusing every write just as the destination takes the event (200): the
    worker cannot record the send, keeps the outcome, and writes it once Redis accepts writes
    again, instead of sending the event a second time."""
    admin = Redis.from_url(private_valkey)
    prefix = "refuse"
    settings = make_settings(
        [http_integration(destination)],
        redis={"url": private_valkey, "prefix": prefix},
        worker={"health_check_interval_seconds": 1, "job_timeout_seconds": 4},
    )
    client = await aiohttp_client(create_app(settings))
    accepted = await post_event(client, sample_body)

    async def refuse_writes() -> None:
        destination.before_answer = None
        await admin.config_set("min-replicas-to-write", 1)

    destination.before_answer = refuse_writes
    await start_worker(settings)
    await destination.wait_for_requests(1)
    await eventually(lambda: _logged(caplog, "could not record delivery outcomes"), timeout=10)
    await admin.config_set("min-replicas-to-write", 0)
    keys = Keys(prefix)
    await eventually(lambda: admin.exists(keys.delivered(accepted, "lms")), timeout=20)
    await eventually(lambda: queue_empty(admin, keys), timeout=20)
    assert [r.headers["Idempotency-Key"] for r in destination.requests] == [accepted]
    await admin.aclose()


async def test_the_outcome_of_an_email_is_kept_while_redis_refuses_writes(
    private_valkey: str,
    smtp: SmtpServer,
    aiohttp_client: Any,
    make_settings: Callable[..., Any],
    start_worker: Any,
    sample_body: bytes,
    caplog: pytest.LogCaptureFixture,
) -> None:
    """The same for the email integration: the SMTP server takes the message, Redis refuses
    the record; the learner still gets exactly one email."""
    admin = Redis.from_url(private_valkey)
    prefix = "refuse-mail"
    settings = make_settings(
        [email_integration(smtp)],
        redis={"url": private_valkey, "prefix": prefix},
        worker={"health_check_interval_seconds": 1, "job_timeout_seconds": 4},
    )
    client = await aiohttp_client(create_app(settings))
    accepted = await post_event(client, sample_body)
    blocking = sync_redis.Redis.from_url(private_valkey)

    def refuse_writes() -> None:
        smtp.handler.on_data = None
        blocking.config_set("min-replicas-to-write", 1)

    smtp.handler.on_data = refuse_writes
    await start_worker(settings)
    await smtp.handler.wait_for(1)
    await eventually(lambda: _logged(caplog, "could not record delivery outcomes"), timeout=10)
    await admin.config_set("min-replicas-to-write", 0)
    keys = Keys(prefix)
    await eventually(lambda: admin.exists(keys.delivered(accepted, "mail")), timeout=20)
    await eventually(lambda: queue_empty(admin, keys), timeout=20)
    assert len(smtp.handler.mails) == 1
    blocking.close()
    await admin.aclose()


async def _logged(caplog: pytest.LogCaptureFixture, text: str) -> bool:
    return any(text in r.getMessage() for r in caplog.records)


async def test_a_claim_after_an_unrecorded_attempt_waits_a_recovery_grace(
    make_settings: Callable[..., Any], redis: Redis, prefix: str, sample_body: bytes
) -> None:
    """A pair whose previous attempt never recorded an outcome (its worker died, or holds the
    outcome while Redis refused it) is not sent again at once: the next claim waits a
    recovery grace (the living worker records its outcome meanwhile), then takes it, told
    "maybe sent before". An outcome recorded within the grace wins."""
    store = Store(redis, Keys(prefix), make_settings().retention)
    keys = Keys(prefix)
    await redis.set(keys.event("evt_g"), sample_body)
    await redis.set(keys.event("evt_h"), sample_body)

    async def claim(event: str, token: str) -> Any:
        _, [result] = await store.claim(
            event,
            ["lms"],
            token=token,
            lock_ttl_ms=60_000,
            mode="retry",
            with_body=False,
            attempt_id="att",
            released_ms=1,
            recovery_grace_ms=300,
        )
        return result

    # a first attempt claimed, then its worker vanished (its lock expired, no outcome)
    for event in ("evt_g", "evt_h"):
        await redis.hset(keys.pair(event, "lms"), mapping={"attempt_id": "att", "released_ms": "1"})
        assert (await claim(event, "first")).state == "ok"
        await redis.delete(keys.lock(event, "lms"))
    waiting = await claim("evt_g", "second")
    assert waiting.state == "recovering" and 0 < waiting.wait_ms <= 300

    async def taken() -> Any:
        result = await claim("evt_g", "second")
        return result if result.state == "ok" else None

    again = await eventually(taken, timeout=5)
    assert again.interrupted
    # evt_h: the first attempt's outcome arrives within the grace: nothing is sent again
    assert (await claim("evt_h", "second")).state == "recovering"
    record = AttemptRecord(attempt=1, at=now_ms(), duration_ms=1, outcome="delivered", status="200")
    await store.record("evt_h", "lms", token="first", record=record)
    assert (await claim("evt_h", "third")).state == "delivered"


# -- no silent skips ----------------------------------------------------------------------


async def test_a_worker_without_integrations_refuses_to_start(tmp_path: Path, redis_url: str) -> None:
    """A worker with no integration configured (e.g. started where its config file is not
    found) would take events and deliver them nowhere: it exits 2 with one line instead."""
    config = tmp_path / "examhook.toml"
    config.write_text(f'[redis]\nurl = "{redis_url}"\nprefix = "none"\n')
    code, err = await _run_cli("worker", config=config)
    assert code == 2, err
    assert "no integrations configured" in err
    assert len(err.strip().splitlines()) == 1 and "Traceback" not in err


async def test_workers_that_disagree_on_their_integrations_say_so(
    make_settings: Callable[..., Any],
    start_worker: Any,
    destination: Destination,
    tmp_path: Path,
    caplog: pytest.LogCaptureFixture,
) -> None:
    """Two workers on one queue with different integrations (a rolling change, a stale config
    file) would each skip the other's integrations for the events they take: the worker that
    sees the other says so at error level, naming both sets."""
    await start_worker(make_settings([http_integration(destination)]))
    both = [
        http_integration(destination),
        {"name": "file", "type": "file", "path": str(tmp_path / "o.jsonl")},
    ]
    await start_worker(make_settings(both))
    record = await eventually(
        lambda: _record(caplog, "workers disagree on their integrations"), timeout=10, interval=0.05
    )
    assert record.levelname == "ERROR"
    assert "file" in str(record.__dict__.get("this_worker", "")) + str(
        record.__dict__.get("other_worker", "")
    )


async def _record(caplog: pytest.LogCaptureFixture, text: str) -> Any:
    return next((r for r in caplog.records if text in r.getMessage()), None)


# -- integrations do not wait for each other ------------------------------------------------


async def test_a_slow_integration_does_not_hold_up_a_fast_one(
    smtp: SmtpServer,
    aiohttp_client: Any,
    make_settings: Callable[..., Any],
    start_worker: Any,
    destination: Destination,
    redis: Redis,
    prefix: str,
    sample_body: bytes,
) -> None:
    """48 learners to an http destination answering at once and an SMTP server taking 0.3 s a
    message through 2 connections (7 s for all), one worker at concurrency 4: the http
    deliveries all arrive while most emails are still to come (before, each event held its
    slot until its email was sent, so http went at email's pace)."""
    smtp.handler.data_delay = 0.3
    settings = make_settings(
        [http_integration(destination), email_integration(smtp, pool_size=2, timeout_seconds=2)],
        worker={"health_check_interval_seconds": 1, "concurrency": 4},
    )
    client = await aiohttp_client(create_app(settings))
    for body in learner_bodies(sample_body, 48):
        await post_event(client, body)
    await start_worker(settings)
    await destination.wait_for_requests(48, timeout=30)
    assert len(smtp.handler.mails) < 24, len(smtp.handler.mails)
    await eventually(lambda: delivered(redis, prefix, 96), timeout=60)
    assert len(smtp.handler.mails) == 48
    assert len(destination.requests) == 48


# -- unknown outcomes -------------------------------------------------------------------------


async def test_an_email_whose_outcome_is_unknown_is_a_visible_failure_not_a_second_copy(
    smtp: SmtpServer,
    aiohttp_client: Any,
    make_settings: Callable[..., Any],
    start_worker: Any,
    redis: Redis,
    prefix: str,
    sample_body: bytes,
) -> None:
    """The server takes the message but answers DATA after the timeout: the outcome is
    unknown. With email's default policy (on_unknown_outcome = "fail") the learner is not
    sent a second copy; the pair is a failure that says so, its attempt is marked
    outcome_unknown (`failures show`), and the unknown outcome is counted."""
    smtp.handler.data_delay = 1.5
    settings = make_settings([email_integration(smtp, timeout_seconds=0.5)])
    client = await aiohttp_client(create_app(settings))
    accepted = await post_event(client, sample_body)
    worker = await start_worker(settings)
    inspector = Inspector(Store(redis, Keys(prefix), settings.retention))
    [row] = await eventually(inspector.failures, timeout=15)
    assert row.event_id == accepted and "outcome unknown" in row.last_error
    detail = await inspector.event_detail(accepted)
    assert detail is not None
    [attempt] = detail["deliveries"][0]["attempt_log"]
    assert attempt["outcome_unknown"] is True
    assert len(smtp.handler.mails) == 1
    assert await redis.hget(Keys(prefix).stats, "unknown_outcomes") == b"1"
    metrics = worker.ctx["metrics"]
    assert metrics.unknown_outcomes.labels("mail")._value.get() == 1


async def test_unknown_outcome_policy_retry_sends_again(
    smtp: SmtpServer,
    aiohttp_client: Any,
    make_settings: Callable[..., Any],
    start_worker: Any,
    redis: Redis,
    prefix: str,
    sample_body: bytes,
) -> None:
    """on_unknown_outcome = "retry" is the operator's choice of a possible second copy over a
    possibly missing one: the email is sent again and then counts as delivered."""
    smtp.handler.data_delays = [1.0]  # the first answer comes too late; the next at once
    settings = make_settings([email_integration(smtp, timeout_seconds=0.5, on_unknown_outcome="retry")])
    client = await aiohttp_client(create_app(settings))
    accepted = await post_event(client, sample_body)
    await start_worker(settings)
    await eventually(lambda: redis.exists(Keys(prefix).delivered(accepted, "mail")), timeout=15)
    assert len(smtp.handler.mails) == 2
