"""See the email before the learners do: the message an email integration would send for
an event (``examhook preview-email``, ``/admin/email-preview``). Built by the integration's
own ``build_message`` (headers, addresses, templates), so it is what would be sent; nothing
is sent and no SMTP server is contacted.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import msgspec

from shared.contract import event_id_of
from shared.payload import decoder, error_path
from shared.settings import EmailIntegration, Settings
from shared.store import Store
from worker.integrations.base import Delivery, DeliveryError
from worker.integrations.email import (
    EarlierRelease,
    EmailDelivery,
    TemplateProblem,
    find_earlier_release,
    render_templates,
    sample_events,
)

# previewed when no email integration is configured: the built-in templates
PLACEHOLDER = EmailIntegration(
    name="email", smtp_host="smtp.example.org", from_address="Exams Office <results@example.org>"
)


class PreviewError(Exception):
    """No preview: the message says why (unknown integration or event, invalid body...)."""


@dataclass(frozen=True)
class Preview:
    integration: str
    event_id: str
    headers: list[tuple[str, str]]
    envelope_from: str
    envelope_to: list[str]
    subject: str
    text: str
    html: str
    is_update: bool

    def as_dict(self, *, with_html: bool) -> dict[str, Any]:
        data: dict[str, Any] = {
            "integration": self.integration,
            "event_id": self.event_id,
            "headers": dict(self.headers),
            "envelope": {"from": self.envelope_from, "to": self.envelope_to},
            "subject": self.subject,
            "is_update": self.is_update,
            "text": self.text,
        }
        if with_html:
            data["html"] = self.html
        return data

    def as_text(self, *, with_html: bool) -> str:
        lines = [f"{name}: {value}" for name, value in self.headers]
        lines.append(f"(envelope: from {self.envelope_from} to {', '.join(self.envelope_to)})")
        out = "\n".join(lines) + "\n\n" + self.text
        if not out.endswith("\n"):
            out += "\n"
        if with_html:
            out += "\n----- HTML part -----\n" + self.html
            if not out.endswith("\n"):
                out += "\n"
        return out


def email_integrations(settings: Settings) -> list[EmailIntegration]:
    return [i for i in settings.integrations if isinstance(i, EmailIntegration)]


def email_config(settings: Settings, name: str | None) -> tuple[EmailIntegration, str | None]:
    """The email integration to preview, and a note when it is the built-in placeholder."""
    emails = email_integrations(settings)
    if name is not None:
        found = settings.integration(name)
        if found is None:
            raise PreviewError(f"no integration named {name!r} is configured")
        if not isinstance(found, EmailIntegration):
            raise PreviewError(f"integration {name!r} is not an email integration")
        return found, None
    if len(emails) == 1:
        return emails[0], None
    if emails:
        names = ", ".join(e.name for e in emails)
        raise PreviewError(f"several email integrations ({names}): choose one with --integration")
    return PLACEHOLDER, (
        "no email integration is configured: previewing the built-in templates with a placeholder sender"
    )


def load_sample(failing: bool = False) -> bytes:
    """The sample event (``shared/sample.json``), or its failing variant, as a body."""
    passed, failed = sample_events()
    return msgspec.json.encode(failed if failing else passed)


async def load_stored(store: Store, event_id: str) -> tuple[bytes, EarlierRelease | None]:
    """A stored event's body, and the release it replaces (a re-release) if any."""
    body = await store.redis.get(store.keys.event(event_id))
    if body is None:
        raise PreviewError(f"no event {event_id} (unknown, or its body has expired)")
    try:
        event = decoder.decode(body)
    except msgspec.DecodeError as exc:
        raise PreviewError(f"event {event_id}: stored body cannot be decoded: {exc}") from None
    return body, await find_earlier_release(store, event)


def build_preview(config: EmailIntegration, body: bytes, earlier: EarlierRelease | None = None) -> Preview:
    """The message ``config`` would send for ``body``; raises :class:`PreviewError`."""
    try:
        event = decoder.decode(body)
    except msgspec.ValidationError as exc:
        detail, path = error_path(exc)
        raise PreviewError(f"the body does not fit the payload model at {path}: {detail}") from None
    except msgspec.DecodeError as exc:
        raise PreviewError(f"the body is not JSON: {exc}") from None
    event_id = event_id_of(event)
    try:
        message, sender, recipients = EmailDelivery(config).build_message(Delivery(event_id, body, event, 1))
        subject, text, html = render_templates(config, event, event_id, earlier)
    except (DeliveryError, TemplateProblem) as exc:
        raise PreviewError(f"integration {config.name}: this message would not be sent: {exc}") from None
    headers = [
        (name, subject if name == "Subject" else str(value))
        for name, value in message.items()
        if name not in ("Content-Type", "MIME-Version", "Content-Transfer-Encoding")
    ]
    return Preview(
        integration=config.name,
        event_id=event_id,
        headers=headers,
        envelope_from=sender,
        envelope_to=recipients,
        subject=subject,
        text=text,
        html=html,
        is_update=earlier is not None,
    )
