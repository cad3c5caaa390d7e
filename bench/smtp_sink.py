"""A local SMTP server for the benchmarks (aiosmtpd, as tests/smtp_sink.py), in its own process.

    python bench/smtp_sink.py --port 2525 --stats-port 9001 [--delay 0.3]

Accepts every message; ``--delay`` seconds pass between the end of DATA (the message's
content is in) and the server's ``250`` answer, as a slow relay's would. Each message is
counted by its ``X-Examhook-Event-Id`` header. Over HTTP:

GET /stats    {"total", "distinct", "first_at", "last_at", "connections"} (epoch seconds; the times
              of the 250 answers)
GET /times    {event id: [content in, 250 answered]} (epoch seconds, first time per event)
"""

from __future__ import annotations

import argparse
import asyncio
import re
import time
from typing import Any

from aiohttp import web
from aiosmtpd.smtp import SMTP

EVENT_ID = re.compile(rb"^X-Examhook-Event-Id:\s*(\S+)", re.MULTILINE | re.IGNORECASE)


class Sink:
    def __init__(self, delay: float) -> None:
        self.delay = delay
        self.total = 0
        self.first_at = 0.0
        self.last_at = 0.0
        self.times: dict[str, tuple[float, float]] = {}
        self.peers: set[tuple[str, int]] = set()

    async def handle_DATA(self, server: Any, session: Any, envelope: Any) -> str:
        got = time.time()
        found = EVENT_ID.search(envelope.original_content or envelope.content)
        key = found.group(1).decode() if found else ""
        self.peers.add(tuple(session.peer))
        if self.delay:
            await asyncio.sleep(self.delay)
        answered = time.time()
        if not self.total:
            self.first_at = answered
        self.last_at = answered
        self.total += 1
        self.times.setdefault(key, (got, answered))
        return "250 2.0.0 OK: queued"


async def serve(args: argparse.Namespace) -> None:
    sink = Sink(args.delay)
    loop = asyncio.get_running_loop()
    server = await loop.create_server(
        lambda: SMTP(sink, hostname="sink.local", enable_SMTPUTF8=True),
        host="127.0.0.1",
        port=args.port,
    )

    async def stats(request: web.Request) -> web.Response:
        return web.json_response(
            {
                "total": sink.total,
                "distinct": len(sink.times),
                "first_at": sink.first_at,
                "last_at": sink.last_at,
                "connections": len(sink.peers),
            }
        )

    async def get_times(request: web.Request) -> web.Response:
        return web.json_response(sink.times)

    app = web.Application()
    app.router.add_get("/stats", stats)
    app.router.add_get("/times", get_times)
    runner = web.AppRunner(app, access_log=None)
    await runner.setup()
    await web.TCPSite(runner, "127.0.0.1", args.stats_port).start()
    async with server:
        await server.serve_forever()


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--port", type=int, required=True, help="SMTP port")
    parser.add_argument("--stats-port", type=int, required=True, help="HTTP port for /stats and /times")
    parser.add_argument("--delay", type=float, default=0.0, help="seconds from end of DATA to the 250")
    args = parser.parse_args()
    asyncio.run(serve(args))


if __name__ == "__main__":
    main()
