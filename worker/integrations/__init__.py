"""Integration types, one module each; :func:`build` makes one from its settings."""

from __future__ import annotations

import aiohttp

from shared.settings import FileIntegration, HttpIntegration, IntegrationBase
from worker.integrations.base import Integration
from worker.integrations.file import FileDelivery
from worker.integrations.http import HttpDelivery


def build(config: IntegrationBase, session: aiohttp.ClientSession) -> Integration:  # type: ignore[type-arg]
    """The integration for one ``[[integrations]]`` table."""
    if isinstance(config, HttpIntegration):
        return HttpDelivery(config, session)
    if isinstance(config, FileIntegration):
        return FileDelivery(config)
    from shared.settings import EmailIntegration, PostgresIntegration

    if isinstance(config, EmailIntegration):
        from worker.integrations.email import EmailDelivery

        return EmailDelivery(config)
    if isinstance(config, PostgresIntegration):
        from worker.integrations.postgres import PostgresDelivery

        return PostgresDelivery(config)
    raise TypeError(f"unknown integration type: {type(config).__name__}")
