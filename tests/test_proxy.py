"""Behind a reverse proxy: client addresses and scheme from trusted proxies only, and a
failed-authentication limit that sees real clients, bounds guessing in total, and never
keeps Synap's correctly authenticated requests out.

The test client connects from 127.0.0.1 and plays the proxy: it sends the forwarding
headers a proxy would. (tests/test_nginx.py does the same through a real nginx.)
"""

from __future__ import annotations

import base64
import re
from typing import Any

import pytest
from aiohttp.test_utils import TestClient

from ingest.admin.security import LOGIN_COOKIE, SESSION_COOKIE
from ingest.app import WEBHOOK_PATH, create_app
from shared.settings import ConfigError
from tests.conftest import SYNAP_BASIC

Client = TestClient[Any, Any]
GOOD = SYNAP_BASIC
BAD = "Basic " + base64.b64encode(b"synap:guess").decode()
ADMIN_TOKEN = "admin-token-proxy-9Kd"


def receiver(**extra: Any) -> dict[str, Any]:
    return {"basic_auth_user": "synap", "basic_auth_password": "s3cret", **extra}


@pytest.fixture
async def behind_proxy(aiohttp_client: Any, make_settings: Any) -> Client:
    """The receiver trusting 127.0.0.1 (the test client) as its proxy, and 10.1.0.0/16 as
    a second proxy hop; 5 failures per address, 30 in total, per minute."""
    settings = make_settings(
        receiver=receiver(
            trusted_proxies=["127.0.0.1/32", "10.1.0.0/16"],
            auth_failures_per_address=5,
            auth_failures_total=30,
        ),
        admin_token=ADMIN_TOKEN,
    )
    return await aiohttp_client(create_app(settings))


async def post(client: Client, sample_body: bytes, auth: str, **headers: str) -> int:
    response = await client.post(
        WEBHOOK_PATH,
        data=sample_body,
        headers={"Content-Type": "application/json", "Authorization": auth, **headers},
    )
    return response.status


def via(address: str, proto: str = "https") -> dict[str, str]:
    return {"X-Forwarded-For": address, "X-Forwarded-Proto": proto}


async def test_limit_is_per_real_client_behind_a_trusted_proxy(
    behind_proxy: Client, sample_body: bytes
) -> None:
    """Through a trusted proxy, failures count against the address in X-Forwarded-For: the
    client that failed 5 times gets 429 (even with the right password), another client
    behind the same proxy is not affected."""
    for _ in range(5):
        assert await post(behind_proxy, sample_body, BAD, **via("198.51.100.7")) == 401
    assert await post(behind_proxy, sample_body, BAD, **via("198.51.100.7")) == 429
    assert await post(behind_proxy, sample_body, GOOD, **via("198.51.100.7")) == 429
    assert await post(behind_proxy, sample_body, GOOD, **via("203.0.113.50")) == 202


async def test_right_most_untrusted_address_is_the_client(behind_proxy: Client, sample_body: bytes) -> None:
    """X-Forwarded-For is read from the right, skipping trusted proxies: what a client
    writes in its own X-Forwarded-For (left of what the proxies appended) cannot move its
    failures elsewhere, while a real second proxy hop (10.1.x.x) is looked through."""
    for i in range(5):
        spoofed = f"192.0.2.{i}, 198.51.100.9"  # the client wrote 192.0.2.i; the proxy appended its peer
        assert await post(behind_proxy, sample_body, BAD, **via(spoofed)) == 401
    assert await post(behind_proxy, sample_body, BAD, **via("192.0.2.99, 198.51.100.9")) == 429
    # two hops: client -> 10.1.2.3 (a trusted inner proxy) -> 127.0.0.1
    for _ in range(5):
        assert await post(behind_proxy, sample_body, BAD, **via("203.0.113.8, 10.1.2.3")) == 401
    assert await post(behind_proxy, sample_body, GOOD, **via("203.0.113.8, 10.1.2.3")) == 429
    assert await post(behind_proxy, sample_body, GOOD, **via("203.0.113.9, 10.1.2.3")) == 202


async def test_forwarding_headers_from_an_untrusted_peer_are_ignored(
    aiohttp_client: Any, make_settings: Any, sample_body: bytes
) -> None:
    """With no trusted proxies (the default), X-Forwarded-For is ignored: changing it does
    not escape the limit of the real peer address."""
    client = await aiohttp_client(create_app(make_settings(receiver=receiver(auth_failures_per_address=5))))
    for i in range(5):
        assert await post(client, sample_body, BAD, **via(f"192.0.2.{i}")) == 401
    assert await post(client, sample_body, GOOD, **via("203.0.113.1")) == 429


async def test_forwarding_headers_from_an_untrusted_peer_are_pointed_out_once(
    aiohttp_client: Any, make_settings: Any, sample_body: bytes, caplog: pytest.LogCaptureFixture
) -> None:
    """Failed authentications carrying X-Forwarded-For from a peer that is not trusted (a
    proxy missing from trusted_proxies) make the receiver say so, once."""
    client = await aiohttp_client(create_app(make_settings()))
    with caplog.at_level("WARNING", logger="examhook.ingest"):
        for i in range(3):
            assert await post(client, sample_body, BAD, **via(f"192.0.2.{i}")) == 401
    hints = [r for r in caplog.records if "trusted_proxies" in r.getMessage()]
    assert len(hints) == 1


async def test_forwarded_header_when_configured(
    aiohttp_client: Any, make_settings: Any, sample_body: bytes
) -> None:
    """With proxy_headers = "forwarded" the RFC 7239 Forwarded header names the client
    (quoted IPv6 with a port included) and X-Forwarded-For is ignored."""
    settings = make_settings(
        receiver=receiver(
            trusted_proxies=["127.0.0.1"], proxy_headers="forwarded", auth_failures_per_address=5
        )
    )
    client = await aiohttp_client(create_app(settings))
    forwarded = {"Forwarded": 'for="[2001:db8:cafe::17]:4711";proto=https', "X-Forwarded-For": "192.0.2.1"}
    for _ in range(5):
        assert await post(client, sample_body, BAD, **forwarded) == 401
    assert await post(client, sample_body, GOOD, **forwarded) == 429
    assert await post(client, sample_body, GOOD, Forwarded="for=192.0.2.1") == 202


async def test_ipv6_clients_are_limited_per_64(behind_proxy: Client, sample_body: bytes) -> None:
    """IPv6 clients are counted per /64 (one host usually holds a whole /64): failures from
    many addresses of one /64 limit that /64, not a neighbouring one."""
    for i in range(5):
        assert await post(behind_proxy, sample_body, BAD, **via(f"2001:db8:0:1::{i + 1:x}")) == 401
    assert await post(behind_proxy, sample_body, GOOD, **via("2001:db8:0:1:ffff::1")) == 429
    assert await post(behind_proxy, sample_body, GOOD, **via("2001:db8:0:2::1")) == 202


async def test_guessing_from_many_addresses_is_bounded_and_synap_is_never_kept_out(
    behind_proxy: Client, sample_body: bytes
) -> None:
    """An attacker spreading 200 guesses over 10 addresses gets an answer that reveals
    anything (401 rather than 429) for at most auth_failures_total (30) of them plus one
    per address: past the total, every address that fails is locked out at once. Synap,
    posting with the right credentials from its own address all along, is accepted every
    time — before, during and after."""
    revealing = 0
    synap_statuses = []
    for i in range(200):
        status = await post(behind_proxy, sample_body, BAD, **via(f"198.51.100.{i % 10}"))
        assert status in (401, 429)
        revealing += status == 401
        if i % 20 == 0:
            synap_statuses.append(await post(behind_proxy, sample_body, GOOD, **via("203.0.113.200")))
    assert revealing <= 30 + 10, revealing
    assert synap_statuses[0] == 202
    assert set(synap_statuses[1:]) == {200}  # the same event again: a duplicate, accepted
    # a new address with the right credentials is accepted even now
    assert await post(behind_proxy, sample_body, GOOD, **via("203.0.113.201")) == 200


async def test_a_correct_guess_while_limited_reveals_nothing(
    behind_proxy: Client, sample_body: bytes
) -> None:
    """Once an address is limited its requests are not checked at all: the right password
    gets the same 429 (same body) as a wrong one."""
    for _ in range(5):
        await post(behind_proxy, sample_body, BAD, **via("198.51.100.77"))
    right = await behind_proxy.post(
        WEBHOOK_PATH, data=sample_body, headers={"Authorization": GOOD, **via("198.51.100.77")}
    )
    wrong = await behind_proxy.post(
        WEBHOOK_PATH, data=sample_body, headers={"Authorization": BAD, **via("198.51.100.77")}
    )
    assert (right.status, await right.text()) == (wrong.status, await wrong.text())
    assert right.status == 429


def test_trusted_proxies_must_be_networks(make_settings: Any) -> None:
    """trusted_proxies takes addresses and CIDR networks; anything else is a configuration error."""
    make_settings(receiver=receiver(trusted_proxies=["10.0.0.0/8", "127.0.0.1", "::1", "fd00::/8"]))
    with pytest.raises(ConfigError, match=r"receiver.trusted_proxies\[1\]"):
        make_settings(receiver=receiver(trusted_proxies=["10.0.0.0/8", "proxy.internal"]))


# -- 12. the admin cookie behind a TLS-terminating proxy ------------------------------------


async def _login(client: Client, headers: dict[str, str], *, secure: bool) -> Any:
    """Log in through the form. The login cookie is passed on by hand: the test talks plain
    HTTP to the receiver, and the cookie jar keeps a Secure cookie to itself over HTTP
    (a browser behind the real proxy talks HTTPS)."""
    form = await client.get("/admin/login", headers=headers)
    match = re.search(r'name="csrf" value="([^"]+)"', await form.text())
    assert match
    nonce = form.cookies[LOGIN_COOKIE]
    assert bool(nonce["secure"]) is secure
    return await client.post(
        "/admin/login",
        data={"token": ADMIN_TOKEN, "csrf": match.group(1)},
        headers={**headers, "Cookie": f"{LOGIN_COOKIE}={nonce.value}"},
        allow_redirects=False,
    )


async def test_admin_cookie_is_secure_when_a_trusted_proxy_says_https(behind_proxy: Client) -> None:
    """X-Forwarded-Proto: https from a trusted proxy makes the admin cookies (login form,
    session) Secure."""
    response = await _login(behind_proxy, via("203.0.113.5", "https"), secure=True)
    assert response.status == 303
    assert response.cookies[SESSION_COOKIE]["secure"] is True


async def test_admin_cookie_is_not_secure_over_plain_http(behind_proxy: Client) -> None:
    """X-Forwarded-Proto: http (or none) leaves the cookie without Secure, as over plain HTTP."""
    response = await _login(behind_proxy, via("203.0.113.5", "http"), secure=False)
    assert response.status == 303
    assert not response.cookies[SESSION_COOKIE]["secure"]


async def test_forwarded_proto_from_an_untrusted_peer_is_ignored(
    aiohttp_client: Any, make_settings: Any
) -> None:
    """Without trusted proxies, a client's own X-Forwarded-Proto: https changes nothing."""
    client = await aiohttp_client(create_app(make_settings(admin_token=ADMIN_TOKEN)))
    response = await _login(client, via("203.0.113.5", "https"), secure=False)
    assert response.status == 303
    assert not response.cookies[SESSION_COOKIE]["secure"]


async def test_admin_limit_sees_real_clients(behind_proxy: Client) -> None:
    """The admin pages' failure limit (10 a minute) also counts per real client address."""
    for _ in range(10):
        wrong = await behind_proxy.get(
            "/admin", headers={"Authorization": "Bearer nope", **via("198.51.100.3")}
        )
        assert wrong.status == 401
    right = {"Authorization": f"Bearer {ADMIN_TOKEN}"}
    assert (await behind_proxy.get("/admin", headers={**right, **via("198.51.100.3")})).status == 429
    assert (await behind_proxy.get("/admin", headers={**right, **via("198.51.100.4")})).status == 200
