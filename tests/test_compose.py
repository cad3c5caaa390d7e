"""The container deployment: compose.yaml, Dockerfile, .dockerignore, the example config
and .env.example are checked statically (no Docker engine needed) against the REAL CLI
parser and the REAL settings loader, so a renamed option or key breaks this test, not a
production rollout."""

from __future__ import annotations

import base64
import fnmatch
import json
import re
import tomllib
from pathlib import Path
from typing import Any

import click
import pytest
import yaml
from click.testing import CliRunner

from cli.main import cli
from shared.settings import HttpIntegration, load_settings

ROOT = Path(__file__).resolve().parent.parent
COMPOSE = ROOT / "compose.yaml"
DOCKERFILE = ROOT / "Dockerfile"
DOCKERIGNORE = ROOT / ".dockerignore"
EXAMPLE_TOML = ROOT / "examhook.example.toml"
ENV_EXAMPLE = ROOT / ".env.example"
CONFIG_TARGET = "/etc/examhook/examhook.toml"

SECRET_NAME = re.compile(r"PASSWORD|PASSWD|SECRET|TOKEN|CREDENTIAL|API_?KEY|PRIVATE", re.IGNORECASE)
REFERENCE = re.compile(r"\$\{([A-Za-z_][A-Za-z0-9_]*)(?:(:?[-?])[^}]*)?\}")
WHOLE_REFERENCE = re.compile(r"^\$\{[A-Za-z_][A-Za-z0-9_]*(?::?[-?][^}]*)?\}$")
VALID_WHSEC = "whsec_" + base64.b64encode(b"0123456789abcdef0123456789abcdef").decode()


# -- helpers -----------------------------------------------------------------------------


@pytest.fixture(scope="module")
def compose() -> dict[str, Any]:
    data = yaml.safe_load(COMPOSE.read_text(encoding="utf-8"))
    assert isinstance(data, dict)
    return data


def service(compose: dict[str, Any], name: str) -> dict[str, Any]:
    svc = compose["services"][name]
    assert isinstance(svc, dict)
    return svc


def environment(svc: dict[str, Any]) -> dict[str, str]:
    env = svc.get("environment") or {}
    if isinstance(env, list):
        env = dict(item.split("=", 1) if "=" in item else (item, "") for item in env)
    return {str(k): "" if v is None else str(v) for k, v in env.items()}


def healthcheck_test(svc: dict[str, Any]) -> list[str]:
    test = svc["healthcheck"]["test"]
    if isinstance(test, str):
        return ["CMD-SHELL", test]
    return [str(part) for part in test]


def seconds(duration: str | int | float) -> float:
    """Compose durations such as ``40s``, ``1m30s``, ``500ms``."""
    if isinstance(duration, int | float):
        return float(duration)
    units = {"h": 3600.0, "m": 60.0, "s": 1.0, "ms": 0.001, "us": 1e-6}
    parts = re.findall(r"(\d+(?:\.\d+)?)(ms|us|h|m|s)", duration)
    assert parts and "".join(n + u for n, u in parts) == duration, f"unparsable duration {duration!r}"
    return sum(float(n) * units[u] for n, u in parts)


def published_ports(svc: dict[str, Any]) -> list[tuple[str | None, int]]:
    """(host part or None, container port) for each ``ports`` entry, short or long syntax."""
    result: list[tuple[str | None, int]] = []
    for entry in svc.get("ports") or []:
        if isinstance(entry, dict):
            result.append(
                (str(entry.get("published")) if "published" in entry else None, int(entry["target"]))
            )
            continue
        text = str(entry).split("/")[0]
        host, _, container = text.rpartition(":")
        result.append((host or None, int(container)))
    return result


def assert_cli_accepts(args: list[str]) -> None:
    """``args`` (without the ``examhook`` program name) is a valid command line for the real
    CLI: ``--help`` proves every option name exists, ``make_context`` converts every value
    (types, ranges) without running the command."""
    result = CliRunner().invoke(cli, [*args, "--help"])
    assert result.exit_code == 0, f"examhook {' '.join(args)} rejected:\n{result.output}"
    with cli.make_context("examhook", [*args], resilient_parsing=False) as ctx:
        name, command, rest = cli.resolve_command(ctx, [*args])
        assert command is not None and name == args[0]
        with command.make_context(name, rest, parent=ctx):
            pass


def dockerfile_instructions() -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) with line continuations joined and comments dropped."""
    instructions: list[tuple[str, str]] = []
    pending = ""
    for raw in DOCKERFILE.read_text(encoding="utf-8").splitlines():
        line = raw.strip()
        if not pending and (not line or line.startswith("#")):
            continue
        if pending and line.startswith("#"):
            continue
        if line.endswith("\\"):
            pending += line[:-1] + " "
            continue
        full = (pending + line).strip()
        pending = ""
        keyword, _, rest = full.partition(" ")
        instructions.append((keyword.upper(), rest.strip()))
    assert not pending, "Dockerfile ends inside a line continuation"
    return instructions


def exec_form(arguments: str) -> list[str]:
    value = json.loads(arguments)
    assert isinstance(value, list) and all(isinstance(v, str) for v in value), arguments
    return value


def dockerignore_excludes(path: str) -> bool:
    """Docker's rule, simplified: the last matching pattern wins, ``!`` re-includes; a
    pattern naming a directory also matches everything below it."""
    excluded = False
    for raw in DOCKERIGNORE.read_text(encoding="utf-8").splitlines():
        line = raw.strip()
        if not line or line.startswith("#"):
            continue
        negate = line.startswith("!")
        pattern = line.removeprefix("!").rstrip("/").removeprefix("./")
        candidates = [path] + ["/".join(path.split("/")[:i]) for i in range(1, path.count("/") + 1)]
        if any(
            fnmatch.fnmatch(c, pattern) or fnmatch.fnmatch(c, pattern.removeprefix("**/")) for c in candidates
        ):
            excluded = not negate
    return excluded


def strings(value: Any) -> list[str]:
    """Every string value inside parsed YAML/TOML data (comments are not data)."""
    if isinstance(value, str):
        return [value]
    if isinstance(value, dict):
        return [s for v in value.values() for s in strings(v)]
    if isinstance(value, list):
        return [s for v in value for s in strings(v)]
    return []


def references(value: Any) -> set[tuple[str, str]]:
    """(NAME, modifier) of every ``${NAME...}`` in the string values of ``value``."""
    return {ref for s in strings(value) for ref in REFERENCE.findall(s)}


def example_env() -> dict[str, str]:
    """The environment compose gives the containers, with the secrets filled in."""
    return {
        "LMS_TOKEN": "token-for-tests",
        "LMS_SIGNING_SECRET": VALID_WHSEC,
        "EXAMHOOK_REDIS_URL": "redis://redis:6379/0",
        "EXAMHOOK_BASIC_AUTH_USER": "synap",
        "EXAMHOOK_BASIC_AUTH_PASSWORD": "not-a-real-password",
    }


# -- compose.yaml --------------------------------------------------------------------------


def test_compose_defines_redis_receiver_and_worker(compose: dict[str, Any]) -> None:
    """compose.yaml has the three services, and receiver and worker run the same image
    built from this repository's Dockerfile."""
    assert {"redis", "receiver", "worker"} <= set(compose["services"])
    receiver, worker = service(compose, "receiver"), service(compose, "worker")
    for svc in (receiver, worker):
        build = svc["build"]
        context = build if isinstance(build, str) else build.get("context", ".")
        assert (COMPOSE.parent / context / "Dockerfile").resolve() == DOCKERFILE
    assert receiver.get("image") == worker.get("image")


def test_redis_is_durable_and_never_evicts(compose: dict[str, Any]) -> None:
    """Redis runs redis:7 with AOF on (fsync every second), maxmemory-policy noeviction (a
    full Redis refuses writes instead of dropping queued events), its /data on a named
    volume, and a `redis-cli ping` healthcheck."""
    redis = service(compose, "redis")
    assert str(redis["image"]).split("@")[0] in ("redis:7", "redis:7-alpine") or re.fullmatch(
        r"redis:7(\.\d+)*(-\w+)?", str(redis["image"])
    )
    command = redis["command"]
    args = command.split() if isinstance(command, str) else [str(a) for a in command]
    pairs = {args[i]: args[i + 1] for i in range(len(args) - 1) if args[i].startswith("--")}
    assert pairs.get("--appendonly") == "yes"
    assert pairs.get("--appendfsync") in ("everysec", "always")
    assert pairs.get("--maxmemory-policy") == "noeviction"
    data_volumes = [
        v
        for v in redis.get("volumes", [])
        if str(v).split(":")[1:2] == ["/data"] or (isinstance(v, dict) and v.get("target") == "/data")
    ]
    assert data_volumes, "redis /data must be on a volume"
    volume_name = (
        data_volumes[0]["source"] if isinstance(data_volumes[0], dict) else str(data_volumes[0]).split(":")[0]
    )
    assert volume_name in (compose.get("volumes") or {}), "use a named volume, declared at top level"
    assert "redis-cli ping" in " ".join(healthcheck_test(redis))
    assert not redis.get("ports"), "Redis must not be published on the host"


@pytest.mark.parametrize("name", ["receiver", "worker"])
def test_service_commands_are_accepted_by_the_real_cli(compose: dict[str, Any], name: str) -> None:
    """Every `command` compose runs (after the image's `examhook` entrypoint) parses with
    the real click CLI: option names exist and values convert."""
    command = service(compose, name)["command"]
    assert isinstance(command, list), "use exec form so no shell sits between Docker and examhook"
    assert_cli_accepts([str(part) for part in command])


def test_receiver_publishes_8080_and_checks_readiness(compose: dict[str, Any]) -> None:
    """The receiver listens on 0.0.0.0:8080 in the container, publishes container port
    8080, waits for a healthy Redis, and its healthcheck asks /readyz on that port with
    Python's urllib (the slim image has no curl)."""
    receiver = service(compose, "receiver")
    command = [str(p) for p in receiver["command"]]
    assert command[0] == "receive"
    assert command[command.index("--host") + 1] == "0.0.0.0"
    port = int(command[command.index("--port") + 1])
    assert port == 8080
    assert any(container == port for _host, container in published_ports(receiver))
    test = " ".join(healthcheck_test(receiver))
    assert "urllib" in test and f"127.0.0.1:{port}/readyz" in test
    assert "curl" not in test and "wget" not in test
    assert receiver["depends_on"]["redis"]["condition"] == "service_healthy"


def test_worker_is_scalable_and_health_checked(compose: dict[str, Any]) -> None:
    """`docker compose up --scale worker=N` works: the worker has no container_name and no
    fixed host port; it waits for a healthy Redis; its healthcheck is `examhook worker
    --check`, a command the real CLI accepts."""
    worker = service(compose, "worker")
    assert "container_name" not in worker
    for host, _container in published_ports(worker):
        assert host is None, "a fixed host port allows only one worker (use an ephemeral one)"
    assert worker["depends_on"]["redis"]["condition"] == "service_healthy"
    assert healthcheck_test(worker) == ["CMD", "examhook", "worker", "--check"]
    assert_cli_accepts(["worker", "--check"])
    assert seconds(worker["healthcheck"]["interval"]) <= 60


@pytest.mark.parametrize("name", ["receiver", "worker"])
def test_services_are_configured_by_environment_and_a_readonly_file(
    compose: dict[str, Any], name: str
) -> None:
    """Receiver and worker reach Redis at redis://redis:6379/0, read the config file that
    compose mounts read-only at EXAMHOOK_CONFIG, and get every `${VAR}` that
    examhook.example.toml refers to (else they would exit with a configuration error)."""
    svc = service(compose, name)
    env = environment(svc)
    assert env["EXAMHOOK_REDIS_URL"] == "redis://redis:6379/0"
    assert env["EXAMHOOK_CONFIG"] == CONFIG_TARGET
    mounts = [v for v in svc.get("volumes", []) if isinstance(v, dict) and v.get("target") == CONFIG_TARGET]
    mounts += [
        {"source": s.split(":")[0], "read_only": s.endswith(":ro")}
        for s in svc.get("volumes", [])
        if isinstance(s, str) and s.split(":")[1:2] == [CONFIG_TARGET]
    ]
    assert len(mounts) == 1 and mounts[0]["read_only"] is True
    assert "examhook.toml" in str(mounts[0]["source"])
    needed = {var for var, _ in references(tomllib.loads(EXAMPLE_TOML.read_text(encoding="utf-8")))}
    assert needed, "the example should take its secrets from ${VAR} references"
    assert needed <= set(env), f"not passed to {name}: {sorted(needed - set(env))}"


def test_stop_grace_period_covers_graceful_shutdown(compose: dict[str, Any]) -> None:
    """Receiver and worker get more than the receiver's 30 s request drain between SIGTERM
    and SIGKILL (Docker's default is 10 s)."""
    for name in ("receiver", "worker"):
        svc = service(compose, name)
        assert seconds(svc["stop_grace_period"]) > 30
        assert svc.get("stop_signal", "SIGTERM") == "SIGTERM"


def test_receiver_requires_basic_auth_credentials_from_the_environment(compose: dict[str, Any]) -> None:
    """The receiver's Basic credentials come from the environment / .env as required
    `${NAME:?message}` references, so compose refuses to start without them."""
    env = environment(service(compose, "receiver"))
    for var in ("EXAMHOOK_BASIC_AUTH_USER", "EXAMHOOK_BASIC_AUTH_PASSWORD"):
        assert re.fullmatch(rf"\$\{{{var}:\?[^}}]+\}}", env[var]), env[var]


def test_no_secret_values_in_compose(compose: dict[str, Any]) -> None:
    """compose.yaml contains no secret: every secret-looking environment variable of every
    service is exactly one `${...}` reference, either required (`${NAME:?message}`) or
    optional with an empty default (`${NAME:-}`, off when unset), never a literal or a
    default value; nothing that looks like a signing secret or bearer token is written."""
    for name in compose["services"]:
        for var, value in environment(service(compose, name)).items():
            if SECRET_NAME.search(var):
                assert WHOLE_REFERENCE.match(value), f"{name}.{var} must be a ${{...}} reference"
                match = REFERENCE.fullmatch(value)
                assert match, value
                assert match.group(2) in (":?", "?") or value.endswith(("-}", ":-}")), (
                    f"{name}.{var} must be required or default to empty, not to a value"
                )
    values = strings(compose)
    assert not any(re.search(r"whsec_[A-Za-z0-9+/]", v) for v in values)
    assert not any(re.search(r"Bearer\s+[A-Za-z0-9]", v) for v in values)
    assert not any(re.search(r"redis://[^\s@/]*:[^\s@/]+@", v) for v in values), "no password in a Redis URL"


def test_env_example_lists_every_required_variable_without_values(compose: dict[str, Any]) -> None:
    """.env.example names every variable compose requires (`${NAME:?...}`), and leaves
    every secret empty, so copying it cannot put a guessable secret in production."""
    required = {var for var, kind in references(compose) if kind in (":?", "?")}
    assert required, "compose.yaml should require its credentials"
    values: dict[str, str] = {}
    for raw in ENV_EXAMPLE.read_text(encoding="utf-8").splitlines():
        line = raw.strip()
        if line and not line.startswith("#"):
            key, sep, value = line.partition("=")
            assert sep, f"not KEY=VALUE: {line!r}"
            values[key.strip()] = value.strip()
    assert required <= set(values), f"missing from .env.example: {sorted(required - set(values))}"
    for key, value in values.items():
        if SECRET_NAME.search(key):
            assert value == "", f".env.example must not carry a value for {key}"


# -- Dockerfile and .dockerignore ----------------------------------------------------------


def test_dockerfile_runs_examhook_receive_as_non_root() -> None:
    """The image is multi-stage on python:3.11-slim, its ENTRYPOINT is the project's
    `examhook` console script with default CMD `receive` (accepted by the real CLI), it
    runs as a non-root user and exposes 8080."""
    instructions = dockerfile_instructions()
    args = {
        name.split("=", 1)[0]: name.split("=", 1)[1]
        for kw, name in instructions
        if kw == "ARG" and "=" in name
    }
    bases = [
        re.sub(r"\$\{(\w+)\}", lambda m: args.get(m.group(1), m.group(0)), rest.split()[0])
        for kw, rest in instructions
        if kw == "FROM"
    ]
    assert len(bases) >= 2, "multi-stage build"
    assert all(base == "python:3.11-slim" for base in bases), bases
    assert any(kw == "COPY" and rest.startswith("--from=") for kw, rest in instructions)
    assert any(kw == "RUN" and re.search(r"pip install (\S+ )*\.(\s|$)", rest) for kw, rest in instructions)

    final = instructions[max(i for i, (kw, _) in enumerate(instructions) if kw == "FROM") :]
    entrypoint = [exec_form(rest) for kw, rest in final if kw == "ENTRYPOINT"]
    cmd = [exec_form(rest) for kw, rest in final if kw == "CMD"]
    assert entrypoint[-1] == ["examhook"]
    assert cmd[-1] == ["receive"]
    assert_cli_accepts(cmd[-1])
    scripts = tomllib.loads((ROOT / "pyproject.toml").read_text(encoding="utf-8"))["project"]["scripts"]
    assert scripts["examhook"] == "cli.main:main"

    users = [rest.split(":")[0] for kw, rest in final if kw == "USER"]
    assert users and users[-1] not in ("root", "0"), "the final stage must switch to a non-root user"
    assert any(kw == "EXPOSE" and "8080" in rest.split() for kw, rest in final)


def test_dockerfile_builds_without_a_registry_beyond_its_base_image() -> None:
    """No `# syntax=` parser directive: BuildKit (`docker compose build`, `docker build` on
    Docker 23+) would fetch that frontend image from Docker Hub before building, so an
    air-gapped host with a local python:3.11-slim could not build. The legacy builder
    ignores it, which is how it went unnoticed."""
    for line in DOCKERFILE.read_text(encoding="utf-8").splitlines():
        if not line.startswith("#"):
            break  # parser directives come before the first instruction
        assert not re.match(r"#\s*syntax\s*=", line, re.IGNORECASE), line


def test_dockerfile_healthcheck_uses_python_urllib_on_healthz() -> None:
    """The image's HEALTHCHECK asks the receiver's /healthz on 8080 with stdlib urllib
    (python:3.11-slim has no curl or wget)."""
    checks = [rest for kw, rest in dockerfile_instructions() if kw == "HEALTHCHECK"]
    assert len(checks) == 1
    command = exec_form(checks[0].split("CMD", 1)[1].strip())
    assert command[:2] == ["python", "-c"]
    assert "urllib.request" in command[2] and "127.0.0.1:8080/healthz" in command[2]
    compile(command[2], "<healthcheck>", "exec")


def test_dockerfile_bakes_in_no_secrets() -> None:
    """No ENV or ARG in the Dockerfile names or sets a password, token or secret, and no
    examhook credential variable is given a value at build time."""
    for kw, rest in dockerfile_instructions():
        if kw in ("ENV", "ARG"):
            assert not SECRET_NAME.search(rest), f"{kw} {rest}"
            assert "EXAMHOOK_BASIC_AUTH" not in rest and "EXAMHOOK_ADMIN" not in rest, f"{kw} {rest}"
    text = DOCKERFILE.read_text(encoding="utf-8")
    assert "whsec_" not in text


def test_dockerignore_keeps_secrets_and_clutter_out_of_the_build_context() -> None:
    """The build context holds what `pip install .` needs (pyproject.toml, README.md, every
    package in pyproject's list) but never .env, examhook.toml, .git or local venvs."""
    pyproject = tomllib.loads((ROOT / "pyproject.toml").read_text(encoding="utf-8"))
    packages = pyproject["tool"]["setuptools"]["packages"]
    for package in packages:
        assert not dockerignore_excludes(package.replace(".", "/") + "/__init__.py"), package
    assert not dockerignore_excludes("pyproject.toml")
    assert not dockerignore_excludes(pyproject["project"]["readme"])
    assert not dockerignore_excludes("shared/lua/ingest.lua")
    assert not dockerignore_excludes("worker/integrations/email/templates/email_text.txt")
    for path in (
        ".env",
        "examhook.toml",
        ".git/config",
        ".venv/bin/python",
        ".examhook/dump.rdb",
        "cli/__pycache__/main.cpython-311.pyc",
        "tests/test_compose.py",
    ):
        assert dockerignore_excludes(path), path


# -- examhook.example.toml -------------------------------------------------------------------


def test_example_config_loads_with_the_compose_environment() -> None:
    """examhook.example.toml passes the real settings loader given the environment compose
    provides: one `http` integration to the LMS whose Authorization header and signing
    secret come from ${LMS_TOKEN} / ${LMS_SIGNING_SECRET}, and a short worker
    health_check_interval_seconds for `examhook worker --check`."""
    env = example_env()
    settings = load_settings(EXAMPLE_TOML, env=env)
    assert settings.redis.url == env["EXAMHOOK_REDIS_URL"]
    assert settings.auth_configured
    http = [i for i in settings.integrations if isinstance(i, HttpIntegration)]
    assert len(http) == 1
    assert http[0].headers["Authorization"] == f"Bearer {env['LMS_TOKEN']}"
    assert http[0].signing_secret == env["LMS_SIGNING_SECRET"]
    assert settings.worker.health_check_interval_seconds == 10
    raw = EXAMPLE_TOML.read_text(encoding="utf-8")
    assert "${LMS_TOKEN}" in raw and "${LMS_SIGNING_SECRET}" in raw


def test_example_config_passes_check_config_and_needs_its_secrets() -> None:
    """`examhook check-config` accepts the example with its variables set (exit 0, secrets
    masked in the output) and refuses it when LMS_TOKEN is unset (exit 2)."""
    runner = CliRunner()
    env: dict[str, str | None] = {k: v for k, v in example_env().items() if not k.startswith("EXAMHOOK_")}
    env |= {
        "EXAMHOOK_CONFIG": str(EXAMPLE_TOML),
        "EXAMHOOK_REDIS_URL": None,
        "EXAMHOOK_BASIC_AUTH_USER": None,
        "EXAMHOOK_BASIC_AUTH_PASSWORD": None,
    }
    ok = runner.invoke(cli, ["check-config"], env=env)
    assert ok.exit_code == 0, ok.output
    assert "configuration OK" in ok.output
    assert VALID_WHSEC not in ok.output and "token-for-tests" not in ok.output
    missing = runner.invoke(cli, ["check-config"], env={**env, "LMS_TOKEN": None})
    assert missing.exit_code == 2
    assert "LMS_TOKEN" in missing.output


def test_assert_cli_accepts_rejects_bad_option_names_and_values() -> None:
    """The helper the compose checks rely on really fails on an unknown option and on a
    value of the wrong type (plain `--help` alone would not catch the latter)."""
    with pytest.raises(AssertionError):
        assert_cli_accepts(["receive", "--listen", "0.0.0.0"])
    with pytest.raises(click.BadParameter):
        assert_cli_accepts(["receive", "--port", "eighty"])
