"""What the receiver's edge writes to the log: short lines for clients' mistakes, never
their bytes, and one line (then a count) for an outage rather than one per request."""

from __future__ import annotations

import logging
import time
from collections.abc import Callable

from aiohttp.http_exceptions import HttpProcessingError

# aiohttp's server logger: "Error handling request", "Unhandled exception", ...
AIOHTTP_SERVER = "aiohttp.server"


class ClientMistakes(logging.Filter):
    """A filter on aiohttp's server logger.

    When the HTTP parser refuses a request (a NUL in a header line, a line too long, a bad
    method...), aiohttp logs the error with a traceback whose message quotes the offending
    line, which may be an ``Authorization`` header: Synap's credentials in Base64. Such a
    record becomes one short INFO line naming the status and the kind of error, without
    traceback or quoted bytes. A connection the client dropped becomes a DEBUG line.
    Anything else (a bug: a handler's exception) is left as it is.
    """

    def filter(self, record: logging.LogRecord) -> bool:
        exc = record.exc_info[1] if record.exc_info else None
        args: tuple[object, ...]
        if isinstance(exc, HttpProcessingError):
            level = min(record.levelno, logging.INFO)
            message, args = "bad HTTP request refused: %s %s", (exc.code, type(exc).__name__)
        elif isinstance(exc, ConnectionError):
            level = logging.DEBUG
            message, args = "client connection lost: %s", (type(exc).__name__,)
        else:
            return True
        record.msg, record.args = message, args
        record.exc_info, record.exc_text, record.stack_info = None, None, None
        record.levelno, record.levelname = level, logging.getLevelName(level)
        # the record was made at its first level: drop it where the new one is not wanted
        return logging.getLogger(record.name).isEnabledFor(level)


_FILTER = ClientMistakes()


def quiet_client_mistakes() -> None:
    """Install the filter on aiohttp's server logger (once per process)."""
    logger = logging.getLogger(AIOHTTP_SERVER)
    if _FILTER not in logger.filters:
        logger.addFilter(_FILTER)


class OutageLog:
    """Logs a Redis outage seen by requests: the first failure as one ERROR line, then at
    most one summary line per ``interval`` seconds counting the requests answered 503,
    and one line when the queue works again."""

    def __init__(
        self,
        logger: logging.Logger,
        interval: float = 30.0,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.logger = logger
        self.interval = interval
        self.clock = clock
        self.active = False
        self._since = 0.0
        self._last_line = 0.0
        self._unreported = 0
        self._total = 0

    def failed(self, what: str) -> None:
        """One request was answered 503 because Redis failed (``what``: the error's class)."""
        now = self.clock()
        self._total += 1
        if not self.active:
            self.active = True
            self._since = self._last_line = now
            self.logger.error("queue unavailable: %s; answering 503 until Redis is back", what)
            return
        self._unreported += 1
        if now - self._last_line >= self.interval:
            self.logger.error(
                "queue still unavailable: %s; %d more requests answered 503 in the last %.0f s",
                what,
                self._unreported,
                now - self._last_line,
                extra={"answered_503": self._unreported},
            )
            self._last_line = now
            self._unreported = 0

    def recovered(self) -> None:
        """A write succeeded: close the outage with one line."""
        if not self.active:
            return
        self.logger.warning(
            "queue available again after %.1f s; %d requests were answered 503",
            self.clock() - self._since,
            self._total,
            extra={"answered_503": self._total},
        )
        self.active = False
        self._unreported = self._total = 0
