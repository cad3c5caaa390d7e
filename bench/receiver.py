"""Receiver throughput, p50/p99 latency, RSS and Redis memory per event - vs a bare aiohttp app.

    /work/venv/bin/python bench/receiver.py            # ~1 minute
    /work/venv/bin/python bench/receiver.py --quick    # ~25 s
    /work/venv/bin/python bench/receiver.py --profile  # + py-spy profile of the examhook receiver

Variants (each with its own fresh Redis and data dir, AOF on):
  bare      aiohttp app that reads the body and answers 202 (the baseline; run first AND last)
  fastapi   FastAPI + pydantic + arq enqueue_job on uvicorn (bench/fastapi_app.py; appendfsync everysec)
  everysec  examhook receiver, Redis appendfsync everysec  (target: >= 70% of bare req/s, p99 <= 2x bare)
  always    examhook receiver, Redis appendfsync always    (target: >= 40% of bare req/s)
Load: wrk, 64 connections, POSTing the sample event as senders write it (compact JSON,
2,932 bytes; --pretty: the indented 5,726-byte shared/sample.json) with Basic auth and a unique attempt id
per request (bench/wrk_post.lua). Receiver RSS is sampled with psutil during the measured run.
"""

from __future__ import annotations

import argparse
import re
import shutil
import statistics
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))

import psutil
from _common import (
    AUTH_B64,
    BENCH,
    WEBHOOK_PATH,
    Stack,
    free_port,
    http_ok,
    install_signal_handlers,
    machine,
    parse_tagged_json,
    profile_summary,
    py_spy,
    sample_body_file,
    settings_dict,
    table,
    verdict,
    wait_for,
    write_settings,
)

TARGET_EVERYSEC_RPS = 0.70
TARGET_EVERYSEC_P99 = 2.0
TARGET_ALWAYS_RPS = 0.40
TARGET_RSS_MB = 80
TARGET_MEM_PER_EVENT = 2.0


class RssSampler(threading.Thread):
    def __init__(self, pid: int, interval: float = 0.1) -> None:
        super().__init__(daemon=True)
        self.proc = psutil.Process(pid)
        self.interval = interval
        self.samples: list[int] = []
        self._halt = threading.Event()

    def run(self) -> None:
        while not self._halt.is_set():
            try:
                self.samples.append(self.proc.memory_info().rss)
            except psutil.Error:
                return
            self._halt.wait(self.interval)

    def stop(self) -> tuple[float, float]:
        self._halt.set()
        self.join()
        mb = [s / 2**20 for s in self.samples] or [0.0]
        return max(mb), mb[-1]


def _cpu(pid: int) -> float:
    t = psutil.Process(pid).cpu_times()
    return t.user + t.system


def _accepted(redis: Any) -> int:
    """Events accepted so far (the queue holds fan-out jobs of several events each)."""
    return int(redis.cmd("HGET", "examhook:stats", "accepted") or 0)


def _batch_mean(port: int) -> float:
    import urllib.request

    text = urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5).read().decode()
    values = dict(re.findall(r"^examhook_receiver_batch_events_(sum|count) ([0-9.e+]+)$", text, re.M))
    return float(values.get("sum", 0)) / max(1.0, float(values.get("count", 0)))


def run_wrk(port: int, seconds: float, tag: str, args: argparse.Namespace) -> dict[str, Any]:
    cmd = [
        args.wrk,
        f"-t{args.threads}",
        f"-c{args.connections}",
        f"-d{max(1, round(seconds))}s",
        "--timeout",
        "10s",
        "-s",
        str(BENCH / "wrk_post.lua"),
        f"http://127.0.0.1:{port}{WEBHOOK_PATH}",
        "--",
        str(args.body_file),
        tag,
        AUTH_B64,
    ]
    out = subprocess.run(cmd, capture_output=True, text=True, timeout=seconds + 60)
    found = parse_tagged_json(out.stdout, "WRKJSON ")
    if not found:
        raise RuntimeError(f"wrk failed: {out.stdout}\n{out.stderr}")
    r = found[0]
    r["rps"] = r["requests"] / (r["duration_us"] / 1e6)
    r["errors"] = r["err_connect"] + r["err_read"] + r["err_write"] + r["err_timeout"]
    return r


def start_variant(stack: Stack, variant: str, port: int, args: argparse.Namespace) -> tuple[Any, Any]:
    """Start what the variant needs; returns (receiver proc, redis or None)."""
    if variant == "bare":
        proc = stack.python("receiver", "run_receiver.py", "--kind", "bare", "--port", str(port))
        return proc, None
    fsync = "always" if variant.startswith("always") else "everysec"
    redis = stack.redis(appendfsync=fsync, server=args.redis_server)
    if variant == "fastapi":
        proc = stack.python(
            "receiver", "fastapi_app.py", "--port", str(port), env={"BENCH_REDIS_URL": redis.url}
        )
    else:
        # extra diagnostic variants: "-warn" = log_level warning (no per-request log line),
        # "-buflog" = PROTOTYPE buffered log output (bench/_common.py:buffer_log_output)
        level = "warning" if variant.endswith("-warn") else args.log_level
        settings = write_settings(stack, settings_dict(redis.url, log_level=level))
        extra = ["--buffered-logs"] if variant.endswith("-buflog") else []
        proc = stack.python(
            "receiver",
            "run_receiver.py",
            "--kind",
            "examhook",
            "--settings",
            str(settings),
            "--port",
            str(port),
            *extra,
        )
    return proc, redis


def measure(variant: str, args: argparse.Namespace, profile_to: Path | None = None) -> dict[str, Any]:
    with Stack(variant) as stack:
        port = free_port()
        proc, redis = start_variant(stack, variant, port, args)
        wait_for(
            lambda: http_ok(f"http://127.0.0.1:{port}/healthz") or proc.popen.poll() is not None,
            30,
            "no start",
        )
        if proc.popen.poll() is not None:
            raise RuntimeError(f"{variant} receiver died:\n{proc.tail()}")
        run_wrk(port, args.warmup, "wu", args)
        mem0 = int(redis.info()["used_memory"]) if redis else 0
        q0 = _accepted(redis) if redis else 0
        spy = None
        if profile_to is not None:
            spy = stack.spawn(
                "py-spy",
                [
                    py_spy() or "py-spy",
                    "record",
                    "--pid",
                    str(proc.pid),
                    "-d",
                    str(int(args.duration)),
                    "-r",
                    "250",
                    "-f",
                    "raw",
                    "-o",
                    str(profile_to),
                ],
            )
            time.sleep(0.5)
        sampler = RssSampler(proc.pid)
        cpu0 = _cpu(proc.pid), _cpu(redis.proc.pid) if redis else 0.0
        sampler.start()
        result = run_wrk(port, args.duration, "ms", args)
        result["rss_max_mb"], result["rss_end_mb"] = sampler.stop()
        n = max(1, result["requests"])
        result["cpu_us"] = (_cpu(proc.pid) - cpu0[0]) / n * 1e6
        result["redis_cpu_us"] = (_cpu(redis.proc.pid) - cpu0[1]) / n * 1e6 if redis else 0.0
        if variant.startswith(("everysec", "always")):
            result["batch_mean"] = _batch_mean(port)
        if spy is not None:
            spy.popen.wait(args.duration + 30)
        if redis is not None:
            time.sleep(0.3)  # let the last in-flight requests land
            info = redis.info()
            result["used_memory_delta"] = int(info["used_memory"]) - mem0
            if variant != "fastapi":
                result["queued"] = _accepted(redis) - q0
        if proc.popen.poll() is not None:
            raise RuntimeError(f"{variant} receiver died during the run:\n{proc.tail()}")
        return result


def main() -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--duration", type=float, default=5.0, help="measured seconds per variant and round")
    parser.add_argument("--warmup", type=float, default=1.0)
    parser.add_argument("--rounds", type=int, default=3, help="interleaved rounds; medians are reported")
    parser.add_argument("--quick", action="store_true", help="1 round of 3 s")
    parser.add_argument("--connections", type=int, default=64)
    parser.add_argument("--threads", type=int, default=1, help="wrk threads (the machine has few cores)")
    parser.add_argument(
        "--variants",
        default="fastapi,everysec,always",
        help="comma list of: fastapi, everysec, always; diagnostics: everysec-warn, everysec-buflog",
    )
    parser.add_argument("--log-level", default="info", help="examhook log_level (product default: info)")
    parser.add_argument(
        "--profile", action="store_true", help="also profile the everysec receiver with py-spy"
    )
    parser.add_argument("--profile-out", default=None, help="keep the raw py-spy profile at this path")
    parser.add_argument("--wrk", default=shutil.which("wrk") or "wrk")
    parser.add_argument("--redis-server", default=None, help="redis-server or valkey-server binary")
    parser.add_argument(
        "--pretty", action="store_true", help="post the indented 5,726-byte sample (as on 2026-11-27)"
    )
    args = parser.parse_args()
    args.body_file = sample_body_file(args.pretty)
    if args.quick:
        args.duration, args.warmup, args.rounds = 3.0, 1.0, 1
    if not shutil.which(args.wrk):
        print("wrk not found: apt-get install wrk", file=sys.stderr)
        return 2
    install_signal_handlers()
    body_size = args.body_file.stat().st_size
    print(f"# receiver benchmark | {machine()}")
    print(
        f"# wrk -t{args.threads} -c{args.connections}, {args.duration:g}s measured"
        f" after {args.warmup:g}s warmup,"
        f" {args.rounds} interleaved round(s) (bare baseline before and after every variant);"
        f" body {body_size} bytes; examhook log_level={args.log_level}"
    )
    variants = [v for v in args.variants.split(",") if v and v != "bare"]
    runs: dict[str, list[dict[str, Any]]] = {v: [] for v in ["bare", *variants]}
    ratios: dict[str, list[tuple[float, float]]] = {v: [] for v in variants}
    last_bare = measure("bare", args)
    runs["bare"].append(last_bare)
    for rnd in range(args.rounds):
        for variant in variants:
            print(f"  round {rnd + 1}: {variant} ...", flush=True)
            r = measure(variant, args)
            bare = measure("bare", args)
            runs[variant].append(r)
            runs["bare"].append(bare)
            # each run is compared with the bare runs just before and after it
            b_rps = (last_bare["rps"] + bare["rps"]) / 2
            b_p99 = (last_bare["p99_us"] + bare["p99_us"]) / 2
            ratios[variant].append((r["rps"] / b_rps, r["p99_us"] / b_p99))
            last_bare = bare
            print(
                f"    {variant}: {r['rps']:.0f} req/s p99 {r['p99_us'] / 1000:.1f} ms;"
                f" bare {bare['rps']:.0f} req/s p99 {bare['p99_us'] / 1000:.1f} ms",
                flush=True,
            )

    def med(variant: str, key: str) -> float:
        return statistics.median(r[key] for r in runs[variant])

    print()
    rows = [
        [
            "bare aiohttp (baseline)",
            f"{med('bare', 'rps'):.0f}",
            f"{med('bare', 'p50_us') / 1000:.2f}",
            f"{med('bare', 'p99_us') / 1000:.2f}",
            "1.00",
            "1.00",
            str(sum(r["err_status"] + r["errors"] for r in runs["bare"])),
            f"{med('bare', 'cpu_us'):.0f}",
            "-",
            f"{max(r['rss_max_mb'] for r in runs['bare']):.1f}",
            "-",
            "-",
        ]
    ]
    checks: list[tuple[str, bool]] = []
    names = {
        "fastapi": "fastapi+pydantic+arq (everysec)",
        "everysec": "examhook (everysec)",
        "always": "examhook (always)",
        "everysec-warn": "examhook (everysec, log_level=warning)",
        "everysec-buflog": "examhook (everysec, PROTOTYPE buffered logs)",
    }
    for variant in variants:
        ratio = statistics.median(x[0] for x in ratios[variant])
        p99r = statistics.median(x[1] for x in ratios[variant])
        target, ok = "-", None
        if variant == "everysec":
            ok = ratio >= TARGET_EVERYSEC_RPS and p99r <= TARGET_EVERYSEC_P99
            target = f">={TARGET_EVERYSEC_RPS:.0%} rps, p99<={TARGET_EVERYSEC_P99:g}x"
        elif variant == "always":
            ok = ratio >= TARGET_ALWAYS_RPS
            target = f">={TARGET_ALWAYS_RPS:.0%} rps"
        if ok is not None:
            checks.append((f"{variant} throughput/latency", ok))
        rows.append(
            [
                names.get(variant, variant),
                f"{med(variant, 'rps'):.0f}",
                f"{med(variant, 'p50_us') / 1000:.2f}",
                f"{med(variant, 'p99_us') / 1000:.2f}",
                f"{ratio:.2f}",
                f"{p99r:.2f}",
                str(sum(r["err_status"] + r["errors"] for r in runs[variant])),
                f"{med(variant, 'cpu_us'):.0f}",
                f"{med(variant, 'redis_cpu_us'):.0f}",
                f"{max(r['rss_max_mb'] for r in runs[variant]):.1f}",
                target,
                verdict(ok),
            ]
        )
    print(
        table(
            rows,
            [
                "variant",
                "req/s",
                "p50 ms",
                "p99 ms",
                "rps ratio",
                "p99 ratio",
                "non-2xx/err",
                "CPU us/req",
                "redis CPU us/req",
                "RSS max MB",
                "target",
                "result",
            ],
        )
    )
    print(
        "(medians over rounds; ratios are against the bare runs just before and after each run;"
        " CPU us/req = receiver process CPU time / requests, robust to machine noise)"
    )
    print()
    for variant in ("everysec", "always"):
        if variant not in runs or not runs[variant]:
            continue
        rss = max(r["rss_max_mb"] for r in runs[variant])
        rss_ok = rss <= TARGET_RSS_MB
        checks.append((f"{variant} RSS", rss_ok))
        per_event = statistics.median(r["used_memory_delta"] / max(1, r["queued"]) for r in runs[variant])
        mem_ok = per_event <= TARGET_MEM_PER_EVENT * body_size
        checks.append((f"{variant} redis memory/event", mem_ok))
        print(
            f"examhook ({variant}): receiver RSS under load max {rss:.1f} MB (target <= {TARGET_RSS_MB})"
            f" {verdict(rss_ok)}; Redis used_memory delta / queued events = {per_event:.0f} B/event ="
            f" {per_event / body_size:.2f}x body (target <= {TARGET_MEM_PER_EVENT:g}x) {verdict(mem_ok)};"
            f" mean group-commit batch {med(variant, 'batch_mean'):.1f} events"
        )
    if runs.get("fastapi") and runs.get("everysec"):
        print(
            "examhook (everysec) vs fastapi+pydantic+arq: "
            f"{med('everysec', 'rps') / med('fastapi', 'rps'):.2f}x req/s"
        )
    if args.profile:
        out = Path(args.profile_out) if args.profile_out else None
        with Stack("profile") as holder:
            raw = out or holder.dir / "receiver.raw"
            print("\nprofiling examhook (everysec) under the same load with py-spy ...", flush=True)
            measure("everysec", args, profile_to=raw)
            print(profile_summary(raw, focus=("ingest/", "shared/")))
    failed = [name for name, ok in checks if not ok]
    print(f"\noverall: {'PASS' if not failed else 'FAIL: ' + ', '.join(failed)}")
    return 0 if not failed else 1


if __name__ == "__main__":
    try:
        sys.exit(main())
    except KeyboardInterrupt:
        print("interrupted; all processes stopped", file=sys.stderr)
        sys.exit(130)
