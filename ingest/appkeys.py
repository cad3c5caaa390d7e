"""Typed application keys, all in one place."""

from __future__ import annotations

from aiohttp import web
from redis.asyncio import Redis

from ingest.auth import BasicAuth
from ingest.body import InflightBudget
from ingest.edgelog import OutageLog
from ingest.group_commit import GroupCommit
from ingest.metrics import ReceiverMetrics
from ingest.proxy import ClientResolver
from shared.settings import Settings
from shared.store import Store

SETTINGS = web.AppKey("settings", Settings)
REDIS = web.AppKey("redis", Redis)
STORE = web.AppKey("store", Store)
GROUP_COMMIT = web.AppKey("group_commit", GroupCommit)
AUTH = web.AppKey("auth", BasicAuth)
METRICS = web.AppKey("metrics", ReceiverMetrics)
INFLIGHT = web.AppKey("inflight", InflightBudget)
PROXY = web.AppKey("proxy", ClientResolver)
OUTAGE = web.AppKey("outage", OutageLog)
