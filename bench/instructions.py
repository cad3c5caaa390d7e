"""Instructions per request of a receiver and of its redis-server, counted by valgrind.

    python bench/instructions.py                      # examhook and the design's limit
    python bench/instructions.py --variants examhook --requests 3000

Wall-clock ratios on a shared 2-core machine swing by 2x between runs; instruction counts
(valgrind --tool=callgrind) are the same every time for the same code and input. Each variant
runs under callgrind with counting off; after a warm-up, counting is switched on for
``--requests`` POSTs of distinct events (64 at once, from this process), then off, and the
totals are read: the receiver's and redis-server's instructions per request. A steady signal
for deciding which change helps; bench/receiver.py gives the real req/s ratios.
"""

from __future__ import annotations

import argparse
import asyncio
import re
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))

import aiohttp
from _common import (
    AUTH_B64,
    PASSWORD,
    ROOT,
    USER,
    WEBHOOK_PATH,
    Stack,
    body_with_attempt,
    free_port,
    sample_body,
    table,
    wait_for,
)

REFERENCES = ROOT.parent / "shared" / "bench"


async def post_all(port: int, bodies: list[bytes], concurrency: int = 64) -> int:
    headers = {"Authorization": "Basic " + AUTH_B64, "Content-Type": "application/json"}
    url = f"http://127.0.0.1:{port}{WEBHOOK_PATH}"
    ok = 0
    queue = list(reversed(bodies))
    async with aiohttp.ClientSession() as session:

        async def lane() -> None:
            nonlocal ok
            while queue:
                body = queue.pop()
                async with session.post(url, data=body, headers=headers) as response:
                    await response.read()
                    ok += response.status < 300

        await asyncio.gather(*(lane() for _ in range(concurrency)))
    return ok


def callgrind(out: Path) -> list[str]:
    return ["valgrind", "--tool=callgrind", "--instr-atstart=no", f"--callgrind-out-file={out}"]


def control(pid: int, *args: str) -> None:
    subprocess.run(["callgrind_control", *args, str(pid)], check=True, capture_output=True, timeout=120)


def total_instructions(path: Path) -> int:
    """The summed ``Ir`` of every dump callgrind wrote for one process."""
    total = 0
    for part in sorted(path.parent.glob(path.name + "*")):
        for line in part.read_text(errors="replace").splitlines():
            match = re.match(r"totals: (\d+)", line)
            if match:
                total += int(match.group(1))
    return total


def measure(variant: str, args: argparse.Namespace, tag: str) -> dict[str, Any]:
    template = sample_body()
    bodies = [body_with_attempt(template, tag, i) for i in range(args.warmup + args.requests)]
    with Stack(f"instr-{variant}") as stack:
        redis_out, receiver_out = stack.dir / "redis.cg", stack.dir / "receiver.cg"
        redis = stack.redis(server=args.redis_server, wrapper=callgrind(redis_out))
        port = free_port()
        if variant == "limit":
            command = [sys.executable, str(REFERENCES / "group_commit.py"), str(port), str(redis.port)]
            env: dict[str, str] = {}
        else:
            config = stack.dir / "examhook.toml"
            config.write_text(
                f'[redis]\nurl = "{redis.url}"\n'
                f'[receiver]\nbasic_auth_user = "{USER}"\nbasic_auth_password = "{PASSWORD}"\n'
            )
            command = [
                sys.executable,
                "-m",
                "cli.main",
                "receive",
                "--host",
                "127.0.0.1",
                "--port",
                str(port),
            ]
            env = {"EXAMHOOK_CONFIG": str(config), "EXAMHOOK_REDIS_URL": "", "EXAMHOOK_BASIC_AUTH_USER": ""}
        proc = stack.spawn("receiver", [*callgrind(receiver_out), *command], env=env)
        wait_for(lambda: _listening(port) or proc.popen.poll() is not None, 300, f"{variant}: no start")
        asyncio.run(post_all(port, bodies[: args.warmup]))
        time.sleep(0.5)
        for pid in (proc.pid, redis.proc.pid):
            control(pid, "-i", "on")
        ok = asyncio.run(post_all(port, bodies[args.warmup :]))
        for pid in (proc.pid, redis.proc.pid):
            control(pid, "-i", "off")
            control(pid, "-d")
        time.sleep(0.5)
        return {
            "variant": variant,
            "ok": ok,
            "receiver": total_instructions(receiver_out) / args.requests,
            "redis": total_instructions(redis_out) / args.requests,
        }


def _listening(port: int) -> bool:
    import socket

    try:
        socket.create_connection(("127.0.0.1", port), timeout=0.5).close()
        return True
    except OSError:
        return False


def main() -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--variants", default="limit,examhook")
    parser.add_argument("--requests", type=int, default=2000)
    parser.add_argument("--warmup", type=int, default=300)
    parser.add_argument("--redis-server", default=None)
    args = parser.parse_args()
    rows = []
    results = {}
    for n, variant in enumerate(args.variants.split(",")):
        r = measure(variant, args, f"i{n}")
        results[variant] = r
        rows.append(
            [
                variant,
                str(r["ok"]),
                f"{r['receiver'] / 1000:.0f}k",
                f"{r['redis'] / 1000:.0f}k",
                f"{(r['receiver'] + r['redis']) / 1000:.0f}k",
            ]
        )
    print(table(rows, ["variant", "2xx", "receiver instr/req", "redis instr/req", "both"]))
    if "limit" in results and "examhook" in results:
        a, b = results["examhook"], results["limit"]
        both = (a["receiver"] + a["redis"]) / (b["receiver"] + b["redis"])
        print(
            f"examhook / limit: receiver {a['receiver'] / b['receiver']:.2f}x,"
            f" redis {a['redis'] / b['redis']:.2f}x, both {both:.2f}x the instructions"
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
