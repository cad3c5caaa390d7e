"""The ``examhook`` command."""

from __future__ import annotations

import asyncio
import json
import logging
import os
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any, NoReturn, TypeVar

import click

from cli.common import (
    check_integration,
    config_option,
    data_dir_option,
    dev_state,
    fail,
    inspection_settings,
    json_option,
    learner_label,
    print_json,
    print_table,
    require_selection,
    run_inspection,
    settings_or_exit,
)
from cli.results import register as register_results_day
from cli.results import results_settings
from shared.inspection import Inspector, iso
from shared.logs import configure_logging
from shared.process import tune_gc
from shared.settings import Settings, masked

F = TypeVar("F", bound=Callable[..., Any])


@click.group(context_settings={"help_option_names": ["-h", "--help"], "max_content_width": 100})
@click.version_option(package_name="examhook")
def cli() -> None:
    """examhook: receive Synap "Exam Results Released" webhooks and deliver them reliably."""


# -- services ----------------------------------------------------------------------------


@cli.command()
@click.option("--host", default=None, help="Address to listen on (default: receiver.host, 0.0.0.0).")
@click.option("--port", type=int, default=None, help="Port to listen on (default: receiver.port, 8080).")
@click.option(
    "--no-auth", is_flag=True, help="Accept requests without Basic credentials (not for production)."
)
@click.option(
    "--processes",
    type=click.IntRange(1, 64),
    default=1,
    show_default=True,
    help="Receiver processes sharing the port (SO_REUSEPORT).",
)
@click.option("--reuse-port", is_flag=True, hidden=True)
@config_option
def receive(
    host: str | None,
    port: int | None,
    no_auth: bool,
    processes: int,
    reuse_port: bool,
    config_path: str | None,
) -> None:
    """Run the HTTP receiver."""
    settings = settings_or_exit(config_path)
    if not settings.auth_configured and not no_auth:
        fail(
            "no Basic auth credentials: set EXAMHOOK_BASIC_AUTH_USER and EXAMHOOK_BASIC_AUTH_PASSWORD "
            "(or receiver.basic_auth_user/basic_auth_password), or pass --no-auth"
        )
    host = host or settings.receiver.host
    port = settings.receiver.port if port is None else port
    if not reuse_port:  # the parent checks once for all its children
        problems = asyncio.run(_permission_problems(settings))
        if problems:
            fail("Redis: " + "; ".join(problems))
    if processes > 1:
        sys.exit(_run_processes(processes, host, port, no_auth, config_path))
    configure_logging(settings.log_level)
    from aiohttp import web

    from ingest.app import create_app

    log = logging.getLogger("examhook.ingest")
    if not settings.auth_configured:
        log.warning("authentication is OFF (--no-auth): anyone can post results")
    app = create_app(settings, require_auth=not no_auth)
    tune_gc()
    log.info("receiver listening", extra={"host": host, "port": port, "pid": os.getpid()})
    web.run_app(
        app,
        host=host,
        port=port,
        access_log=None,
        print=None,
        reuse_port=reuse_port or None,
        shutdown_timeout=30.0,
        handler_cancellation=False,
    )


def _run_processes(count: int, host: str, port: int, no_auth: bool, config_path: str | None) -> int:
    """Start ``count`` receivers on one port (SO_REUSEPORT); forward signals; wait.

    The children share a private metrics directory (prometheus_client's multiprocess
    mode), so that /metrics of any of them shows the sum of all; it is removed at the end.
    """
    import shutil
    import tempfile

    from ingest.metrics import MULTIPROCESS_ENV

    args = [sys.executable, "-m", "cli.main", "receive", "--host", host, "--port", str(port), "--reuse-port"]
    if no_auth:
        args.append("--no-auth")
    if config_path:
        args += ["--config", config_path]
    metrics_dir = tempfile.mkdtemp(prefix="examhook-metrics-")
    try:
        env = {**os.environ, MULTIPROCESS_ENV: metrics_dir}
        children = [subprocess.Popen(args, env=env) for _ in range(count)]

        def forward(signum: int, _frame: Any) -> None:
            for child in children:
                if child.poll() is None:
                    child.send_signal(signum)

        signal.signal(signal.SIGTERM, forward)
        signal.signal(signal.SIGINT, forward)
        codes = [child.wait() for child in children]
        return max(codes)
    finally:
        shutil.rmtree(metrics_dir, ignore_errors=True)


@cli.command()
@click.option(
    "--concurrency",
    type=click.IntRange(1, 10_000),
    default=None,
    help="Events handled at once by this process (default: worker.concurrency, 50).",
)
@click.option("--burst", is_flag=True, help="Exit once the queue is empty.")
@click.option(
    "--check",
    is_flag=True,
    help="Health check: exit 0 if a worker on this host reported recently, else 1.",
)
@click.option(
    "--metrics-port",
    type=click.IntRange(0, 65535),
    default=None,
    help="Serve this process's /metrics on this port (overrides worker.metrics_port).",
)
@config_option
def worker(
    concurrency: int | None, burst: bool, check: bool, metrics_port: int | None, config_path: str | None
) -> None:
    """Run one arq worker process (run as many as you like)."""
    settings = settings_or_exit(config_path)
    if check:
        sys.exit(asyncio.run(_worker_health(settings)))
    configure_logging(settings.log_level)
    from redis.exceptions import RedisError

    from shared.settings import ConfigError
    from worker.main import create_worker

    try:
        built = create_worker(settings, burst=burst, concurrency=concurrency, metrics_port=metrics_port)
        tune_gc()
        built.run()
    except ConfigError as exc:
        fail(f"configuration error: {exc}")
    except RedisError as exc:  # what retrying cannot mend: wrong password, unknown ACL user...
        click.echo(f"examhook worker: Redis refused the worker: {exc.__class__.__name__}: {exc}", err=True)
        sys.exit(1)


async def _worker_health(settings: Settings) -> int:
    """Exit code of ``worker --check``: 0 when a worker of this host reported within its
    health-check interval (another host's workers, or one stopping here, change nothing)."""
    from redis.exceptions import RedisError

    from shared.contract import Keys
    from shared.redis_conn import redis_client
    from worker.registry import is_alive, read_entries, this_host

    redis = redis_client(settings)
    try:
        entries = await read_entries(redis, Keys(settings.redis.prefix))
    except (RedisError, OSError) as exc:
        click.echo(f"unhealthy: cannot reach Redis ({exc.__class__.__name__})", err=True)
        return 1
    finally:
        await redis.aclose()
    host = this_host()
    now = int(time.time() * 1000)
    here = [e for e in entries.values() if e.host == host]
    alive = [e for e in here if is_alive(e, now)]
    if not alive:
        reason = "no worker on this host has reported recently" if here else "no worker runs on this host"
        click.echo(f"unhealthy: {reason} ({host})", err=True)
        return 1
    click.echo(f"healthy: {len(alive)} worker(s) on {host}, pid " + ", ".join(str(e.pid) for e in alive))
    return 0


@cli.command()
@click.option("--port", type=int, default=None, help="Receiver port (default: receiver.port, 8080).")
@click.option("--host", default="127.0.0.1", show_default=True, help="Receiver address.")
@data_dir_option
@config_option
def dev(port: int | None, host: str, data_dir: str, config_path: str | None) -> None:
    """Receiver + one worker + (unless EXAMHOOK_REDIS_URL is set) an embedded Valkey."""
    from cli import dev as dev_module

    settings = settings_or_exit(config_path)
    port = settings.receiver.port if port is None else port
    sys.exit(dev_module.run_dev(settings, port=port, host=host, data_dir=data_dir))


@cli.command("send-sample")
@click.option("--url", default="http://127.0.0.1:8080/webhooks/exam-results-released", show_default=True)
@click.option("--count", type=click.IntRange(1, 1_000_000), default=1, show_default=True)
@click.option("--concurrency", type=click.IntRange(1, 1000), default=20, show_default=True)
@config_option
def send_sample(url: str, count: int, concurrency: int, config_path: str | None) -> None:
    """Post realistic sample events (with the configured Basic credentials)."""
    from cli.sample import send_samples

    settings = settings_or_exit(config_path)
    sys.exit(asyncio.run(send_samples(settings, url=url, count=count, concurrency=concurrency)))


@cli.command("check-config")
@click.option(
    "--redis",
    "check_redis",
    is_flag=True,
    help="Also connect to Redis and check that its user has every permission examhook needs.",
)
@json_option
@config_option
def check_config(check_redis: bool, as_json: bool, config_path: str | None) -> None:
    """Validate the configuration and print the effective settings (secrets masked), with
    warnings about what is allowed but probably not meant. Any error: exit 2 (with --json,
    {"ok": false, "errors": [...]} on stdout)."""
    from shared.settings import ConfigError, load_settings

    try:
        settings = load_settings(config_path)
    except ConfigError as exc:
        _config_errors([str(exc)], as_json)
    problems = _template_problems(settings)
    if check_redis:
        problems += asyncio.run(_redis_problems(settings))
    if problems:
        _config_errors(problems, as_json)
    warnings = _config_warnings(settings)
    data = masked(settings)
    if as_json:
        print_json({"ok": True, "warnings": warnings, **data})
        return
    for warning in warnings:
        click.echo(f"warning: {warning}", err=True)
    click.echo(f"configuration OK ({settings.source or 'no file; defaults and environment'})")
    _print_tree(data)


def _config_errors(errors: list[str], as_json: bool) -> NoReturn:
    """Exit 2: one line per error on stderr; with --json also the errors as JSON on stdout."""
    if as_json:
        print_json({"ok": False, "errors": errors})
    for error in errors:
        click.echo(f"examhook: configuration error: {error}", err=True)
    sys.exit(2)


# An admin token shorter than this, or made of fewer distinct characters, is easy to guess.
WEAK_TOKEN_LENGTH = 24
WEAK_TOKEN_CHARACTERS = 10


def _config_warnings(settings: Settings) -> list[str]:
    """What a valid configuration probably did not mean."""
    warnings = []
    if not settings.auth_configured:
        warnings.append(
            "no Basic auth credentials (receiver.basic_auth_user/basic_auth_password or "
            "EXAMHOOK_BASIC_AUTH_USER/EXAMHOOK_BASIC_AUTH_PASSWORD): `receive` refuses to start "
            "without them (unless --no-auth) and `dev` accepts anyone's posts"
        )
    if not settings.integrations:
        warnings.append(
            "no integrations are configured: a worker refuses to start "
            "(`dev` delivers to a local file instead)"
        )
    token = settings.admin_token
    if token and (len(token) < WEAK_TOKEN_LENGTH or len(set(token)) < WEAK_TOKEN_CHARACTERS):
        warnings.append(
            f"admin_token is weak (fewer than {WEAK_TOKEN_LENGTH} characters, or fewer than "
            f"{WEAK_TOKEN_CHARACTERS} different ones): anyone who guesses it sees learners' "
            "results in /admin; make one with: python -c 'import secrets; print(secrets.token_urlsafe(32))'"
        )
    return warnings


async def _permission_problems(settings: Settings) -> list[str]:
    """Permissions the Redis user lacks, when Redis can tell now; nothing when it is away or
    refusing writes (a receiver starts anyway: /readyz says 503 until Redis is back)."""
    from redis.exceptions import RedisError

    from shared.contract import Keys
    from shared.redis_check import advice, missing_permissions
    from shared.redis_conn import redis_client

    keys = Keys(settings.redis.prefix)
    redis = redis_client(settings)
    try:
        problems = await missing_permissions(redis, keys)
    except (RedisError, OSError):
        return []
    finally:
        await redis.aclose()
    return [f"{p} ({advice(keys)})" for p in problems]


async def _redis_problems(settings: Settings) -> list[str]:
    from redis.exceptions import RedisError

    from shared.contract import Keys
    from shared.redis_check import advice, missing_permissions
    from shared.redis_conn import redis_client
    from shared.settings import mask_url

    keys = Keys(settings.redis.prefix)
    redis = redis_client(settings)
    try:
        await redis.ping()
        problems = await missing_permissions(redis, keys)
    except (RedisError, OSError) as exc:
        return [f"redis.url: cannot use Redis at {mask_url(settings.redis.url)}: {exc.__class__.__name__}"]
    finally:
        await redis.aclose()
    return [f"redis: {p} ({advice(keys)})" for p in problems]


def _template_problems(settings: Any) -> list[str]:
    from shared.settings import EmailIntegration

    problems: list[str] = []
    for integration in settings.integrations:
        if isinstance(integration, EmailIntegration):
            from worker.integrations.email import check_addresses, check_templates

            found = check_addresses(integration) + check_templates(integration)
            problems += [f"integrations.{integration.name}: {p}" for p in found]
    return problems


def _print_tree(data: Any, indent: int = 0) -> None:
    pad = "  " * indent
    if isinstance(data, dict):
        for key, value in data.items():
            if _nested(value):
                click.echo(f"{pad}{key}:")
                _print_tree(value, indent + 1)
            else:
                click.echo(f"{pad}{key}: {value}")
    elif isinstance(data, list):
        for item in data:
            if isinstance(item, dict) and item:
                # the first key on the dash's line, the others under it (as YAML does)
                first, *rest = item.items()
                click.echo(f"{pad}- {first[0]}:" if _nested(first[1]) else f"{pad}- {first[0]}: {first[1]}")
                if _nested(first[1]):
                    _print_tree(first[1], indent + 2)
                _print_tree(dict(rest), indent + 1)
            elif _nested(item):
                click.echo(f"{pad}-")
                _print_tree(item, indent + 1)
            else:
                click.echo(f"{pad}- {item}")


def _nested(value: Any) -> bool:
    return isinstance(value, dict | list) and bool(value)


# -- inspecting and repairing -----------------------------------------------------------


@cli.command()
@json_option
@click.option("--watch", is_flag=True, help="Refresh every --interval seconds until Ctrl-C.")
@click.option("--interval", type=float, default=2.0, show_default=True)
@data_dir_option
@config_option
def queue(as_json: bool, watch: bool, interval: float, data_dir: str, config_path: str | None) -> None:
    """Counts: queued, in progress, scheduled retries, failed, rejected; per integration.

    Says first which Redis (password masked), key prefix and configuration file it read;
    with --watch --json, one compact JSON object per line."""
    settings = inspection_settings(config_path, data_dir)
    source = _queue_source(settings, data_dir)
    try:
        while True:
            counts = {**source, **run_inspection(settings, Inspector.counts)}
            if watch and not as_json:
                click.clear()
            _print_counts(counts, as_json, compact=watch)
            if watch and not as_json:
                click.echo(f"\n{time.strftime('%H:%M:%S')}  (every {interval:g}s, Ctrl-C to stop)")
            if not watch:
                return
            time.sleep(interval)
    except KeyboardInterrupt:
        return


def _queue_source(settings: Settings, data_dir: str) -> dict[str, Any]:
    """Which Redis, prefix and configuration file ``queue`` reads, and why that Redis."""
    from shared.settings import mask_url

    if os.environ.get("EXAMHOOK_REDIS_URL"):
        origin = "EXAMHOOK_REDIS_URL"
    elif dev_state(data_dir) is not None:
        origin = f"the examhook dev running in {Path(data_dir).resolve()}"
    else:
        origin = "redis.url" if settings.source else "the default"
    return {
        "redis_url": mask_url(settings.redis.url),
        "redis_from": origin,
        "prefix": settings.redis.prefix,
        "config_file": settings.source,
    }


def _print_counts(counts: dict[str, Any], as_json: bool, compact: bool = False) -> None:
    if as_json:
        if compact:  # one object per line (click.echo flushes each)
            click.echo(json.dumps(counts, separators=(",", ":")))
        else:
            print_json(counts)
        return
    click.echo(
        f"redis {counts['redis_url']} ({counts['redis_from']})  prefix {counts['prefix']}"
        f"  config {counts['config_file'] or 'none (defaults and environment)'}"
    )
    for key in ("queued", "in_progress", "scheduled_retries", "failed", "rejected", "unmatched"):
        click.echo(f"{key:<18} {counts[key]}")
    click.echo(f"{'oldest queued':<18} {counts['oldest_queued_age_seconds']}s")
    rows = [{"integration": name, **values} for name, values in counts["per_integration"].items()]
    if rows:
        click.echo()
        print_table(rows, ["integration", "queued", "in_progress", "scheduled_retries", "failed"])


@cli.group()
def failures() -> None:
    """Failed deliveries: list, show, retry, purge."""


def _parse_age(ctx: click.Context, param: click.Parameter, value: str | None) -> float | None:
    """Click callback: ``30m``, ``12h``, ``7d`` or seconds, as seconds."""
    if value is None:
        return None
    units = {"s": 1, "m": 60, "h": 3600, "d": 86400}
    try:
        if value[-1] in units:
            return float(value[:-1]) * units[value[-1]]
        return float(value)
    except (ValueError, IndexError):
        raise click.BadParameter(f"{value!r} is not an age like 30m, 12h or 7d") from None


@failures.command("list")
@click.option("--integration", default=None)
@click.option("--exam", "exam_id", default=None, help="Only failures of this exam id.")
@click.option(
    "--older-than",
    default=None,
    callback=_parse_age,
    help="Last attempt at least this long ago (30m, 12h, 7d).",
)
@click.option("--newer-than", default=None, callback=_parse_age, help="Last attempt at most this long ago.")
@json_option
@data_dir_option
@config_option
def failures_list(
    integration: str | None,
    exam_id: str | None,
    older_than: float | None,
    newer_than: float | None,
    as_json: bool,
    data_dir: str,
    config_path: str | None,
) -> None:
    """One row per failed delivery."""
    older, newer = older_than, newer_than
    settings = inspection_settings(config_path, data_dir)
    check_integration(settings, integration)
    rows = run_inspection(settings, lambda i: i.failures(integration, exam_id, older, newer))
    import msgspec

    data = [msgspec.to_builtins(r) for r in rows]
    if as_json:
        print_json(data)
        return
    for row in data:
        row["learner"] = learner_label(row)
    print_table(
        data,
        ["event_id", "integration", "learner", "exam_id", "attempts", "last_attempt_at", "last_error"],
        empty="no failed deliveries",
    )


@failures.command("show")
@click.argument("event_id")
@click.option("--integration", default=None)
@json_option
@data_dir_option
@config_option
def failures_show(
    event_id: str, integration: str | None, as_json: bool, data_dir: str, config_path: str | None
) -> None:
    """Everything known about an event: payload, and each attempt's outcome."""
    from shared.report import Reporter, Target, event_summary

    settings = results_settings(config_path, data_dir)
    check_integration(settings, integration)

    async def work(inspector: Inspector) -> dict[str, Any] | None:
        detail = await inspector.event_detail(event_id, integration)
        if detail is not None:
            reporter = Reporter(inspector.store, Target.of(settings.integrations))
            detail["summary"] = await event_summary(reporter, event_id, detail)
        return detail

    detail = run_inspection(settings, work)
    if detail is None:
        fail(f"no event {event_id} (unknown, or expired)", code=1)
    if as_json:
        print_json(detail)
        return
    click.echo(f"event {event_id}")
    click.echo(detail["summary"]["text"])
    for delivery in detail["deliveries"]:
        click.echo(
            f"\n[{delivery['integration']}] {delivery['status']}, {delivery['attempts']} attempt(s)"
            f", last error: {delivery['last_error'] or '-'}"
        )
        print_table(delivery["attempt_log"], ["attempt", "at", "outcome", "status", "duration_ms", "error"])
    click.echo("\npayload:")
    print_json(detail["payload"])


def _select_pairs(
    inspector: Inspector, event_ids: tuple[str, ...], all_: bool, integration: str | None
) -> Any:
    return inspector.failure_pairs(None if all_ else list(event_ids), integration)


def pair_selection(command: F) -> F:
    """The options of ``failures retry`` and ``failures purge``: which failed pairs."""
    for option in reversed(
        [
            click.argument("event_ids", nargs=-1, metavar="[EVENT_ID]..."),
            click.option("--all", "all_", is_flag=True, help="Every failed delivery."),
            click.option("--integration", default=None),
            json_option,
            data_dir_option,
            config_option,
        ]
    ):
        command = option(command)
    return command


def _missing_failures(event_ids: tuple[str, ...], pairs: list[tuple[str, str]]) -> list[str]:
    """The given event ids that have no failed delivery among ``pairs``."""
    found = {event_id for event_id, _ in pairs}
    return [event_id for event_id in dict.fromkeys(event_ids) if event_id not in found]


def _no_failures(missing: list[str], integration: str | None) -> NoReturn:
    to = f" to {integration}" if integration else ""
    fail(f"no failed delivery of {', '.join(missing)}{to} (unknown, expired, or not failed)", code=1)


@failures.command("retry")
@pair_selection
def failures_retry(
    event_ids: tuple[str, ...],
    all_: bool,
    integration: str | None,
    as_json: bool,
    data_dir: str,
    config_path: str | None,
) -> None:
    """Queue failed deliveries again (a fresh round of attempts); prints how many."""
    require_selection(event_ids, all_, "EVENT_ID")
    settings = inspection_settings(config_path, data_dir)
    check_integration(settings, integration)
    show_progress = not as_json and sys.stderr.isatty()

    async def work(inspector: Inspector) -> tuple[int, int] | list[str]:
        pairs = await _select_pairs(inspector, event_ids, all_, integration)
        missing = _missing_failures(event_ids, pairs)
        if missing:
            return missing  # nothing is queued when any id names nothing
        queued = skipped = 0
        step = 500
        for start in range(0, len(pairs), step):
            q, s = await inspector.retry(pairs[start : start + step])
            queued, skipped = queued + q, skipped + s
            if show_progress and len(pairs) > step:
                click.echo(f"\r{start + len(pairs[start : start + step])}/{len(pairs)}", nl=False, err=True)
        if show_progress and len(pairs) > step:
            click.echo(err=True)
        return queued, skipped

    result = run_inspection(settings, work)
    if isinstance(result, list):
        _no_failures(result, integration)
    queued, skipped = result
    if as_json:
        print_json({"queued": queued, "skipped": skipped})
    else:
        click.echo(f"queued {queued} failed deliveries" + (f" ({skipped} skipped)" if skipped else ""))


@failures.command("purge")
@pair_selection
def failures_purge(
    event_ids: tuple[str, ...],
    all_: bool,
    integration: str | None,
    as_json: bool,
    data_dir: str,
    config_path: str | None,
) -> None:
    """Forget failed deliveries."""
    require_selection(event_ids, all_, "EVENT_ID")
    settings = inspection_settings(config_path, data_dir)
    check_integration(settings, integration)

    async def work(inspector: Inspector) -> int | list[str]:
        pairs = await _select_pairs(inspector, event_ids, all_, integration)
        missing = _missing_failures(event_ids, pairs)
        if missing:
            return missing  # nothing is purged when any id names nothing
        return await inspector.purge(pairs)

    removed = run_inspection(settings, work)
    if isinstance(removed, list):
        _no_failures(removed, integration)
    if as_json:
        print_json({"purged": removed})
    else:
        click.echo(f"purged {removed} failed deliveries")


@cli.group()
def rejected() -> None:
    """The quarantine of authenticated bodies that were rejected (400/422)."""


@rejected.command("list")
@json_option
@data_dir_option
@config_option
def rejected_list(as_json: bool, data_dir: str, config_path: str | None) -> None:
    """List quarantined bodies with their errors."""
    import msgspec

    settings = inspection_settings(config_path, data_dir)
    items = run_inspection(settings, Inspector.rejected)
    data = [{k: v for k, v in msgspec.to_builtins(r).items() if k not in ("body", "raw")} for r in items]
    for row in data:
        row["received_at"] = iso(row["received_at"])
    if as_json:
        print_json(data)
        return
    print_table(data, ["id", "received_at", "error", "path", "detail"], empty="no rejected bodies")


@rejected.command("show")
@click.argument("reject_id")
@json_option
@data_dir_option
@config_option
def rejected_show(reject_id: str, as_json: bool, data_dir: str, config_path: str | None) -> None:
    """One quarantined body, as received, with its error. With --json, ``body`` is its text
    (decoded leniently when it is not UTF-8) and ``body_base64`` the bytes exactly as received."""
    import base64

    import msgspec

    settings = inspection_settings(config_path, data_dir)
    item = run_inspection(settings, lambda i: i.rejected_one(reject_id))
    if item is None:
        fail(f"no rejected body {reject_id} (unknown, or expired)", code=1)
    data = msgspec.to_builtins(item)
    del data["raw"]
    data["body_base64"] = base64.b64encode(item.received_bytes).decode()
    data["received_at"] = iso(data["received_at"])
    if as_json:
        print_json(data)
        return
    for key in ("id", "received_at", "error", "path", "detail", "content_type"):
        click.echo(f"{key}: {data[key]}")
    click.echo("body:")
    click.echo(data["body"])


@rejected.command("purge")
@click.argument("reject_ids", nargs=-1, metavar="[ID]...")
@click.option("--all", "all_", is_flag=True, help="Every quarantined body.")
@json_option
@data_dir_option
@config_option
def rejected_purge(
    reject_ids: tuple[str, ...], all_: bool, as_json: bool, data_dir: str, config_path: str | None
) -> None:
    """Delete quarantined bodies: the given IDs, or --all."""
    require_selection(reject_ids, all_, "ID")
    settings = inspection_settings(config_path, data_dir)

    async def work(inspector: Inspector) -> int | list[str]:
        if all_:
            return await inspector.purge_rejected(None)
        missing = await inspector.missing_rejected(list(reject_ids))
        if missing:
            return missing  # nothing is purged when any id names nothing
        return await inspector.purge_rejected(list(dict.fromkeys(reject_ids)))

    removed = run_inspection(settings, work)
    if isinstance(removed, list):
        fail(f"no rejected body {', '.join(removed)} (unknown, or expired)", code=1)
    if as_json:
        print_json({"purged": removed})
    else:
        click.echo(f"purged {removed} rejected bodies")


@cli.command()
@click.option("--user-id", default=None, help="Synap user.id of the learner.")
@click.option("--email", default=None, help="The learner's email address (case-insensitive).")
@click.option("--dry-run", is_flag=True, help="Report what would be removed; remove nothing.")
@json_option
@data_dir_option
@config_option
def erase(
    user_id: str | None,
    email: str | None,
    dry_run: bool,
    as_json: bool,
    data_dir: str,
    config_path: str | None,
) -> None:
    """Remove every trace of one learner that examhook holds in Redis."""
    if not user_id and not email:
        raise click.UsageError("give --user-id or --email")
    import msgspec

    from shared.erasure import erase_learner

    settings = inspection_settings(config_path, data_dir)
    report = run_inspection(
        settings, lambda i: erase_learner(i.store, user_id=user_id, email=email, dry_run=dry_run)
    )
    if as_json:
        print_json(msgspec.to_builtins(report))
        return
    verb = "would remove" if dry_run else "removed"
    click.echo(
        f"{verb}: {len(report.events)} event(s), {report.keys_deleted} key(s), "
        f"{report.queued_jobs_removed} queued job(s), {report.failures_removed} failure record(s), "
        f"{report.rejected_removed} rejected body(ies)"
    )
    for event_id in report.events:
        click.echo(f"  {event_id}")
    click.echo(f"note: {report.not_covered}")


register_results_day(cli, rejected)


def main() -> None:
    cli(prog_name="examhook")


if __name__ == "__main__":
    main()
