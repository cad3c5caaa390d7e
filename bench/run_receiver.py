"""Launch one receiver process for the benchmarks (what ``examhook receive`` does).

    python bench/run_receiver.py --kind examhook --settings S.json --port 8080
    python bench/run_receiver.py --kind bare --port 8080   # baseline: read body, answer 202

Logging is configured exactly as the CLI does (``configure_logging(settings.log_level)``,
JSON lines on stderr), so the product's per-batch log line is part of the cost, and the
garbage collector is tuned as the CLI tunes it (``shared.process.tune_gc``).
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from aiohttp import web


def bare_app() -> web.Application:
    async def receive(request: web.Request) -> web.Response:
        await request.read()
        return web.Response(status=202, body=b'{"status":"accepted"}', content_type="application/json")

    async def healthz(request: web.Request) -> web.Response:
        return web.Response(text="ok")

    app = web.Application(client_max_size=1024 * 1024 + 1)
    app.router.add_post("/webhooks/exam-results-released", receive)
    app.router.add_get("/healthz", healthz)
    return app


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--kind", choices=["examhook", "bare"], required=True)
    parser.add_argument("--settings")
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument(
        "--buffered-logs", action="store_true", help="PROTOTYPE: buffer log output (see README)"
    )
    args = parser.parse_args()
    if args.kind == "bare":
        app = bare_app()
    else:
        from ingest.app import create_app
        from shared.logs import configure_logging
        from shared.settings import settings_from_dict

        settings = settings_from_dict(json.loads(Path(args.settings).read_text()))
        configure_logging(settings.log_level)
        app = create_app(settings)
        if args.buffered_logs:
            sys.path.insert(0, str(Path(__file__).resolve().parent))
            from _common import buffer_log_output

            app.cleanup_ctx.append(buffer_log_output())
        from shared.process import tune_gc

        tune_gc()  # as `examhook receive` does
    web.run_app(app, host="127.0.0.1", port=args.port, access_log=None, print=None)


if __name__ == "__main__":
    main()
