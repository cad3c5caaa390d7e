"""Sending: the SMTP connection pool, one conversation per message under the integration's
timeout, and what each SMTP answer means for the delivery (see the package docstring)."""

from __future__ import annotations

import asyncio
import functools
import logging
import re
from email.headerregistry import Address
from email.message import EmailMessage
from typing import NoReturn

import aiosmtplib
from aiosmtplib.email import flatten_message

from shared.logs import mask_email, scrub
from shared.settings import EmailIntegration
from worker.integrations.base import (
    Delivery,
    DeliveryError,
    Integration,
    PermanentError,
    TransientError,
    UnknownOutcome,
)
from worker.integrations.email.addresses import check_addresses, checked_address
from worker.integrations.email.mime import Draft, now_date
from worker.integrations.email.templates import TemplateProblem, check_templates, render_templates

log = logging.getLogger("examhook.worker.email")

# The configured addresses (from, reply_to, bcc) are the same for every message: parsed once
# (a parse is ~75 us); an invalid one raises every time, as it is not cached.
_configured_address = functools.lru_cache(maxsize=64)(checked_address)

DEFAULT_PORTS = {"starttls": 587, "implicit": 465, "none": 587}


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

    def draft(self, delivery: Delivery) -> tuple[Draft, str, list[str]]:
        """(the message's content, envelope sender, envelope recipients: the learner first,
        then bcc); raises :class:`PermanentError` for an address or template that cannot work."""
        config, event = self.config, delivery.event
        learner = checked_address(event.user.email, "user.email")
        sender = _configured_address(config.from_address, "from", allow_display_name=True)
        reply_to = None
        if config.reply_to:
            reply_to = _configured_address(config.reply_to, "reply_to", allow_display_name=True)
        bcc = [_configured_address(b, f"bcc[{i}]") for i, b in enumerate(config.bcc)]
        try:
            subject, text, html = render_templates(config, event, delivery.event_id, delivery.earlier)
        except TemplateProblem as exc:
            raise PermanentError(f"template error: {exc}") from None
        # a line break in a header would be refused by the email package: fold the name
        name = " ".join(event.user.name.split())
        to = Address(display_name=name, username=learner.username, domain=learner.domain)
        draft = Draft(subject, sender, to, reply_to, delivery.event_id, text, html, now_date())
        recipients = [learner.addr_spec, *(b.addr_spec for b in bcc if b.addr_spec != learner.addr_spec)]
        return draft, sender.addr_spec, recipients

    def build_message(self, delivery: Delivery) -> tuple[EmailMessage, str, list[str]]:
        """(message, envelope sender, envelope recipients), the message as ``EmailMessage``."""
        draft, sender, recipients = self.draft(delivery)
        return draft.message(), sender, recipients

    # -- delivery

    async def deliver(self, delivery: Delivery) -> str:
        draft, sender, recipients = self.draft(delivery)
        content = draft.as_bytes() or draft.message()
        async with self._gate:  # a free connection: not part of the timeout
            send = _Send(self, delivery, content, sender, recipients)
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
        message: EmailMessage | bytes,
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
            if isinstance(self.message, bytes):  # written as 7-bit MIME already (mime.py)
                data = self.message
            else:
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
