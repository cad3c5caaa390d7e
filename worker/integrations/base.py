"""What every integration implements, and how it reports an outcome.

An integration's :meth:`Integration.deliver` returns a short status on success
(``"200"``, ``"250"``, ``"inserted"``) or raises :class:`TransientError` (try again
later, after backoff or ``retry_after``) or :class:`PermanentError` (never retry).
Attempts, backoff, records and "never twice" are handled around it, in
:mod:`worker.delivery`, identically for every type.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Generic, TypeVar

from shared.payload import ExamResultsReleased
from shared.settings import IntegrationBase
from worker.integrations.releases import EarlierRelease


async def _nothing() -> None:
    return None


@dataclass(frozen=True, slots=True)
class Delivery:
    event_id: str
    body: bytes  # exactly as received from Synap
    event: ExamResultsReleased
    attempt: int  # 1 for the first attempt of this round
    # A previous attempt started and never recorded an outcome (a crash mid-send), or its
    # outcome was unknown: integrations that can, check whether it already landed.
    maybe_sent_before: bool = False
    # An integration whose send has one irrevocable step (an email's DATA) awaits this just
    # before it (see :attr:`Integration.marks_hand_over`); it raises if the mark could not be
    # made, and then nothing must be sent.
    hand_over: Callable[[], Awaitable[None]] = _nothing
    # For integrations with ``wants_earlier_release``: the release of the same attempt this
    # one replaces (a re-release), or None (a first release, or unknown).
    earlier: EarlierRelease | None = None


class DeliveryError(Exception):
    def __init__(self, message: str, *, status: str | None = None) -> None:
        super().__init__(message)
        self.message = message
        self.status = status


class TransientError(DeliveryError):
    """Worth retrying: network errors, timeouts, 5xx, 429, SMTP 4xx..."""

    def __init__(self, message: str, *, status: str | None = None, retry_after: float | None = None) -> None:
        super().__init__(message, status=status)
        self.retry_after = retry_after


class PermanentError(DeliveryError):
    """Retrying cannot help: other 4xx, invalid address, SMTP 5xx, schema errors..."""


class UnknownOutcome(TransientError):
    """It was handed over and no answer came (a timeout or a lost connection while waiting
    for the reply): the destination may have it. What follows is the integration's
    ``on_unknown_outcome`` policy (worker/decisions.py)."""


ConfigT = TypeVar("ConfigT", bound=IntegrationBase)


class Integration(Generic[ConfigT]):
    """Base class: one instance per configured integration per worker process."""

    # True when deliver() awaits ``delivery.hand_over()`` before its irrevocable step: a
    # crash before that step then means "not sent" (sent again without doubt), after it
    # "outcome unknown" (the on_unknown_outcome policy). Otherwise any unfinished attempt
    # counts as "maybe sent before".
    marks_hand_over: bool = False
    # True when deliver() uses ``delivery.earlier`` (the worker then looks it up: one more
    # Redis round trip per attempt).
    wants_earlier_release: bool = False

    def __init__(self, config: ConfigT) -> None:
        self.config = config

    @property
    def name(self) -> str:
        return self.config.name

    async def start(self) -> None:
        """Open connections/pools (called once at worker start)."""

    async def close(self) -> None:
        """Release what start() opened."""

    async def deliver(self, delivery: Delivery) -> str:
        raise NotImplementedError
