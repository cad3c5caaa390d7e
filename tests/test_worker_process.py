"""``examhook worker`` as operators run it: several per host, metrics ports, ``--check``."""

from __future__ import annotations

import signal
from pathlib import Path

from redis.asyncio import Redis

from shared.contract import Keys
from tests.conftest import clean_env, eventually, free_port, wait_exit
from tests.test_cli import SCRIPT, assert_one_error_line, background, examhook, http_ok, write


def _config(tmp_path: Path, extra: str = "") -> Path:
    return write(
        tmp_path / "worker.toml",
        f"[worker]\nhealth_check_interval_seconds = 1\n{extra}"
        f'[[integrations]]\nname = "f"\ntype = "file"\npath = "{tmp_path / "out.jsonl"}"\n',
    )


def _listening_addresses(port: int) -> set[str]:
    """Local addresses (hex, as the kernel lists them) with a TCP socket listening on ``port``."""
    found = set()
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        try:
            lines = Path(table).read_text().splitlines()[1:]
        except FileNotFoundError:
            continue
        for line in lines:
            local, _, state = line.split()[1:4]
            address, _, hex_port = local.rpartition(":")
            if state == "0A" and int(hex_port, 16) == port:  # 0A: LISTEN
                found.add(address)
    return found


async def test_a_second_worker_on_a_taken_metrics_port_exits_2_with_one_clear_line(
    tmp_path: Path, workdir: Path, env: dict[str, str]
) -> None:
    """Two workers on one host sharing a config whose ``metrics_port`` comes from an
    environment variable (``"${VAR}"``, as a systemd template writes it): the first serves
    ``/metrics`` on 127.0.0.1 only (the default ``metrics_host``); the second exits 2 with one
    line naming the port and the way out (``--metrics-port``), no traceback."""
    port = free_port()
    config = _config(tmp_path, 'metrics_port = "${EXAMHOOK_TEST_METRICS_PORT}"\n')
    env = {**env, "EXAMHOOK_CONFIG": str(config), "EXAMHOOK_TEST_METRICS_PORT": str(port)}
    with background([SCRIPT, "worker"], env=env, cwd=workdir, log_dir=tmp_path, name="first") as first:

        async def serving() -> bool:
            assert first.poll() is None, (tmp_path / "first.err").read_text()
            return await http_ok(f"http://127.0.0.1:{port}/metrics")

        await eventually(serving, timeout=20, interval=0.05)
        assert _listening_addresses(port) == {"0100007F"}, "metrics must listen on 127.0.0.1 only"

        second = await examhook("worker", env=env, cwd=workdir)
        assert second.code == 2 and "Traceback" not in second.err, second
        [line] = [x for x in second.err_lines() if "configuration error" in x]
        assert all(n in line for n in ("metrics_port", str(port), "--metrics-port")), line
        first.send_signal(signal.SIGTERM)
        assert await wait_exit(first, 15) == 0


async def test_worker_check_is_not_fooled_by_another_worker_stopping(
    tmp_path: Path, workdir: Path, env: dict[str, str], redis: Redis, prefix: str
) -> None:
    """With two workers on the host, one stopping leaves ``worker --check`` healthy at once:
    each worker reports for itself, and the one leaving removes only its own entry."""
    env = {**env, "EXAMHOOK_CONFIG": str(_config(tmp_path))}
    with (
        background([SCRIPT, "worker"], env=env, cwd=workdir, log_dir=tmp_path, name="a") as a,
        background([SCRIPT, "worker"], env=env, cwd=workdir, log_dir=tmp_path, name="b") as b,
    ):

        async def both_reported() -> bool:
            assert a.poll() is None and b.poll() is None
            return await redis.hlen(Keys(prefix).workers) == 2

        await eventually(both_reported, timeout=20, interval=0.05)
        a.send_signal(signal.SIGTERM)
        assert await wait_exit(a, 15) == 0
        check = await examhook("worker", "--check", env=env, cwd=workdir)
        assert check.code == 0, check
        assert check.out.startswith("healthy: 1 worker(s)") and str(b.pid) in check.out
        b.send_signal(signal.SIGTERM)
        assert await wait_exit(b, 15) == 0
    after = await examhook("worker", "--check", env=env, cwd=workdir)
    assert after.code == 1 and "unhealthy" in after.err, after


async def test_worker_check_says_when_redis_cannot_be_reached(tmp_path: Path, workdir: Path) -> None:
    """``worker --check`` with Redis unreachable exits 1 saying so (not "no worker has
    reported"), with the password kept out."""
    env = clean_env(
        EXAMHOOK_REDIS_URL="redis://:hunter2@127.0.0.1:1/0", EXAMHOOK_CONFIG=str(_config(tmp_path))
    )
    check = await examhook("worker", "--check", env=env, cwd=workdir)
    line = assert_one_error_line(check, 1, "unhealthy", "cannot reach Redis")
    assert "hunter2" not in line
