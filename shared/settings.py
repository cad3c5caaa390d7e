"""Settings: a TOML file, then environment variables on top, validated at start.

Where the file comes from: ``--config PATH``, else ``$EXAMHOOK_CONFIG``, else
``./examhook.toml`` when present, else defaults only. ``${NAME}`` inside any string
value is replaced by the environment variable NAME; an unset one is an error.
Every error is a :class:`ConfigError` whose message names the offending key.
"""

from __future__ import annotations

import os
import re
import tomllib
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Annotated, Any, Literal
from urllib.parse import urlsplit, urlunsplit

import msgspec

DAY = 86_400

IntegrationName = Annotated[str, msgspec.Meta(pattern=r"^[a-z0-9-]+$", min_length=1, max_length=64)]
PositiveFloat = Annotated[float, msgspec.Meta(gt=0)]
PositiveInt = Annotated[int, msgspec.Meta(ge=1)]


# A setting that is a secret: masked by ``check-config`` and the admin pages, searched for
# and redacted in what /admin shows. Marked here, once, on the field's type.
Secret = Annotated[str, msgspec.Meta(extra={"secret": True})]


class SigningSecret:
    """A Standard Webhooks signing secret (``whsec_`` + base64 key), parsed once: the key
    bytes for signing, the text for redaction."""

    __slots__ = ("key", "text")

    def __init__(self, text: str) -> None:
        import base64
        import binascii

        if not text.startswith("whsec_"):
            raise ValueError("must be whsec_ followed by base64")
        try:
            key = base64.b64decode(text.removeprefix("whsec_"), validate=True)
        except (binascii.Error, ValueError):
            raise ValueError("must be whsec_ followed by base64") from None
        if not key:
            raise ValueError("must be whsec_ followed by base64")
        self.key = key
        self.text = text


class ConfigError(Exception):
    """The configuration cannot be used; the message says which key and why."""


class Base(msgspec.Struct, kw_only=True, forbid_unknown_fields=True, frozen=True):
    """Base for settings Structs: unknown keys are errors (a typo must not pass silently)."""


class When(Base, frozen=True):
    """Which events an integration receives. Every key present must match (AND);
    list keys match when the event's value is one of the list (OR)."""

    exam_ids: list[str] | None = None
    test_ids: list[str] | None = None
    portal_ids: list[str] | None = None
    sub_portal_ids: list[str] | None = None
    user_group_ids: list[str] | None = None
    passed: bool | None = None
    grade_labels: list[str] | None = None
    custom_attributes: dict[str, str | int | float | bool | None] | None = None


# What to do when a send's outcome is unknown: it was handed over and no answer came
# (a timeout after an email's DATA, an HTTP request that timed out), or a worker died
# after handing it over. "retry": send again (the destination may get it twice; http sends
# the same Idempotency-Key); "fail": keep it as a failure for an operator to look at
# (`examhook failures retry` sends it again); "delivered": count it as delivered.
UnknownOutcomePolicy = Literal["retry", "fail", "delivered"]


class IntegrationBase(Base, tag_field="type", kw_only=True, frozen=True):
    name: IntegrationName
    when: When = When()
    timeout_seconds: PositiveFloat = 10.0
    max_attempts: PositiveInt = 10
    backoff_base_seconds: PositiveFloat = 5.0
    backoff_max_seconds: PositiveFloat = 1800.0
    # Sends at once to this integration, per worker process (its lane: worker/lanes.py).
    # Default: worker.concurrency for http, the pool size for email and postgres, 4 for file.
    concurrency: PositiveInt | None = None
    # Default: "fail" for email (a learner must never get two copies), "retry" otherwise.
    on_unknown_outcome: UnknownOutcomePolicy | None = None

    @property
    def unknown_outcome_policy(self) -> UnknownOutcomePolicy:
        return self.on_unknown_outcome or "retry"

    def lane_capacity(self, worker_concurrency: int) -> int:
        """Sends at once per worker process (``concurrency``, else the type's default)."""
        return self.concurrency or worker_concurrency


class HttpIntegration(IntegrationBase, tag="http", kw_only=True, frozen=True):
    url: str
    headers: dict[str, Secret] = {}
    signing_secret: Secret | None = None


class FileIntegration(IntegrationBase, tag="file", kw_only=True, frozen=True):
    path: str

    def lane_capacity(self, worker_concurrency: int) -> int:
        # appends take a file lock one at a time; a few in flight keep it busy
        return self.concurrency or 4


class EmailIntegration(IntegrationBase, tag="email", kw_only=True, frozen=True):
    smtp_host: str
    smtp_port: int | None = None  # 587 for starttls/none, 465 for implicit TLS
    tls: Literal["starttls", "implicit", "none"] = "starttls"
    username: str | None = None
    password: Secret | None = None
    from_address: str = msgspec.field(name="from")
    reply_to: str | None = None
    bcc: list[str] = []
    subject_template: str | None = None
    text_template: str | None = None
    html_template: str | None = None
    fail_subject_template: str | None = None
    fail_text_template: str | None = None
    fail_html_template: str | None = None
    # SMTP connections each worker process keeps open, and so messages in flight at once.
    # timeout_seconds bounds one conversation on one connection, not the wait for one.
    pool_size: PositiveInt = 5
    # IANA time zone of the times in the messages ("Europe/London"); UTC by default
    timezone: str = "UTC"

    def __post_init__(self) -> None:
        from zoneinfo import ZoneInfo, ZoneInfoNotFoundError

        try:
            ZoneInfo(self.timezone)
        except (ZoneInfoNotFoundError, ValueError):
            raise ValueError(
                f"timezone: unknown time zone {self.timezone!r} (an IANA name such as 'Europe/London')"
            ) from None

    @property
    def unknown_outcome_policy(self) -> UnknownOutcomePolicy:
        return self.on_unknown_outcome or "fail"

    def lane_capacity(self, worker_concurrency: int) -> int:
        return min(self.concurrency or self.pool_size, self.pool_size)


class PostgresIntegration(IntegrationBase, tag="postgres", kw_only=True, frozen=True):
    dsn: str
    # at most 55 characters, so "<table>_current" and index names fit PostgreSQL's 63
    table: Annotated[str, msgspec.Meta(pattern=r"^[A-Za-z_][A-Za-z0-9_]{0,54}$")] = "exam_results"
    pool_max_size: PositiveInt = 5

    def lane_capacity(self, worker_concurrency: int) -> int:
        # more at once than the pool has connections would only wait inside the pool, where
        # the wait would count against timeout_seconds
        return min(self.concurrency or self.pool_max_size, self.pool_max_size)


# One integration's configuration (the runtime side is worker.integrations.base.Integration).
IntegrationConfig = HttpIntegration | FileIntegration | EmailIntegration | PostgresIntegration


class RedisConfig(Base, frozen=True):
    url: str = "redis://127.0.0.1:6379/0"
    # examhook's own keys start with this; arq's keys for its jobs are arq:<kind>:<job id>,
    # the job ids starting with it, and arq:abort (see shared.contract, README "Redis").
    prefix: Annotated[str, msgspec.Meta(pattern=r"^[A-Za-z0-9_.-]+$")] = "examhook"


class ReceiverConfig(Base, frozen=True):
    host: str = "0.0.0.0"
    port: Annotated[int, msgspec.Meta(ge=0, le=65535)] = 8080
    basic_auth_user: str | None = None
    basic_auth_password: Secret | None = None
    max_body_bytes: PositiveInt = 1024 * 1024
    # Coalesce concurrent requests' writes into one Redis round trip of at most this many
    # events and (past the first event) this many body bytes.
    max_batch: PositiveInt = 256
    max_batch_bytes: PositiveInt = 8 * 1024 * 1024
    # Body bytes all requests of one receiver process may hold at once; past it: 503.
    max_inflight_bytes: PositiveInt = 64 * 1024 * 1024
    # A request's body must have arrived this long after its headers; else 408.
    body_timeout_seconds: PositiveFloat = 10.0
    # A release (attempt.audit.releasedAt) further in the future than this is refused (422).
    max_future_skew_seconds: Annotated[int, msgspec.Meta(ge=0)] = DAY
    # Reverse proxies (CIDRs) whose X-Forwarded-For / X-Forwarded-Proto (or Forwarded,
    # with proxy_headers = "forwarded") name the client; nobody else's are believed.
    trusted_proxies: list[str] = []
    proxy_headers: Literal["x-forwarded", "forwarded"] = "x-forwarded"
    # Failed authentications: per client address (IPv6: per /64) and in total, per minute.
    auth_failures_per_address: PositiveInt = 20
    auth_failures_total: PositiveInt = 100
    # Bearer token Prometheus may scrape /metrics with (the Basic credentials work too).
    metrics_token: Secret | None = None


class WorkerConfig(Base, frozen=True):
    concurrency: PositiveInt = 50
    metrics_port: Annotated[int, msgspec.Meta(ge=0, le=65535)] | None = None
    # where a worker's /metrics listens (0.0.0.0 to let a Prometheus on another host scrape)
    metrics_host: str = "127.0.0.1"
    health_check_interval_seconds: PositiveInt = 10
    # arq's job timeout; by default the largest integration timeout plus 10 s.
    job_timeout_seconds: PositiveFloat | None = None
    # On SIGTERM/SIGINT: stop taking jobs, let running deliveries finish for this long,
    # then cancel the rest (they are requeued without spending an attempt).
    shutdown_grace_seconds: Annotated[int, msgspec.Meta(ge=0)] = 25
    # How often an idle worker looks at the queue.
    poll_delay_seconds: PositiveFloat = 0.05


class RetentionConfig(Base, frozen=True):
    """How long each stored copy of personal data lives in Redis."""

    dedup_window_seconds: PositiveInt = 7 * DAY
    payload_seconds: PositiveInt = 7 * DAY
    failure_seconds: PositiveInt = 30 * DAY
    rejected_seconds: PositiveInt = 7 * DAY
    rejected_max: PositiveInt = 1000


class Settings(Base, frozen=True):
    redis: RedisConfig = RedisConfig()
    receiver: ReceiverConfig = ReceiverConfig()
    worker: WorkerConfig = WorkerConfig()
    retention: RetentionConfig = RetentionConfig()
    log_level: Literal["debug", "info", "warning", "error"] = "info"
    admin_token: Secret | None = None
    integrations: list[IntegrationConfig] = []
    # Where the file came from, for messages; not a TOML key.
    source: str | None = None

    def integration(self, name: str) -> IntegrationConfig | None:
        return next((i for i in self.integrations if i.name == name), None)

    @property
    def auth_configured(self) -> bool:
        return bool(self.receiver.basic_auth_user and self.receiver.basic_auth_password)

    @property
    def job_timeout_seconds(self) -> float:
        if self.worker.job_timeout_seconds is not None:
            return self.worker.job_timeout_seconds
        return max([i.timeout_seconds for i in self.integrations] + [10.0]) + 10.0


# Environment variables that override the file, and the key each one sets.
ENV_OVERRIDES: dict[str, tuple[str, str]] = {
    "EXAMHOOK_REDIS_URL": ("redis", "url"),
    "EXAMHOOK_REDIS_PREFIX": ("redis", "prefix"),
    "EXAMHOOK_BASIC_AUTH_USER": ("receiver", "basic_auth_user"),
    "EXAMHOOK_BASIC_AUTH_PASSWORD": ("receiver", "basic_auth_password"),
    "EXAMHOOK_METRICS_TOKEN": ("receiver", "metrics_token"),
    "EXAMHOOK_LOG_LEVEL": ("", "log_level"),
    "EXAMHOOK_ADMIN_TOKEN": ("", "admin_token"),
}

_VAR_RE = re.compile(r"\$\{([A-Za-z_][A-Za-z0-9_]*)\}")
_PATH_RE = re.compile(r" - at `\$(.*)`$")


def find_config_file(explicit: str | None, env: Mapping[str, str]) -> Path | None:
    if explicit:
        return Path(explicit)
    if env.get("EXAMHOOK_CONFIG"):
        return Path(env["EXAMHOOK_CONFIG"])
    default = Path("examhook.toml")
    return default if default.is_file() else None


def load_settings(path: str | Path | None = None, env: Mapping[str, str] | None = None) -> Settings:
    """Read, substitute, override and validate; raise ConfigError on any problem."""
    env = os.environ if env is None else env
    file = find_config_file(str(path) if path else None, env)
    raw: dict[str, Any] = {}
    if file is not None:
        try:
            raw = tomllib.loads(file.read_text(encoding="utf-8"))
        except FileNotFoundError:
            raise ConfigError(f"{file}: configuration file not found") from None
        except tomllib.TOMLDecodeError as exc:
            raise ConfigError(f"{file}: not valid TOML: {exc}") from None
        except OSError as exc:
            raise ConfigError(f"{file}: cannot read: {exc.strerror}") from None
        try:
            raw = _substitute(raw, env, "")
        except ConfigError as exc:
            raise ConfigError(f"{file}: {exc}") from None
    for var, (section, key) in ENV_OVERRIDES.items():
        value = env.get(var)
        if value is None or value == "":
            continue
        target = raw.setdefault(section, {}) if section else raw
        if not isinstance(target, dict):
            raise ConfigError(f"{section}: must be a table")
        target[key] = value
    return settings_from_dict(raw, source=str(file) if file else None)


def settings_from_dict(raw: dict[str, Any], source: str | None = None) -> Settings:
    where = f"{source}: " if source else ""
    if "source" in raw:
        raise ConfigError(f"{where}source: unknown key")
    try:
        # strict=False: a number or boolean may come as text, e.g. from "${METRICS_PORT}"
        settings = msgspec.convert({**raw, "source": source}, Settings, strict=False)
    except msgspec.ValidationError as exc:
        raise ConfigError(where + _describe(exc)) from None
    _check(settings, where)
    return settings


def _describe(exc: msgspec.ValidationError) -> str:
    """msgspec's ``Expected int, got str - at `$.worker.concurrency``` as ``worker.concurrency: ...``."""
    message = str(exc)
    match = _PATH_RE.search(message)
    path = match.group(1).lstrip(".") if match else ""
    detail = message[: match.start()] if match else message
    unknown = re.match(r"Object contains unknown field `([^`]+)`", detail)
    if unknown:
        key = f"{path}.{unknown.group(1)}" if path else unknown.group(1)
        return f"{key}: unknown key"
    missing = re.match(r"Object missing required field `([^`]+)`", detail)
    if missing:
        key = f"{path}.{missing.group(1)}" if path else missing.group(1)
        return f"{key}: required key is missing"
    if "Invalid value" in detail and path.endswith(".type"):
        return f"{path}: unknown integration type (expected one of: http, file, email, postgres)"
    if "missing required field `type`" in detail:
        return f"{path}.type: required key is missing"
    return f"{path or '(top level)'}: {detail}"


def _check(settings: Settings, where: str) -> None:
    names: set[str] = set()
    for index, integration in enumerate(settings.integrations):
        key = f"integrations[{index}]"
        if integration.name in names:
            raise ConfigError(f"{where}{key}.name: duplicate integration name {integration.name!r}")
        names.add(integration.name)
        if integration.backoff_base_seconds > integration.backoff_max_seconds:
            raise ConfigError(
                f"{where}{key}.backoff_base_seconds: larger than backoff_max_seconds"
                f" ({integration.backoff_base_seconds} > {integration.backoff_max_seconds})"
            )
        if isinstance(integration, HttpIntegration):
            parts = urlsplit(integration.url)
            if parts.scheme not in ("http", "https") or not parts.hostname:
                raise ConfigError(f"{where}{key}.url: must be an http:// or https:// URL")
            if integration.signing_secret is not None:
                try:
                    SigningSecret(integration.signing_secret)
                except ValueError as exc:
                    raise ConfigError(f"{where}{key}.signing_secret: {exc}") from None
        if isinstance(integration, PostgresIntegration):
            if not integration.dsn.startswith(("postgres://", "postgresql://")):
                raise ConfigError(f"{where}{key}.dsn: must be a postgresql:// URL")
            dsn_problem = url_problem(integration.dsn)
            if dsn_problem is not None:
                raise ConfigError(f"{where}{key}.dsn: {dsn_problem}")
    scheme = settings.redis.url.partition("://")[0]
    if scheme not in ("redis", "rediss", "unix", "redis+sentinel", "rediss+sentinel"):
        raise ConfigError(
            f"{where}redis.url: must start with redis://, rediss://, unix:// or redis+sentinel://"
        )
    problem = url_problem(settings.redis.url)
    if problem is not None:
        raise ConfigError(f"{where}redis.url: {problem}")
    if scheme.endswith("+sentinel"):
        from shared.redis_conn import parse_sentinel_url

        try:
            parse_sentinel_url(settings.redis.url)
        except ValueError as exc:
            raise ConfigError(f"{where}redis.url: {exc}") from None
    if settings.auth_configured is False and (
        settings.receiver.basic_auth_user or settings.receiver.basic_auth_password
    ):
        raise ConfigError(f"{where}receiver.basic_auth_user/basic_auth_password: set both or neither")
    _check_receiver(settings.receiver, where)
    if settings.worker.job_timeout_seconds is not None and settings.integrations:
        from shared.timing import JobBudget

        problems = JobBudget.of(settings).problems()
        if problems:
            raise ConfigError(
                f"{where}worker.job_timeout_seconds: too short: "
                + "; ".join(problems)
                + " (the default, the largest timeout_seconds + 10, is safe)"
            )
    retention = settings.retention
    if retention.failure_seconds < retention.payload_seconds:
        raise ConfigError(f"{where}retention.failure_seconds: must be at least retention.payload_seconds")


def _check_receiver(receiver: ReceiverConfig, where: str) -> None:
    import ipaddress

    for index, value in enumerate(receiver.trusted_proxies):
        try:
            ipaddress.ip_network(value, strict=False)
        except ValueError:
            raise ConfigError(
                f"{where}receiver.trusted_proxies[{index}]: {value!r} is not an IP address or CIDR network"
            ) from None
    if receiver.max_inflight_bytes < receiver.max_body_bytes:
        raise ConfigError(
            f"{where}receiver.max_inflight_bytes: must be at least receiver.max_body_bytes"
            f" ({receiver.max_inflight_bytes} < {receiver.max_body_bytes})"
        )
    if receiver.metrics_token is not None and len(receiver.metrics_token) < 16:
        raise ConfigError(f"{where}receiver.metrics_token: too short (at least 16 characters)")


def _substitute(value: Any, env: Mapping[str, str], key: str) -> Any:
    if isinstance(value, str):

        def replace(match: re.Match[str]) -> str:
            name = match.group(1)
            if name not in env:
                raise ConfigError(f"{key}: environment variable {name} is not set")
            return env[name]

        return _VAR_RE.sub(replace, value)
    if isinstance(value, dict):
        return {k: _substitute(v, env, f"{key}.{k}" if key else k) for k, v in value.items()}
    if isinstance(value, list):
        return [_substitute(v, env, f"{key}[{i}]") for i, v in enumerate(value)]
    return value


def _is_secret(kind: Any) -> bool:
    return bool(getattr(kind, "extra", None) and kind.extra.get("secret"))


def settings_fields() -> Iterator[tuple[str, Any]]:
    """Every field of the settings Structs, nested ones and each integration type's included:
    (its name, each type it may take, as ``msgspec.inspect`` describes it)."""
    import msgspec.inspect as mi

    seen: set[type] = set()
    todo: list[Any] = [mi.type_info(Settings)]
    while todo:
        node = todo.pop()
        if isinstance(node, mi.StructType):
            if node.cls in seen:
                continue
            seen.add(node.cls)
            for field in node.fields:
                kinds = field.type.types if isinstance(field.type, mi.UnionType) else (field.type,)
                for kind in kinds:
                    yield field.name, kind
                    todo.append(kind)
        elif isinstance(node, mi.UnionType):
            todo.extend(node.types)
        elif isinstance(node, mi.ListType):
            todo.append(node.item_type)


def _secret_fields() -> tuple[frozenset[str], frozenset[str]]:
    """Names of the settings fields marked :data:`Secret`: (those whose value is secret, those
    whose every dict value is secret), read off the Structs themselves."""
    import msgspec.inspect as mi

    plain: set[str] = set()
    mapping: set[str] = set()
    for name, kind in settings_fields():
        if _is_secret(kind):
            plain.add(name)
        elif isinstance(kind, mi.DictType) and _is_secret(kind.value_type):
            mapping.add(name)
    return frozenset(plain), frozenset(mapping)


SECRET_KEYS, SECRET_MAPPINGS = _secret_fields()


def secret_values(settings: Settings) -> set[str]:
    """Every secret these settings hold: the values of fields marked :data:`Secret` (and of
    each secret mapping, with the credential of a ``Bearer xyz`` alone), a signing secret's
    bare key, and the password in any URL or DSN."""
    found: set[str] = set()

    def walk(value: Any) -> None:
        if isinstance(value, dict):
            for key, item in value.items():
                if key in SECRET_KEYS and isinstance(item, str):
                    found.add(item)
                    if key == "signing_secret":
                        found.add(item.removeprefix("whsec_"))
                elif key in SECRET_MAPPINGS and isinstance(item, dict):
                    for text in item.values():
                        found.update((text, text.rsplit(" ", 1)[-1]))
                elif key in ("url", "dsn") and isinstance(item, str):
                    try:
                        password = urlsplit(item).password
                    except ValueError:
                        password = None
                    if password:
                        found.add(password)
                else:
                    walk(item)
        elif isinstance(value, list):
            for item in value:
                walk(item)

    walk(msgspec.to_builtins(settings))
    return {s for s in found if s}


def masked(settings: Settings) -> dict[str, Any]:
    """The effective settings as plain data, secrets replaced by ``***``."""
    data: dict[str, Any] = _mask(msgspec.to_builtins(settings))
    return data


def _mask(value: Any, key: str = "") -> Any:
    if isinstance(value, dict):
        out: dict[str, Any] = {}
        for k, v in value.items():
            if k in SECRET_MAPPINGS and isinstance(v, dict):
                out[k] = {hk: "***" for hk in v}
            elif k in SECRET_KEYS and v is not None:
                out[k] = "***"
            elif k in ("url", "dsn") and isinstance(v, str):
                out[k] = mask_url(v)
            else:
                out[k] = _mask(v, k)
        return out
    if isinstance(value, list):
        return [_mask(v, key) for v in value]
    return value


# query parameters that carry secrets (?password=, ?access_token=, ?sslpassword=, ?api_key=...)
_SECRET_PARAM_RE = re.compile(r"pass|secret|token|key|auth|credential|signature", re.IGNORECASE)


def url_problem(url: str) -> str | None:
    """Why a URL cannot be what its writer meant, without repeating any of it (it may hold a
    password): a user or password with ``/``, ``?``, ``#`` or ``@`` not percent-encoded ends the
    host part early, so the rest of the password lands in the path or the query (an unencoded
    ``@`` is fine: the host is what follows the last one)."""
    scheme, sep, rest = url.partition("://")
    if not sep or scheme == "unix":
        return None
    authority = rest.split("/", 1)[0].split("?", 1)[0].split("#", 1)[0]
    tail = rest[len(authority) :]
    if "@" in tail:
        return (
            "the user or password contains /, ?, # or @: percent-encode them in the URL"
            " (/ as %2F, ? as %3F, # as %23, @ as %40, : as %3A)"
        )
    try:
        urlsplit(url).port  # noqa: B018 - parsing it is the check
    except ValueError:
        return "the port is not a number (a password with : or another reserved character? percent-encode it)"
    return None


def mask_url(url: str) -> str:
    """The URL with its password and any secret-looking query value hidden
    (``redis://user:***@host/0?ssl_password=***``); nothing at all when it cannot be parsed."""
    if url_problem(url) is not None:
        return "***"
    try:
        parts = urlsplit(url)
        password = parts.password
    except ValueError:
        return "***"  # unparseable: show nothing that could be a password
    if password is not None:
        netloc = parts.netloc.rsplit("@", 1)[1]
        parts = parts._replace(netloc=f"{parts.username or ''}:***@{netloc}")
    if parts.query:
        pairs = [pair.partition("=") for pair in parts.query.split("&")]
        parts = parts._replace(
            query="&".join(
                f"{name}{eq}***" if eq and _SECRET_PARAM_RE.search(name) else f"{name}{eq}{value}"
                for name, eq, value in pairs
            )
        )
    return urlunsplit(parts)
