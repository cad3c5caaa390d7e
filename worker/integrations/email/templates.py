"""Email templates: the Jinja2 subject, text and HTML parts, their context (the result, the
release, an earlier release it replaces) and the filters they may use; rendered without
connecting to anything (``examhook preview-email`` shows exactly this)."""

from __future__ import annotations

import logging
import traceback
from datetime import UTC, datetime, tzinfo
from importlib.resources import files
from pathlib import Path
from typing import Any
from zoneinfo import ZoneInfo, ZoneInfoNotFoundError

import jinja2
import msgspec

from shared.contract import event_id_of
from shared.payload import ExamResultsReleased, decoder, parse_time
from shared.settings import EmailIntegration
from worker.integrations.releases import EarlierRelease

log = logging.getLogger("examhook.worker.email")

DEFAULT_TEMPLATE_DIR = Path(__file__).resolve().parent / "templates"
DEFAULT_TEMPLATES = {"subject": "email_subject.txt", "text": "email_text.txt", "html": "email_html.html"}
PARTS = ("subject", "text", "html")


class TemplateProblem(Exception):
    """A template could not be loaded or rendered; the message names file and line."""


def _number(value: float) -> int | float:
    """``25.0`` -> ``25``, ``62.456`` -> ``62.46``: numbers that print cleanly."""
    rounded = round(float(value), 2)
    return int(rounded) if rounded.is_integer() else rounded


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
        "event_id": event_id or event_id_of(event),
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
