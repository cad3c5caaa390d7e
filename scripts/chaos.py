#!/usr/bin/env python3
"""Chaos run by hand: SIGKILL workers and Redis during a burst, then check nothing was lost.

The same harness as ``tests/test_chaos.py`` (``tests/chaos_harness.py``), with longer runs:

    python scripts/chaos.py --events 10000 --duration 120 --seed 7

Exit code 0 when every accepted event was delivered, the queue drained and no failure is
left; 1 otherwise (the summary says what went wrong and where the logs are).
"""

from __future__ import annotations

import argparse
import asyncio
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from tests.chaos_harness import ChaosOptions, run_chaos


def parse_args(argv: list[str] | None = None) -> ChaosOptions:
    defaults = ChaosOptions()
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--events", type=int, default=5000, help="distinct events to send (default 5000)")
    parser.add_argument(
        "--duration",
        type=float,
        default=60.0,
        help="seconds the sender spreads the burst over; the faults land in it (default 60)",
    )
    parser.add_argument("--seed", type=int, default=defaults.seed, help="destination's random answers")
    parser.add_argument("--concurrency", type=int, default=defaults.concurrency, help="sender connections")
    parser.add_argument("--fail-rate", type=float, default=defaults.fail_rate, help="share answered 5xx")
    parser.add_argument(
        "--hang-rate", type=float, default=defaults.hang_rate, help="share that hangs past the timeout"
    )
    parser.add_argument(
        "--redis-outage",
        type=float,
        default=defaults.redis_outage_seconds,
        help="seconds Redis stays down after its SIGKILL (default 1)",
    )
    parser.add_argument(
        "--fsync",
        choices=["everysec", "always"],
        default=defaults.fsync,
        help="Redis appendfsync (default everysec: a process SIGKILL loses nothing)",
    )
    parser.add_argument(
        "--settle-timeout",
        type=float,
        default=120.0,
        help="seconds allowed after the burst for everything to be delivered (default 120)",
    )
    parser.add_argument(
        "--workdir",
        type=Path,
        default=None,
        help="keep config, process logs and the AOF here (default: a temporary directory)",
    )
    args = parser.parse_args(argv)
    if args.events < 10 or args.duration <= 0:
        parser.error("--events must be at least 10 and --duration positive")
    return ChaosOptions(
        events=args.events,
        duration=args.duration,
        seed=args.seed,
        concurrency=args.concurrency,
        fail_rate=args.fail_rate,
        hang_rate=args.hang_rate,
        redis_outage_seconds=args.redis_outage,
        fsync=args.fsync,
        settle_timeout=args.settle_timeout,
        workdir=args.workdir,
    )


def main(argv: list[str] | None = None) -> int:
    report = asyncio.run(run_chaos(parse_args(argv)))
    print(report.summary())
    return 1 if report.problems else 0


if __name__ == "__main__":
    sys.exit(main())
