#!/usr/bin/env python3
"""The fault matrix by hand: every integration type under every fault, with longer runs.

The same harness as ``tests/test_fault_matrix.py`` (``tests/fault_matrix.py``):

    python scripts/fault_matrix.py                              # every fault, as in the suite
    python scripts/fault_matrix.py --events 1000 --duration 30  # longer bursts
    python scripts/fault_matrix.py --fault worker-sigkill --fault redis-sigkill --seed 3

Exit code 0 when, for every fault, every accepted event reached every integration exactly
once (http: repeats only after unknown outcomes); 1 otherwise (the summaries say what).
"""

from __future__ import annotations

import argparse
import asyncio
import dataclasses
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from tests.fault_matrix import SCENARIOS, MatrixReport, run_matrix


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--fault", action="append", choices=list(SCENARIOS), help="one fault (repeatable)")
    parser.add_argument("--events", type=int, default=None, help="events per fault (default 60)")
    parser.add_argument("--duration", type=float, default=None, help="seconds the burst is spread over")
    parser.add_argument("--seed", type=int, default=1, help="the destinations' random answers")
    parser.add_argument("--workdir", type=Path, default=None, help="keep logs and data here")
    return parser.parse_args(argv)


async def main(args: argparse.Namespace) -> int:
    reports: list[MatrixReport] = []
    for fault in args.fault or list(SCENARIOS):
        scenario = dataclasses.replace(SCENARIOS[fault], seed=args.seed)
        if args.events is not None:
            scenario = dataclasses.replace(scenario, events=args.events, settle_timeout=60 + args.events / 10)
        if args.duration is not None:
            scenario = dataclasses.replace(scenario, duration=args.duration)
        if args.workdir is not None:
            scenario = dataclasses.replace(scenario, workdir=args.workdir / fault)
        report = await run_matrix(scenario)
        print(report.summary(), flush=True)
        reports.append(report)
    failed = [r.scenario.fault for r in reports if r.problems or r.accepted != r.scenario.events]
    print(
        f"\n{len(reports) - len(failed)} of {len(reports)} faults clean"
        + (f"; problems: {failed}" if failed else "")
    )
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(asyncio.run(main(parse_args())))
