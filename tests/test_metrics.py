"""The receiver's /metrics: who may read it, and what ``receive --processes N`` shows."""

from __future__ import annotations

import asyncio
import contextlib
import os
import re
import signal
import subprocess
import sys
from pathlib import Path
from typing import Any

import aiohttp
import pytest
from click.testing import CliRunner

from cli.main import cli
from ingest.app import WEBHOOK_PATH, create_app
from tests.conftest import SYNAP_BASIC, eventually

BASIC = {"Authorization": SYNAP_BASIC}
TOKEN = "metrics-token-Vx81mQa2"
BEARER = {"Authorization": f"Bearer {TOKEN}"}


def receiver(**extra: Any) -> dict[str, Any]:
    return {"basic_auth_user": "synap", "basic_auth_password": "s3cret", **extra}


# -- 6. credentials ---------------------------------------------------------------------------


async def test_metrics_need_credentials(aiohttp_client: Any, make_settings: Any) -> None:
    """/metrics answers 401 (with WWW-Authenticate) without credentials or with wrong ones;
    the receiver's Basic credentials or the metrics token (Bearer) open it; /healthz and
    /readyz stay open."""
    client = await aiohttp_client(create_app(make_settings(receiver=receiver(metrics_token=TOKEN))))
    anonymous = await client.get("/metrics")
    assert anonymous.status == 401
    assert "Bearer" in anonymous.headers["WWW-Authenticate"]
    assert "examhook_receiver" not in await anonymous.text()
    assert (await client.get("/metrics", headers={"Authorization": "Bearer wrong-token-0000"})).status == 401
    for headers in (BASIC, BEARER, {"Authorization": f"bearer  {TOKEN} "}):
        response = await client.get("/metrics", headers=headers)
        assert response.status == 200, headers
        assert "examhook_receiver_requests_total" in await response.text()
    assert (await client.get("/healthz")).status == 200
    assert (await client.get("/readyz")).status == 200


async def test_metrics_with_basic_credentials_only(aiohttp_client: Any, make_settings: Any) -> None:
    """Without a metrics token the Basic credentials are the way in; a Bearer header is not."""
    client = await aiohttp_client(create_app(make_settings()))
    assert (await client.get("/metrics")).status == 401
    assert (await client.get("/metrics", headers=BEARER)).status == 401
    assert (await client.get("/metrics", headers=BASIC)).status == 200


async def test_wrong_metrics_credentials_count_as_failed_authentications(
    aiohttp_client: Any, make_settings: Any, sample_body: bytes
) -> None:
    """Guessing through /metrics is limited like guessing through the webhook (the same
    per-address count): after 20 wrong tries the webhook answers 429 to that address."""
    client = await aiohttp_client(create_app(make_settings(receiver=receiver(metrics_token=TOKEN))))
    for _ in range(20):
        assert (
            await client.get("/metrics", headers={"Authorization": "Bearer guess-guess-guess"})
        ).status == 401
    assert (await client.get("/metrics", headers=BEARER)).status == 429
    webhook = await client.post(
        WEBHOOK_PATH, data=sample_body, headers={**BASIC, "Content-Type": "application/json"}
    )
    assert webhook.status == 429


async def test_metrics_open_when_authentication_is_off(aiohttp_client: Any, make_settings: Any) -> None:
    """With no credentials configured (``examhook dev``, ``--no-auth``) and no metrics token,
    /metrics is open, as the webhook is; with a token it needs the token."""
    open_client = await aiohttp_client(create_app(make_settings(receiver={}), require_auth=False))
    assert (await open_client.get("/metrics")).status == 200
    token_client = await aiohttp_client(
        create_app(make_settings(receiver={"metrics_token": TOKEN}), require_auth=False)
    )
    assert (await token_client.get("/metrics")).status == 401
    assert (await token_client.get("/metrics", headers=BEARER)).status == 200


def test_metrics_token_from_the_environment_is_masked(tmp_path: Path) -> None:
    """EXAMHOOK_METRICS_TOKEN sets receiver.metrics_token; check-config never prints it."""
    env = {
        "EXAMHOOK_CONFIG": str(tmp_path / "none.toml"),
        "EXAMHOOK_METRICS_TOKEN": TOKEN,
        "EXAMHOOK_REDIS_URL": "",
        "EXAMHOOK_BASIC_AUTH_USER": "",
        "EXAMHOOK_BASIC_AUTH_PASSWORD": "",
        "EXAMHOOK_ADMIN_TOKEN": "",
    }
    (tmp_path / "none.toml").write_text("")
    result = CliRunner().invoke(cli, ["check-config", "--json"], env=env)
    assert result.exit_code == 0, result.output
    assert '"metrics_token": "***"' in result.output
    assert TOKEN not in result.output


def test_metrics_token_is_redacted_on_admin_pages(make_settings: Any) -> None:
    """The metrics token is one of the secrets the admin pages never show."""
    from ingest.admin.redact import secrets_of

    assert TOKEN in secrets_of(make_settings(receiver=receiver(metrics_token=TOKEN)))


# -- 13. several receiver processes ------------------------------------------------------------


def _value(text: str, series: str) -> float | None:
    match = re.search(rf"^{re.escape(series)} ([0-9.e+]+)$", text, re.M)
    return float(match.group(1)) if match else None


@pytest.mark.slow
async def test_metrics_of_several_processes_are_one_consistent_view(
    redis_url: str, prefix: str, redis: Any, unused_tcp_port_factory: Any, sample_body: bytes, tmp_path: Path
) -> None:
    """``receive --processes 2``: every scrape (each on a new connection, so landing on
    either process) shows the same totals — the sum over both processes — never one
    process's own counters; the shared metrics directory is removed when the receiver
    stops."""
    port = unused_tcp_port_factory()
    (tmp_path / "config.toml").write_text("")
    scratch = tmp_path / "tmp"
    scratch.mkdir()
    env = {
        **os.environ,
        "EXAMHOOK_CONFIG": str(tmp_path / "config.toml"),
        "EXAMHOOK_REDIS_URL": redis_url,
        "EXAMHOOK_REDIS_PREFIX": prefix,
        "EXAMHOOK_BASIC_AUTH_USER": "synap",
        "EXAMHOOK_BASIC_AUTH_PASSWORD": "s3cret",
        "EXAMHOOK_LOG_LEVEL": "warning",
        "TMPDIR": str(scratch),
    }
    env.pop("PROMETHEUS_MULTIPROC_DIR", None)
    command = [sys.executable, "-m", "cli.main", "receive", "--host", "127.0.0.1", "--port", str(port)]
    process = subprocess.Popen([*command, "--processes", "2"], env=env)
    base = f"http://127.0.0.1:{port}"
    headers = {**BASIC, "Content-Type": "application/json"}
    try:

        async def fresh(method: str, path: str, **kwargs: Any) -> tuple[int, str]:
            # a connection of its own: SO_REUSEPORT spreads connections over the processes
            async with (
                aiohttp.ClientSession() as session,
                session.request(method, base + path, **kwargs) as response,
            ):
                return response.status, await response.text()

        async def up() -> bool:
            with contextlib.suppress(aiohttp.ClientError):
                return (await fresh("GET", "/healthz"))[0] == 200
            return False

        await eventually(up, timeout=30)
        body = sample_body.replace(b'"att_d23f0824128b2f330c5c"', b'"att_multi_%d"')
        for i in range(30):
            status, _ = await fresh("POST", WEBHOOK_PATH, data=body % i, headers=headers)
            assert status == 202
        seen = []
        for _ in range(12):
            status, text = await fresh("GET", "/metrics", headers=BASIC)
            assert status == 200
            seen.append(_value(text, 'examhook_receiver_requests_total{status="202"}'))
            assert _value(text, "examhook_receiver_enqueue_seconds_count") == 30.0
        assert seen == [30.0] * 12, seen
    finally:
        process.send_signal(signal.SIGTERM)
        await asyncio.to_thread(process.wait, 40)
    assert process.returncode == 0
    assert list(scratch.iterdir()) == []


def test_observing_many_at_once_is_observing_each() -> None:
    """The receiver counts its request timings once per group commit (observe_many): the
    exposition is exactly what observing each value on its own gives."""
    from prometheus_client import CollectorRegistry, Histogram, generate_latest

    from ingest.metrics import observe_many

    values = [0.0001, 0.0005, 0.0007, 0.001, 0.003, 0.02, 0.02, 0.4, 7.0, 12.5]
    one, many = CollectorRegistry(), CollectorRegistry()
    buckets = (0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5)
    each = Histogram("t_seconds", "t", buckets=buckets, registry=one)
    batched = Histogram("t_seconds", "t", buckets=buckets, registry=many)
    for value in values:
        each.observe(value)
    observe_many(batched, values[:4])
    observe_many(batched, values[4:])

    def series(registry: CollectorRegistry) -> list[str]:  # the creation times aside
        return [line for line in generate_latest(registry).decode().splitlines() if "_created" not in line]

    assert series(many) == series(one)
