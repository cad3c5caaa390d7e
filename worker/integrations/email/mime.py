"""The message itself: what is in it (:class:`Draft`), as an ``EmailMessage`` (what
``preview-email`` shows, and what is sent when an address needs SMTPUTF8), or written out
directly as MIME bytes (what is sent otherwise).

Writing the bytes directly costs ~0.1 ms a message; the email package's ``EmailMessage``
(header objects, ``set_content``, then flattening) ~1.5 ms, half of all the CPU a worker
spent per email. Both carry the same headers and parts (tests/test_email.py compares them):
a multipart/alternative of a text and an HTML part, quoted-printable UTF-8 (7-bit clean, so
fit for any server), header values RFC 2047-encoded where they are not ASCII.
"""

from __future__ import annotations

import binascii
import secrets
from dataclasses import dataclass
from email.header import Header
from email.headerregistry import Address
from email.message import EmailMessage
from email.utils import formataddr, formatdate

# RFC 5322 allows 998 characters a line; the email package folds longer header values.
MAX_HEADER_LINE = 900


@dataclass(frozen=True, slots=True)
class Draft:
    """One learner's message, every value checked (addresses) and rendered (templates)."""

    subject: str
    sender: Address
    to: Address
    reply_to: Address | None
    event_id: str
    text: str
    html: str
    date: str

    @property
    def message_id(self) -> str:
        return f"<{self.event_id}@{self.sender.domain}>"

    @property
    def needs_smtputf8(self) -> bool:
        """An address whose mailbox or domain is not ASCII (only SMTPUTF8 can carry it)."""
        return not all(a.addr_spec.isascii() for a in (self.sender, self.to, *self._reply_to))

    @property
    def _reply_to(self) -> tuple[Address, ...]:
        return (self.reply_to,) if self.reply_to is not None else ()

    def fields(self) -> list[tuple[str, str | Address]]:
        """The headers, in order: the one list both forms are written from."""
        fields: list[tuple[str, str | Address]] = [
            ("Subject", self.subject),
            ("From", self.sender),
            ("To", self.to),
        ]
        if self.reply_to is not None:
            fields.append(("Reply-To", self.reply_to))
        return [
            *fields,
            ("Date", self.date),
            ("Message-ID", self.message_id),
            ("X-Examhook-Event-Id", self.event_id),
            # RFC 3834: an automatic message; out-of-office responders should not answer it.
            ("Auto-Submitted", "auto-generated"),
        ]

    def message(self) -> EmailMessage:
        """The draft as the email package's message."""
        message = EmailMessage()
        for name, value in self.fields():
            message[name] = value
        message.set_content(self.text)
        message.add_alternative(self.html, subtype="html")
        return message

    def as_bytes(self) -> bytes | None:
        """The draft as MIME bytes, 7-bit clean (lines end in LF; the DATA phase makes them
        CRLF); None where only :meth:`message` will do: an address that needs SMTPUTF8, a
        header line too long to send unfolded (a very long name), or a line break in a value
        (never sent as is: the email package refuses it)."""
        if self.needs_smtputf8:
            return None
        boundary = "=_examhook_" + secrets.token_hex(12)  # never in quoted-printable text
        lines = []
        for name, value in self.fields():
            if isinstance(value, Address):
                lines.append(_address(name, value))
            elif "\n" in value or "\r" in value:
                return None
            else:
                lines.append(_unstructured(name, value))
        if any(len(physical) > MAX_HEADER_LINE for line in lines for physical in line.split("\n")):
            return None
        lines += ["MIME-Version: 1.0", f'Content-Type: multipart/alternative; boundary="{boundary}"', ""]
        head = "\n".join(lines).encode("ascii")
        return b"".join(
            (
                head,
                _part(boundary, "plain", self.text),
                _part(boundary, "html", self.html),
                f"\n--{boundary}--\n".encode("ascii"),
            )
        )


def now_date() -> str:
    """The Date header's value for a message written now."""
    return formatdate(localtime=False, usegmt=True)


def _unstructured(name: str, value: str) -> str:
    if value.isascii():
        return f"{name}: {value}"  # one line (too long a one falls back: MAX_HEADER_LINE)
    # RFC 2047 encoded words, folded between words (a reader joins them without the fold)
    return f"{name}: " + Header(value, "utf-8", header_name=name).encode(linesep="\n")


def _address(name: str, address: Address) -> str:
    # one encoded word for a display name that is not ASCII, quoted where needed otherwise
    return f"{name}: " + formataddr((address.display_name, address.addr_spec), charset="utf-8")


def _part(boundary: str, subtype: str, text: str) -> bytes:
    if not text.endswith("\n"):
        text += "\n"  # as the email package's set_content ends every part
    encoded = binascii.b2a_qp(text.encode("utf-8"), istext=True)
    return (
        f'\n--{boundary}\nContent-Type: text/{subtype}; charset="utf-8"\n'
        "Content-Transfer-Encoding: quoted-printable\n\n"
    ).encode("ascii") + encoded
