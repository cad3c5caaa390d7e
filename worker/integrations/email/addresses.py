"""Email addresses: the learner's and the configured sender's, checked strictly before any
SMTP conversation (an address the server would refuse, or one that smuggles a header, is a
permanent error, never a send)."""

from __future__ import annotations

import logging
import re
from email.errors import HeaderParseError, MessageError
from email.headerregistry import Address, AddressHeader, HeaderRegistry

from shared.logs import mask_email
from shared.settings import EmailIntegration
from worker.integrations.base import (
    PermanentError,
)

log = logging.getLogger("examhook.worker.email")

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


def checked_address(value: str, what: str, *, allow_display_name: bool = False) -> Address:
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
