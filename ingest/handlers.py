"""Request handlers. Domain outcomes are mapped to HTTP statuses here, at the edge."""

from __future__ import annotations

import contextlib
import hashlib
import hmac
import logging
import secrets
import time
from typing import NamedTuple

import msgspec
from aiohttp import web
from prometheus_client import CONTENT_TYPE_LATEST
from redis.exceptions import RedisError, ResponseError

from ingest.appkeys import AUTH, GROUP_COMMIT, INFLIGHT, METRICS, OUTAGE, PROXY, REDIS, SETTINGS, STORE
from ingest.auth import BasicAuth, too_many_failures, unauthorized
from ingest.body import Refusal, Reservation, busy, encoding_of, read_body
from shared.payload import decoder, error_path, release_time
from shared.store import Incoming, Rejected, now_ms

log = logging.getLogger("examhook.ingest")

RETRY_AFTER_SECONDS = "5"
_json = msgspec.json.Encoder()


def json_response(data: dict[str, object], status: int, **headers: str) -> web.Response:
    return web.Response(
        body=_json.encode(data), status=status, content_type="application/json", headers=headers
    )


def queue_unavailable() -> web.Response:
    return json_response({"error": "queue_unavailable"}, 503, **{"Retry-After": RETRY_AFTER_SECONDS})


def _is_json(content_type: str) -> bool:
    return content_type == "application/json" or (
        content_type.startswith("application/") and content_type.endswith("+json")
    )


async def receive_exam_results(request: web.Request) -> web.Response:
    """POST /webhooks/exam-results-released.

    The common case (credentials right, a JSON body complete with the headers, valid,
    queued) runs in this one coroutine with no await but the group commit's: every
    coroutine level and every lookup costs on the path that carries a cohort's burst. The
    rest (a body still arriving or compressed, every refusal) is in helpers.
    """
    app = request.app
    started = time.perf_counter()
    auth = app[AUTH]
    if auth.enabled:
        refused = _authenticate(request, auth)
        if refused is not None:
            return _counted(app, refused)
    headers = request.headers
    content = request.content
    if not (
        headers.get("Content-Type") == "application/json"
        and content.is_eof()
        and request.content_length is not None
        and "Content-Encoding" not in headers
    ):
        return _counted(app, await _read_then_accept(request, started))
    # the body came with its headers: take it as it is
    body = content.read_nowait()
    size = len(body)
    settings = app[SETTINGS].receiver
    if size > settings.max_body_bytes:
        return _counted(app, _too_large(settings.max_body_bytes))
    budget = app[INFLIGHT]
    if not budget.take(size):
        return _counted(app, await _refused(request, busy()))
    try:
        identified = _identify(body, started, settings.max_future_skew_seconds)
        if isinstance(identified, _Rejection):
            return _counted(app, await _reject(request, body, *identified))
        return _counted(app, await _queued(app, identified))
    finally:
        budget.give_back(size)


def _counted(app: web.Application, response: web.Response) -> web.Response:
    """Count an answer the group commit does not (it counts 202 and 200, once per batch)."""
    if response.status not in (200, 202):
        app[METRICS].answered(response.status)
    return response


def _too_large(limit: int) -> web.Response:
    return json_response({"error": "payload_too_large", "detail": f"limit is {limit} bytes"}, 413)


def _authenticate(request: web.Request, auth: BasicAuth) -> web.Response | None:
    """None when the request's Basic credentials are right, else the answer to give."""
    app = request.app
    client = app[PROXY].client(request)
    if auth.limited(client):  # not even checked: a right guess now would reveal nothing
        return too_many_failures()
    if not auth.check(request.headers.get("Authorization")):
        auth.failed(client)
        app[PROXY].hint(request)
        log.warning("authentication failed", extra={"client": client})
        return unauthorized()
    return None


async def _read_then_accept(request: web.Request, started: float) -> web.Response:
    """Everything but the common case: a body still arriving or compressed, a Content-Type
    to parse, or not JSON."""
    app = request.app
    if not _is_json(request.content_type):
        return json_response(
            {"error": "unsupported_media_type", "detail": "Content-Type must be application/json"}, 415
        )
    receiver = app[SETTINGS].receiver
    reservation = Reservation(app[INFLIGHT])
    try:
        try:
            wbits = encoding_of(request)
            body = await read_body(
                request, receiver.max_body_bytes, receiver.body_timeout_seconds, reservation, wbits
            )
        except Refusal as refusal:
            if refusal.raw is not None:  # read, authenticated, not decodable: keep it
                return await _reject(
                    request, refusal.raw, refusal.error, refusal.detail, None, refusal.status
                )
            return await _refused(request, refusal)
        except ConnectionError:
            log.debug("client went away mid-body")
            return json_response({"error": "incomplete_body"}, 400)
        return await _accept(request, body, started)
    finally:
        reservation.close()


async def _refused(request: web.Request, refusal: Refusal) -> web.Response:
    response = json_response({"error": refusal.error, "detail": refusal.detail}, refusal.status)
    if refusal.status == 503:
        response.headers["Retry-After"] = RETRY_AFTER_SECONDS
    elif refusal.status == 400:
        response.force_close()  # the framing is broken: no further request on this connection
    elif refusal.status == 408:
        # Send the answer, then close at once: aiohttp would otherwise linger up to 10 s
        # more, reading the rest of a body that is not coming.
        response.force_close()
        await response.prepare(request)
        await response.write_eof()
        request.protocol.force_close()
    return response


async def _accept(request: web.Request, body: bytes, started: float) -> web.Response:
    """Validate and queue a body that was read in full."""
    identified = _identify(body, started, request.app[SETTINGS].receiver.max_future_skew_seconds)
    if isinstance(identified, _Rejection):
        return await _reject(request, body, *identified)
    return await _queued(request.app, identified)


class _Rejection(NamedTuple):
    """Why a body is refused: the arguments of :func:`_reject` after the body."""

    error: str
    detail: str
    path: str | None
    status: int


def _identify(body: bytes, started: float, max_future_skew: float) -> Incoming | _Rejection:
    """The body validated against the payload model and identified, or why it is refused."""
    # msgspec skips unknown fields without decoding their strings: check UTF-8 here (ASCII
    # needs no decoding), since the body is forwarded byte for byte
    if not body.isascii():
        try:
            body.decode("utf-8")
        except UnicodeDecodeError as exc:
            return _Rejection(
                "invalid_json", f"body is not valid UTF-8: {exc.reason} at byte {exc.start}", None, 400
            )
    try:
        event = decoder.decode(body)
    except msgspec.ValidationError as exc:
        detail, path = error_path(exc)
        return _Rejection("invalid_payload", detail, path, 422)
    except msgspec.DecodeError as exc:
        return _Rejection("invalid_json", str(exc), None, 400)
    except RecursionError:  # absurd nesting inside a field the model skips
        return _Rejection("invalid_json", "JSON nested too deeply", None, 400)
    released, problem = release_time(event, time.time(), max_future_skew)
    if problem is not None:
        return _Rejection("invalid_payload", problem, "$.attempt.audit.releasedAt", 422)
    return Incoming.of(event, body, released, started)


async def _queued(app: web.Application, incoming: Incoming) -> web.Response:
    """Queue an identified event through the group commit: 202 new, 200 duplicate, 503 when
    Redis did not confirm."""
    try:
        accepted = await app[GROUP_COMMIT].submit(incoming)
    except (RedisError, OSError) as exc:
        app[OUTAGE].failed(exc.__class__.__name__)  # one line per outage, not per request
        return queue_unavailable()
    outage = app[OUTAGE]
    if outage.active:
        outage.recovered()
    if accepted:
        return _answer(b'{"status":"accepted","event_id":"', incoming.event_id, 202)
    return _answer(b'{"status":"duplicate","event_id":"', incoming.event_id, 200)


_JSON_HEADERS = {"Content-Type": "application/json"}


def _answer(head: bytes, event_id: str, status: int) -> web.Response:
    # event ids are hex: no JSON escaping needed
    return web.Response(body=head + event_id.encode() + b'"}', status=status, headers=_JSON_HEADERS)


async def _reject(
    request: web.Request, body: bytes, error: str, detail: str, path: str | None, status: int
) -> web.Response:
    """Answer 400/422, after keeping the body in the quarantine (503 if that fails)."""
    app = request.app
    try:
        text, raw = body.decode("utf-8"), None
    except UnicodeDecodeError:  # keep the bytes too: the text cannot give them back
        text, raw = body.decode("utf-8", errors="replace"), body
    rejected = Rejected(
        id="rej_" + secrets.token_hex(8),
        received_at=now_ms(),
        error=error,
        detail=detail,
        path=path,
        content_type=request.headers.get("Content-Type", ""),
        body=text,
        raw=raw,
    )
    try:
        await app[STORE].quarantine(rejected)
    except (RedisError, OSError) as exc:
        # Nothing that passed authentication may be lost: make the sender retry.
        app[OUTAGE].failed(exc.__class__.__name__)
        return queue_unavailable()
    app[METRICS].rejected_events.inc()
    log.info("rejected", extra={"reject_id": rejected.id, "error": error, "path": path})
    payload: dict[str, object] = {"error": error, "detail": detail}
    if path is not None:
        payload["path"] = path
    payload["rejected_id"] = rejected.id
    return json_response(payload, status)


async def healthz(request: web.Request) -> web.Response:
    return json_response({"status": "ok"}, 200)


async def readyz(request: web.Request) -> web.Response:
    """Ready = Redis takes a write: a tiny expiring key under the prefix. A Redis that
    answers PING but refuses writes (full under noeviction, a read-only replica) would
    answer every webhook with 503."""
    app = request.app
    try:
        await app[REDIS].set(app[STORE].keys.readyz, b"1", px=10_000)
    except ResponseError:
        return json_response({"status": "not_ready", "redis": "not_writable"}, 503)
    except (RedisError, OSError):
        return json_response({"status": "not_ready", "redis": "unreachable"}, 503)
    return json_response({"status": "ready"}, 200)


async def metrics(request: web.Request) -> web.Response:
    """GET /metrics: for Prometheus with ``Authorization: Bearer <receiver.metrics_token>``
    or the receiver's Basic credentials; open only when neither is configured."""
    app = request.app
    refused = _metrics_refused(request)
    if refused is not None:
        return refused
    # with Redis down the queue gauges keep their last value; /readyz reports the outage
    with contextlib.suppress(RedisError, OSError):
        await _queue_gauges(app)
    return web.Response(body=app[METRICS].exposition(), headers={"Content-Type": CONTENT_TYPE_LATEST})


def _metrics_refused(request: web.Request) -> web.Response | None:
    app = request.app
    auth, token = app[AUTH], app[SETTINGS].receiver.metrics_token
    if not auth.enabled and token is None:
        return None
    client = app[PROXY].client(request)
    if auth.limited(client):
        return too_many_failures()
    header = request.headers.get("Authorization")
    if token is not None and _bearer_is(header, token):
        return None
    if auth.enabled and auth.check(header):
        return None
    auth.failed(client)  # the same count as the webhook's: /metrics is no side door for guessing
    challenges = []
    if token is not None:
        challenges.append('Bearer realm="examhook-metrics"')
    if auth.enabled:
        challenges.append('Basic realm="examhook"')
    return json_response({"error": "unauthorized"}, 401, **{"WWW-Authenticate": ", ".join(challenges)})


def _bearer_is(header: str | None, token: str) -> bool:
    if not header or header[:7].lower() != "bearer ":
        return False
    given = header[7:].strip().encode("utf-8", "surrogateescape")
    return hmac.compare_digest(hashlib.sha256(given).digest(), hashlib.sha256(token.encode()).digest())


async def _queue_gauges(app: web.Application) -> None:
    metrics, redis, keys = app[METRICS], app[REDIS], app[STORE].keys
    now = now_ms()
    async with redis.pipeline(transaction=False) as pipe:
        pipe.zcount(keys.queue, "-inf", now)
        pipe.zcount(keys.queue, f"({now}", "+inf")
        pipe.zrangebyscore(keys.queue, "-inf", now, start=0, num=1, withscores=True)
        pipe.zcard(keys.failures)
        pipe.zcard(keys.rejected)
        due, scheduled, oldest, failures, rejected = await pipe.execute()
    metrics.queue_depth.labels("queued").set(due)
    metrics.queue_depth.labels("scheduled").set(scheduled)
    metrics.oldest_age.set((now - oldest[0][1]) / 1000 if oldest else 0)
    metrics.failures.set(failures)
    metrics.rejected.set(rejected)
