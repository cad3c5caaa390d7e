"""The ``postgres`` integration against a real PostgreSQL server.

Server: ``EXAMHOOK_TEST_POSTGRES_DSN`` (CI: ``postgresql://postgres@127.0.0.1:5432/test``);
when unset, that default DSN if something answers there, else an embedded server when the
``pgserver`` package happens to be installed, else the tests are skipped. The role needs
CREATE on the database's ``public`` schema, and CREATEROLE for the privilege tests.
Every test uses its own table (random suffix) and drops it afterwards.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import secrets
import tempfile
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from datetime import UTC, datetime
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit, urlunsplit

import asyncpg
import msgspec
import pytest

from ingest.app import WEBHOOK_PATH, create_app
from shared.contract import event_id_of
from shared.payload import decoder, parse_time
from shared.settings import ConfigError, PostgresIntegration, Settings, settings_from_dict
from tests.conftest import SYNAP_BASIC, eventually
from worker.integrations.base import Delivery, PermanentError, TransientError
from worker.integrations.postgres import (
    MAX_TABLE_NAME,
    PostgresDelivery,
    classify,
    ddl,
)

DEFAULT_DSN = "postgresql://postgres@127.0.0.1:5432/test"
AUTH = {"Authorization": SYNAP_BASIC}
LATER = "2026-11-30T10:00:00.000Z"


# -- server and per-test table ------------------------------------------------------------


async def _answers(dsn: str) -> bool:
    try:
        connection = await asyncpg.connect(dsn, timeout=3)
    except (OSError, TimeoutError, asyncpg.PostgresError, asyncpg.InterfaceError):
        return False
    await connection.close()
    return True


@pytest.fixture(scope="session")
def pg_dsn() -> Iterator[str]:
    configured = os.environ.get("EXAMHOOK_TEST_POSTGRES_DSN")
    if configured:
        yield configured  # configured explicitly: a failure to connect is a failure, not a skip
        return
    if asyncio.run(_answers(DEFAULT_DSN)):
        yield DEFAULT_DSN
        return
    try:
        import pgserver  # type: ignore[import-not-found]  # optional, never a dependency
    except ImportError:
        pgserver = None
    if pgserver is not None:
        with tempfile.TemporaryDirectory(prefix="examhook-pg-") as data:
            server = pgserver.get_server(data, cleanup_mode="stop")
            yield str(server.get_uri())
        return
    pytest.skip(
        f"no PostgreSQL at {DEFAULT_DSN}: set EXAMHOOK_TEST_POSTGRES_DSN=postgresql://user@host:port/db "
        "to run the postgres tests"
    )


@pytest.fixture
async def admin(pg_dsn: str) -> AsyncIterator[Any]:
    connection = await asyncpg.connect(pg_dsn)
    yield connection
    await connection.close()


@pytest.fixture
async def table(admin: Any) -> AsyncIterator[str]:
    name = "t_exam_" + secrets.token_hex(5)
    yield name
    await admin.execute(f'DROP TABLE IF EXISTS "{name}" CASCADE')


@pytest.fixture
async def make_delivery(pg_dsn: str) -> AsyncIterator[Callable[..., PostgresDelivery]]:
    """PostgresDelivery instances for the test; all are closed at the end."""
    made: list[PostgresDelivery] = []

    def make(table: str, dsn: str | None = None, **config: Any) -> PostgresDelivery:
        delivery = PostgresDelivery(PostgresIntegration(name="pg", dsn=dsn or pg_dsn, table=table, **config))
        made.append(delivery)
        return delivery

    yield make
    for delivery in made:
        await delivery.close()


@pytest.fixture
async def role(admin: Any, pg_dsn: str) -> AsyncIterator[tuple[str, str]]:
    """A login role with no privileges at all, and a DSN connecting as it."""
    name = "examhook_t_" + secrets.token_hex(4)
    password = secrets.token_hex(8)
    try:
        await admin.execute(f"CREATE ROLE {name} LOGIN PASSWORD '{password}'")
    except asyncpg.InsufficientPrivilegeError:
        pytest.skip("the test role may not CREATE ROLE")
    parts = urlsplit(pg_dsn)
    netloc = f"{name}:{password}@{parts.hostname}" + (f":{parts.port}" if parts.port else "")
    yield name, urlunsplit(parts._replace(netloc=netloc))
    # close the role's own sessions first (pools are closed by make_delivery already)
    await admin.execute("SELECT pg_terminate_backend(pid) FROM pg_stat_activity WHERE usename = $1", name)
    await admin.execute(f"DROP OWNED BY {name}")
    await admin.execute(f"DROP ROLE {name}")


def delivery_of(body: bytes, attempt: int = 1) -> Delivery:
    event = decoder.decode(body)
    return Delivery(event_id_of(event), body, event, attempt)


def changed(body: bytes, **edits: Any) -> bytes:
    """The body with ``attempt.audit.releasedAt`` and friends edited (dotted keys via ``__``)."""
    data = json.loads(body)
    for path, value in edits.items():
        *parents, last = path.split("__")
        target = data
        for key in parents:
            target = target[key]
        target[last] = value
    return json.dumps(data).encode()


def re_release(body: bytes) -> bytes:
    """The same attempt released again after a re-mark: later releasedAt, new score."""
    data = json.loads(body)
    data["attempt"]["audit"]["releasedAt"] = LATER
    data["attempt"]["score"] = 77.5
    data["attempt"]["scoreFrac"] = 0.775
    data["attempt"]["grade"] = {"label": "Merit", "isPass": True, "minScore": 70}
    return json.dumps(data).encode()


def with_address(dsn: str, host: str, port: int) -> str:
    """The DSN with another host and port (user and password kept)."""
    parts = urlsplit(dsn)
    userinfo, at, _ = parts.netloc.rpartition("@")
    return urlunsplit(parts._replace(netloc=f"{userinfo}{at}{host}:{port}"))


async def unused_port() -> int:
    server = await asyncio.start_server(lambda r, w: None, "127.0.0.1", 0)
    port = int(server.sockets[0].getsockname()[1])
    server.close()
    await server.wait_closed()
    return port


# -- pure functions (no server needed) ----------------------------------------------------


def test_parse_time() -> None:
    """ISO 8601 strings become aware datetimes (``Z`` and naive mean UTC); junk becomes None."""
    assert parse_time("2026-11-23T09:53:11.414Z") == datetime(2026, 11, 23, 9, 53, 11, 414000, tzinfo=UTC)
    assert parse_time("2026-11-23T09:53:11") == datetime(2026, 11, 23, 9, 53, 11, tzinfo=UTC)
    assert parse_time("2026-11-23T10:53:11+01:00") == datetime(2026, 11, 23, 9, 53, 11, tzinfo=UTC)
    assert parse_time("yesterday") is None
    assert parse_time("") is None


@pytest.mark.parametrize(
    ("exc", "kind"),
    [
        (ConnectionRefusedError(111, "refused"), TransientError),
        (OSError("network unreachable"), TransientError),
        (TimeoutError(), TransientError),
        (asyncpg.PostgresConnectionError("gone"), TransientError),
        (asyncpg.ConnectionDoesNotExistError("closed mid-operation"), TransientError),
        (asyncpg.TooManyConnectionsError("too many"), TransientError),
        (asyncpg.CannotConnectNowError("starting up"), TransientError),
        (asyncpg.SerializationError("could not serialize"), TransientError),
        (asyncpg.DeadlockDetectedError("deadlock"), TransientError),
        (asyncpg.ReadOnlySQLTransactionError("read-only (standby)"), TransientError),
        (asyncpg.AdminShutdownError("shutting down"), TransientError),
        (asyncpg.QueryCanceledError("statement timeout"), TransientError),
        (asyncpg.LockNotAvailableError("lock"), TransientError),
        (asyncpg.InterfaceError("connection is closed"), TransientError),
        (asyncpg.UndefinedTableError("no table"), PermanentError),
        (asyncpg.UndefinedColumnError("no column"), PermanentError),
        (asyncpg.InsufficientPrivilegeError("permission denied"), PermanentError),
        (asyncpg.DataError("bad data"), PermanentError),
        (asyncpg.UntranslatableCharacterError("\\u0000"), PermanentError),
        (asyncpg.UniqueViolationError("duplicate"), PermanentError),
        (asyncpg.InvalidPasswordError("password authentication failed"), PermanentError),
        (asyncpg.InvalidCatalogNameError("no database"), PermanentError),
        (asyncpg.exceptions.ClientConfigurationError("bad sslmode"), PermanentError),
    ],
)
def test_classify(exc: BaseException, kind: type[Exception]) -> None:
    """Connection trouble, timeouts, overload, serialization failures and deadlocks are
    retried; schema, permission, data and login errors are not. Messages name the table."""
    error = classify(exc, "exam_results", 10.0)
    assert type(error) is kind
    assert "'exam_results'" in error.message


def test_classify_keeps_sqlstate_as_status() -> None:
    """A server error's SQLSTATE is the attempt's status, and its class name is in the message."""
    error = classify(asyncpg.UndefinedColumnError("column x does not exist"), "exam_results", 10.0)
    assert error.status == "42703"
    assert "UndefinedColumnError" in error.message


async def test_too_long_table_name_is_permanent(sample_body: bytes) -> None:
    """A table name whose ``_current`` view name would exceed 63 bytes fails every delivery
    permanently (and start() only logs it), instead of PostgreSQL truncating names."""
    name = "t" * (MAX_TABLE_NAME + 1)
    delivery = PostgresDelivery(PostgresIntegration(name="pg", dsn=DEFAULT_DSN, table=name))
    await delivery.start()
    with pytest.raises(PermanentError, match="too long"):
        await delivery.deliver(delivery_of(sample_body))
    await delivery.close()


async def test_unparseable_released_at_is_permanent(sample_body: bytes) -> None:
    """releasedAt is part of the primary key: when it is not ISO 8601 the row cannot be keyed,
    which is a permanent error naming the field (no connection is attempted)."""
    body = changed(sample_body, attempt__audit__releasedAt="last tuesday")
    delivery = PostgresDelivery(PostgresIntegration(name="pg", dsn=DEFAULT_DSN, table="exam_results"))
    with pytest.raises(PermanentError, match="releasedAt"):
        await delivery.deliver(delivery_of(body))
    assert delivery.pool is None


@pytest.mark.parametrize("dsn", ["postgresql://u:hunter2@127.0.0.1:abc/db", "postgresql://u:hunter2@[::1/db"])
async def test_unparseable_dsn_is_permanent(dsn: str, sample_body: bytes) -> None:
    """A DSN asyncpg cannot parse is a permanent error (retrying cannot fix it); start()
    only logs it, and the password is not in the message."""
    pg = PostgresDelivery(PostgresIntegration(name="pg", dsn=dsn))
    await pg.start()
    with pytest.raises(PermanentError, match="bad connection settings") as caught:
        await pg.deliver(delivery_of(sample_body))
    assert "hunter2" not in caught.value.message
    assert "hunter2" not in pg.where


async def test_password_never_in_errors_or_logs(sample_body: bytes, caplog: pytest.LogCaptureFixture) -> None:
    """The DSN's password appears neither in start()'s log nor in a delivery error, even if
    an underlying error message were to quote it."""
    port = await unused_port()
    pg = PostgresDelivery(
        PostgresIntegration(name="pg", dsn=f"postgresql://u:hunter2@127.0.0.1:{port}/db", timeout_seconds=2)
    )
    with caplog.at_level("INFO", logger="examhook.worker.postgres"):
        await pg.start()
    assert "u:***@127.0.0.1" in caplog.text
    assert "hunter2" not in caplog.text
    with pytest.raises(TransientError) as caught:
        await pg.deliver(delivery_of(sample_body))
    assert "hunter2" not in caught.value.message
    quoted = pg._error(OSError("could not connect with password hunter2"))
    assert isinstance(quoted, TransientError)
    assert quoted.message.endswith("password ***")


def test_docs_show_the_ddl_in_use() -> None:
    """docs/postgres.md shows exactly the DDL the integration runs for the default table."""
    docs = (Path(__file__).resolve().parent.parent / "docs" / "postgres.md").read_text()
    assert "```sql\n" + ddl() + "```" in docs


def test_dsn_must_be_postgres_url() -> None:
    """Settings reject a DSN that is not a postgresql:// URL, naming the key."""
    with pytest.raises(ConfigError, match=r"integrations\[0\]\.dsn"):
        settings_from_dict({"integrations": [{"type": "postgres", "name": "pg", "dsn": "mysql://x"}]})


# -- against the server ------------------------------------------------------------------


@pytest.mark.postgres
async def test_start_creates_table_indexes_and_view(
    table: str, admin: Any, make_delivery: Callable[..., PostgresDelivery]
) -> None:
    """start() creates the table (primary key attempt_id + released_at, unique event_id),
    the three lookup indexes and the ``<table>_current`` view; running it again is harmless."""
    await make_delivery(table).start()
    second = make_delivery(table)
    await second.start()
    assert second.schema_ready
    assert await admin.fetchval("SELECT to_regclass($1) IS NOT NULL", table)
    kind = await admin.fetchval("SELECT relkind::text FROM pg_class WHERE relname = $1", f"{table}_current")
    assert kind == "v"
    indexes = {
        r["indexname"]: r["indexdef"]
        for r in await admin.fetch("SELECT indexname, indexdef FROM pg_indexes WHERE tablename = $1", table)
    }
    assert "(exam_id, released_at)" in indexes[f"{table}_by_exam"]
    assert "(user_id)" in indexes[f"{table}_by_user"]
    assert "(user_email)" in indexes[f"{table}_by_mail"]
    assert any("UNIQUE" in d and "(attempt_id, released_at)" in d for d in indexes.values())
    assert any("UNIQUE" in d and "(event_id)" in d for d in indexes.values())


@pytest.mark.postgres
async def test_row_columns_for_sample(
    table: str, admin: Any, make_delivery: Callable[..., PostgresDelivery], sample_body: bytes
) -> None:
    """The sample becomes one row with every queried field in its own typed column, the
    times as timestamptz, and the whole body as jsonb; the status is ``inserted``."""
    pg = make_delivery(table)
    await pg.start()
    delivery = delivery_of(sample_body)
    assert await pg.deliver(delivery) == "inserted"
    rows = await admin.fetch(f'SELECT * FROM "{table}"')
    assert len(rows) == 1
    r = dict(rows[0])
    assert r.pop("received_at") == r.pop("updated_at")
    assert json.loads(r.pop("payload")) == json.loads(sample_body)
    assert r == {
        "attempt_id": "att_d23f0824128b2f330c5c",
        "released_at": datetime(2026, 11, 23, 9, 53, 11, 414000, tzinfo=UTC),
        "event_id": delivery.event_id,
        "event_name": "exam-results-released",
        "portal_id": "portal_acme",
        "user_id": "usr_9531985d5d9dc9f8",
        "user_email": "learner7@example.org",
        "user_name": "Ada Lovelace",
        "sub_portal_id": None,
        "exam_id": "exm_maths_2026",
        "exam_name": "Maths Final 2026",
        "test_id": "tst_maths_final",
        "test_title": "Maths Final 2026",
        "score": 62.5,
        "score_frac": 0.625,
        "grade_label": "Pass",
        "is_pass": True,
        "points": 25.0,
        "max_points": 40.0,
        "credits": 25.0,
        "penalties": 0.0,
        "started_at": datetime(2026, 11, 20, 9, 22, 6, tzinfo=UTC),
        "completed_at": datetime(2026, 11, 20, 9, 53, 11, 414000, tzinfo=UTC),
        "released_by": "usr_admin",
        "resit_count": 0,
    }


@pytest.mark.postgres
async def test_optional_and_unparseable_fields(
    table: str, admin: Any, make_delivery: Callable[..., PostgresDelivery], sample_body: bytes
) -> None:
    """subPortalId is stored when present; start/completion times that are not ISO 8601 are
    NULL rather than an error; a fractional resitCount is NULL."""
    body = changed(
        sample_body,
        user__subPortalId="sp_north",
        attempt__timeStarted="not a time",
        attempt__timeCompleted="",
        attempt__resitCount=1.5,
    )
    pg = make_delivery(table)
    assert await pg.deliver(delivery_of(body)) == "inserted"
    r = await admin.fetchrow(f'SELECT sub_portal_id, started_at, completed_at, resit_count FROM "{table}"')
    assert dict(r) == {
        "sub_portal_id": "sp_north",
        "started_at": None,
        "completed_at": None,
        "resit_count": None,
    }


@pytest.mark.postgres
async def test_redelivery_upserts(
    table: str, admin: Any, make_delivery: Callable[..., PostgresDelivery], sample_body: bytes
) -> None:
    """Delivering the same release again (a retry after a lost answer, two workers at once)
    updates the one row: ``inserted`` once, then ``updated``; received_at stays, updated_at moves."""
    pg = make_delivery(table)
    await pg.start()
    other_worker = make_delivery(table)
    await other_worker.start()
    first = await pg.deliver(delivery_of(sample_body))
    received = await admin.fetchval(f'SELECT received_at FROM "{table}"')
    again = await asyncio.gather(
        *(w.deliver(delivery_of(sample_body, attempt=2)) for w in (pg, other_worker, pg, other_worker))
    )
    assert first == "inserted"
    assert again == ["updated"] * 4
    r = await admin.fetchrow(
        f'SELECT count(*) AS n, min(received_at) AS rec, max(updated_at) AS upd FROM "{table}"'
    )
    assert r["n"] == 1
    assert r["rec"] == received
    assert r["upd"] > received


@pytest.mark.postgres
async def test_concurrent_first_deliveries_insert_once(
    table: str, admin: Any, make_delivery: Callable[..., PostgresDelivery], sample_body: bytes
) -> None:
    """Workers starting together all create/verify the schema without catalog races, and
    racing first deliveries of one release give one row and exactly one ``inserted``."""
    workers = [make_delivery(table) for _ in range(3)]
    await asyncio.gather(*(w.start() for w in workers))  # concurrent DDL is serialised
    assert all(w.schema_ready for w in workers)
    statuses = await asyncio.gather(*(w.deliver(delivery_of(sample_body)) for w in workers * 2))
    assert sorted(statuses) == ["inserted"] + ["updated"] * 5
    assert await admin.fetchval(f'SELECT count(*) FROM "{table}"') == 1


@pytest.mark.postgres
async def test_re_release_adds_a_row_and_current_view_shows_newest(
    table: str, admin: Any, make_delivery: Callable[..., PostgresDelivery], sample_body: bytes
) -> None:
    """A re-release (same attempt id, later releasedAt) is a second row; ``<table>_current``
    shows only the newer one, even when the older release is delivered last."""
    pg = make_delivery(table)
    await pg.start()
    newer = re_release(sample_body)
    assert await pg.deliver(delivery_of(sample_body)) == "inserted"
    assert await pg.deliver(delivery_of(newer)) == "inserted"
    # a late redelivery of the old release
    assert await pg.deliver(delivery_of(sample_body, attempt=2)) == "updated"
    history = await admin.fetch(f'SELECT released_at, score FROM "{table}" ORDER BY released_at')
    assert [(r["released_at"].isoformat(), r["score"]) for r in history] == [
        ("2026-11-23T09:53:11.414000+00:00", 62.5),
        ("2026-11-30T10:00:00+00:00", 77.5),
    ]
    current = await admin.fetch(f'SELECT attempt_id, score, grade_label, event_id FROM "{table}_current"')
    assert [dict(r) for r in current] == [
        {
            "attempt_id": "att_d23f0824128b2f330c5c",
            "score": 77.5,
            "grade_label": "Merit",
            "event_id": delivery_of(newer).event_id,
        }
    ]


@pytest.mark.postgres
async def test_incompatible_existing_table_is_permanent(
    table: str, admin: Any, make_delivery: Callable[..., PostgresDelivery], sample_body: bytes
) -> None:
    """A table that already exists with another schema: start() logs and does not raise;
    each delivery fails permanently with the table's name and the SQLSTATE."""
    await admin.execute(f'CREATE TABLE "{table}" (attempt_id text, note text)')
    pg = make_delivery(table)
    await pg.start()  # must not raise: the worker keeps running for other integrations
    assert not pg.schema_ready
    with pytest.raises(PermanentError) as caught:
        await pg.deliver(delivery_of(sample_body))
    assert repr(table) in caught.value.message
    assert caught.value.status == "42703"  # undefined column
    assert await admin.fetchval(f'SELECT count(*) FROM "{table}"') == 0


@pytest.mark.postgres
async def test_role_without_privileges_is_permanent(
    table: str,
    admin: Any,
    role: tuple[str, str],
    make_delivery: Callable[..., PostgresDelivery],
    sample_body: bytes,
) -> None:
    """A role that may not create the table (no CREATE on schema public) fails permanently
    with InsufficientPrivilegeError naming the table; its password never appears."""
    name, dsn = role
    if await admin.fetchval("SELECT has_schema_privilege($1, 'public', 'CREATE')", name):
        pytest.skip("every role may create tables in schema public here (PostgreSQL < 15 defaults)")
    password = urlsplit(dsn).password
    assert password
    pg = make_delivery(table, dsn=dsn)
    await pg.start()
    with pytest.raises(PermanentError) as caught:
        await pg.deliver(delivery_of(sample_body))
    assert caught.value.status == "42501"
    assert "InsufficientPrivilegeError" in caught.value.message
    assert repr(table) in caught.value.message
    assert password not in caught.value.message
    assert password not in pg.where


@pytest.mark.postgres
async def test_role_without_insert_on_existing_table_is_permanent(
    table: str,
    admin: Any,
    role: tuple[str, str],
    make_delivery: Callable[..., PostgresDelivery],
    sample_body: bytes,
) -> None:
    """When an administrator created the table but granted nothing, the INSERT's permission
    error is permanent and names the table."""
    _, dsn = role
    await admin.execute(ddl(table))
    pg = make_delivery(table, dsn=dsn)
    with pytest.raises(PermanentError, match=f"'{table}'.*InsufficientPrivilegeError"):
        await pg.deliver(delivery_of(sample_body))


@pytest.mark.postgres
async def test_least_privilege_role_delivers_into_existing_table(
    table: str,
    admin: Any,
    role: tuple[str, str],
    make_delivery: Callable[..., PostgresDelivery],
    sample_body: bytes,
) -> None:
    """A role with only SELECT/INSERT/UPDATE on a table an administrator created from the
    documented DDL can deliver: the failed DDL is tolerated when table and view exist."""
    name, dsn = role
    await admin.execute(ddl(table))
    await admin.execute(f'GRANT SELECT, INSERT, UPDATE ON "{table}" TO {name}')
    pg = make_delivery(table, dsn=dsn)
    await pg.start()
    assert pg.schema_ready
    assert await pg.deliver(delivery_of(sample_body)) == "inserted"
    assert await pg.deliver(delivery_of(sample_body)) == "updated"


@pytest.mark.postgres
async def test_unreachable_database_is_transient_then_connects_lazily(
    table: str,
    admin: Any,
    pg_dsn: str,
    make_delivery: Callable[..., PostgresDelivery],
    sample_body: bytes,
) -> None:
    """A database nothing answers for: start() does not raise, deliveries fail with
    TransientError; once the server is reachable, the next delivery creates the pool and
    the table and inserts."""
    port = await unused_port()
    parts = urlsplit(pg_dsn)
    pg = make_delivery(table, dsn=with_address(pg_dsn, "127.0.0.1", port), timeout_seconds=5)
    await pg.start()
    assert pg.pool is None
    with pytest.raises(TransientError, match=repr(table)):
        await pg.deliver(delivery_of(sample_body))

    # now something answers on that port: a TCP relay to the real server
    async def relay(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        up_reader, up_writer = await asyncio.open_connection(parts.hostname, parts.port or 5432)

        async def pipe(src: asyncio.StreamReader, dst: asyncio.StreamWriter) -> None:
            with contextlib.suppress(OSError):
                while data := await src.read(65536):
                    dst.write(data)
                    await dst.drain()
            dst.close()

        await asyncio.gather(pipe(reader, up_writer), pipe(up_reader, writer))

    server = await asyncio.start_server(relay, "127.0.0.1", port)
    try:
        assert await pg.deliver(delivery_of(sample_body)) == "inserted"
        assert await admin.fetchval(f'SELECT count(*) FROM "{table}"') == 1
        await pg.close()
    finally:
        server.close()
        await server.wait_closed()


@pytest.mark.postgres
async def test_server_that_never_answers_times_out_transiently(
    table: str, make_delivery: Callable[..., PostgresDelivery], sample_body: bytes
) -> None:
    """A server that accepts the connection but never answers: the delivery gives up after
    ``timeout_seconds`` with a TransientError."""
    hung = asyncio.Event()

    async def silent(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        hung.set()
        await reader.read()  # until the client gives up
        writer.close()

    server = await asyncio.start_server(silent, "127.0.0.1", 0)
    port = int(server.sockets[0].getsockname()[1])
    try:
        pg = make_delivery(table, dsn=with_address(DEFAULT_DSN, "127.0.0.1", port), timeout_seconds=0.3)
        with pytest.raises(TransientError, match=r"timed out after 0\.3s"):
            await pg.deliver(delivery_of(sample_body))
        assert hung.is_set()
    finally:
        server.close()
        await server.wait_closed()


async def _equals(value: Awaitable[int], expected: int) -> bool:
    return await value == expected


@pytest.mark.postgres
async def test_end_to_end_through_receiver_and_worker(
    table: str,
    admin: Any,
    pg_dsn: str,
    make_settings: Callable[..., Settings],
    start_worker: Callable[..., Any],
    aiohttp_client: Any,
    sample_body: bytes,
) -> None:
    """Bodies POSTed to the receiver reach the table through the real worker: the first
    release, a duplicate POST (no second row) and a re-release (second row, current view
    shows it)."""
    settings = make_settings([{"type": "postgres", "name": "db", "dsn": pg_dsn, "table": table}])
    client = await aiohttp_client(create_app(settings))
    await start_worker(settings)
    headers = {**AUTH, "Content-Type": "application/json"}

    async def rows() -> int:
        return int(await admin.fetchval(f'SELECT count(*) FROM "{table}"'))

    response = await client.post(WEBHOOK_PATH, data=sample_body, headers=headers)
    assert response.status == 202
    # the worker creates the table when it starts
    assert await eventually(lambda: admin.fetchval("SELECT to_regclass($1) IS NOT NULL", table))
    await eventually(lambda: _equals(rows(), 1))

    duplicate = await client.post(WEBHOOK_PATH, data=sample_body, headers=headers)
    assert duplicate.status == 200

    newer = re_release(sample_body)
    response = await client.post(WEBHOOK_PATH, data=newer, headers=headers)
    assert response.status == 202
    await eventually(lambda: _equals(rows(), 2))
    current = await admin.fetchrow(f'SELECT score, released_at, payload FROM "{table}_current"')
    assert current["score"] == 77.5
    assert current["released_at"] == datetime(2026, 11, 30, 10, 0, tzinfo=UTC)
    assert msgspec.json.decode(current["payload"]) == json.loads(newer)
