"""Authentication for the admin pages: the admin token, a session cookie, CSRF tokens.

* ``Authorization: Bearer <token>`` is accepted on every admin request.
* ``POST /admin/login`` with the token sets a cookie holding ``<expiry>.<HMAC(token, expiry)>``:
  it proves the token was presented, expires on its own, and never contains the token.
* Every form carries a CSRF token, an HMAC (keyed by the admin token) of the session it
  was rendered for; POSTs without the right one are refused.
* Every comparison is constant time (``hmac.compare_digest``).
* Values from the client may hold any bytes (aiohttp hands undecodable header bytes over as
  lone surrogates): they are encoded with ``surrogateescape``, so such a value is simply
  wrong, never an exception.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import hmac
import time

SESSION_COOKIE = "examhook_admin"
LOGIN_COOKIE = "examhook_admin_login"
FLASH_COOKIE = "examhook_admin_flash"
SESSION_SECONDS = 12 * 3600


def _bytes(value: str) -> bytes:
    """A client-supplied string as bytes, whatever it holds."""
    return value.encode("utf-8", "surrogateescape")


# The CSRF "session" of a request authenticated with the Bearer header (no cookie).
BEARER_SESSION = "bearer"


class AdminAuth:
    def __init__(self, token: str) -> None:
        self._key = token.encode()
        self._token_digest = hashlib.sha256(self._key).digest()

    def _sign(self, purpose: str, value: str) -> str:
        message = _bytes(f"examhook-admin:{purpose}:{value}")
        return hmac.new(self._key, message, hashlib.sha256).hexdigest()

    def check_token(self, given: str) -> bool:
        # Hash both sides first so neither the content nor the length leaks through timing.
        return hmac.compare_digest(hashlib.sha256(_bytes(given)).digest(), self._token_digest)

    def check_bearer(self, header: str) -> bool:
        scheme, _, given = header.partition(" ")
        return scheme.lower() == "bearer" and self.check_token(given.strip())

    # -- session cookie --------------------------------------------------------------

    def new_session(self, now: float | None = None) -> str:
        expires = str(int(now if now is not None else time.time()) + SESSION_SECONDS)
        return f"{expires}.{self._sign('session', expires)}"

    def check_session(self, value: str, now: float | None = None) -> bool:
        expires, _, signature = value.partition(".")
        if not (expires.isascii() and expires.isdigit()) or int(expires) < (
            now if now is not None else time.time()
        ):
            return False
        return hmac.compare_digest(_bytes(signature), self._sign("session", expires).encode())

    # -- CSRF --------------------------------------------------------------------------

    def csrf_token(self, session: str) -> str:
        return self._sign("csrf", session)

    def check_csrf(self, session: str, given: str) -> bool:
        return hmac.compare_digest(_bytes(given), self.csrf_token(session).encode())

    # -- flash messages (signed so nobody else can put text on the pages) ---------------

    def sign_flash(self, message: str) -> str:
        encoded = base64.urlsafe_b64encode(message.encode()).decode().rstrip("=")
        return f"{encoded}.{self._sign('flash', encoded)}"

    def read_flash(self, value: str) -> str | None:
        encoded, _, signature = value.partition(".")
        if not hmac.compare_digest(_bytes(signature), self._sign("flash", encoded).encode()):
            return None
        try:
            return base64.urlsafe_b64decode(encoded + "=" * (-len(encoded) % 4)).decode()
        except (binascii.Error, ValueError):
            return None
