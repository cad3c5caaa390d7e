"""``examhook send-sample``: realistic made-up events, for trying the system out."""

from __future__ import annotations

import asyncio
import copy
import json
import random
import secrets
from collections import Counter
from datetime import UTC, datetime, timedelta
from importlib.resources import files
from typing import Any

import aiohttp
import click

from shared.settings import Settings

FIRST = [
    "Ada",
    "Alan",
    "Grace",
    "Katherine",
    "Tim",
    "Margaret",
    "Edsger",
    "Barbara",
    "Donald",
    "Frances",
    "Ken",
    "Radia",
    "Sophie",
    "Niklaus",
    "Hedy",
    "Linus",
]
LAST = [
    "Lovelace",
    "Turing",
    "Hopper",
    "Johnson",
    "Berners-Lee",
    "Hamilton",
    "Dijkstra",
    "Liskov",
    "Knuth",
    "Allen",
    "Thompson",
    "Perlman",
    "Wilson",
    "Wirth",
    "Lamarr",
    "Torvalds",
]


def _iso(moment: datetime) -> str:
    return moment.isoformat(timespec="milliseconds").replace("+00:00", "Z")


def sample_events(count: int, *, seed: int | None = None) -> list[bytes]:
    """``count`` distinct events shaped like Synap's sample, with varied learners and grades."""
    template = json.loads((files("shared") / "sample.json").read_text(encoding="utf-8"))
    rng = random.Random(seed)
    now = datetime.now(UTC)
    bodies = []
    for _ in range(count):
        event: dict[str, Any] = copy.deepcopy(template)
        first, last = rng.choice(FIRST), rng.choice(LAST)
        user_id = "usr_" + secrets.token_hex(8)
        event["user"].update(
            id=user_id,
            name=f"{first} {last}",
            email=f"{first.lower()}.{last.lower().replace('-', '')}.{user_id[-4:]}@example.org",
        )
        attempt = event["attempt"]
        total = attempt["marks"]["maxPoints"]
        points = rng.randint(int(total * 0.2), total)
        attempt["marks"]["points"] = points
        attempt["score"] = round(points * 100 / total, 2)
        attempt["scoreFrac"] = round(points / total, 4)
        attempt["totalAnsweredCorrectly"] = points
        grade = next(g for g in attempt["gradeCriteria"]["grades"] if attempt["score"] >= g["minScore"])
        attempt["grade"] = dict(grade)
        attempt["id"] = "att_" + secrets.token_hex(10)
        released = now - timedelta(seconds=rng.randint(0, 600))
        attempt["audit"]["releasedAt"] = _iso(released)
        event["meta"]["timestamp"] = _iso(now)
        event["id"] = "ue_" + attempt["id"][4:]
        bodies.append(json.dumps(event).encode())
    return bodies


async def send_samples(settings: Settings, *, url: str, count: int, concurrency: int) -> int:
    headers = {"Content-Type": "application/json"}
    receiver = settings.receiver
    if receiver.basic_auth_user and receiver.basic_auth_password:
        headers["Authorization"] = aiohttp.encode_basic_auth(
            receiver.basic_auth_user, receiver.basic_auth_password
        )
    statuses: Counter[str] = Counter()
    bodies = sample_events(count)
    gate = asyncio.Semaphore(concurrency)

    async def post(session: aiohttp.ClientSession, body: bytes) -> None:
        async with gate:
            try:
                async with session.post(url, data=body, headers=headers) as response:
                    await response.read()
                    statuses[str(response.status)] += 1
            except aiohttp.ClientError as exc:
                statuses[f"error ({exc.__class__.__name__})"] += 1

    timeout = aiohttp.ClientTimeout(total=30)
    async with aiohttp.ClientSession(timeout=timeout) as session:
        await asyncio.gather(*(post(session, body) for body in bodies))
    summary = ", ".join(f"{status}: {n}" for status, n in sorted(statuses.items()))
    click.echo(f"sent {count} sample events to {url} -> {summary}")
    ok = sum(n for status, n in statuses.items() if status.startswith("2"))
    return 0 if ok == count else 1
