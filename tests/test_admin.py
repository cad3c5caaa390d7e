"""The /admin pages: off without a token, token-protected, CSRF on every form, and the
real failure -> retry -> delivered loop, both over HTTP and in a headless Chromium."""

from __future__ import annotations

import base64
import html
import json
import re
import shutil
from collections.abc import Awaitable, Callable
from typing import Any

import aiohttp
import pytest
from aiohttp.test_utils import TestClient
from redis.asyncio import Redis

from ingest.admin.redact import Redactor, secrets_of
from ingest.admin.security import SESSION_COOKIE, AdminAuth
from ingest.admin.views import make_environment
from ingest.app import WEBHOOK_PATH, create_app
from shared.contract import Keys
from shared.inspection import Inspector
from shared.settings import Settings
from shared.store import Store
from tests.conftest import SYNAP_BASIC, Destination, eventually

TOKEN = "admin-token-Zq7u3kP9wX2m"
BEARER = {"Authorization": f"Bearer {TOKEN}"}
SIGNING_SECRET = "whsec_" + base64.b64encode(b"signing-secret-for-the-lms-0123").decode()
LMS_CREDENTIAL = "lms-header-credential-5f1c"
URL_PASSWORD = "url-password-8b2d"
SYNAP = SYNAP_BASIC
JSON_SYNAP = {"Content-Type": "application/json", "Authorization": SYNAP}
SECRETS = [
    TOKEN,
    SIGNING_SECRET,
    SIGNING_SECRET.removeprefix("whsec_"),
    LMS_CREDENTIAL,
    URL_PASSWORD,
    "s3cret",
    SYNAP.split(" ", 1)[1],
]
CHROMIUM = "/usr/bin/chromium"
CHROMIUM_ARGS = [
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
]

ClientFactory = Callable[..., Awaitable[TestClient[Any, Any]]]


# -- helpers and fixtures --------------------------------------------------------------


@pytest.fixture
def settings(make_settings: Callable[..., Settings], destination: Destination) -> Settings:
    return make_settings(
        [
            {
                "name": "lms",
                "type": "http",
                "url": destination.url,
                "signing_secret": SIGNING_SECRET,
                "headers": {"Authorization": f"Bearer {LMS_CREDENTIAL}"},
            },
            {
                # never receives anything; only here so its URL password is a secret to hide
                "name": "archive",
                "type": "http",
                "url": f"http://archiver:{URL_PASSWORD}@127.0.0.1:9/x",
                "when": {"exam_ids": ["no-such-exam"]},
            },
        ],
        admin_token=TOKEN,
    )


@pytest.fixture
def inspector(redis: Redis, settings: Settings) -> Inspector:
    return Inspector(Store(redis, Keys(settings.redis.prefix), settings.retention))


@pytest.fixture
async def client(aiohttp_client: ClientFactory, settings: Settings) -> TestClient[Any, Any]:
    return await aiohttp_client(create_app(settings))


def csrf_of(page: str) -> str:
    match = re.search(r'name="csrf" value="([^"]+)"', page)
    assert match, "page has no form with a CSRF token"
    return match.group(1)


def assert_no_secrets(page: str) -> None:
    for secret in SECRETS:
        assert secret not in page and html.escape(secret) not in page, f"secret {secret[:6]}... on a page"


def with_attempt(body: bytes, attempt_id: str) -> bytes:
    data = json.loads(body)
    data["attempt"]["id"] = attempt_id
    return json.dumps(data).encode()


async def post_event(client: TestClient[Any, Any], body: bytes) -> str:
    response = await client.post(WEBHOOK_PATH, data=body, headers=JSON_SYNAP)
    assert response.status == 202, await response.text()
    return str((await response.json())["event_id"])


async def make_failures(
    client: TestClient[Any, Any],
    destination: Destination,
    inspector: Inspector,
    start_worker: Callable[..., Awaitable[Any]],
    settings: Settings,
    bodies: list[bytes],
) -> list[str]:
    """Real failures: the destination answers 400 (permanent) to each of ``bodies``."""
    destination.responses.extend([(400, {})] * len(bodies))
    await start_worker(settings)
    event_ids = [await post_event(client, body) for body in bodies]
    await eventually(lambda: _failed(inspector, len(bodies)))
    return event_ids


async def _failed(inspector: Inspector, count: int) -> bool:
    return len(await inspector.failures()) == count


async def get_page(client: TestClient[Any, Any], path: str, **kwargs: Any) -> str:
    response = await client.get(path, headers=BEARER, **kwargs)
    assert response.status == 200, (path, response.status)
    assert response.headers["Cache-Control"] == "no-store"
    page = await response.text()
    assert_no_secrets(page)
    return page


async def submit(client: TestClient[Any, Any], page: str, action: str, **fields: str) -> str:
    """POST a form the way the page would (Bearer auth, the page's CSRF token); follow the
    redirect and return the page it lands on."""
    form = {"csrf": csrf_of(page), **fields}
    response = await client.post(action, data=form, headers=BEARER, allow_redirects=False)
    assert response.status == 303, (action, response.status, await response.text())
    location = response.headers["Location"]
    assert location.startswith("/admin")
    return await get_page(client, location)


def flash_of(page: str) -> str:
    match = re.search(r'<div class="flash" role="status">([^<]*)</div>', page)
    assert match, "no flash message"
    return html.unescape(match.group(1))


# -- access ----------------------------------------------------------------------------


async def test_admin_is_absent_without_a_token(
    aiohttp_client: ClientFactory, make_settings: Callable[..., Settings]
) -> None:
    """With no admin token configured every /admin URL is a plain 404, even with a Bearer header."""
    client = await aiohttp_client(create_app(make_settings()))
    for path in ("/admin", "/admin/login", "/admin/failures", "/admin/rejected"):
        assert (await client.get(path, headers=BEARER)).status == 404
    assert (await client.post("/admin/login", data={"token": TOKEN})).status == 404


async def test_pages_require_the_token(client: TestClient[Any, Any]) -> None:
    """Without credentials a page redirects to the login form; a wrong Bearer token or a
    forged cookie gets nothing; an unauthenticated POST is 401; all answers are no-store."""
    response = await client.get("/admin/failures?integration=lms", allow_redirects=False)
    assert response.status == 303
    assert response.headers["Location"] == "/admin/login?next=%2Fadmin%2Ffailures%3Fintegration%3Dlms"
    assert response.headers["Cache-Control"] == "no-store"

    wrong = await client.get("/admin", headers={"Authorization": "Bearer not-the-token"})
    assert wrong.status == 401
    assert wrong.headers["Cache-Control"] == "no-store"
    assert TOKEN not in await wrong.text()
    basic = await client.get("/admin", headers={"Authorization": SYNAP})
    assert basic.status == 401

    client.session.cookie_jar.update_cookies({SESSION_COOKIE: "99999999999.forged"})
    forged = await client.get("/admin", allow_redirects=False)
    assert forged.status == 303
    client.session.cookie_jar.clear()

    post = await client.post("/admin/failures/purge", data={"all": "1"})
    assert post.status == 401


async def test_wrong_tokens_are_rate_limited(client: TestClient[Any, Any]) -> None:
    """After 10 wrong tokens in a minute a client gets 429, even with the right token."""
    for _ in range(10):
        assert (await client.get("/admin", headers={"Authorization": "Bearer guess"})).status == 401
    assert (await client.get("/admin", headers=BEARER)).status == 429


async def test_bearer_token_opens_the_pages(client: TestClient[Any, Any]) -> None:
    """``Authorization: Bearer <token>`` opens every page, with no-store and a strict CSP."""
    for path in ("/admin", "/admin/failures", "/admin/rejected"):
        response = await client.get(path, headers=BEARER)
        assert response.status == 200
        assert response.headers["Cache-Control"] == "no-store"
        assert "frame-ancestors 'none'" in response.headers["Content-Security-Policy"]
        assert response.content_type == "text/html"
        assert_no_secrets(await response.text())


async def test_login_form_sets_a_cookie_that_is_not_the_token(client: TestClient[Any, Any]) -> None:
    """The login form needs its CSRF token and the right admin token; it then sets an
    HttpOnly, SameSite=Strict cookie (not the token) that opens the pages; logout ends it."""
    login = await client.get("/admin/login?next=/admin/rejected")
    assert login.status == 200
    page = await login.text()
    csrf = csrf_of(page)

    no_csrf = await client.post("/admin/login", data={"token": TOKEN}, allow_redirects=False)
    assert no_csrf.status == 403
    bad = await client.post("/admin/login", data={"token": "nope", "csrf": csrf}, allow_redirects=False)
    assert bad.status == 401
    assert SESSION_COOKIE not in bad.cookies

    good = await client.post(
        "/admin/login", data={"token": TOKEN, "csrf": csrf, "next": "/admin/rejected"}, allow_redirects=False
    )
    assert good.status == 303
    assert good.headers["Location"] == "/admin/rejected"
    cookie = good.cookies[SESSION_COOKIE]
    assert cookie["httponly"] is True
    assert cookie["samesite"] == "Strict"
    assert cookie["path"] == "/admin"
    assert TOKEN not in cookie.value and TOKEN not in good.headers.getall("Set-Cookie")[0]
    assert AdminAuth(TOKEN).check_session(cookie.value)

    dashboard = await client.get("/admin")
    assert dashboard.status == 200
    assert "Dashboard" in await dashboard.text()

    logout = await client.post(
        "/admin/logout", data={"csrf": csrf_of(await dashboard.text())}, allow_redirects=False
    )
    assert logout.status == 303
    assert (await client.get("/admin", allow_redirects=False)).status == 303


async def test_login_redirects_only_within_admin(client: TestClient[Any, Any]) -> None:
    """``next`` pointing outside /admin (an open redirect) is replaced by /admin."""
    page = await (await client.get("/admin/login")).text()
    response = await client.post(
        "/admin/login",
        data={"token": TOKEN, "csrf": csrf_of(page), "next": "//evil.example/admin"},
        allow_redirects=False,
    )
    assert response.status == 303
    assert response.headers["Location"] == "/admin"


async def test_posts_without_the_right_csrf_token_are_rejected(client: TestClient[Any, Any]) -> None:
    """A POST with no CSRF token, or one made for another session, is 403 and changes nothing."""
    rejected = await client.post(WEBHOOK_PATH, data=b"{oops", headers=JSON_SYNAP)
    assert rejected.status == 400

    page = await (await client.get("/admin/login")).text()
    await client.post("/admin/login", data={"token": TOKEN, "csrf": csrf_of(page)})
    cookie_page = await (await client.get("/admin/rejected")).text()
    cookie_csrf = csrf_of(cookie_page)

    assert (await client.post("/admin/rejected/purge", data={"all": "1"})).status == 403
    assert (await client.post("/admin/rejected/purge", data={"all": "1", "csrf": "x" * 64})).status == 403
    # the cookie session's token is no good for a Bearer request, and the other way round
    bearer_csrf = csrf_of(await get_page(client, "/admin/rejected"))
    assert bearer_csrf != cookie_csrf
    wrong = await client.post("/admin/rejected/purge", data={"all": "1", "csrf": cookie_csrf}, headers=BEARER)
    assert wrong.status == 403
    assert (await client.post("/admin/rejected/purge", data={"all": "1", "csrf": bearer_csrf})).status == 403
    assert (await client.get("/admin/rejected", headers=BEARER)).status == 200
    assert "rej_" in await (await client.get("/admin/rejected", headers=BEARER)).text()

    done = await client.post("/admin/rejected/purge", data={"all": "1", "csrf": cookie_csrf})
    assert done.status == 200  # followed the redirect
    assert flash_of(await done.text()) == "purged 1"


# -- failures --------------------------------------------------------------------------


async def test_failure_is_shown_then_retried_and_delivered(
    client: TestClient[Any, Any],
    destination: Destination,
    inspector: Inspector,
    start_worker: Callable[..., Awaitable[Any]],
    settings: Settings,
    sample_body: bytes,
) -> None:
    """A real failed delivery (destination answered 400) appears on the dashboard, the
    failures list and its event page with the attempt log; "retry" queues it again, the
    destination receives it, and it leaves the failures list."""
    [event_id] = await make_failures(client, destination, inspector, start_worker, settings, [sample_body])

    dashboard = await get_page(client, "/admin")
    assert re.search(r"<b><a href=\"/admin/failures\">1</a></b>failed", dashboard)
    lms_row = dashboard.split('href="/admin/failures?integration=lms"', 1)[1].split("</tr>", 1)[0]
    assert '<span class="err">HTTP 400: nope</span>' in lms_row  # the integration's last error
    assert '<td class="num">0.0 %</td>' in lms_row  # success rate: 0 delivered of 1 finished
    assert "lms" in dashboard and "archive" in dashboard

    failures = await get_page(client, "/admin/failures")
    assert f'href="/admin/events/{event_id}"' in failures
    assert "exm_maths_2026" in failures
    assert event_id in await get_page(client, "/admin/failures?integration=lms")
    assert event_id not in await get_page(client, "/admin/failures?integration=archive")

    event = await get_page(client, f"/admin/events/{event_id}")
    assert "lms — failed" in event
    assert "att_d23f0824128b2f330c5c" in event  # the payload
    assert re.search(r"<td>failed</td>\s*<td>400</td>", event)  # the attempt log

    after = await submit(
        client,
        failures,
        "/admin/failures/retry",
        event_id=event_id,
        integration="lms",
        back="/admin/failures",
    )
    assert flash_of(after) == "queued 1"
    assert f'data-event-id="{event_id}"' not in after

    received = await destination.wait_for_requests(2)
    assert received[1].headers["Idempotency-Key"] == event_id
    await eventually(lambda: _delivered(inspector, event_id))
    assert await inspector.failures() == []
    assert "lms — delivered" in await get_page(client, f"/admin/events/{event_id}")
    assert "No failed deliveries." in await get_page(client, "/admin/failures")
    dashboard = await get_page(client, "/admin")
    lms_row = dashboard.split('href="/admin/failures?integration=lms"', 1)[1].split("</tr>", 1)[0]
    assert '<td class="num">100.0 %</td>' in lms_row


async def _delivered(inspector: Inspector, event_id: str) -> bool:
    detail = await inspector.event_detail(event_id, "lms")
    return bool(detail and detail["deliveries"][0]["status"] == "delivered")


async def test_purge_one_retry_all_purge_all(
    client: TestClient[Any, Any],
    destination: Destination,
    inspector: Inspector,
    start_worker: Callable[..., Awaitable[Any]],
    settings: Settings,
    sample_body: bytes,
) -> None:
    """Purge one removes exactly that failure; retry all (filtered by integration) queues
    the rest, which get delivered; purge all with nothing left reports 0."""
    first, second = await make_failures(
        client,
        destination,
        inspector,
        start_worker,
        settings,
        [with_attempt(sample_body, "att_admin_one"), with_attempt(sample_body, "att_admin_two")],
    )
    page = await get_page(client, "/admin/failures?integration=lms")
    after = await submit(
        client,
        page,
        "/admin/failures/purge",
        event_id=first,
        integration="lms",
        back="/admin/failures?integration=lms",
    )
    assert flash_of(after) == "purged 1"
    assert [row.event_id for row in await inspector.failures()] == [second]
    assert f'href="/admin/events/{first}"' not in after

    after = await submit(
        client, after, "/admin/failures/retry", all="1", integration="lms", back="/admin/failures"
    )
    assert flash_of(after) == "queued 1"
    received = await destination.wait_for_requests(3)
    assert received[2].headers["Idempotency-Key"] == second
    await eventually(lambda: _delivered(inspector, second))

    # nothing is left, so the page has no forms: reuse the earlier page's (same session's) token
    after = await submit(
        client, page, "/admin/failures/purge", all="1", integration="", back="/admin/failures"
    )
    assert flash_of(after) == "purged 0"


async def test_purge_all_removes_every_failure(
    client: TestClient[Any, Any],
    destination: Destination,
    inspector: Inspector,
    start_worker: Callable[..., Awaitable[Any]],
    settings: Settings,
    sample_body: bytes,
) -> None:
    """Purge all forgets every failure, with its attempt log."""
    [event_id] = await make_failures(client, destination, inspector, start_worker, settings, [sample_body])
    page = await get_page(client, "/admin/failures")
    after = await submit(
        client, page, "/admin/failures/purge", all="1", integration="", back="/admin/failures"
    )
    assert flash_of(after) == "purged 1"
    assert await inspector.failures() == []
    detail = await inspector.event_detail(event_id, "lms")
    assert detail is None or detail["deliveries"] == []


async def test_unknown_event_and_bad_names(client: TestClient[Any, Any]) -> None:
    """An unknown event is a 404 page; names that could be Redis glob patterns are refused."""
    missing = await client.get("/admin/events/evt_0000", headers=BEARER)
    assert missing.status == 404
    assert "Nothing is known" in await missing.text()
    assert (await client.get("/admin/events/evt_*", headers=BEARER)).status == 404
    assert (await client.get("/admin/failures?integration=*", headers=BEARER)).status == 400


# -- rejected --------------------------------------------------------------------------


async def test_rejected_bodies_listed_shown_and_purged(client: TestClient[Any, Any]) -> None:
    """Bodies rejected by the webhook (400 and 422) are listed with their errors, one can be
    viewed in full, and purge one / purge all remove them."""
    not_json = await client.post(WEBHOOK_PATH, data=b"{not json <script>", headers=JSON_SYNAP)
    assert not_json.status == 400
    first = (await not_json.json())["rejected_id"]
    bad_shape = await client.post(WEBHOOK_PATH, data=b'{"meta": {}}', headers=JSON_SYNAP)
    assert bad_shape.status == 422
    second = (await bad_shape.json())["rejected_id"]

    listing = await get_page(client, "/admin/rejected")
    assert first in listing and second in listing
    assert "invalid_json" in listing and "invalid_payload" in listing
    assert "<script>" not in listing  # escaped

    one = await get_page(client, f"/admin/rejected/{first}")
    assert "{not json &lt;script&gt;" in one
    missing = await client.get("/admin/rejected/rej_missing", headers=BEARER)
    assert missing.status == 404

    after = await submit(client, one, "/admin/rejected/purge", reject_id=first, back="/admin/rejected")
    assert flash_of(after) == "purged 1"
    assert first not in after and second in after
    after = await submit(client, after, "/admin/rejected/purge", all="1", back="/admin/rejected")
    assert flash_of(after) == "purged 1"
    assert "No rejected bodies." in after


# -- secrets ---------------------------------------------------------------------------


async def test_no_secret_on_any_page_with_every_integration_type(
    aiohttp_client: ClientFactory, make_settings: Callable[..., Settings], sample_body: bytes
) -> None:
    """SMTP and database passwords, signing secrets, header credentials, the Basic
    password and the admin token appear on no admin page."""
    smtp_password, db_password = "smtp-password-41ac", "db-password-93fe"
    settings = make_settings(
        [
            {
                "name": "mail",
                "type": "email",
                "smtp_host": "127.0.0.1",
                "username": "u",
                "password": smtp_password,
                "from": "results@example.org",
            },
            {"name": "db", "type": "postgres", "dsn": f"postgresql://u:{db_password}@127.0.0.1/x"},
            {
                "name": "lms",
                "type": "http",
                "url": "http://127.0.0.1:9/",
                "signing_secret": SIGNING_SECRET,
                "headers": {"Authorization": f"Bearer {LMS_CREDENTIAL}"},
            },
        ],
        admin_token=TOKEN,
    )
    client = await aiohttp_client(create_app(settings))
    event_id = await post_event(client, sample_body)
    await client.post(WEBHOOK_PATH, data=b"nope", headers=JSON_SYNAP)
    rejected_id = await client.get("/admin/rejected", headers=BEARER)
    match = re.search(r"/admin/rejected/(rej_[0-9a-f]+)", await rejected_id.text())
    assert match
    pages = [
        "/admin",
        "/admin/failures",
        "/admin/rejected",
        f"/admin/rejected/{match.group(1)}",
        f"/admin/events/{event_id}",
    ]
    for path in pages:
        page = await get_page(client, path)
        assert smtp_password not in page and db_password not in page
    login = await (await client.get("/admin/login")).text()
    assert_no_secrets(login)


def test_rendered_values_are_redacted_and_escaped(make_settings: Callable[..., Settings]) -> None:
    """Text that comes from elsewhere (error messages, bodies) is shown with every configured
    secret replaced by *** and HTML-escaped."""
    settings = make_settings(
        [
            {
                "name": "lms",
                "type": "http",
                "url": "http://127.0.0.1:9/",
                "signing_secret": SIGNING_SECRET,
                "headers": {"X-Api-Key": LMS_CREDENTIAL},
            }
        ],
        admin_token=TOKEN,
    )
    env = make_environment(Redactor(secrets_of(settings)))
    out = env.from_string("{{ error }}").render(
        error=f"<b>401</b> key={LMS_CREDENTIAL} basic=s3cret token={TOKEN}"
    )
    assert out == "&lt;b&gt;401&lt;/b&gt; key=*** basic=*** token=***"


# -- end to end in a real browser ------------------------------------------------------


async def test_browser_login_see_failure_retry_delivered(
    served: str,
    destination: Destination,
    inspector: Inspector,
    start_worker: Callable[..., Awaitable[Any]],
    settings: Settings,
    sample_body: bytes,
) -> None:
    """In headless Chromium: log in with the token, find the failed delivery, click Retry;
    the flash says "queued 1", the failure is gone from the page, the destination gets the
    event and its page then shows it delivered."""
    if shutil.which(CHROMIUM) is None:
        pytest.skip(f"{CHROMIUM} missing: install it with `apt-get update && apt-get install -y chromium`")
    try:
        from playwright.async_api import async_playwright, expect
    except ImportError:
        pytest.skip(
            "playwright missing: `pip install playwright` (or `pip install -e '.[test]'`); "
            "the browser is Debian's chromium, `playwright install` is not needed"
        )

    destination.responses.append((400, {}))
    await start_worker(settings)
    async with aiohttp.ClientSession() as session:
        response = await session.post(served + WEBHOOK_PATH, data=sample_body, headers=JSON_SYNAP)
        assert response.status == 202
        event_id = (await response.json())["event_id"]
    await eventually(lambda: _failed(inspector, 1))

    async with async_playwright() as playwright:
        browser = await playwright.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS)
        try:
            page = await browser.new_page()
            await page.goto(served + "/admin/failures")
            await expect(page).to_have_url(re.compile(r"/admin/login\?next="))
            await page.get_by_label("Admin token").fill(TOKEN)
            await page.get_by_role("button", name="Log in").click()
            await expect(page).to_have_url(served + "/admin/failures")

            row = page.locator(f'tr[data-event-id="{event_id}"]')
            await expect(row).to_contain_text("lms")
            await expect(row).to_contain_text("400")
            await row.get_by_role("button", name="Retry").click()

            await expect(page.get_by_role("status")).to_have_text("queued 1")
            await expect(page.locator(f'tr[data-event-id="{event_id}"]')).to_have_count(0)
            await expect(page.get_by_text("No failed deliveries.")).to_be_visible()
            content = await page.content()
            assert TOKEN not in content

            received = await destination.wait_for_requests(2)
            assert received[1].headers["Idempotency-Key"] == event_id
            await eventually(lambda: _delivered(inspector, event_id))
            await page.goto(served + f"/admin/events/{event_id}")
            await expect(page.get_by_role("heading", name="lms — delivered")).to_be_visible()
            cookies = await page.context.cookies()
            [session_cookie] = [c for c in cookies if c["name"] == SESSION_COOKIE]
            assert session_cookie["httpOnly"] and session_cookie["sameSite"] == "Strict"
            assert TOKEN not in session_cookie["value"]
        finally:
            await browser.close()
