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
import logging
from collections.abc import Iterator
from typing import Any

import pytest
from aiohttp.test_utils import TestClient

from ingest.admin.security import LOGIN_COOKIE, SESSION_COOKIE
from ingest.app import WEBHOOK_PATH, create_app
from shared.settings import Settings

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
    return make_settings(admin_token=ADMIN_TOKEN)  # type: ignore[no-any-return]


@pytest.fixture
async def client(aiohttp_client: Any, settings: Settings) -> Client:
    return await aiohttp_client(create_app(settings))  # type: ignore[no-any-return]


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
    headers: list[tuple[str, bytes | str]] = (),
    body: bytes = b"",  # type: ignore[assignment]
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
