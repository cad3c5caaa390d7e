"""Group commit: the writes of concurrent requests share one Redis round trip.

Each request hands its event to :meth:`GroupCommit.submit` and waits for *its own*
answer. While one batch is in flight, new events gather; the next batch takes them
all (up to ``max_batch``). Under load that turns thousands of round trips into a few
hundred, and a request is still answered only after Redis confirmed its write.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable

from shared.contract import HANDLE_EVENT, encode_job
from shared.store import Incoming, Store, now_ms


class GroupCommit:
    def __init__(self, store: Store, max_batch: int, on_batch: Callable[[int], None] | None = None) -> None:
        self.store = store
        self.max_batch = max_batch
        self.on_batch = on_batch
        self._pending: list[tuple[Incoming, asyncio.Future[bool]]] = []
        self._flusher: asyncio.Task[None] | None = None

    async def submit(self, event: Incoming) -> bool:
        """Queue one event; True if it is new, False if a duplicate. Raises on Redis errors."""
        future: asyncio.Future[bool] = asyncio.get_running_loop().create_future()
        self._pending.append((event, future))
        if self._flusher is None:
            self._flusher = asyncio.create_task(self._flush())
        return await future

    async def drain(self) -> None:
        """Wait until every submitted event has its answer (for shutdown)."""
        while self._flusher is not None:
            await asyncio.shield(self._flusher)

    async def _flush(self) -> None:
        try:
            while self._pending:
                batch = self._pending[: self.max_batch]
                del self._pending[: self.max_batch]
                enqueued = now_ms()
                events = [event for event, _ in batch]
                jobs = [
                    encode_job(HANDLE_EVENT, (e.event_id, e.attempt_id, e.released_ms), enqueued)
                    for e in events
                ]
                try:
                    results = await self.store.accept_batch(events, jobs)
                except BaseException as exc:  # every waiter learns of the failure
                    for _, future in batch:
                        if not future.done():
                            future.set_exception(exc)
                    if isinstance(exc, asyncio.CancelledError):
                        raise
                    continue
                if self.on_batch is not None:
                    self.on_batch(len(batch))
                for (_, future), accepted in zip(batch, results, strict=True):
                    if not future.done():
                        future.set_result(accepted)
        finally:
            self._flusher = None
