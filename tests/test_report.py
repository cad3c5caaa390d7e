"""``examhook report``: per exam and per learner, who got their result everywhere it should go;
``failures list``/``show`` naming the learner; ``retries list``/``now``. Real receiver, real
worker, real Redis; the CLI runs as a user runs it (a process, reading the same configuration
as the worker)."""

from __future__ import annotations

import csv
import io
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

from aiohttp.test_utils import TestClient
from redis.asyncio import Redis

from ingest.app import create_app
from shared.contract import Keys
from shared.report import Reporter, Target
from shared.settings import Settings
from shared.store import Store, now_ms
from tests.conftest import eventually, free_port, post_event
from tests.results_day import EXAM, Picky, learner, picky_fixture, write_config  # noqa: F401
from tests.test_cli import examhook

ClientFactory = Callable[..., Awaitable[TestClient[Any, Any]]]
REFUSED = b'"att_rd1"'  # the LMS refuses learner 1


def dead_url() -> str:
    return f"http://127.0.0.1:{free_port()}/hook"


def integrations(picky: Picky) -> list[dict[str, Any]]:
    return [
        # the LMS: takes everyone but learner 1 (400: a failure at once)
        {"name": "lms", "type": "http", "url": picky.url, "timeout_seconds": 2, "max_attempts": 1},
        # down: every pair waits for a retry a minute away
        {
            "name": "later",
            "type": "http",
            "url": dead_url(),
            "timeout_seconds": 1,
            "backoff_base_seconds": 60,
            "backoff_max_seconds": 60,
        },
        # takes another exam only
        {"name": "archive", "type": "http", "url": dead_url(), "when": {"exam_ids": ["exm_other"]}},
    ]


async def results_day(
    aiohttp_client: ClientFactory,
    make_settings: Callable[..., Settings],
    start_worker: Callable[..., Awaitable[Any]],
    redis: Redis,
    picky: Picky,
    sample_body: bytes,
) -> tuple[Settings, dict[str, str]]:
    """Four events of EXAM, sent before any worker runs: learners 0 and 1, and learner 2
    released twice (a re-mark: the first release is superseded). Then a worker delivers what
    it can. Returns the settings and the event ids by name."""
    picky.refuse.append(REFUSED)
    settings = make_settings(integrations(picky))
    client = await aiohttp_client(create_app(settings))
    ids = {
        "l0": await post_event(client, learner(sample_body, 0)),
        "l1": await post_event(client, learner(sample_body, 1)),
        "l2-first": await post_event(client, learner(sample_body, 2, released_at="2026-11-23T09:00:00Z")),
        "l2-remark": await post_event(client, learner(sample_body, 2, released_at="2026-11-24T09:00:00Z")),
    }
    await start_worker(settings)
    keys = Keys(settings.redis.prefix)

    async def settled() -> bool:
        # every due job done: only the 'later' retries wait, a minute away
        due = await redis.zcount(keys.queue, "-inf", now_ms())
        return due == 0 and picky.answered >= 3 and await redis.zcard(keys.failures) == 1

    await eventually(settled, timeout=20)
    return settings, ids


EXPECTED = {
    "l0": {"lms": "delivered", "later": "pending", "archive": "skipped"},
    "l1": {"lms": "failed", "later": "pending", "archive": "skipped"},
    "l2-first": {"lms": "superseded", "later": "superseded", "archive": "skipped"},
    "l2-remark": {"lms": "delivered", "later": "pending", "archive": "skipped"},
}


async def test_exam_report_json_and_csv_show_each_learner_everywhere(
    aiohttp_client: ClientFactory,
    make_settings: Callable[..., Settings],
    start_worker: Callable[..., Awaitable[Any]],
    redis: Redis,
    picky: Picky,
    sample_body: bytes,
    tmp_path: Path,
    env: dict[str, str],
) -> None:
    """`report --exam X --json` has one row per event with the learner and each configured
    integration's state: delivered, failed (the LMS refused learner 1), superseded (a re-mark
    replaced learner 2's first release before it was sent), pending (an integration that is
    down waits for its retry), skipped (a filter that does not take the exam); failed rows
    come first. `--csv` has the same rows, one column per integration."""
    _, ids = await results_day(aiohttp_client, make_settings, start_worker, redis, picky, sample_body)
    config = write_config(tmp_path / "examhook.toml", integrations(picky))
    names = {v: k for k, v in ids.items()}

    run = await examhook("report", "--exam", EXAM, "--json", "--config", str(config), env=env, cwd=tmp_path)
    assert run.code == 0, run
    rows = run.json()
    assert len(rows) == 4
    states = {names[r["event_id"]]: r["integrations"] for r in rows}
    assert states == EXPECTED
    assert names[rows[0]["event_id"]] == "l1", "failed rows come first"
    by_name = {names[r["event_id"]]: r for r in rows}
    assert by_name["l1"]["user_id"] == "usr_rd1"
    assert by_name["l1"]["user_name"] == "Learner Number1"
    assert by_name["l1"]["user_email"] == "learner1@example.org"
    assert by_name["l1"]["attempt_id"] == "att_rd1"
    assert by_name["l2-remark"]["released_at"] == "2026-11-24T09:00:00Z"

    run = await examhook("report", "--exam", EXAM, "--csv", "--config", str(config), env=env, cwd=tmp_path)
    assert run.code == 0, run
    table = list(csv.DictReader(io.StringIO(run.out)))
    assert [r["event_id"] for r in table] == [r["event_id"] for r in rows]
    assert {names[r["event_id"]]: {n: r[n] for n in ("lms", "later", "archive")} for r in table} == EXPECTED
    assert table[0]["user_email"] == "learner1@example.org"

    text = await examhook("report", "--exam", EXAM, "--config", str(config), env=env, cwd=tmp_path)
    assert text.code == 0, text
    assert "lms: 2 delivered, 1 failed, 1 superseded" in text.out
    assert "Learner Number1" in text.out


async def test_exams_summary_counts_per_integration_within_the_window(
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
    """`report --json` has one row per exam seen in the window, with events, distinct
    learners and per integration the counts of each state; an exam whose newest event is
    older than `--since` is left out; `--csv` has a column per integration and state."""
    await results_day(aiohttp_client, make_settings, start_worker, redis, picky, sample_body)
    config = write_config(tmp_path / "examhook.toml", integrations(picky))
    # an exam last seen three days ago
    await redis.zadd(f"{prefix}:exams", {"exm_old": now_ms() - 3 * 86_400_000})

    run = await examhook("report", "--json", "--config", str(config), env=env, cwd=tmp_path)
    assert run.code == 0, run
    [exam] = [e for e in run.json() if e["exam_id"] == EXAM]
    assert (exam["exam_name"], exam["events"], exam["learners"]) == ("Maths Final 2026", 4, 3)
    assert exam["integrations"] == {
        "lms": {"delivered": 2, "pending": 0, "failed": 1, "skipped": 0, "superseded": 1},
        "later": {"delivered": 0, "pending": 3, "failed": 0, "skipped": 0, "superseded": 1},
        "archive": {"delivered": 0, "pending": 0, "failed": 0, "skipped": 4, "superseded": 0},
    }
    assert "exm_old" in [e["exam_id"] for e in run.json()]
    narrow = await examhook(
        "report", "--json", "--since", "1d", "--config", str(config), env=env, cwd=tmp_path
    )
    assert [e["exam_id"] for e in narrow.json()] == [EXAM]

    table = await examhook("report", "--csv", "--config", str(config), env=env, cwd=tmp_path)
    [row] = [r for r in csv.DictReader(io.StringIO(table.out)) if r["exam_id"] == EXAM]
    assert (row["lms:delivered"], row["lms:failed"], row["later:pending"], row["archive:skipped"]) == (
        "2",
        "1",
        "3",
        "4",
    )


async def test_failures_list_and_show_name_the_learner(
    aiohttp_client: ClientFactory,
    make_settings: Callable[..., Settings],
    start_worker: Callable[..., Awaitable[Any]],
    redis: Redis,
    picky: Picky,
    sample_body: bytes,
    tmp_path: Path,
    env: dict[str, str],
) -> None:
    """`failures list` (text and `--json`) carries the learner (id, name) and the exam;
    `failures show` opens with a summary paragraph (learner, exam, grade, release time, each
    integration's state) before the payload."""
    _, ids = await results_day(aiohttp_client, make_settings, start_worker, redis, picky, sample_body)
    config = write_config(tmp_path / "examhook.toml", integrations(picky))

    listed = await examhook("failures", "list", "--json", env=env, cwd=tmp_path)
    [row] = listed.json()
    assert (row["event_id"], row["integration"]) == (ids["l1"], "lms")
    assert (row["user_id"], row["user_name"], row["exam_id"], row["exam_name"]) == (
        "usr_rd1",
        "Learner Number1",
        EXAM,
        "Maths Final 2026",
    )
    text = await examhook("failures", "list", env=env, cwd=tmp_path)
    assert "Learner Number1 (usr_rd1)" in text.out and EXAM in text.out

    shown = await examhook("failures", "show", ids["l1"], "--config", str(config), env=env, cwd=tmp_path)
    assert shown.code == 0, shown
    opening = shown.out.splitlines()[1]
    for needle in (
        "Learner Number1 (usr_rd1, learner1@example.org)",
        f"Maths Final 2026 ({EXAM})",
        "Pass",
        "released 2026-11-23T09:53:11.414Z",
        "lms failed after 1 attempt(s): HTTP 400",
        "later pending",
        "archive skipped",
    ):
        assert needle in opening, (needle, opening)
    assert shown.out.index(opening) < shown.out.index("payload:")
    as_json = await examhook(
        "failures", "show", ids["l1"], "--json", "--config", str(config), env=env, cwd=tmp_path
    )
    summary = as_json.json()["summary"]
    assert summary["integrations"] == {"lms": "failed", "later": "pending", "archive": "skipped"}
    assert summary["user_name"] == "Learner Number1"


async def test_retries_are_listed_with_the_learner_and_made_due_now(
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
    """`retries list` shows each delivery waiting for a retry with the learner, integration,
    attempts and last error; `retries now --integration later` makes them due at once (the
    worker attempts them again within seconds instead of a minute), and no other job moves."""
    settings, ids = await results_day(aiohttp_client, make_settings, start_worker, redis, picky, sample_body)
    listed = await examhook("retries", "list", "--json", env=env, cwd=tmp_path)
    assert listed.code == 0, listed
    rows = listed.json()
    assert {r["event_id"] for r in rows} == {ids["l0"], ids["l1"], ids["l2-remark"]}
    assert all(r["integration"] == "later" and r["attempts"] == 1 for r in rows)
    assert all("connect" in r["last_error"].lower() for r in rows), rows
    assert all(r["due_in_seconds"] > 30 for r in rows)
    assert {r["user_name"] for r in rows} == {"Learner Number0", "Learner Number1", "Learner Number2"}
    text = await examhook("retries", "list", env=env, cwd=tmp_path)
    assert "Learner Number0 (usr_rd0)" in text.out

    keys = Keys(prefix)
    none = await examhook("retries", "now", "--integration", "lms", env=env, cwd=tmp_path)
    assert none.out.strip() == "made 0 waiting retries due now"
    hurried = await examhook("retries", "now", "--integration", "later", env=env, cwd=tmp_path)
    assert hurried.out.strip() == "made 3 waiting retries due now", hurried

    async def attempted_again() -> bool:
        attempts = [
            await redis.hget(keys.pair(ids[n], "later"), "attempts") for n in ("l0", "l1", "l2-remark")
        ]
        return all(a is not None and int(a) >= 2 for a in attempts)

    await eventually(attempted_again, timeout=15)
    assert settings.integration("later") is not None


async def test_reporter_reads_a_large_exam_in_few_round_trips(
    redis: Redis, make_settings: Callable[..., Settings], sample_body: bytes
) -> None:
    """The report reads an exam through its index, one script call per 250 events: 1,200
    events cost a handful of calls and no SCAN (the server's command count says so)."""
    from shared.store import Incoming

    settings = make_settings([{"name": "lms", "type": "http", "url": dead_url()}])
    store = Store(redis, Keys(settings.redis.prefix), settings.retention)
    from shared.payload import decoder

    events = [learner(sample_body, n) for n in range(1200)]
    await store.accept_batch([Incoming.of(decoder.decode(b), b) for b in events])
    reporter = Reporter(store, Target.of(settings.integrations))
    await reporter.exam(EXAM)  # loads the script
    before = await redis.info("commandstats")
    rows = await reporter.exam(EXAM)
    after = await redis.info("commandstats")
    assert len(rows) == 1200 and all(r.integrations == {"lms": "pending"} for r in rows)

    def calls(stats: dict[str, Any], name: str) -> int:
        return int(stats.get(f"cmdstat_{name}", {}).get("calls", 0))

    assert calls(after, "evalsha") - calls(before, "evalsha") <= 6
    assert calls(after, "scan") == calls(before, "scan")
