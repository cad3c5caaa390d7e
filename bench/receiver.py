"""The receiver against the reference receivers of ../shared/bench/, side by side in one run.

    python bench/receiver.py              # 3 interleaved rounds, ~5 min
    python bench/receiver.py --quick      # 1 round of 3 s, ~1 min
    python bench/receiver.py --profile    # + a py-spy profile of `examhook receive`

Variants, each on a fresh redis-server with AOF (its own port and data dir):
  limit          ../shared/bench/group_commit.py, the design's limit (msgspec decode of the fields
                 it needs, one pipelined SET NX + LPUSH per event, each answered after its write)
  examhook       `examhook receive` (the real CLI) with Basic auth, as deployed
  limit-always,  the same two with `appendfsync always`
  examhook-always
  fastapi        ../shared/bench/fastapi_arq.py: FastAPI + pydantic + arq enqueue_job on uvicorn
  bare           ../shared/bench/bare_aiohttp.py: reads the body, writes nothing (reported only)
Targets (ratios within one round, medians over the rounds): examhook >= 0.85x the limit's req/s
and p99 <= 1.5x the limit's; always >= 0.85x limit-always; >= 5x FastAPI; receiver RSS <= 80 MB.

Load: wrk -t1 -c64, POSTing the sample event as senders write it (compact JSON, 2,932 bytes) with a
unique attempt id per request, unique across warm-up and measured runs (bench/wrk_post.lua: a
run tag + a counter), so no request is a duplicate.
"""

from __future__ import annotations

import argparse
import shutil
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))

import psutil
from _common import (
    AUTH_B64,
    BENCH,
    PASSWORD,
    ROOT,
    USER,
    WEBHOOK_PATH,
    Stack,
    free_port,
    install_signal_handlers,
    machine,
    parse_tagged_json,
    profile_summary,
    py_spy,
    sample_body_file,
    table,
    verdict,
    wait_for,
)

REFERENCES = ROOT.parent / "shared" / "bench"
TARGET_LIMIT = 0.85
TARGET_P99 = 1.5
TARGET_FASTAPI = 5.0
TARGET_RSS_MB = 80
ORDER = ["limit", "examhook", "limit-always", "examhook-always", "fastapi", "bare"]


class RssSampler(threading.Thread):
    def __init__(self, pid: int, interval: float = 0.1) -> None:
        super().__init__(daemon=True)
        self.process = psutil.Process(pid)
        self.interval = interval
        self.peak = 0.0
        self._halt = threading.Event()

    def run(self) -> None:
        while not self._halt.is_set():
            try:
                self.peak = max(self.peak, self.process.memory_info().rss / 2**20)
            except psutil.Error:
                return
            self._halt.wait(self.interval)

    def stop(self) -> float:
        self._halt.set()
        self.join(2)
        return self.peak


def _cpu(pid: int) -> float:
    times = psutil.Process(pid).cpu_times()
    return float(times.user + times.system)


def _sys(pid: int) -> float:
    return float(psutil.Process(pid).cpu_times().system)


def _listening(port: int) -> bool:
    try:
        socket.create_connection(("127.0.0.1", port), timeout=0.5).close()
        return True
    except OSError:
        return False


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
    r["errors"] = r["err_connect"] + r["err_read"] + r["err_write"] + r["err_timeout"] + r["err_status"]
    return r


def start(stack: Stack, variant: str, port: int, args: argparse.Namespace) -> tuple[Any, Any]:
    """Start what the variant needs; (receiver process, redis or None)."""
    python = sys.executable
    if variant == "bare":
        return stack.spawn("receiver", [python, str(REFERENCES / "bare_aiohttp.py"), str(port)]), None
    fsync = "always" if variant.endswith("always") else "everysec"
    redis = stack.redis(appendfsync=fsync, server=args.redis_server)
    if variant.startswith("limit"):
        script = REFERENCES / "group_commit.py"
        return stack.spawn("receiver", [python, str(script), str(port), str(redis.port)]), redis
    if variant == "fastapi":
        script = REFERENCES / "fastapi_arq.py"
        return stack.spawn("receiver", [python, str(script), str(port), str(redis.port)]), redis
    config = stack.dir / "examhook.toml"
    config.write_text(
        f'log_level = "{args.log_level}"\n[redis]\nurl = "{redis.url}"\n'
        f'[receiver]\nbasic_auth_user = "{USER}"\nbasic_auth_password = "{PASSWORD}"\n'
    )
    command = [python, "-m", "cli.main", "receive", "--host", "127.0.0.1", "--port", str(port)]
    env = {"EXAMHOOK_CONFIG": str(config), "EXAMHOOK_REDIS_URL": "", "EXAMHOOK_BASIC_AUTH_USER": ""}
    return stack.spawn("receiver", command, env=env), redis


def measure(
    variant: str, rnd: int, args: argparse.Namespace, profile_to: Path | None = None
) -> dict[str, Any]:
    with Stack(variant) as stack:
        port = free_port()
        proc, redis = start(stack, variant, port, args)
        wait_for(lambda: _listening(port) or proc.popen.poll() is not None, 60, f"{variant}: no start")
        if proc.popen.poll() is not None:
            raise RuntimeError(f"{variant} receiver died:\n{proc.tail()}")
        run_wrk(port, args.warmup, f"w{rnd % 10}", args)
        spy = None
        if profile_to is not None:
            cmd = [py_spy() or "py-spy", "record", "--pid", str(proc.pid), "-d", str(int(args.duration))]
            if args.native:
                cmd.append("--native")
            spy = stack.spawn("py-spy", [*cmd, "-r", "250", "-f", "raw", "-o", str(profile_to)])
            time.sleep(0.5)
        sampler = RssSampler(proc.pid)
        cpu0 = (_cpu(proc.pid), _cpu(redis.proc.pid) if redis else 0.0, _sys(proc.pid))
        sampler.start()
        result = run_wrk(port, args.duration, f"m{rnd % 10}", args)
        result["rss_max_mb"] = sampler.stop()
        n = max(1, result["requests"])
        result["cpu_us"] = (_cpu(proc.pid) - cpu0[0]) / n * 1e6
        result["sys_us"] = (_sys(proc.pid) - cpu0[2]) / n * 1e6
        result["redis_cpu_us"] = (_cpu(redis.proc.pid) - cpu0[1]) / n * 1e6 if redis else 0.0
        if spy is not None:
            spy.popen.wait(args.duration + 30)
        if proc.popen.poll() is not None:
            raise RuntimeError(f"{variant} receiver died during the run:\n{proc.tail()}")
        return result


def main() -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--duration", type=float, default=8.0, help="measured seconds per variant and round")
    parser.add_argument("--warmup", type=float, default=2.0)
    parser.add_argument("--rounds", type=int, default=3, help="interleaved rounds; medians are reported")
    parser.add_argument("--quick", action="store_true", help="1 round of 3 s")
    parser.add_argument("--connections", type=int, default=64)
    parser.add_argument("--threads", type=int, default=1, help="wrk threads (the machine has few cores)")
    parser.add_argument("--variants", default=",".join(ORDER), help=f"comma list of: {', '.join(ORDER)}")
    parser.add_argument("--log-level", default="info", help="examhook log_level (product default: info)")
    parser.add_argument("--profile", action="store_true", help="also profile one variant with py-spy")
    parser.add_argument("--profile-variant", default="examhook", help="the variant --profile profiles")
    parser.add_argument("--profile-out", default=None, help="keep the raw py-spy profile at this path")
    parser.add_argument("--native", action="store_true", help="profile C frames too (py-spy --native)")
    parser.add_argument("--wrk", default=shutil.which("wrk") or "wrk")
    parser.add_argument("--redis-server", default=None, help="redis-server or valkey-server binary")
    args = parser.parse_args()
    args.body_file = sample_body_file(False)
    if args.quick:
        args.duration, args.warmup, args.rounds = 3.0, 1.0, 1
    if not shutil.which(args.wrk):
        print("wrk not found: apt-get install wrk", file=sys.stderr)
        return 2
    install_signal_handlers()
    variants = [v for v in ORDER if v in args.variants.split(",")]
    print(f"# receiver benchmark | {machine()}")
    print(
        f"# wrk -t{args.threads} -c{args.connections}, {args.duration:g}s measured after {args.warmup:g}s"
        f" warm-up, {args.rounds} interleaved round(s); body {args.body_file.stat().st_size} bytes;"
        f" examhook log_level={args.log_level}; references from {REFERENCES}"
    )
    runs: dict[str, list[dict[str, Any]]] = {v: [] for v in variants}
    for rnd in range(args.rounds):
        line = []
        for variant in variants:
            r = measure(variant, rnd, args)
            runs[variant].append(r)
            line.append(f"{variant} {r['rps']:.0f} req/s p99 {r['p99_us'] / 1000:.1f} ms")
        print(f"  round {rnd + 1}: " + "; ".join(line), flush=True)

    def ratios(a: str, b: str, key: str = "rps") -> list[float]:
        if a not in runs or b not in runs:
            return []
        return [x[key] / y[key] for x, y in zip(runs[a], runs[b], strict=True)]

    def med(variant: str, key: str) -> float:
        return statistics.median(r[key] for r in runs[variant])

    print()
    rows = [
        [
            variant,
            f"{med(variant, 'rps'):.0f}",
            f"{med(variant, 'p50_us') / 1000:.2f}",
            f"{med(variant, 'p99_us') / 1000:.2f}",
            f"{med(variant, 'cpu_us'):.0f} ({med(variant, 'sys_us'):.0f} sys)",
            f"{med(variant, 'redis_cpu_us'):.0f}",
            f"{max(r['rss_max_mb'] for r in runs[variant]):.1f}",
            str(sum(r["errors"] for r in runs[variant])),
        ]
        for variant in variants
    ]
    header = ["variant", "req/s", "p50 ms", "p99 ms", "CPU µs/req", "redis µs/req", "RSS MB", "errors"]
    print(table(rows, header))
    print()
    checks: list[tuple[str, float, str, bool | None]] = []

    def check(name: str, values: list[float], target: float | None, higher: bool = True) -> None:
        if not values:
            return
        value = statistics.median(values)
        rounds = ", ".join(f"{v:.2f}" for v in values)
        if target is None:
            checks.append((name, value, f"(rounds: {rounds})", None))
            return
        ok = value >= target if higher else value <= target
        checks.append((name, value, f"{'>=' if higher else '<='} {target:g} (rounds: {rounds})", ok))

    check("examhook / limit, req/s", ratios("examhook", "limit"), TARGET_LIMIT)
    check("examhook / limit, p99", ratios("examhook", "limit", "p99_us"), TARGET_P99, higher=False)
    always = ratios("examhook-always", "limit-always")
    check("examhook / limit, req/s, appendfsync always", always, TARGET_LIMIT)
    check("examhook / FastAPI+pydantic+arq, req/s", ratios("examhook", "fastapi"), TARGET_FASTAPI)
    check("examhook / bare aiohttp, req/s (reported)", ratios("examhook", "bare"), None)
    if "examhook" in runs:
        rss = max(r["rss_max_mb"] for r in runs["examhook"])
        checks.append(("examhook receiver RSS, MB", rss, f"<= {TARGET_RSS_MB}", rss <= TARGET_RSS_MB))
    rows = [[name, f"{value:.2f}", target, verdict(ok)] for name, value, target, ok in checks]
    print(table(rows, ["ratio", "median", "target", ""]))
    if args.profile:
        out = Path(args.profile_out or Path(tempfile.mkdtemp(prefix="examhook-bench-")) / "receiver.raw")
        measure(args.profile_variant, 9, args, profile_to=out)
        print()
        print(f"# py-spy profile of {args.profile_variant} ({out})")
        print(profile_summary(out))
    return 0 if all(ok is not False for *_, ok in checks) else 1


if __name__ == "__main__":
    sys.exit(main())
