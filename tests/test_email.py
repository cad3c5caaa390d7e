"""The ``email`` integration against a real SMTP server (aiosmtpd, in its own thread).

Nothing of ours is mocked: messages go over TCP to aiosmtpd, whose handler records
them and answers from a script (per-recipient RCPT replies, DATA replies, a delay).
"""

from __future__ import annotations

import asyncio
import shutil
import ssl
import subprocess
from collections.abc import AsyncIterator, Callable
from email.message import EmailMessage
from pathlib import Path
from typing import Any

import msgspec
import pytest
from aiosmtpd.smtp import AuthResult, LoginPassword

from shared.contract import Keys, event_id_of
from shared.payload import ExamResultsReleased, decoder
from shared.settings import EmailIntegration
from tests.conftest import eventually
from tests.smtp_sink import SmtpServer
from worker.integrations.base import Delivery, PermanentError, TransientError, UnknownOutcome
from worker.integrations.email import EmailDelivery, check_templates, render_templates

LEARNER = "learner7@example.org"
FROM = "results@acme.example.org"


# --------------------------------------------------------------------------- helpers


@pytest.fixture
def event(sample_body: bytes) -> ExamResultsReleased:
    return decoder.decode(sample_body)


def failing(event: ExamResultsReleased) -> ExamResultsReleased:
    grade = msgspec.structs.replace(event.attempt.grade, label="Fail", is_pass=False, min_score=0)
    return msgspec.structs.replace(
        event, attempt=msgspec.structs.replace(event.attempt, grade=grade, score=30.0, score_frac=0.3)
    )


def with_user(event: ExamResultsReleased, **changes: Any) -> ExamResultsReleased:
    return msgspec.structs.replace(event, user=msgspec.structs.replace(event.user, **changes))


def config(port: int, **overrides: Any) -> EmailIntegration:
    raw: dict[str, Any] = {
        "type": "email",
        "name": "mail",
        "smtp_host": "127.0.0.1",
        "smtp_port": port,
        "tls": "none",
        "from": f"Acme Results <{FROM}>",
        "timeout_seconds": 5,
        **overrides,
    }
    raw.pop("type")
    return msgspec.convert(raw, EmailIntegration)


def delivery(event: ExamResultsReleased) -> Delivery:
    return Delivery(event_id_of(event), msgspec.json.encode(event), event, attempt=1)


@pytest.fixture
async def make_email() -> AsyncIterator[Callable[[EmailIntegration], EmailDelivery]]:
    """EmailDelivery instances, closed at the end of the test."""
    made: list[EmailDelivery] = []

    def make(cfg: EmailIntegration) -> EmailDelivery:
        integration = EmailDelivery(cfg)
        made.append(integration)
        return integration

    yield make
    # Closing is asynchronous (a TLS connection first exchanges close_notify with the server;
    # one that failed mid-handshake is closed by a call_soon): wait until every socket is
    # really closed before pytest-asyncio closes the loop, or it is reported unclosed (a
    # ResourceWarning, an error here) in whichever later test runs the garbage collector.
    sockets = [sock for integration in made for sock in _client_sockets(integration)]
    for integration in made:
        await integration.close()
    for _ in range(3):  # the call_soon of a failed handshake
        await asyncio.sleep(0)

    async def all_closed() -> bool:
        return all(sock.fileno() == -1 for sock in sockets)

    await eventually(all_closed, timeout=10, interval=0.005)


def _client_sockets(integration: EmailDelivery) -> list[Any]:
    """The sockets of every SMTP connection the integration holds (idle or in use)."""
    sockets = []
    for client in [*integration._idle, *integration._in_use]:
        transport = client.transport
        sock = transport.get_extra_info("socket") if transport is not None else None
        if sock is not None:
            sockets.append(sock)
    return sockets


def body(message: EmailMessage, subtype: str) -> str:
    """The text of one part, line endings as Python writes them."""
    part = message.get_body((subtype,))
    assert part is not None
    content = part.get_content()
    assert isinstance(content, str)
    return content.replace("\r\n", "\n")


# --------------------------------------------------------------------------- sending


async def test_sends_confirmation_with_headers_and_both_parts(
    smtp: SmtpServer, make_email: Callable[..., EmailDelivery], event: ExamResultsReleased
) -> None:
    """A successful send returns "250"; the learner gets one multipart/alternative message
    with the right To (with name), From, Reply-To, Subject, Message-ID from the event id,
    X-Examhook-Event-Id, and text and HTML parts carrying the result."""
    mail = make_email(config(smtp.port, reply_to="help@acme.example.org"))
    status = await mail.deliver(delivery(event))
    assert status == "250"
    [received] = await smtp.handler.wait_for(1)
    assert received.mail_from == FROM
    assert received.rcpt_tos == [LEARNER]
    message = received.message
    evt = event_id_of(event)
    assert message["To"] == f"Ada Lovelace <{LEARNER}>"
    assert message["From"] == f"Acme Results <{FROM}>"
    assert message["Reply-To"] == "help@acme.example.org"
    assert message["Subject"] == "Congratulations, you passed Maths Final 2026: Pass"
    assert message["Message-ID"] == f"<{evt}@acme.example.org>"
    assert message["X-Examhook-Event-Id"] == evt
    assert message["Bcc"] is None
    assert message.get_content_type() == "multipart/alternative"
    text = message.get_body(("plain",))
    html = message.get_body(("html",))
    assert text is not None and html is not None
    text_content, html_content = text.get_content(), html.get_content()
    for content in (text_content, html_content):
        assert "Ada Lovelace" in content
        assert "Maths Final 2026" in content
        assert "62.5%" in content
        assert "25 out of 40" in content
        assert "23 November 2026 at 09:53 UTC" in content
    assert "<strong>Pass</strong>" in html_content


async def test_bcc_receives_a_copy_but_is_not_in_headers(
    smtp: SmtpServer, make_email: Callable[..., EmailDelivery], event: ExamResultsReleased
) -> None:
    """Every bcc address is an envelope recipient of the same message, and no header names it."""
    mail = make_email(config(smtp.port, bcc=["records@acme.example.org", "audit@acme.example.org"]))
    await mail.deliver(delivery(event))
    [received] = await smtp.handler.wait_for(1)
    assert received.rcpt_tos == [LEARNER, "records@acme.example.org", "audit@acme.example.org"]
    assert b"records@acme.example.org" not in received.content
    assert b"audit@acme.example.org" not in received.content


async def test_html_body_escapes_learner_name_but_text_does_not(
    smtp: SmtpServer, make_email: Callable[..., EmailDelivery], event: ExamResultsReleased
) -> None:
    """Values in the HTML part are HTML-escaped (a name like <script> cannot inject markup);
    the plain-text part shows them as they are; a line break in the name cannot add a header."""
    hostile = with_user(event, name="<script>alert(1)</script> & Co\r\nBcc: x@evil.example")
    await make_email(config(smtp.port)).deliver(delivery(hostile))
    [received] = await smtp.handler.wait_for(1)
    html = received.message.get_body(("html",))
    text = received.message.get_body(("plain",))
    assert html is not None and text is not None
    assert "<script>" not in html.get_content()
    assert "&lt;script&gt;alert(1)&lt;/script&gt; &amp; Co" in html.get_content()
    assert "<script>alert(1)</script> & Co" in text.get_content()
    # the name cannot add a header either
    assert received.rcpt_tos == [LEARNER] and received.message["Bcc"] is None


async def test_custom_templates_and_fail_templates_chosen_by_is_pass(
    smtp: SmtpServer, make_email: Callable[..., EmailDelivery], event: ExamResultsReleased, tmp_path: Path
) -> None:
    """Operator templates replace the defaults; a failed result (isPass false) uses the
    fail_* templates, falling back to the normal operator template, then to the built-in."""
    (tmp_path / "subject.txt").write_text("{{ learner_name }}: {{ grade_label }} in {{ exam_name }}\n")
    (tmp_path / "text.txt").write_text("PASS TEXT {{ score_percent }}% {{ event.test.title }}\n")
    (tmp_path / "fail_subject.txt").write_text("Sorry {{ learner_name }}, {{ grade_label }}\n")
    cfg = config(
        smtp.port,
        subject_template=str(tmp_path / "subject.txt"),
        text_template=str(tmp_path / "text.txt"),
        fail_subject_template=str(tmp_path / "fail_subject.txt"),
    )
    mail = make_email(cfg)
    await mail.deliver(delivery(event))
    await mail.deliver(delivery(failing(event)))
    passed, failed = (m.message for m in await smtp.handler.wait_for(2))

    assert passed["Subject"] == "Ada Lovelace: Pass in Maths Final 2026"
    assert body(passed, "plain") == "PASS TEXT 62.5% Maths Final 2026\n"
    assert failed["Subject"] == "Sorry Ada Lovelace, Fail"
    # no fail_text_template: the operator's normal text template
    assert body(failed, "plain") == "PASS TEXT 30% Maths Final 2026\n"
    # no html template at all: the built-in one, with its fail wording
    assert "did not reach the pass mark" in body(failed, "html")


def test_render_templates_defaults_word_pass_and_fail(event: ExamResultsReleased) -> None:
    """The built-in templates give a friendly subject for both outcomes and the readable release date."""
    cfg = config(25)
    subject, text, html = render_templates(cfg, event)
    assert subject == "Congratulations, you passed Maths Final 2026: Pass"
    assert "pass mark: 50%" in text and "Level 3 Diploma" in text
    subject, text, html = render_templates(cfg, failing(event))
    assert subject == "Your result for Maths Final 2026: Fail"
    assert "did not reach the pass mark" in text and "Score:    30%" in text
    assert "23 November 2026 at 09:53 UTC" in html


# --------------------------------------------------------------------------- errors


@pytest.mark.parametrize(
    "address", ["not-an-address", "ada@localhost", "ada@@example.org", "a b@example.org"]
)
async def test_invalid_learner_address_is_permanent(
    smtp: SmtpServer,
    make_email: Callable[..., EmailDelivery],
    event: ExamResultsReleased,
    address: str,
) -> None:
    """A user.email that is not a valid address fails permanently, without contacting the server."""
    mail = make_email(config(smtp.port))
    with pytest.raises(PermanentError, match="not a valid email address"):
        await mail.deliver(delivery(with_user(event, email=address)))
    assert mail.connections_opened == 0


async def test_invalid_configured_address_is_permanent(
    smtp: SmtpServer, make_email: Callable[..., EmailDelivery], event: ExamResultsReleased
) -> None:
    """A bad bcc (or from/reply_to) address in the configuration fails permanently and names the key."""
    mail = make_email(config(smtp.port, bcc=["records.acme.example.org"]))
    with pytest.raises(PermanentError, match=r"bcc\[0\]"):
        await mail.deliver(delivery(event))


async def test_smtp_4xx_is_transient_and_connection_stays_usable(
    smtp: SmtpServer, make_email: Callable[..., EmailDelivery], event: ExamResultsReleased
) -> None:
    """An SMTP 4xx answer (451 at DATA) is a TransientError with the code as status; the
    next send goes through on the same connection."""
    smtp.handler.data_replies.append("451 4.3.0 Try again later")
    mail = make_email(config(smtp.port))
    with pytest.raises(TransientError, match="451") as caught:
        await mail.deliver(delivery(event))
    assert caught.value.status == "451"
    assert await mail.deliver(delivery(event)) == "250"
    await smtp.handler.wait_for(1)
    assert len(smtp.handler.sessions) == 1


async def test_smtp_5xx_is_permanent_and_nobody_gets_a_copy(
    smtp: SmtpServer, make_email: Callable[..., EmailDelivery], event: ExamResultsReleased
) -> None:
    """The learner's address refused with 550 is a PermanentError (status "550"), and the
    message is not sent to the bcc recipients either."""
    smtp.handler.rcpt_replies[LEARNER] = f"550 5.1.1 <{LEARNER}>: No such user"
    mail = make_email(config(smtp.port, bcc=["records@acme.example.org"]))
    with pytest.raises(PermanentError, match="550") as caught:
        await mail.deliver(delivery(event))
    assert caught.value.status == "550"
    assert "l***@example.org" in caught.value.message and LEARNER not in caught.value.message
    # the session is still good, and nothing was transmitted
    smtp.handler.rcpt_replies.clear()
    await mail.deliver(delivery(event))
    [received] = await smtp.handler.wait_for(1)
    assert received.rcpt_tos == [LEARNER, "records@acme.example.org"]


async def test_smtp_5xx_at_data_is_permanent(
    smtp: SmtpServer, make_email: Callable[..., EmailDelivery], event: ExamResultsReleased
) -> None:
    """A 554 answer to DATA (message rejected) is a PermanentError."""
    smtp.handler.data_replies.append("554 5.7.1 Message rejected")
    with pytest.raises(PermanentError, match="554"):
        await make_email(config(smtp.port)).deliver(delivery(event))


async def test_server_down_is_transient(
    make_email: Callable[..., EmailDelivery],
    event: ExamResultsReleased,
    unused_tcp_port_factory: Callable[[], int],
) -> None:
    """Nothing listening on the port: a TransientError saying it cannot connect."""
    mail = make_email(config(unused_tcp_port_factory()))
    with pytest.raises(TransientError, match="cannot connect"):
        await mail.deliver(delivery(event))


async def test_slow_answer_before_the_message_is_handed_over_is_transient(
    smtp: SmtpServer, make_email: Callable[..., EmailDelivery], event: ExamResultsReleased
) -> None:
    """A server slower than timeout_seconds before the message went out (at RCPT) gives a
    TransientError (nothing was sent: safe to send again), and the half-used connection is
    dropped (the next send opens a new one)."""
    smtp.handler.rcpt_delay = 1.0
    mail = make_email(config(smtp.port, timeout_seconds=0.3))
    with pytest.raises(TransientError, match=r"timed out|SMTP error") as caught:
        await mail.deliver(delivery(event))
    assert not isinstance(caught.value, UnknownOutcome)
    smtp.handler.rcpt_delay = 0.0
    assert await mail.deliver(delivery(event)) == "250"
    assert mail.connections_opened == 2
    assert len(smtp.handler.accepted) == 1


async def test_slow_answer_after_the_message_was_handed_over_is_an_unknown_outcome(
    smtp: SmtpServer, make_email: Callable[..., EmailDelivery], event: ExamResultsReleased
) -> None:
    """No answer to DATA within timeout_seconds, after the content went out: the server may
    have the message (it does here), so the outcome is unknown (UnknownOutcome), never a plain
    retry; the connection is dropped."""
    smtp.handler.data_delay = 1.0
    mail = make_email(config(smtp.port, timeout_seconds=0.3))
    with pytest.raises(UnknownOutcome, match="server may have it"):
        await mail.deliver(delivery(event))
    await smtp.handler.wait_for(1, within=5)
    smtp.handler.data_delay = 0.0
    assert await mail.deliver(delivery(event)) == "250"
    assert mail.connections_opened == 2


# --------------------------------------------------------------------------- connection


async def test_consecutive_sends_share_one_connection(
    smtp: SmtpServer, make_email: Callable[..., EmailDelivery], event: ExamResultsReleased
) -> None:
    """Consecutive sends in one worker share one SMTP session."""
    mail = make_email(config(smtp.port))
    for _ in range(3):
        await mail.deliver(delivery(event))
    await mail.deliver(delivery(failing(event)))
    await smtp.handler.wait_for(4)
    assert len(smtp.handler.sessions) == 1
    assert mail.connections_opened == 1


async def test_concurrent_sends_use_a_pool_of_pool_size_connections(
    smtp: SmtpServer, make_email: Callable[..., EmailDelivery], event: ExamResultsReleased
) -> None:
    """Concurrent sends go out over up to pool_size connections at once (kept and reused),
    never more, and each timeout covers its own conversation, not the wait for a connection:
    12 sends at 0.3 s each through 3 connections take ~1.2 s, longer than the 1 s timeout,
    and none times out."""
    smtp.handler.data_delay = 0.3
    mail = make_email(config(smtp.port, pool_size=3, timeout_seconds=1))
    statuses = await asyncio.gather(*(mail.deliver(delivery(event)) for _ in range(12)))
    assert statuses == ["250"] * 12
    assert mail.connections_opened == 3
    assert len(smtp.handler.sessions) == 3


async def test_reconnects_after_server_closed_connection(
    smtp: SmtpServer, make_email: Callable[..., EmailDelivery], event: ExamResultsReleased
) -> None:
    """When the server has closed the kept connection, the next send reconnects and succeeds."""
    mail = make_email(config(smtp.port))
    await mail.deliver(delivery(event))
    await smtp.handler.wait_for(1)
    await asyncio.to_thread(smtp.restart)
    assert await mail.deliver(delivery(event)) == "250"
    await smtp.handler.wait_for(2)
    assert len(smtp.handler.sessions) == 2
    assert mail.connections_opened == 2


async def test_421_on_kept_connection_reconnects_and_sends(
    smtp: SmtpServer, make_email: Callable[..., EmailDelivery], event: ExamResultsReleased
) -> None:
    """A kept connection answered with 421 (server closing) before anything was accepted is
    replaced by a new one within the same attempt; on a fresh connection 421 is a TransientError."""
    mail = make_email(config(smtp.port))
    await mail.deliver(delivery(event))
    smtp.handler.mail_replies.append("421 4.3.2 Service shutting down")
    assert await mail.deliver(delivery(event)) == "250"
    assert mail.connections_opened == 2
    assert len(await smtp.handler.wait_for(2)) == 2
    assert len(smtp.handler.sessions) == 2

    fresh = make_email(config(smtp.port))
    smtp.handler.mail_replies.append("421 4.3.2 Service shutting down")
    with pytest.raises(TransientError, match="421"):
        await fresh.deliver(delivery(event))


async def test_login(
    start_smtp: Callable[..., SmtpServer],
    make_email: Callable[..., EmailDelivery],
    event: ExamResultsReleased,
) -> None:
    """With username/password the client authenticates before sending; a wrong password
    (535) is a PermanentError."""

    def authenticator(server: Any, session: Any, envelope: Any, mechanism: str, data: Any) -> AuthResult:
        ok = isinstance(data, LoginPassword) and (data.login, data.password) == (b"examhook", b"pa55")
        return AuthResult(success=ok, handled=False, auth_data=data.login if ok else None)

    server = start_smtp(authenticator=authenticator, auth_require_tls=False)
    mail = make_email(config(server.port, username="examhook", password="pa55"))
    assert await mail.deliver(delivery(event)) == "250"
    [received] = await server.handler.wait_for(1)
    assert received.login == b"examhook"

    wrong = make_email(config(server.port, username="examhook", password="nope"))
    with pytest.raises(PermanentError, match="535"):
        await wrong.deliver(delivery(event))


# --------------------------------------------------------------------------- TLS


@pytest.fixture
def certificate(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> tuple[Path, Path]:
    """A self-signed certificate for 127.0.0.1, trusted by the client through SSL_CERT_FILE."""
    openssl = shutil.which("openssl")
    if openssl is None:
        pytest.skip("needs the openssl command to make a test certificate (cryptography is not installed)")
    cert, key = tmp_path / "cert.pem", tmp_path / "key.pem"
    subprocess.run(
        [openssl, "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "1",
         "-keyout", str(key), "-out", str(cert), "-subj", "/CN=127.0.0.1",
         "-addext", "subjectAltName=IP:127.0.0.1"],
        check=True,
        capture_output=True,
    )  # fmt: skip
    monkeypatch.setenv("SSL_CERT_FILE", str(cert))
    return cert, key


def server_tls(certificate: tuple[Path, Path]) -> ssl.SSLContext:
    context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    context.load_cert_chain(*certificate)
    return context


async def test_starttls(
    start_smtp: Callable[..., SmtpServer],
    make_email: Callable[..., EmailDelivery],
    event: ExamResultsReleased,
    certificate: tuple[Path, Path],
) -> None:
    """tls = "starttls" upgrades the connection (the server requires it) and verifies the certificate."""
    server = start_smtp(tls_context=server_tls(certificate), require_starttls=True)
    assert await make_email(config(server.port, tls="starttls")).deliver(delivery(event)) == "250"
    [received] = await server.handler.wait_for(1)
    assert received.tls


async def test_untrusted_certificate_is_transient_and_nothing_sent(
    start_smtp: Callable[..., SmtpServer],
    make_email: Callable[..., EmailDelivery],
    event: ExamResultsReleased,
    certificate: tuple[Path, Path],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """A server certificate the client does not trust fails the attempt (transient, like
    any connection failure) before any message data is sent."""
    server = start_smtp(tls_context=server_tls(certificate), require_starttls=True)
    monkeypatch.delenv("SSL_CERT_FILE")
    with pytest.raises(TransientError, match="cannot connect") as caught:
        await make_email(config(server.port, tls="starttls")).deliver(delivery(event))
    assert "certificate" in caught.value.message.lower()
    assert server.handler.mails == []


async def test_starttls_not_offered_is_permanent(
    smtp: SmtpServer, make_email: Callable[..., EmailDelivery], event: ExamResultsReleased
) -> None:
    """tls = "starttls" against a server that does not offer STARTTLS never sends in clear text."""
    with pytest.raises(PermanentError, match="STARTTLS"):
        await make_email(config(smtp.port, tls="starttls")).deliver(delivery(event))
    assert smtp.handler.mails == []


async def test_implicit_tls(
    start_smtp: Callable[..., SmtpServer],
    make_email: Callable[..., EmailDelivery],
    event: ExamResultsReleased,
    certificate: tuple[Path, Path],
) -> None:
    """tls = "implicit" speaks TLS from the first byte (SMTPS)."""
    server = start_smtp(ssl_context=server_tls(certificate))
    assert await make_email(config(server.port, tls="implicit")).deliver(delivery(event)) == "250"
    [received] = await server.handler.wait_for(1)
    assert received.tls


# --------------------------------------------------------------------------- check_templates


def test_check_templates_reports_file_and_line(tmp_path: Path) -> None:
    """check_templates names the file and line of a syntax error and of an undefined
    variable, including in fail-only templates, and is quiet for the defaults."""
    assert check_templates(config(25)) == []
    syntax = tmp_path / "subject.txt"
    syntax.write_text("Result\n{{ grade_label }\n")
    typo = tmp_path / "fail_text.txt"
    typo.write_text("Hello {{ learner_name }},\n\nYour grade: {{ grade_lable }}\n")
    missing = tmp_path / "nope.html"
    problems = check_templates(
        config(
            25,
            subject_template=str(syntax),
            fail_text_template=str(typo),
            html_template=str(missing),
        )
    )
    assert len(problems) == 3, problems
    syntax_problem, missing_problem, typo_problem = problems
    assert f"{syntax}, line 2" in syntax_problem and "syntax error" in syntax_problem
    assert str(missing) in missing_problem and "not found" in missing_problem
    assert f"{typo}, line 3" in typo_problem and "grade_lable" in typo_problem


async def test_broken_template_at_send_time_is_permanent(
    smtp: SmtpServer, make_email: Callable[..., EmailDelivery], event: ExamResultsReleased, tmp_path: Path
) -> None:
    """A template that fails to render makes the delivery fail permanently, naming file
    and line, without contacting the SMTP server."""
    broken = tmp_path / "subject.txt"
    broken.write_text("{{ exam_name }}\n{{ event.attempt.no_such_field }}\n")
    mail = make_email(config(smtp.port, subject_template=str(broken)))
    with pytest.raises(PermanentError, match=rf"template error: .*{broken}, line 2"):
        await mail.deliver(delivery(event))
    assert mail.connections_opened == 0


# --------------------------------------------------------------------------- end to end


async def test_end_to_end_through_receiver_and_worker(
    smtp: SmtpServer,
    make_settings: Callable[..., Any],
    start_worker: Callable[..., Any],
    aiohttp_client: Callable[..., Any],
    sample_body: bytes,
    redis: Any,
    prefix: str,
) -> None:
    """A webhook POSTed to the receiver is emailed to the learner by a real worker, and
    the pair is recorded as delivered."""
    from aiohttp import encode_basic_auth

    from ingest.app import WEBHOOK_PATH, create_app

    settings = make_settings(
        integrations=[
            {
                "type": "email",
                "name": "mail",
                "smtp_host": "127.0.0.1",
                "smtp_port": smtp.port,
                "tls": "none",
                "from": FROM,
            }
        ]
    )
    client = await aiohttp_client(create_app(settings))
    response = await client.post(
        WEBHOOK_PATH,
        data=sample_body,
        headers={"Content-Type": "application/json", "Authorization": encode_basic_auth("synap", "s3cret")},
    )
    assert response.status < 300, await response.text()
    await start_worker(settings)
    [received] = await smtp.handler.wait_for(1)
    evt = event_id_of(decoder.decode(sample_body))
    assert received.rcpt_tos == [LEARNER]
    assert received.message["X-Examhook-Event-Id"] == evt

    async def delivered() -> bool:
        return bool(await redis.exists(Keys(prefix).delivered(evt, "mail")))

    assert await eventually(delivered)


MIME_CASES = [
    ("Your result", "Ada Lovelace", "Exams <exams@school.example>", "plain text\n", "<p>x</p>\n"),
    ("Résultat : réussi ✓", "Zoë Ångström-Łukasiewicz", "Examens <exams@école.example>", "é\n", "<p>é</p>"),
    ("x" * 200 + " " + "y" * 200, 'O\'Brien, "Jr." (the 2nd)', "exams@school.example", "a" * 300, "b"),
    (
        "=?utf-8?q?not-a-word?=",
        "Łukasz " * 20,
        "Exams Office <exams@school.example>",
        "t \n.\n=3D\n",
        "h\t\n",
    ),
]


@pytest.mark.parametrize(("subject", "name", "sender", "text", "html"), MIME_CASES)
def test_the_mime_bytes_read_back_as_the_email_packages_message(
    subject: str, name: str, sender: str, text: str, html: str
) -> None:
    """The message written out directly (mime.Draft.as_bytes, what is sent) reads back, with
    the email package's parser, as the same headers and parts as the ``EmailMessage`` of the
    same draft (what preview-email shows, and what is sent when SMTPUTF8 is needed)."""
    from email import message_from_bytes
    from email import policy as email_policy
    from email.headerregistry import Address

    from worker.integrations.email.addresses import checked_address
    from worker.integrations.email.mime import Draft, now_date

    to = Address(display_name=name, username="learner7", domain="example.org")
    from_ = checked_address(sender, "from", allow_display_name=True)
    reply = checked_address("Office <office@school.example>", "reply_to", allow_display_name=True)
    draft = Draft(subject, from_, to, reply, "evt_0123", text, html, now_date())
    written = draft.as_bytes()
    assert written is not None and written.isascii()
    assert max(len(line) for line in written.split(b"\n")) <= 998
    read = message_from_bytes(written, policy=email_policy.default)
    reference = draft.message()
    for header, _ in draft.fields():
        assert str(read[header]) == str(reference[header]), header
    assert read.get_content_type() == "multipart/alternative"
    for subtype, body in (("plain", text), ("html", html)):
        part = read.get_body((subtype,))
        assert part is not None
        assert part.get_content() == reference.get_body((subtype,)).get_content()  # type: ignore[union-attr]
        assert part.get_content().replace("\r\n", "\n") == body if body.endswith("\n") else True


def test_a_message_the_mime_writer_cannot_carry_falls_back_to_the_email_package() -> None:
    """An address that needs SMTPUTF8, or a name too long for one header line, makes
    ``as_bytes`` give way (None) to the email package, which can carry both; so does a line
    break in a header value, which the email package refuses."""
    from email.headerregistry import Address

    from worker.integrations.email.mime import Draft, now_date

    sender = Address(username="exams", domain="school.example")
    utf8 = Address(display_name="Zoë", username="zoë", domain="example.org")
    long_name = Address(display_name="A" * 2000, username="a", domain="example.org")
    for to in (utf8, long_name):
        draft = Draft("s", sender, to, None, "evt_1", "t", "h", now_date())
        assert draft.as_bytes() is None
        assert draft.message()["To"] is not None
    smuggled = Draft("s\nBcc: x@evil.example", sender, sender, None, "evt_1", "t", "h", now_date())
    assert smuggled.as_bytes() is None, "a line break in a header value is never written out as is"
