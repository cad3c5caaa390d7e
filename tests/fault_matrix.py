"""The fault matrix: every integration type under every fault we can name. Lost or repeated?

Shared by ``tests/test_fault_matrix.py`` (one short run per fault in the suite) and
``scripts/fault_matrix.py`` (longer runs by hand). One run is one fault, with all four
integration types configured at once, so each fault meets each type:

* ``lms`` (http) to a recording HTTP destination in this process;
* ``mail`` (email) to a real aiosmtpd server in this process (it stores a message once its
  content is in, then answers, as an MTA does), ``pool_size = 3``;
* ``db`` (postgres) to the suite's PostgreSQL, a table of the run's own (left out, and said so,
  when no PostgreSQL answers);
* ``file`` (file) to a file of the run's own;

and a Valkey with append-only persistence, one ``examhook receive`` and ``examhook worker``
processes, all real; a sender posts the events over a few seconds and retries every non-2xx
answer, as Synap may. The fault lands in the middle of that burst. Then, once everything
settled, for every event that got a 2xx:

* http: its Idempotency-Key reached the destination; a second request with the same key only
  where the first one's outcome was truly unknown (it hung past the timeout, or a worker died
  or Redis went away while it was in flight);
* email: exactly one message stored by the SMTP server; none only where examhook reports the
  pair failed with an unknown outcome (``on_unknown_outcome = "fail"``, the default);
* postgres: exactly one row; file: exactly one line;
* examhook: every pair delivered (or, for email, failed as unknown outcome), the queue empty,
  no other failure, no process ended by itself.
"""

from __future__ import annotations

import asyncio
import contextlib
import email
import email.policy
import os
import random
import secrets
import signal
import tempfile
import threading
import time
from collections import Counter
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from aiohttp import web
from aiosmtpd.controller import Controller
from redis.asyncio import Redis

from shared.contract import Keys, pair_member
from tests.chaos_harness import PASSWORD, PREFIX, USER, ChaosOptions, Cluster, Sender
from tests.conftest import eventually

DEFAULT_PG_DSN = "postgresql://postgres@127.0.0.1:5432/test"
HTTP_TIMEOUT = 1.0
SMTP_TIMEOUT = 1.5
PG_TIMEOUT = 2.0
FILE_TIMEOUT = 1.0
JOB_TIMEOUT = 5.0  # a killed worker's jobs run again after this + 10 s (arq's lease)
INTEGRATIONS = ("lms", "mail", "db", "file")


@dataclass
class Scenario:
    """One fault, and how the destinations behave around it."""

    fault: str
    events: int = 60
    duration: float = 4.0  # the burst is spread over this long
    workers: int = 2
    seed: int = 1
    http_delay: float = 0.05
    http_fail_rate: float = 0.0  # answered 503
    http_hang_rate: float = 0.0  # answered after the worker's timeout
    smtp_delay: float = 0.05
    smtp_fail_rate: float = 0.0  # 451 at the end of DATA: not stored
    smtp_hang_rate: float = 0.0  # stored, answered after the worker's timeout
    settle_timeout: float = 60.0
    workdir: Path | None = None


SCENARIOS: dict[str, Scenario] = {
    s.fault: s
    for s in [
        Scenario("worker-sigkill", workers=1, http_delay=0.3, smtp_delay=0.3),
        Scenario("worker-sigterm", workers=1, http_delay=0.3, smtp_delay=0.3),
        Scenario("redis-sigkill", http_delay=0.2, smtp_delay=0.2),
        Scenario("redis-full", http_delay=0.1, smtp_delay=0.1),
        Scenario("redis-refuses-writes", http_delay=0.1, smtp_delay=0.1),
        Scenario("ingest-script-error"),
        Scenario("slow-destinations", http_delay=0.6, smtp_delay=0.6),
        Scenario(
            "destination-faults",
            http_fail_rate=0.1,
            http_hang_rate=0.05,
            smtp_fail_rate=0.1,
            smtp_hang_rate=0.05,
        ),
    ]
}


# --------------------------------------------------------------------------- destinations


@dataclass
class HttpRequest:
    key: str
    arrived: float
    answer: str  # ok | 5xx | hang
    done: bool = False


class HttpSink:
    """Records every request; answers after ``http_delay``, or 503, or after the timeout."""

    def __init__(self, scenario: Scenario) -> None:
        self.scenario = scenario
        self.rng = random.Random(scenario.seed)
        self.requests: list[HttpRequest] = []
        self.closing = asyncio.Event()
        self.url = ""
        self._runner: web.AppRunner | None = None

    def in_flight(self) -> bool:
        return any(not r.done and r.answer != "5xx" for r in self.requests)

    async def start(self) -> None:
        app = web.Application()
        app.router.add_post("/hook", self._handle)
        self._runner = web.AppRunner(app, access_log=None)
        await self._runner.setup()
        site = web.TCPSite(self._runner, "127.0.0.1", 0)
        await site.start()
        self.url = f"http://127.0.0.1:{site._server.sockets[0].getsockname()[1]}/hook"  # type: ignore[union-attr]

    async def stop(self) -> None:
        self.closing.set()
        if self._runner is not None:
            await self._runner.cleanup()

    async def _handle(self, request: web.Request) -> web.Response:
        await request.read()
        s = self.scenario
        roll = self.rng.random()
        answer = (
            "hang"
            if roll < s.http_hang_rate
            else "5xx"
            if roll < s.http_hang_rate + s.http_fail_rate
            else "ok"
        )
        record = HttpRequest(request.headers.get("Idempotency-Key", ""), time.monotonic(), answer)
        self.requests.append(record)
        wait = HTTP_TIMEOUT + 1.0 if answer == "hang" else s.http_delay
        try:
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self.closing.wait(), wait)
        finally:
            record.done = True
        return web.Response(status=503 if answer == "5xx" else 200)


@dataclass
class StoredMail:
    event_id: str
    reply: str


class SmtpSink:
    """An aiosmtpd server that stores each message once its content is in (unless it answers
    451), then answers after ``smtp_delay``, or after the worker's timeout."""

    def __init__(self, scenario: Scenario) -> None:
        self.scenario = scenario
        self.rng = random.Random(scenario.seed + 1)
        self.mails: list[StoredMail] = []
        self.sending = 0  # DATA conversations in progress
        self._lock = threading.Lock()
        self.controller: Controller | None = None
        self.port = 0

    def start(self, port: int) -> None:
        self.port = port
        self.controller = Controller(self, hostname="127.0.0.1", port=port)
        self.controller.start()

    def stop(self) -> None:
        if self.controller is not None:
            self.controller.stop()

    def in_flight(self) -> bool:
        return self.sending > 0

    async def handle_DATA(self, server: Any, session: Any, envelope: Any) -> str:
        s = self.scenario
        with self._lock:
            roll = self.rng.random()
            self.sending += 1
        try:
            if roll < s.smtp_fail_rate:
                return "451 4.3.0 try again later"
            message = email.message_from_bytes(
                envelope.original_content or envelope.content, policy=email.policy.default
            )
            with self._lock:
                self.mails.append(StoredMail(str(message["X-Examhook-Event-Id"]), "250"))
            wait = SMTP_TIMEOUT + 1.0 if roll < s.smtp_fail_rate + s.smtp_hang_rate else s.smtp_delay
            await asyncio.sleep(wait)
            return "250 2.0.0 queued"
        finally:
            with self._lock:
                self.sending -= 1


# --------------------------------------------------------------------------- the cluster


class MatrixCluster(Cluster):
    """The chaos harness's processes, configured with the four integrations."""

    def __init__(
        self, scenario: Scenario, workdir: Path, http_url: str, smtp_port: int, pg: PgTable | None
    ) -> None:
        options = ChaosOptions(job_timeout_seconds=JOB_TIMEOUT, timeout_seconds=HTTP_TIMEOUT)
        super().__init__(options, workdir, http_url)
        self.scenario = scenario
        self.smtp_port = smtp_port
        self.pg = pg
        self.file = workdir / "deliveries.jsonl"

    def write_config(self) -> None:
        fast = "backoff_base_seconds = 0.05\nbackoff_max_seconds = 0.3\nmax_attempts = 100\n"
        pg = (
            f'[[integrations]]\nname = "db"\ntype = "postgres"\ndsn = "{self.pg.dsn}"\n'
            f'table = "{self.pg.table}"\ntimeout_seconds = {PG_TIMEOUT}\n{fast}'
            if self.pg is not None
            else ""
        )
        self.config.write_text(
            f'[redis]\nurl = "{self.redis_url}"\nprefix = "{PREFIX}"\n'
            f'[receiver]\nbasic_auth_user = "{USER}"\nbasic_auth_password = "{PASSWORD}"\n'
            f"[worker]\njob_timeout_seconds = {JOB_TIMEOUT}\nhealth_check_interval_seconds = 1\n"
            "shutdown_grace_seconds = 3\nconcurrency = 20\n"
            f'[[integrations]]\nname = "lms"\ntype = "http"\nurl = "{self.destination_url}"\n'
            f"timeout_seconds = {HTTP_TIMEOUT}\n{fast}"
            f'[[integrations]]\nname = "mail"\ntype = "email"\nsmtp_host = "127.0.0.1"\n'
            f'smtp_port = {self.smtp_port}\ntls = "none"\nfrom = "Results <results@acme.example.org>"\n'
            f"pool_size = 3\ntimeout_seconds = {SMTP_TIMEOUT}\n{fast}"
            f"{pg}"
            f'[[integrations]]\nname = "file"\ntype = "file"\npath = "{self.file}"\n'
            f"timeout_seconds = {FILE_TIMEOUT}\n{fast}"
        )

    async def signal_worker(self, name: str, signum: int) -> int:
        process = self.workers.pop(name)  # stopped on purpose: not a crash
        process.send_signal(signum)
        code = await asyncio.to_thread(process.wait, 30)
        self.note(f"{name} {signal.Signals(signum).name}ed (exit {code})")
        return code


@dataclass
class PgTable:
    dsn: str
    table: str

    async def rows(self) -> Counter[str]:
        import asyncpg

        connection = await asyncpg.connect(self.dsn)
        try:
            records = await connection.fetch(f'SELECT event_id FROM "{self.table}"')
        except asyncpg.UndefinedTableError:  # no worker ever got to start the integration
            return Counter()
        finally:
            await connection.close()
        return Counter(r["event_id"] for r in records)

    async def rewritten(self) -> int:
        import asyncpg

        connection = await asyncpg.connect(self.dsn)
        try:
            return int(
                await connection.fetchval(
                    f'SELECT count(*) FROM "{self.table}" WHERE updated_at > received_at'
                )
            )
        finally:
            await connection.close()

    async def execute(self, sql: str) -> None:
        import asyncpg

        connection = await asyncpg.connect(self.dsn)
        try:
            await connection.execute(sql)
        finally:
            await connection.close()

    async def drop(self) -> None:
        for suffix in ("_current",):
            await self.execute(f'DROP VIEW IF EXISTS "{self.table}{suffix}"')
        await self.execute(f'DROP TABLE IF EXISTS "{self.table}"')


async def postgres_table(fault: str) -> PgTable | None:
    """A table of the run's own on the suite's PostgreSQL, or None when none answers."""
    import asyncpg

    dsn = os.environ.get("EXAMHOOK_TEST_POSTGRES_DSN", DEFAULT_PG_DSN)
    try:
        connection = await asyncio.wait_for(asyncpg.connect(dsn), 5)
    except (OSError, asyncpg.PostgresError, TimeoutError):
        return None
    await connection.close()
    return PgTable(dsn, f"fm_{fault.replace('-', '_')}_{secrets.token_hex(3)}")


# --------------------------------------------------------------------------- the faults


@dataclass
class Run:
    scenario: Scenario
    cluster: MatrixCluster
    sender: Sender
    http: HttpSink
    smtp: SmtpSink
    pg: PgTable | None
    admin: Redis


async def _mid_send(run: Run, timeout: float = 10.0) -> None:
    """Wait until an http request and an email are both in flight (or one of them, if the
    other does not come), so that a fault lands mid-send."""

    async def both() -> bool:
        return run.http.in_flight() and run.smtp.in_flight()

    async def either() -> bool:
        return run.http.in_flight() or run.smtp.in_flight()

    try:
        await eventually(both, timeout=timeout, interval=0.01)
    except AssertionError:
        with contextlib.suppress(AssertionError):
            await eventually(either, timeout=timeout, interval=0.01)


async def _worker_sigkill(run: Run) -> None:
    await run.sender.wait_accepted(0.4)
    await _mid_send(run)
    await run.cluster.signal_worker("worker-1", signal.SIGKILL)
    run.cluster.start_worker("worker-1b")


async def _worker_sigterm(run: Run) -> None:
    await run.sender.wait_accepted(0.4)
    await _mid_send(run)
    code = await run.cluster.signal_worker("worker-1", signal.SIGTERM)
    if code != 0:
        run.cluster.note(f"PROBLEM worker-1 exited {code} on SIGTERM")
    run.cluster.start_worker("worker-1b")


async def _redis_sigkill(run: Run) -> None:
    await run.sender.wait_accepted(0.4)
    await _mid_send(run)
    await run.cluster.kill_redis()
    await asyncio.sleep(1.0)  # the outage itself: a duration, not a wait
    await run.cluster.start_redis()


async def _redis_full(run: Run) -> None:
    await run.sender.wait_accepted(0.3)
    used = int((await run.admin.info("memory"))["used_memory"])
    await run.admin.config_set("maxmemory", used)  # every new write refused from now on
    run.cluster.note("redis full")
    await asyncio.sleep(2.0)
    await run.admin.config_set("maxmemory", 0)
    run.cluster.note("redis freed")


async def _redis_refuses_writes(run: Run) -> None:
    await run.sender.wait_accepted(0.3)
    await _mid_send(run)
    await run.admin.config_set("min-replicas-to-write", 1)  # every write refused, records too
    run.cluster.note("redis refuses writes")
    await asyncio.sleep(2.0)
    await run.admin.config_set("min-replicas-to-write", 0)
    run.cluster.note("redis takes writes again")


async def _ingest_script_error(run: Run) -> None:
    """A quarter of the events meet a key of the wrong type half-way through the ingest script
    (the receiver answers 503); once it is gone, the sender's retries are accepted."""
    import json as _json

    keys = Keys(PREFIX)
    blocked = [keys.releases(_json.loads(b)["attempt"]["id"]) for b in run.sender.bodies[::4]]
    for key in blocked:
        await run.admin.hset(key, "in", "the way")
    run.cluster.note(f"{len(blocked)} ingest scripts will fail part-way")

    async def refused() -> bool:  # a failing script fails its whole group commit: many 503s
        return run.sender.statuses.get("503", 0) >= 20

    await eventually(refused, timeout=30, interval=0.05)
    await run.admin.delete(*blocked)
    run.cluster.note("obstacles removed")


async def _slow_destinations(run: Run) -> None:
    """Besides the slow http and SMTP servers: the table locked for a while (postgres waits),
    and the file locked for a while (the file integration waits for its lock)."""
    import fcntl

    await run.sender.wait_accepted(0.3)
    tasks = []
    if run.pg is not None:
        pg = run.pg

        async def lock_table() -> None:
            import asyncpg

            connection = await asyncpg.connect(pg.dsn)
            try:
                async with connection.transaction():
                    await connection.execute(f'LOCK TABLE "{pg.table}" IN ACCESS EXCLUSIVE MODE')
                    await asyncio.sleep(1.0)
            finally:
                await connection.close()

        tasks.append(asyncio.create_task(lock_table()))

    def lock_file() -> None:
        with open(run.cluster.file, "a+b") as handle:
            fcntl.flock(handle, fcntl.LOCK_EX)
            time.sleep(0.8)

    tasks.append(asyncio.create_task(asyncio.to_thread(lock_file)))
    run.cluster.note("table and file locked")
    await asyncio.gather(*tasks)


async def _destination_faults(run: Run) -> None:
    """Besides the http 5xx/hangs and SMTP 451/no answers: the database drops examhook's
    connections once."""
    await run.sender.wait_accepted(0.5)
    if run.pg is not None:
        await run.pg.execute(
            "SELECT pg_terminate_backend(pid) FROM pg_stat_activity WHERE datname = current_database()"
            f" AND pid <> pg_backend_pid() AND query ILIKE '%{run.pg.table}%'"
        )
        run.cluster.note("database connections terminated")


FAULTS: dict[str, Callable[[Run], Awaitable[None]]] = {
    "worker-sigkill": _worker_sigkill,
    "worker-sigterm": _worker_sigterm,
    "redis-sigkill": _redis_sigkill,
    "redis-full": _redis_full,
    "redis-refuses-writes": _redis_refuses_writes,
    "ingest-script-error": _ingest_script_error,
    "slow-destinations": _slow_destinations,
    "destination-faults": _destination_faults,
}


# --------------------------------------------------------------------------- the report


@dataclass
class MatrixReport:
    scenario: Scenario
    elapsed: float = 0.0
    accepted: int = 0
    sender_retries: int = 0
    sender_statuses: dict[str, int] = field(default_factory=dict)
    http_requests: int = 0
    http_repeats: int = 0
    http_repeats_after_hang: int = 0
    http_repeats_near_fault: int = 0
    emails_stored: int = 0
    email_unknown_outcomes: int = 0
    email_unknown_not_stored: int = 0
    pg_rows: int | None = None
    pg_rewritten: int | None = None
    file_lines: int = 0
    timeline: list[tuple[float, str]] = field(default_factory=list)
    problems: list[str] = field(default_factory=list)
    workdir: str = ""

    def summary(self) -> str:
        s = self.scenario
        pg = (
            f"{self.pg_rows} rows ({self.pg_rewritten} written again)"
            if self.pg_rows is not None
            else "no PostgreSQL"
        )
        lines = [
            f"fault matrix: {s.fault}, {s.events} events, {s.workers} worker(s); {self.elapsed:.1f}s",
            f"  sender: {self.accepted} accepted, {self.sender_retries} retries {self.sender_statuses}",
            f"  http: {self.http_requests} requests, {self.http_repeats} repeats "
            f"({self.http_repeats_after_hang} after a hang, {self.http_repeats_near_fault} around a fault)",
            f"  email: {self.emails_stored} stored, {self.email_unknown_outcomes} unknown outcomes "
            f"({self.email_unknown_not_stored} of them never stored)",
            f"  postgres: {pg}; file: {self.file_lines} lines",
            "  timeline: " + "; ".join(f"{t:.1f}s {a}" for t, a in self.timeline),
        ]
        lines += [f"  PROBLEM: {p}" for p in self.problems] or [
            "  no problems: nothing lost, nothing repeated"
        ]
        return "\n".join(lines)


def _fault_windows(timeline: list[tuple[float, str]], started: float) -> list[tuple[float, float]]:
    """Monotonic time ranges around each fault in which an http send's outcome may be unknown."""
    margin = HTTP_TIMEOUT + 1.0
    windows = []
    for at, action in timeline:
        moment = started + at
        if "SIGKILL" in action or "SIGTERM" in action or action.startswith("redis"):
            windows.append((moment - margin, moment + 3.0))
    return windows


async def _verify(run: Run, report: MatrixReport) -> None:
    keys = Keys(PREFIX)
    names = [n for n in INTEGRATIONS if n != "db" or run.pg is not None]
    accepted = sorted({s.event_id for s in run.sender.sent if s.event_id is not None})
    redis = run.admin

    async def state() -> dict[str, Any]:
        async with redis.pipeline(transaction=False) as pipe:
            for event_id in accepted:
                for name in names:
                    pipe.exists(keys.delivered(event_id, name))
                    pipe.zscore(keys.failures, pair_member(event_id, name))
            pipe.zcard(keys.queue)
            results = await pipe.execute()
        pending, failed = [], []
        i = 0
        for event_id in accepted:
            for name in names:
                done, failure = results[i], results[i + 1]
                i += 2
                if failure is not None:
                    failed.append((event_id, name))
                elif not done:
                    pending.append((event_id, name))
        return {"pending": pending, "failed": failed, "queue": results[-1]}

    last: dict[str, Any] = {}

    async def settled() -> bool:
        nonlocal last
        last = await state()
        return not last["pending"] and last["queue"] == 0

    with contextlib.suppress(AssertionError):
        await eventually(settled, timeout=run.scenario.settle_timeout, interval=0.25)
    if last["pending"]:
        report.problems.append(f"{len(last['pending'])} pairs never finished, e.g. {last['pending'][:3]}")
    if last["queue"]:
        report.problems.append(f"queue not drained: {last['queue']} jobs left")

    # email: exactly one stored message each; unknown outcomes are the only failures allowed
    stored = Counter(m.event_id for m in run.smtp.mails)
    report.emails_stored = sum(stored.values())
    unknown: set[str] = set()
    for event_id, name in last["failed"]:
        pair = await redis.hgetall(keys.pair(event_id, name))
        if name == "mail" and int(pair.get(b"unknown_outcomes", b"0")) > 0:
            unknown.add(event_id)
        else:
            error = pair.get(b"last_error", b"").decode()
            report.problems.append(f"{name} failed for {event_id}: {error}")
    report.email_unknown_outcomes = len(unknown)
    for event_id in accepted:
        count = stored[event_id]
        if count > 1:
            report.problems.append(f"email: {count} messages for {event_id}")
        elif count == 0 and event_id not in unknown:
            report.problems.append(f"email: no message for {event_id}")
        elif count == 0:
            report.email_unknown_not_stored += 1
    strays = set(stored) - set(accepted)
    if strays:
        report.problems.append(f"email: messages for events never accepted: {sorted(strays)[:3]}")

    # http: every key; repeats only where the first send's outcome was unknown
    windows = _fault_windows(run.cluster.timeline, run.cluster.started)
    by_key: dict[str, list[HttpRequest]] = {}
    for r in run.http.requests:
        by_key.setdefault(r.key, []).append(r)
    report.http_requests = len(run.http.requests)
    for event_id in accepted:
        processed = [r for r in by_key.get(event_id, []) if r.answer != "5xx"]
        if not processed:
            report.problems.append(f"http: {event_id} never reached the destination")
            continue
        extra = len(processed) - 1
        if extra == 0:
            continue
        report.http_repeats += extra
        if any(r.answer == "hang" for r in processed[:-1]):
            report.http_repeats_after_hang += extra
        elif any(lo <= r.arrived <= hi for r in processed[:-1] for lo, hi in windows):
            report.http_repeats_near_fault += extra
        else:
            report.problems.append(f"http: {event_id} sent {len(processed)} times with no unknown outcome")
    if set(by_key) - set(accepted):
        report.problems.append("http: keys of events never accepted reached the destination")

    # postgres: one row each
    if run.pg is not None:
        rows = await run.pg.rows()
        report.pg_rows = sum(rows.values())
        report.pg_rewritten = await run.pg.rewritten()
        missing = [e for e in accepted if rows[e] != 1]
        if missing:
            report.problems.append(
                f"postgres: not exactly one row for {len(missing)} events, e.g. {missing[:3]}"
            )

    # file: one line each
    lines: Counter[str] = Counter()
    if run.cluster.file.exists():
        import json as _json

        for line in run.cluster.file.read_bytes().splitlines():
            lines[_json.loads(line)["event_id"]] += 1
    report.file_lines = sum(lines.values())
    wrong = [e for e in accepted if lines[e] != 1]
    if wrong:
        report.problems.append(f"file: not exactly one line for {len(wrong)} events, e.g. {wrong[:3]}")
    report.problems += run.cluster.crashed()
    report.problems += [
        a.removeprefix("PROBLEM ") for _, a in run.cluster.timeline if a.startswith("PROBLEM")
    ]


@contextlib.asynccontextmanager
async def _workdir(scenario: Scenario) -> AsyncIterator[Path]:
    if scenario.workdir is not None:
        scenario.workdir.mkdir(parents=True, exist_ok=True)
        yield scenario.workdir
    else:
        with tempfile.TemporaryDirectory(prefix=f"examhook-matrix-{scenario.fault}-") as tmp:
            yield Path(tmp)


def _free_port() -> int:
    import socket

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


async def run_matrix(scenario: Scenario) -> MatrixReport:
    """One fault of the matrix; never raises for what it finds: read ``problems``."""
    report = MatrixReport(scenario)
    began = time.monotonic()
    async with _workdir(scenario) as workdir:
        report.workdir = str(workdir)
        http = HttpSink(scenario)
        await http.start()
        smtp = SmtpSink(scenario)
        smtp.start(_free_port())
        pg = await postgres_table(scenario.fault)
        cluster = MatrixCluster(scenario, workdir, http.url, smtp.port, pg)
        admin: Redis | None = None
        try:
            await cluster.start_redis()
            cluster.write_config()
            await cluster.start_receiver(_free_port())
            for n in range(1, scenario.workers + 1):
                cluster.start_worker(f"worker-{n}")
            options = ChaosOptions(
                events=scenario.events,
                duration=scenario.duration,
                concurrency=8,
                seed=scenario.seed,
                sender_grace=40,
            )
            sender = Sender(options, cluster.receiver_url)
            admin = Redis.from_url(cluster.redis_url)
            run = Run(scenario, cluster, sender, http, smtp, pg, admin)
            fault = asyncio.ensure_future(FAULTS[scenario.fault](run))
            await sender.run()
            await fault
            await _verify(run, report)
            report.accepted = sum(1 for s in sender.sent if s.status is not None)
            report.sender_retries = sender.retries
            report.sender_statuses = dict(sender.statuses)
            gave_up = sum(1 for s in sender.sent if s.status is None)
            if gave_up:
                report.problems.append(f"the sender gave up on {gave_up} events (never a 2xx)")
        finally:
            report.timeline = cluster.timeline
            if admin is not None:
                await admin.aclose()
            await cluster.stop()
            await http.stop()
            smtp.stop()
            if pg is not None:
                with contextlib.suppress(Exception):
                    await pg.drop()
    report.elapsed = time.monotonic() - began
    return report


__all__ = ["SCENARIOS", "MatrixReport", "Scenario", "run_matrix"]
