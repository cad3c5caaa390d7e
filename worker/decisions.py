"""What follows from one attempt's result: delivered, retry (and when), or failed.

One small pure function, :func:`decide`, with no Redis and no clock of its own, so every
rule (attempt limit, backoff, ``Retry-After``, unknown outcomes) is tested on its own
(``tests/test_decisions.py``).
"""

from __future__ import annotations

from dataclasses import dataclass

from shared.settings import IntegrationBase
from shared.store import AttemptOutcome
from worker.backoff import backoff_seconds
from worker.integrations.base import DeliveryError, PermanentError, TransientError, UnknownOutcome


@dataclass(frozen=True, slots=True)
class Decision:
    outcome: AttemptOutcome
    status: str | None = None
    error: str | None = None
    retry_in: float | None = None  # seconds, when outcome is "retry"
    # the destination may have it: the next attempt is told "maybe sent before"
    maybe_sent: bool = False
    # the attempt's outcome was unknown (counted, and shown in its attempt record)
    unknown: bool = False


def decide(result: str | DeliveryError, *, attempt: int, config: IntegrationBase) -> Decision:
    """The decision for attempt number ``attempt`` (1-based within its round), given what
    the integration answered: a status (sent) or the error it raised."""
    if isinstance(result, str):
        return Decision("delivered", status=result)
    if isinstance(result, UnknownOutcome):
        policy = config.unknown_outcome_policy
        if policy == "delivered":
            return Decision(
                "delivered", status="unknown", error=result.message, maybe_sent=True, unknown=True
            )
        if policy == "fail":
            return Decision(
                "failed",
                status=result.status,
                error=f"outcome unknown, not sent again (on_unknown_outcome = fail): {result.message}",
                maybe_sent=True,
                unknown=True,
            )
        retried = _transient(result, attempt, config)
        return Decision(
            retried.outcome, retried.status, retried.error, retried.retry_in, maybe_sent=True, unknown=True
        )
    if isinstance(result, PermanentError):
        return Decision("failed", status=result.status, error=result.message)
    assert isinstance(result, TransientError)
    return _transient(result, attempt, config)


def _transient(error: TransientError, attempt: int, config: IntegrationBase) -> Decision:
    if attempt >= config.max_attempts:
        return Decision(
            "failed", status=error.status, error=f"{error.message} (gave up after {attempt} attempts)"
        )
    wait = backoff_seconds(
        attempt, config.backoff_base_seconds, config.backoff_max_seconds, error.retry_after
    )
    return Decision("retry", status=error.status, error=error.message, retry_in=wait)
