"""The results-day commands against real processes: a running ``examhook dev`` (found by its
data directory, its embedded Valkey and its ``local-file`` integration), and separate
``examhook receive`` and ``examhook worker`` processes sharing one configuration."""

from __future__ import annotations

import csv
import io
import json
from pathlib import Path
from typing import Any

import pytest
from redis.asyncio import Redis

from shared.contract import Keys
from shared.settings import load_settings
from shared.store import Rejected, Store, now_ms
from tests.conftest import clean_env, eventually, free_port
from tests.results_day import EXAM, Picky, learner, picky_fixture, write_config  # noqa: F401
from tests.test_cli import (
    AUTH,
    SCRIPT,
    WEBHOOK,
    background,
    dev_state,
    examhook,
    post,
    stop_dev,
    wait_healthy,
)

SAMPLE_EXAM = "exm_maths_2026"  # send-sample's exam


@pytest.mark.slow
async def test_report_replay_preview_against_examhook_dev(tmp_path: Path) -> None:
    """Next to a running `examhook dev` (no EXAMHOOK_REDIS_URL, no configuration): `report`
    counts the sample exam's events delivered to dev's local-file integration, `report
    --exam --csv` lists each learner, `replay --exam` writes every event to the file once
    more (same event ids), `retries list` finds nothing waiting and `preview-email --event`
    previews a stored event with the built-in templates."""
    project = tmp_path / "project"
    project.mkdir()
    data_dir = project / ".examhook"
    env = clean_env()
    port = free_port()
    base = f"http://127.0.0.1:{port}"
    with background(
        [SCRIPT, "dev", "--port", str(port)], env=env, cwd=project, log_dir=tmp_path, name="dev"
    ) as proc:
        await wait_healthy(base, proc, limit=30)
        state = await dev_state(data_dir, proc)
        sent = await examhook("send-sample", "--url", base + WEBHOOK, "--count", "5", env=env, cwd=project)
        assert sent.code == 0, sent
        deliveries = data_dir / "deliveries.jsonl"

        async def lines(count: int) -> bool:
            return deliveries.exists() and len(deliveries.read_bytes().splitlines()) >= count

        await eventually(lambda: lines(5), timeout=30, interval=0.1)

        report = await examhook("report", "--json", env=env, cwd=project)
        assert report.code == 0, report
        [exam] = report.json()
        assert (exam["exam_id"], exam["events"], exam["learners"]) == (SAMPLE_EXAM, 5, 5)
        assert exam["integrations"] == {
            "local-file": {"delivered": 5, "pending": 0, "failed": 0, "skipped": 0, "superseded": 0}
        }
        table = await examhook("report", "--exam", SAMPLE_EXAM, "--csv", env=env, cwd=project)
        rows = list(csv.DictReader(io.StringIO(table.out)))
        assert len(rows) == 5 and {r["local-file"] for r in rows} == {"delivered"}
        assert all(r["user_email"].endswith("@example.org") for r in rows)

        replay = await examhook("replay", "--exam", SAMPLE_EXAM, env=env, cwd=project)
        assert replay.code == 0, replay
        assert replay.out.startswith("queued 5 deliveries of 5 events, skipped 0"), replay.out
        await eventually(lambda: lines(10), timeout=30, interval=0.1)
        written = [json.loads(line)["event_id"] for line in deliveries.read_bytes().splitlines()]
        assert sorted(written[:5]) == sorted(written[5:])

        waiting = await examhook("retries", "list", env=env, cwd=project)
        assert waiting.out.strip() == "no deliveries are waiting for a retry", waiting
        preview = await examhook("preview-email", "--event", written[0], env=env, cwd=project)
        assert preview.code == 0, preview
        assert f"X-Examhook-Event-Id: {written[0]}" in preview.out
        await stop_dev(proc, data_dir, state["valkey_pid"])


@pytest.mark.slow
async def test_results_day_against_separate_receiver_and_worker(
    picky: Picky, sample_body: bytes, redis: Redis, redis_url: str, prefix: str, tmp_path: Path
) -> None:
    """With `examhook receive` and `examhook worker` as separate processes on one Redis and one
    configuration file: the report shows who was delivered and who failed, `failures list`
    names the failed learner, `retries list` the learners an integration that is down waits
    for and `retries now` has them attempted again at once, `replay --exam --integration`
    sends the delivered ones again with the same Idempotency-Keys (the failed one too, as a
    fresh round) until the report shows everyone delivered, `preview-email --event` previews
    a stored event and `rejected replay` takes a quarantined body the model accepts now."""
    picky.refuse.append(b'"att_rd2"')
    integrations: list[dict[str, Any]] = [
        {"name": "lms", "type": "http", "url": picky.url, "timeout_seconds": 2, "max_attempts": 1},
        {
            "name": "archive",
            "type": "http",
            "url": f"http://127.0.0.1:{free_port()}/down",
            "timeout_seconds": 1,
            "backoff_base_seconds": 600,
            "backoff_max_seconds": 600,
        },
    ]
    config = write_config(
        tmp_path / "examhook.toml",
        integrations,
        log_level="warning",
    )
    with config.open("a") as file:
        file.write('\n[receiver]\nbasic_auth_user = "synap"\nbasic_auth_password = "s3cret"\n')
        file.write("\n[worker]\npoll_delay_seconds = 0.02\n")
    env = clean_env(EXAMHOOK_REDIS_URL=redis_url, EXAMHOOK_REDIS_PREFIX=prefix, EXAMHOOK_CONFIG=str(config))
    port = free_port()
    base = f"http://127.0.0.1:{port}"
    with (
        background(
            [SCRIPT, "receive", "--port", str(port)], env=env, cwd=tmp_path, log_dir=tmp_path, name="rx"
        ) as rx,
        background([SCRIPT, "worker"], env=env, cwd=tmp_path, log_dir=tmp_path, name="worker"),
    ):
        await wait_healthy(base, rx)
        ids = []
        for n in range(3):
            status, answer = await post(base + WEBHOOK, learner(sample_body, n), auth=AUTH)
            assert status == 202, answer
            ids.append(answer["event_id"])

        async def answered() -> bool:
            failures = await examhook("failures", "list", "--json", env=env, cwd=tmp_path)
            return len(picky.taken) >= 2 and len(failures.json()) == 1

        await eventually(answered, timeout=30, interval=0.2)
        report = await examhook("report", "--exam", EXAM, "--json", env=env, cwd=tmp_path)
        states = {r["user_id"]: r["integrations"]["lms"] for r in report.json()}
        assert states == {"usr_rd0": "delivered", "usr_rd1": "delivered", "usr_rd2": "failed"}
        [failure] = (await examhook("failures", "list", "--json", env=env, cwd=tmp_path)).json()
        assert (failure["user_id"], failure["user_name"]) == ("usr_rd2", "Learner Number2")

        picky.refuse.clear()  # the LMS was fixed and restored from a backup
        replay = await examhook("replay", "--exam", EXAM, "--integration", "lms", env=env, cwd=tmp_path)
        assert replay.out.startswith("queued 3 deliveries of 3 events"), replay

        async def all_three_again() -> bool:
            return len(picky.taken) >= 5

        await eventually(all_three_again, timeout=30, interval=0.1)
        assert sorted(picky.keys()[2:]) == sorted(ids)

        async def delivered_everywhere() -> bool:
            run = await examhook("report", "--exam", EXAM, "--json", env=env, cwd=tmp_path)
            return {r["integrations"]["lms"] for r in run.json()} == {"delivered"}

        await eventually(delivered_everywhere, timeout=30, interval=0.2)

        waiting = (await examhook("retries", "list", "--json", env=env, cwd=tmp_path)).json()
        assert sorted(r["user_id"] for r in waiting) == ["usr_rd0", "usr_rd1", "usr_rd2"]
        assert {(r["integration"], r["attempts"]) for r in waiting} == {("archive", 1)}
        hurried = await examhook("retries", "now", "--integration", "archive", env=env, cwd=tmp_path)
        assert hurried.out.strip() == "made 3 waiting retries due now", hurried

        async def attempted_again() -> bool:
            rows = (await examhook("retries", "list", "--json", env=env, cwd=tmp_path)).json()
            return len(rows) == 3 and all(r["attempts"] == 2 for r in rows)

        await eventually(attempted_again, timeout=30, interval=0.2)

        preview = await examhook("preview-email", "--event", ids[2], env=env, cwd=tmp_path)
        assert preview.code == 0, preview
        assert "To: Learner Number2 <learner2@example.org>" in preview.out

        store = Store(redis, Keys(prefix), load_settings(config, env={}).retention)
        quarantined = learner(sample_body, 7).decode()
        await store.quarantine(
            Rejected(
                "rej_older_model",
                now_ms(),
                "invalid_payload",
                "older model",
                "$.x",
                "application/json",
                quarantined,
            )
        )
        taken = await examhook("rejected", "replay", "rej_older_model", env=env, cwd=tmp_path)
        assert taken.code == 0 and taken.out.startswith("rej_older_model: accepted evt_"), taken

        async def delivered_too() -> bool:
            return any(t["body"]["user"]["id"] == "usr_rd7" for t in picky.taken)

        await eventually(delivered_too, timeout=30, interval=0.1)
