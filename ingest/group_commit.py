"""Group commit: the writes of concurrent requests share one Redis round trip.

Each request hands its event to :meth:`GroupCommit.submit` and waits for *its own*
answer. While one batch is in flight, new events gather; the next batch takes them
all, up to ``max_batch`` events and ``max_batch_bytes`` of bodies (always at least one
event), so that no Redis call grows with the load. Under load that turns thousands of round trips into a few
hundred, and a request is still answered only after Redis confirmed its write.

Counting and logging happen here too, once per batch: a log line per request cost ~10%
of the receiver's CPU, and the batch line still names every event it wrote.
"""

from __future__ import annotations

import asyncio
import logging
import time

from ingest.metrics import ReceiverMetrics, observe_many
from shared.store import Incoming, Store

log = logging.getLogger("examhook.ingest")


class GroupCommit:
    def __init__(
        self, store: Store, max_batch: int, metrics: ReceiverMetrics, *, max_batch_bytes: int = 8 << 20
    ) -> None:
        self.store = store
        self.max_batch = max_batch
        self.max_batch_bytes = max_batch_bytes
        self.metrics = metrics
        self._pending: list[tuple[Incoming, asyncio.Future[bool]]] = []
        self._flusher: asyncio.Task[None] | None = None

    def submit(self, event: Incoming) -> asyncio.Future[bool]:
        """Queue one event. The future says True if it is new, False if a duplicate, or
        raises the Redis error. (A plain function: one coroutine frame less to resume.)"""
        future: asyncio.Future[bool] = asyncio.get_running_loop().create_future()
        self._pending.append((event, future))
        if self._flusher is None:
            self._flusher = asyncio.create_task(self._flush())
        return future

    @property
    def waiting(self) -> int:
        """Events submitted and not yet answered (not counting a batch already sent)."""
        return len(self._pending)

    async def drain(self) -> None:
        """Wait until every submitted event has its answer (for shutdown)."""
        while self._flusher is not None:
            await asyncio.shield(self._flusher)

    async def _flush(self) -> None:
        try:
            while self._pending:
                count = self._batch_length()
                batch = self._pending[:count]
                del self._pending[:count]
                events = [event for event, _ in batch]
                try:
                    results = await self.store.accept_batch(events)
                except BaseException as exc:  # every waiter learns of the failure
                    for _, future in batch:
                        if not future.done():
                            future.set_exception(exc)
                    if isinstance(exc, asyncio.CancelledError):
                        raise
                    continue
                self._report(events, results)
                for (_, future), accepted in zip(batch, results, strict=True):
                    if not future.done():
                        future.set_result(accepted)
        finally:
            self._flusher = None

    def _batch_length(self) -> int:
        """How many of the pending events the next Redis call takes."""
        pending, budget = self._pending, self.max_batch_bytes
        size = len(pending[0][0].body)
        count = 1
        for event, _ in pending[1 : self.max_batch]:
            size += len(event.body)
            if size > budget:
                break
            count += 1
        return count

    def _report(self, events: list[Incoming], results: list[bool]) -> None:
        """Count a confirmed batch: its events, their answers (202 or 200) and how long each
        waited from its request's start, once per batch rather than once per request."""
        metrics = self.metrics
        metrics.batch_size.observe(len(events))
        metrics.batch_bytes.observe(sum(len(e.body) for e in events))
        accepted = sum(results)
        metrics.accepted.inc(accepted)
        metrics.duplicate.inc(len(events) - accepted)
        metrics.answered(202, accepted)
        if accepted < len(events):
            metrics.answered(200, len(events) - accepted)
        now = time.perf_counter()
        observe_many(metrics.enqueue_seconds, [now - e.started for e in events])
        if log.isEnabledFor(logging.INFO):
            # ids only: event ids are hashes, attempt ids Synap's opaque ids; no personal data
            pairs = list(zip(events, results, strict=True))
            extra: dict[str, object] = {"accepted": {e.event_id: e.attempt_id for e, ok in pairs if ok}}
            if accepted < len(events):
                extra["duplicate"] = [e.event_id for e, ok in pairs if not ok]
            log.info("queued", extra=extra)
