"""``email``: send the learner a confirmation of their released result over SMTP.

Subject, text and HTML bodies are Jinja2 templates (built-in defaults in
``worker/integrations/templates/``; operators may supply their own, and separate
ones for failed results). Each worker process keeps a pool of up to ``pool_size`` SMTP
connections open and reuses them while the server allows it. See ``docs/email.md``.

Outcomes: ``"250"`` on success; :class:`PermanentError` for an invalid address,
an SMTP 5xx answer, a broken template or an unusable server (no STARTTLS, no AUTH);
:class:`TransientError` for connection errors, timeouts and SMTP 4xx answers;
:class:`UnknownOutcome` for a timeout or a lost connection after the message was handed over.
"""

from __future__ import annotations

import asyncio
import logging
import re
import traceback
from datetime import UTC, datetime, tzinfo
from email.errors import HeaderParseError, MessageError
from email.headerregistry import Address, AddressHeader, HeaderRegistry
from email.message import EmailMessage
from email.utils import formatdate
from importlib.resources import files
from pathlib import Path
from typing import Any, NoReturn
from zoneinfo import ZoneInfo, ZoneInfoNotFoundError

import aiosmtplib
import jinja2
import msgspec
from aiosmtplib.email import flatten_message

from shared.contract import event_id as compute_event_id
from shared.logs import mask_email, scrub
from shared.payload import ExamResultsReleased, decoder
from shared.settings import EmailIntegration
from worker.integrations.base import (
    Delivery,
    DeliveryError,
    Integration,
    PermanentError,
    TransientError,
    UnknownOutcome,
)
from worker.integrations.releases import EarlierRelease, find_earlier_release

log = logging.getLogger("examhook.worker.email")

DEFAULT_TEMPLATE_DIR = Path(__file__).resolve().parent / "templates"
DEFAULT_TEMPLATES = {"subject": "email_subject.txt", "text": "email_text.txt", "html": "email_html.html"}
PARTS = ("subject", "text", "html")
DEFAULT_PORTS = {"starttls": 587, "implicit": 465, "none": 587}

# One DNS label: letters/digits/hyphens, not starting or ending with a hyphen.
_LABEL = r"(?!-)[A-Za-z0-9-]{1,63}(?<!-)"
_DOMAIN_RE = re.compile(rf"^{_LABEL}(?:\.{_LABEL})+$")
_HEADERS = HeaderRegistry()


# --------------------------------------------------------------------------- addresses


class InvalidAddress(ValueError):
    """The text is not one usable email address."""


def parse_address(value: str, *, allow_display_name: bool = False) -> Address:
    """One email address, checked offline (syntax only; no DNS).

    ``allow_display_name`` accepts ``Name <addr@example.org>`` (for ``from`` and
    ``reply_to``). An internationalised domain is converted to its ASCII form.
    """
    if "\r" in value or "\n" in value:
        raise InvalidAddress("contains a line break")
    value = value.strip()
    try:
        if allow_display_name and "<" in value:
            header = _HEADERS("From", value)
            if not isinstance(header, AddressHeader) or header.defects or len(header.addresses) != 1:
                raise InvalidAddress("not a single address")
            address = header.addresses[0]
        else:
            address = Address(addr_spec=value)
    except (MessageError, HeaderParseError, ValueError, IndexError) as exc:
        if isinstance(exc, InvalidAddress):
            raise
        raise InvalidAddress("not an email address") from None
    local, domain = address.username, address.domain
    if not local or not domain:
        raise InvalidAddress("not an email address")
    try:
        ascii_domain = domain.encode("idna").decode("ascii")
    except UnicodeError:
        raise InvalidAddress("invalid domain") from None
    if len(local) > 64 or len(ascii_domain) > 253 or not _DOMAIN_RE.match(ascii_domain):
        raise InvalidAddress("invalid domain" if len(local) <= 64 else "local part too long")
    return Address(display_name=address.display_name, username=local, domain=ascii_domain)


def _checked(value: str, what: str, *, allow_display_name: bool = False) -> Address:
    try:
        return parse_address(value, allow_display_name=allow_display_name)
    except InvalidAddress as exc:
        shown = mask_email(value) if what == "user.email" else repr(value)
        raise PermanentError(f"{what} {shown} is not a valid email address ({exc})") from None


def check_addresses(config: EmailIntegration) -> list[str]:
    """Problems with the configured ``from``, ``reply_to`` and ``bcc`` addresses."""
    problems: list[str] = []
    checks = [("from", config.from_address, True)]
    if config.reply_to is not None:
        checks.append(("reply_to", config.reply_to, True))
    checks += [(f"bcc[{i}]", bcc, False) for i, bcc in enumerate(config.bcc)]
    for key, value, display in checks:
        try:
            parse_address(value, allow_display_name=display)
        except InvalidAddress as exc:
            problems.append(f"{key}: {value!r} is not a valid email address ({exc})")
    return problems


# --------------------------------------------------------------------------- templates


class TemplateProblem(Exception):
    """A template could not be loaded or rendered; the message names file and line."""


def _number(value: float) -> int | float:
    """``25.0`` -> ``25``, ``62.456`` -> ``62.46``: numbers that print cleanly."""
    rounded = round(float(value), 2)
    return int(rounded) if rounded.is_integer() else rounded


def parse_time(value: str) -> datetime | None:
    """An ISO 8601 timestamp (``2026-11-23T09:53:11.414Z``) as an aware UTC datetime."""
    try:
        parsed = datetime.fromisoformat(value)
    except (TypeError, ValueError):
        return None
    if parsed.tzinfo is None:
        parsed = parsed.replace(tzinfo=UTC)
    return parsed.astimezone(UTC)


def _zone(name: str | None) -> tzinfo:
    if not name or name == "UTC":
        return UTC
    try:
        return ZoneInfo(name)
    except (ZoneInfoNotFoundError, ValueError):  # checked at load; a template must still render
        return UTC


def readable_date(value: datetime) -> str:
    return f"{value.day} {value:%B %Y}"


def readable_datetime(value: datetime) -> str:
    """``23 November 2026 at 09:53 UTC``; in another zone its abbreviation (``GMT``, ``CET``)."""
    zone = value.tzname() or "UTC"
    return f"{readable_date(value)} at {value:%H:%M} {zone}"


@jinja2.pass_context
def datetime_filter(context: Any, value: Any, fmt: str | None = None) -> str:
    """Jinja filter ``datetime``: an ISO timestamp or datetime, readably or by ``strftime``,
    in the integration's ``timezone``."""
    parsed = value if isinstance(value, datetime) else parse_time(str(value))
    if parsed is None:
        return str(value)
    if parsed.tzinfo is None:
        parsed = parsed.replace(tzinfo=UTC)
    parsed = parsed.astimezone(_zone(context.get("timezone")))
    return parsed.strftime(fmt) if fmt else readable_datetime(parsed)


def readable_duration(milliseconds: float) -> str:
    minutes = round(milliseconds / 60_000)
    if minutes < 1:
        return "less than a minute"
    hours, minutes = divmod(minutes, 60)
    parts = []
    if hours:
        parts.append(f"{hours} hour{'s' if hours != 1 else ''}")
    if minutes:
        parts.append(f"{minutes} minute{'s' if minutes != 1 else ''}")
    return " ".join(parts)


def _result_of(event: ExamResultsReleased) -> dict[str, Any]:
    attempt = event.attempt
    pass_marks = [g.min_score for g in attempt.grade_criteria.grades if g.is_pass]
    return {
        "grade_label": attempt.grade.label,
        "passed": attempt.grade.is_pass,
        "score": _number(attempt.score),
        "score_percent": _number(round(attempt.score_frac * 100, 1)),
        "pass_mark": _number(min(pass_marks)) if pass_marks else None,
    }


def _when(iso_text: str, zone: tzinfo) -> dict[str, Any]:
    moment = parse_time(iso_text)
    local = moment.astimezone(zone) if moment else None
    return {
        "released_at": readable_datetime(local) if local else iso_text,
        "released_date": readable_date(local) if local else iso_text,
        "released_at_iso": iso_text,
        "released_datetime": local,
    }


def template_context(
    event: ExamResultsReleased,
    event_id: str | None = None,
    *,
    timezone: str = "UTC",
    earlier: EarlierRelease | None = None,
) -> dict[str, Any]:
    """Everything a template can use (documented in ``docs/email.md``). Times are shown in
    ``timezone`` (an IANA name); ``earlier`` is the release this one replaces, if any."""
    attempt = event.attempt
    zone = _zone(timezone)
    previous: dict[str, Any] | None = None
    if earlier is not None:
        previous = {**_when(earlier.released_at, zone), "known": earlier.event is not None}
        if earlier.event is not None:
            previous.update(_result_of(earlier.event))
    return {
        "event": event,
        "event_id": event_id or compute_event_id(event),
        "learner_name": event.user.name,
        "learner_email": event.user.email,
        "exam_name": event.exam.name,
        "test_title": event.test.title,
        "qualification_name": event.exam.attr.qualification_name,
        "user_group_name": event.exam.user_group.name,
        **_result_of(event),
        "marks_points": _number(attempt.marks.points),
        "marks_max": _number(attempt.marks.max_points),
        "marks_penalties": _number(attempt.marks.penalties),
        "correct_answers": _number(attempt.total_answered_correctly),
        "total_questions": _number(attempt.total_questions),
        "time_spent": readable_duration(attempt.time_spent_in_ms),
        **_when(attempt.audit.released_at, zone),
        "timezone": timezone,
        # a re-release: this result replaces an earlier one of the same attempt
        "is_update": earlier is not None,
        "previous": previous,
    }


def _environment(directory: Path, *, html: bool) -> jinja2.Environment:
    env = jinja2.Environment(
        loader=jinja2.FileSystemLoader(str(directory)),
        autoescape=html,
        undefined=jinja2.StrictUndefined,
        trim_blocks=True,
        lstrip_blocks=True,
        keep_trailing_newline=True,
    )
    env.filters["datetime"] = datetime_filter
    return env


# (directory, html) -> Environment; Jinja caches compiled templates per environment
# and reloads a file when it changes on disk.
_environments: dict[tuple[Path, bool], jinja2.Environment] = {}


def _template_source(config: EmailIntegration, part: str, failed: bool) -> tuple[str, str | None]:
    """(config key, operator path or None for the built-in default) for one part."""
    if failed:
        fail_key = f"fail_{part}_template"
        fail_path: str | None = getattr(config, fail_key)
        if fail_path:
            return fail_key, fail_path
    key = f"{part}_template"
    path: str | None = getattr(config, key)
    return key, path


def _load(part: str, path: str | None) -> jinja2.Template:
    html = part == "html"
    if path is None:
        directory, name = DEFAULT_TEMPLATE_DIR, DEFAULT_TEMPLATES[part]
    else:
        file = Path(path).expanduser().resolve()
        directory, name = file.parent, file.name
    env = _environments.get((directory, html))
    if env is None:
        env = _environments[(directory, html)] = _environment(directory, html=html)
    return env.get_template(name)


def _describe(key: str, path: str | None, exc: Exception) -> str:
    where = f"{key} {path}" if path else f"built-in {key.removeprefix('fail_')}"
    if isinstance(exc, jinja2.TemplateNotFound):
        return f"{where}: file not found"
    if isinstance(exc, jinja2.TemplateSyntaxError):
        file = exc.filename or path or "?"
        return f"{where}: {file}, line {exc.lineno}: syntax error: {exc.message}"
    if isinstance(exc, OSError):
        return f"{where}: cannot read: {exc.strerror or exc}"
    # A runtime error: Jinja puts the template's file and line into the traceback.
    frames = [
        f
        for f in traceback.extract_tb(exc.__traceback__)
        if not f.filename.endswith(".py") and not f.filename.startswith("<")
    ]
    kind = "undefined variable" if isinstance(exc, jinja2.UndefinedError) else exc.__class__.__name__
    if frames:
        return f"{where}: {frames[-1].filename}, line {frames[-1].lineno}: {kind}: {exc}"
    return f"{where}: {kind}: {exc}"


def _render_part(config: EmailIntegration, part: str, failed: bool, context: dict[str, Any]) -> str:
    key, path = _template_source(config, part, failed)
    try:
        text = _load(part, path).render(context)
    except Exception as exc:  # a template can raise anything; every failure is a template problem
        raise TemplateProblem(_describe(key, path, exc)) from None
    if part == "subject":
        text = " ".join(text.split())
        if not text:
            raise TemplateProblem(f"{key} {path or '(built-in)'}: renders an empty subject")
    return text


def render_templates(
    config: EmailIntegration,
    event: ExamResultsReleased,
    event_id: str | None = None,
    earlier: EarlierRelease | None = None,
) -> tuple[str, str, str]:
    """(subject, text, html) for ``event``; raises :class:`TemplateProblem`.

    A failed result (``attempt.grade.isPass`` false) uses ``fail_*_template``, else
    the normal template, else the built-in default, for each part separately.
    The subject's whitespace (line breaks included) is collapsed to single spaces.
    ``earlier``: the release of the same attempt this one replaces (a re-release).
    """
    context = template_context(event, event_id, timezone=config.timezone, earlier=earlier)
    failed = not event.attempt.grade.is_pass
    subject, text, html = (_render_part(config, part, failed, context) for part in PARTS)
    return subject, text, html


def sample_events() -> tuple[ExamResultsReleased, ExamResultsReleased]:
    """``shared/sample.json`` as a passing event, and a failing variant of it."""
    passed = decoder.decode((files("shared") / "sample.json").read_bytes())
    attempt = passed.attempt
    fail_grade = next((g for g in attempt.grade_criteria.grades if not g.is_pass), None)
    fail_grade = fail_grade or msgspec.structs.replace(
        attempt.grade, label="Fail", is_pass=False, min_score=0
    )
    failed_attempt = msgspec.structs.replace(
        attempt,
        grade=fail_grade,
        score=30.0,
        score_frac=0.3,
        total_answered_correctly=attempt.total_questions * 0.3,
        marks=msgspec.structs.replace(attempt.marks, points=attempt.marks.max_points * 0.3),
    )
    return passed, msgspec.structs.replace(passed, attempt=failed_attempt)


def check_templates(config: EmailIntegration) -> list[str]:
    """Render every template this integration can use (pass and fail variants) against
    the sample payload; return each problem once, naming file and line. Connects to nothing."""
    problems: list[str] = []
    passed, failing = sample_events()
    # each variant as a first release, and as a re-release replacing an earlier one
    earlier = EarlierRelease(passed.attempt.audit.released_at, failing)
    for event, replaces in ((passed, None), (failing, None), (passed, earlier)):
        failed = not event.attempt.grade.is_pass
        context = template_context(event, timezone=config.timezone, earlier=replaces)
        for part in PARTS:
            try:
                _render_part(config, part, failed, context)
            except TemplateProblem as exc:
                if str(exc) not in problems:
                    problems.append(str(exc))
    return problems


# --------------------------------------------------------------------------- sending


# what aiosmtplib does to a message before DATA: CRLF line endings, a leading "." doubled
_LINE_ENDINGS_RE = re.compile(rb"(?:\r\n|\n|\r(?!\n))")
_LEADING_PERIOD_RE = re.compile(rb"(?m)^\.")


def _scrub(text: str) -> str:
    """A server's reply or error text (replies often quote the recipient; they end up in logs
    and failure records): one line, short, addresses masked."""
    return scrub(text)


def _smtp_error(exc: aiosmtplib.SMTPResponseException, stage: str) -> NoReturn:
    text = _scrub(str(exc.message))
    message = f"SMTP {exc.code} at {stage}: {text}"
    if 400 <= exc.code < 500:
        raise TransientError(message, status=str(exc.code)) from None
    raise PermanentError(message, status=str(exc.code)) from None


def _data_payload(data: bytes) -> bytes:
    data = _LINE_ENDINGS_RE.sub(b"\r\n", data)
    if not data.endswith(b"\r\n"):
        data += b"\r\n"
    return _LEADING_PERIOD_RE.sub(b"..", data) + b".\r\n"


class EmailDelivery(Integration[EmailIntegration]):
    """One pool of up to ``pool_size`` SMTP connections per worker process, each kept open
    and reused while the server allows it. ``timeout_seconds`` bounds one conversation on
    one connection (connecting included), never the wait for a free connection (the
    integration's lane, at most ``pool_size`` at once, does the waiting).

    Exactly once while the server answers within the timeout: the message is handed over
    (the DATA content sent) only after the hand-over is marked in Redis, so a worker that
    dies before it leaves a pair that is sent again without doubt; a timeout or a lost
    connection after it is an unknown outcome (``on_unknown_outcome``, "fail" by default).
    """

    marks_hand_over = True
    wants_earlier_release = True  # a re-release's message says it is an update

    def __init__(self, config: EmailIntegration) -> None:
        super().__init__(config)
        self.port = config.smtp_port or DEFAULT_PORTS[config.tls]
        self._idle: list[aiosmtplib.SMTP] = []
        self._in_use: set[aiosmtplib.SMTP] = set()
        self._gate = asyncio.Semaphore(config.pool_size)
        #: SMTP connections opened so far by this instance (for logs and tests).
        self.connections_opened = 0

    async def start(self) -> None:
        for problem in check_templates(self.config) + check_addresses(self.config):
            log.warning("email integration misconfigured: %s", problem, extra={"integration": self.name})

    async def close(self) -> None:
        idle, self._idle = self._idle, []
        for client in idle:
            await self._quit(client)
        for client in list(self._in_use):
            client.close()

    async def _quit(self, client: aiosmtplib.SMTP) -> None:
        if not client.is_connected:
            return
        try:
            async with asyncio.timeout(min(self.config.timeout_seconds, 5.0)):
                await client.quit()
        except (aiosmtplib.SMTPException, OSError, TimeoutError):
            pass
        finally:
            client.close()

    # -- message

    def build_message(self, delivery: Delivery) -> tuple[EmailMessage, str, list[str]]:
        """(message, envelope sender, envelope recipients: the learner first, then bcc)."""
        config, event = self.config, delivery.event
        learner = _checked(event.user.email, "user.email")
        sender = _checked(config.from_address, "from", allow_display_name=True)
        reply_to = _checked(config.reply_to, "reply_to", allow_display_name=True) if config.reply_to else None
        bcc = [_checked(b, f"bcc[{i}]") for i, b in enumerate(config.bcc)]
        try:
            subject, text, html = render_templates(config, event, delivery.event_id, delivery.earlier)
        except TemplateProblem as exc:
            raise PermanentError(f"template error: {exc}") from None

        message = EmailMessage()
        message["Subject"] = subject
        message["From"] = sender
        # a line break in a header would be refused by the email package: fold the name
        name = " ".join(event.user.name.split())
        message["To"] = Address(display_name=name, username=learner.username, domain=learner.domain)
        if reply_to is not None:
            message["Reply-To"] = reply_to
        message["Date"] = formatdate(localtime=False, usegmt=True)
        message["Message-ID"] = f"<{delivery.event_id}@{sender.domain}>"
        message["X-Examhook-Event-Id"] = delivery.event_id
        # RFC 3834: an automatic message; out-of-office responders should not answer it.
        message["Auto-Submitted"] = "auto-generated"
        message.set_content(text)
        message.add_alternative(html, subtype="html")
        recipients = [learner.addr_spec, *(b.addr_spec for b in bcc if b.addr_spec != learner.addr_spec)]
        return message, sender.addr_spec, recipients

    # -- delivery

    async def deliver(self, delivery: Delivery) -> str:
        message, sender, recipients = self.build_message(delivery)
        async with self._gate:  # a free connection: not part of the timeout
            send = _Send(self, delivery, message, sender, recipients)
            status = await send.run()
        log.debug(
            "email sent",
            extra={"event_id": delivery.event_id, "to": mask_email(recipients[0]), "status": status},
        )
        return status

    def _take(self) -> aiosmtplib.SMTP | None:
        while self._idle:
            client = self._idle.pop()
            if client.is_connected:
                self._in_use.add(client)
                return client
            client.close()
        return None

    def _give_back(self, client: aiosmtplib.SMTP) -> None:
        self._in_use.discard(client)
        if client.is_connected:
            self._idle.append(client)
        else:
            client.close()

    def _drop(self, client: aiosmtplib.SMTP | None) -> None:
        if client is not None:
            self._in_use.discard(client)
            client.close()

    async def _connect(self) -> aiosmtplib.SMTP:
        config = self.config
        client = aiosmtplib.SMTP(
            hostname=config.smtp_host,
            port=self.port,
            timeout=config.timeout_seconds,
            use_tls=config.tls == "implicit",
            start_tls=config.tls == "starttls",
        )
        stage = "connect"
        try:
            await client.connect()
            if config.username is not None:
                stage = "login"
                await client.login(config.username, config.password or "")
        except aiosmtplib.SMTPResponseException as exc:
            client.close()
            _smtp_error(exc, stage)
        except (
            aiosmtplib.SMTPServerDisconnected,
            aiosmtplib.SMTPConnectError,
            aiosmtplib.SMTPTimeoutError,
            OSError,
            TimeoutError,
        ) as exc:
            client.close()
            raise TransientError(
                f"cannot connect to {config.smtp_host}:{self.port}: {_reason(exc)}"
            ) from None
        except aiosmtplib.SMTPException as exc:
            # STARTTLS or AUTH not offered by the server: a configuration problem.
            client.close()
            raise PermanentError(f"{config.smtp_host}:{self.port} at {stage}: {_reason(exc)}") from None
        except BaseException:
            client.close()
            raise
        self.connections_opened += 1
        self._in_use.add(client)
        log.debug(
            "connected to SMTP server",
            extra={"integration": self.name, "host": config.smtp_host, "port": self.port, "tls": config.tls},
        )
        return client


class _Send:
    """One message over one connection of the pool: the conversation and its timeout."""

    def __init__(
        self,
        owner: EmailDelivery,
        delivery: Delivery,
        message: EmailMessage,
        sender: str,
        recipients: list[str],
    ) -> None:
        self.owner = owner
        self.delivery = delivery
        self.message = message
        self.sender = sender
        self.recipients = recipients
        self.client: aiosmtplib.SMTP | None = None
        self.handed_over = False  # the DATA content went out: the server may have the message

    async def run(self) -> str:
        timeout = self.owner.config.timeout_seconds
        try:
            async with asyncio.timeout(timeout):
                status = await self._converse()
        except TimeoutError:
            self.owner._drop(self.client)
            if self.handed_over:
                raise UnknownOutcome(
                    f"no answer to DATA within {timeout:g}s (the server may have it)"
                ) from None
            raise TransientError(f"timed out after {timeout:g}s") from None
        except DeliveryError:
            # an answer the conversation survived (the envelope was reset) keeps its connection
            if self.client is not None:
                self.owner._give_back(self.client)
            raise
        except BaseException:
            self.owner._drop(self.client)
            raise
        assert self.client is not None
        self.owner._give_back(self.client)
        return status

    async def _converse(self) -> str:
        owner = self.owner
        self.client = owner._take()
        reused = self.client is not None
        if self.client is None:
            self.client = await owner._connect()
        try:
            return await self._transaction(self.client)
        except _StaleConnection as stale:
            owner._drop(self.client)
            self.client = None
            if not reused:
                stale.raise_classified()
        # The server dropped an idle connection before taking anything: once more, fresh.
        log.debug("SMTP connection was closed by the server; reconnecting", extra={"integration": owner.name})
        self.client = await owner._connect()
        try:
            return await self._transaction(self.client)
        except _StaleConnection as stale:
            owner._drop(self.client)
            self.client = None
            stale.raise_classified()

    async def _transaction(self, client: aiosmtplib.SMTP) -> str:
        sender, recipients = self.sender, self.recipients
        stage = "MAIL"
        try:
            if client.is_ehlo_or_helo_needed:
                await client.ehlo()
            options: list[str] = []
            utf8 = not all(a.isascii() for a in (sender, *recipients))
            if utf8:
                if not client.supports_extension("smtputf8"):
                    raise PermanentError("the address needs SMTPUTF8, which the SMTP server does not offer")
                options.append("SMTPUTF8")
            eight_bit = client.supports_extension("8bitmime")
            if eight_bit:
                options.append("BODY=8BITMIME")
            data = flatten_message(self.message, utf8=utf8, cte_type="8bit" if eight_bit else "7bit")
            encoding = "utf-8" if utf8 else "ascii"
            await client.mail(sender, options=options, encoding=encoding)
            stage = "RCPT"
            # The learner first: if refused, nobody (not even bcc) gets a copy.
            await client.rcpt(recipients[0], encoding=encoding)
            refused_bcc = 0
            for bcc in recipients[1:]:
                try:
                    await client.rcpt(bcc, encoding=encoding)
                except aiosmtplib.SMTPRecipientRefused:
                    refused_bcc += 1
            stage = "DATA"
            response = await self._data(client, data)
        except aiosmtplib.SMTPResponseException as exc:
            if exc.code == 421 and stage == "MAIL":  # "closing channel" before anything was taken
                raise _StaleConnection(exc, stage) from None
            await self._reset(client, exc)
            _smtp_error(exc, stage)
        except (aiosmtplib.SMTPServerDisconnected, ConnectionError) as exc:
            self.owner._drop(client)
            self.client = None
            if stage == "MAIL":
                raise _StaleConnection(exc, stage) from None
            if self.handed_over:
                raise UnknownOutcome(f"connection lost after DATA: {_reason(exc)}") from None
            raise TransientError(f"connection lost at {stage}: {_reason(exc)}") from None
        except (aiosmtplib.SMTPTimeoutError, TimeoutError, OSError) as exc:
            self.owner._drop(client)
            self.client = None
            if self.handed_over:
                raise UnknownOutcome(f"no answer after DATA: {_reason(exc)}") from None
            raise TransientError(f"SMTP error at {stage}: {_reason(exc)}") from None
        except (PermanentError, TransientError):
            raise
        except aiosmtplib.SMTPException as exc:
            await self._reset(client, exc)
            raise PermanentError(f"SMTP error at {stage}: {_reason(exc)}") from None
        if refused_bcc:
            log.warning(
                "SMTP server refused %d bcc recipient(s)", refused_bcc, extra={"integration": self.owner.name}
            )
        return str(response.code)

    async def _data(self, client: aiosmtplib.SMTP, data: bytes) -> aiosmtplib.SMTPResponse:
        """DATA in two steps, with the hand-over marked in between: after the server's 354,
        nothing is sent until Redis knows this attempt is handing the message over."""
        start = await client.execute_command(b"DATA")
        if start.code != 354:
            raise aiosmtplib.SMTPDataError(start.code, start.message)
        try:
            await self.delivery.hand_over()
        except Exception as exc:
            # the server waits for the content: only dropping the connection abandons it
            self.owner._drop(client)
            self.client = None
            raise TransientError(
                f"could not mark the hand-over in Redis ({exc.__class__.__name__}); nothing was sent"
            ) from None
        protocol = client.protocol
        if protocol is None:
            raise aiosmtplib.SMTPServerDisconnected("Connection lost")
        self.handed_over = True
        protocol.write(_data_payload(data))
        response = await protocol.read_response(timeout=self.owner.config.timeout_seconds)
        if response.code != 250:
            raise aiosmtplib.SMTPDataError(response.code, response.message)
        return response

    async def _reset(self, client: aiosmtplib.SMTP, exc: Exception) -> None:
        """Clear the envelope so the connection can be reused; drop it if that fails."""
        if isinstance(exc, aiosmtplib.SMTPResponseException) and exc.code == 421:
            self.owner._drop(client)
            self.client = None
            return
        try:
            await client.rset()
        except (aiosmtplib.SMTPException, OSError):
            self.owner._drop(client)
            self.client = None


class _StaleConnection(Exception):
    """The reused connection was gone before the server accepted anything."""

    def __init__(self, cause: Exception, stage: str) -> None:
        super().__init__(str(cause))
        self.cause = cause
        self.stage = stage

    def raise_classified(self) -> NoReturn:
        if isinstance(self.cause, aiosmtplib.SMTPResponseException):
            _smtp_error(self.cause, self.stage)
        raise TransientError(f"connection lost at {self.stage}: {_reason(self.cause)}") from None


def _reason(exc: BaseException) -> str:
    return _scrub(str(exc) or exc.__class__.__name__)


__all__: list[str] = [
    "EarlierRelease",
    "EmailDelivery",
    "InvalidAddress",
    "TemplateProblem",
    "check_addresses",
    "check_templates",
    "find_earlier_release",
    "parse_address",
    "render_templates",
    "template_context",
]
