"""The worker's time limits, and how they nest.

Innermost first, for one integration (``timeout_seconds``, the default worker settings):

    one send            timeout_seconds                      each integration enforces it
    its backstop        timeout_seconds + BACKSTOP_SECONDS    cut if an integration overruns
    one attempt         timeout_seconds + <= 1 s              claim + send + record; an attempt
                                                              starts only if it fits in the run
  < the job's run       JobBudget.deadline                    examhook's own limit: the job is
                        (job timeout - 3 s, or 80 % below     kept (``Retry``), never dropped
                        15 s)
    + RELEASE_WAIT      0.2 s                                 a cut attempt frees its lock
  < arq's job timeout   worker.job_timeout_seconds            past it arq would drop the job
                        (default: slowest timeout + 10 s)
  < arq's lease         job timeout + ARQ_LEASE_MARGIN        the in-progress key: a killed
                                                              worker's job runs again after it

A pair's lock lives ``job timeout`` and is renewed every third of that while an outcome
waits to be written; a claim that finds an unfinished earlier attempt waits
``RECOVERY_GRACE_MS`` for its worker to record it. :meth:`JobBudget.check` raises
:class:`ConfigError` when a setting would break the nesting: it runs when settings are
loaded and when a worker starts.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from shared.settings import Settings

# How long a send may overrun its integration's own timeout before it is cut (a backstop:
# every integration enforces timeout_seconds itself).
BACKSTOP_SECONDS = 5.0
# How long a cancelled attempt waits for its lock to be released (a courtesy: it expires).
RELEASE_WAIT_SECONDS = 0.2
# A claim that finds a pair's previous attempt unfinished waits this long before sending it
# again: the worker that sent it may still be alive and about to record its outcome.
RECOVERY_GRACE_MS = 5000
# arq's in-progress key lives the largest job timeout plus this (arq.worker.Worker.__init__).
ARQ_LEASE_MARGIN_SECONDS = 10.0
# An attempt's allowance for its claim and record, at most (less when the run leaves less).
BOOKKEEPING_SECONDS = 1.0


def job_deadline_seconds(job_timeout: float) -> float:
    """How long one run of a job may take before examhook gives up on it (and keeps the job),
    safely before arq's own job timeout, which would drop it."""
    return job_timeout - 3.0 if job_timeout >= 15 else job_timeout * 0.8


def attempt_seconds(timeout: float, deadline: float) -> float:
    """What one attempt may take: the send's ``timeout``, plus its claim and record (up to
    :data:`BOOKKEEPING_SECONDS`, less when the run leaves less: a run always has room for one)."""
    return timeout + min(BOOKKEEPING_SECONDS, max(0.0, deadline - timeout) / 2)


@dataclass(frozen=True)
class JobBudget:
    """The nesting above for one worker's settings, in seconds."""

    job_timeout: float
    deadline: float
    lease: float
    attempts: dict[str, float] = field(default_factory=dict)

    @property
    def lock_ttl_ms(self) -> int:
        return int(self.job_timeout * 1000)

    @property
    def keep_locks_every(self) -> float:
        """How often the locks of outcomes waiting to be written are renewed: a third of their
        TTL (at least 0.5 s, at most 10 s)."""
        return max(0.5, min(self.job_timeout / 3, 10.0))

    @classmethod
    def of(cls, settings: Settings) -> JobBudget:
        job_timeout = settings.job_timeout_seconds
        deadline = job_deadline_seconds(job_timeout)
        return cls(
            job_timeout=job_timeout,
            deadline=deadline,
            lease=job_timeout + ARQ_LEASE_MARGIN_SECONDS,
            attempts={i.name: attempt_seconds(i.timeout_seconds, deadline) for i in settings.integrations},
        )

    def problems(self) -> list[str]:
        """Each way this budget breaks the nesting (empty when it holds)."""
        found = []
        for name, seconds in self.attempts.items():
            if seconds >= self.deadline:
                found.append(f"an attempt of {name!r} ({seconds:g}s) does not fit in a job's run")
        if self.deadline + RELEASE_WAIT_SECONDS >= self.job_timeout:
            found.append("a job's run and its lock release do not end before arq's job timeout")
        if self.job_timeout >= self.lease:
            found.append("arq's job timeout must end before its lease")
        if self.keep_locks_every >= self.lock_ttl_ms / 1000:
            found.append("locks would expire before they are renewed")
        return found

    def check(self) -> JobBudget:
        from shared.settings import ConfigError

        problems = self.problems()
        if problems:
            raise ConfigError(
                f"worker.job_timeout_seconds = {self.job_timeout:g}: "
                + "; ".join(problems)
                + " (the default, the largest timeout_seconds + 10, is safe)"
            )
        return self
