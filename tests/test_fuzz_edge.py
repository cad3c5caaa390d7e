"""Hypothesis against the receiver's edge: the admin pages, and every header the
receiver reads, with arbitrary bytes over a raw socket (as tests/test_fuzz.py does for
bodies).

Properties for any input: the answer is never a 5xx; nothing is logged at ERROR, and no
record carries a traceback (a client's mistake is not the server's error).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Iterator
from typing import Any
from urllib.parse import quote_from_bytes

import pytest
from aiohttp.test_utils import TestClient
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from ingest.admin.security import BEARER_SESSION, LOGIN_COOKIE, SESSION_COOKIE, AdminAuth
from ingest.app import WEBHOOK_PATH, create_app
from tests.conftest import SAMPLE, SYNAP_BASIC

Client = TestClient[Any, Any]
TOKEN = "admin-token-fuzz-Qm4e"
GOOD_BASIC = SYNAP_BASIC
CSRF = AdminAuth(TOKEN).csrf_token(BEARER_SESSION)

FUZZ = settings(
    max_examples=60,
    deadline=None,
    database=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
)

# a header value: any bytes but the line ends that would end the header itself
header_bytes = st.binary(max_size=120).map(lambda b: b.replace(b"\r", b"").replace(b"\n", b""))
header_text = st.text(max_size=60).map(lambda t: t.replace("\r", "").replace("\n", "").encode("utf-8"))
header_values = header_bytes | header_text
credentials = (
    st.sampled_from([b"", f"Bearer {TOKEN}".encode(), GOOD_BASIC.encode(), b"Bearer ", b"Basic "])
    | header_values.map(lambda b: b"Bearer " + b)
    | header_values.map(lambda b: b"Basic " + b)
)


class _Collect(logging.Handler):
    def __init__(self) -> None:
        super().__init__(logging.DEBUG)
        self.records: list[logging.LogRecord] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.records.append(record)


@pytest.fixture(autouse=True)
def no_server_errors() -> Iterator[None]:
    """The test fails if anything is logged at ERROR or with a traceback."""
    handler = _Collect()
    root = logging.getLogger()
    root.addHandler(handler)
    try:
        yield
    finally:
        root.removeHandler(handler)
    bad = [r for r in handler.records if r.levelno >= logging.ERROR or r.exc_info]
    assert not bad, [f"{r.name}: {r.getMessage()}" for r in bad]


@pytest.fixture
async def client(aiohttp_client: Any, make_settings: Any) -> Client:
    settings = make_settings(
        receiver={
            "basic_auth_user": "synap",
            "basic_auth_password": "s3cret",
            "trusted_proxies": ["127.0.0.1/32"],
            "body_timeout_seconds": 2,
            # the limiter is exercised, but must not turn every later example into a 429
            "auth_failures_per_address": 1_000_000,
            "auth_failures_total": 1_000_000,
        },
        retention={"rejected_max": 1_000_000},
        admin_token=TOKEN,
    )
    return await aiohttp_client(create_app(settings))


async def exchange(client: Client, data: bytes) -> int:
    """Send raw bytes, return the answer's status (the server may close after answering)."""
    reader, writer = await asyncio.open_connection(client.host, client.port)
    try:
        with contextlib.suppress(ConnectionError):
            writer.write(data)
            await writer.drain()
        async with asyncio.timeout(10):
            line = await reader.readline()
        return int(line.split()[1])
    finally:
        writer.close()
        with contextlib.suppress(ConnectionError):
            await writer.wait_closed()


def request(method: bytes, target: bytes, headers: list[tuple[bytes, bytes]], body: bytes = b"") -> bytes:
    lines = [method + b" " + target + b" HTTP/1.1", b"Host: test"]
    lines += [name + b": " + value for name, value in headers]
    lines += [b"Content-Length: %d" % len(body), b"Connection: close"]
    return b"\r\n".join(lines) + b"\r\n\r\n" + body


READ_HEADERS = [
    b"Authorization",
    b"Cookie",
    b"X-Forwarded-For",
    b"X-Forwarded-Proto",
    b"Forwarded",
    b"Content-Encoding",
    b"Content-Type",
    b"Accept",
]
some_headers = st.lists(st.tuples(st.sampled_from(READ_HEADERS), header_values), max_size=6)


@FUZZ
@given(headers=some_headers, auth=credentials)
async def test_webhook_headers(client: Client, headers: list[tuple[bytes, bytes]], auth: bytes) -> None:
    """The webhook with arbitrary values in every header it reads (credentials, forwarding
    headers, encodings, content type, cookies): a documented 2xx/4xx/503, never a 500."""
    status = await exchange(
        client,
        request(b"POST", WEBHOOK_PATH.encode(), [(b"Authorization", auth), *headers], SAMPLE.read_bytes()),
    )
    assert status < 500 or status == 503, status


admin_targets = st.sampled_from(
    [
        b"/admin",
        b"/admin/failures",
        b"/admin/failures?integration=",
        b"/admin/rejected",
        b"/admin/events/",
        b"/admin/rejected/",
        b"/admin/login?next=",
        b"/admin/login",
    ]
)
path_tail = st.binary(max_size=40).map(lambda b: quote_from_bytes(b, safe=b"/?=&").encode())
cookies = st.tuples(
    st.sampled_from([SESSION_COOKIE.encode(), LOGIN_COOKIE.encode(), b"examhook_admin_flash", b"other"]),
    header_values,
).map(lambda pair: pair[0] + b"=" + pair[1])


@FUZZ
@given(target=admin_targets, tail=path_tail, auth=credentials, cookie=cookies, headers=some_headers)
async def test_admin_pages_with_any_credentials_and_paths(
    client: Client,
    target: bytes,
    tail: bytes,
    auth: bytes,
    cookie: bytes,
    headers: list[tuple[bytes, bytes]],
) -> None:
    """GET any admin page, with any path tail or query, any Authorization and cookie:
    never a 5xx."""
    status = await exchange(
        client, request(b"GET", target + tail, [(b"Authorization", auth), (b"Cookie", cookie), *headers])
    )
    assert status < 500, status


form_actions = st.sampled_from(
    [
        b"/admin/login",
        b"/admin/logout",
        b"/admin/failures/retry",
        b"/admin/failures/purge",
        b"/admin/rejected/purge",
    ]
)
form_fields = st.dictionaries(
    st.sampled_from([b"csrf", b"token", b"next", b"back", b"all", b"event_id", b"integration", b"reject_id"])
    | st.binary(max_size=8),
    st.binary(max_size=40),
    max_size=6,
)
content_types = (
    st.sampled_from(
        [
            b"application/x-www-form-urlencoded",
            b"multipart/form-data; boundary=xyz",
            b"multipart/form-data",
            b"",
        ]
    )
    | header_values
)


@FUZZ
@given(
    action=form_actions,
    fields=form_fields,
    raw_form=st.booleans(),
    content_type=content_types,
    bearer=st.booleans(),
    with_csrf=st.booleans(),
)
async def test_admin_forms_with_any_fields(
    client: Client,
    action: bytes,
    fields: dict[bytes, bytes],
    raw_form: bool,
    content_type: bytes,
    bearer: bool,
    with_csrf: bool,
) -> None:
    """POST any admin form with arbitrary fields (raw bytes or percent-encoded, any
    content type), authenticated with the right Bearer token and CSRF token or not: never
    a 5xx (the handlers behind the CSRF check are reached too)."""
    if with_csrf:
        fields = {**fields, b"csrf": CSRF.encode()}
    if raw_form:
        body = b"&".join(k + b"=" + v for k, v in fields.items())
    else:
        body = b"&".join(
            quote_from_bytes(k).encode() + b"=" + quote_from_bytes(v).encode() for k, v in fields.items()
        )
    headers = [(b"Content-Type", content_type)]
    if bearer:
        headers.append((b"Authorization", f"Bearer {TOKEN}".encode()))
    status = await exchange(client, request(b"POST", action, headers, body))
    assert status < 500, status
