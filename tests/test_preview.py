"""``examhook preview-email`` (what the email integration would send, connecting to nothing),
email templates that say a re-release is an update, and times in the integration's
``timezone``."""

from __future__ import annotations

import json
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

import msgspec
from aiohttp.test_utils import TestClient
from redis.asyncio import Redis

from ingest.app import create_app
from shared.settings import Settings, settings_from_dict
from tests.conftest import clean_env, free_port, post_event
from tests.results_day import learner, write_config
from tests.test_cli import examhook
from worker.integrations.email import EarlierRelease, check_templates, render_templates, sample_events

ClientFactory = Callable[..., Awaitable[TestClient[Any, Any]]]


def mail(name: str = "learner-email", **extra: Any) -> dict[str, Any]:
    # an SMTP server nobody listens on: a preview must never need it
    return {
        "name": name,
        "type": "email",
        "smtp_host": "127.0.0.1",
        "smtp_port": free_port(),
        "tls": "none",
        "from": "Exams Office <results@acme.example.org>",
        "reply_to": "exams@acme.example.org",
        "bcc": ["records@acme.example.org"],
        **extra,
    }


def dead_redis_env() -> dict[str, str]:
    return clean_env(EXAMHOOK_REDIS_URL=f"redis://127.0.0.1:{free_port()}/0")


async def test_preview_of_the_sample_connects_to_nothing(tmp_path: Path) -> None:
    """Without an event, the sample: the headers the message would carry (From, To with the
    learner, Reply-To, Subject, Message-ID from the event id, X-Examhook-Event-Id,
    Auto-Submitted), the envelope (bcc only there) and the text part; times in the
    integration's timezone; `--html` adds the HTML part. Neither SMTP nor Redis is reachable."""
    config = write_config(tmp_path / "examhook.toml", [mail(timezone="America/New_York")])
    run = await examhook("preview-email", "--config", str(config), env=dead_redis_env(), cwd=tmp_path)
    assert run.code == 0, run
    head, _, text = run.out.partition("\n\n")
    headers = dict(line.split(": ", 1) for line in head.splitlines() if not line.startswith("("))
    assert headers["From"] == "Exams Office <results@acme.example.org>"
    assert headers["To"] == "Ada Lovelace <learner7@example.org>"
    assert headers["Reply-To"] == "exams@acme.example.org"
    assert headers["Subject"] == "Congratulations, you passed Maths Final 2026: Pass"
    assert headers["Message-ID"] == f"<{headers['X-Examhook-Event-Id']}@acme.example.org>"
    assert headers["Auto-Submitted"] == "auto-generated"
    assert "Bcc" not in headers
    assert "to learner7@example.org, records@acme.example.org)" in head
    assert text.startswith("Hello Ada Lovelace,")
    assert "Released: 23 November 2026 at 04:53 EST" in text
    assert "<html" not in run.out

    with_html = await examhook(
        "preview-email", "--html", "--config", str(config), env=dead_redis_env(), cwd=tmp_path
    )
    assert "----- HTML part -----" in with_html.out and "<html lang=" in with_html.out
    failing = await examhook(
        "preview-email", "--fail", "--json", "--config", str(config), env=dead_redis_env(), cwd=tmp_path
    )
    data = failing.json()
    assert data["subject"] == "Your result for Maths Final 2026: Fail"
    assert data["envelope"]["to"] == ["learner7@example.org", "records@acme.example.org"]
    assert "did not reach the pass mark" in data["text"] and "<html" in data["html"]


async def test_preview_of_a_body_file_and_of_bad_input(tmp_path: Path, sample_body: bytes) -> None:
    """`--file` previews that body (its learner, its result); a body that does not fit the
    payload model, an unreadable file, an integration that is not email, or several email
    integrations without `--integration` are one clear error line each."""
    config = write_config(
        tmp_path / "examhook.toml",
        [mail(), mail("tutors"), {"name": "lms", "type": "http", "url": "http://127.0.0.1:9/"}],
    )
    body = tmp_path / "body.json"
    body.write_bytes(learner(sample_body, 4, passed=False))
    env = dead_redis_env()
    args = ["--config", str(config)]
    run = await examhook(
        "preview-email", "--integration", "tutors", "--file", str(body), *args, env=env, cwd=tmp_path
    )
    assert run.code == 0, run
    assert "To: Learner Number4 <learner4@example.org>" in run.out
    assert "Subject: Your result for Maths Final 2026: Fail" in run.out

    broken = json.loads(sample_body)
    broken["attempt"]["score"] = "high"
    body.write_text(json.dumps(broken))
    bad = await examhook(
        "preview-email", "--integration", "tutors", "--file", str(body), *args, env=env, cwd=tmp_path
    )
    assert bad.code == 1 and bad.out == "" and "$.attempt.score" in bad.err, bad
    several = await examhook("preview-email", *args, env=env, cwd=tmp_path)
    assert several.code == 2 and "several email integrations (learner-email, tutors)" in several.err
    not_email = await examhook("preview-email", "--integration", "lms", *args, env=env, cwd=tmp_path)
    assert not_email.code == 2 and "not an email integration" in not_email.err
    missing = await examhook(
        "preview-email",
        "--integration",
        "tutors",
        "--file",
        str(tmp_path / "nope.json"),
        *args,
        env=env,
        cwd=tmp_path,
    )
    assert missing.code == 2 and "cannot read" in missing.err


async def test_preview_without_an_email_integration_uses_the_built_in_templates(tmp_path: Path) -> None:
    """With no email integration configured, the preview shows the built-in templates and says
    so on stderr."""
    config = write_config(
        tmp_path / "examhook.toml", [{"name": "lms", "type": "http", "url": "http://x.org/"}]
    )
    run = await examhook("preview-email", "--config", str(config), env=dead_redis_env(), cwd=tmp_path)
    assert run.code == 0, run
    assert "no email integration is configured" in run.err
    assert "Subject: Congratulations, you passed Maths Final 2026: Pass" in run.out


async def test_preview_of_a_stored_re_release_reads_as_an_update(
    aiohttp_client: ClientFactory,
    make_settings: Callable[..., Settings],
    redis: Redis,
    sample_body: bytes,
    tmp_path: Path,
    env: dict[str, str],
) -> None:
    """`--event ID` previews a stored event; a re-release of an attempt reads as an update
    ("Your updated result ...") naming the earlier release's time and grade; the first
    release reads as a first release; an unknown event is one error line, exit 1."""
    settings = make_settings([mail()])
    client = await aiohttp_client(create_app(settings))
    first = await post_event(client, learner(sample_body, 1, released_at="2026-11-23T09:00:00Z"))
    second = await post_event(
        client, learner(sample_body, 1, released_at="2026-11-24T14:00:00Z", passed=False)
    )
    config = write_config(tmp_path / "examhook.toml", [mail(timezone="Europe/London")])
    args = ["--config", str(config)]

    update = await examhook("preview-email", "--event", second, "--json", *args, env=env, cwd=tmp_path)
    assert update.code == 0, update
    data = update.json()
    assert data["is_update"] is True
    assert data["subject"] == "Your updated result for Maths Final 2026: Fail"
    assert "It replaces the result released on\n23 November 2026 at 09:00 GMT (Pass, 62.5%)." in data["text"]
    original = await examhook("preview-email", "--event", first, "--json", *args, env=env, cwd=tmp_path)
    assert original.json()["is_update"] is False
    assert original.json()["subject"].startswith("Congratulations")
    unknown = await examhook("preview-email", "--event", "evt_nothing", *args, env=env, cwd=tmp_path)
    assert unknown.code == 1 and "no event evt_nothing" in unknown.err


def email_settings(**extra: Any) -> Any:
    table = {"name": "m", "type": "email", "smtp_host": "x", "from": "a@example.org", **extra}
    return settings_from_dict({"integrations": [table]}).integrations[0]


def test_times_follow_the_timezone_and_its_daylight_saving() -> None:
    """`timezone` (an IANA name) sets the zone of every time in a message: the built-in
    `released_at` and the `datetime` filter, with the zone's own abbreviation (BST in
    summer, GMT in winter); the default is UTC."""
    passed, _ = sample_events()
    audit = msgspec.structs.replace(passed.attempt.audit, released_at="2026-07-01T08:30:00Z")
    event = msgspec.structs.replace(passed, attempt=msgspec.structs.replace(passed.attempt, audit=audit))
    _, text, _ = render_templates(email_settings(timezone="Europe/London"), event)
    assert "Released: 1 July 2026 at 09:30 BST" in text
    _, text, _ = render_templates(email_settings(), event)
    assert "Released: 1 July 2026 at 08:30 UTC" in text
    _, text, _ = render_templates(email_settings(timezone="Asia/Kolkata"), passed)
    assert "Released: 23 November 2026 at 15:23 IST" in text


def test_unknown_timezone_is_a_configuration_error(tmp_path: Path) -> None:
    """An unknown `timezone` is refused at load, naming the key."""
    from shared.settings import ConfigError

    try:
        email_settings(timezone="Europe/Atlantis")
    except ConfigError as exc:
        assert "timezone" in str(exc) and "Europe/Atlantis" in str(exc)
    else:
        raise AssertionError("accepted an unknown time zone")


def test_re_release_templates_and_custom_templates_can_use_it(tmp_path: Path) -> None:
    """Templates get `is_update` and `previous` (the earlier release's time, and its grade and
    score while examhook holds its body): the built-ins word an update as one, with or
    without the earlier result; an operator's template can use the same names, and
    check-config renders every template as a re-release too (an undefined name fails there)."""
    passed, failed = sample_events()
    config = email_settings()
    subject, text, html = render_templates(
        config, passed, None, EarlierRelease("2026-11-20T12:00:00Z", failed)
    )
    assert subject == "Your updated result for Maths Final 2026: Pass"
    assert "released on\n20 November 2026 at 12:00 UTC (Fail, 30%)." in text
    assert "<strong>updated</strong>" in html and "(Fail, 30%)" in html
    _, text, _ = render_templates(config, passed, None, EarlierRelease("2026-11-20T12:00:00Z"))
    assert "released on\n20 November 2026 at 12:00 UTC.\n" in text, "earlier body gone: no grade"
    subject, _, _ = render_templates(config, passed)
    assert subject.startswith("Congratulations")

    custom = tmp_path / "subject.txt"
    custom.write_text(
        "{% if is_update %}Updated: was {{ previous.grade_label }}{% else %}{{ grade_label }}{% endif %}"
    )
    mine = email_settings(subject_template=str(custom))
    assert (
        render_templates(mine, passed, None, EarlierRelease("2026-11-20T12:00:00Z", failed))[0]
        == "Updated: was Fail"
    )
    assert check_templates(mine) == []
    custom.write_text("{{ previous.grade_lable }}")
    problems = check_templates(email_settings(subject_template=str(custom)))
    assert problems and "grade_lable" in problems[0]


async def test_a_re_release_is_emailed_as_an_update(
    aiohttp_client: ClientFactory,
    make_settings: Callable[..., Settings],
    start_worker: Callable[..., Awaitable[Any]],
    smtp: Any,
    sample_body: bytes,
) -> None:
    """End to end through a real worker and SMTP server: the first release of an attempt is
    emailed as a result, its re-release (a re-mark) as "Your updated result ..." naming the
    earlier release's time and grade, in the integration's timezone; the preview of that
    stored event is the same text the learner got."""
    from tests.conftest import email_integration, eventually

    settings = make_settings([email_integration(smtp, "learner-email", timezone="Europe/Paris")])
    client = await aiohttp_client(create_app(settings))
    await start_worker(settings)
    await post_event(client, learner(sample_body, 1, released_at="2026-11-23T09:00:00Z"))

    async def mails(count: int) -> bool:
        return len(smtp.handler.mails) >= count

    await eventually(lambda: mails(1))
    second = await post_event(
        client, learner(sample_body, 1, released_at="2026-11-24T14:00:00Z", passed=False)
    )
    await eventually(lambda: mails(2))
    first_mail, update = (m.message for m in smtp.handler.mails)
    assert first_mail["Subject"] == "Congratulations, you passed Maths Final 2026: Pass"
    assert update["Subject"] == "Your updated result for Maths Final 2026: Fail"
    text = update.get_body(("plain",)).get_content().replace("\r\n", "\n")
    assert "It replaces the result released on\n23 November 2026 at 10:00 CET (Pass, 62.5%)." in text
    assert update["X-Examhook-Event-Id"] == second
