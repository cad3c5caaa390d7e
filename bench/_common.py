"""Shared plumbing for the benchmarks: processes, Redis, settings, output.

Every process a benchmark needs is started through :class:`Stack`, in its own
session (process group), with its output in a temporary directory; leaving the
``with`` block (normally, on an error, on Ctrl-C or SIGTERM) stops them all and
removes the directory. Loopback only.
"""

from __future__ import annotations

import atexit
import base64
import contextlib
import json
import os
import platform
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

BENCH = Path(__file__).resolve().parent
ROOT = BENCH.parent
PY = sys.executable
SAMPLE = ROOT / "shared" / "sample.json"
USER, PASSWORD = "synap", "s3cret"
AUTH_B64 = base64.b64encode(f"{USER}:{PASSWORD}".encode()).decode()
WEBHOOK_PATH = "/webhooks/exam-results-released"
# The attempt id in shared/sample.json; benchmarks substitute a unique one of the same length.
SAMPLE_ATTEMPT = "att_d23f0824128b2f330c5c"

if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))


def sample_body(pretty: bool = False) -> bytes:
    """The sample event as senders write it (``JSON.stringify``: compact, 2,932 bytes: the
    issue's "realistic ~3 KB payload"); ``pretty``: shared/sample.json as stored, indented
    (5,726 bytes; the body of the 2026-11-27 runs)."""
    raw = SAMPLE.read_bytes()
    if pretty:
        return raw
    return json.dumps(json.loads(raw), separators=(",", ":"), ensure_ascii=False).encode()


def sample_body_file(pretty: bool = False) -> Path:
    """:func:`sample_body` written to a temporary file (for wrk), removed at exit."""
    directory = Path(tempfile.mkdtemp(prefix="examhook-bench-"))
    atexit.register(shutil.rmtree, directory, True)
    path = directory / ("sample-pretty.json" if pretty else "sample-compact.json")
    path.write_bytes(sample_body(pretty))
    return path


def body_with_attempt(template: bytes, tag: str, n: int) -> bytes:
    """The sample with a unique attempt id (same length: 24 characters)."""
    attempt = f"att_{tag}{n:0{20 - len(tag)}d}"
    assert len(attempt) == len(SAMPLE_ATTEMPT)
    return template.replace(SAMPLE_ATTEMPT.encode(), attempt.encode(), 1)


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def install_signal_handlers() -> None:
    """SIGTERM/SIGHUP behave like Ctrl-C, so ``finally`` blocks clean up."""

    def raise_interrupt(signum: int, frame: Any) -> None:
        raise KeyboardInterrupt(f"signal {signum}")

    signal.signal(signal.SIGTERM, raise_interrupt)
    signal.signal(signal.SIGHUP, raise_interrupt)


def machine() -> str:
    model = "?"
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                model = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    return (
        f"{time.strftime('%Y-%m-%d %H:%M:%S %Z')} | nproc={os.cpu_count()} | CPU={model} | "
        f"Python {platform.python_version()} | {platform.system()} {platform.release()}"
    )


@dataclass
class Proc:
    name: str
    popen: subprocess.Popen[bytes]
    log: Path

    @property
    def pid(self) -> int:
        return self.popen.pid

    def tail(self, lines: int = 20) -> str:
        try:
            return "\n".join(self.log.read_text(errors="replace").splitlines()[-lines:])
        except OSError:
            return ""


_live: list[Stack] = []


@atexit.register
def _cleanup_all() -> None:
    for stack in list(_live):
        stack.close()


class Stack:
    """A set of processes and a temporary directory, all removed on exit."""

    def __init__(self, name: str, keep: bool = False) -> None:
        self.dir = Path(tempfile.mkdtemp(prefix=f"examhook-bench-{name}-"))
        self.procs: list[Proc] = []
        self.keep = keep or bool(os.environ.get("BENCH_KEEP"))
        _live.append(self)

    def __enter__(self) -> Stack:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def spawn(self, name: str, args: Sequence[str], env: dict[str, str] | None = None) -> Proc:
        log = self.dir / f"{name}.log"
        out = log.open("wb")
        popen = subprocess.Popen(
            list(args),
            stdout=out,
            stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL,
            cwd=ROOT,
            env={**os.environ, **(env or {})},
            start_new_session=True,  # Ctrl-C goes to us; we stop the children ourselves
        )
        out.close()
        proc = Proc(name, popen, log)
        self.procs.append(proc)
        return proc

    def stop(self, proc: Proc, timeout: float = 10.0, sig: int = signal.SIGTERM) -> int | None:
        if proc.popen.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(proc.pid, sig)
            try:
                proc.popen.wait(timeout)
            except subprocess.TimeoutExpired:
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(proc.pid, signal.SIGKILL)
                proc.popen.wait(5)
        if proc in self.procs:
            self.procs.remove(proc)
        return proc.popen.returncode

    def close(self) -> None:
        for proc in reversed(list(self.procs)):
            self.stop(proc, timeout=5)
        if self in _live:
            _live.remove(self)
        if not self.keep:
            shutil.rmtree(self.dir, ignore_errors=True)

    # -- services ----------------------------------------------------------------------

    def redis(
        self,
        name: str = "redis",
        appendfsync: str = "everysec",
        server: str | None = None,
        wrapper: Sequence[str] = (),
    ) -> Redis:
        """A fresh Redis (own port, own data dir, AOF on) just for this variant (``wrapper``: a
        command it runs under, e.g. valgrind)."""
        binary = server or os.environ.get("BENCH_REDIS_SERVER") or shutil.which("redis-server")
        if not binary:
            raise SystemExit("redis-server not found (set BENCH_REDIS_SERVER)")
        port = free_port()
        data = self.dir / name
        data.mkdir()
        proc = self.spawn(
            name,
            [
                *wrapper,
                binary,
                "--port",
                str(port),
                "--bind",
                "127.0.0.1",
                "--protected-mode",
                "no",
                "--save",
                "",
                "--appendonly",
                "yes",
                "--appendfsync",
                appendfsync,
                "--dir",
                str(data),
                "--daemonize",
                "no",
                "--logfile",
                "",
            ],
        )
        wait_for(lambda: _redis_ping(port), 120 if wrapper else 10, f"{name} did not start:\n{proc.tail()}")
        return Redis(f"redis://127.0.0.1:{port}/0", port, proc, data)

    def python(self, name: str, script: str, *args: str, env: dict[str, str] | None = None) -> Proc:
        return self.spawn(name, [PY, str(BENCH / script), *args], env)


@dataclass
class Redis:
    url: str
    port: int
    proc: Proc
    dir: Path

    def info(self, section: str = "memory") -> dict[str, str]:
        raw = _redis_cmd(self.port, "INFO", section).decode()
        return dict(
            line.split(":", 1) for line in raw.splitlines() if ":" in line and not line.startswith("#")
        )

    def cmd(self, *args: str) -> bytes:
        return _redis_cmd(self.port, *args)


def _redis_cmd(port: int, *args: str) -> bytes:
    """A tiny RESP client (one command), so the harness needs no event loop."""
    with socket.create_connection(("127.0.0.1", port), timeout=5) as sock:
        payload = f"*{len(args)}\r\n" + "".join(f"${len(a.encode())}\r\n{a}\r\n" for a in args)
        sock.sendall(payload.encode())
        f = sock.makefile("rb")
        line = f.readline()
        kind, rest = line[:1], line[1:-2]
        if kind == b"$":
            n = int(rest)
            return b"" if n < 0 else f.read(n + 2)[:-2]
        if kind == b"-":
            raise RuntimeError(rest.decode())
        return rest


def _redis_ping(port: int) -> bool:
    try:
        return _redis_cmd(port, "PING") == b"PONG"
    except OSError:
        return False


def http_ok(url: str) -> bool:
    try:
        with urllib.request.urlopen(url, timeout=1) as r:
            return 200 <= r.status < 500
    except Exception:
        return False


def get_json(url: str) -> Any:
    with urllib.request.urlopen(url, timeout=5) as r:
        return json.loads(r.read())


def wait_for(check: Any, timeout: float, message: str, interval: float = 0.05) -> None:
    deadline = time.monotonic() + timeout
    while not check():
        if time.monotonic() > deadline:
            raise RuntimeError(message)
        time.sleep(interval)


def settings_dict(
    redis_url: str, *, destination: str | None = None, log_level: str = "info"
) -> dict[str, Any]:
    """What a deployment's examhook.toml would say, as a dict (see tests/conftest.py)."""
    raw: dict[str, Any] = {
        "redis": {"url": redis_url, "prefix": "examhook"},
        "receiver": {"basic_auth_user": USER, "basic_auth_password": PASSWORD},
        "log_level": log_level,
        "integrations": [],
    }
    if destination:
        raw["integrations"] = [{"type": "http", "name": "lms", "url": destination, "timeout_seconds": 10}]
    return raw


def write_settings(stack: Stack, raw: dict[str, Any], name: str = "settings.json") -> Path:
    path = stack.dir / name
    path.write_text(json.dumps(raw))
    return path


def parse_tagged_json(text: str, tag: str) -> list[dict[str, Any]]:
    return [json.loads(line.split(tag, 1)[1]) for line in text.splitlines() if tag in line]


def verdict(ok: bool | None) -> str:
    return "n/a" if ok is None else ("PASS" if ok else "FAIL")


def table(rows: list[list[str]], header: list[str]) -> str:
    widths = [max(len(str(x)) for x in col) for col in zip(header, *rows, strict=False)]
    fmt = "  ".join(f"{{:<{w}}}" for w in widths)
    lines = [fmt.format(*header), fmt.format(*("-" * w for w in widths))]
    lines += [fmt.format(*(str(c) for c in row)) for row in rows]
    return "\n".join(lines)


def profile_summary(raw_path: Path, top: int = 25, focus: tuple[str, ...] = ()) -> str:
    """Top frames from a py-spy ``--format raw`` (collapsed stacks) file: self and inclusive %."""
    selfc: dict[str, int] = {}
    incl: dict[str, int] = {}
    total = 0
    for line in raw_path.read_text(errors="replace").splitlines():
        stack, _, count_s = line.rpartition(" ")
        if not stack or not count_s.isdigit():
            continue
        count = int(count_s)
        frames = [
            f for f in stack.split(";") if f and not f.startswith("process ") and not f.startswith("thread ")
        ]
        if not frames:
            continue
        total += count
        selfc[frames[-1]] = selfc.get(frames[-1], 0) + count
        for f in set(frames):
            incl[f] = incl.get(f, 0) + count
    if not total:
        return "(no samples)"

    def short(frame: str) -> str:
        # "func (/long/path/site-packages/pkg/mod.py:123)" -> "func (pkg/mod.py:123)"
        for marker in ("site-packages/", str(ROOT) + "/", "/lib/python3"):
            if marker in frame:
                head, _, tail = frame.partition("(")
                return head + "(" + tail.split(marker, 1)[1] if marker in tail else frame
        return frame

    out = [f"samples: {total}", f"top {top} by self time:"]
    for frame, c in sorted(selfc.items(), key=lambda kv: -kv[1])[:top]:
        out.append(f"  {100 * c / total:5.1f}%  {short(frame)}")
    out.append(f"top {top} by inclusive time:")
    for frame, c in sorted(incl.items(), key=lambda kv: -kv[1])[:top]:
        out.append(f"  {100 * c / total:5.1f}%  {short(frame)}")
    if focus:
        out.append("project frames (inclusive):")
        for frame, c in sorted(incl.items(), key=lambda kv: -kv[1]):
            if any(f in frame for f in focus) and 100 * c / total >= 0.5:
                out.append(f"  {100 * c / total:5.1f}%  {short(frame)}")
    return "\n".join(out)


def py_spy() -> str | None:
    exe = Path(PY).parent / "py-spy"
    return str(exe) if exe.exists() else shutil.which("py-spy")


def buffer_log_output(interval: float = 0.2) -> Any:
    """PROTOTYPE (not product code): make the root log handler write through a 64 KiB buffer
    flushed every ``interval`` seconds instead of one write(2) per record. Returns an async
    context function to register (aiohttp cleanup_ctx style) that runs the flusher."""
    import asyncio
    import io
    import logging

    handler = logging.getLogger().handlers[0]
    stream = io.TextIOWrapper(io.BufferedWriter(io.FileIO(2, "w", closefd=False), 1 << 16), encoding="utf-8")
    handler.setStream(stream)  # type: ignore[attr-defined]
    handler.flush = lambda: None  # type: ignore[method-assign]

    async def flusher(_: Any = None) -> Any:
        async def run() -> None:
            while True:
                await asyncio.sleep(interval)
                stream.flush()

        task = asyncio.create_task(run())
        yield
        task.cancel()
        stream.flush()

    return flusher
