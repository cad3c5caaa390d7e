"""The receiver behind a real nginx terminating TLS, configured with the shipped
``deploy/nginx/examhook.conf`` (only its ports and certificate paths changed).

Clients connect from distinct loopback addresses (127.0.0.2, 127.0.0.3, ... all work on
Linux's loopback); nginx connects to the receiver from 127.0.0.1, its trusted proxy. The
certificate is a throwaway one made with ``openssl`` for this test. Skips with a reason
when nginx or openssl is missing (CI installs nginx: see .ci/run).
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import getpass
import re
import shutil
import signal
import ssl
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import aiohttp
import pytest
from aiohttp import web

from ingest.admin.security import LOGIN_COOKIE, SESSION_COOKIE
from ingest.app import WEBHOOK_PATH, create_app
from tests.conftest import SYNAP_BASIC, eventually

SHIPPED = Path(__file__).resolve().parent.parent / "deploy" / "nginx" / "examhook.conf"
GOOD = {
    "Authorization": SYNAP_BASIC,
    "Content-Type": "application/json",
}
BAD = {
    "Authorization": "Basic " + base64.b64encode(b"synap:guess").decode(),
    "Content-Type": "application/json",
}
ADMIN_TOKEN = "admin-token-nginx-3Rf8"


def _nginx() -> str | None:
    return shutil.which("nginx") or next(
        (p for p in ("/usr/sbin/nginx", "/usr/local/sbin/nginx") if Path(p).is_file()), None
    )


def template(text: str, *, http_port: int, https_port: int, app_port: int, cert: Path, key: Path) -> str:
    """The shipped file with the test's ports and certificate: each replaced exactly once."""
    replacements = {
        "listen 80;": f"listen 127.0.0.1:{http_port};",
        "listen 443 ssl;": f"listen 127.0.0.1:{https_port} ssl;",
        "server 127.0.0.1:8080;": f"server 127.0.0.1:{app_port};",
        "/etc/ssl/certs/examhook.pem": str(cert),
        "/etc/ssl/private/examhook.key": str(key),
    }
    for old, new in replacements.items():
        assert text.count(old) == 1, f"{SHIPPED.name} no longer has exactly one {old!r}"
        text = text.replace(old, new)
    return text


def main_config(directory: Path, site: Path) -> str:
    """The nginx.conf around the site file: everything in the test's directory."""
    temp = "\n".join(
        f"    {name}_temp_path {directory / name};"
        for name in ("client_body", "proxy", "fastcgi", "uwsgi", "scgi")
    )
    return f"""
user {getpass.getuser()};
daemon off;
worker_processes 1;
pid {directory / "nginx.pid"};
error_log {directory / "error.log"} warn;
events {{ worker_connections 256; }}
http {{
    access_log {directory / "access.log"};
{temp}
    include {site};
}}
"""


@dataclass
class Front:
    url: str
    http_url: str
    ssl: ssl.SSLContext
    directory: Path

    def session(self, source: str) -> aiohttp.ClientSession:
        """A client connecting from ``source`` (a 127.0.0.x address) over TLS."""
        connector = aiohttp.TCPConnector(ssl=self.ssl, local_addr=(source, 0), force_close=True)
        return aiohttp.ClientSession(connector=connector, cookie_jar=aiohttp.DummyCookieJar())


@pytest.fixture
async def front(make_settings: Any, unused_tcp_port_factory: Any, tmp_path: Path) -> AsyncIterator[Front]:
    """The receiver on a real port, nginx in front of it with the shipped configuration."""
    nginx = _nginx()
    if nginx is None:
        pytest.skip("nginx missing: `apt-get install -y nginx-light` (or nginx); .ci/run installs it")
    if shutil.which("openssl") is None:
        pytest.skip("openssl missing: needed to make the test's throwaway certificate")
    cert, key = tmp_path / "cert.pem", tmp_path / "key.pem"
    made = await asyncio.create_subprocess_exec(
        "openssl", "req", "-x509", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1",
        "-nodes", "-days", "1", "-subj", "/CN=localhost", "-addext", "subjectAltName=IP:127.0.0.1",
        "-keyout", str(key), "-out", str(cert),
        stdout=asyncio.subprocess.DEVNULL, stderr=asyncio.subprocess.PIPE,
    )  # fmt: skip
    _, err = await made.communicate()
    assert made.returncode == 0, err.decode()

    settings = make_settings(
        receiver={
            "basic_auth_user": "synap",
            "basic_auth_password": "s3cret",
            "trusted_proxies": ["127.0.0.1/32"],
            "auth_failures_per_address": 5,
            "auth_failures_total": 20,
        },
        admin_token=ADMIN_TOKEN,
    )
    app_port, http_port, https_port = (unused_tcp_port_factory() for _ in range(3))
    runner = web.AppRunner(create_app(settings), access_log=None)
    await runner.setup()
    await web.TCPSite(runner, "127.0.0.1", app_port).start()

    site = tmp_path / "examhook.conf"
    site.write_text(
        template(
            SHIPPED.read_text(),
            http_port=http_port,
            https_port=https_port,
            app_port=app_port,
            cert=cert,
            key=key,
        )
    )
    conf = tmp_path / "nginx.conf"
    conf.write_text(main_config(tmp_path, site))
    process = await asyncio.create_subprocess_exec(
        nginx, "-p", str(tmp_path), "-c", str(conf), stderr=asyncio.subprocess.PIPE
    )
    context = ssl.create_default_context(cafile=str(cert))
    front = Front(f"https://127.0.0.1:{https_port}", f"http://127.0.0.1:{http_port}", context, tmp_path)
    try:

        async def listening() -> bool:
            if process.returncode is not None:
                raise AssertionError(f"nginx exited: {(tmp_path / 'error.log').read_text()}")
            with contextlib.suppress(OSError):
                _, writer = await asyncio.open_connection("127.0.0.1", https_port)
                writer.close()
                await writer.wait_closed()
                return True
            return False

        await eventually(listening)
        yield front
    finally:
        if process.returncode is None:
            process.send_signal(signal.SIGQUIT)  # graceful: workers finish, then exit
            try:
                async with asyncio.timeout(10):
                    await process.wait()
            except TimeoutError:
                process.kill()
                await process.wait()
        await runner.cleanup()


async def _post(session: aiohttp.ClientSession, front: Front, body: bytes, headers: dict[str, str]) -> int:
    async with session.post(front.url + WEBHOOK_PATH, data=body, headers=headers) as response:
        await response.read()
        return response.status


async def test_webhook_over_tls_through_nginx(front: Front, sample_body: bytes) -> None:
    """Synap's POST over HTTPS through nginx is accepted; plain HTTP is redirected to HTTPS
    with 308 (method and body kept)."""
    async with front.session("127.0.0.2") as session:
        assert await _post(session, front, sample_body, GOOD) == 202
        async with session.post(
            front.http_url + WEBHOOK_PATH, data=sample_body, headers=GOOD, allow_redirects=False
        ) as response:
            assert response.status == 308
            assert response.headers["Location"].startswith("https://")


async def test_admin_cookies_are_secure_through_nginx(front: Front) -> None:
    """Logging in to /admin over HTTPS through nginx sets Secure cookies (nginx says
    X-Forwarded-Proto: https, and it is a trusted proxy)."""
    async with front.session("127.0.0.2") as session:
        async with session.get(front.url + "/admin/login") as form:
            assert form.status == 200
            page = await form.text()
            nonce = form.cookies[LOGIN_COOKIE]
        assert nonce["secure"]
        match = re.search(r'name="csrf" value="([^"]+)"', page)
        assert match
        async with session.post(
            front.url + "/admin/login",
            data={"token": ADMIN_TOKEN, "csrf": match.group(1)},
            headers={"Cookie": f"{LOGIN_COOKIE}={nonce.value}"},
            allow_redirects=False,
        ) as login:
            assert login.status == 303
            session_cookie = login.cookies[SESSION_COOKIE]
    assert session_cookie["secure"] and session_cookie["httponly"]


async def test_failed_auth_limit_sees_real_client_addresses_through_nginx(
    front: Front, sample_body: bytes
) -> None:
    """Through nginx, failures count against the client's own address: 127.0.0.2 is
    limited after 5 wrong passwords (its own X-Forwarded-For changing nothing), while
    127.0.0.3 behind the same nginx gets its 202."""
    async with front.session("127.0.0.2") as attacker:
        for i in range(5):
            spoof = {**BAD, "X-Forwarded-For": f"192.0.2.{i}"}
            assert await _post(attacker, front, sample_body, spoof) == 401
        assert await _post(attacker, front, sample_body, {**GOOD, "X-Forwarded-For": "192.0.2.50"}) == 429
    async with front.session("127.0.0.3") as synap:
        assert await _post(synap, front, sample_body, GOOD) == 202


async def test_attacker_without_credentials_cannot_keep_synap_out_through_nginx(
    front: Front, sample_body: bytes
) -> None:
    """An attacker guessing from ten addresses (127.0.0.10-19) as fast as it can, while
    Synap posts from 127.0.0.5: every one of Synap's requests is accepted, and the
    attacker's guesses that get an answer other than 429 are bounded (20 in total, then
    one per address)."""
    stop = asyncio.Event()
    revealing = 0

    async def attack(source: str) -> None:
        nonlocal revealing
        async with front.session(source) as session:
            for _ in range(40):
                if stop.is_set():
                    return
                status = await _post(session, front, sample_body, BAD)
                assert status in (401, 429)
                revealing += status == 401

    attackers = [asyncio.create_task(attack(f"127.0.0.{10 + i}")) for i in range(10)]
    synap_statuses = []
    async with front.session("127.0.0.5") as synap:
        for i in range(15):
            body = sample_body.replace(b'"att_d23f0824128b2f330c5c"', b'"att_nginx_%d"' % i)
            synap_statuses.append(await _post(synap, front, body, GOOD))
    stop.set()
    await asyncio.gather(*attackers)
    assert synap_statuses == [202] * 15
    assert revealing <= 20 + 10, revealing
