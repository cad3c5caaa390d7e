"""Server-rendered admin pages at ``/admin`` (failures dashboard), off unless
``admin_token`` (``EXAMHOOK_ADMIN_TOKEN``) is set. See docs/admin.md."""

from __future__ import annotations

from aiohttp import web

from ingest.admin import exams, views
from ingest.admin.redact import Redactor, secrets_of
from ingest.admin.security import AdminAuth
from ingest.appkeys import SETTINGS
from ingest.auth import FailureLimiter

__all__ = ["setup_admin"]


def setup_admin(app: web.Application) -> None:
    """Add the ``/admin`` routes when an admin token is configured; otherwise do nothing
    (so every ``/admin`` URL is a plain 404)."""
    settings = app[SETTINGS]
    if not settings.admin_token:
        return
    app[views.ADMIN] = views.Admin(
        auth=AdminAuth(settings.admin_token),
        jinja=views.make_environment(Redactor(secrets_of(settings))),
        # 10 wrong tokens a minute per client address, 50 in all (see ingest.auth)
        limiter=FailureLimiter(per_address=10, total=50, window_seconds=60.0),
    )
    r = app.router
    r.add_get("/admin", views.dashboard)
    r.add_route("GET", "/admin/login", views.login_page)
    r.add_route("POST", "/admin/login", views.login_page)
    r.add_post("/admin/logout", views.logout)
    r.add_get("/admin/failures", views.failures)
    r.add_post("/admin/failures/retry", views.failures_retry)
    r.add_post("/admin/failures/purge", views.failures_purge)
    r.add_get(r"/admin/events/{event_id}", views.event)
    r.add_get("/admin/rejected", views.rejected)
    r.add_get(r"/admin/rejected/{reject_id}", views.rejected_one)
    r.add_post("/admin/rejected/purge", views.rejected_purge)
    r.add_get("/admin/exams", exams.exams)
    r.add_get(r"/admin/exams/{exam_id}/csv", exams.exam_csv_download)
    r.add_get(r"/admin/exams/{exam_id}", exams.exam)
    r.add_get("/admin/email-preview", exams.email_preview)
    r.add_get("/admin/email-preview/html", exams.email_preview_html)
