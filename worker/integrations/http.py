"""``http``: POST the body exactly as received, Standard Webhooks headers, retry rules."""

from __future__ import annotations

import asyncio
import base64
import contextlib
import hashlib
import hmac
import time
from email.utils import parsedate_to_datetime

import aiohttp

from shared.settings import HttpIntegration, SigningSecret
from worker.integrations.base import Delivery, Integration, PermanentError, TransientError, UnknownOutcome

RETRYABLE_STATUSES = frozenset({408, 425, 429})
MAX_ERROR_BODY = 200


def sign(secret: SigningSecret, msg_id: str, timestamp: str, body: bytes) -> str:
    """Standard Webhooks ``v1`` signature of ``id.timestamp.body``."""
    mac = hmac.new(secret.key, f"{msg_id}.{timestamp}.".encode() + body, hashlib.sha256).digest()
    return "v1," + base64.b64encode(mac).decode()


def parse_retry_after(value: str | None) -> float | None:
    """``Retry-After``: delta-seconds or an HTTP date; None when absent or unreadable."""
    if not value:
        return None
    value = value.strip()
    if value.isdigit():
        return float(value)
    try:
        return max(0.0, parsedate_to_datetime(value).timestamp() - time.time())
    except (TypeError, ValueError):
        return None


class HttpDelivery(Integration[HttpIntegration]):
    def __init__(self, config: HttpIntegration, session: aiohttp.ClientSession) -> None:
        super().__init__(config)
        self.session = session
        self.timeout = aiohttp.ClientTimeout(total=config.timeout_seconds)
        # parsed once (settings validated it)
        self.signing_secret = SigningSecret(config.signing_secret) if config.signing_secret else None

    async def deliver(self, delivery: Delivery) -> str:
        headers = {
            **self.config.headers,
            "Content-Type": "application/json",
            "Idempotency-Key": delivery.event_id,
            "webhook-id": delivery.event_id,
        }
        if self.signing_secret is not None:
            timestamp = str(int(time.time()))
            headers["webhook-timestamp"] = timestamp
            headers["webhook-signature"] = sign(
                self.signing_secret, delivery.event_id, timestamp, delivery.body
            )
        try:
            async with self.session.post(
                self.config.url,
                data=delivery.body,
                headers=headers,
                timeout=self.timeout,
                allow_redirects=False,
            ) as response:
                status = response.status
                if 200 <= status < 300:
                    # delivered: whatever happens to the rest of the answer changes nothing
                    return str(status)
                retry_after = parse_retry_after(response.headers.get("Retry-After"))
                excerpt = ""
                with contextlib.suppress(aiohttp.ClientError, TimeoutError):
                    excerpt = (await response.content.read(MAX_ERROR_BODY)).decode("utf-8", "replace")
        except (aiohttp.ConnectionTimeoutError, aiohttp.ClientConnectorError) as exc:
            # no connection, so nothing was sent
            raise TransientError(f"{exc.__class__.__name__}: {exc}") from None
        except TimeoutError:
            # the request may have arrived: the answer did not
            raise UnknownOutcome(f"timed out after {self.config.timeout_seconds:g}s") from None
        except (aiohttp.ServerDisconnectedError, aiohttp.ClientPayloadError, aiohttp.ClientOSError) as exc:
            raise UnknownOutcome(f"{exc.__class__.__name__}: {exc}") from None
        except aiohttp.ClientError as exc:
            raise TransientError(f"{exc.__class__.__name__}: {exc}") from None
        except asyncio.CancelledError:
            raise
        message = f"HTTP {status}" + (f": {excerpt}" if excerpt else "")
        if status in RETRYABLE_STATUSES or status >= 500:
            raise TransientError(message, status=str(status), retry_after=retry_after)
        raise PermanentError(message, status=str(status))
