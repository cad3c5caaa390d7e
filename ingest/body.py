"""Reading a webhook body: bounded in size, in time and in memory; gzip/deflate decoded here.

aiohttp's own decompression is off for the receiver (``auto_decompress=False`` in
``create_app``): it runs inside the HTTP parser, before authentication, and turns a
corrupt or unsupported body into a 500 or a 400 with a traceback. Here the raw body is
read under a deadline, its bytes are reserved against the process's in-flight budget,
and it is decoded with the *decoded* size bounded by ``max_body_bytes`` (no zip bomb).
"""

from __future__ import annotations

import asyncio
import contextlib
import zlib

from aiohttp import web
from aiohttp.web_protocol import RequestPayloadError

# Content-Encoding values (lower case) and the zlib window each needs.
_GZIP = 16 + zlib.MAX_WBITS
_ZLIB = zlib.MAX_WBITS
_RAW_DEFLATE = -zlib.MAX_WBITS
ENCODINGS = {"gzip": _GZIP, "x-gzip": _GZIP, "deflate": _ZLIB}


class Refusal(Exception):
    """The body cannot be taken: answer ``status`` with ``{"error": error, "detail": detail}``.
    ``raw`` is set when the body was read and is to be quarantined (authenticated, but
    not decodable)."""

    def __init__(self, status: int, error: str, detail: str, raw: bytes | None = None) -> None:
        super().__init__(status, error)
        self.status = status
        self.error = error
        self.detail = detail
        self.raw = raw


def busy() -> Refusal:
    """Over the process's in-flight body bytes: 503 with Retry-After, the sender tries later."""
    return Refusal(503, "busy", "too many request bytes in flight; retry later")


class InflightBudget:
    """Body bytes held by the requests of one process right now, bounded by ``limit``."""

    def __init__(self, limit: int) -> None:
        self.limit = limit
        self.used = 0

    def take(self, size: int) -> bool:
        if self.used + size > self.limit:
            return False
        self.used += size
        return True

    def give_back(self, size: int) -> None:
        self.used -= size


class Reservation:
    """The bytes one request holds against the budget; ``close()`` gives them all back."""

    __slots__ = ("budget", "size")

    def __init__(self, budget: InflightBudget) -> None:
        self.budget = budget
        self.size = 0

    def grow_to(self, size: int) -> None:
        if size > self.size:
            if not self.budget.take(size - self.size):
                raise busy()
            self.size = size

    def close(self) -> None:
        self.budget.give_back(self.size)
        self.size = 0


def encoding_of(request: web.Request) -> int | None:
    """The zlib window for the request's Content-Encoding, None for none/identity; raises
    Refusal(415) for anything else (including a list of several encodings)."""
    value = request.headers.get("Content-Encoding")
    if value is None:
        return None
    name = value.strip().lower()
    if name in ("", "identity"):
        return None
    wbits = ENCODINGS.get(name)
    if wbits is None:
        raise Refusal(
            415,
            "unsupported_encoding",
            "Content-Encoding must be gzip, deflate or identity",
        )
    return wbits


_ALREADY_HERE = contextlib.nullcontext()


def too_large(limit: int) -> Refusal:
    return Refusal(413, "payload_too_large", f"limit is {limit} bytes")


async def read_body(
    request: web.Request, limit: int, deadline: float, reservation: Reservation, wbits: int | None
) -> bytes:
    """The request's body (decoded), at most ``limit`` bytes, read within ``deadline`` seconds.

    Raises Refusal: 413 over the limit, 408 past the deadline, 503 over the in-flight
    budget, 400 for a corrupt compressed body (with ``raw`` to quarantine) or a broken
    chunked framing, and ConnectionError when the client went away mid-body.
    """
    declared = request.content_length
    if declared is not None:
        if declared > limit:
            raise too_large(limit)
        reservation.grow_to(declared)
    content = request.content
    chunks: list[bytes] = []
    size = 0
    # a body that came with its headers needs no timer
    timer = _ALREADY_HERE if content.is_eof() else asyncio.timeout(deadline)
    try:
        async with timer:
            while chunk := await content.readany():
                size += len(chunk)
                if size > limit:
                    raise too_large(limit)
                reservation.grow_to(size)
                chunks.append(chunk)
    except TimeoutError:
        raise Refusal(408, "request_timeout", f"the body did not arrive within {deadline:g} s") from None
    except RequestPayloadError:
        raise Refusal(400, "invalid_body", "the request's framing (chunked encoding) is broken") from None
    raw = chunks[0] if len(chunks) == 1 else b"".join(chunks)
    if wbits is None:
        return raw
    body = _decompress(raw, wbits, limit)
    reservation.grow_to(len(raw) + len(body))
    return body


def _decompress(raw: bytes, wbits: int, limit: int) -> bytes:
    """Decode ``raw``; never produce more than ``limit`` + 1 bytes (a zip bomb stops there)."""
    try:
        return _inflate(raw, wbits, limit)
    except zlib.error as exc:
        if wbits == _ZLIB:  # "deflate" sent as a raw deflate stream, as some clients do
            try:
                return _inflate(raw, _RAW_DEFLATE, limit)
            except zlib.error:
                pass
        name = "gzip" if wbits == _GZIP else "deflate"
        raise Refusal(400, "invalid_encoding", f"body is not valid {name} data ({exc})", raw) from None


def _inflate(raw: bytes, wbits: int, limit: int) -> bytes:
    out = bytearray()
    data = raw
    while True:
        decompressor = zlib.decompressobj(wbits)
        out += decompressor.decompress(data, limit + 1 - len(out))
        if len(out) > limit:
            raise too_large(limit)
        if not decompressor.eof:
            raise zlib.error("the compressed data is truncated")
        data = decompressor.unused_data
        if not data or wbits != _GZIP:  # gzip allows several members one after another
            if data:
                raise zlib.error("data after the end of the compressed stream")
            return bytes(out)
