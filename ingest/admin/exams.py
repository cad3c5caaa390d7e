"""Results-day admin pages: the Exams report (every recent exam with its counts, each
exam's learners with failed and pending first, a CSV download) and the email preview.

The same data as ``examhook report`` and ``examhook preview-email`` (``shared/report.py``,
``shared/preview.py``). Learner data is shown to whoever holds the admin token; it is
never logged.
"""

from __future__ import annotations

import functools
import re
from collections.abc import Callable
from urllib.parse import quote

from aiohttp import web

from ingest.admin.views import SECURITY_HEADERS, Handler, _text, protected, render
from ingest.appkeys import SETTINGS, STORE
from shared.preview import (
    PreviewError,
    build_preview,
    email_config,
    email_integrations,
    load_sample,
    load_stored,
)
from shared.report import STATES, Reporter, Target, exam_csv

# An exam id as Synap sends it (any text): shown escaped, linked percent-encoded.
EXAM_ID = re.compile(r"^[^\x00-\x1f\x7f]{1,200}$")
EVENT_ID = re.compile(r"^[A-Za-z0-9_.-]{1,128}$")
INTEGRATION = re.compile(r"^[a-z0-9-]{1,64}$")
MAX_ROWS = 1000
WINDOWS = {"1d": 86_400, "7d": 7 * 86_400, "30d": 30 * 86_400}
# The preview's own page frames the rendered message (same origin, sandboxed, no scripts).
PAGE_CSP = SECURITY_HEADERS["Content-Security-Policy"] + "; frame-src 'self'"
FRAME_HEADERS = {
    "Content-Security-Policy": (
        "default-src 'none'; style-src 'unsafe-inline'; img-src data:; frame-ancestors 'self'; "
        "base-uri 'none'; form-action 'none'"
    ),
    "X-Frame-Options": "SAMEORIGIN",
}


def _headers(extra: dict[str, str]) -> Callable[[Handler], Handler]:
    """Set ``extra`` headers on a protected handler's answer (after its own)."""

    def wrap(handler: Handler) -> Handler:
        @functools.wraps(handler)
        async def wrapper(request: web.Request) -> web.StreamResponse:
            response = await handler(request)
            if response.status == 200:
                response.headers.update(extra)
            return response

        return wrapper

    return wrap


def _reporter(request: web.Request) -> Reporter:
    return Reporter(request.app[STORE], Target.of(request.app[SETTINGS].integrations))


def exam_url(exam_id: str) -> str:
    return "/admin/exams/" + quote(exam_id, safe="")


@protected
async def exams(request: web.Request) -> web.StreamResponse:
    """GET /admin/exams — recent exams with per-integration counts."""
    window = request.query.get("since", "7d")
    if window not in WINDOWS:
        return _text(400, "since: one of " + ", ".join(WINDOWS))
    reporter = _reporter(request)
    summaries = await reporter.summary(WINDOWS[window])
    return render(
        request,
        "exams.html",
        summaries=summaries,
        names=[t.name for t in reporter.targets],
        states=STATES,
        since=window,
        windows=list(WINDOWS),
        exam_url=exam_url,
    )


def _exam_id(request: web.Request) -> str | None:
    exam_id = request.match_info["exam_id"]
    return exam_id if EXAM_ID.fullmatch(exam_id) else None


@protected
async def exam(request: web.Request) -> web.StreamResponse:
    """GET /admin/exams/{exam_id} — one row per learner's event; failed and pending first."""
    exam_id = _exam_id(request)
    if exam_id is None:
        return _text(404, "no such exam")
    only = request.query.get("state") or None
    if only is not None and only not in STATES:
        return _text(400, "state: one of " + ", ".join(STATES))
    reporter = _reporter(request)
    names = [t.name for t in reporter.targets]
    rows = await reporter.exam(exam_id)
    counts: dict[str, dict[str, int]] = {name: {s: 0 for s in STATES} for name in names}
    for row in rows:
        for name, state in row.integrations.items():
            counts[name][state] += 1
    shown = [r for r in rows if only is None or only in r.integrations.values()]
    return render(
        request,
        "exam.html",
        status=200 if rows else 404,
        exam_id=exam_id,
        exam_url=exam_url(exam_id),
        exam_name=await reporter.exam_name(exam_id),
        rows=shown[:MAX_ROWS],
        total=len(rows),
        matching=len(shown),
        max_rows=MAX_ROWS,
        names=names,
        counts=counts,
        states=STATES,
        only=only or "",
    )


@protected
async def exam_csv_download(request: web.Request) -> web.StreamResponse:
    """GET /admin/exams/{exam_id}/csv — the whole exam, for a spreadsheet."""
    exam_id = _exam_id(request)
    if exam_id is None:
        return _text(404, "no such exam")
    reporter = _reporter(request)
    rows = await reporter.exam(exam_id)
    filename = re.sub(r"[^A-Za-z0-9_.-]", "_", exam_id)[:100] or "exam"
    return web.Response(
        text=exam_csv(rows, [t.name for t in reporter.targets]),
        content_type="text/csv",
        charset="utf-8",
        headers={"Content-Disposition": f'attachment; filename="exam-{filename}.csv"'},
    )


async def _preview_of(request: web.Request) -> tuple[object, dict[str, object]]:
    """(the preview or an error text, what the form shows) from the query."""
    settings = request.app[SETTINGS]
    name = request.query.get("integration") or None
    event_id = request.query.get("event") or None
    variant = request.query.get("variant", "pass")
    form: dict[str, object] = {
        "integration": name or "",
        "event": event_id or "",
        "variant": variant,
        "emails": [e.name for e in email_integrations(settings)],
        "note": None,
    }
    if name is not None and not INTEGRATION.fullmatch(name):
        return "invalid integration name", form
    if event_id is not None and not EVENT_ID.fullmatch(event_id):
        return "invalid event id", form
    try:
        config, note = email_config(settings, name)
        form["integration"] = config.name if note is None else ""
        form["note"] = note
        if event_id is not None:
            body, earlier = await load_stored(request.app[STORE], event_id)
        else:
            body, earlier = load_sample(variant == "fail"), None
        return build_preview(config, body, earlier), form
    except PreviewError as exc:
        return str(exc), form


@_headers({"Content-Security-Policy": PAGE_CSP})
@protected
async def email_preview(request: web.Request) -> web.StreamResponse:
    """GET /admin/email-preview — what an email integration would send (headers, text part,
    and the HTML part framed from /admin/email-preview/html with the same query)."""
    preview, form = await _preview_of(request)
    error = preview if isinstance(preview, str) else None
    return render(
        request,
        "email_preview.html",
        status=200 if error is None else 404,
        preview=None if error else preview,
        error=error,
        form=form,
        query=request.query_string,
    )


@_headers(FRAME_HEADERS)
@protected
async def email_preview_html(request: web.Request) -> web.StreamResponse:
    """GET /admin/email-preview/html — the HTML part alone, as the learner's client shows it
    (no scripts run: the page's policy forbids them, and the frame is sandboxed)."""
    preview, _ = await _preview_of(request)
    if isinstance(preview, str):
        return _text(404, preview)
    return web.Response(text=getattr(preview, "html", ""), content_type="text/html")
