"""What every command shares: loading settings, finding Redis, printing, exiting cleanly."""

from __future__ import annotations

import asyncio
import json
import os
import re
import sys
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any, NoReturn, TypeVar

import click
import msgspec
from redis.exceptions import RedisError

from shared.contract import Keys
from shared.inspection import Inspector
from shared.redis_conn import redis_client
from shared.settings import ConfigError, Settings, load_settings, mask_url
from shared.store import Store

T = TypeVar("T")

DEFAULT_DATA_DIR = ".examhook"
DEV_STATE_FILE = "dev.json"


def fail(message: str, code: int = 2) -> NoReturn:
    """One clear line on stderr, no traceback."""
    click.echo(f"examhook: {message}", err=True)
    sys.exit(code)


config_option = click.option(
    "--config",
    "config_path",
    type=click.Path(dir_okay=False),
    default=None,
    help="TOML configuration file (default: $EXAMHOOK_CONFIG, else ./examhook.toml if present).",
)
json_option = click.option("--json", "as_json", is_flag=True, help="Machine-readable output.")
data_dir_option = click.option(
    "--data-dir",
    type=click.Path(file_okay=False),
    default=DEFAULT_DATA_DIR,
    show_default=True,
    help="Where `examhook dev` keeps its embedded Valkey and files.",
)


def settings_or_exit(config_path: str | None) -> Settings:
    try:
        return load_settings(config_path)
    except ConfigError as exc:
        fail(f"configuration error: {exc}")


def with_redis_url(settings: Settings, url: str) -> Settings:
    return msgspec.structs.replace(settings, redis=msgspec.structs.replace(settings.redis, url=url))


def dev_state(data_dir: str | Path) -> dict[str, Any] | None:
    """The running ``examhook dev`` in ``data_dir``, if its process is alive."""
    path = Path(data_dir) / DEV_STATE_FILE
    try:
        state: dict[str, Any] = json.loads(path.read_text())
        os.kill(int(state["pid"]), 0)
    except (OSError, ValueError, KeyError, TypeError):
        return None
    return state


def inspection_settings(config_path: str | None, data_dir: str) -> Settings:
    """Settings for inspection commands: ``EXAMHOOK_REDIS_URL`` when set, else a running
    ``examhook dev`` in ``data_dir``, else the configured Redis."""
    settings = settings_or_exit(config_path)
    if not os.environ.get("EXAMHOOK_REDIS_URL"):
        state = dev_state(data_dir)
        if state is not None:
            settings = with_redis_url(settings, state["redis_url"])
    return settings


@asynccontextmanager
async def open_inspector(settings: Settings) -> AsyncIterator[Inspector]:
    redis = redis_client(settings)
    try:
        yield Inspector(Store(redis, Keys(settings.redis.prefix), settings.retention))
    finally:
        await redis.aclose()


def run_inspection(settings: Settings, work: Callable[[Inspector], Awaitable[T]]) -> T:
    """Run ``work`` against Redis; an unreachable Redis is one clear line and exit 1."""

    async def main() -> T:
        async with open_inspector(settings) as inspector:
            return await work(inspector)

    try:
        return asyncio.run(main())
    except (RedisError, OSError) as exc:
        fail(f"cannot reach Redis at {mask_url(settings.redis.url)}: {exc}", code=1)


def require_selection(ids: tuple[str, ...], all_: bool, name: str = "ID") -> None:
    """The ``(ID... | --all)`` of the repairing commands: one of the two, never neither or both."""
    if ids and all_:
        raise click.UsageError(f"give {name}... or --all, not both")
    if not ids and not all_:
        raise click.UsageError(f"give {name}... or --all")


_INTEGRATION_NAME = re.compile(r"^[a-z0-9-]{1,64}$")


def check_integration(settings: Settings, name: str | None, *, stored: bool = True) -> None:
    """An ``--integration NAME`` must name something: a configured integration or, with
    ``stored``, one that the stored data knows (failures, delivery records, running workers:
    the commands may be run with another configuration than the workers'). Else exit 1."""
    if name is None or settings.integration(name) is not None:
        return
    if (
        stored
        and _INTEGRATION_NAME.match(name)
        and run_inspection(settings, lambda i: i.integration_stored(name))
    ):
        return
    known = ", ".join(i.name for i in settings.integrations) or "none"
    fail(f"no integration named {name!r} (configured: {known})", code=1)


def learner_label(row: dict[str, Any]) -> str:
    """A delivery row's learner for a table: ``name (id)``, ``?`` / ``expired`` where the
    body is gone."""
    return f"{row['user_name'] or '?'} ({row['user_id'] or 'expired'})"


def print_json(data: Any) -> None:
    click.echo(msgspec.json.format(msgspec.json.encode(data), indent=2).decode())


def print_table(rows: list[dict[str, Any]], columns: list[str], empty: str = "(none)") -> None:
    if not rows:
        click.echo(empty)
        return
    cells = [[_cell(row.get(c)) for c in columns] for row in rows]
    widths = [max(len(c), *(len(r[i]) for r in cells)) for i, c in enumerate(columns)]
    click.echo("  ".join(c.upper().ljust(w) for c, w in zip(columns, widths, strict=True)).rstrip())
    for r in cells:
        click.echo("  ".join(v.ljust(w) for v, w in zip(r, widths, strict=True)).rstrip())


def _cell(value: Any, limit: int = 60) -> str:
    text = "" if value is None else str(value)
    text = text.replace("\n", " ")
    return text if len(text) <= limit else text[: limit - 1] + "…"
