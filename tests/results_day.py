"""Helpers of the results-day tests (report, replay, retries, preview, pages): learners of one
exam, a destination that refuses one learner, configuration files the CLI reads."""

from __future__ import annotations

import json
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
from aiohttp import web

EXAM = "exm_results_day"


def learner(
    sample: bytes,
    n: int,
    *,
    exam_id: str = EXAM,
    released_at: str | None = None,
    passed: bool = True,
    attempt: str | None = None,
) -> bytes:
    """Learner ``n`` of ``exam_id`` (their own attempt id, user id, name and address)."""
    data = json.loads(sample)
    data["exam"]["id"] = exam_id
    data["attempt"]["id"] = attempt or f"att_rd{n}"
    data["user"]["id"] = f"usr_rd{n}"
    data["user"]["name"] = f"Learner Number{n}"
    data["user"]["email"] = f"learner{n}@example.org"
    if released_at is not None:
        data["attempt"]["audit"]["releasedAt"] = released_at
    if not passed:
        data["attempt"]["grade"] = {"label": "Fail", "isPass": False, "minScore": 0}
        data["attempt"]["score"], data["attempt"]["scoreFrac"] = 30, 0.3
    return json.dumps(data).encode()


@dataclass
class Picky:
    """An HTTP destination that refuses (400) bodies containing one of ``refuse`` and takes
    (200) the rest; it records what it took."""

    url: str
    refuse: list[bytes] = field(default_factory=list)
    taken: list[dict[str, Any]] = field(default_factory=list)
    answered: int = 0

    async def handle(self, request: web.Request) -> web.Response:
        body = await request.read()
        self.answered += 1
        if any(marker in body for marker in self.refuse):
            return web.Response(status=400, text="refused")
        self.taken.append({"key": request.headers.get("Idempotency-Key", ""), "body": json.loads(body)})
        return web.Response(status=200, text="ok")

    def keys(self) -> list[str]:
        """The Idempotency-Key of each body taken ("" where one came without)."""
        return [str(t["key"]) for t in self.taken]


@pytest.fixture(name="picky")
async def picky_fixture(unused_tcp_port_factory: Callable[[], int]) -> AsyncIterator[Picky]:
    port = unused_tcp_port_factory()
    dest = Picky(url=f"http://127.0.0.1:{port}/hook")
    app = web.Application()
    app.router.add_post("/hook", dest.handle)
    runner = web.AppRunner(app, access_log=None)
    await runner.setup()
    await web.TCPSite(runner, "127.0.0.1", port).start()
    yield dest
    await runner.cleanup()


def toml_value(value: Any) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, int | float):
        return repr(value)
    if isinstance(value, str):
        return json.dumps(value)
    if isinstance(value, list):
        return "[" + ", ".join(toml_value(v) for v in value) + "]"
    if isinstance(value, dict):
        return "{ " + ", ".join(f"{k} = {toml_value(v)}" for k, v in value.items()) + " }"
    raise TypeError(value)


def write_config(path: Path, integrations: list[dict[str, Any]], **top: Any) -> Path:
    """A TOML configuration with these integrations (the same tables the tests give
    ``make_settings``), so the CLI sees what the worker sees."""
    lines = [f"{k} = {toml_value(v)}" for k, v in top.items()]
    for integration in integrations:
        lines.append("\n[[integrations]]")
        lines += [f"{k} = {toml_value(v)}" for k, v in integration.items()]
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return path
