"""A real SMTP server for the suite: aiosmtpd in its own thread, recording every message and
answering from a script (per-recipient RCPT replies, DATA replies, delays, a hook run when a
message's content is in)."""

from __future__ import annotations

import asyncio
import email
import email.policy
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from email.message import EmailMessage
from typing import Any

import pytest
from aiosmtpd.controller import Controller


@dataclass
class Mail:
    peer: tuple[str, int]
    mail_from: str
    rcpt_tos: list[str]
    content: bytes
    reply: str
    tls: bool
    login: Any

    @property
    def message(self) -> EmailMessage:
        parsed = email.message_from_bytes(self.content, policy=email.policy.default)
        assert isinstance(parsed, EmailMessage)
        return parsed


@dataclass
class Handler:
    """aiosmtpd handler: records DATA, answers from a script, wakes the test's loop."""

    loop: asyncio.AbstractEventLoop
    mails: list[Mail] = field(default_factory=list)
    rcpt_replies: dict[str, str] = field(default_factory=dict)
    data_replies: list[str] = field(default_factory=list)
    mail_replies: list[str] = field(default_factory=list)
    data_delay: float = 0.0
    data_delays: list[float] = field(default_factory=list)  # per message, before data_delay
    rcpt_delay: float = 0.0
    # run in the server's thread once a message's content is in, before it is answered
    on_data: Callable[[], None] | None = None
    _changed: asyncio.Event = field(default_factory=asyncio.Event)

    async def handle_MAIL(self, server: Any, session: Any, envelope: Any, address: str, options: Any) -> str:
        if self.mail_replies:
            return self.mail_replies.pop(0)
        envelope.mail_from = address
        envelope.mail_options.extend(options)
        return "250 OK"

    async def handle_RCPT(self, server: Any, session: Any, envelope: Any, address: str, options: Any) -> str:
        if self.rcpt_delay:
            await asyncio.sleep(self.rcpt_delay)
        if address in self.rcpt_replies:
            return self.rcpt_replies[address]
        envelope.rcpt_tos.append(address)
        return "250 OK"

    async def handle_DATA(self, server: Any, session: Any, envelope: Any) -> str:
        # like a real MTA: the message is stored once its content is in, then answered (a
        # slow answer, or a client gone before it, does not undo the storing)
        reply = self.data_replies.pop(0) if self.data_replies else "250 2.0.0 OK: queued"
        mail = Mail(
            peer=tuple(session.peer),
            mail_from=envelope.mail_from,
            rcpt_tos=list(envelope.rcpt_tos),
            content=envelope.original_content or envelope.content,
            reply=reply,
            tls=server.transport.get_extra_info("sslcontext") is not None,
            login=session.auth_data if session.authenticated else None,
        )
        self.loop.call_soon_threadsafe(self._add, mail)
        if self.on_data is not None:
            self.on_data()
        delay = self.data_delays.pop(0) if self.data_delays else self.data_delay
        if delay:
            await asyncio.sleep(delay)
        return reply

    def _add(self, mail: Mail) -> None:
        self.mails.append(mail)
        self._changed.set()

    @property
    def accepted(self) -> list[Mail]:
        return [m for m in self.mails if m.reply.startswith("2")]

    async def wait_for(self, count: int, within: float = 10.0) -> list[Mail]:
        """Wait until ``count`` messages were accepted."""
        async with asyncio.timeout(within):
            while len(self.accepted) < count:
                self._changed.clear()
                await self._changed.wait()
        return self.accepted

    @property
    def sessions(self) -> set[tuple[str, int]]:
        """Distinct SMTP connections that carried a message (by client address and port)."""
        return {m.peer for m in self.mails}


@dataclass
class SmtpServer:
    handler: Handler
    port: int
    controller: Controller
    kwargs: dict[str, Any]

    def restart(self) -> None:
        """Stop the server (dropping every open connection) and start it again on the same port."""
        self.controller.stop()
        self.controller = Controller(self.handler, hostname="127.0.0.1", port=self.port, **self.kwargs)
        self.controller.start()


@pytest.fixture
def start_smtp(unused_tcp_port_factory: Callable[[], int]) -> Iterator[Callable[..., SmtpServer]]:
    """Start aiosmtpd servers on free ports; keyword arguments go to aiosmtpd's Controller/SMTP."""
    servers: list[SmtpServer] = []

    def start(**kwargs: Any) -> SmtpServer:
        handler = Handler(asyncio.get_running_loop())
        port = unused_tcp_port_factory()
        controller = Controller(handler, hostname="127.0.0.1", port=port, **kwargs)
        controller.start()
        server = SmtpServer(handler, port, controller, kwargs)
        servers.append(server)
        return server

    yield start
    for server in servers:
        server.controller.stop()


@pytest.fixture
async def smtp(start_smtp: Callable[..., SmtpServer]) -> SmtpServer:
    return start_smtp()
