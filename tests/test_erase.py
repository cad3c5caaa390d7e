"""``examhook erase``: every trace of one learner in Redis is removed, others are untouched."""

from __future__ import annotations

import json
from typing import Any

from click.testing import CliRunner
from redis.asyncio import Redis

from cli.main import cli
from ingest.app import WEBHOOK_PATH, create_app
from shared.contract import Keys
from shared.erasure import erase_learner
from shared.inspection import queued_fanout_jobs
from shared.payload import decoder
from shared.store import Incoming, Store
from tests.conftest import WEBHOOK_HEADERS, Destination, delivered, eventually, queue_empty


def learner_event(body: bytes, user_id: str, email: str, attempt: str) -> bytes:
    data = json.loads(body)
    data["user"]["id"], data["user"]["email"], data["attempt"]["id"] = user_id, email, attempt
    return json.dumps(data).encode()


async def all_keys(redis: Redis, prefix: str) -> list[str]:
    found = [k.decode() async for k in redis.scan_iter(match=f"{prefix}:*")]
    found += [k.decode() async for k in redis.scan_iter(match=f"arq:*:{prefix}:*")]
    return found


async def test_erase_removes_every_trace_of_one_learner(
    aiohttp_client: Any,
    make_settings: Any,
    start_worker: Any,
    destination: Destination,
    sample_body: bytes,
    redis: Redis,
    prefix: str,
) -> None:
    """Erasing a learner removes their bodies, dedup and delivery records, failures, queued jobs and rejected
    bodies — found by user id or by email — and leaves another learner's data alone."""
    destination.responses = [(400, {})]  # the first delivery fails for good: a failure record
    settings = make_settings([{"name": "lms", "type": "http", "url": destination.url, "max_attempts": 1}])
    client = await aiohttp_client(create_app(settings))
    ada = learner_event(sample_body, "usr_ada", "Ada@Example.org", "att_1")
    assert (await client.post(WEBHOOK_PATH, data=ada, headers=WEBHOOK_HEADERS)).status == 202
    await start_worker(settings)
    keys = Keys(prefix)
    await eventually(lambda: redis.zcard(keys.failures))
    # a second event for Ada (delivered), another learner's event, and a rejected body quoting Ada's address
    ada_again = learner_event(sample_body, "usr_ada", "ada@example.org", "att_2")
    bob = learner_event(sample_body, "usr_bob", "bob@example.org", "att_3")
    for body in (ada_again, bob):
        assert (await client.post(WEBHOOK_PATH, data=body, headers=WEBHOOK_HEADERS)).status == 202
    bad = b'{"user": {"email": "ada@example.org"}'
    assert (await client.post(WEBHOOK_PATH, data=bad, headers=WEBHOOK_HEADERS)).status in (400, 422)
    await destination.wait_for_requests(3)
    await eventually(lambda: _delivered_count(redis, prefix, 2))  # the worker has recorded everything

    store = Store(redis, keys, settings.retention)
    before = await all_keys(redis, prefix)
    dry = await erase_learner(store, email="ada@EXAMPLE.org", dry_run=True)
    assert dry.dry_run and len(dry.events) == 2
    assert sorted(await all_keys(redis, prefix)) == sorted(before)  # a dry run removes nothing

    report = await erase_learner(store, email="ada@EXAMPLE.org")
    assert len(report.events) == 2
    assert report.failures_removed == 1
    assert report.rejected_removed == 1
    remaining = await all_keys(redis, prefix)
    for event_id in report.events:
        assert not [k for k in remaining if event_id in k], f"traces of {event_id} left"
    for key in remaining:
        value = await redis.type(key)
        if value == b"string":
            text = (await redis.get(key) or b"").decode("utf-8", "replace").casefold()
            assert "ada@example.org" not in text and "usr_ada" not in text
    assert await redis.zcard(keys.failures) == 0
    assert await redis.zcard(keys.rejected) == 0
    bob_left = [k for k in remaining if k.startswith(f"{prefix}:event:")]
    assert len(bob_left) == 1  # Bob's event is untouched


async def test_erase_cli_by_user_id(
    make_settings: Any,
    aiohttp_client: Any,
    sample_body: bytes,
    redis_url: str,
    prefix: str,
    redis: Redis,
    monkeypatch: Any,
) -> None:
    """`examhook erase --user-id` reports what it removed (JSON) and requires an id or an address."""
    client = await aiohttp_client(create_app(make_settings()))
    body = learner_event(sample_body, "usr_zed", "zed@example.org", "att_9")
    assert (await client.post(WEBHOOK_PATH, data=body, headers=WEBHOOK_HEADERS)).status == 202
    monkeypatch.setenv("EXAMHOOK_REDIS_URL", redis_url)
    monkeypatch.setenv("EXAMHOOK_REDIS_PREFIX", prefix)
    runner = CliRunner()
    usage = runner.invoke(cli, ["erase"])
    assert usage.exit_code == 2
    result = await _invoke(runner, ["erase", "--user-id", "usr_zed", "--json"])
    assert result.exit_code == 0, result.output
    report = json.loads(result.output)
    assert len(report["events"]) == 1
    assert report["keys_deleted"] >= 3
    assert not [k async for k in redis.scan_iter(match=f"{prefix}:event:*")]


async def _invoke(runner: CliRunner, args: list[str]) -> Any:
    import asyncio

    # the command runs its own event loop: keep it off this test's loop
    return await asyncio.to_thread(runner.invoke, cli, args)


async def _delivered_count(redis: Redis, prefix: str, count: int) -> bool:
    return await delivered(redis, prefix, count) and await queue_empty(redis, Keys(prefix))


async def test_erase_takes_the_learner_out_of_a_shared_fanout_job(
    make_settings: Any,
    start_worker: Any,
    destination: Destination,
    sample_body: bytes,
    redis: Redis,
    prefix: str,
) -> None:
    """A queued fan-out job carrying several learners' events goes back to the queue without
    the erased learner's event (no key or job names it any more); the others are still delivered."""
    settings = make_settings([{"name": "lms", "type": "http", "url": destination.url}])
    keys = Keys(prefix)
    store = Store(redis, keys, settings.retention)
    bodies = [
        learner_event(sample_body, "usr_ada", "ada@example.org", "att_1"),
        learner_event(sample_body, "usr_bob", "bob@example.org", "att_2"),
        learner_event(sample_body, "usr_cy", "cy@example.org", "att_3"),
    ]
    incoming = [Incoming.of(decoder.decode(body), body) for body in bodies]
    assert await store.accept_batch(incoming) == [True, True, True]  # one group commit: one job
    ada, bob, cy = (i.event_id for i in incoming)
    assert list((await queued_fanout_jobs(redis, keys)).values()) == [[ada, bob, cy]]

    report = await erase_learner(store, user_id="usr_ada")
    assert report.events == [ada] and report.queued_jobs_removed == 1
    jobs = await queued_fanout_jobs(redis, keys)
    assert list(jobs.values()) == [[bob, cy]]
    assert keys.fanout_job_events(next(iter(jobs))) == 2  # `examhook queue` counts the two left
    assert not [k for k in await all_keys(redis, prefix) if ada in k]
    for job_id in jobs:
        assert b"usr_ada" not in (await redis.get(f"arq:job:{job_id}") or b"")

    await start_worker(settings)
    requests = await destination.wait_for_requests(2)
    await eventually(lambda: _delivered_count(redis, prefix, 2))
    assert sorted(r.headers["Idempotency-Key"] for r in requests) == sorted([bob, cy])
    assert not [k for k in await all_keys(redis, prefix) if ada in k]  # nothing recreated


async def test_erase_matches_exactly_and_its_dry_run_counts_what_it_removes(
    aiohttp_client: Any,
    make_settings: Any,
    destination: Destination,
    sample_body: bytes,
    redis: Redis,
    prefix: str,
) -> None:
    """Learners usr_1, usr_12 and usr_123 (ann@, joann@ and ann@...org.uk): erasing usr_1 (or
    ann@example.org) touches only that learner, rejected bodies included (compared field by
    field when they are JSON, as a whole token when they are not), and the dry run's counts
    are exactly what the erase then removes: events, keys, queued jobs (fan-out jobs, retry
    jobs waiting for their backoff), failure records and rejected bodies."""
    from tests.conftest import running_worker
    from tests.test_cli import dead_url

    destination.responses = [(400, {})] * 3  # each learner's first event fails for good at lms
    settings = make_settings(
        [
            {"name": "lms", "type": "http", "url": destination.url, "max_attempts": 1},
            {
                "name": "crm",
                "type": "http",
                "url": dead_url(),
                "backoff_base_seconds": 300,
                "backoff_max_seconds": 600,
            },
        ]
    )
    client = await aiohttp_client(create_app(settings))
    keys = Keys(prefix)
    learners = [
        ("usr_1", "ann@example.org"),
        ("usr_12", "joann@example.org"),
        ("usr_123", "ann@example.org.uk"),
    ]

    async def post(body: bytes) -> int:
        return (await client.post(WEBHOOK_PATH, data=body, headers=WEBHOOK_HEADERS)).status

    for n, (user_id, email) in enumerate(learners):
        assert await post(learner_event(sample_body, user_id, email, f"att_first{n}")) == 202
    async with running_worker(settings):

        async def settled() -> bool:
            return await redis.zcard(keys.failures) == 3 and await redis.zcard(keys.queue) == 3

        await eventually(settled)  # three failures (lms), three retries waiting (crm)
    for n, (user_id, email) in enumerate(learners):  # queued, no worker: fan-out jobs
        assert await post(learner_event(sample_body, user_id, email, f"att_second{n}")) == 202
    # usr_1's second attempt re-released (a new event of the same attempt: one releases key)
    rereleased = json.loads(learner_event(sample_body, "usr_1", "ann@example.org", "att_second0"))
    rereleased["attempt"]["audit"]["releasedAt"] = "2026-11-24T10:00:00.000Z"
    assert await post(json.dumps(rereleased).encode()) == 202
    # a job key of usr_1's whose queue entry is gone: a key to delete, not a queued job
    [first_event] = [
        m.decode().removeprefix(f"{prefix}:").split(":")[0]
        for m in await redis.zrange(keys.queue, 0, -1)
        if m.decode().endswith(":crm")
        and json.loads(await redis.get(keys.event(m.decode().split(":")[1])) or b"{}")["user"]["id"]
        == "usr_1"
    ]
    await redis.set(keys.job(keys.deliver_job_id(first_event, "gone")), b"x", px=60_000)
    for user_id, email in learners:  # quarantined: JSON that is not an event, and not JSON at all
        data = json.loads(learner_event(sample_body, user_id, email, "att_x"))
        data["attempt"]["score"] = "high"
        assert await post(json.dumps(data).encode()) == 422
        assert await post(f'{{"user": {{"id": "{user_id}", "email": "{email}"'.encode()) == 400
    assert await redis.zcard(keys.rejected) == 6

    store = Store(redis, keys, settings.retention)
    each: list[dict[str, Any]] = [{"user_id": "usr_1"}, {"email": "ANN@example.org"}]
    for criteria in each:
        dry = await erase_learner(store, dry_run=True, **criteria)
        real = await erase_learner(store, **criteria)
        counts = ("events", "keys_deleted", "queued_jobs_removed", "failures_removed", "rejected_removed")
        assert {c: getattr(dry, c) for c in counts} == {c: getattr(real, c) for c in counts}, criteria
        if "user_id" in criteria:  # the first pass removed it all; the second finds nothing
            assert (len(real.events), real.failures_removed, real.rejected_removed) == (3, 1, 2)
            assert real.queued_jobs_removed == 3  # the crm retry and two fan-out jobs
    # the other learners are untouched
    left_rejected = await redis.zcard(keys.rejected)
    assert left_rejected == 4
    for user_id, _ in learners[1:]:
        found = await erase_learner(store, user_id=user_id, dry_run=True)
        assert len(found.events) == 2 and found.failures_removed == 1 and found.rejected_removed == 2


def test_rejected_body_matching_is_exact() -> None:
    """A JSON body matches on a string value equal to the id (or the address, ignoring case);
    a body that is not JSON only on a whole token; never on a longer id or address."""
    from shared.erasure import rejected_body_matches as matches

    body = json.dumps({"user": {"id": "usr_12", "email": "joann@example.org"}, "note": "usr_1"})
    assert matches(body, "usr_12", None) and matches(body, None, "JoAnn@Example.org")
    assert matches(body, "usr_1", None)  # a value equal to it, wherever it is
    assert not matches(body, None, "ann@example.org")
    assert not matches(json.dumps({"user": {"id": "usr_123"}, "x": "see usr_1"}), "usr_1", None)
    truncated = '{"user": {"id": "usr_1", "email": "Ann@Example.org"'
    assert matches(truncated, "usr_1", None) and matches(truncated, None, "ann@example.org")
    for other in (
        '{"user": {"id": "usr_12"',
        '{"id": xusr_1',
        '{"e": "ann@example.org.uk"',
        "joann@example.org",
    ):
        assert not matches(other, "usr_1", "ann@example.org"), other
