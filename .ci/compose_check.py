"""The compose CI stage's checks (called by .ci/compose, which builds the images and the
files this reads). Standard library only; talks to Docker through the `docker` CLI and to
Compose through the command given after `--` (docker-compose v1 or `docker compose` v2).

    python3 .ci/compose_check.py --project P --env-file F --records DIR -- COMPOSE...

Phases, each against the real compose.yaml (+ deploy/compose/ci.override.yaml):
  up        `up -d --scale worker=3`, time until every container is healthy; the documented
            `run --rm --no-deps worker check-config` and `exec receiver examhook queue`
  burst     1,000 events through the published port: each delivered exactly once
  faults    1,000 more while one worker is `docker kill`ed, another worker's process is
            SIGKILLed (a crash: the restart policy brings it back) and Redis is
            `docker restart`ed: nothing lost, every repeat explained by an interrupted send
  health    Redis stopped: every worker and the receiver turn unhealthy, /readyz and POST
            answer 503; Redis started: all healthy again
  security  uid 10001, read-only root, no capabilities, no-new-privileges; the secrets in
            no `docker inspect` output but the environment of the services given them, and
            in no log
  down/up   queued events (no worker running) survive `down` + `up`, then are delivered
            exactly once; after `down -v` + `up` they are gone (as docs/deployment.md says)

Exit status 0 when every check passed, 1 otherwise; figures go to stdout.
"""

from __future__ import annotations

import argparse
import base64
import collections
import copy
import http.client
import json
import secrets
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
HOOK_PATH = "/webhooks/exam-results-released"
# Secrets, and which services are given each one (compose.yaml + the override).
SECRET_VARS = {
    "EXAMHOOK_BASIC_AUTH_PASSWORD": {"receiver"},
    "EXAMHOOK_ADMIN_TOKEN": {"receiver"},
    "LMS_TOKEN": {"receiver", "worker", "lms"},
    "LMS_SIGNING_SECRET": {"receiver", "worker", "lms"},
}
EXAMHOOK_UID = "10001"
# Run inside an examhook container: the root filesystem refuses writes (EROFS), /tmp takes
# them; prints uid, gid, effective capabilities and the no_new_privs flag.
PROBE = """
import errno, os
try:
    open("/opt/venv/probe", "w")
except OSError as e:
    assert e.errno == errno.EROFS, e
else:
    raise SystemExit("root filesystem is writable")
open("/tmp/probe", "w").close()
status = dict(line.split(":", 1) for line in open("/proc/self/status"))
print(os.getuid(), os.getgid(), status["CapEff"].strip(), status["NoNewPrivs"].strip())
"""


class CheckFailed(Exception):
    pass


def log(message: str) -> None:
    print(f"compose-check: {message}", flush=True)


def run(args: list[str], *, check: bool = True, timeout: float = 180) -> subprocess.CompletedProcess[str]:
    result = subprocess.run(
        args, stdin=subprocess.DEVNULL, capture_output=True, text=True, timeout=timeout, check=False
    )
    if check and result.returncode != 0:
        raise CheckFailed(f"{' '.join(args)} exited {result.returncode}:\n{result.stdout}{result.stderr}")
    return result


def read_env_file(path: Path) -> dict[str, str]:
    values = {}
    for raw in path.read_text(encoding="utf-8").splitlines():
        line = raw.strip()
        if line and not line.startswith("#") and "=" in line:
            key, _, value = line.partition("=")
            values[key.strip()] = value.strip()
    return values


# -- the deployment ----------------------------------------------------------------------------


@dataclass
class Deployment:
    project: str
    compose: list[str]
    env: dict[str, str]
    records: Path

    def dc(self, *args: str, timeout: float = 300) -> str:
        return run([*self.compose, *args], timeout=timeout).stdout

    def up(self, workers: int) -> float:
        started = time.monotonic()
        self.dc("up", "-d", "--no-build", "--scale", f"worker={workers}")
        return time.monotonic() - started

    def containers(self, service: str | None = None, *, all_states: bool = False) -> list[str]:
        args = [
            "docker",
            "ps",
            "-q",
            "--no-trunc",
            "--filter",
            f"label=com.docker.compose.project={self.project}",
        ]
        if service:
            args += ["--filter", f"label=com.docker.compose.service={service}"]
        if all_states:
            args.append("-a")
        return sorted(run(args).stdout.split())

    def one(self, service: str) -> str:
        found = self.containers(service)
        if len(found) != 1:
            raise CheckFailed(f"expected one running {service} container, found {len(found)}")
        return found[0]

    def inspect(self, ids: Iterable[str]) -> list[dict[str, Any]]:
        ids = list(ids)
        return json.loads(run(["docker", "inspect", *ids]).stdout) if ids else []

    def health(self) -> dict[str, tuple[str, str]]:
        """container id -> (service, health status or run state)."""
        result = {}
        for c in self.inspect(self.containers()):
            state = c["State"]
            status = state.get("Health", {}).get("Status") or state["Status"]
            result[c["Id"]] = (c["Config"]["Labels"]["com.docker.compose.service"], status)
        return result

    def wait_health(
        self, want: str, *, services: set[str] | None = None, expect: int | None = None, timeout: float = 120
    ) -> float:
        started = time.monotonic()
        last: dict[str, tuple[str, str]] = {}
        while time.monotonic() - started < timeout:
            last = {cid: sv for cid, sv in self.health().items() if services is None or sv[0] in services}
            if (expect is None or len(last) == expect) and last and all(s == want for _, s in last.values()):
                return time.monotonic() - started
            time.sleep(1)
        summary = sorted(f"{svc}:{status}" for svc, status in last.values())
        raise CheckFailed(f"not all {want} within {timeout:.0f} s: {summary}")

    def ip_of(self, container: str) -> str:
        networks = self.inspect([container])[0]["NetworkSettings"]["Networks"]
        return next(iter(networks.values()))["IPAddress"]

    def queue(self) -> dict[str, Any]:
        out = run(["docker", "exec", self.one("receiver"), "examhook", "queue", "--json"]).stdout
        return json.loads(out)

    def wait_settled(self, timeout: float) -> float:
        started = time.monotonic()
        counts: dict[str, Any] = {}
        while time.monotonic() - started < timeout:
            counts = self.queue()
            if not any(counts[k] for k in ("queued", "in_progress", "scheduled_retries")):
                return time.monotonic() - started
            time.sleep(1)
        raise CheckFailed(f"queue not empty after {timeout:.0f} s: {counts}")


# -- the sender ----------------------------------------------------------------------------------


@dataclass
class Sent:
    attempt_id: str
    status: int | None = None
    event_id: str | None = None
    tries: int = 0


@dataclass
class Sender:
    port: int
    user: str
    password: str
    run_id: str
    concurrency: int = 16
    give_up_after: float = 90.0
    template: dict[str, Any] = field(default_factory=dict)
    lock: threading.Lock = field(default_factory=threading.Lock)
    accepted: int = 0
    answers: collections.Counter[str] = field(default_factory=collections.Counter)

    def __post_init__(self) -> None:
        self.template = json.loads((ROOT / "shared" / "sample.json").read_text(encoding="utf-8"))
        token = base64.b64encode(f"{self.user}:{self.password}".encode()).decode()
        self.headers = {"Authorization": f"Basic {token}", "Content-Type": "application/json"}
        self.local = threading.local()

    def body(self, attempt_id: str) -> bytes:
        event = copy.deepcopy(self.template)
        event["attempt"]["id"] = attempt_id
        event["id"] = "ue_" + attempt_id
        event["user"]["id"] = "usr_" + attempt_id[-12:]
        return json.dumps(event).encode()

    def connection(self, fresh: bool = False) -> http.client.HTTPConnection:
        conn = getattr(self.local, "conn", None)
        if fresh or conn is None:
            if conn is not None:
                conn.close()
            conn = http.client.HTTPConnection("127.0.0.1", self.port, timeout=15)
            self.local.conn = conn
        return conn

    def post(self, body: bytes) -> tuple[int, bytes]:
        conn = self.connection()
        try:
            conn.request("POST", HOOK_PATH, body=body, headers=self.headers)
            response = conn.getresponse()
            return response.status, response.read()
        except (OSError, http.client.HTTPException):
            self.connection(fresh=True)
            raise

    def send_one(self, sent: Sent) -> Sent:
        """Like Synap: resend until a 2xx (a 503 or a broken connection is retried)."""
        body = self.body(sent.attempt_id)
        deadline = time.monotonic() + self.give_up_after
        while time.monotonic() < deadline:
            sent.tries += 1
            try:
                status, answer = self.post(body)
            except (OSError, http.client.HTTPException) as exc:
                with self.lock:
                    self.answers[exc.__class__.__name__] += 1
                time.sleep(0.25)
                continue
            with self.lock:
                self.answers[str(status)] += 1
            if status in (200, 202):
                sent.status = status
                sent.event_id = json.loads(answer)["event_id"]
                with self.lock:
                    self.accepted += 1
                return sent
            if status == 503:
                time.sleep(0.25)
                continue
            sent.status = status
            return sent
        return sent

    def events(self, phase: str, count: int) -> list[Sent]:
        return [Sent(f"att_ci{self.run_id}_{phase}_{i:05d}") for i in range(count)]

    def send(
        self,
        batch: list[Sent],
        during: Callable[[int], None] | None = None,
        per_second: float | None = None,
    ) -> tuple[list[Sent], float]:
        """Post every event of ``batch`` at ``concurrency`` (the i-th not before i/per_second
        when that is given); ``during(accepted)`` is called in the meantime (fault
        injection). Fails unless every event ends with a 2xx."""
        with self.lock:
            self.accepted = 0
        started = time.monotonic()

        def paced(i: int, sent: Sent) -> Sent:
            if per_second:
                time.sleep(max(0.0, started + i / per_second - time.monotonic()))
            return self.send_one(sent)

        with ThreadPoolExecutor(self.concurrency) as pool:
            futures = [pool.submit(paced, i, s) for i, s in enumerate(batch)]
            while not all(f.done() for f in futures):
                if during is not None:
                    during(self.accepted)
                time.sleep(0.05)
            results = [f.result() for f in futures]
        elapsed = time.monotonic() - started
        bad = [s for s in results if s.status not in (200, 202)]
        if bad:
            raise CheckFailed(f"{len(bad)} events never got a 2xx, e.g. {bad[:3]}")
        return results, elapsed


# -- the destination's records -------------------------------------------------------------------


def records(path: Path) -> list[dict[str, Any]]:
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        return []
    return [json.loads(line) for line in text.splitlines(keepends=True) if line.endswith("\n")]


def by_key(path: Path, keys: set[str]) -> dict[str, list[dict[str, Any]]]:
    grouped: dict[str, list[dict[str, Any]]] = collections.defaultdict(list)
    for r in records(path):
        if r["key"] in keys:
            grouped[r["key"]].append(r)
    return grouped


def wait_delivered(path: Path, sent: list[Sent], timeout: float) -> float:
    keys = {s.event_id for s in sent if s.event_id}
    started = time.monotonic()
    missing = keys
    while time.monotonic() - started < timeout:
        missing = keys - set(by_key(path, keys))
        if not missing:
            return time.monotonic() - started
        time.sleep(0.5)
    raise CheckFailed(f"{len(missing)} of {len(keys)} accepted events not delivered after {timeout:.0f} s")


def check_deliveries(path: Path, sent: list[Sent]) -> dict[str, list[dict[str, Any]]]:
    """Every accepted event reached the destination with the right token, signature and
    body; returns the requests per key (repeats are judged by the caller)."""
    expected = {s.event_id: s.attempt_id for s in sent if s.event_id}
    if len(expected) != len(sent):
        raise CheckFailed(f"{len(sent)} events posted but {len(expected)} distinct event ids accepted")
    grouped = by_key(path, set(expected))
    missing = set(expected) - set(grouped)
    if missing:
        raise CheckFailed(f"{len(missing)} accepted events never delivered")
    for key, requests in grouped.items():
        for r in requests:
            if not (r["auth_ok"] and r["signature_ok"]):
                raise CheckFailed(f"{key}: bearer token or webhook signature wrong: {r}")
            if r["webhook_id"] != key or r["attempt_id"] != expected[key]:
                raise CheckFailed(f"{key}: delivered the wrong body or id: {r}")
        if len({r["sha256"] for r in requests}) != 1:
            raise CheckFailed(f"{key}: repeats with different bodies")
    return grouped


def repeats(grouped: dict[str, list[dict[str, Any]]]) -> int:
    return sum(len(requests) - 1 for requests in grouped.values())


# -- phases ----------------------------------------------------------------------------------------


class Stage:
    def __init__(self, dep: Deployment, sender: Sender) -> None:
        self.dep = dep
        self.sender = sender
        self.figures: list[str] = []
        self.posted = 0
        self.delivered = 0
        self.lost = 0

    def figure(self, text: str) -> None:
        self.figures.append(text)
        log(text)

    def phase_up(self) -> None:
        started = time.monotonic()
        self.dep.up(3)
        self.dep.wait_health("healthy", expect=6, timeout=120)
        self.figure(
            f"up --scale worker=3: 6 containers healthy {time.monotonic() - started:.1f} s after `up`"
        )
        # The commands docs/deployment.md gives (-T: no terminal here).
        out = self.dep.dc("run", "--rm", "--no-deps", "worker", "check-config")
        if "configuration OK" not in out or any(self.dep.env[name] in out for name in SECRET_VARS):
            raise CheckFailed(f"`run --rm --no-deps worker check-config`: not OK, or a secret shown:\n{out}")
        out = self.dep.dc("exec", "-T", "receiver", "examhook", "queue")
        # first the Redis (password masked), the prefix and the config it read; then the counts
        first, _, rest = out.partition("\n")
        names_config = "config /etc/examhook/examhook.toml" in first
        if not first.startswith("redis redis://redis:6379") or not names_config:
            raise CheckFailed(f"`exec receiver examhook queue` does not say what it read:\n{out}")
        if not rest.startswith("queued") or any(self.dep.env[name] in out for name in SECRET_VARS):
            raise CheckFailed(f"`exec receiver examhook queue` printed:\n{out}")

    def phase_burst(self) -> None:
        batch = self.sender.events("burst", 1000)
        sent, elapsed = self.sender.send(batch)
        accepted_202 = sum(1 for s in sent if s.status == 202)
        delivered_in = elapsed + wait_delivered(self.dep.records, sent, timeout=120)
        self.dep.wait_settled(timeout=60)
        grouped = check_deliveries(self.dep.records, sent)
        extra = repeats(grouped)
        if extra:
            raise CheckFailed(f"burst without faults: {extra} repeated deliveries")
        self.posted += len(sent)
        self.delivered += len(grouped)
        self.figure(
            f"burst: 1000 posted in {elapsed:.1f} s ({accepted_202} x 202), all delivered "
            f"{delivered_in:.1f} s after the first POST, each exactly once (0 repeats)"
        )

    def phase_faults(self) -> None:
        dep = self.dep
        workers = dep.containers("worker")
        if len(workers) != 3:
            raise CheckFailed(f"expected 3 workers, found {len(workers)}")
        killed, crashed = workers[0], workers[1]
        timeline: dict[str, float] = {}
        peers = {"killed": dep.ip_of(killed), "crashed": dep.ip_of(crashed)}
        crash_restarts = dep.inspect([crashed])[0]["RestartCount"]

        def during(accepted: int) -> None:
            if accepted >= 250 and "kill" not in timeline:
                timeline["kill"] = time.time()
                run(["docker", "kill", killed])
                log(f"  docker kill {killed[:12]} (worker) at {accepted} accepted")
            if accepted >= 400 and "crash" not in timeline:
                pids = run(["docker", "top", crashed, "-eo", "pid,args"]).stdout.splitlines()[1:]
                pid = next(
                    line.split()[0] for line in pids if "examhook worker" in line and "init" not in line
                )
                timeline["crash"] = time.time()
                run(["kill", "-KILL", pid])
                log(f"  SIGKILL to the examhook process of worker {crashed[:12]} at {accepted} accepted")
            if accepted >= 600 and "redis_down" not in timeline:
                timeline["redis_down"] = time.time()
                log(f"  docker restart redis at {accepted} accepted")
                run(["docker", "restart", "-t", "10", dep.one("redis")])
                timeline["redis_up"] = time.time()

        batch = self.sender.events("faults", 1000)
        answers_before = collections.Counter(self.sender.answers)
        # Paced (8 s), so every fault lands mid-burst however fast the receiver answers.
        sent, elapsed = self.sender.send(batch, during, per_second=125)
        last_post = time.monotonic()
        answers = self.sender.answers - answers_before
        if "redis_up" not in timeline:
            raise CheckFailed(f"the faults were not all injected: {sorted(timeline)}")
        wait_delivered(dep.records, sent, timeout=150)
        delivered = time.monotonic() - last_post
        dep.wait_settled(timeout=150)
        settle = time.monotonic() - last_post
        grouped = check_deliveries(dep.records, sent)
        # The killed worker stays down (`docker kill` is a manual stop for the restart policy);
        # the crashed one is restarted by Docker.
        crashed_state = dep.inspect([crashed])[0]
        if crashed_state["RestartCount"] <= crash_restarts or not crashed_state["State"]["Running"]:
            raise CheckFailed("the crashed worker was not restarted by its restart policy")
        killed_state = dep.inspect([killed])[0]["State"]
        # Which repeats an interrupted send explains: an earlier copy that arrived from the
        # killed/crashed worker shortly before it died, or around the Redis restart.
        timeout = 10.0 + 1.0  # the example integration's timeout_seconds, plus a margin
        explained = {"worker kill": 0, "worker crash": 0, "redis restart": 0}
        unexplained = []

        def interrupted(r: dict[str, Any], who: str, at: float) -> bool:
            return r["peer"] == peers[who] and at - timeout <= r["t"] <= at + 0.5

        for key, requests in grouped.items():
            if len(requests) == 1:
                continue
            earlier = sorted(requests, key=lambda r: r["t"])[:-1]
            if any(interrupted(r, "killed", timeline["kill"]) for r in earlier):
                explained["worker kill"] += len(requests) - 1
            elif any(interrupted(r, "crashed", timeline["crash"]) for r in earlier):
                explained["worker crash"] += len(requests) - 1
            elif any(
                timeline["redis_down"] - timeout <= r["t"] <= timeline["redis_up"] + timeout for r in earlier
            ):
                explained["redis restart"] += len(requests) - 1
            else:
                unexplained.append(key)
        if unexplained:
            raise CheckFailed(
                f"{len(unexplained)} repeats no interrupted send explains, e.g. {unexplained[:3]}"
            )
        self.posted += len(sent)
        self.delivered += len(grouped)
        non_2xx = {k: v for k, v in answers.items() if k not in ("200", "202")}
        self.figure(
            f"faults: 1000 posted in {elapsed:.1f} s, paced (retried answers during the Redis restart: "
            f"{dict(non_2xx) or 'none'}; {sum(1 for s in sent if s.status == 200)} x 200 duplicate); "
            f"redis restart took {timeline['redis_up'] - timeline['redis_down']:.1f} s"
        )
        self.figure(
            f"faults: all 1000 delivered {delivered:.1f} s and the queue empty {settle:.1f} s "
            "after the last POST (a killed worker's jobs wait for their lease to expire); "
            f"repeats {repeats(grouped)} (kill {explained['worker kill']}, "
            f"crash {explained['worker crash']}, redis restart {explained['redis restart']}), "
            "0 unexplained; killed worker "
            f"{'running' if killed_state['Running'] else 'left stopped'} (exit {killed_state['ExitCode']}), "
            f"crashed worker restarted by Docker"
        )
        run(["docker", "start", killed])
        dep.wait_health("healthy", expect=6, timeout=90)

    def phase_health(self) -> None:
        dep = self.dep
        redis = dep.one("redis")
        run(["docker", "stop", "-t", "10", redis])
        stopped = time.monotonic()
        # The receiver answers at once that it cannot queue.
        conn = http.client.HTTPConnection("127.0.0.1", self.sender.port, timeout=10)
        conn.request("GET", "/readyz")
        ready = conn.getresponse()
        ready.read()
        status, _ = self.sender.post(self.sender.body(f"att_ci{self.sender.run_id}_outage"))
        if ready.status != 503 or status != 503:
            raise CheckFailed(f"with Redis stopped: /readyz {ready.status}, POST {status} (want 503, 503)")
        dep.wait_health("unhealthy", services={"receiver"}, expect=1, timeout=90)
        receiver_down = time.monotonic() - stopped
        dep.wait_health("unhealthy", services={"worker"}, expect=3, timeout=150)
        workers_down = time.monotonic() - stopped
        run(["docker", "start", redis])
        started = time.monotonic()
        dep.wait_health("healthy", expect=6, timeout=120)
        back = time.monotonic() - started
        self.figure(
            f"health: Redis stopped -> /readyz 503, POST 503; receiver unhealthy after "
            f"{receiver_down:.0f} s, all 3 workers after {workers_down:.0f} s; Redis started -> "
            f"all healthy again in {back:.0f} s"
        )

    def phase_security(self) -> None:
        dep = self.dep
        secret_values = {name: dep.env[name] for name in SECRET_VARS}
        basic = base64.b64encode(
            f"{dep.env['EXAMHOOK_BASIC_AUTH_USER']}:{dep.env['EXAMHOOK_BASIC_AUTH_PASSWORD']}".encode()
        ).decode()
        for name, value in secret_values.items():
            if len(value) < 16:
                raise CheckFailed(f"{name} in the env file is too short to search for")
        checked = 0
        for c in dep.inspect(dep.containers()):
            svc = c["Config"]["Labels"]["com.docker.compose.service"]
            env = c["Config"]["Env"]
            given = {name for name, services in SECRET_VARS.items() if svc in services}
            for name, value in secret_values.items():
                holders = [e.split("=", 1)[0] for e in env if value in e]
                want = [name] if name in given else []
                if holders != want:
                    raise CheckFailed(
                        f"{svc}: {name}'s value is in the environment as {holders}, want {want}"
                    )
                if name in given and f"{name}={value}" not in env:
                    raise CheckFailed(f"{svc}: {name} not passed as given")
            rest = json.dumps({**c, "Config": {**c["Config"], "Env": None}})
            for name, value in secret_values.items():
                if value in rest:
                    raise CheckFailed(f"{svc}: {name}'s value appears in docker inspect outside Env")
            logs = run(["docker", "logs", c["Id"]])
            for name, value in [*secret_values.items(), ("basic credentials", basic)]:
                if value in logs.stdout or value in logs.stderr:
                    raise CheckFailed(f"{svc}: {name} appears in the container's log")
            checked += 1
            if svc not in ("receiver", "worker"):
                continue
            # uid 10001, read-only root, no capabilities, no new privileges.
            top = run(["docker", "top", c["Id"], "-eo", "uid,pid,args"]).stdout.splitlines()[1:]
            uids = {line.split()[0] for line in top}
            if uids != {EXAMHOOK_UID}:
                raise CheckFailed(f"{svc}: processes run as uids {uids}, want {{{EXAMHOOK_UID}}}")
            if not c["HostConfig"]["ReadonlyRootfs"]:
                raise CheckFailed(f"{svc}: root filesystem is writable")
            probe = run(["docker", "exec", c["Id"], "python", "-c", PROBE], check=False)
            if probe.returncode != 0 or probe.stdout.split() != [EXAMHOOK_UID, EXAMHOOK_UID, "0" * 16, "1"]:
                raise CheckFailed(f"{svc}: exec probe: {probe.stdout}{probe.stderr}")
        for image in {c["Config"]["Image"] for c in dep.inspect(dep.containers())}:
            text = run(["docker", "image", "inspect", image]).stdout
            text += run(["docker", "history", "--no-trunc", image]).stdout
            if any(value in text for value in secret_values.values()):
                raise CheckFailed(f"a secret appears in image {image}")
        self.figure(
            f"security: {checked} containers: receiver and workers run as uid {EXAMHOOK_UID} with a "
            "read-only root (/tmp writable), CapEff 0, NoNewPrivs 1; the 4 secrets only in the Env of "
            "the services given them, in no other inspect field, image or log"
        )

    def phase_down_up(self) -> None:
        dep = self.dep
        dep.up(0)
        dep.wait_health("healthy", expect=3, timeout=90)
        batch = self.sender.events("kept", 200)
        sent, _ = self.sender.send(batch)
        before = dep.queue()
        if before["queued"] != 200:
            raise CheckFailed(f"with no worker, 200 accepted events should be queued: {before}")
        started = time.monotonic()
        dep.dc("down")
        down_s = time.monotonic() - started
        started = time.monotonic()
        dep.up(0)
        dep.wait_health("healthy", expect=3, timeout=120)
        up_s = time.monotonic() - started
        after = dep.queue()
        if after["queued"] != 200:
            raise CheckFailed(f"after down + up, the 200 queued events are not all there: {after}")
        if by_key(dep.records, {s.event_id for s in sent if s.event_id}):
            raise CheckFailed("events were delivered while no worker ran")
        started = time.monotonic()
        dep.up(3)
        wait_delivered(dep.records, sent, timeout=120)
        dep.wait_settled(timeout=60)
        grouped = check_deliveries(dep.records, sent)
        if repeats(grouped):
            raise CheckFailed(f"down/up: {repeats(grouped)} repeats")
        self.posted += len(sent)
        self.delivered += len(grouped)
        self.figure(
            f"down/up: 200 events queued with no worker; `down` ({down_s:.0f} s) + `up` ({up_s:.0f} s to "
            f"healthy): still 200 queued; 3 workers delivered them in {time.monotonic() - started:.1f} s, "
            f"exactly once"
        )

    def phase_down_v(self) -> None:
        dep = self.dep
        dep.up(0)
        dep.wait_health("healthy", expect=3, timeout=90)
        batch = self.sender.events("lost", 100)
        sent, _ = self.sender.send(batch)
        if dep.queue()["queued"] != 100:
            raise CheckFailed("with no worker, 100 accepted events should be queued")
        dep.dc("down", "-v")
        dep.up(0)
        dep.wait_health("healthy", expect=3, timeout=120)
        after = dep.queue()
        if after["queued"] != 0:
            raise CheckFailed(f"after down -v + up the queue should be empty: {after}")
        # Their dedup records went with the volume: the same event is new again.
        (again,), _ = self.sender.send([Sent(sent[0].attempt_id)])
        if again.status != 202:
            raise CheckFailed(f"after down -v a re-sent event should be new (202), got {again.status}")
        self.posted += len(sent) + 1
        self.lost += len(sent) + 1
        self.figure(
            "down -v: 100 queued events (no worker) gone after `down -v` + `up`: "
            "queue 0, a resend is new (202)"
        )


def main() -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--project", required=True)
    parser.add_argument("--env-file", type=Path, required=True)
    parser.add_argument("--records", type=Path, required=True, help="the destination's records directory")
    parser.add_argument("--only", help="comma-separated phases to run (default: all, in order)")
    parser.add_argument("--figures", type=Path, help="also write the figures to this file")
    parser.add_argument("--result", type=Path, help="write 'N passed, N failed' (phases) to this file")
    parser.add_argument("compose", nargs="+", help="the compose command, after --")
    args = parser.parse_args()
    env = read_env_file(args.env_file)
    dep = Deployment(args.project, args.compose, env, args.records / "requests.jsonl")
    sender = Sender(
        port=int(env["EXAMHOOK_PORT"]),
        user=env["EXAMHOOK_BASIC_AUTH_USER"],
        password=env["EXAMHOOK_BASIC_AUTH_PASSWORD"],
        run_id=secrets.token_hex(3),
    )
    stage = Stage(dep, sender)
    phases = [
        stage.phase_up,
        stage.phase_burst,
        stage.phase_faults,
        stage.phase_health,
        stage.phase_security,
        stage.phase_down_up,
        stage.phase_down_v,
    ]
    if args.only:
        wanted = args.only.split(",")
        phases = [p for p in phases if p.__name__.removeprefix("phase_") in wanted]
    started = time.monotonic()
    passed = failed = 0
    try:
        for phase in phases:
            name = phase.__name__.removeprefix("phase_")
            log(f"== {name}")
            phase_started = time.monotonic()
            try:
                phase()
            except (CheckFailed, subprocess.TimeoutExpired) as exc:
                log(f"FAILED in {name}: {exc}")
                failed += 1
                return 1
            passed += 1
            log(f"   ({name}: {time.monotonic() - phase_started:.0f} s)")
        stage.figure(
            f"events: {stage.posted} posted and accepted, {stage.delivered} delivered exactly once or with "
            f"explained repeats (the {stage.lost} accepted for `down -v` were meant to be lost); "
            f"{len(records(dep.records))} requests at the destination; "
            f"checks {time.monotonic() - started:.0f} s"
        )
        return 0
    finally:
        if args.figures:
            args.figures.write_text("".join(f + "\n" for f in stage.figures), encoding="utf-8")
        if args.result:
            args.result.write_text(f"{passed} passed, {failed} failed\n", encoding="utf-8")


if __name__ == "__main__":
    sys.exit(main())
