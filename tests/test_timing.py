"""The worker's time limits nest (shared/timing.py): checked in code, enforced at config load."""

from __future__ import annotations

import pytest

from shared.settings import ConfigError, Settings, settings_from_dict
from shared.timing import RELEASE_WAIT_SECONDS, JobBudget
from worker.main import create_worker


def _settings(timeouts: dict[str, float], job_timeout: float | None = None) -> Settings:
    integrations = [
        {"name": name, "type": "http", "url": "http://127.0.0.1:9/", "timeout_seconds": seconds}
        for name, seconds in timeouts.items()
    ]
    worker = {} if job_timeout is None else {"job_timeout_seconds": job_timeout}
    return settings_from_dict({"integrations": integrations, "worker": worker})


@pytest.mark.parametrize("timeouts", [{"lms": 10.0}, {"lms": 0.5}, {"lms": 120.0, "mail": 1.0}])
def test_the_default_budget_nests(timeouts: dict[str, float]) -> None:
    """With the default job timeout, for any integration timeouts: every attempt fits in a
    job's run, the run and a lock release end before arq's job timeout, which ends before
    arq's lease."""
    budget = JobBudget.of(_settings(timeouts))
    assert budget.problems() == []
    for name, timeout in timeouts.items():
        assert timeout < budget.attempts[name] < budget.deadline
    assert budget.deadline + RELEASE_WAIT_SECONDS < budget.job_timeout < budget.lease


def test_a_job_timeout_too_short_for_an_attempt_is_a_configuration_error() -> None:
    """``worker.job_timeout_seconds`` that leaves an integration's attempt no room in a run is
    refused when the settings load, naming the setting and the integration."""
    with pytest.raises(ConfigError, match=r"worker\.job_timeout_seconds.*'lms'"):
        _settings({"lms": 10.0}, job_timeout=11.0)
    _settings({"lms": 10.0}, job_timeout=14.0)  # room for one attempt: fine


def test_a_broken_budget_is_refused_by_check() -> None:
    """``JobBudget.check`` raises for each broken nesting (a lease that ends first, too)."""
    broken = JobBudget(job_timeout=10.0, deadline=9.9, lease=9.0, attempts={"lms": 12.0})
    problems = broken.problems()
    assert len(problems) == 3, problems
    with pytest.raises(ConfigError, match="lease"):
        broken.check()


async def test_arq_is_given_the_budget() -> None:
    """arq's job timeout is the budget's, and arq derives the lease the budget assumes
    (its in-progress key lives job timeout + ARQ_LEASE_MARGIN_SECONDS; checked against arq
    0.28.0, pinned)."""
    settings = _settings({"lms": 10.0})
    budget = JobBudget.of(settings)
    worker = create_worker(settings)
    assert worker.job_timeout_s == budget.job_timeout
    assert worker.in_progress_timeout_s == budget.lease
