"""The dashboard as a person uses it: headless Chromium driven by Playwright.

The dashboard runs under uvicorn on a free loopback port against a SQLite file, a worker
(``app.server``) runs in this process, and the test enqueues jobs and watches the page.
Every wait is on the DOM with a deadline. Chromium is Debian's ``/usr/bin/chromium``
(``apt-get install chromium``); these tests skip without it, and fail under ``CI=true``.
"""

from __future__ import annotations

import http.server
import os
import threading
import time
from collections.abc import Callable, Iterator
from typing import Any

import pytest

from qmlkit import App
from qmlkit.processing.context import current_context
from qmlkit.testing import free_port, skip_or_fail, wait_until
from tests.dashboard.conftest import LiveDashboard, running

pytestmark = pytest.mark.browser

#: Debian's Chromium; Playwright never downloads a browser here.
CHROMIUM = "/usr/bin/chromium"
#: Launch arguments for a headless run as root in a container.
CHROMIUM_ARGS = ["--headless", "--no-sandbox", "--disable-gpu", "--no-first-run",
                 "--disable-background-networking"]
XSS = "<script>alert(1)</script><img src=x onerror=alert(2)>"
#: Deadline of a DOM wait, in milliseconds (generous: a loaded 2-core machine).
DEADLINE_MS = 15_000


def require_chromium() -> None:
    """Skip without Chromium or Playwright locally; fail under ``CI=true``."""
    problem = None
    if not os.path.exists(CHROMIUM):
        problem = f"{CHROMIUM} is missing: apt-get install -y chromium"
    else:
        try:
            import playwright.sync_api  # noqa: F401
        except ImportError:
            problem = "Playwright is missing: pip install -e '.[dev]'"
    if problem is None:
        return
    skip_or_fail(problem, "a missing browser fails the run")


@pytest.fixture(scope="module")
def browser() -> Iterator[Any]:
    """One headless Chromium for the module."""
    require_chromium()
    from playwright.sync_api import sync_playwright

    with sync_playwright() as playwright:
        chromium = playwright.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS)
        yield chromium
        chromium.close()


@pytest.fixture
def page(browser: Any) -> Iterator[Any]:
    """A fresh browser context and page; any ``alert``/``confirm`` dialog is recorded."""
    context = browser.new_context()
    tab = context.new_page()
    tab.dialogs = []
    tab.on("dialog", lambda dialog: (tab.dialogs.append(dialog.message), dialog.dismiss()))
    yield tab
    context.close()


def expect(locator: Any) -> Any:
    from playwright.sync_api import expect as pw_expect

    return pw_expect(locator)


def wait_live(page: Any) -> None:
    """Wait until the page's WebSocket is open."""
    expect(page.locator("#live")).to_have_text("live", timeout=DEADLINE_MS)


def test_counts_change_live_and_a_failed_job_is_retried_to_success(
        app: App, page: Any, serve_dashboard: Callable[..., LiveDashboard]) -> None:
    declined = {"order": 13}

    @app.job(name="shop.charge", max_retries=0)
    def charge(order: int) -> str:
        if order == declined["order"]:
            raise ValueError(f"card declined for order {order}")
        return f"charged {order}"

    dash = serve_dashboard(poll_interval_s=0.5)
    # Given the overview open in a browser
    page.goto(dash.url + "/")
    wait_live(page)
    enqueued = page.locator('[data-count-state="Enqueued"]')
    expect(enqueued).to_have_text("0")
    # When jobs are enqueued, the counts change on the page without a reload
    start = time.monotonic()
    for order in (12, 13, 14):
        charge.enqueue(order)
    expect(enqueued).to_have_text("3", timeout=DEADLINE_MS)
    print(f"browser: Enqueued count shown {1000 * (time.monotonic() - start):.0f} ms "
          "after the enqueue")
    expect(page.locator('td[data-count-queue="default"][data-state="Enqueued"]')).to_have_text("3")
    # and as a worker runs them, succeeded and failed counts follow
    with running(app, worker_count=2):
        expect(page.locator('[data-count-state="Succeeded"]')).to_have_text(
            "2", timeout=DEADLINE_MS)
        expect(page.locator('[data-count-state="Failed"]')).to_have_text("1", timeout=DEADLINE_MS)
        expect(enqueued).to_have_text("0")
        # When the failed job is opened from the overview, its error and traceback show
        page.click("a.count.state-Failed")
        expect(page.locator("#jobs tbody tr")).to_have_count(1)
        page.locator("#jobs tbody tr td.id a").click()
        expect(page.locator("#error-message")).to_have_text("card declined for order 13")
        expect(page.locator("#traceback")).to_contain_text("ValueError")
        expect(page.locator("#job-state")).to_have_text("Failed")
        # and it is retried after the cause is fixed, with a confirmation first
        declined["order"] = -1
        page.click('button[data-action="retry"]')
        expect(page.locator("#confirm")).to_be_visible()
        expect(page.locator("#confirm-text")).to_contain_text("Retry job")
        page.click("#confirm-ok")
        # Then the page shows it succeeded
        expect(page.locator("#job-state")).to_have_text("Succeeded", timeout=DEADLINE_MS)
        expect(page.locator("#result")).to_contain_text("charged 13")
    assert page.dialogs == []


def test_cancelling_the_confirmation_does_nothing(
        app: App, page: Any, serve_dashboard: Callable[..., LiveDashboard]) -> None:
    job_id = app.enqueue("later.job", delay=3600)
    dash = serve_dashboard()
    page.goto(f"{dash.url}/jobs/{job_id}")
    wait_live(page)
    page.click('button[data-action="delete"]')
    expect(page.locator("#confirm")).to_be_visible()
    page.click("#confirm-cancel")
    expect(page.locator("#confirm")).to_be_hidden()
    assert app.storage.get(job_id).state.name == "Scheduled"
    # Requeue, confirmed, runs it now
    page.click('button[data-action="requeue"]')
    page.click("#confirm-ok")
    expect(page.locator("#job-state")).to_have_text("Enqueued", timeout=DEADLINE_MS)
    assert app.storage.get(job_id).state.name == "Enqueued"


def test_job_rows_and_progress_bars_update_live(
        app: App, page: Any, serve_dashboard: Callable[..., LiveDashboard]) -> None:
    go_on = threading.Event()

    @app.job(name="etl.load")
    def load(rows: int) -> int:
        current_context().report_progress(0.3, f"row 30/{rows}")
        go_on.wait(20)
        return rows

    dash = serve_dashboard(poll_interval_s=0.3)
    page.goto(dash.url + "/jobs")
    wait_live(page)
    expect(page.locator("#jobs tbody tr.empty")).to_have_count(1)
    job_id = load.enqueue(100)
    row = page.locator(f'#jobs tbody tr[data-job-id="{job_id}"]')
    expect(row).to_have_count(1, timeout=DEADLINE_MS)
    with running(app, worker_count=1):
        expect(row.locator("progress")).to_have_attribute("value", "0.3", timeout=DEADLINE_MS)
        expect(row.locator(".pmsg")).to_have_text("row 30/100")
        expect(row.locator(".badge")).to_have_text("Processing")
        go_on.set()
        expect(row.locator(".badge")).to_have_text("Succeeded", timeout=DEADLINE_MS)


def test_markup_in_a_job_shows_as_text_and_never_runs_c14(
        app: App, page: Any, serve_dashboard: Callable[..., LiveDashboard]) -> None:
    @app.job(name="c14.xss", max_retries=0)
    def xss(text: str) -> None:
        current_context().report_progress(0.5, text)
        raise RuntimeError(text)

    dash = serve_dashboard(poll_interval_s=0.3)
    # Given the jobs list open, so the job's row arrives through the script
    response = page.goto(dash.url + "/jobs")
    csp = response.headers["content-security-policy"]
    assert "script-src 'self'" in csp and "unsafe-inline" not in csp
    wait_live(page)
    job_id = xss.enqueue(XSS)
    with running(app, worker_count=1):
        wait_until(lambda: app.storage.get(job_id).state.name == "Failed", timeout=15)
    row = page.locator(f'#jobs tbody tr[data-job-id="{job_id}"]')
    expect(row.locator(".detail")).to_have_text(f"RuntimeError: {XSS}", timeout=DEADLINE_MS)
    expect(row.locator(".pmsg")).to_have_text(XSS)
    # The server-rendered list and the detail page show the literal text too
    page.goto(dash.url + "/jobs?state=Failed")
    expect(page.locator("#jobs tbody tr .detail")).to_have_text(f"RuntimeError: {XSS}")
    page.goto(f"{dash.url}/jobs/{job_id}")
    expect(page.locator("#error-message")).to_have_text(XSS)
    expect(page.locator("#args")).to_contain_text(XSS.replace('"', '\\"'))
    expect(page.get_by_text("<script>alert(1)</script>").first).to_be_visible()
    # and nothing ran: no dialog, no injected element
    assert page.locator("img[src='x']").count() == 0
    assert page.locator("script").count() == 1
    assert page.dialogs == []


def test_token_is_required_and_the_login_page_lets_people_in_c15(
        app: App, browser: Any, page: Any, serve_dashboard: Callable[..., LiveDashboard]) -> None:
    job_id = app.enqueue("secure.job", delay=3600)
    dash = serve_dashboard(token="open-sesame")
    # Without the token: 401 and the login form
    response = page.goto(dash.url + "/jobs")
    assert response.status == 401
    page.fill("#token", "wrong")
    page.click("#login-submit")
    expect(page.locator("#login-error")).to_be_visible()
    page.fill("#token", "open-sesame")
    page.click("#login-submit")
    # With it: the page asked for, live
    expect(page).to_have_url(dash.url + "/jobs")
    wait_live(page)
    expect(page.locator(f'#jobs tbody tr[data-job-id="{job_id}"]')).to_have_count(1)
    # The API answers this session, and refuses a browser that has not logged in
    assert page.request.get(dash.url + "/api/stats").status == 200
    stranger = browser.new_context()
    try:
        assert stranger.request.get(dash.url + "/api/stats").status == 401
        assert stranger.request.post(f"{dash.url}/api/jobs/{job_id}/delete").status == 401
    finally:
        stranger.close()
    # Actions from the page work (session cookie + CSRF token)
    page.goto(f"{dash.url}/jobs/{job_id}")
    page.click('button[data-action="delete"]')
    page.click("#confirm-ok")
    expect(page.locator("#job-state")).to_have_text("Deleted", timeout=DEADLINE_MS)


def test_a_cross_site_post_is_refused_c15(
        app: App, page: Any, serve_dashboard: Callable[..., LiveDashboard],
        request: pytest.FixtureRequest) -> None:
    # Given a dashboard on loopback without a token, and a page of another origin open:
    # a site served from another loopback port (a public site would be stopped by
    # Chromium's local-network checks before reaching the dashboard at all)
    job_id = app.enqueue("target.job")
    dash = serve_dashboard()

    class Hostile(http.server.BaseHTTPRequestHandler):
        def do_GET(self) -> None:
            body = b"<!doctype html><title>hostile</title>"
            self.send_response(200)
            self.send_header("Content-Type", "text/html")
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, *args: Any) -> None:
            pass

    site = http.server.ThreadingHTTPServer(("127.0.0.1", free_port()), Hostile)
    threading.Thread(target=site.serve_forever, daemon=True).start()
    request.addfinalizer(site.server_close)
    request.addfinalizer(site.shutdown)
    page.goto(f"http://127.0.0.1:{site.server_address[1]}/")
    answers: list[int] = []
    page.on("response", lambda r: answers.append(r.status) if "/api/jobs/" in r.url else None)
    # When that page posts to the dashboard's action, as a hostile site would
    page.evaluate(
        """async (url) => {
             await fetch(url, {method: "POST", mode: "no-cors", credentials: "include"});
           }""",
        f"{dash.url}/api/jobs/{job_id}/delete")
    # Then the dashboard refuses it and the job is untouched
    wait_until(lambda: answers, timeout=10, message="the dashboard's answer")
    assert answers == [403]
    assert app.storage.get(job_id).state.name == "Enqueued"


def test_read_only_shows_no_actions(
        app: App, page: Any, serve_dashboard: Callable[..., LiveDashboard]) -> None:
    job_id = app.enqueue("ro.job", delay=60)
    app.schedule_recurring("ro-template", "*/5 * * * *", "ro.job")
    dash = serve_dashboard(read_only=True)
    page.goto(f"{dash.url}/jobs/{job_id}")
    expect(page.locator("#read-only")).to_be_visible()
    assert page.locator("button[data-action]").count() == 0
    page.goto(dash.url + "/recurring")
    expect(page.locator('tr[data-template-id="ro-template"]')).to_have_count(1)
    assert page.locator("button[data-action]").count() == 0
