"""``file``: append one JSON line per event to a file; an event never appears twice."""

from __future__ import annotations

import asyncio
import errno
import fcntl
import os
import time
from pathlib import Path

import msgspec

from shared.settings import FileIntegration
from worker.integrations.base import Delivery, Integration, PermanentError, TransientError


def event_line(event_id: str, body: bytes) -> bytes:
    """``{"event_id": ..., "delivered_at": ..., "payload": <the body, on one line>}``."""
    delivered_at = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())
    head = msgspec.json.encode({"event_id": event_id, "delivered_at": delivered_at})
    return head[:-1] + b',"payload":' + msgspec.json.format(body, indent=0) + b"}\n"


class FileDelivery(Integration[FileIntegration]):
    def __init__(self, config: FileIntegration) -> None:
        super().__init__(config)
        self.path = Path(config.path)

    async def start(self) -> None:
        self.path.parent.mkdir(parents=True, exist_ok=True)

    async def deliver(self, delivery: Delivery) -> str:
        line = event_line(delivery.event_id, delivery.body)
        return await asyncio.to_thread(self._append, delivery.event_id, line, delivery.maybe_sent_before)

    def _append(self, event_id: str, line: bytes, check_existing: bool) -> str:
        marker = f'"event_id":"{event_id}"'.encode()
        try:
            with open(self.path, "a+b") as file:
                # one writer at a time, across worker processes on this machine
                fcntl.flock(file, fcntl.LOCK_EX)
                if check_existing:
                    file.seek(0)
                    if any(line.startswith(b"{" + marker) for line in file):
                        return "already written"
                file.write(line)
                file.flush()
                os.fsync(file.fileno())
        except OSError as exc:
            # A missing permission needs an operator; a full disk may clear: retry that.
            if exc.errno in (errno.EACCES, errno.EROFS, errno.EISDIR):
                raise PermanentError(f"cannot write {self.path}: {exc.strerror}") from None
            raise TransientError(f"cannot write {self.path}: {exc.strerror}") from None
        return "written"
