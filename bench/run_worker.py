"""Launch one worker process for the benchmarks (what ``examhook worker`` does).

    python bench/run_worker.py --kind examhook --settings S.json [--burst]
    python bench/run_worker.py --kind arq-noop --redis-url URL --queue Q [--burst]   # baseline

Both kinds use the same ``max_jobs`` and ``poll_delay``. The worker writes
``STATUS_FILE.ready`` (JSON: time, rss) once its startup finished, and on exit prints
``BENCHJSON {...}`` with the ready/end times, jobs completed and RSS (arq-noop: also the
wall-clock times the first and the last no-op job ran, ``first_job``/``last_job``).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import sys
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import psutil
from arq import func
from arq.connections import RedisSettings
from arq.worker import Worker

_proc = psutil.Process()
# wall-clock times of the first and the last no-op job run (the baseline's "deliveries")
_jobs: dict[str, float] = {}


async def noop(ctx: dict[str, Any], *args: Any) -> None:
    now = time.time()
    _jobs.setdefault("first_job", now)
    _jobs["last_job"] = now


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--kind", choices=["examhook", "arq-noop"], required=True)
    parser.add_argument("--settings")
    parser.add_argument("--redis-url")
    parser.add_argument("--queue", default="arq:queue")
    parser.add_argument("--burst", action="store_true")
    parser.add_argument("--max-jobs", type=int, default=50)
    parser.add_argument("--poll-delay", type=float, default=0.05)
    parser.add_argument("--status-file", required=True)
    parser.add_argument(
        "--buffered-logs", action="store_true", help="PROTOTYPE: buffer log output (see README)"
    )
    args = parser.parse_args()
    status = Path(args.status_file)
    marks: dict[str, Any] = {}

    async def mark_ready(ctx: dict[str, Any]) -> None:
        marks["ready"] = time.time()
        t = _proc.cpu_times()
        marks["cpu_ready"] = t.user + t.system
        marks["rss_start"] = _proc.memory_info().rss
        Path(str(status) + ".ready").write_text(json.dumps(marks))

    if args.kind == "examhook":
        from shared.logs import configure_logging
        from shared.settings import settings_from_dict
        from worker.main import worker_settings

        settings = settings_from_dict(json.loads(Path(args.settings).read_text()))
        configure_logging(settings.log_level)
        kwargs = worker_settings(
            settings, burst=args.burst, concurrency=args.max_jobs, poll_delay=args.poll_delay
        )
        product_startup = kwargs["on_startup"]

        flusher = None
        if args.buffered_logs:
            sys.path.insert(0, str(Path(__file__).resolve().parent))
            from _common import buffer_log_output

            flusher = buffer_log_output()

        async def on_startup(ctx: dict[str, Any]) -> None:
            if flusher is not None:
                ctx["_flusher"] = flusher()
                await ctx["_flusher"].__anext__()
            await product_startup(ctx)
            await mark_ready(ctx)

        kwargs["on_startup"] = on_startup
    else:
        # stock arq: default serializer (pickle), default keep_result; same max_jobs and poll_delay
        kwargs = {
            "functions": [func(noop, name="noop")],
            "redis_settings": RedisSettings.from_dsn(args.redis_url),
            "queue_name": args.queue,
            "max_jobs": args.max_jobs,
            "poll_delay": args.poll_delay,
            "burst": args.burst,
            "on_startup": mark_ready,
        }
    asyncio.set_event_loop(asyncio.new_event_loop())
    if args.kind == "examhook":
        from shared.process import tune_gc
        from worker.main import ExamhookWorker

        worker: Worker = ExamhookWorker(**kwargs)
        tune_gc()  # as `examhook worker` does
    else:
        worker = Worker(**kwargs)
    worker.run()
    marks["end"] = time.time()
    marks["rss_end"] = _proc.memory_info().rss
    t = _proc.cpu_times()
    marks["cpu_end"] = t.user + t.system
    marks["complete"] = worker.jobs_complete
    marks["failed"] = worker.jobs_failed
    marks["retried"] = worker.jobs_retried
    marks.update(_jobs)
    print("BENCHJSON " + json.dumps(marks), flush=True)
    status.write_text(json.dumps(marks))


if __name__ == "__main__":
    main()
