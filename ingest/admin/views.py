"""The admin pages: request handlers, authentication wrapper, rendering helpers."""

from __future__ import annotations

import functools
import json
import re
import secrets
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from urllib.parse import urlencode

import jinja2
from aiohttp import web
from multidict import MultiDictProxy

from ingest.admin.health import recent_health
from ingest.admin.redact import Redactor
from ingest.admin.security import (
    BEARER_SESSION,
    FLASH_COOKIE,
    LOGIN_COOKIE,
    SESSION_COOKIE,
    SESSION_SECONDS,
    AdminAuth,
)
from ingest.appkeys import PROXY, SETTINGS, STORE
from ingest.auth import FailureLimiter
from shared.inspection import Inspector, iso

TEMPLATES = Path(__file__).resolve().parent / "templates"
MAX_ROWS = 500

EVENT_ID = re.compile(r"^[A-Za-z0-9_.-]{1,128}$")
INTEGRATION = re.compile(r"^[a-z0-9-]{1,64}$")
REJECT_ID = re.compile(r"^[A-Za-z0-9_-]{1,64}$")
# the login form's nonce cookie, as secrets.token_urlsafe(18) writes it
LOGIN_NONCE = re.compile(r"^[A-Za-z0-9_-]{24}$")

SECURITY_HEADERS = {
    "Cache-Control": "no-store",
    "Content-Security-Policy": (
        "default-src 'none'; style-src 'unsafe-inline'; form-action 'self'; "
        "frame-ancestors 'none'; base-uri 'none'"
    ),
    "X-Frame-Options": "DENY",
    "X-Content-Type-Options": "nosniff",
    "Referrer-Policy": "no-referrer",
}

Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]


@dataclass
class Admin:
    """Per-application state of the admin pages."""

    auth: AdminAuth
    jinja: jinja2.Environment
    # failed token presentations per client address (login form and Bearer header)
    limiter: FailureLimiter


ADMIN = web.AppKey("examhook_admin", Admin)


def make_environment(redactor: Redactor) -> jinja2.Environment:
    env = jinja2.Environment(
        loader=jinja2.FileSystemLoader(TEMPLATES),
        autoescape=True,
        undefined=jinja2.StrictUndefined,
        finalize=redactor,  # every {{ value }} passes through it before escaping
    )
    env.filters["pct"] = lambda v: "—" if v is None else f"{v * 100:.1f} %"
    env.filters["duration"] = _duration
    env.filters["iso"] = iso
    return env


def _duration(seconds: float | None) -> str:
    if not seconds:
        return "0 s"
    if seconds < 120:
        return f"{seconds:.1f} s"
    if seconds < 7200:
        return f"{seconds / 60:.1f} min"
    return f"{seconds / 3600:.1f} h"


# -- responses -------------------------------------------------------------------------


def _secure(response: web.StreamResponse) -> web.StreamResponse:
    response.headers.update(SECURITY_HEADERS)
    return response


def _text(status: int, text: str, **headers: str) -> web.Response:
    return web.Response(status=status, text=text, headers=headers)


def _redirect(location: str) -> web.Response:
    return web.Response(status=303, headers={"Location": location})


def _safe_back(value: object, default: str = "/admin") -> str:
    """Only ever redirect within the admin pages."""
    if isinstance(value, str) and re.fullmatch(r"/admin(?:[/?][^\\\s]*)?", value):
        return value
    return default


def _set_cookie(
    request: web.Request, response: web.StreamResponse, name: str, value: str, max_age: int
) -> None:
    response.set_cookie(
        name,
        value,
        max_age=max_age,
        path="/admin",
        httponly=True,
        samesite="Strict",
        # behind a TLS-terminating proxy: its X-Forwarded-Proto, when it is trusted
        secure=request.app[PROXY].scheme(request) == "https",
    )


def render(request: web.Request, template: str, status: int = 200, **context: Any) -> web.Response:
    admin = request.app[ADMIN]
    session, _ = _session(request)  # cheap (one HMAC); the request was authenticated already
    flash = None
    raw_flash = request.cookies.get(FLASH_COOKIE)
    if raw_flash:
        flash = admin.auth.read_flash(raw_flash)
    html = admin.jinja.get_template(template).render(
        csrf=admin.auth.csrf_token(session) if session else "",
        flash=flash,
        here=request.path_qs,
        logged_in=session is not None,
        cookie_session=session not in (None, BEARER_SESSION),
        **context,
    )
    response = web.Response(text=html, status=status, content_type="text/html")
    if raw_flash:
        response.del_cookie(FLASH_COOKIE, path="/admin")
    return response


async def read_form(request: web.Request) -> MultiDictProxy[Any] | None:
    """The POSTed form, or None when it cannot be parsed (not UTF-8, malformed multipart):
    a client's mistake, answered with 400 by the caller."""
    try:
        return await request.post()
    except (ValueError, LookupError, AssertionError):  # UnicodeDecodeError is a ValueError
        return None


def bad_form() -> web.Response:
    return _text(400, "the form could not be read")


def redirect_back(request: web.Request, form: Mapping[str, Any], message: str) -> web.Response:
    response = _redirect(_safe_back(form.get("back")))
    _set_cookie(request, response, FLASH_COOKIE, request.app[ADMIN].auth.sign_flash(message), 60)
    return response


# -- authentication --------------------------------------------------------------------


def _session(request: web.Request) -> tuple[str | None, bool]:
    """(session, presented): the CSRF session of an authenticated request, else None;
    ``presented`` is True when some credential was offered (a wrong one counts as a failure)."""
    auth = request.app[ADMIN].auth
    header = request.headers.get("Authorization")
    if header is not None:
        return (BEARER_SESSION if auth.check_bearer(header) else None), True
    cookie = request.cookies.get(SESSION_COOKIE)
    if cookie:
        return (cookie if auth.check_session(cookie) else None), True
    return None, False


def protected(handler: Handler) -> Handler:
    """Require the admin token (Bearer header or session cookie), and on POST a CSRF token."""

    @functools.wraps(handler)
    async def wrapper(request: web.Request) -> web.StreamResponse:
        try:
            return _secure(await _guarded(handler, request))
        except web.HTTPException as exc:
            exc.headers.update(SECURITY_HEADERS)
            raise

    return wrapper


async def _guarded(handler: Handler, request: web.Request) -> web.StreamResponse:
    admin = request.app[ADMIN]
    client = request.app[PROXY].client(request)
    if admin.limiter.limited(client):
        return _text(429, "too many failed attempts; try again in a minute", **{"Retry-After": "60"})
    session, presented = _session(request)
    if session is None:
        if presented:
            admin.limiter.failed(client)
        if request.method == "GET" and "Authorization" not in request.headers:
            return _redirect("/admin/login?" + urlencode({"next": request.path_qs}))
        return _text(401, "admin token required", **{"WWW-Authenticate": 'Bearer realm="examhook-admin"'})
    if request.method == "POST":
        form = await read_form(request)
        if form is None:
            return bad_form()
        given = form.get("csrf")
        if not isinstance(given, str) or not admin.auth.check_csrf(session, given):
            return _text(403, "missing or wrong CSRF token; reload the page and try again")
    return await handler(request)


async def login_page(request: web.Request) -> web.StreamResponse:
    """GET /admin/login — the form; POST — check the token, set the session cookie."""
    admin = request.app[ADMIN]
    auth = admin.auth
    client = request.app[PROXY].client(request)
    next_url = _safe_back(request.query.get("next"))
    cookie = request.cookies.get(SESSION_COOKIE)
    if request.method == "GET" and cookie and auth.check_session(cookie):
        return _secure(_redirect(next_url))
    if admin.limiter.limited(client):
        return _secure(_text(429, "too many failed attempts; try again in a minute", **{"Retry-After": "60"}))
    nonce = request.cookies.get(LOGIN_COOKIE)
    tampered = nonce is not None and not LOGIN_NONCE.fullmatch(nonce)
    if nonce is None or tampered:
        nonce = secrets.token_urlsafe(18)
    if tampered:  # the server never sets such a value: count it like a wrong token
        admin.limiter.failed(client)
    error = None
    status = 200
    if request.method == "POST":
        form = await read_form(request)
        if form is None:
            admin.limiter.failed(client)
            return _secure(bad_form())
        next_url = _safe_back(form.get("next"))
        given_csrf, token = form.get("csrf"), form.get("token")
        if tampered or not isinstance(given_csrf, str) or not auth.check_csrf("login:" + nonce, given_csrf):
            error, status = "The form expired; please try again.", 403
        elif not isinstance(token, str) or not auth.check_token(token):
            admin.limiter.failed(client)
            error, status = "Wrong token.", 401
        else:
            response = _redirect(next_url)
            _set_cookie(request, response, SESSION_COOKIE, auth.new_session(), SESSION_SECONDS)
            response.del_cookie(LOGIN_COOKIE, path="/admin")
            return _secure(response)
    html = admin.jinja.get_template("login.html").render(
        csrf=auth.csrf_token("login:" + nonce),
        next=next_url,
        error=error,
        flash=None,
        here=request.path_qs,
        logged_in=False,
        cookie_session=False,
    )
    response = web.Response(text=html, status=status, content_type="text/html")
    _set_cookie(request, response, LOGIN_COOKIE, nonce, 3600)
    return _secure(response)


@protected
async def logout(request: web.Request) -> web.StreamResponse:
    response = _redirect("/admin/login")
    response.del_cookie(SESSION_COOKIE, path="/admin")
    return response


# -- pages -----------------------------------------------------------------------------


def _inspector(request: web.Request) -> Inspector:
    return Inspector(request.app[STORE])


def _integration_type(integration: object) -> str:
    return type(integration).__name__.removesuffix("Integration").lower()


@protected
async def dashboard(request: web.Request) -> web.StreamResponse:
    settings = request.app[SETTINGS]
    inspector = _inspector(request)
    counts = await inspector.counts()
    health = await recent_health(inspector)
    per = counts["per_integration"]
    configured = {i.name: _integration_type(i) for i in settings.integrations}
    names = sorted(set(configured) | {n for n in per if n != "(fan-out)"} | set(health.per_integration))
    empty = {"queued": 0, "in_progress": 0, "scheduled_retries": 0, "failed": 0}
    rows = [
        {
            "name": name,
            "type": configured.get(name, "not configured"),
            "counts": per.get(name, empty),
            "health": health.per_integration.get(name),
        }
        for name in names
    ]
    return render(
        request,
        "dashboard.html",
        counts=counts,
        fanout=per.get("(fan-out)", empty),
        rows=rows,
        health=health,
    )


def _filter_names(request: web.Request, failing: list[str]) -> list[str]:
    return sorted({i.name for i in request.app[SETTINGS].integrations} | set(failing))


@protected
async def failures(request: web.Request) -> web.StreamResponse:
    wanted = request.query.get("integration") or None
    if wanted is not None and not INTEGRATION.fullmatch(wanted):
        return _text(400, "invalid integration name")
    inspector = _inspector(request)
    rows = await inspector.failures(integration=wanted)
    counts = await inspector.counts()
    failing = [n for n, c in counts["per_integration"].items() if c["failed"]]
    return render(
        request,
        "failures.html",
        rows=rows[:MAX_ROWS],
        total=len(rows),
        max_rows=MAX_ROWS,
        integration=wanted or "",
        names=_filter_names(request, failing),
    )


async def _pairs_from(form: MultiDictProxy[Any], inspector: Inspector) -> list[tuple[str, str]] | str:
    """The failed pairs a retry/purge form names, or an error message."""
    integration = form.get("integration") or None
    if integration is not None and (
        not isinstance(integration, str) or not INTEGRATION.fullmatch(integration)
    ):
        return "invalid integration name"
    if form.get("all") == "1":
        return await inspector.failure_pairs(integration=integration)
    event_id = form.get("event_id")
    if not isinstance(event_id, str) or not EVENT_ID.fullmatch(event_id) or integration is None:
        return "name one failure (event_id and integration) or all"
    return [(event_id, integration)]


async def _on_pairs(
    request: web.Request, act: Callable[[Inspector, list[tuple[str, str]]], Awaitable[str]]
) -> web.StreamResponse:
    """A form naming failed pairs (one, or all): ``act`` on them, then back with its message."""
    form = await read_form(request)
    if form is None:
        return bad_form()
    inspector = _inspector(request)
    pairs = await _pairs_from(form, inspector)
    if isinstance(pairs, str):
        return redirect_back(request, form, pairs)
    return redirect_back(request, form, await act(inspector, pairs))


@protected
async def failures_retry(request: web.Request) -> web.StreamResponse:
    async def retry(inspector: Inspector, pairs: list[tuple[str, str]]) -> str:
        queued, skipped = await inspector.retry(pairs)
        message = f"queued {queued}"
        if skipped:
            message += f", skipped {skipped} (already delivered, no longer failed, or payload expired)"
        return message

    return await _on_pairs(request, retry)


@protected
async def failures_purge(request: web.Request) -> web.StreamResponse:
    async def purge(inspector: Inspector, pairs: list[tuple[str, str]]) -> str:
        return f"purged {await inspector.purge(pairs)}"

    return await _on_pairs(request, purge)


@protected
async def event(request: web.Request) -> web.StreamResponse:
    event_id = request.match_info["event_id"]
    if not EVENT_ID.fullmatch(event_id):
        return _text(404, "no such event")
    detail = await _inspector(request).event_detail(event_id)
    if detail is None:
        return render(request, "event.html", status=404, event_id=event_id, detail=None, payload="")
    payload = detail["payload"]
    text = payload if isinstance(payload, str) else json.dumps(payload, indent=2, ensure_ascii=False)
    return render(request, "event.html", event_id=event_id, detail=detail, payload=text)


@protected
async def rejected(request: web.Request) -> web.StreamResponse:
    items = await _inspector(request).rejected()
    return render(request, "rejected.html", items=items[:MAX_ROWS], total=len(items), max_rows=MAX_ROWS)


@protected
async def rejected_one(request: web.Request) -> web.StreamResponse:
    reject_id = request.match_info["reject_id"]
    item = await _inspector(request).rejected_one(reject_id) if REJECT_ID.fullmatch(reject_id) else None
    return render(request, "rejected_one.html", status=200 if item else 404, reject_id=reject_id, item=item)


@protected
async def rejected_purge(request: web.Request) -> web.StreamResponse:
    form = await read_form(request)
    if form is None:
        return bad_form()
    inspector = _inspector(request)
    if form.get("all") == "1":
        removed = await inspector.purge_rejected()
    else:
        reject_id = form.get("reject_id")
        if not isinstance(reject_id, str) or not REJECT_ID.fullmatch(reject_id):
            return redirect_back(request, form, "name one rejected body or all")
        removed = await inspector.purge_rejected([reject_id])
    return redirect_back(request, form, f"purged {removed}")
