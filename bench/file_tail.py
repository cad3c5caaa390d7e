"""Timestamps for the ``file`` integration: follows the file as the workers append to it.

    python bench/file_tail.py --path results.jsonl --port 9002 [--interval 0.002]

Checks the file's size every ``--interval`` seconds (2 ms) and reads whatever complete lines
were appended; each line's ``event_id`` is stamped with the time it was seen (so within
about one interval of the append, the line's own ``delivered_at`` having only whole
seconds). Over HTTP:

GET /stats    {"total", "distinct", "first_at", "last_at"} (epoch seconds)
GET /times    {event id: epoch seconds the line was seen (first time)}
"""

from __future__ import annotations

import argparse
import asyncio
import os
import re
import time

from aiohttp import web

EVENT_ID = re.compile(rb'^\{"event_id":"([^"]+)"')


def _read(path: str, offset: int, size: int) -> bytes:
    with open(path, "rb") as file:
        file.seek(offset)
        return file.read(size - offset)


async def serve(args: argparse.Namespace) -> None:
    total = 0
    first_at = last_at = 0.0
    times: dict[str, float] = {}

    async def follow() -> None:
        nonlocal total, first_at, last_at
        offset, rest = 0, b""
        while True:
            await asyncio.sleep(args.interval)
            try:
                size = os.stat(args.path).st_size
            except FileNotFoundError:
                continue
            if size <= offset:
                continue
            chunk = _read(args.path, offset, size)
            now = time.time()
            offset += len(chunk)
            lines = (rest + chunk).split(b"\n")
            rest = lines.pop()
            for line in lines:
                found = EVENT_ID.match(line)
                if not found:
                    continue
                if not total:
                    first_at = now
                last_at = now
                total += 1
                times.setdefault(found.group(1).decode(), now)

    async def stats(request: web.Request) -> web.Response:
        return web.json_response(
            {"total": total, "distinct": len(times), "first_at": first_at, "last_at": last_at}
        )

    async def get_times(request: web.Request) -> web.Response:
        return web.json_response(times)

    app = web.Application()
    app.router.add_get("/stats", stats)
    app.router.add_get("/times", get_times)
    runner = web.AppRunner(app, access_log=None)
    await runner.setup()
    await web.TCPSite(runner, "127.0.0.1", args.port).start()
    await follow()


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--path", required=True)
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--interval", type=float, default=0.002)
    args = parser.parse_args()
    asyncio.run(serve(args))


if __name__ == "__main__":
    main()
