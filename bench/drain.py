"""Worker drain rate: examhook workers delivering a preloaded queue vs stock arq no-op jobs.

    python bench/drain.py             # 10,000 events per case, 3 interleaved rounds (~5 minutes)
    python bench/drain.py --quick     # 4,000 events per case, 1 round
    python bench/drain.py --profile   # + py-spy profile of one examhook worker

For each case a fresh Redis (appendfsync everysec, own data dir) is preloaded with N
events - through examhook's own write path, ``Store.accept_batch``, exactly what the
receiver's group commit calls - then 1 or 2 worker processes run in burst mode
(exit when the queue is empty) delivering every event to a local aiohttp destination
(``http`` integration) that answers 200 at once; the destination must have received
each event exactly once.

Rate (the target's): N / (last delivery - first delivery), as the destination saw them
(for the baseline: the first and the last no-op job run, as the workers saw them). Also
printed, the old column: N / (last worker exit - first worker ready).

Baseline: stock arq (pickle serializer, default keep_result) draining N no-op jobs with
the same max_jobs (50) and poll_delay (0.05 s), 1 and 2 processes. Rounds interleave
(arq, examhook, arq, examhook, ...); each round's ratio is examhook over the arq run just
before it; the median over rounds is reported. Target: >= 1.0x.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import statistics
import sys
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))

import psutil
from _common import (
    Stack,
    free_port,
    get_json,
    http_ok,
    install_signal_handlers,
    machine,
    profile_summary,
    py_spy,
    settings_dict,
    table,
    verdict,
    wait_for,
    write_settings,
)
from _load import preload_arq_noop, preload_examhook

TARGET = 1.0
ARQ_QUEUE = "arq:queue"


def _cpu(pid: int) -> float:
    t = psutil.Process(pid).cpu_times()
    return t.user + t.system


def run_case(
    kind: str, procs: int, args: argparse.Namespace, profile_to: Path | None = None
) -> dict[str, Any]:
    n = args.events
    with Stack(f"drain-{kind}-{procs}") as stack:
        redis = stack.redis(appendfsync="everysec", server=args.redis_server)
        worker_args: list[str]
        if kind == "examhook":
            dport = free_port()
            dest = stack.python("destination", "destination.py", "--port", str(dport))
            wait_for(lambda: http_ok(f"http://127.0.0.1:{dport}/stats"), 20, f"destination:\n{dest.tail()}")
            raw = settings_dict(
                redis.url, destination=f"http://127.0.0.1:{dport}/hook", log_level=args.log_level
            )
            settings = write_settings(stack, raw)
            loaded = asyncio.run(preload_examhook(raw, n))
            worker_args = ["--kind", "examhook", "--settings", str(settings)]
            if args.buffered_logs:
                worker_args.append("--buffered-logs")
        else:
            loaded = asyncio.run(preload_arq_noop(redis.url, n, ARQ_QUEUE))
            worker_args = ["--kind", "arq-noop", "--redis-url", redis.url, "--queue", ARQ_QUEUE]
        if loaded != n:
            raise RuntimeError(f"preloaded {loaded} of {n}")
        mem_loaded = int(redis.info()["used_memory"])
        redis_cpu0 = _cpu(redis.proc.pid)
        cmds0 = int(redis.info("stats")["total_commands_processed"])
        workers = []
        for i in range(procs):
            status = stack.dir / f"worker{i}.json"
            proc = stack.python(
                f"worker{i}",
                "run_worker.py",
                *worker_args,
                "--burst",
                "--max-jobs",
                str(args.max_jobs),
                "--poll-delay",
                str(args.poll_delay),
                "--status-file",
                str(status),
            )
            workers.append((proc, status))
        spy = None
        if profile_to is not None:
            wait_for(lambda: Path(str(workers[0][1]) + ".ready").exists(), 30, "worker not ready")
            spy = stack.spawn(
                "py-spy",
                [
                    py_spy() or "py-spy",
                    "record",
                    "--pid",
                    str(workers[0][0].pid),
                    "-r",
                    "250",
                    "-f",
                    "raw",
                    "-o",
                    str(profile_to),
                ],
            )
        deadline = time.monotonic() + args.timeout
        for proc, _ in workers:
            remaining = max(1.0, deadline - time.monotonic())
            try:
                proc.popen.wait(remaining)
            except Exception:
                raise RuntimeError(f"worker did not finish within {args.timeout}s:\n{proc.tail()}") from None
        if spy is not None:
            spy.popen.wait(30)
        stats = []
        for proc, status in workers:
            if not status.exists():
                raise RuntimeError(f"{proc.name} failed:\n{proc.tail()}")
            stats.append(json.loads(status.read_text()))
        start = min(s["ready"] for s in stats)
        end = max(s["end"] for s in stats)
        result: dict[str, Any] = {
            "seconds": end - start,
            "jobs_per_s_process": n / (end - start),
            "complete": sum(s["complete"] for s in stats),
            "failed": sum(s["failed"] for s in stats),
            "rss_start_mb": max(s["rss_start"] for s in stats) / 2**20,
            "rss_end_mb": max(s["rss_end"] for s in stats) / 2**20,
            "queue_left": int(redis.cmd("ZCARD", "examhook:queue" if kind == "examhook" else ARQ_QUEUE)),
            "mem_loaded_mb": mem_loaded / 2**20,
            "cpu_us": sum(s["cpu_end"] - s["cpu_ready"] for s in stats) / n * 1e6,
            "redis_cpu_us": (_cpu(redis.proc.pid) - redis_cpu0) / n * 1e6,
            "cmds_per_job": (int(redis.info("stats")["total_commands_processed"]) - cmds0) / n,
        }
        if kind == "examhook":
            d = get_json(f"http://127.0.0.1:{dport}/stats")
            result["delivered"], result["distinct"] = d["total"], d["distinct"]
            result["exactly_once"] = d["total"] == n and d["distinct"] == n
            first, last = d["first_at"], d["last_at"]
        else:
            result["exactly_once"] = result["complete"] == n
            first = min(s["first_job"] for s in stats if "first_job" in s)
            last = max(s["last_job"] for s in stats if "last_job" in s)
        result["delivery_seconds"] = last - first
        result["jobs_per_s"] = n / (last - first)
        return result


def main() -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--events", type=int, default=10_000)
    parser.add_argument("--rounds", type=int, default=3, help="interleaved rounds; medians are reported")
    parser.add_argument("--quick", action="store_true", help="4,000 events, 1 round")
    parser.add_argument("--procs", default="1,2", help="worker process counts to run")
    parser.add_argument(
        "--max-jobs", type=int, default=50, help="arq max_jobs (examhook worker.concurrency default)"
    )
    parser.add_argument("--poll-delay", type=float, default=0.05, help="arq poll_delay (examhook default)")
    parser.add_argument("--log-level", default="info", help="examhook log_level (product default: info)")
    parser.add_argument("--timeout", type=float, default=300.0, help="per case")
    parser.add_argument("--profile", action="store_true", help="also profile one examhook worker with py-spy")
    parser.add_argument("--profile-out", default=None)
    parser.add_argument("--redis-server", default=None)
    parser.add_argument(
        "--buffered-logs",
        action="store_true",
        help="PROTOTYPE: examhook workers buffer their log output (not product behaviour)",
    )
    args = parser.parse_args()
    if args.quick:
        args.events, args.rounds = 4_000, 1
    install_signal_handlers()
    print(f"# drain benchmark | {machine()}")
    print(f"# command: {' '.join(sys.argv)}")
    print(
        f"# {args.events} events per case, {args.rounds} interleaved round(s), max_jobs={args.max_jobs},"
        f" poll_delay={args.poll_delay}, burst mode; examhook log_level={args.log_level}"
    )
    procs_list = [int(p) for p in args.procs.split(",")]
    runs: dict[int, list[tuple[dict[str, Any], dict[str, Any]]]] = {p: [] for p in procs_list}
    for rnd in range(args.rounds):
        for procs in procs_list:
            print(f"  round {rnd + 1}, {procs} process(es): arq no-op ...", flush=True)
            base = run_case("arq-noop", procs, args)
            print(f"  round {rnd + 1}, {procs} process(es): examhook ...", flush=True)
            ex = run_case("examhook", procs, args)
            runs[procs].append((base, ex))
            print(
                f"    arq {base['jobs_per_s']:.0f} jobs/s, examhook {ex['jobs_per_s']:.0f} events/s:"
                f" {ex['jobs_per_s'] / base['jobs_per_s']:.2f}x (first->last delivery);"
                f" {ex['jobs_per_s_process'] / base['jobs_per_s_process']:.2f}x (ready->exit)",
                flush=True,
            )
    rows, checks = [], []
    for procs in procs_list:
        pairs = runs[procs]

        def med(kind: int, key: str, pairs: list[Any] = pairs) -> float:
            return statistics.median(pair[kind][key] for pair in pairs)

        ratio = statistics.median(ex["jobs_per_s"] / base["jobs_per_s"] for base, ex in pairs)
        ratio_old = statistics.median(
            ex["jobs_per_s_process"] / base["jobs_per_s_process"] for base, ex in pairs
        )
        once = all(ex["exactly_once"] and base["exactly_once"] for base, ex in pairs)
        ok = ratio >= TARGET and once
        checks.append(ok)
        rows.append(
            [
                str(procs),
                f"{med(0, 'jobs_per_s'):.0f}",
                f"{med(1, 'jobs_per_s'):.0f}",
                f"{ratio:.2f}",
                f">={TARGET:.1f}",
                " ".join(f"{ex['jobs_per_s'] / base['jobs_per_s']:.2f}" for base, ex in pairs),
                f"{med(0, 'jobs_per_s_process'):.0f} / {med(1, 'jobs_per_s_process'):.0f} = {ratio_old:.2f}",
                f"{med(0, 'cpu_us'):.0f} / {med(1, 'cpu_us'):.0f}",
                f"{med(0, 'redis_cpu_us'):.0f} / {med(1, 'redis_cpu_us'):.0f}",
                f"{med(0, 'cmds_per_job'):.1f} / {med(1, 'cmds_per_job'):.1f}",
                " ".join(f"{ex['delivered']}/{ex['distinct']}" for _, ex in pairs),
                " ".join(f"{ex['rss_start_mb']:.0f}->{ex['rss_end_mb']:.0f}" for _, ex in pairs),
                verdict(ok),
            ]
        )
    print()
    print(
        table(
            rows,
            [
                "procs",
                "arq no-op jobs/s",
                "examhook events/s",
                "ratio",
                "target",
                "ratio per round",
                "old: ready->exit arq/examhook per s",
                "worker CPU us per job/event (arq/examhook)",
                "redis CPU us per job/event",
                "redis cmds per job/event",
                "delivered/distinct",
                "worker RSS MB",
                "result",
            ],
        )
    )
    if args.profile:
        with Stack("drain-profile") as holder:
            raw = Path(args.profile_out) if args.profile_out else holder.dir / "worker.raw"
            print("\nprofiling one examhook worker draining the queue with py-spy ...", flush=True)
            run_case("examhook", 1, args, profile_to=raw)
            print(profile_summary(raw, focus=("worker/", "shared/")))
    print(
        "(rates: arq no-op jobs run, or examhook events delivered, / (last - first), as the destination"
        " saw the deliveries and the workers the no-op jobs; medians over the rounds; ratio = examhook"
        " over the arq run just before it, median over rounds; old column: / (last worker exit - first"
        " worker ready). examhook carries up to shared.contract.MAX_EVENTS_PER_JOB events per fan-out"
        " job, as the receiver writes them; CPU us = worker processes' CPU time while draining / jobs"
        " or events, robust to machine noise)"
    )
    print(f"\noverall: {'PASS' if all(checks) else 'FAIL'} (target: examhook >= {TARGET:.1f}x arq no-op)")
    return 0 if all(checks) else 1


if __name__ == "__main__":
    try:
        sys.exit(main())
    except KeyboardInterrupt:
        print("interrupted; all processes stopped", file=sys.stderr)
        sys.exit(130)
