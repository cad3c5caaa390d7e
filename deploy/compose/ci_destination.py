"""A stand-in LMS for the compose CI stage (.ci/compose, deploy/compose/ci.override.yaml).

Runs from the examhook image (aiohttp is installed there). Every POST to /hooks/results
is recorded, on arrival and before it is answered, as one JSON line in $DEST_RECORDS:
when, from which address, the Idempotency-Key, whether the bearer token and the Standard
Webhooks signature were right, and the attempt id and digest of the body. It then waits
$DEST_DELAY_SECONDS (an LMS takes a moment, so a killed worker has sends in flight) and
answers 200. GET /healthz answers 200.
"""

from __future__ import annotations

import asyncio
import base64
import hashlib
import hmac
import json
import os
import time
from collections.abc import Mapping
from typing import IO

from aiohttp import web

RECORDS = os.environ.get("DEST_RECORDS", "/records/requests.jsonl")
TOKEN = os.environ["LMS_TOKEN"]
SIGNING_KEY = base64.b64decode(os.environ["LMS_SIGNING_SECRET"].removeprefix("whsec_"))
DELAY = float(os.environ.get("DEST_DELAY_SECONDS", "0"))
OUT = web.AppKey("out", IO[str])


def signature_ok(headers: Mapping[str, str], body: bytes) -> bool:
    msg_id = headers.get("webhook-id", "")
    timestamp = headers.get("webhook-timestamp", "")
    mac = hmac.new(SIGNING_KEY, f"{msg_id}.{timestamp}.".encode() + body, hashlib.sha256).digest()
    expected = "v1," + base64.b64encode(mac).decode()
    given = headers.get("webhook-signature", "").split()
    return any(hmac.compare_digest(expected, candidate) for candidate in given)


async def hook(request: web.Request) -> web.Response:
    body = await request.read()
    try:
        attempt_id = json.loads(body)["attempt"]["id"]
    except (ValueError, KeyError, TypeError):
        attempt_id = None
    record = {
        "t": time.time(),
        "peer": request.remote,
        "key": request.headers.get("Idempotency-Key"),
        "webhook_id": request.headers.get("webhook-id"),
        "auth_ok": hmac.compare_digest(request.headers.get("Authorization", ""), f"Bearer {TOKEN}"),
        "signature_ok": signature_ok(request.headers, body),
        "attempt_id": attempt_id,
        "sha256": hashlib.sha256(body).hexdigest()[:16],
    }
    out = request.app[OUT]
    out.write(json.dumps(record) + "\n")
    out.flush()
    if DELAY:
        await asyncio.sleep(DELAY)
    return web.json_response({"ok": True})


async def healthz(_: web.Request) -> web.Response:
    return web.Response(text="ok")


def main() -> None:
    app = web.Application(client_max_size=2 * 1024 * 1024)
    app.router.add_post("/hooks/results", hook)
    app.router.add_get("/healthz", healthz)
    # One process, one thread: each record is one write of one whole line.
    with open(RECORDS, "a", encoding="utf-8") as out:
        app[OUT] = out
        web.run_app(app, host="0.0.0.0", port=int(os.environ.get("DEST_PORT", "8000")), print=None)


if __name__ == "__main__":
    main()
