"""A cohort release end to end through four integrations: http, email, postgres and file.

    python bench/cohort.py               # 10,000 events; 2 rounds + the slow-SMTP case (~10 min)
    python bench/cohort.py --quick       # 2,000 events, 1 round
    python bench/cohort.py --rss         # worker RSS over 50,000 events, all four integrations
    python bench/cohort.py --profile all --profile-only   # py-spy (--gil) of one worker in that case

Every case starts its own stack: a fresh redis-server (appendfsync everysec), the receiver
(`examhook receive`, the real CLI), ``--workers`` (2) worker processes (`examhook worker`, the
real CLI), all reading one TOML file, and one local destination per integration:

  http      bench/destination.py --record: an aiohttp server answering 200 at once
  email     bench/smtp_sink.py: aiosmtpd, answering at once or ``--smtp-delay`` after DATA
  postgres  PostgreSQL at ``--pg-dsn``: a table of its own per case (dropped afterwards)
  file      a JSON-lines file followed by bench/file_tail.py

The harness POSTs N distinct events (unique attempt ids) over 200 connections with Basic
auth and records when each POST was answered (and its event id, from the 202's body).
Timestamps of each event's arrival, per integration:
  http      when the destination had the body (its clock, time.time())
  email     when the SMTP sink sent its 250 after DATA (content in + ``--smtp-delay``)
  postgres  the row's ``received_at`` (DEFAULT now(): the upsert's transaction start, read back
            at the end; the commit follows within milliseconds)
  file      when bench/file_tail.py saw the line appended (it checks every 2 ms)
All on one machine and clock. Lag = arrival - POST answered; "first POST -> last delivery"
per integration = its last arrival - the first POST's start.

Cases (the targets are ratios within one run):
  alone: each integration by itself (same N, same workers); the fastest of them is the
         baseline.  all: the four together: each integration's first POST -> last delivery
         <= 1.5x the fastest alone (per round, median over rounds).
  all+smtp-delay: the four together, the SMTP sink answering ``--smtp-delay`` (0.3 s) after each
         DATA, ``--smtp-delay-events`` events (default N): http/postgres/file <= 1.2x their
         time in "all" (same N; when ``--smtp-delay-events`` differs, an "all" run of that size
         is made just before it), and email's rate vs its limit pool_size x workers / delay
         (PASS at >= 0.9x).
  --rss: the four together, 50,000 events: worker RSS sampled every second; RSS when 5,000
         events had reached all four integrations vs at the end: PASS if it grew <= 10% or
         <= 5 MB.
Also printed: POST rate, worker/receiver/redis CPU time per event (psutil; much less
sensitive to other load on the machine than the times).
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import signal
import statistics
import sys
import threading
import time
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))

import aiohttp
import psutil
from _common import (
    AUTH_B64,
    PASSWORD,
    PY,
    USER,
    WEBHOOK_PATH,
    Proc,
    Stack,
    body_with_attempt,
    free_port,
    get_json,
    http_ok,
    install_signal_handlers,
    machine,
    profile_summary,
    py_spy,
    sample_body,
    table,
    verdict,
    wait_for,
)

KINDS = ("http", "email", "postgres", "file")
NAMES = {"http": "lms", "email": "learner-email", "postgres": "results-db", "file": "results-file"}
TARGET_ALL = 1.5  # each integration in "all" vs the fastest alone
TARGET_DELAY = 1.2  # http/postgres/file with slow SMTP vs "all"
TARGET_EMAIL = 0.9  # email rate with slow SMTP vs pool_size x workers / delay
TARGET_RSS_PCT, TARGET_RSS_MB = 10.0, 5.0
RSS_MARK = 5_000
EMAIL_POOL = 5  # the email integration's default pool_size
DEFAULT_DSN = "postgresql://postgres@127.0.0.1:5432/test"
CLEAR_ENV = {
    v: ""
    for v in (
        "EXAMHOOK_CONFIG",
        "EXAMHOOK_REDIS_URL",
        "EXAMHOOK_REDIS_PREFIX",
        "EXAMHOOK_BASIC_AUTH_USER",
        "EXAMHOOK_BASIC_AUTH_PASSWORD",
        "EXAMHOOK_METRICS_TOKEN",
        "EXAMHOOK_LOG_LEVEL",
        "EXAMHOOK_ADMIN_TOKEN",
    )
}


@dataclass
class Case:
    label: str
    kinds: tuple[str, ...]
    events: int
    smtp_delay: float = 0.0


@dataclass
class Sinks:
    stats_urls: dict[str, str] = field(default_factory=dict)  # kind -> GET /stats base URL
    procs: list[Proc] = field(default_factory=list)
    table: str | None = None


def _q(value: str) -> str:
    return json.dumps(value)  # a TOML basic string (ASCII)


def toml_config(redis_url: str, integrations: list[dict[str, Any]], args: argparse.Namespace) -> str:
    lines = [
        f"log_level = {_q(args.log_level)}",
        "[redis]",
        f"url = {_q(redis_url)}",
        "[receiver]",
        f"basic_auth_user = {_q(USER)}",
        f"basic_auth_password = {_q(PASSWORD)}",
        "[worker]",
        f"concurrency = {args.concurrency}",
    ]
    for integration in integrations:
        lines.append("[[integrations]]")
        for key, value in integration.items():
            lines.append(f"{key} = {_q(value) if isinstance(value, str) else json.dumps(value)}")
    return "\n".join(lines) + "\n"


def _cpu(pid: int) -> float:
    try:
        t = psutil.Process(pid).cpu_times()
        return float(t.user + t.system)
    except psutil.Error:
        return 0.0


class RssSampler(threading.Thread):
    """RSS of each worker every ``interval`` seconds: [(time, [MB per worker])]."""

    def __init__(self, pids: list[int], interval: float = 1.0) -> None:
        super().__init__(daemon=True)
        self.procs = [psutil.Process(pid) for pid in pids]
        self.interval = interval
        self.samples: list[tuple[float, list[float]]] = []
        self._halt = threading.Event()

    def sample(self) -> None:
        with contextlib.suppress(psutil.Error):
            self.samples.append((time.time(), [p.memory_info().rss / 2**20 for p in self.procs]))

    def run(self) -> None:
        while not self._halt.is_set():
            self.sample()
            self._halt.wait(self.interval)

    def stop(self) -> None:
        self._halt.set()
        self.join(5)
        self.sample()


# -- the load ----------------------------------------------------------------------------


async def post_all(url: str, n: int, connections: int, tag: str) -> dict[str, Any]:
    """POST n distinct events; when each was answered, by event id."""
    template = sample_body()
    statuses: Counter[str] = Counter()
    answered: dict[str, float] = {}
    latencies: list[float] = []
    next_i = 0
    headers = {"Authorization": f"Basic {AUTH_B64}", "Content-Type": "application/json"}

    async def client(session: aiohttp.ClientSession) -> None:
        nonlocal next_i
        while next_i < n:
            i = next_i
            next_i += 1
            body = body_with_attempt(template, tag, i)
            t = time.perf_counter()
            for attempt in range(3):
                try:
                    async with session.post(url, data=body, headers=headers) as resp:
                        answer = await resp.read()
                        done = time.time()
                        statuses[str(resp.status)] += 1
                        if resp.status == 202:
                            answered[json.loads(answer)["event_id"]] = done
                        break
                except (aiohttp.ClientError, TimeoutError) as exc:
                    statuses[f"error:{exc.__class__.__name__}"] += 1
                    if attempt == 2:
                        raise
            latencies.append(time.perf_counter() - t)

    connector = aiohttp.TCPConnector(limit=connections)
    timeout = aiohttp.ClientTimeout(total=60)
    started = time.time()
    async with aiohttp.ClientSession(connector=connector, timeout=timeout) as session:
        await asyncio.gather(*(client(session) for _ in range(connections)))
    latencies.sort()
    return {
        "started": started,
        "post_seconds": time.time() - started,
        "statuses": dict(statuses),
        "answered": answered,
        "p50_ms": latencies[len(latencies) // 2] * 1000,
        "p99_ms": latencies[int(len(latencies) * 0.99)] * 1000,
    }


async def _pg_connect(dsn: str) -> Any:
    import asyncpg

    return await asyncpg.connect(dsn)


async def delivered_counts(
    session: aiohttp.ClientSession, sinks: Sinks, pg: Any
) -> dict[str, tuple[int, int]]:
    """(total, distinct) received so far per integration."""
    counts: dict[str, tuple[int, int]] = {}
    for kind, url in sinks.stats_urls.items():
        async with session.get(url + "/stats") as resp:
            s = await resp.json()
        counts[kind] = (s["total"], s["distinct"])
    if sinks.table is not None:
        rows = await pg.fetchval(f'SELECT count(*) FROM "{sinks.table}"')
        counts["postgres"] = (rows, rows)  # event_id is UNIQUE: a row per event
    return counts


async def arrival_times(session: aiohttp.ClientSession, sinks: Sinks, pg: Any) -> dict[str, dict[str, float]]:
    times: dict[str, dict[str, float]] = {}
    for kind, url in sinks.stats_urls.items():
        async with session.get(url + "/times") as resp:
            raw = await resp.json()
        # the SMTP sink gives [content in, 250 answered]: delivered when answered
        times[kind] = {k: (v[1] if isinstance(v, list) else v) for k, v in raw.items()}
    if sinks.table is not None:
        rows = await pg.fetch(
            f'SELECT event_id, extract(epoch FROM received_at)::float8 AS t FROM "{sinks.table}"'
        )
        times["postgres"] = {r["event_id"]: r["t"] for r in rows}
    return times


async def drive(
    case: Case, url: str, sinks: Sinks, args: argparse.Namespace, tag: str, on_posted: Any
) -> dict[str, Any]:
    n = case.events
    pg = await _pg_connect(args.pg_dsn) if sinks.table is not None else None
    try:
        posted = await post_all(url, n, args.connections, tag)
        on_posted()
        expected = len(posted["answered"])
        timeout = args.timeout
        if case.smtp_delay and "email" in case.kinds:
            timeout += n * case.smtp_delay / (EMAIL_POOL * args.workers) * 1.5
        deadline = time.monotonic() + timeout
        async with aiohttp.ClientSession() as session:
            while True:
                counts = await delivered_counts(session, sinks, pg)
                if all(c[1] >= expected for c in counts.values()) or time.monotonic() > deadline:
                    break
                await asyncio.sleep(0.25)
            done_at = time.time()
            await asyncio.sleep(args.settle)  # a duplicate delivery would show up now
            counts = await delivered_counts(session, sinks, pg)
            times = await arrival_times(session, sinks, pg)
        posted.update(counts=counts, times=times, done_at=done_at, expected=expected)
        return posted
    finally:
        if pg is not None:
            await pg.close()


# -- one case ----------------------------------------------------------------------------


def start_sinks(
    stack: Stack, case: Case, args: argparse.Namespace, table_name: str
) -> tuple[Sinks, list[dict[str, Any]]]:
    sinks = Sinks()
    integrations: list[dict[str, Any]] = []
    waits: list[tuple[str, Proc]] = []
    for kind in case.kinds:
        name = NAMES[kind]
        if kind == "http":
            port = free_port()
            proc = stack.python("destination", "destination.py", "--port", str(port), "--record")
            sinks.stats_urls[kind] = f"http://127.0.0.1:{port}"
            integrations.append({"name": name, "type": "http", "url": f"http://127.0.0.1:{port}/hook"})
        elif kind == "email":
            port, stats_port = free_port(), free_port()
            proc = stack.python(
                "smtp-sink",
                "smtp_sink.py",
                "--port",
                str(port),
                "--stats-port",
                str(stats_port),
                "--delay",
                str(case.smtp_delay),
            )
            sinks.stats_urls[kind] = f"http://127.0.0.1:{stats_port}"
            integrations.append(
                {
                    "name": name,
                    "type": "email",
                    "smtp_host": "127.0.0.1",
                    "smtp_port": port,
                    "tls": "none",
                    "from": "Exams Office <results@example.org>",
                    "pool_size": EMAIL_POOL,
                }
            )
        elif kind == "file":
            path = stack.dir / "results.jsonl"
            port = free_port()
            proc = stack.python("file-tail", "file_tail.py", "--path", str(path), "--port", str(port))
            sinks.stats_urls[kind] = f"http://127.0.0.1:{port}"
            integrations.append({"name": name, "type": "file", "path": str(path)})
        elif kind == "postgres":
            sinks.table = table_name
            integrations.append({"name": name, "type": "postgres", "dsn": args.pg_dsn, "table": table_name})
            continue
        else:
            raise ValueError(kind)
        sinks.procs.append(proc)
        waits.append((kind, proc))
    for kind, proc in waits:
        url = sinks.stats_urls[kind]
        wait_for(lambda u=url: http_ok(u + "/stats"), 20, f"{kind} sink:\n{proc.tail()}")
    return sinks, integrations


def drop_table(dsn: str, table_name: str) -> None:
    async def drop() -> None:
        conn = await _pg_connect(dsn)
        try:
            await conn.execute(f'DROP TABLE IF EXISTS "{table_name}" CASCADE')
        finally:
            await conn.close()

    asyncio.run(drop())


def _pct(values: list[float], q: float) -> float:
    if not values:
        return float("nan")
    values = sorted(values)
    return values[min(len(values) - 1, int(q * len(values)))]


_case_no = 0


def run_case(case: Case, args: argparse.Namespace, profile_to: Path | None = None) -> dict[str, Any]:
    global _case_no
    _case_no += 1
    tag = f"c{_case_no:03d}"
    table_name = f"bench_cohort_{os.getpid()}_{_case_no}"
    try:
        with Stack(f"cohort-{case.label}") as stack:
            return _run_case(stack, case, args, tag, table_name, profile_to)
    finally:
        if "postgres" in case.kinds:
            drop_table(args.pg_dsn, table_name)


def _run_case(
    stack: Stack, case: Case, args: argparse.Namespace, tag: str, table_name: str, profile_to: Path | None
) -> dict[str, Any]:
    n = case.events
    redis = stack.redis(appendfsync="everysec", server=args.redis_server)
    if "postgres" in case.kinds:
        drop_table(args.pg_dsn, table_name)
    sinks, integrations = start_sinks(stack, case, args, table_name)
    config = stack.dir / "examhook.toml"
    config.write_text(toml_config(redis.url, integrations, args))
    rport = free_port()
    cli = [PY, "-m", "cli.main"]
    receiver = stack.spawn(
        "receiver",
        [*cli, "receive", "--config", str(config), "--host", "127.0.0.1", "--port", str(rport)],
        env=CLEAR_ENV,
    )
    workers = [
        stack.spawn(f"worker{i}", [*cli, "worker", "--config", str(config)], env=CLEAR_ENV)
        for i in range(args.workers)
    ]
    wait_for(lambda: http_ok(f"http://127.0.0.1:{rport}/healthz"), 30, f"receiver:\n{receiver.tail()}")
    for w in workers:
        wait_for(
            lambda w=w: "worker ready" in w.tail(200) or w.popen.poll() is not None,
            60,
            f"{w.name}:\n{w.tail()}",
        )
        if w.popen.poll() is not None:
            raise RuntimeError(f"{w.name} exited:\n{w.tail()}")
    spy = None
    if profile_to is not None:
        spy = stack.spawn(
            "py-spy",
            [
                py_spy() or "py-spy",
                "record",
                "--pid",
                str(workers[0].pid),
                "--gil",  # only samples holding the GIL: the worker's CPU, not its waits
                "-r",
                "200",
                "-f",
                "raw",
                "-o",
                str(profile_to),
            ],
        )
        time.sleep(1.0)
    pids = {
        "workers": [w.pid for w in workers],
        "receiver": [receiver.pid],
        "redis": [redis.proc.pid],
        "sinks": [p.pid for p in sinks.procs],
    }
    cpu0 = {k: sum(_cpu(p) for p in v) for k, v in pids.items()}
    cpu_posted: dict[str, float] = {}
    sampler = RssSampler(pids["workers"])
    sampler.start()

    def on_posted() -> None:
        cpu_posted.update({k: sum(_cpu(p) for p in v) for k, v in pids.items()})

    url = f"http://127.0.0.1:{rport}{WEBHOOK_PATH}"
    r = asyncio.run(drive(case, url, sinks, args, tag, on_posted))
    cpu1 = {k: sum(_cpu(p) for p in v) for k, v in pids.items()}
    sampler.stop()
    if spy is not None:
        stack.stop(spy, timeout=30, sig=signal.SIGINT)
    for w in workers:
        if w.popen.poll() is not None:
            raise RuntimeError(f"{w.name} died:\n{w.tail()}")
    answered: dict[str, float] = r["answered"]
    start = r["started"]
    per: dict[str, dict[str, Any]] = {}
    for kind in case.kinds:
        times = r["times"].get(kind, {})
        total, distinct = r["counts"][kind]
        lags = [times[e] - t for e, t in answered.items() if e in times]
        arrivals = sorted(times.values())
        last = arrivals[-1] if arrivals else float("nan")
        per[kind] = {
            "e2e": last - start,
            "eps": len(arrivals) / (last - start) if arrivals else 0.0,
            "drain_eps": (len(arrivals) - 1) / (last - arrivals[0]) if len(arrivals) > 1 else 0.0,
            "p50": _pct(lags, 0.50),
            "p95": _pct(lags, 0.95),
            "p99": _pct(lags, 0.99),
            "total": total,
            "distinct": distinct,
            "ok": total == distinct == r["expected"] == n and set(times) >= set(answered),
            "arrivals": arrivals,
        }
    if "email" in case.kinds:
        per["email"]["connections"] = get_json(sinks.stats_urls["email"] + "/stats")["connections"]
    non_2xx = sum(c for s, c in r["statuses"].items() if not s.startswith("2"))
    return {
        "case": case,
        "post_seconds": r["post_seconds"],
        "post_rps": n / r["post_seconds"],
        "post_p99_ms": r["p99_ms"],
        "statuses": r["statuses"],
        "non_2xx": non_2xx,
        "per": per,
        "cpu_per_event_us": {k: (cpu1[k] - cpu0[k]) / n * 1e6 for k in cpu0},
        "cpu_post_us": {k: (cpu_posted[k] - cpu0[k]) / n * 1e6 for k in cpu0},
        "rss": sampler.samples,
        "done_at": r["done_at"],
        "ok": non_2xx == 0 and all(p["ok"] for p in per.values()),
    }


def describe(result: dict[str, Any]) -> str:
    case: Case = result["case"]
    parts = [
        f"POST {result['post_seconds']:.1f}s ({result['post_rps']:.0f}/s, p99 {result['post_p99_ms']:.0f} ms,"
        f" non-2xx {result['non_2xx']})"
    ]
    for kind in case.kinds:
        p = result["per"][kind]
        parts.append(
            f"{kind} {p['e2e']:.1f}s lag p50/p99 {p['p50']:.1f}/{p['p99']:.1f}s {p['distinct']}/{p['total']}"
        )
    cpu = result["cpu_per_event_us"]
    parts.append(f"worker CPU {cpu['workers']:.0f} us/event")
    return (
        f"    {case.label} (N={case.events}): "
        + "; ".join(parts)
        + ("" if result["ok"] else "  [INCOMPLETE]")
    )


# -- reports -----------------------------------------------------------------------------


def med(values: list[float]) -> float:
    return statistics.median(values) if values else float("nan")


def lags_ms(p: dict[str, Any]) -> str:
    return f"{p['p50'] * 1000:.0f} / {p['p95'] * 1000:.0f} / {p['p99'] * 1000:.0f}"


def lag_cols(results: list[dict[str, Any]], kind: str) -> str:
    def m(key: str) -> float:
        return med([r["per"][kind][key] for r in results]) * 1000

    return f"{m('p50'):.0f} / {m('p95'):.0f} / {m('p99'):.0f}"


def report(
    rounds: list[dict[str, dict[str, Any]]], delay: dict[str, Any] | None, args: argparse.Namespace
) -> bool:
    checks: list[bool] = []
    n = args.events
    alone_rows = []
    for kind in KINDS:
        rs = [rd[kind] for rd in rounds]
        alone_rows.append(
            [
                kind,
                " ".join(f"{r['per'][kind]['e2e']:.1f}" for r in rs),
                f"{med([r['per'][kind]['e2e'] for r in rs]):.1f}",
                f"{med([r['per'][kind]['eps'] for r in rs]):.0f}",
                lag_cols(rs, kind),
                f"{med([r['cpu_per_event_us']['workers'] for r in rs]):.0f}",
                f"{med([r['post_rps'] for r in rs]):.0f}",
                " ".join(f"{r['per'][kind]['distinct']}/{r['per'][kind]['total']}" for r in rs),
            ]
        )
    fastest = [min(KINDS, key=lambda k, rd=rd: rd[k]["per"][k]["e2e"]) for rd in rounds]
    print(f"\nalone: each integration by itself, {n} events, {args.workers} workers ({len(rounds)} round(s))")
    print(
        table(
            alone_rows,
            [
                "integration",
                "first POST->last delivery s, per round",
                "median s",
                "events/s",
                "lag p50/p95/p99 ms",
                "worker CPU us/event",
                "POST req/s",
                "distinct/total",
            ],
        )
    )
    print("fastest alone per round: " + ", ".join(fastest))

    all_rows = []
    all_runs = [rd["all"] for rd in rounds]
    for kind in KINDS:
        ratios = [
            rd["all"]["per"][kind]["e2e"] / rd[f]["per"][f]["e2e"]
            for rd, f in zip(rounds, fastest, strict=True)
        ]
        ratio = med(ratios)
        ok = ratio <= TARGET_ALL and all(r["per"][kind]["ok"] for r in all_runs)
        checks.append(ok)
        all_rows.append(
            [
                kind,
                " ".join(f"{r['per'][kind]['e2e']:.1f}" for r in all_runs),
                f"{med([r['per'][kind]['e2e'] for r in all_runs]):.1f}",
                f"{med([r['per'][kind]['eps'] for r in all_runs]):.0f}",
                lag_cols(all_runs, kind),
                " ".join(f"{x:.2f}" for x in ratios),
                f"{ratio:.2f}",
                f"<={TARGET_ALL}",
                " ".join(f"{r['per'][kind]['distinct']}/{r['per'][kind]['total']}" for r in all_runs),
                verdict(ok),
            ]
        )
    print(f"\nall: the four integrations together, {n} events, {args.workers} workers")
    print(
        table(
            all_rows,
            [
                "integration",
                "first POST->last delivery s, per round",
                "median s",
                "events/s",
                "lag p50/p95/p99 ms",
                "vs fastest alone, per round",
                "ratio",
                "target",
                "distinct/total",
                "result",
            ],
        )
    )
    cpu = {k: med([r["cpu_per_event_us"][k] for r in all_runs]) for k in all_runs[0]["cpu_per_event_us"]}
    print(
        f"all: CPU us per event (first POST -> last delivery): workers {cpu['workers']:.0f} (both),"
        f" receiver {cpu['receiver']:.0f}, redis {cpu['redis']:.0f}, local sinks {cpu['sinks']:.0f};"
        f" POST {med([r['post_rps'] for r in all_runs]):.0f} req/s,"
        f" non-2xx {sum(r['non_2xx'] for r in all_runs)}"
    )

    if delay is not None:
        d = delay["delayed"]
        base_runs = [delay["base"]] if delay.get("base") is not None else all_runs
        m = d["case"].events
        rows = []
        for kind in ("http", "postgres", "file"):
            base_e2e = med([r["per"][kind]["e2e"] for r in base_runs])
            ratio = d["per"][kind]["e2e"] / base_e2e
            ok = ratio <= TARGET_DELAY and d["per"][kind]["ok"]
            checks.append(ok)
            rows.append(
                [
                    kind,
                    f"{d['per'][kind]['e2e']:.1f}",
                    f"{base_e2e:.1f}",
                    f"{d['per'][kind]['eps']:.0f}",
                    lags_ms(d["per"][kind]),
                    f"{ratio:.2f}",
                    f"<={TARGET_DELAY}",
                    f"{d['per'][kind]['distinct']}/{d['per'][kind]['total']}",
                    verdict(ok),
                ]
            )
        e = d["per"]["email"]
        limit = EMAIL_POOL * args.workers / args.smtp_delay
        email_ratio = e["drain_eps"] / limit
        ok = email_ratio >= TARGET_EMAIL and e["ok"]
        checks.append(ok)
        rows.append(
            [
                "email",
                f"{e['e2e']:.1f}",
                "-",
                f"{e['eps']:.1f} (first->last 250: {e['drain_eps']:.1f}/s; limit {limit:.1f}/s)",
                lags_ms(e),
                f"{email_ratio:.2f} of limit",
                f">={TARGET_EMAIL} of limit",
                f"{e['distinct']}/{e['total']}",
                verdict(ok),
            ]
        )
        print(
            f"\nall+smtp-delay: the SMTP sink answers {args.smtp_delay * 1000:.0f} ms after each DATA;"
            f" {m} events (--smtp-delay-events), {args.workers} workers, email pool_size {EMAIL_POOL}:"
            f" limit {EMAIL_POOL} x {args.workers} / {args.smtp_delay} s = {limit:.1f} emails/s;"
            f" SMTP connections seen:"
            f" {e.get('connections')}; baseline: "
            + (
                "an 'all' run of the same size just before it"
                if delay.get("base")
                else "the 'all' runs above"
            )
        )
        print(
            table(
                rows,
                [
                    "integration",
                    "first POST->last delivery s",
                    "same without delay s",
                    "events/s",
                    "lag p50/p95/p99 ms",
                    "ratio",
                    "target",
                    "distinct/total",
                    "result",
                ],
            )
        )
        cpu = d["cpu_per_event_us"]
        print(
            f"all+smtp-delay: CPU us per event: workers {cpu['workers']:.0f}, receiver {cpu['receiver']:.0f},"
            f" redis {cpu['redis']:.0f}; non-2xx {d['non_2xx']}"
        )
    return all(checks)


def report_rss(result: dict[str, Any], args: argparse.Namespace) -> bool:
    per = result["per"]
    # when RSS_MARK events had reached every integration
    mark = max(p["arrivals"][min(RSS_MARK, len(p["arrivals"])) - 1] for p in per.values())
    samples = result["rss"]
    at_mark = next((s for s in samples if s[0] >= mark), samples[-1])
    end = samples[-1]
    start = samples[0]
    print(f"\nrss: the four integrations together, {result['case'].events} events, {args.workers} workers")
    print(describe(result))
    print("worker RSS MB, sampled every second (every 10th sample shown; t = s since the first POST):")
    t0 = samples[0][0]
    for i, (t, rss) in enumerate(samples):
        if i % 10 == 0 or i == len(samples) - 1:
            print(f"  t={t - t0:6.1f}  " + "  ".join(f"{x:6.1f}" for x in rss))
    rows, oks = [], []
    for w in range(len(end[1])):
        grew = end[1][w] - at_mark[1][w]
        pct = 100 * grew / at_mark[1][w]
        ok = pct <= TARGET_RSS_PCT or grew <= TARGET_RSS_MB
        oks.append(ok)
        peak = max(s[1][w] for s in samples)
        rows.append(
            [
                f"worker{w}",
                f"{start[1][w]:.1f}",
                f"{at_mark[1][w]:.1f}",
                f"{end[1][w]:.1f}",
                f"{peak:.1f}",
                f"{grew:+.1f} MB ({pct:+.1f}%)",
                f"<= {TARGET_RSS_PCT:.0f}% or <= {TARGET_RSS_MB:.0f} MB",
                verdict(ok),
            ]
        )
    print(
        table(
            rows,
            [
                "process",
                "ready MB",
                f"after {RSS_MARK} events MB",
                "end MB",
                "peak MB",
                "growth",
                "target",
                "result",
            ],
        )
    )
    print(
        f"(after {RSS_MARK} events: first sample once {RSS_MARK} events had reached all four integrations,"
        f" t={at_mark[0] - t0:.1f}s; end: after the last delivery, t={end[0] - t0:.1f}s)"
    )
    return all(oks) and result["ok"]


def main() -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--events", type=int, default=10_000)
    parser.add_argument("--quick", action="store_true", help="2,000 events, 1 round")
    parser.add_argument("--rounds", type=int, default=2, help="interleaved rounds of all + each alone")
    parser.add_argument("--workers", type=int, default=2, help="worker processes")
    parser.add_argument("--concurrency", type=int, default=50, help="worker.concurrency")
    parser.add_argument("--connections", type=int, default=200, help="concurrent POSTs")
    parser.add_argument("--smtp-delay", type=float, default=0.3, help="seconds, end of DATA to 250")
    parser.add_argument(
        "--smtp-delay-events", type=int, default=None, help="events in the slow-SMTP case (default: --events)"
    )
    parser.add_argument("--no-delay-case", action="store_true", help="skip the slow-SMTP case")
    parser.add_argument("--rss", action="store_true", help="only the RSS run (--rss-events, all four)")
    parser.add_argument("--rss-events", type=int, default=50_000)
    parser.add_argument(
        "--profile",
        default=None,
        metavar="CASE",
        help="py-spy one worker in an extra run of CASE: all, all+smtp-delay, http, email, postgres, file",
    )
    parser.add_argument("--profile-out", default=None, help="keep the raw collapsed stacks here")
    parser.add_argument("--profile-only", action="store_true", help="run only the --profile case")
    parser.add_argument("--pg-dsn", default=DEFAULT_DSN)
    parser.add_argument("--log-level", default="info", help="examhook log_level (product default: info)")
    parser.add_argument(
        "--timeout", type=float, default=300.0, help="max wait for deliveries after the POSTs"
    )
    parser.add_argument("--settle", type=float, default=1.0, help="seconds to wait for stray duplicates")
    parser.add_argument("--redis-server", default=None)
    args = parser.parse_args()
    if args.quick:
        args.events, args.rounds = 2_000, 1
    if args.smtp_delay_events is None:
        args.smtp_delay_events = args.events
    install_signal_handlers()
    print(f"# cohort benchmark | {machine()}")
    print(f"# command: {' '.join([Path(sys.executable).name, *sys.argv])}")
    print(
        f"# {args.workers} worker processes (examhook worker, concurrency {args.concurrency}), receiver"
        f" examhook receive, POSTs over {args.connections} connections, log_level={args.log_level};"
        f" integrations: http (bench/destination.py), email (bench/smtp_sink.py, pool_size {EMAIL_POOL}),"
        f" postgres ({args.pg_dsn}, a table per case), file (JSON lines, fsync per event)"
    )
    ok = True
    if args.profile_only:
        pass
    elif args.rss:
        print(f"# rss run: {args.rss_events} events", flush=True)
        result = run_case(Case("rss", KINDS, args.rss_events), args)
        ok = report_rss(result, args)
    else:
        print(
            f"# {args.events} events per case; {args.rounds} round(s) of [all + each integration alone],"
            f" order rotated per round; then all+smtp-delay ({args.smtp_delay * 1000:.0f} ms,"
            f" {args.smtp_delay_events} events)",
            flush=True,
        )
        rounds: list[dict[str, dict[str, Any]]] = []
        order = ["all", *KINDS]
        for rnd in range(args.rounds):
            results: dict[str, dict[str, Any]] = {}
            shift = rnd % len(order)
            for label in order[shift:] + order[:shift]:
                kinds = KINDS if label == "all" else (label,)
                print(f"  round {rnd + 1}: {label} ...", flush=True)
                results[label] = run_case(Case(label, kinds, args.events), args)
                print(describe(results[label]), flush=True)
            rounds.append(results)
        delay = None
        if not args.no_delay_case:
            delay = {}
            m = args.smtp_delay_events
            if m != args.events:
                print(f"  all at {m} events (baseline of the slow-SMTP case) ...", flush=True)
                delay["base"] = run_case(Case(f"all@{m}", KINDS, m), args)
                print(describe(delay["base"]), flush=True)
            print(
                f"  all+smtp-delay ({m} events; email needs"
                f" ~{m * args.smtp_delay / (EMAIL_POOL * args.workers):.0f} s) ...",
                flush=True,
            )
            delay["delayed"] = run_case(Case("all+smtp-delay", KINDS, m, args.smtp_delay), args)
            print(describe(delay["delayed"]), flush=True)
        ok = report(rounds, delay, args)
        print(
            "\n(e2e: first POST -> the integration's last arrival; events/s = N / that; lag = arrival - POST"
            " answered, per event, medians of the per-round percentiles. Arrival: http destination's clock"
            " when it had the body; email: the sink's 250 after DATA; postgres: the row's received_at"
            " (now(), the upsert's transaction start); file: when file_tail.py saw the line (2 ms polling).)"
        )
    if args.profile:
        label = args.profile
        kinds = KINDS if label.startswith("all") else (label,)
        delay_s = args.smtp_delay if label == "all+smtp-delay" else 0.0
        n = args.smtp_delay_events if delay_s else args.events
        with Stack("cohort-profile") as holder:
            raw = Path(args.profile_out) if args.profile_out else holder.dir / "worker.raw"
            print(
                f"\nprofiling worker0 during an extra '{label}' run ({n} events) with py-spy ...", flush=True
            )
            result = run_case(Case(label, kinds, n, delay_s), args, profile_to=raw)
            print(describe(result))
            print(profile_summary(raw, top=30, focus=("worker/", "shared/")))
    if not args.profile_only:
        print(f"\noverall: {'PASS' if ok else 'FAIL'}")
    return 0 if ok else 1


if __name__ == "__main__":
    try:
        sys.exit(main())
    except KeyboardInterrupt:
        print("interrupted; all processes stopped", file=sys.stderr)
        sys.exit(130)
