"""The results-day admin pages: Exams (every recent exam's counts), one exam's learners
(failed and pending first, CSV download) and the email preview, over HTTP and in headless
Chromium. With ``EXAMHOOK_SCREENSHOTS=docs`` the browser test writes the screenshots shown
in the README into ``docs/`` (else into the test's temporary directory)."""

from __future__ import annotations

import csv
import io
import os
import re
import shutil
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any
from urllib.parse import quote

import aiohttp
import pytest
from redis.asyncio import Redis

from ingest.app import WEBHOOK_PATH
from shared.contract import Keys
from shared.settings import Settings
from shared.store import now_ms
from tests.conftest import email_integration, eventually
from tests.results_day import EXAM, Picky, learner, picky_fixture  # noqa: F401
from tests.smtp_sink import SmtpServer
from tests.test_admin import CHROMIUM, CHROMIUM_ARGS, JSON_SYNAP

TOKEN = "admin-token-results-day-7Hq2"
BEARER = {"Authorization": f"Bearer {TOKEN}"}
DOCS = Path(__file__).resolve().parent.parent / "docs"
REFUSED = [b'"att_rd3"', b'"att_rd6"']  # the LMS refuses learners 3 and 6


@pytest.fixture
def settings(make_settings: Callable[..., Settings], picky: Picky, smtp: SmtpServer) -> Settings:
    picky.refuse.extend(REFUSED)
    return make_settings(
        [
            {"name": "lms", "type": "http", "url": picky.url, "timeout_seconds": 2, "max_attempts": 1},
            email_integration(smtp, "learner-email", timezone="Europe/London"),
            # a results database that is down: its deliveries wait for a retry
            {
                "name": "results-db",
                "type": "http",
                "url": "http://127.0.0.1:9/down",
                "timeout_seconds": 1,
                "backoff_base_seconds": 300,
                "backoff_max_seconds": 300,
                "when": {"passed": True},
            },
        ],
        admin_token=TOKEN,
    )


async def release(
    served: str,
    settings: Settings,
    start_worker: Callable[..., Awaitable[Any]],
    redis: Redis,
    picky: Picky,
    smtp: SmtpServer,
    sample_body: bytes,
) -> dict[str, str]:
    """A cohort of 8 (two of them failed the exam), and learner 0 re-marked after the first
    release was sent: an update. Waits until the worker did all it can now."""
    bodies = [learner(sample_body, n, passed=n not in (2, 5)) for n in range(8)]
    await start_worker(settings)
    ids: dict[str, str] = {}
    async with aiohttp.ClientSession() as session:
        for n, body in enumerate(bodies):
            async with session.post(served + WEBHOOK_PATH, data=body, headers=JSON_SYNAP) as response:
                assert response.status == 202
                ids[f"l{n}"] = (await response.json())["event_id"]
        keys = Keys(settings.redis.prefix)

        async def first_round() -> bool:
            return (
                len(smtp.handler.mails) >= 8 and picky.answered >= 8 and await redis.zcard(keys.failures) == 2
            )

        await eventually(first_round, timeout=20)
        remark = learner(sample_body, 0, released_at="2026-11-25T15:30:00Z", passed=False)
        async with session.post(served + WEBHOOK_PATH, data=remark, headers=JSON_SYNAP) as response:
            ids["l0-remark"] = (await response.json())["event_id"]

    async def settled() -> bool:
        due = await redis.zcount(keys.queue, "-inf", now_ms())
        return due == 0 and len(smtp.handler.mails) >= 9

    await eventually(settled, timeout=20)
    return ids


async def get(session: aiohttp.ClientSession, url: str, status: int = 200) -> tuple[str, Any]:
    async with session.get(url, headers=BEARER) as response:
        assert response.status == status, (url, response.status)
        return await response.text(), response.headers


async def test_exams_pages_over_http(
    served: str,
    settings: Settings,
    start_worker: Callable[..., Awaitable[Any]],
    redis: Redis,
    picky: Picky,
    smtp: SmtpServer,
    sample_body: bytes,
) -> None:
    """/admin/exams lists the exam with each integration's counts; its page lists every
    learner with failed and pending rows first and filters by state; its CSV has every event
    with a column per integration; both need the admin token; an unknown exam is a 404."""
    ids = await release(served, settings, start_worker, redis, picky, smtp, sample_body)
    async with aiohttp.ClientSession() as session:
        async with session.get(served + "/admin/exams", allow_redirects=False) as response:
            assert response.status == 303 and "/admin/login" in response.headers["Location"]
        page, headers = await get(session, served + "/admin/exams")
        assert headers["Cache-Control"] == "no-store"
        assert f'data-exam-id="{EXAM}"' in page
        row = page.split(f'data-exam-id="{EXAM}"', 1)[1].split("</tr>", 1)[0]
        for needle in ("7 delivered", "2 failed", "1 superseded", "9 delivered", "5 pending", "3 skipped"):
            assert needle in row, (needle, row)
        assert TOKEN not in page

        page, _ = await get(session, served + "/admin/exams/" + quote(EXAM))
        order = re.findall(r'data-event-id="([^"]+)"', page)
        assert len(order) == 9
        assert set(order[:2]) == {ids["l3"], ids["l6"]}, "failed rows first"
        assert "Learner Number3" in page and "learner3@example.org" in page
        failed_only, _ = await get(session, served + "/admin/exams/" + quote(EXAM) + "?state=failed")
        assert set(re.findall(r'data-event-id="([^"]+)"', failed_only)) == {ids["l3"], ids["l6"]}

        text, headers = await get(session, served + "/admin/exams/" + quote(EXAM) + "/csv")
        assert headers["Content-Type"].startswith("text/csv")
        assert "attachment" in headers["Content-Disposition"]
        table = list(csv.DictReader(io.StringIO(text)))
        assert len(table) == 9
        states = {r["event_id"]: (r["lms"], r["learner-email"], r["results-db"]) for r in table}
        assert states[ids["l3"]] == ("failed", "delivered", "pending")
        assert states[ids["l2"]] == ("delivered", "delivered", "skipped")
        assert states[ids["l0"]] == ("delivered", "delivered", "superseded")

        await get(session, served + "/admin/exams/exm_unknown", status=404)
        await get(session, served + "/admin/exams/" + quote(EXAM) + "?state=nope", status=400)


async def test_email_preview_page_over_http(
    served: str,
    settings: Settings,
    start_worker: Callable[..., Awaitable[Any]],
    redis: Redis,
    picky: Picky,
    smtp: SmtpServer,
    sample_body: bytes,
) -> None:
    """/admin/email-preview shows the sample message of the email integration (headers, text
    part; times in its timezone), a stored re-release as an update naming the earlier result,
    and frames the HTML part from a same-origin URL that only its own page may frame."""
    ids = await release(served, settings, start_worker, redis, picky, smtp, sample_body)
    async with aiohttp.ClientSession() as session:
        page, headers = await get(session, served + "/admin/email-preview")
        assert "frame-src 'self'" in headers["Content-Security-Policy"]
        assert "Congratulations, you passed Maths Final 2026" in page
        assert "23 November 2026 at 09:53 GMT" in page  # Europe/London in November
        assert "X-Examhook-Event-Id" in page
        page, _ = await get(session, served + f"/admin/email-preview?event={ids['l0-remark']}")
        assert "Your updated result for Maths Final 2026: Fail" in page
        assert "It replaces the result released on" in page and "(Pass, 62.5%)" in page
        frame, headers = await get(session, served + f"/admin/email-preview/html?event={ids['l0-remark']}")
        assert headers["X-Frame-Options"] == "SAMEORIGIN"
        assert "frame-ancestors 'self'" in headers["Content-Security-Policy"]
        assert "script-src" not in headers["Content-Security-Policy"]
        assert "<strong>updated</strong>" in frame
        await get(session, served + "/admin/email-preview?event=evt_unknown", status=404)
        await get(session, served + "/admin/email-preview?integration=lms", status=404)


async def test_pages_in_chromium_with_screenshots(
    served: str,
    settings: Settings,
    start_worker: Callable[..., Awaitable[Any]],
    redis: Redis,
    picky: Picky,
    smtp: SmtpServer,
    sample_body: bytes,
    tmp_path: Path,
) -> None:
    """In headless Chromium: log in, open Exams from the menu, see the exam's counts, open
    its learners (a failed learner on top), download the CSV, and preview the email of a
    re-release (the framed HTML part says "updated"); a screenshot of each page."""
    if shutil.which(CHROMIUM) is None:
        pytest.skip(f"{CHROMIUM} missing: install it with `apt-get update && apt-get install -y chromium`")
    try:
        from playwright.async_api import async_playwright, expect
    except ImportError:
        pytest.skip("playwright missing: `pip install -e '.[test]'` (the browser is Debian's chromium)")
    ids = await release(served, settings, start_worker, redis, picky, smtp, sample_body)
    shots = DOCS if os.environ.get("EXAMHOOK_SCREENSHOTS") == "docs" else tmp_path

    async with async_playwright() as playwright:
        browser = await playwright.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS)
        try:
            page = await browser.new_page(viewport={"width": 1280, "height": 860}, accept_downloads=True)
            await page.goto(served + "/admin")
            await page.get_by_label("Admin token").fill(TOKEN)
            await page.get_by_role("button", name="Log in").click()
            await page.get_by_role("link", name="Exams").click()
            await expect(page).to_have_url(served + "/admin/exams")
            row = page.locator(f'tr[data-exam-id="{EXAM}"]')
            await expect(row).to_contain_text("2 failed")
            await expect(row).to_contain_text("5 pending")
            await page.screenshot(path=str(shots / "admin-exams.png"), full_page=True)

            await row.get_by_role("link", name="Maths Final 2026").click()
            first = page.locator("tbody tr[data-event-id]").first
            await expect(first).to_contain_text("failed")
            await expect(page.locator(f'tr[data-event-id="{ids["l3"]}"]')).to_contain_text("Learner Number3")
            await page.screenshot(path=str(shots / "admin-exam.png"), full_page=True)
            async with page.expect_download() as download_info:
                await page.get_by_role("link", name=re.compile("Download CSV")).click()
            download = await download_info.value
            saved = tmp_path / "exam.csv"
            await download.save_as(saved)
            assert len(saved.read_text().splitlines()) == 10

            await page.get_by_role("link", name="Email preview").click()
            await page.get_by_label("or event id").fill(ids["l0-remark"])
            await page.get_by_role("button", name="Preview").click()
            await expect(
                page.get_by_text("Your updated result for Maths Final 2026: Fail").first
            ).to_be_visible()
            frame = page.frame_locator("iframe")
            await expect(frame.get_by_text("has been updated")).to_be_visible()
            await page.screenshot(path=str(shots / "admin-email-preview.png"), full_page=True)
            assert TOKEN not in await page.content()
        finally:
            await browser.close()
