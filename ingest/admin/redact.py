"""Secrets that must never appear on an admin page, and a filter that hides them.

The pages never print configuration values, but error texts and stored bodies come from
elsewhere; every value rendered by the templates goes through :func:`Redactor.__call__`.
"""

from __future__ import annotations

from urllib.parse import urlsplit

from shared.settings import EmailIntegration, HttpIntegration, PostgresIntegration, Settings

MIN_LENGTH = 4  # shorter "secrets" would blot out ordinary text


def _url_password(url: str) -> str | None:
    try:
        return urlsplit(url).password
    except ValueError:
        return None


def secrets_of(settings: Settings) -> list[str]:
    found: list[str | None] = [
        settings.receiver.basic_auth_password,
        settings.receiver.metrics_token,
        settings.admin_token,
        _url_password(settings.redis.url),
    ]
    for integration in settings.integrations:
        if isinstance(integration, HttpIntegration):
            found.append(integration.signing_secret)
            if integration.signing_secret:
                found.append(integration.signing_secret.removeprefix("whsec_"))
            found.append(_url_password(integration.url))
            for value in integration.headers.values():
                found.append(value)
                found.append(value.rsplit(" ", 1)[-1])  # the credential in "Bearer xyz"
        elif isinstance(integration, EmailIntegration):
            found.append(integration.password)
        elif isinstance(integration, PostgresIntegration):
            found.append(_url_password(integration.dsn))
    unique = {s for s in found if s and len(s) >= MIN_LENGTH}
    return sorted(unique, key=len, reverse=True)  # longest first: a secret may contain another


class Redactor:
    def __init__(self, secrets: list[str]) -> None:
        self.secrets = secrets

    def __call__(self, value: object) -> object:
        if isinstance(value, str):
            for secret in self.secrets:
                if secret in value:
                    value = value.replace(secret, "***")
        return value
