"""Security properties: Basic credentials compared in constant time, a bounded table of
failed authentications, secrets that never show (logs at DEBUG, failure records,
``check-config``), learners' personal data kept out of info-level logs, Redis URLs with
TLS and ACL credentials, and the receiver's body and header limits."""

from __future__ import annotations

import asyncio
import base64
import contextlib
import hashlib
import hmac
import inspect
import json
import logging
from collections.abc import Iterator
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit, urlunsplit

import msgspec
import pytest
from aiohttp.test_utils import TestClient
from click.testing import CliRunner
from redis.asyncio import Redis
from redis.asyncio.connection import SSLConnection
from redis.exceptions import ResponseError

from cli.main import cli
from ingest.app import WEBHOOK_PATH, create_app
from ingest.auth import BasicAuth
from shared.contract import Keys, job_deserializer, job_serializer
from shared.inspection import Inspector
from shared.logs import JsonFormatter, TextFormatter
from shared.redis_conn import arq_pool, redis_client
from shared.settings import Settings, masked, settings_from_dict
from shared.store import Store
from tests.conftest import Destination, eventually

LEARNER_EMAIL = "learner7@example.org"  # in shared/sample.json
LEARNER_NAME = "Ada Lovelace"


def worker_pool(settings: Settings) -> Any:
    """The connection a worker gets (built, not connected)."""
    return arq_pool(
        settings, queue_name="q", job_serializer=job_serializer, job_deserializer=job_deserializer
    )


def basic(user: str, password: str) -> dict[str, str]:
    token = base64.b64encode(f"{user}:{password}".encode()).decode()
    return {"Authorization": f"Basic {token}", "Content-Type": "application/json"}


# -- constant-time comparison and the failed-authentication table -----------------------


def test_check_compares_digests_with_hmac_compare_digest(monkeypatch: pytest.MonkeyPatch) -> None:
    """BasicAuth.check compares SHA-256 digests with hmac.compare_digest (constant time): first
    of the whole header against the header as Synap writes the right credentials (the common
    case, no decoding), then of the decoded ``user:password``. Both sides are always 32
    bytes, so neither the content nor the length of the configured credentials shows in the
    timing — for a wrong password of the same length, a shorter or a much longer one alike.
    The source has no ``==`` on the credentials."""
    calls: list[tuple[bytes, bytes]] = []
    real = hmac.compare_digest

    def spy(a: bytes, b: bytes) -> bool:
        calls.append((a, b))
        return real(a, b)

    monkeypatch.setattr("ingest.auth.hmac.compare_digest", spy)
    auth = BasicAuth("synap", "s3cret")
    expected = hashlib.sha256(b"synap:s3cret").digest()
    for given in (b"synap:s3creT", b"s", b"synap:" + b"x" * 5000):
        header = "Basic " + base64.b64encode(given).decode()
        assert auth.check(header) is False
        assert calls[-1] == (hashlib.sha256(given).digest(), expected)
    right = basic("synap", "s3cret")["Authorization"]
    assert auth.check(right) is True
    assert calls[-1] == (hashlib.sha256(right.encode()).digest(),) * 2
    assert len(calls) == 3 * 2 + 1  # a wrong header: both comparisons; the right one: the first
    assert all(len(a) == len(b) == 32 for a, b in calls)
    source = inspect.getsource(BasicAuth.check)
    assert "hmac.compare_digest(" in source
    assert "==" not in source.replace('"', "")


@pytest.mark.parametrize(
    "header",
    [
        None,
        "",
        "Basic",
        "Basic ",
        "Bearer c3luYXA6czNjcmV0",
        "Basic !!!not-base64!!!",
        "Basic " + base64.b64encode(b"synap:s3cre").decode(),  # a prefix of the password
        "Basic " + base64.b64encode(b"synap:s3cretX").decode(),  # longer
        "Basic " + base64.b64encode(b"synap:s3creT").decode(),  # same length
        "Basic " + base64.b64encode(b"Synap:s3cret").decode(),  # user is case-sensitive
        "Basic " + base64.b64encode(b"synap").decode(),  # no colon
        "Basic c3luYXA6czNjcmV0\u00e9",  # non-ASCII after the token
        "Basic " + base64.b64encode(b"synap:s3cret\x00").decode(),
    ],
)
def test_wrong_credentials_are_refused(header: str | None) -> None:
    """Anything but exactly ``synap:s3cret`` in a well-formed Basic header is refused,
    without an exception escaping."""
    assert BasicAuth("synap", "s3cret").check(header) is False


def test_right_credentials_are_accepted_in_every_spelling() -> None:
    """The scheme is case-insensitive, surrounding spaces in the token are tolerated, and a
    password containing ``:`` works (only the user part ends at the first colon)."""
    auth = BasicAuth("synap", "pa:ss:word")
    token = base64.b64encode(b"synap:pa:ss:word").decode()
    for header in (f"Basic {token}", f"basic {token}", f"BASIC {token}", f"Basic  {token} "):
        assert auth.check(header), header


def test_failed_authentication_table_is_bounded() -> None:
    """A spray of failures from many addresses never grows the table past max_clients."""
    auth = BasicAuth("synap", "s3cret", max_clients=100)
    for i in range(10_000):
        auth.failed(f"10.{i // 65536}.{i // 256 % 256}.{i % 256}")
        assert len(auth.limiter._failures) <= 100
    assert len(auth.limiter._failures) == 100


def test_rate_limit_applies_after_max_failures_and_expires(monkeypatch: pytest.MonkeyPatch) -> None:
    """A client is limited after max_failures failures within the window, other clients are
    not, and the limit lifts once the window has passed."""
    now = [1000.0]
    monkeypatch.setattr("ingest.auth.time.monotonic", lambda: now[0])
    auth = BasicAuth("synap", "s3cret", max_failures=3, window_seconds=60)
    for _ in range(3):
        assert not auth.limited("1.2.3.4")
        auth.failed("1.2.3.4")
    assert auth.limited("1.2.3.4")
    assert not auth.limited("5.6.7.8")
    now[0] += 61
    assert not auth.limited("1.2.3.4")


def test_total_failures_lock_out_each_further_failing_address_at_once(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Past total_failures in a window, any address that fails is limited at its first
    failure; addresses that do not fail are never limited by the total; the next window
    starts afresh."""
    now = [1000.0]
    monkeypatch.setattr("ingest.auth.time.monotonic", lambda: now[0])
    auth = BasicAuth("synap", "s3cret", max_failures=20, total_failures=10, window_seconds=60)
    for i in range(10):
        auth.failed(f"10.0.0.{i}")
    assert not any(auth.limited(f"10.0.0.{i}") for i in range(10))
    assert auth.limiter.under_pressure
    auth.failed("10.0.1.1")
    assert auth.limited("10.0.1.1")
    assert not auth.limited("10.0.1.2")  # Synap, say: it never failed
    now[0] += 61
    assert not auth.limiter.under_pressure
    auth.failed("10.0.1.3")
    assert not auth.limited("10.0.1.3")


async def test_endpoint_answers_429_after_too_many_failures(aiohttp_client: Any, make_settings: Any) -> None:
    """Through the endpoint: 20 wrong passwords are 401; the next request, even with the
    right password, is 429 with Retry-After (guessing is throttled per address)."""
    client = await aiohttp_client(create_app(make_settings()))
    for _ in range(20):
        assert (await client.post(WEBHOOK_PATH, data=b"{}", headers=basic("synap", "guess"))).status == 401
    response = await client.post(WEBHOOK_PATH, data=b"{}", headers=basic("synap", "s3cret"))
    assert response.status == 429
    assert response.headers["Retry-After"]


# -- secrets never show ----------------------------------------------------------------

BASIC_SECRET = "basic-SECRET-b4s1c"
HDR_SECRET = "SECRET_HDR-7a1f"
SIGNING_KEY = b"SIGNING-SECRET-KEY-0123456789abcdef"
WHSEC = "whsec_" + base64.b64encode(SIGNING_KEY).decode()
URL_SECRET = "url-SECRET-u7"
SMTP_SECRET = "smtp-SECRET-s3"
PG_SECRET = "pg-SECRET-p9"
REDIS_SECRET = "redis-SECRET-r3d1s"
ADMIN_SECRET = "admin-SECRET-4dm1n-token"
GUESSED = "guessed-SECRET-almost"  # a wrong password a client sent: not logged either
ALL_SECRETS = [
    BASIC_SECRET,
    base64.b64encode(f"synap:{BASIC_SECRET}".encode()).decode(),  # the Authorization value
    HDR_SECRET,
    WHSEC,
    WHSEC.removeprefix("whsec_"),
    SIGNING_KEY.decode(),
    URL_SECRET,
    SMTP_SECRET,
    PG_SECRET,
    REDIS_SECRET,
    ADMIN_SECRET,
    GUESSED,
]


def leaked(text: str) -> list[str]:
    return [s for s in ALL_SECRETS if s in text]


class _All(logging.Handler):
    def __init__(self) -> None:
        super().__init__(logging.DEBUG)
        self.records: list[logging.LogRecord] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.records.append(record)


@pytest.fixture
def all_logs() -> Iterator[list[logging.LogRecord]]:
    """Every log record of every logger, DEBUG included, while the test runs."""
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


def rendered(record: logging.LogRecord) -> str:
    """Everything a record could put in a log: both formatters, and its raw fields."""
    parts = [JsonFormatter().format(record), TextFormatter().format(record), repr(vars(record))]
    return "\n".join(parts)


@pytest.fixture
async def acl_redis_url(redis_url: str, redis: Redis, prefix: str) -> Any:
    """The test server's URL with an ACL user and password (``redis://user:pw@host``);
    the user exists for this test only. Falls back to the default user (any password is
    accepted for a password-less default user) where ACL SETUSER is not allowed."""
    user = f"u-{prefix}"
    parts = urlsplit(redis_url)
    try:
        await redis.execute_command("ACL", "SETUSER", user, "on", f">{REDIS_SECRET}", "~*", "&*", "+@all")
    except ResponseError:
        user = "default"
    yield urlunsplit(parts._replace(netloc=f"{user}:{REDIS_SECRET}@{parts.hostname}:{parts.port}"))
    if user != "default":
        await redis.execute_command("ACL", "DELUSER", user)


async def test_secrets_never_appear_in_logs_or_failure_records(
    acl_redis_url: str,  # first: the ACL user outlives the worker started below
    aiohttp_client: Any,
    make_settings: Any,
    start_worker: Any,
    destination: Destination,
    unused_tcp_port_factory: Any,
    sample_body: bytes,
    redis: Redis,
    prefix: str,
    all_logs: list[logging.LogRecord],
) -> None:
    """A real flow with every kind of secret configured — Basic password, an ACL password
    in the Redis URL, an http integration with an Authorization header and a signing
    secret (delivered), http integrations that fail (404; unreachable, with credentials in
    the URL), email and postgres integrations with passwords that cannot connect — plus a
    wrong password from a client and a rejected body: no secret appears in any log record
    at any level (DEBUG included), in the failure records or in the event's attempt log;
    and the learner's email address and name appear in no log record at INFO or above."""
    dead = unused_tcp_port_factory()
    common = {
        "max_attempts": 1,
        "timeout_seconds": 3,
        "backoff_base_seconds": 0.1,
        "backoff_max_seconds": 0.2,
    }
    settings = make_settings(
        integrations=[
            {
                "name": "lms",
                "type": "http",
                "url": destination.url,
                "headers": {"Authorization": f"Bearer {HDR_SECRET}"},
                "signing_secret": WHSEC,
                **common,
            },
            {
                "name": "lms-missing",
                "type": "http",
                "url": destination.url + "-missing",
                "headers": {"Authorization": f"Bearer {HDR_SECRET}"},
                "signing_secret": WHSEC,
                **common,
            },
            {
                "name": "lms-down",
                "type": "http",
                "url": f"http://hook:{URL_SECRET}@127.0.0.1:{dead}/x",
                "headers": {"X-Api-Key": HDR_SECRET},
                **common,
            },
            {
                "name": "mail",
                "type": "email",
                "smtp_host": "127.0.0.1",
                "smtp_port": dead,
                "tls": "none",
                "username": "results",
                "password": SMTP_SECRET,
                "from": "Exams <results@example.org>",
                **common,
            },
            {
                "name": "db",
                "type": "postgres",
                "dsn": f"postgresql://examhook:{PG_SECRET}@127.0.0.1:{dead}/results",
                **common,
            },
        ],
        redis={"url": acl_redis_url, "prefix": prefix},
        receiver={"basic_auth_user": "synap", "basic_auth_password": BASIC_SECRET},
        admin_token=ADMIN_SECRET,
    )
    client = await aiohttp_client(create_app(settings))
    bad = await client.post(WEBHOOK_PATH, data=sample_body, headers=basic("synap", GUESSED))
    assert bad.status == 401
    rejected = await client.post(
        WEBHOOK_PATH,
        data=sample_body.replace(b'"score": 62.5', b'"score": "x"'),
        headers=basic("synap", BASIC_SECRET),
    )
    assert rejected.status == 422
    response = await client.post(WEBHOOK_PATH, data=sample_body, headers=basic("synap", BASIC_SECRET))
    assert response.status == 202
    event_id = (await response.json())["event_id"]

    await start_worker(settings)
    (delivered,) = await destination.wait_for_requests(1)
    assert delivered.headers["Authorization"] == f"Bearer {HDR_SECRET}"  # the secrets were in play
    assert delivered.headers["webhook-signature"].startswith("v1,")

    store_redis = redis_client(settings)
    try:
        inspector = Inspector(Store(store_redis, Keys(prefix), settings.retention))

        async def four_failures() -> Any:
            rows = await inspector.failures()
            return rows if len(rows) == 4 else None

        rows = await eventually(four_failures, timeout=15)
        assert {r.integration for r in rows} == {"lms-missing", "lms-down", "mail", "db"}
        assert all(r.last_error for r in rows)
        assert leaked(msgspec.json.encode(rows).decode()) == []
        detail = await inspector.event_detail(event_id)
        assert detail is not None
        deliveries = json.dumps(detail["deliveries"])
        assert leaked(deliveries) == []
        quarantined = await inspector.rejected()
        assert len(quarantined) == 1
        assert leaked(msgspec.json.encode(quarantined).decode()) == []
    finally:
        await store_redis.aclose()

    assert any(r.getMessage() == "delivery delivered" for r in all_logs)
    logging.getLogger("examhook.test").debug("capture probe")
    assert any(r.getMessage() == "capture probe" for r in all_logs)  # DEBUG really is captured
    for record in all_logs:
        text = rendered(record)
        assert leaked(text) == [], (record.name, record.levelname, text[:500])
        if record.levelno >= logging.INFO:
            assert LEARNER_EMAIL not in text and LEARNER_NAME not in text, (record.name, text[:500])


def _config(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "examhook.toml"
    path.write_text(text)
    return path


FULL_CONFIG = f"""
log_level = "debug"
admin_token = "{ADMIN_SECRET}"

[redis]
url = "redis://examhook:${{REDIS_PW}}@redis.internal:6379/0"

[receiver]
basic_auth_user = "synap"
basic_auth_password = "${{BASIC_PW}}"

[[integrations]]
name = "lms"
type = "http"
url = "https://hook:{URL_SECRET}@lms.example.org/hooks/results"
headers = {{ Authorization = "Bearer ${{LMS_TOKEN}}", X-Other = "{HDR_SECRET}x" }}
signing_secret = "{WHSEC}"

[[integrations]]
name = "learner-email"
type = "email"
smtp_host = "smtp.example.org"
username = "results@example.org"
password = "{SMTP_SECRET}"
from = "Exams Office <results@example.org>"

[[integrations]]
name = "results-db"
type = "postgres"
dsn = "postgresql://examhook:{PG_SECRET}@db.internal:5432/results"
"""


@pytest.mark.parametrize("as_json", [False, True], ids=["text", "json"])
def test_check_config_masks_every_secret(tmp_path: Path, as_json: bool) -> None:
    """``examhook check-config`` (text and --json) prints the effective settings with no
    secret in them: passwords, tokens, header values, signing secret, URL/DSN passwords —
    from the file, from ``${VAR}`` substitution and from environment overrides."""
    path = _config(tmp_path, FULL_CONFIG)
    env = {
        "EXAMHOOK_CONFIG": str(path),
        "REDIS_PW": REDIS_SECRET,
        "BASIC_PW": BASIC_SECRET,
        "LMS_TOKEN": HDR_SECRET,
        "EXAMHOOK_REDIS_URL": "",
        "EXAMHOOK_BASIC_AUTH_USER": "",
        "EXAMHOOK_BASIC_AUTH_PASSWORD": "",
        "EXAMHOOK_ADMIN_TOKEN": "",
    }
    result = CliRunner().invoke(cli, ["check-config", *(["--json"] if as_json else [])], env=env)
    assert result.exit_code == 0, result.output
    assert "lms" in result.output and "results-db" in result.output
    assert leaked(result.output) == []
    # and the environment overrides too
    env.update(
        {
            "EXAMHOOK_REDIS_URL": f"rediss://:{REDIS_SECRET}@r.example:6380/0",
            "EXAMHOOK_BASIC_AUTH_USER": "synap",
            "EXAMHOOK_BASIC_AUTH_PASSWORD": BASIC_SECRET + "2",
            "EXAMHOOK_ADMIN_TOKEN": ADMIN_SECRET + "2",
        }
    )
    result = CliRunner().invoke(cli, ["check-config", *(["--json"] if as_json else [])], env=env)
    assert result.exit_code == 0, result.output
    assert "r.example" in result.output
    assert leaked(result.output) == []


@pytest.mark.parametrize(
    "broken",
    [
        f'[redis]\nurl = "http://u:{REDIS_SECRET}@h:6379"\n',
        f'[[integrations]]\nname = "x"\ntype = "http"\nurl = "ftp://u:{URL_SECRET}@h/"\n',
        f'[[integrations]]\nname = "x"\ntype = "http"\nurl = "https://h/"\nsigning_secret = "{WHSEC}!"\n',
        f'[[integrations]]\nname = "x"\ntype = "postgres"\ndsn = "mysql://u:{PG_SECRET}@h/db"\n',
        f'[receiver]\nbasic_auth_password = "{BASIC_SECRET}"\n',
        f'[[integrations]]\nname = "x"\ntype = "email"\nsmtp_host = "h"\nfrom = "a@b.c"\n'
        f'password = "{SMTP_SECRET}"\ntls = "sometimes"\n',
        f'admin_token = "{ADMIN_SECRET}"\n[receiver]\nport = "eighty"\n',
        f'[redis]\nurl = "redis://u:{REDIS_SECRET}@h:6379"\nprefix = "bad prefix!"\n',
    ],
    ids=["redis-scheme", "http-scheme", "whsec", "dsn-scheme", "half-auth", "email-tls", "port", "prefix"],
)
def test_configuration_errors_do_not_echo_secrets(tmp_path: Path, broken: str) -> None:
    """A configuration error exits 2 with a message naming the key, never the secret value."""
    env = {
        "EXAMHOOK_CONFIG": str(_config(tmp_path, broken)),
        "EXAMHOOK_REDIS_URL": "",
        "EXAMHOOK_BASIC_AUTH_USER": "",
        "EXAMHOOK_BASIC_AUTH_PASSWORD": "",
        "EXAMHOOK_ADMIN_TOKEN": "",
    }
    result = CliRunner().invoke(cli, ["check-config"], env=env)
    assert result.exit_code == 2, result.output
    assert "configuration error" in result.output
    assert leaked(result.output) == []


@pytest.mark.parametrize("reserved", ["/", "#", "?"])
@pytest.mark.parametrize("command", [["check-config"], ["worker"], ["queue"], ["receive", "--no-auth"]])
def test_a_redis_password_with_a_reserved_character_is_a_clear_error(
    tmp_path: Path, reserved: str, command: list[str]
) -> None:
    """A Redis password written into the URL with /, # or ? not percent-encoded (it cuts the
    host part short) is a configuration error (exit 2) saying how to encode it, for every
    command, never "configuration OK" or a traceback, and never a piece of the password."""
    password = f"Zq8xK{reserved}w3RtY7vB"
    url = f"redis://:{password}@127.0.0.1:6379/0"
    env = {"EXAMHOOK_CONFIG": str(_config(tmp_path, f'[redis]\nurl = "{url}"\n')), "EXAMHOOK_REDIS_URL": ""}
    result = CliRunner().invoke(cli, command, env=env)
    assert result.exit_code == 2, result.output
    assert "redis.url" in result.output and "percent-encode" in result.output
    for piece in (password, password[:5], password[6:]):
        assert piece not in result.output
    assert "Traceback" not in result.output


def test_secrets_in_url_query_strings_are_masked() -> None:
    """check-config masks a URL's password and any secret-looking query value (access_token,
    sslpassword, ...), keeping the other parameters."""
    settings = settings_from_dict(
        {
            "redis": {"url": "rediss://r.example:6380/0?ssl_password=hunter2-redis&ssl_cert_reqs=required"},
            "integrations": [
                {"name": "a", "type": "http", "url": "https://lms.example/hook?access_token=hunter2-lms&x=1"},
                {
                    "name": "b",
                    "type": "postgres",
                    "dsn": "postgresql://u@h/db?sslpassword=hunter2-pg&sslmode=require",
                },
            ],
        }
    )
    text = json.dumps(masked(settings))
    assert "hunter2" not in text
    assert "ssl_cert_reqs=required" in text and "x=1" in text and "sslmode=require" in text


def test_masked_settings_hide_every_secret() -> None:
    """shared.settings.masked() replaces every secret by ``***`` and keeps the rest."""
    settings = settings_from_dict(
        {
            "redis": {"url": f"rediss://alice:{REDIS_SECRET}@r.example:6380/1"},
            "receiver": {"basic_auth_user": "synap", "basic_auth_password": BASIC_SECRET},
            "admin_token": ADMIN_SECRET,
            "integrations": [
                {
                    "name": "a",
                    "type": "http",
                    "url": f"https://u:{URL_SECRET}@h/x",
                    "headers": {"Authorization": HDR_SECRET},
                    "signing_secret": WHSEC,
                },
                {"name": "b", "type": "postgres", "dsn": f"postgresql://u:{PG_SECRET}@h/db"},
                {"name": "c", "type": "email", "smtp_host": "h", "from": "a@b.c", "password": SMTP_SECRET},
            ],
        }
    )
    data = masked(settings)
    assert leaked(json.dumps(data)) == []
    assert data["redis"]["url"] == "rediss://alice:***@r.example:6380/1"
    assert data["receiver"]["basic_auth_user"] == "synap"
    assert data["integrations"][0]["headers"] == {"Authorization": "***"}


# -- Redis URLs: TLS and ACL credentials ------------------------------------------------


@pytest.mark.parametrize(
    ("url", "ssl", "username", "password", "db"),
    [
        ("rediss://r.example:6380/1", True, None, None, 1),
        ("rediss://alice:pw@r.example:6380/0", True, "alice", "pw", 0),
        ("redis://alice:pw@r.example:6379/2", False, "alice", "pw", 2),
        ("redis://:pw@r.example/0", False, None, "pw", 0),
    ],
)
def test_redis_urls_configure_tls_and_credentials(
    url: str, ssl: bool, username: str | None, password: str | None, db: int
) -> None:
    """``rediss://`` and ``redis://user:password@host`` are accepted by the settings and give
    our client and arq's the right TLS, user, password and database (no network needed)."""
    settings = settings_from_dict({"redis": {"url": url}})
    client = redis_client(settings)
    pool = client.connection_pool
    kwargs = pool.connection_kwargs
    assert issubclass(pool.connection_class, SSLConnection) is ssl
    assert kwargs.get("username") == username
    assert kwargs.get("password") == password
    assert kwargs["db"] == db
    assert kwargs["host"] == "r.example"
    arq = worker_pool(settings).connection_pool
    assert issubclass(arq.connection_class, SSLConnection) is ssl
    assert (arq.connection_kwargs.get("username"), arq.connection_kwargs.get("password")) == (
        username,
        password,
    )
    assert arq.connection_kwargs["db"] == db


def test_percent_encoded_redis_credentials_are_decoded_for_the_worker_too() -> None:
    """A password with reserved characters must be percent-encoded in the URL; the receiver
    and the workers then both authenticate with the decoded password."""
    settings = settings_from_dict({"redis": {"url": "redis://al%3Aice:p%40ss%2Fw@r.example:6379/0"}})
    kwargs = redis_client(settings).connection_pool.connection_kwargs
    assert (kwargs["username"], kwargs["password"]) == ("al:ice", "p@ss/w")
    kwargs = worker_pool(settings).connection_pool.connection_kwargs
    assert (kwargs["username"], kwargs["password"]) == ("al:ice", "p@ss/w")


# -- the receiver's body limit and aiohttp's header limits -------------------------------


@pytest.fixture
async def small_client(aiohttp_client: Any, make_settings: Any) -> TestClient:  # type: ignore[type-arg]
    settings = make_settings(
        receiver={"basic_auth_user": "synap", "basic_auth_password": "s3cret", "max_body_bytes": 1000}
    )
    return await aiohttp_client(create_app(settings))


def _json_of_size(size: int) -> bytes:
    body = b'{"pad": "' + b"x" * (size - 11) + b'"}'
    assert len(body) == size
    return body


async def _stream(body: bytes) -> Any:
    for i in range(0, len(body), 100):
        yield body[i : i + 100]


@pytest.mark.parametrize("chunked", [False, True], ids=["content-length", "chunked"])
async def test_body_limit(small_client: Any, chunked: bool) -> None:
    """With max_body_bytes = 1000 a body of exactly 1000 bytes is read (here: 422, it is
    not an event) and a much bigger one is 413 — with Content-Length or streamed chunked."""
    for size, expected in ((1000, 422), (50_000, 413)):
        body = _json_of_size(size)
        data: Any = _stream(body) if chunked else body
        response = await small_client.post(WEBHOOK_PATH, data=data, headers=basic("synap", "s3cret"))
        assert response.status == expected, size


async def test_one_byte_over_the_limit_is_413_with_content_length(small_client: Any) -> None:
    """A declared body of max_body_bytes + 1 bytes is 413."""
    response = await small_client.post(
        WEBHOOK_PATH, data=_json_of_size(1001), headers=basic("synap", "s3cret")
    )
    assert response.status == 413


async def test_one_byte_over_the_limit_is_413_when_streamed(small_client: Any) -> None:
    """A chunked body of max_body_bytes + 1 bytes is 413, as with Content-Length."""
    response = await small_client.post(
        WEBHOOK_PATH, data=_stream(_json_of_size(1001)), headers=basic("synap", "s3cret")
    )
    assert response.status == 413


async def test_oversized_unauthenticated_body_is_401(small_client: Any) -> None:
    """Credentials are checked before the body: an unauthenticated big body is 401."""
    response = await small_client.post(
        WEBHOOK_PATH, data=_json_of_size(50_000), headers={"Content-Type": "application/json"}
    )
    assert response.status == 401


async def _raw_status(client: Any, head: bytes) -> int:
    reader, writer = await asyncio.open_connection(client.host, client.port)
    try:
        with contextlib.suppress(ConnectionError):
            writer.write(head)
            await writer.drain()
        async with asyncio.timeout(10):
            line = await reader.readline()
        return int(line.split()[1])
    finally:
        writer.close()
        with contextlib.suppress(ConnectionError):
            await writer.wait_closed()


def _request(extra_headers: str = "", target: str = WEBHOOK_PATH, body: bytes = b"{}") -> bytes:
    auth = basic("synap", "s3cret")["Authorization"]
    return (
        f"POST {target} HTTP/1.1\r\nHost: t\r\nContent-Type: application/json\r\nAuthorization: {auth}\r\n"
        f"{extra_headers}Content-Length: {len(body)}\r\n\r\n"
    ).encode() + body


@pytest.mark.parametrize(
    ("name", "head"),
    [
        ("huge-header", _request("X-Big: " + "a" * 100_000 + "\r\n")),
        ("many-headers", _request("".join(f"X-H{i}: v\r\n" for i in range(10_000)))),
        ("huge-request-line", _request(target=WEBHOOK_PATH + "?" + "q" * 100_000)),
        ("huge-header-name", _request("X-" + "n" * 100_000 + ": v\r\n")),
    ],
)
async def test_oversized_headers_are_4xx_not_5xx(client_for_limits: Any, name: str, head: bytes) -> None:
    """A huge header, ten thousand headers, or a huge request line is refused by aiohttp's
    parser with 400 or 431 (or 414): a client error, never a 5xx, never a handler call."""
    status = await _raw_status(client_for_limits, head)
    assert status in (400, 414, 431), (name, status)


async def test_headers_just_under_the_limits_are_fine(client_for_limits: Any, sample_body: bytes) -> None:
    """A header value of 8000 bytes and 60 extra headers are within aiohttp's limits: the
    event is accepted."""
    extra = "X-Pad: " + "p" * 8000 + "\r\n" + "".join(f"X-H{i}: v\r\n" for i in range(60))
    assert await _raw_status(client_for_limits, _request(extra, body=sample_body)) == 202


@pytest.fixture
async def client_for_limits(aiohttp_client: Any, make_settings: Any) -> TestClient:  # type: ignore[type-arg]
    return await aiohttp_client(create_app(make_settings()))


def test_secret_values_are_distinct_and_random_enough() -> None:
    """Guard for this file: every secret string is distinctive, so a leak cannot hide
    behind a common substring (and none is a substring of the sample body)."""
    sample = (Path(__file__).resolve().parent.parent / "shared" / "sample.json").read_text()
    assert len(set(ALL_SECRETS)) == len(ALL_SECRETS)
    assert not any(s in sample for s in ALL_SECRETS)
