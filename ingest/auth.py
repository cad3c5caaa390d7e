"""HTTP Basic authentication, compared in constant time, with a bound on failures."""

from __future__ import annotations

import base64
import binascii
import hashlib
import hmac
import time

from aiohttp import web


class BasicAuth:
    """Checks ``Authorization: Basic``; ``None`` credentials means authentication is off.

    Failed attempts are limited per client address (``max_failures`` per ``window``
    seconds) so credentials cannot be guessed at full speed; the table is bounded.
    """

    def __init__(
        self,
        user: str | None,
        password: str | None,
        *,
        max_failures: int = 20,
        window_seconds: float = 60.0,
        max_clients: int = 10_000,
    ) -> None:
        self.enabled = user is not None and password is not None
        # Compared as SHA-256 digests: both sides always 32 bytes, so the comparison's
        # time says nothing about the credentials' content or length.
        self._expected = hashlib.sha256(f"{user}:{password}".encode()).digest() if self.enabled else b""
        self.max_failures = max_failures
        self.window_seconds = window_seconds
        self.max_clients = max_clients
        self._failures: dict[str, tuple[float, int]] = {}

    def check(self, header: str | None) -> bool:
        if not self.enabled:
            return True
        if not header or header[:6].lower() != "basic ":
            return False
        try:
            given = base64.b64decode(header[6:].strip(), validate=True)
        except (binascii.Error, ValueError):
            return False
        return hmac.compare_digest(hashlib.sha256(given).digest(), self._expected)

    def limited(self, client: str) -> bool:
        """Has this client failed too often recently?"""
        entry = self._failures.get(client)
        if entry is None:
            return False
        started, count = entry
        if time.monotonic() - started > self.window_seconds:
            del self._failures[client]
            return False
        return count >= self.max_failures

    def failed(self, client: str) -> None:
        now = time.monotonic()
        started, count = self._failures.get(client, (now, 0))
        if now - started > self.window_seconds:
            started, count = now, 0
        if client not in self._failures and len(self._failures) >= self.max_clients:
            # drop the oldest entry: bounded memory under a spray of addresses
            self._failures.pop(next(iter(self._failures)))
        self._failures[client] = (started, count + 1)


def unauthorized() -> web.Response:
    return web.json_response(
        {"error": "unauthorized"},
        status=401,
        headers={"WWW-Authenticate": 'Basic realm="examhook"'},
    )
