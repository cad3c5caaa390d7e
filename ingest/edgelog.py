"""What the receiver's edge writes to the log: short lines for clients' mistakes, never
their bytes."""

from __future__ import annotations

import logging

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
