"""Logging: JSON lines for services, readable text on a terminal and for ``dev``.

Personal data never goes into a log line at info level: use :func:`mask_email`, and
never log bodies or secrets.
"""

from __future__ import annotations

import logging
import re
import sys
import time
from collections.abc import Callable
from typing import Any

import msgspec

_RESERVED = set(vars(logging.LogRecord("", 0, "", 0, "", None, None))) | {"message", "asctime"}


class JsonFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        data: dict[str, Any] = {
            "ts": time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(record.created))
            + f".{int(record.msecs):03d}Z",
            "level": record.levelname.lower(),
            "logger": record.name,
            "msg": record.getMessage(),
        }
        for key, value in vars(record).items():
            if key not in _RESERVED and not key.startswith("_"):
                data[key] = value
        if record.exc_info:
            data["exc"] = self.formatException(record.exc_info)
        return msgspec.json.encode(data, enc_hook=str).decode()


class TextFormatter(logging.Formatter):
    """One readable line: time, level, logger, message, then the extra fields as
    ``key=value`` pairs (logfmt-like: a mapping flattened to ``key.sub=value``, a list
    comma-joined, text with spaces or quotes quoted)."""

    def format(self, record: logging.LogRecord) -> str:
        extras = " ".join(
            _pairs({k: v for k, v in vars(record).items() if k not in _RESERVED and not k.startswith("_")})
        )
        when = time.strftime("%H:%M:%S", time.localtime(record.created))
        line = f"{when} {record.levelname:<7} {record.name}: {record.getMessage()}"
        if extras:
            line += f"  {extras}"
        if record.exc_info:
            line += "\n" + self.formatException(record.exc_info)
        return line


def _pairs(fields: dict[str, Any], prefix: str = "") -> list[str]:
    out: list[str] = []
    for key, value in fields.items():
        name = f"{prefix}{key}"
        if isinstance(value, dict) and value:
            out += _pairs({str(k): v for k, v in value.items()}, f"{name}.")
        else:
            out.append(f"{name}={_value(value)}")
    return out


_BARE_RE = re.compile(r'[^\s"=]+')


def _value(value: Any) -> str:
    if isinstance(value, list | tuple | set | frozenset):
        text = ",".join(str(v) for v in value)
    elif isinstance(value, dict):  # an empty one (others are flattened)
        text = ""
    else:
        text = str(value)
    return text if _BARE_RE.fullmatch(text) else msgspec.json.encode(text).decode()


def configure_logging(level: str, *, json: bool | None = None) -> None:
    """Route every logger to stderr; JSON unless on a terminal (or told otherwise)."""
    if json is None:
        json = not sys.stderr.isatty()
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(JsonFormatter() if json else TextFormatter())
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(level.upper())
    # No caller/thread/process lookups for every record: they cost ~40% of a log call
    # and these lines never show them.
    logging._srcfile = None
    logging.logThreads = False
    logging.logProcesses = False
    logging.logMultiprocessing = False
    # arq logs every job at info; ours say more, without payload arguments.
    logging.getLogger("arq").setLevel(max(logging.WARNING, root.level))
    logging.getLogger("aiohttp.access").setLevel(logging.WARNING)


REPEATED_WARNING_SECONDS = 30.0


class Repeats:
    """Rate limit for a warning that could repeat every poll (20 a second while Redis refuses
    writes): the first of each kind is logged, then at most one per ``every`` seconds, with
    the number of similar lines left out meanwhile."""

    def __init__(
        self, every: float = REPEATED_WARNING_SECONDS, clock: Callable[[], float] = time.monotonic
    ) -> None:
        self.every = every
        self._clock = clock
        self._next: dict[str, float] = {}
        self._left_out: dict[str, int] = {}

    def due(self, kind: str) -> int | None:
        """None when this warning should be left out; otherwise how many were left out since
        the last one of its kind was logged."""
        now = self._clock()
        if now < self._next.get(kind, float("-inf")):
            self._left_out[kind] = self._left_out.get(kind, 0) + 1
            return None
        self._next[kind] = now + self.every
        return self._left_out.pop(kind, 0)

    def warn(self, logger: logging.Logger, message: str, extra: dict[str, Any]) -> None:
        """``logger.warning(message)``, unless one like it was logged less than ``every`` ago."""
        left_out = self.due(message)
        if left_out is not None:
            logger.warning(message, extra={**extra, "similar_left_out": left_out} if left_out else extra)


_ADDRESS_IN_TEXT_RE = re.compile(r"[^\s<>()\[\]\"',;:@]+@[A-Za-z0-9.-]+")
MAX_ERROR_TEXT = 200


def scrub(text: str, *, personal: tuple[str, ...] = (), limit: int = MAX_ERROR_TEXT) -> str:
    """Text from elsewhere (a destination's error answer, a server's reply) made fit for logs
    and delivery records: on one line, at most ``limit`` characters, every email address
    masked, and each of ``personal`` (the learner's name, say) replaced by ``***``."""
    text = " ".join(text.split())
    for value in sorted({v for v in personal if len(v) >= 3}, key=len, reverse=True):
        text = re.sub(re.escape(value), "***", text, flags=re.IGNORECASE)
    text = _ADDRESS_IN_TEXT_RE.sub(lambda m: mask_email(m.group(0)), text)
    return text if len(text) <= limit else text[: limit - 1] + "…"


def mask_email(address: str) -> str:
    """``learner7@example.org`` -> ``l***@example.org``."""
    local, sep, domain = address.partition("@")
    if not sep:
        return "***"
    return f"{local[:1]}***@{domain}"
