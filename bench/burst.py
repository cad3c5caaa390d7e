"""Burst end to end: N events POSTed over 200 connections while 1 (then 2) workers deliver.

    /work/venv/bin/python bench/burst.py                  # 10,000 events, 1 then 2 workers
    /work/venv/bin/python bench/burst.py --quick          # 2,000 events
    /work/venv/bin/python bench/burst.py --events 50000 --workers 1   # longer run: worker RSS growth

Each case: fresh Redis (appendfsync everysec, own data dir), the examhook receiver, N
worker processes (running, not burst) and a local destination answering 200. An aiohttp
client in this process POSTs N distinct events (unique attempt ids) over 200 connections.
Checks: every answer 2xx (must be: 0 non-2xx), each event delivered exactly once
(distinct Idempotency-Key == total == N). Reports the time from the first POST to the
last delivery, and worker RSS when ready and at the end.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import sys
import time
from collections import Counter
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))

import aiohttp
import psutil
from _common import (
    AUTH_B64,
    WEBHOOK_PATH,
    Stack,
    body_with_attempt,
    free_port,
    get_json,
    http_ok,
    install_signal_handlers,
    machine,
    sample_body,
    settings_dict,
    table,
    verdict,
    wait_for,
    write_settings,
)


async def post_all(url: str, n: int, connections: int) -> dict[str, Any]:
    template = sample_body()
    statuses: Counter[str] = Counter()
    latencies: list[float] = []
    next_i = 0
    headers = {"Authorization": f"Basic {AUTH_B64}", "Content-Type": "application/json"}

    async def client(session: aiohttp.ClientSession) -> None:
        nonlocal next_i
        while next_i < n:
            i = next_i
            next_i += 1
            body = body_with_attempt(template, "bu", i)
            t = time.perf_counter()
            for attempt in range(3):
                try:
                    async with session.post(url, data=body, headers=headers) as resp:
                        await resp.read()
                        statuses[str(resp.status)] += 1
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
        "p50_ms": latencies[len(latencies) // 2] * 1000,
        "p99_ms": latencies[int(len(latencies) * 0.99)] * 1000,
    }


def run_case(workers: int, args: argparse.Namespace) -> dict[str, Any]:
    n = args.events
    with Stack(f"burst-{workers}") as stack:
        redis = stack.redis(appendfsync="everysec", server=args.redis_server)
        dport, rport = free_port(), free_port()
        dest = stack.python("destination", "destination.py", "--port", str(dport))
        raw = settings_dict(redis.url, destination=f"http://127.0.0.1:{dport}/hook", log_level=args.log_level)
        settings = write_settings(stack, raw)
        receiver = stack.python(
            "receiver",
            "run_receiver.py",
            "--kind",
            "examhook",
            "--settings",
            str(settings),
            "--port",
            str(rport),
        )
        procs = []
        for i in range(workers):
            status = stack.dir / f"worker{i}.json"
            proc = stack.python(
                f"worker{i}",
                "run_worker.py",
                "--kind",
                "examhook",
                "--settings",
                str(settings),
                "--status-file",
                str(status),
            )
            procs.append((proc, status))
        wait_for(lambda: http_ok(f"http://127.0.0.1:{dport}/stats"), 20, f"destination:\n{dest.tail()}")
        wait_for(lambda: http_ok(f"http://127.0.0.1:{rport}/healthz"), 20, f"receiver:\n{receiver.tail()}")
        for proc, status in procs:
            wait_for(lambda s=status: Path(str(s) + ".ready").exists(), 30, f"worker:\n{proc.tail()}")
        rss_start = [psutil.Process(p.pid).memory_info().rss / 2**20 for p, _ in procs]

        result = asyncio.run(post_all(f"http://127.0.0.1:{rport}{WEBHOOK_PATH}", n, args.connections))
        deadline = time.monotonic() + args.timeout
        while True:
            stats = get_json(f"http://127.0.0.1:{dport}/stats")
            if stats["total"] >= n or time.monotonic() > deadline:
                break
            time.sleep(0.1)
        time.sleep(args.settle)  # a duplicate delivery would show up now
        stats = get_json(f"http://127.0.0.1:{dport}/stats")
        rss_end = [psutil.Process(p.pid).memory_info().rss / 2**20 for p, _ in procs]
        non_2xx = sum(c for s, c in result["statuses"].items() if not s.startswith("2"))
        result.update(
            delivered=stats["total"],
            distinct=stats["distinct"],
            end_to_end=stats["last_at"] - result["started"],
            non_2xx=non_2xx,
            rss_start=rss_start,
            rss_end=rss_end,
            queue_left=int(redis.cmd("ZCARD", "examhook:queue")),
            ok=non_2xx == 0 and stats["total"] == n and stats["distinct"] == n,
        )
        for proc, _ in procs:
            stack.stop(proc)
        return result


def main() -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--events", type=int, default=10_000)
    parser.add_argument("--quick", action="store_true", help="2,000 events")
    parser.add_argument("--workers", default="1,2", help="worker process counts, one case each")
    parser.add_argument("--connections", type=int, default=200)
    parser.add_argument("--log-level", default="info")
    parser.add_argument(
        "--timeout", type=float, default=600.0, help="max wait for deliveries after the POSTs"
    )
    parser.add_argument("--settle", type=float, default=2.0, help="seconds to wait for stray duplicates")
    parser.add_argument("--redis-server", default=None)
    args = parser.parse_args()
    if args.quick:
        args.events = 2_000
    install_signal_handlers()
    print(f"# burst benchmark | {machine()}")
    print(f"# {args.events} events over {args.connections} connections; examhook log_level={args.log_level}")
    rows = []
    oks = []
    for workers in [int(w) for w in args.workers.split(",")]:
        print(f"  {workers} worker(s) ...", flush=True)
        r = run_case(workers, args)
        oks.append(r["ok"])
        rows.append(
            [
                str(workers),
                f"{r['post_seconds']:.1f}",
                f"{args.events / r['post_seconds']:.0f}",
                f"{r['p50_ms']:.0f}/{r['p99_ms']:.0f}",
                json.dumps(r["statuses"]),
                str(r["non_2xx"]),
                f"{r['delivered']}/{r['distinct']}",
                f"{r['end_to_end']:.1f}",
                f"{args.events / r['end_to_end']:.0f}",
                " ".join(f"{a:.0f}->{b:.0f}" for a, b in zip(r["rss_start"], r["rss_end"], strict=True)),
                verdict(r["ok"]),
            ]
        )
    print()
    print(
        table(
            rows,
            [
                "workers",
                "POST s",
                "POST req/s",
                "p50/p99 ms",
                "statuses",
                "non-2xx",
                "delivered/distinct",
                "first POST->last delivery s",
                "events/s e2e",
                "worker RSS MB start->end",
                "result",
            ],
        )
    )
    print(f"\noverall: {'PASS' if all(oks) else 'FAIL'} (0 non-2xx, every event delivered exactly once)")
    return 0 if all(oks) else 1


if __name__ == "__main__":
    try:
        sys.exit(main())
    except KeyboardInterrupt:
        print("interrupted; all processes stopped", file=sys.stderr)
        sys.exit(130)
