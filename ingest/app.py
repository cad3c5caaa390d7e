"""The receiver application factory."""

from __future__ import annotations

from collections.abc import AsyncIterator

from aiohttp import web

from ingest import handlers
from ingest.admin import setup_admin
from ingest.appkeys import AUTH, GROUP_COMMIT, INFLIGHT, METRICS, OUTAGE, PROXY, REDIS, SETTINGS, STORE
from ingest.auth import BasicAuth
from ingest.body import InflightBudget
from ingest.edgelog import OutageLog, quiet_client_mistakes
from ingest.group_commit import GroupCommit
from ingest.metrics import ReceiverMetrics
from ingest.proxy import ClientResolver
from shared.contract import Keys
from shared.redis_conn import redis_client
from shared.settings import Settings
from shared.store import Store

WEBHOOK_PATH = "/webhooks/exam-results-released"


def create_app(settings: Settings, *, require_auth: bool = True) -> web.Application:
    """Build the receiver. ``require_auth=False`` (``--no-auth``, ``dev``) allows running
    without credentials; with credentials configured they are always enforced."""
    if require_auth and not settings.auth_configured:
        raise ValueError("Basic auth credentials are required (or pass --no-auth)")
    quiet_client_mistakes()
    # client_max_size bounds what request.post() reads (the admin forms); the webhook reads
    # its body itself (ingest.body), compressed bodies included: aiohttp's own decoding
    # runs in the HTTP parser, before authentication, and fails with tracebacks.
    # handler_args apply in every runner (``receive``, ``dev``, the tests' servers): a
    # client that goes away never cancels a handler halfway (as ``receive`` always had it).
    app = web.Application(
        client_max_size=settings.receiver.max_body_bytes,
        handler_args={"auto_decompress": False, "handler_cancellation": False},
    )
    app[SETTINGS] = settings
    app[INFLIGHT] = InflightBudget(settings.receiver.max_inflight_bytes)
    receiver = settings.receiver
    app[AUTH] = BasicAuth(
        receiver.basic_auth_user,
        receiver.basic_auth_password,
        max_failures=receiver.auth_failures_per_address,
        total_failures=receiver.auth_failures_total,
    )
    app[PROXY] = ClientResolver(receiver.trusted_proxies, receiver.proxy_headers)
    app[OUTAGE] = OutageLog(handlers.log)
    app[METRICS] = ReceiverMetrics()
    app.cleanup_ctx.append(_redis_ctx)
    app.on_shutdown.append(_stopping)
    app.router.add_post(WEBHOOK_PATH, handlers.receive_exam_results)
    app.router.add_get("/healthz", handlers.healthz)
    app.router.add_get("/readyz", handlers.readyz)
    app.router.add_get("/metrics", handlers.metrics)
    setup_admin(app)
    return app


async def _redis_ctx(app: web.Application) -> AsyncIterator[None]:
    settings = app[SETTINGS]
    redis = redis_client(settings)
    store = Store(redis, Keys(settings.redis.prefix), settings.retention)
    app[REDIS] = redis
    app[STORE] = store
    receiver = settings.receiver
    app[GROUP_COMMIT] = GroupCommit(
        store, receiver.max_batch, app[METRICS], max_batch_bytes=receiver.max_batch_bytes
    )
    yield
    # every request already waiting on Redis gets its answer before the client closes
    waiting = app[GROUP_COMMIT].waiting
    await app[GROUP_COMMIT].drain()
    await redis.aclose()
    handlers.log.info("receiver stopped", extra={"drained_events": waiting})


async def _stopping(app: web.Application) -> None:
    handlers.log.info(
        "receiver stopping: no new connections; requests in flight get their answers",
        extra={"body_bytes_in_flight": app[INFLIGHT].used},
    )
