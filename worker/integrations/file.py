"""``file``: append one JSON line per event to a file; an event never appears twice."""

from __future__ import annotations

import asyncio
import errno
import fcntl
import os
import time
from dataclasses import dataclass
from pathlib import Path

import msgspec

from shared.settings import FileIntegration
from worker.integrations.base import Delivery, Integration, PermanentError, TransientError, UnknownOutcome


def event_line(event_id: str, body: bytes) -> bytes:
    """``{"event_id": ..., "delivered_at": ..., "payload": <the body, on one line>}``."""
    delivered_at = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())
    head = msgspec.json.encode({"event_id": event_id, "delivered_at": delivered_at})
    return head[:-1] + b',"payload":' + msgspec.json.format(body, indent=0) + b"}\n"


class FileDelivery(Integration[FileIntegration]):
    """Appends under an exclusive lock (across the worker processes of a machine) and fsyncs
    before answering. Lines asked for while a write is under way are written together, with
    one lock and one fsync (a group commit, as the receiver's into Redis)."""

    def __init__(self, config: FileIntegration) -> None:
        super().__init__(config)
        self.path = Path(config.path)
        self._waiting: list[_Line] = []
        self._writer: asyncio.Task[None] | None = None
        #: locked, fsynced writes so far (each writes every line waiting then)
        self.writes = 0

    async def start(self) -> None:
        self.path.parent.mkdir(parents=True, exist_ok=True)

    async def close(self) -> None:
        """Let a write under way finish (its lines are then on disk, and their answers given)."""
        if self._writer is not None:
            await asyncio.gather(self._writer, return_exceptions=True)

    async def deliver(self, delivery: Delivery) -> str:
        line = _Line(
            delivery.event_id,
            event_line(delivery.event_id, delivery.body),
            delivery.maybe_sent_before,
            asyncio.get_running_loop().create_future(),
        )
        self._waiting.append(line)
        if self._writer is None or self._writer.done():
            self._writer = asyncio.get_running_loop().create_task(self._write_waiting())
        return await line.answer

    async def _write_waiting(self) -> None:
        while self._waiting:
            batch, self._waiting = self._waiting, []
            try:
                answers = await asyncio.to_thread(self._append, batch)
            except Exception as exc:  # a DeliveryError, or a bug: every waiting line hears of it
                for line in batch:
                    if not line.answer.done():
                        line.answer.set_exception(exc)
                continue
            for line, answer in zip(batch, answers, strict=True):
                if not line.answer.done():
                    line.answer.set_result(answer)

    def _append(self, batch: list[_Line]) -> list[str]:
        writing = False  # once lines are going out, a failure leaves them perhaps on disk
        try:
            with open(self.path, "a+b") as file:
                # one writer at a time, across worker processes on this machine
                fcntl.flock(file, fcntl.LOCK_EX)
                present: set[bytes] = set()
                if any(line.check_existing for line in batch):
                    file.seek(0)
                    present = {
                        text[: text.find(b'",') + 1] for text in file if text.startswith(b'{"event_id":"')
                    }
                answers = []
                writing = True
                for line in batch:
                    marker = b'{"event_id":"' + line.event_id.encode() + b'"'
                    if line.check_existing and marker in present:
                        answers.append("already written")
                        continue
                    file.write(line.text)
                    present.add(marker)
                    answers.append("written")
                file.flush()
                os.fsync(file.fileno())
                self.writes += 1
                return answers
        except OSError as exc:
            if writing:
                # e.g. the disk filled up mid-write: some lines may be there. The next attempt
                # looks for its line before writing (on_unknown_outcome, "retry" by default).
                raise UnknownOutcome(f"cannot finish writing {self.path}: {exc.strerror}") from None
            # A missing permission needs an operator; a full disk may clear: retry that.
            if exc.errno in (errno.EACCES, errno.EROFS, errno.EISDIR):
                raise PermanentError(f"cannot write {self.path}: {exc.strerror}") from None
            raise TransientError(f"cannot write {self.path}: {exc.strerror}") from None


@dataclass(slots=True)
class _Line:
    """One event's line, waiting to be written, and its answer."""

    event_id: str
    text: bytes
    check_existing: bool  # an earlier attempt may have written it already
    answer: asyncio.Future[str]
