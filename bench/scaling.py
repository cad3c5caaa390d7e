"""Multi-core receiver: `examhook receive --processes N` (SO_REUSEPORT), N = 1 then 2.

    /work/venv/bin/python bench/scaling.py [--duration 5] [--rounds 2]

Each run gets a fresh Redis (AOF, appendfsync everysec) and the real CLI; wrk (64
connections, unique events) measures req/s. Prints req/s per process count and the
scaling ratio (2 processes / 1 process) of the same run. On a 2-core machine the load
generator and Redis share the cores, so ideal scaling is well below 2x.
"""

from __future__ import annotations

import argparse
import shutil
import statistics
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from _common import (
    PY,
    Stack,
    free_port,
    http_ok,
    install_signal_handlers,
    machine,
    sample_body_file,
    table,
    wait_for,
)
from receiver import run_wrk


def measure(processes: int, args: argparse.Namespace) -> dict[str, float]:
    with Stack(f"scaling{processes}") as stack:
        redis = stack.redis(appendfsync="everysec", server=args.redis_server)
        port = free_port()
        config = stack.dir / "examhook.toml"
        config.write_text(
            f'log_level = "info"\n[redis]\nurl = "{redis.url}"\n'
            '[receiver]\nbasic_auth_user = "synap"\nbasic_auth_password = "s3cret"\n'
        )
        proc = stack.spawn(
            "receiver",
            [PY, "-m", "cli.main", "receive", "--port", str(port), "--processes", str(processes)],
            env={"EXAMHOOK_CONFIG": str(config)},
        )
        wait_for(lambda: http_ok(f"http://127.0.0.1:{port}/healthz"), 30, f"no start:\n{proc.tail()}")
        run_wrk(port, args.warmup, "wu", args)
        result = run_wrk(port, args.duration, f"p{processes}", args)
        return {"rps": result["rps"], "p99_ms": result["p99_us"] / 1000, "errors": result["errors"]}


def main() -> int:
    install_signal_handlers()
    formatter = argparse.RawDescriptionHelpFormatter
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=formatter)
    parser.add_argument("--duration", type=float, default=5.0)
    parser.add_argument("--warmup", type=float, default=1.0)
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--connections", type=int, default=64)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--wrk", default=shutil.which("wrk") or "wrk")
    parser.add_argument("--redis-server", default=None)
    parser.add_argument("--pretty", action="store_true", help="post the indented 5,726-byte sample")
    args = parser.parse_args()
    args.body_file = sample_body_file(args.pretty)
    print(f"# receiver scaling | {machine()}")
    runs: dict[int, list[dict[str, float]]] = {1: [], 2: []}
    for _ in range(args.rounds):
        for processes in (1, 2):
            runs[processes].append(measure(processes, args))
            print(f"  {processes} process(es): {runs[processes][-1]['rps']:.0f} req/s", flush=True)
    med = {n: statistics.median(r["rps"] for r in rs) for n, rs in runs.items()}
    p99 = {n: statistics.median(r["p99_ms"] for r in rs) for n, rs in runs.items()}
    rows = [[str(n), f"{med[n]:.0f}", f"{p99[n]:.1f}", f"{med[n] / med[1]:.2f}"] for n in (1, 2)]
    print(table(rows, ["processes", "req/s", "p99 ms", "vs 1 process"]))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
