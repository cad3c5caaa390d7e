"""The retry-or-fail decision (worker/decisions.py), on its own: no Redis, no clock."""

from __future__ import annotations

from typing import Any

import msgspec
import pytest

from shared.settings import EmailIntegration, HttpIntegration
from worker.decisions import decide
from worker.integrations.base import PermanentError, TransientError, UnknownOutcome


def http(**overrides: Any) -> HttpIntegration:
    return msgspec.convert({"name": "lms", "url": "https://lms.example/", **overrides}, HttpIntegration)


def email(**overrides: Any) -> EmailIntegration:
    return msgspec.convert(
        {"name": "mail", "smtp_host": "h", "from": "a@b.org", **overrides}, EmailIntegration
    )


def test_a_status_is_delivered() -> None:
    """A send that returned a status is delivered, with that status."""
    decision = decide("202", attempt=1, config=http())
    assert (decision.outcome, decision.status, decision.retry_in) == ("delivered", "202", None)


def test_a_permanent_error_fails_at_once() -> None:
    """A permanent error fails on the first attempt, keeping its status and message."""
    decision = decide(PermanentError("HTTP 404", status="404"), attempt=1, config=http())
    assert (decision.outcome, decision.status, decision.error) == ("failed", "404", "HTTP 404")


def test_a_transient_error_retries_within_the_backoff_bounds() -> None:
    """A transient error is retried after a backoff between the integration's base and max."""
    config = http(backoff_base_seconds=2, backoff_max_seconds=30)
    for attempt in range(1, 10):
        decision = decide(TransientError("HTTP 503", status="503"), attempt=attempt, config=config)
        assert decision.outcome == "retry"
        assert decision.retry_in is not None and 2 <= decision.retry_in <= 30


def test_retry_after_is_honoured_over_a_shorter_backoff() -> None:
    """A destination's Retry-After wins over a shorter backoff."""
    error = TransientError("HTTP 429", status="429", retry_after=120)
    decision = decide(error, attempt=1, config=http(backoff_base_seconds=1, backoff_max_seconds=10))
    assert decision.retry_in == 120


def test_the_last_attempt_fails_and_says_so() -> None:
    """The attempt that reaches max_attempts fails instead of retrying, saying it gave up."""
    decision = decide(TransientError("HTTP 503", status="503"), attempt=3, config=http(max_attempts=3))
    assert decision.outcome == "failed"
    assert decision.error == "HTTP 503 (gave up after 3 attempts)"


@pytest.mark.parametrize(
    ("config", "outcome"),
    [
        (http(), "retry"),  # http's default: the same Idempotency-Key again
        (email(), "failed"),  # email's default: never a second copy to a learner
        (email(on_unknown_outcome="retry"), "retry"),
        (http(on_unknown_outcome="fail"), "failed"),
        (email(on_unknown_outcome="delivered"), "delivered"),
    ],
)
def test_an_unknown_outcome_follows_the_integrations_policy(config: Any, outcome: str) -> None:
    """An unknown outcome (handed over, no answer) follows on_unknown_outcome, whose default is
    "retry" for http and "fail" for email; every choice is marked unknown and "maybe sent"."""
    decision = decide(UnknownOutcome("no answer to DATA within 10s"), attempt=1, config=config)
    assert decision.outcome == outcome
    assert decision.unknown and decision.maybe_sent
    if outcome == "failed":
        assert decision.error is not None and "outcome unknown" in decision.error


def test_an_unknown_outcome_retried_still_stops_at_max_attempts() -> None:
    """Retried unknown outcomes count against max_attempts like any transient error."""
    decision = decide(UnknownOutcome("timed out after 10s"), attempt=2, config=http(max_attempts=2))
    assert decision.outcome == "failed" and decision.unknown
