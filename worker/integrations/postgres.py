"""``postgres``: one row per (attempt, release) in a table, upserted through asyncpg.

- The table, its indexes and the ``<table>_current`` view are created at start if
  missing (:func:`ddl`, also shown in ``docs/postgres.md``). A role that may not run
  DDL can still deliver into objects an administrator created beforehand.
- The primary key is ``(attempt_id, released_at)``: a redelivery of the same release
  updates its row (status ``"updated"``), a re-release of the attempt adds a row.
  ``<table>_current`` shows each attempt's newest release.
- One pool per worker process. If the database cannot be reached at start, the worker
  still starts; the pool is created on the first delivery instead.
- Errors: connection problems, timeouts, overload, serialization failures and deadlocks
  are :class:`TransientError`; schema, permission and data errors are
  :class:`PermanentError` naming the table.
"""

from __future__ import annotations

import asyncio
import logging
from typing import Any
from urllib.parse import urlsplit

import asyncpg

from shared.payload import ExamResultsReleased, parse_time
from shared.settings import PostgresIntegration, mask_url
from worker.integrations.base import Delivery, Integration, PermanentError, TransientError

log = logging.getLogger("examhook.worker.postgres")

# PostgreSQL truncates identifiers longer than 63 bytes; the longest suffix this module
# appends to the table name (``_current``, ``_by_exam``...) is 8 characters.
MAX_IDENTIFIER = 63
SUFFIX_LENGTH = 8
MAX_TABLE_NAME = MAX_IDENTIFIER - SUFFIX_LENGTH

# The columns written on every delivery, in the order of the INSERT's parameters.
COLUMNS: tuple[str, ...] = (
    "attempt_id",
    "released_at",
    "event_id",
    "event_name",
    "portal_id",
    "user_id",
    "user_email",
    "user_name",
    "sub_portal_id",
    "exam_id",
    "exam_name",
    "test_id",
    "test_title",
    "score",
    "score_frac",
    "grade_label",
    "is_pass",
    "points",
    "max_points",
    "credits",
    "penalties",
    "started_at",
    "completed_at",
    "released_by",
    "resit_count",
    "payload",
)

# SQLSTATE classes (first two characters) worth retrying; every other server error is
# permanent (schema ``42``, data ``22``, integrity ``23``, authorization ``28``, ...).
TRANSIENT_CLASSES = frozenset(
    {
        "08",  # connection exception
        "25",  # invalid transaction state (e.g. read-only standby during a failover)
        "40",  # transaction rollback: serialization failure, deadlock
        "53",  # insufficient resources: too many connections, disk full, out of memory
        "57",  # operator intervention: cannot connect now, shutdown, query cancelled
        "58",  # system error (I/O)
        "XX",  # internal error
    }
)
TRANSIENT_STATES = frozenset({"55006", "55P03"})  # object in use, lock not available


def _quote(identifier: str) -> str:
    return '"' + identifier.replace('"', '""') + '"'


def ddl(table: str = "exam_results") -> str:
    """The SQL that creates ``table``, its indexes and its ``<table>_current`` view.

    Every statement is idempotent; run at every worker start (in one transaction).
    """
    t = _quote(table)
    return f"""\
CREATE TABLE IF NOT EXISTS {t} (
    attempt_id     text             NOT NULL,
    released_at    timestamptz      NOT NULL,
    event_id       text             NOT NULL UNIQUE,
    event_name     text             NOT NULL,
    portal_id      text             NOT NULL,
    user_id        text             NOT NULL,
    user_email     text             NOT NULL,
    user_name      text             NOT NULL,
    sub_portal_id  text,
    exam_id        text             NOT NULL,
    exam_name      text             NOT NULL,
    test_id        text             NOT NULL,
    test_title     text             NOT NULL,
    score          double precision NOT NULL,
    score_frac     double precision NOT NULL,
    grade_label    text             NOT NULL,
    is_pass        boolean          NOT NULL,
    points         double precision NOT NULL,
    max_points     double precision NOT NULL,
    credits        double precision NOT NULL,
    penalties      double precision NOT NULL,
    started_at     timestamptz,
    completed_at   timestamptz,
    released_by    text             NOT NULL,
    resit_count    integer,
    payload        jsonb            NOT NULL,
    received_at    timestamptz      NOT NULL DEFAULT now(),
    updated_at     timestamptz      NOT NULL DEFAULT now(),
    PRIMARY KEY (attempt_id, released_at)
);
CREATE INDEX IF NOT EXISTS {_quote(table + "_by_exam")} ON {t} (exam_id, released_at);
CREATE INDEX IF NOT EXISTS {_quote(table + "_by_user")} ON {t} (user_id);
CREATE INDEX IF NOT EXISTS {_quote(table + "_by_mail")} ON {t} (user_email);
CREATE OR REPLACE VIEW {_quote(table + "_current")} AS
    SELECT DISTINCT ON (attempt_id) *
    FROM {t}
    ORDER BY attempt_id, released_at DESC;
"""


def upsert_sql(table: str = "exam_results") -> str:
    """INSERT one release, or update it when it is already there.

    ``RETURNING (xmax = 0)`` is true for a freshly inserted row, false for an update.
    ``received_at`` keeps the time of the first write; ``updated_at`` is the last.
    """
    names = ", ".join(COLUMNS)
    values = ", ".join(
        f"${i}::jsonb" if name == "payload" else f"${i}" for i, name in enumerate(COLUMNS, start=1)
    )
    keys = ("attempt_id", "released_at")
    updates = ", ".join(f"{name} = EXCLUDED.{name}" for name in COLUMNS if name not in keys)
    return (
        f"INSERT INTO {_quote(table)} ({names}) VALUES ({values})\n"
        f"ON CONFLICT (attempt_id, released_at) DO UPDATE SET {updates}, updated_at = now()\n"
        "RETURNING (xmax = 0) AS inserted"
    )


def safe_mask(dsn: str) -> str:
    """The DSN with its password hidden; a DSN that does not even parse is not shown at all."""
    try:
        return mask_url(dsn)
    except ValueError:
        return "(unparseable dsn)"


def _password(dsn: str) -> str | None:
    try:
        return urlsplit(dsn).password
    except ValueError:
        return None


def _whole(value: float) -> int | None:
    return int(value) if value.is_integer() and abs(value) < 2**31 else None


def row(event: ExamResultsReleased, event_id: str, body: bytes, table: str) -> tuple[Any, ...]:
    """The INSERT's parameters for one event, in :data:`COLUMNS` order."""
    attempt = event.attempt
    released_at = parse_time(attempt.audit.released_at)
    if released_at is None:
        raise PermanentError(
            f"postgres table {table!r}: attempt.audit.releasedAt {attempt.audit.released_at!r} "
            "is not an ISO 8601 timestamp; it is part of the primary key, so the row cannot be written"
        )
    try:
        payload = body.decode("utf-8")
    except UnicodeDecodeError:
        raise PermanentError(f"postgres table {table!r}: the body is not UTF-8") from None
    return (
        attempt.id,
        released_at,
        event_id,
        event.meta.event_name,
        event.portal.id,
        event.user.id,
        event.user.email,
        event.user.name,
        event.user.sub_portal_id,
        event.exam.id,
        event.exam.name,
        event.test.id,
        event.test.title,
        attempt.score,
        attempt.score_frac,
        attempt.grade.label,
        attempt.grade.is_pass,
        attempt.marks.points,
        attempt.marks.max_points,
        attempt.marks.credits,
        attempt.marks.penalties,
        parse_time(attempt.time_started),
        parse_time(attempt.time_completed),
        attempt.audit.released_by,
        _whole(attempt.resit_count),
        payload,
    )


def classify(exc: BaseException, table: str, timeout: float) -> TransientError | PermanentError:
    """The delivery error for anything asyncpg (or the network under it) raised."""
    where = f"postgres table {table!r}"
    if isinstance(exc, PermanentError | TransientError):
        return exc
    if isinstance(exc, TimeoutError):
        return TransientError(f"{where}: timed out after {timeout:g}s")
    if isinstance(exc, asyncpg.PostgresError):
        state = str(getattr(exc, "sqlstate", "") or "")
        message = f"{where}: {exc.__class__.__name__} ({state}): {exc}"
        detail = getattr(exc, "detail", None)
        if detail:
            message += f" ({detail})"
        if state[:2] in TRANSIENT_CLASSES or state in TRANSIENT_STATES:
            return TransientError(message, status=state or None)
        return PermanentError(message, status=state or None)
    if isinstance(exc, asyncpg.exceptions.ClientConfigurationError):
        return PermanentError(f"{where}: bad connection settings: {exc}")
    if isinstance(exc, OSError | asyncpg.InterfaceError | asyncpg.exceptions.InternalClientError):
        # refused, reset, DNS, TLS, "connection was closed in the middle of operation"...
        return TransientError(f"{where}: {exc.__class__.__name__}: {exc}")
    return TransientError(f"{where}: {exc.__class__.__name__}: {exc}")


class PostgresDelivery(Integration[PostgresIntegration]):
    def __init__(self, config: PostgresIntegration) -> None:
        super().__init__(config)
        self.table = config.table
        self.view = config.table + "_current"
        self.timeout = config.timeout_seconds
        self.pool: Any = None  # asyncpg.Pool once connected
        self.schema_ready = False
        self._lock = asyncio.Lock()
        self._upsert = upsert_sql(config.table)
        self._problem: str | None = None
        if len(config.table.encode()) > MAX_TABLE_NAME:
            self._problem = (
                f"postgres table {config.table!r}: name too long (at most {MAX_TABLE_NAME} characters, "
                f"so that {self.view!r} and the index names fit PostgreSQL's {MAX_IDENTIFIER})"
            )

    @property
    def where(self) -> str:
        return f"{safe_mask(self.config.dsn)} table {self.table!r}"

    async def start(self) -> None:
        """Connect and create the table; on failure log it and try again at the first delivery."""
        if self._problem:
            log.error(self._problem, extra={"integration": self.name})
            return
        try:
            async with asyncio.timeout(self.timeout):
                await self._ready()
        except Exception as exc:
            error = self._error(exc)
            log.error(
                "postgres %s not ready at start (will try again on delivery): %s",
                safe_mask(self.config.dsn),
                error.message,
                extra={"integration": self.name},
            )
        else:
            log.info("postgres ready: %s", self.where, extra={"integration": self.name})

    async def close(self) -> None:
        pool, self.pool = self.pool, None
        if pool is None:
            return
        try:
            async with asyncio.timeout(self.timeout):
                await pool.close()
        except (TimeoutError, OSError, asyncpg.PostgresError, asyncpg.InterfaceError):
            pool.terminate()

    async def deliver(self, delivery: Delivery) -> str:
        if self._problem:
            raise PermanentError(self._problem)
        args = row(delivery.event, delivery.event_id, delivery.body, self.table)
        try:
            async with asyncio.timeout(self.timeout):
                pool = await self._ready()
                async with pool.acquire() as connection:
                    try:
                        inserted = await connection.fetchval(self._upsert, *args)
                    except asyncpg.UniqueViolationError:
                        # Two workers inserting the same release at once: ON CONFLICT arbitrates
                        # on the primary key only, so the loser can trip the event_id unique
                        # index instead. The winner has committed by now: upsert again.
                        inserted = await connection.fetchval(self._upsert, *args)
        except Exception as exc:
            raise self._error(exc) from None
        return "inserted" if inserted else "updated"

    def _error(self, exc: BaseException) -> TransientError | PermanentError:
        """:func:`classify`, with the DSN's password blanked should any message quote it."""
        error = classify(exc, self.table, self.timeout)
        password = _password(self.config.dsn)
        if password and password in error.message:
            message = error.message.replace(password, "***")
            if isinstance(error, TransientError):
                return TransientError(message, status=error.status, retry_after=error.retry_after)
            return PermanentError(message, status=error.status)
        return error

    async def _ready(self) -> Any:
        """The pool, created (and the schema ensured) if not done yet."""
        if self.pool is not None and self.schema_ready:
            return self.pool
        async with self._lock:
            if self.pool is None:
                try:
                    self.pool = await asyncpg.create_pool(
                        self.config.dsn,
                        min_size=1,
                        max_size=self.config.pool_max_size,
                        timeout=self.timeout,  # connection establishment
                        server_settings={"application_name": "examhook"},
                    )
                except ValueError as exc:  # the DSN does not parse (ClientConfigurationError is one too)
                    raise PermanentError(
                        f"postgres table {self.table!r}: bad connection settings in dsn: {exc}"
                    ) from None
            if not self.schema_ready:
                async with self.pool.acquire() as connection:
                    await self._ensure_schema(connection)
                self.schema_ready = True
        return self.pool

    async def _ensure_schema(self, connection: Any) -> None:
        try:
            async with connection.transaction():
                # several workers starting together must not race on the catalog
                await connection.execute(
                    "SELECT pg_advisory_xact_lock(hashtext($1))", f"examhook:{self.table}"
                )
                await connection.execute(ddl(self.table))
        except asyncpg.InsufficientPrivilegeError:
            # A role without DDL rights may still write into objects made for it.
            exists = await connection.fetchval(
                "SELECT to_regclass(quote_ident($1)) IS NOT NULL"
                " AND to_regclass(quote_ident($2)) IS NOT NULL",
                self.table,
                self.view,
            )
            if not exists:
                raise
            log.warning(
                "postgres %s: no privilege to run the DDL; using the existing table and view",
                self.where,
                extra={"integration": self.name},
            )
