"""``examhook replay`` (send delivered events again on purpose, deliver to an integration added
after the release, deliver events that matched nothing) and ``examhook rejected replay``.
Real receiver, real worker, real Redis; the CLI as a process."""

from __future__ import annotations

import json
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

from aiohttp.test_utils import TestClient
from redis.asyncio import Redis

from ingest.app import create_app
from shared.contract import DELIVER, Keys, encode_job
from shared.replay import Replayer
from shared.report import Target
from shared.settings import Settings
from shared.store import Rejected, Store, now_ms
from tests.conftest import SYNAP_BASIC, eventually, free_port, post_event, running_worker
from tests.results_day import EXAM, Picky, learner, picky_fixture, write_config  # noqa: F401
from tests.test_cli import examhook

ClientFactory = Callable[..., Awaitable[TestClient[Any, Any]]]


def lms(picky: Picky, name: str = "lms", **extra: Any) -> dict[str, Any]:
    return {"name": name, "type": "http", "url": picky.url, "timeout_seconds": 2, "max_attempts": 2, **extra}


async def delivered_all(
    aiohttp_client: ClientFactory,
    settings: Settings,
    start_worker: Callable[..., Awaitable[Any]],
    picky: Picky,
    bodies: list[bytes],
) -> list[str]:
    client = await aiohttp_client(create_app(settings))
    await start_worker(settings)
    ids = [await post_event(client, body) for body in bodies]

    async def arrived() -> bool:
        return len(picky.taken) >= len(bodies)

    await eventually(arrived)
    return ids


async def test_replay_sends_delivered_events_again_with_the_same_keys(
    aiohttp_client: ClientFactory,
    make_settings: Callable[..., Settings],
    start_worker: Callable[..., Awaitable[Any]],
    redis: Redis,
    picky: Picky,
    sample_body: bytes,
    prefix: str,
    tmp_path: Path,
    env: dict[str, str],
) -> None:
    """An LMS restored from backup: `replay --exam X --dry-run` prints what it would queue and
    changes nothing; `replay --exam X` sends every delivered event once more, with the same
    Idempotency-Key, and the pairs end delivered again with their attempt logs kept and a
    `replays` count; an event of another exam is not sent."""
    settings = make_settings([lms(picky)])
    bodies = [learner(sample_body, n) for n in range(3)] + [learner(sample_body, 9, exam_id="exm_other")]
    ids = await delivered_all(aiohttp_client, settings, start_worker, picky, bodies)
    config = write_config(tmp_path / "examhook.toml", [lms(picky)])
    keys = Keys(prefix)
    await eventually(lambda: _all_delivered(redis, keys, ids, "lms"))

    dry = await examhook(
        "replay", "--exam", EXAM, "--dry-run", "--config", str(config), env=env, cwd=tmp_path
    )
    assert dry.code == 0, dry
    assert dry.out.startswith("would queue 3 deliveries of 3 events, skipped 0"), dry.out
    assert all([await redis.exists(keys.delivered(e, "lms")) for e in ids])
    assert await redis.zcard(keys.queue) == 0
    assert len(picky.taken) == 4

    run = await examhook("replay", "--exam", EXAM, "--json", "--config", str(config), env=env, cwd=tmp_path)
    assert run.code == 0, run
    assert run.json()["queued"] == 3 and run.json()["skipped"] == 0

    async def resent() -> bool:
        return len(picky.taken) >= 7

    await eventually(resent)
    await eventually(lambda: _all_delivered(redis, keys, ids, "lms"))
    assert sorted(picky.keys()[4:]) == sorted(ids[:3]), "same event ids, same Idempotency-Keys"
    for event_id in ids[:3]:
        pair = await redis.hgetall(keys.pair(event_id, "lms"))
        assert pair[b"status"] == b"delivered" and pair[b"replays"] == b"1"
        assert await redis.llen(keys.attempts(event_id, "lms")) == 2
    assert await redis.hget(keys.pair(ids[3], "lms"), "replays") is None
    assert len(picky.taken) == 7


async def _all_delivered(redis: Redis, keys: Keys, ids: list[str], name: str) -> bool:
    marks = [await redis.exists(keys.delivered(e, name)) for e in ids]
    statuses = [await redis.hget(keys.pair(e, name), "status") for e in ids]
    return all(marks) and all(s == b"delivered" for s in statuses)


async def test_replay_reaches_an_integration_added_after_the_release(
    aiohttp_client: ClientFactory,
    make_settings: Callable[..., Settings],
    start_worker: Callable[..., Awaitable[Any]],
    redis: Redis,
    picky: Picky,
    sample_body: bytes,
    prefix: str,
    tmp_path: Path,
    env: dict[str, str],
) -> None:
    """An integration added after the release has no record of the exam's events: the report
    shows them pending for it; once the workers run the new configuration, `replay --exam X
    --integration new` delivers them there (and only there: the first integration gets
    nothing again)."""
    settings = make_settings([lms(picky)])
    client = await aiohttp_client(create_app(settings))
    async with running_worker(settings):  # the release, before the integration was added
        ids = [await post_event(client, learner(sample_body, n)) for n in range(2)]

        async def arrived_once() -> bool:
            return len(picky.taken) >= 2

        await eventually(arrived_once)
        await eventually(lambda: _all_delivered(redis, Keys(prefix), ids, "lms"))
    both = [lms(picky), lms(picky, "warehouse")]
    await start_worker(make_settings(both))
    config = write_config(tmp_path / "examhook.toml", both)

    report = await examhook(
        "report", "--exam", EXAM, "--json", "--config", str(config), env=env, cwd=tmp_path
    )
    assert {r["integrations"]["warehouse"] for r in report.json()} == {"pending"}
    run = await examhook(
        "replay", "--exam", EXAM, "--integration", "warehouse", "--config", str(config), env=env, cwd=tmp_path
    )
    assert run.code == 0, run
    assert "queued 2 deliveries" in run.out and "warehouse: 2 queued" in run.out

    async def arrived() -> bool:
        return len(picky.taken) >= 4

    await eventually(arrived)
    await eventually(lambda: _all_delivered(redis, Keys(prefix), ids, "warehouse"))
    assert sorted(picky.keys()) == sorted(ids * 2)
    unknown = await examhook(
        "replay", "--exam", EXAM, "--integration", "nope", "--config", str(config), env=env, cwd=tmp_path
    )
    assert unknown.code == 1 and "no integration named 'nope'" in unknown.err


async def test_events_that_matched_nothing_are_delivered_once_an_integration_takes_them(
    aiohttp_client: ClientFactory,
    make_settings: Callable[..., Settings],
    start_worker: Callable[..., Awaitable[Any]],
    redis: Redis,
    picky: Picky,
    sample_body: bytes,
    prefix: str,
    tmp_path: Path,
    env: dict[str, str],
) -> None:
    """Events that matched no integration's filter are kept in the unmatched list; once the
    filter takes them, `replay --unmatched` delivers them and they leave the list."""
    narrow = [lms(picky, when={"exam_ids": ["exm_other"]})]
    settings = make_settings(narrow)
    client = await aiohttp_client(create_app(settings))
    await start_worker(settings)
    ids = [await post_event(client, learner(sample_body, n)) for n in range(2)]
    keys = Keys(prefix)

    async def unmatched() -> bool:
        return await redis.zcard(keys.unmatched) == 2

    await eventually(unmatched)
    assert picky.taken == []
    wide = [lms(picky, when={"exam_ids": ["exm_other", EXAM]})]
    config = write_config(tmp_path / "examhook.toml", wide)
    await start_worker(make_settings(wide))
    run = await examhook("replay", "--unmatched", "--config", str(config), env=env, cwd=tmp_path)
    assert run.code == 0, run
    assert run.out.startswith("queued 2 deliveries of 2 events"), run.out

    async def arrived() -> bool:
        return len(picky.taken) >= 2

    await eventually(arrived)
    assert sorted(picky.keys()) == sorted(ids)
    assert await redis.zcard(keys.unmatched) == 0


async def test_pairs_in_flight_or_waiting_are_skipped_never_doubled(
    redis: Redis, make_settings: Callable[..., Settings], sample_body: bytes
) -> None:
    """The replay script leaves alone, and counts as skipped, a pair a worker holds (its
    lock), one waiting for a retry (its job is queued), one superseded by a newer release, and
    one whose body has expired; the others get a fresh round and a `deliver` job due now."""
    settings = make_settings([{"name": "lms", "type": "http", "url": f"http://127.0.0.1:{free_port()}/h"}])
    keys = Keys(settings.redis.prefix)
    store = Store(redis, keys, settings.retention)
    from shared.payload import decoder
    from shared.store import Incoming

    bodies = [learner(sample_body, n) for n in range(4)]
    bodies.append(learner(sample_body, 3, released_at="2026-12-01T09:00:00Z"))  # learner 3 re-marked
    incoming = [Incoming.of(decoder.decode(b), b) for b in bodies]
    await store.accept_batch(incoming)
    await redis.delete(keys.queue)  # no worker here: only the replay's jobs matter
    e = [i.event_id for i in incoming]
    for event_id in e:
        await redis.hset(keys.pair(event_id, "lms"), mapping={"status": "delivered", "attempts": 1})
        await redis.set(keys.delivered(event_id, "lms"), now_ms())
    await redis.set(keys.lock(e[0], "lms"), "someone")  # being sent right now
    job_id = keys.deliver_job_id(e[1], "lms")  # waiting for a retry
    await redis.set(keys.job(job_id), encode_job(DELIVER, (e[1], "lms"), now_ms()))
    await redis.zadd(keys.queue, {job_id: now_ms() + 60_000})
    await redis.delete(keys.event(e[2]))  # expired

    replayer = Replayer(store, Target.of(settings.integrations))
    result = await replayer.exam(EXAM)
    answers = {event_id: answer for event_id, _, answer in result.pairs}
    assert answers == {
        e[0]: "locked",
        e[1]: "pending",
        e[2]: "expired",
        e[3]: "superseded",
        e[4]: "queued",
    }
    assert (result.queued, result.skipped_total) == (1, 4)
    assert not await redis.exists(keys.delivered(e[4], "lms"))
    pair = await redis.hgetall(keys.pair(e[4], "lms"))
    assert (pair[b"status"], pair[b"attempts"], pair[b"replays"]) == (b"queued", b"0", b"1")
    assert pair[b"attempt_id"] == b"att_rd3" and int(pair[b"released_ms"]) > 0
    assert await redis.zscore(keys.queue, keys.deliver_job_id(e[4], "lms")) is not None
    assert await redis.zscore(keys.queue, job_id) > now_ms() + 30_000, "the waiting retry did not move"
    for event_id in e[:4]:
        assert await redis.exists(keys.delivered(event_id, "lms")), "skipped pairs keep their marker"

    again = await replayer.exam(EXAM)
    assert dict((event_id, a) for event_id, _, a in again.pairs)[e[4]] == "pending", "already queued"


async def test_rejected_replay_accepts_a_fixed_body_and_keeps_a_still_broken_one(
    aiohttp_client: ClientFactory,
    make_settings: Callable[..., Settings],
    start_worker: Callable[..., Awaitable[Any]],
    redis: Redis,
    picky: Picky,
    sample_body: bytes,
    prefix: str,
    tmp_path: Path,
    env: dict[str, str],
) -> None:
    """`rejected replay ID...` submits quarantined bodies as if they had just arrived: one the
    model takes now (quarantined by an older model) is accepted, leaves the quarantine and is
    delivered; one still invalid stays, reported with its error and path (exit 1); the same
    body again is a duplicate."""
    settings = make_settings([lms(picky)])
    client = await aiohttp_client(create_app(settings))
    await start_worker(settings)
    broken = json.loads(sample_body)
    broken["attempt"]["score"] = "sixty"
    response = await client.post(
        "/webhooks/exam-results-released",
        data=json.dumps(broken),
        headers={"Content-Type": "application/json", "Authorization": SYNAP_BASIC},
    )
    assert response.status == 422
    broken_id = (await response.json())["rejected_id"]
    store = Store(redis, Keys(prefix), settings.retention)
    fixed = learner(sample_body, 5).decode()
    for reject_id in ("rej_fixed", "rej_again"):
        await store.quarantine(
            Rejected(reject_id, now_ms(), "invalid_payload", "older model", "$.x", "application/json", fixed)
        )

    run = await examhook("rejected", "replay", "rej_fixed", broken_id, env=env, cwd=tmp_path)
    assert run.code == 1, run
    lines = run.out.splitlines()
    assert lines[0].startswith("rej_fixed: accepted evt_")
    assert lines[1].startswith(f"{broken_id}: rejected: invalid_payload at $.attempt.score")
    event_id = lines[0].rsplit(" ", 1)[1]

    async def arrived() -> bool:
        return picky.keys() == [event_id]

    await eventually(arrived)
    listed = await examhook("rejected", "list", "--json", env=env, cwd=tmp_path)
    assert sorted(r["id"] for r in listed.json()) == sorted(["rej_again", broken_id])
    again = await examhook("rejected", "replay", "rej_again", "--json", env=env, cwd=tmp_path)
    assert again.code == 0, again
    assert again.json()[0]["result"] == "duplicate" and again.json()[0]["event_id"] == event_id
