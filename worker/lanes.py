"""Lanes: each integration's own share of a worker process.

An integration's sends wait for a slot of its own lane (``capacity`` at once: its
``concurrency``, or the size of its connection pool), never for another integration's.
A fan-out job sends a pair at once only when its lane can start it soon; otherwise it
hands the pair on to a job of its own, due when the lane should have room (a slow SMTP
server then holds up only email, and no worker slot waits for it). The estimates come
from the lane's recent send durations.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections import deque

# How much a new send's duration moves the lane's estimate.
SMOOTHING = 0.2
# The estimate before the first send finished.
INITIAL_SECONDS_PER_SEND = 0.05


class Lane:
    """At most ``capacity`` sends at once, granted in arrival order."""

    def __init__(self, name: str, capacity: int) -> None:
        assert capacity >= 1
        self.name = name
        self.capacity = capacity
        self.busy = 0
        self._waiters: deque[asyncio.Future[None]] = deque()
        self._started: deque[float] = deque()  # loop times the sends in flight got their slots
        self.seconds_per_send = INITIAL_SECONDS_PER_SEND
        self._measured = False
        # loop time until which the work handed on from here is expected to keep the lane busy
        self._booked_until = 0.0

    @property
    def waiting(self) -> int:
        return sum(1 for waiter in self._waiters if not waiter.done())

    @property
    def full(self) -> bool:
        """Every slot taken, or promised to a waiter: a new send would wait."""
        return self.busy + self.waiting >= self.capacity

    def expected_wait(self) -> float:
        """Seconds a send arriving now would wait for a slot (0 when one is free)."""
        if self.busy < self.capacity and not self._waiters:
            return 0.0
        return (self.waiting + 1) / self.capacity * self._per_send()

    def _per_send(self) -> float:
        # before (or beyond) what finished sends say, the oldest send in flight shows how slow
        # the destination is right now
        oldest = asyncio.get_running_loop().time() - self._started[0] if self._started else 0.0
        return max(self.seconds_per_send, oldest)

    async def acquire(self, until: float) -> bool:
        """Wait for a slot until loop time ``until``; False (and no slot) if none came by then."""
        loop = asyncio.get_running_loop()
        if self.busy < self.capacity and not self._waiters:
            self.busy += 1
            self._started.append(loop.time())
            return True
        if until <= loop.time():
            return False
        waiter: asyncio.Future[None] = loop.create_future()
        self._waiters.append(waiter)
        try:
            async with asyncio.timeout_at(until):
                await waiter
            self._started.append(loop.time())
            return True
        except TimeoutError:
            if waiter.done() and not waiter.cancelled():  # granted just as the time ran out
                self._started.append(loop.time())
                self.release()
            return False
        except asyncio.CancelledError:
            if waiter.done() and not waiter.cancelled():
                self._started.append(loop.time())
                self.release()
            raise
        finally:
            if not waiter.done() or waiter.cancelled():
                with contextlib.suppress(ValueError):
                    self._waiters.remove(waiter)

    def release(self) -> None:
        """Give a slot back: to the next waiter, or free."""
        if self._started:
            self._started.popleft()
        while self._waiters:
            waiter = self._waiters.popleft()
            if not waiter.done():
                waiter.set_result(None)  # the slot passes on; ``busy`` stays
                return
        self.busy -= 1

    def observe(self, seconds: float) -> None:
        """One send took ``seconds``."""
        if not self._measured:
            self.seconds_per_send, self._measured = seconds, True
        else:
            self.seconds_per_send += SMOOTHING * (seconds - self.seconds_per_send)

    def book(self, count: int) -> float:
        """``count`` sends are handed on to later: seconds until the lane should have room
        for them, after everything waiting or handed on before them."""
        now = asyncio.get_running_loop().time()
        start = max(now + self.expected_wait(), self._booked_until)
        self._booked_until = start + count * self._per_send() / self.capacity
        return start - now
