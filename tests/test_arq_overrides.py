"""``ExamhookWorker`` overrides arq methods and reads arq's private fields (arq 0.28 is
maintenance-only, pinned exactly in pyproject.toml). Each override was written against the
arq source it replaces or wraps: one test per override fails when that source changes, so
an arq upgrade cannot silently change what the override assumes. Re-read the override
against the new arq source, then update the digest here."""

from __future__ import annotations

import hashlib
import inspect

import arq
import arq.worker
import pytest

from shared.settings import settings_from_dict
from worker.main import ExamhookWorker, create_worker

ARQ_VERSION = "0.28.0"

# arq.worker.Worker's source for each method ExamhookWorker overrides (sha256, first 16 hex
# digits), and what the override relies on there.
OVERRIDDEN = {
    # sets up sem, job_counter, tasks, queue_name, in_progress_timeout_s from its arguments
    "__init__": "edfb0cd7e05e77cf",
    # connects, then runs the poll loop: ours waits for a writable Redis first
    "main": "45ca1591c9717466",
    # the graceful signal: ours tells the deliverer first
    "handle_sig_wait_for_completion": "8f161d86834cc74e",
    # waits for tasks, then cancels main_task once: ours cancels until it ends
    "_wait_for_tasks_to_complete": "c186389a00b11500",
    # gathers tasks (re-raising), runs on_shutdown, closes the pool: ours bounds and collects
    "close": "5bcc9cb356680829",
    # writes the health key every health_check_interval: ours also reports to P:workers
    "record_health": "108f4b8686c9402d",
    # one poll: ours survives a Redis error in it
    "_poll_iteration": "f8d39d823a0a59f2",
    # one job's bookkeeping: ours survives a Redis error around it
    "run_job": "589a19059ff84ee7",
    # claims due jobs with WATCH/MULTI and the semaphore: ours skips full lanes, frees slots
    "start_jobs": "b45797cfa40bed7f",
}

# arq's private fields ExamhookWorker reads or writes.
PRIVATE_FIELDS = (
    "sem",
    "job_counter",
    "max_jobs",
    "tasks",
    "queue_name",
    "in_progress_timeout_s",
    "_last_health_check",
    "_job_completion_wait",
    "_handle_signals",
    "_pool",
    "main_task",
    "jobs_complete",
    "jobs_retried",
)


def test_arq_is_the_version_the_overrides_were_checked_against() -> None:
    """The installed arq is the pinned one."""
    assert arq.VERSION == ARQ_VERSION


def test_every_override_is_listed() -> None:
    """Every arq method ExamhookWorker defines again is pinned below (a new override must be
    checked and listed)."""
    overridden = {
        name
        for name in vars(ExamhookWorker)
        if (callable(getattr(arq.worker.Worker, name, None)) and not name.startswith("__"))
        or name == "__init__"
    }
    assert overridden == set(OVERRIDDEN)


@pytest.mark.parametrize("name", sorted(OVERRIDDEN))
def test_the_arq_method_under_an_override_is_unchanged(name: str) -> None:
    """arq's source of the overridden method is the one the override was written against, and
    the override keeps its signature."""
    original = getattr(arq.worker.Worker, name)
    digest = hashlib.sha256(inspect.getsource(original).encode()).hexdigest()[:16]
    assert digest == OVERRIDDEN[name], f"arq.worker.Worker.{name} changed: re-check ExamhookWorker.{name}"
    if name != "__init__":
        ours = inspect.signature(getattr(ExamhookWorker, name))
        assert list(ours.parameters) == list(inspect.signature(original).parameters)


async def test_the_private_fields_read_exist() -> None:
    """The arq fields the overrides use exist on a worker as arq builds it."""
    settings = settings_from_dict(
        {"integrations": [{"name": "f", "type": "file", "path": "/tmp/examhook-arq-fields.jsonl"}]}
    )
    worker = create_worker(settings)
    missing = [field for field in PRIVATE_FIELDS if not hasattr(worker, field)]
    assert missing == []
