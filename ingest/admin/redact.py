"""Secrets that must never appear on an admin page, and a filter that hides them.

The pages never print configuration values, but error texts and stored bodies come from
elsewhere; every value rendered by the templates goes through :func:`Redactor.__call__`.
"""

from __future__ import annotations

from shared.settings import Settings, secret_values

MIN_LENGTH = 4  # shorter "secrets" would blot out ordinary text


def secrets_of(settings: Settings) -> list[str]:
    """The settings' secrets worth searching for (see :func:`shared.settings.secret_values`)."""
    unique = {s for s in secret_values(settings) if len(s) >= MIN_LENGTH}
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
