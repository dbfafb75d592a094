"""The dashboard in a real browser (Chromium, driven by Playwright) against a real gateway."""

from __future__ import annotations

import contextlib
import os
import shutil
from collections.abc import AsyncIterator

import pytest
import redis.asyncio as aioredis
from playwright.async_api import Page, async_playwright, expect

from service.settings import Settings
from tests.conftest import Gateway
from tests.procs import Proc, env_with

#: Chromium's own names, then the place a user may name another Chromium-based browser.
_BROWSERS = ("chromium", "chromium-browser", "google-chrome", "google-chrome-stable")

expect.set_options(timeout=20_000)  # a busy 2-core CI machine renders slowly


def chromium() -> str:
    """The browser: ``COREFLEET_TEST_CHROMIUM``, else one on the PATH. CI installs Debian's
    (``.ci/run``); elsewhere a missing browser skips these tests, saying how to get one."""
    for name in (os.environ.get("COREFLEET_TEST_CHROMIUM"), *_BROWSERS):
        found = shutil.which(name) if name else None
        if found:
            return found
    reason = "no Chromium found: install it (Debian: apt-get install chromium)"
    if os.environ.get("CI"):
        pytest.fail(reason + "; CI must provide one")
    pytest.skip(reason)


@pytest.fixture
def problems() -> list[str]:
    """What the page's console said of errors and warnings; a test takes out those it
    caused on purpose, and the rest fail it."""
    return []


@contextlib.asynccontextmanager
async def browser_page(problems: list[str]) -> AsyncIterator[Page]:
    """A page in a fresh Chromium, its console errors and warnings going to ``problems``."""
    async with async_playwright() as playwright:
        # --no-sandbox: CI runs as root, where Chromium's sandbox refuses to start.
        browser = await playwright.chromium.launch(
            executable_path=chromium(), args=["--no-sandbox"]
        )
        try:
            page = await browser.new_page()
            page.on("pageerror", lambda exc: problems.append(f"page error: {exc}"))
            page.on(
                "console",
                lambda msg: problems.append(msg.text) if msg.type in ("error", "warning") else None,
            )
            yield page
            assert problems == []  # no script error, no failed request, no CSP refusal
        finally:
            await browser.close()


@pytest.fixture
async def page(gateway: Gateway, problems: list[str]) -> AsyncIterator[Page]:
    """The dashboard, open and live (its event stream connected), in a fresh browser."""
    async with browser_page(problems) as page:
        await page.goto(f"{gateway.url}/dashboard")
        await expect(page.locator("#live")).to_have_text("live")
        yield page


async def test_jobs_appear_and_finish_on_the_page_as_they_happen(
    gateway: Gateway, page: Page
) -> None:
    """A job submitted while the page is open appears and ends there without a reload;
    engines and queues are shown; a click shows the whole record."""
    job = await gateway.submit("io.echo", {"hello": "dashboard"})
    jobs = page.locator("#jobs tbody tr")
    line = page.locator(f'#jobs tbody tr[data-id="{job["id"]}"]')
    await expect(line).to_have_attribute("data-state", "succeeded")
    await expect(line.locator("td.task")).to_have_text("io.echo")
    await expect(page.locator('#engines tbody tr[data-engine="asyncio"]')).to_have_count(1)
    await gateway.submit("io.echo", "later", delay_s=3600)
    await expect(page.locator("#delayed")).to_have_text("1")  # pushed: a new job was announced
    await line.click()
    await expect(page.locator("#detail-id")).to_have_text(job["id"])
    await expect(page.locator("#record")).to_contain_text('"hello": "dashboard"')
    await expect(page.locator("#cancel")).to_be_disabled()  # a finished job stays finished

    second = await gateway.submit("io.echo", 2)
    await expect(jobs.first).to_have_attribute("data-id", second["id"])  # newest first
    await expect(jobs).to_have_count(3)


async def test_workers_coming_show_without_any_job_event(
    gateway: Gateway, page: Page, settings: Settings
) -> None:
    """A worker that starts (no job event says so) shows in the engines and queues table
    within its re-read, every 10 s."""
    bulk = page.locator("#engines tbody tr", has_text="bulk")
    await expect(bulk).to_have_count(0)
    worker = Proc(
        ["io-worker"], env_with(COREFLEET_REDIS_URL=settings.redis, COREFLEET_IO_QUEUES="bulk")
    )
    try:
        await expect(bulk).to_have_count(1, timeout=30_000)
    finally:
        worker.stop()


async def test_older_jobs_are_shown_page_by_page(gateway: Gateway, page: Page) -> None:
    """The newest 50 jobs first; "Show older" adds the next 50, and the page keeps them
    through the reloads that later events cause; a new filter starts from 50 again."""
    status, batch = await gateway.call(
        "POST",
        "/v1/jobs/batch",
        json={"jobs": [{"task": "io.echo", "args": [i]} for i in range(55)]},
    )
    assert status == 202
    oldest, newest = batch["jobs"][0]["id"], batch["jobs"][-1]["id"]
    for job in batch["jobs"]:
        await gateway.wait(job["id"])
    jobs = page.locator("#jobs tbody tr")
    older = page.locator("#older")
    await expect(jobs).to_have_count(50)
    await expect(jobs.first).to_have_attribute("data-id", newest)
    await expect(older).to_be_visible()
    await older.click()
    await expect(jobs).to_have_count(55)
    await expect(jobs.last).to_have_attribute("data-id", oldest)
    await expect(older).to_be_hidden()  # nothing older is left

    later = await gateway.submit("io.echo", "later")
    await expect(jobs.first).to_have_attribute("data-id", later["id"])
    await expect(jobs).to_have_count(56)  # the older ones stay shown
    await page.select_option("#state-filter", "succeeded")
    await expect(jobs).to_have_count(50)
    await expect(older).to_be_visible()


async def test_submit_watch_progress_and_cancel_from_the_page(
    gateway: Gateway, page: Page, redis: aioredis.Redis
) -> None:
    """The form submits through the API (with the priority chosen); the row shows the
    task's progress as it is reported; Cancel ends the job cancelled, in the page and in
    the API."""
    await expect(page.locator("#task option[value='test.io_progress']")).to_have_count(1)
    await page.select_option("#task", "test.io_progress")
    await page.fill("#args", '["from the page"]')
    await page.select_option("#priority", "high")
    await page.click("#submit")
    result = page.locator("#submit-result")
    await expect(result).to_contain_text("accepted ")
    job_id = await result.get_attribute("data-id")
    assert job_id
    line = page.locator(f'#jobs tbody tr[data-id="{job_id}"]')
    await expect(line).to_have_attribute("data-state", "running")
    await redis.rpush(f"test:go:{job_id}", 1)
    await expect(line.locator(".progress-message")).to_have_text(" 50% from the page")
    await line.click()
    await expect(page.locator("#cancel")).to_be_enabled()
    await page.click("#cancel")
    await expect(line).to_have_attribute("data-state", "cancelled")
    await expect(page.locator("#cancel-result")).to_have_text(f"{job_id} cancelled")
    status, job = await gateway.call("GET", f"/v1/jobs/{job_id}")
    assert status == 200 and job["state"] == "cancelled"
    assert job["options"] == {"priority": "high"}


async def test_bad_input_in_the_form_is_reported_and_stores_nothing(
    gateway: Gateway, page: Page, problems: list[str]
) -> None:
    result = page.locator("#submit-result")
    await page.select_option("#task", "io.sleep")
    await page.fill("#args", "[1, 2")
    await page.click("#submit")
    await expect(result).to_have_class("error")
    await expect(result).to_contain_text("JSON")
    await page.fill("#args", '["long"]')
    await page.click("#submit")
    await expect(result).to_contain_text("400 invalid_arguments")
    problems.remove(
        "Failed to load resource: the server responded with a status of 400 (Bad Request)"
    )
    status, listing = await gateway.call("GET", "/v1/jobs")
    assert status == 200 and listing["jobs"] == []


async def test_the_page_and_its_files_are_served_with_a_strict_policy(gateway: Gateway) -> None:
    async with gateway.session.get(f"{gateway.url}/dashboard") as response:
        assert response.status == 200
        assert response.headers["Content-Type"].startswith("text/html")
        assert "default-src 'self'" in response.headers["Content-Security-Policy"]
        assert "/dashboard/app.js" in await response.text()
    async with gateway.session.get(f"{gateway.url}/dashboard/app.js") as response:
        assert response.status == 200
        assert response.headers["Content-Type"].startswith("text/javascript")
    status, body = await gateway.call("GET", "/dashboard/secrets.txt")
    assert status == 404 and body["error"]["code"] == "not_found"
    status, body = await gateway.call("GET", "/dashboard/dashboard.html")
    assert status == 404
