"""``email``: send the learner a confirmation of their released result over SMTP.

Subject, text and HTML bodies are Jinja2 templates (built-in defaults in
``worker/integrations/email/templates/``; operators may supply their own, and separate
ones for failed results). Each worker process keeps a pool of up to ``pool_size`` SMTP
connections open and reuses them while the server allows it. See ``docs/email.md``.

Outcomes: ``"250"`` on success; :class:`PermanentError` for an invalid address,
an SMTP 5xx answer, a broken template or an unusable server (no STARTTLS, no AUTH);
:class:`TransientError` for connection errors, timeouts and SMTP 4xx answers;
:class:`UnknownOutcome` for a timeout or a lost connection after the message was handed over.

One module per concern: :mod:`.addresses` (checking addresses), :mod:`.templates`
(rendering the message), :mod:`.smtp` (the connection pool and the conversation).
"""

from worker.integrations.email.addresses import InvalidAddress, check_addresses, parse_address
from worker.integrations.email.smtp import EmailDelivery
from worker.integrations.email.templates import (
    TemplateProblem,
    check_templates,
    render_templates,
    sample_events,
    template_context,
)
from worker.integrations.releases import EarlierRelease, find_earlier_release

__all__ = [
    "EarlierRelease",
    "EmailDelivery",
    "InvalidAddress",
    "TemplateProblem",
    "check_addresses",
    "check_templates",
    "find_earlier_release",
    "parse_address",
    "render_templates",
    "sample_events",
    "template_context",
]
