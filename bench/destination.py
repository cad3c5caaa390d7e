"""A local delivery destination: answers 200 at once and counts what it got.

python bench/destination.py --port 9000 [--record]
POST /hook     any body; counted by its Idempotency-Key header
GET  /stats    {"total", "distinct", "first_at", "last_at"} (epoch seconds)
GET  /times    with --record: {Idempotency-Key: epoch seconds the body was in (first time)}
"""

from __future__ import annotations

import argparse
import time

from aiohttp import web

total = 0
keys: set[str] = set()
first_at = 0.0
last_at = 0.0
record = False
times: dict[str, float] = {}


async def hook(request: web.Request) -> web.Response:
    global total, first_at, last_at
    await request.read()
    now = time.time()
    if not total:
        first_at = now
    last_at = now
    total += 1
    key = request.headers.get("Idempotency-Key", "")
    keys.add(key)
    if record:
        times.setdefault(key, now)
    return web.Response(text="ok")


async def stats(request: web.Request) -> web.Response:
    return web.json_response(
        {"total": total, "distinct": len(keys), "first_at": first_at, "last_at": last_at}
    )


async def get_times(request: web.Request) -> web.Response:
    return web.json_response(times)


def main() -> None:
    global record
    parser = argparse.ArgumentParser()
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--record", action="store_true", help="keep each event's arrival time (/times)")
    args = parser.parse_args()
    record = args.record
    app = web.Application()
    app.router.add_post("/hook", hook)
    app.router.add_get("/stats", stats)
    app.router.add_get("/times", get_times)
    web.run_app(app, host="127.0.0.1", port=args.port, access_log=None, print=None)


if __name__ == "__main__":
    main()
