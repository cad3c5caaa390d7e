"""HTTP Basic authentication, compared in constant time, with a bound on failures.

How failures are limited (per process; the receiver's own minute-long windows):

* **Per client address** (IPv6: per /64): after ``per_address`` failures in a window the
  address is *limited*: its requests get 429 without their credentials being checked, so
  a right guess made while limited reveals nothing (it gets the very same 429).
* **In total**: once ``total`` failures have been counted in a window, from whatever
  addresses, every address that fails is limited at once, at its first failure. An
  attacker spreading guesses over many addresses thus gets about ``total`` answers plus
  one per address per window, not ``per_address`` per address.
* **Never Synap**: the total bound never refuses anyone by itself. A request with the
  right credentials from an address that is not itself limited is always accepted, so
  an attacker without the credentials cannot keep Synap out (it would have to fail *from
  Synap's address*; behind a proxy that means ``trusted_proxies`` must be set, so that
  addresses are the clients' own).
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import hmac
import ipaddress
import time

from aiohttp import web


def bucket(client: str) -> str:
    """The key failures are counted under: the address; for IPv6 its /64."""
    if ":" not in client:  # IPv4 (or "-"): the address itself, no parsing on the hot path
        return client
    try:
        address = ipaddress.ip_address(client.split("%", 1)[0])
    except ValueError:
        return client
    if isinstance(address, ipaddress.IPv6Address):
        if address.ipv4_mapped is not None:
            return str(address.ipv4_mapped)
        return str(ipaddress.IPv6Network((address, 64), strict=False))
    return str(address)


class FailureLimiter:
    """Failed authentications per client address and in total (see the module's doc)."""

    def __init__(
        self,
        per_address: int = 20,
        total: int = 100,
        window_seconds: float = 60.0,
        max_clients: int = 10_000,
    ) -> None:
        self.per_address = per_address
        self.total = total
        self.window_seconds = window_seconds
        self.max_clients = max_clients
        self._failures: dict[str, tuple[float, int]] = {}
        self._total_started = 0.0
        self._total_count = 0

    def limited(self, client: str) -> bool:
        """Has this client failed too often recently? (Then its credentials are not checked.)"""
        if not self._failures:
            return False
        key = bucket(client)
        entry = self._failures.get(key)
        if entry is None:
            return False
        started, count = entry
        if time.monotonic() - started > self.window_seconds:
            del self._failures[key]
            return False
        return count >= self.per_address

    @property
    def under_pressure(self) -> bool:
        """Have ``total`` failures been counted in the current window?"""
        return (
            self._total_count >= self.total and time.monotonic() - self._total_started <= self.window_seconds
        )

    def failed(self, client: str) -> None:
        now = time.monotonic()
        if now - self._total_started > self.window_seconds:
            self._total_started, self._total_count = now, 0
        self._total_count += 1
        key = bucket(client)
        started, count = self._failures.get(key, (now, 0))
        if now - started > self.window_seconds:
            started, count = now, 0
        count += 1
        if self._total_count > self.total:  # the total is spent: lock this address out now
            count = max(count, self.per_address)
        if key not in self._failures and len(self._failures) >= self.max_clients:
            # drop the oldest entry: bounded memory under a spray of addresses
            self._failures.pop(next(iter(self._failures)))
        self._failures[key] = (started, count)


class BasicAuth:
    """Checks ``Authorization: Basic``; ``None`` credentials means authentication is off.

    ``limiter`` counts the failures (see :class:`FailureLimiter`).
    """

    def __init__(
        self,
        user: str | None,
        password: str | None,
        *,
        max_failures: int = 20,
        total_failures: int = 100,
        window_seconds: float = 60.0,
        max_clients: int = 10_000,
    ) -> None:
        self.enabled = user is not None and password is not None
        # Compared as SHA-256 digests: both sides always 32 bytes, so the comparison's
        # time says nothing about the credentials' content or length.
        self._expected = hashlib.sha256(f"{user}:{password}".encode()).digest() if self.enabled else b""
        # the header as Synap (and nearly every client) writes it: one digest to compare, no decoding
        canonical = "Basic " + base64.b64encode(f"{user}:{password}".encode()).decode()
        self._expected_header = hashlib.sha256(canonical.encode()).digest() if self.enabled else b""
        self.limiter = FailureLimiter(max_failures, total_failures, window_seconds, max_clients)

    def check(self, header: str | None) -> bool:
        if not self.enabled:
            return True
        if not header:
            return False
        given_header = hashlib.sha256(header.encode("utf-8", "surrogateescape")).digest()
        if hmac.compare_digest(given_header, self._expected_header):
            return True
        if header[:6].lower() != "basic ":
            return False
        try:
            given = base64.b64decode(header[6:].strip(), validate=True)
        except (binascii.Error, ValueError):
            return False
        return hmac.compare_digest(hashlib.sha256(given).digest(), self._expected)

    def limited(self, client: str) -> bool:
        return self.limiter.limited(client)

    def failed(self, client: str) -> None:
        self.limiter.failed(client)


def unauthorized() -> web.Response:
    return web.json_response(
        {"error": "unauthorized"},
        status=401,
        headers={"WWW-Authenticate": 'Basic realm="examhook"'},
    )


def too_many_failures() -> web.Response:
    return web.json_response(
        {"error": "too_many_failed_authentications"}, status=429, headers={"Retry-After": "60"}
    )
