"""A dashboard with something to show: demo jobs, workers, recurring templates.

    python examples/dashboard_tour.py                 # serve on http://127.0.0.1:8080/
    python examples/dashboard_tour.py --screenshots docs/img/dashboard

Fills a fresh SQLite file with a small shop's jobs: receipts that succeed, charges of
which some fail (one with a traceback after reporting progress), a report that runs
for a while reporting progress, scheduled jobs and two recurring templates. Two servers
with heartbeats run them. The dashboard serves it all; with ``--screenshots DIR`` it
instead saves a PNG of each page (overview, jobs, a failed job with its traceback and
progress bar, a running job, recurring, servers) with headless Chromium
(``/usr/bin/chromium``, Playwright from the ``dev`` extra) and exits.

Needs ``pip install 'qmlkit-core[dashboard]'``.
"""

from __future__ import annotations

import argparse
import tempfile
import threading
import time
from datetime import timedelta
from pathlib import Path

import uvicorn

from qmlkit import App
from qmlkit.dashboard import DashboardConfig, create_app
from qmlkit.dashboard.web import websocket_protocol
from qmlkit.processing.context import current_context
from qmlkit.testing import free_port, wait_until

CHROMIUM = "/usr/bin/chromium"
CHROMIUM_ARGS = ["--headless", "--no-sandbox", "--disable-gpu", "--no-first-run",
                 "--disable-background-networking"]


def build_app(db: Path, hold: threading.Event) -> App:
    """The demo shop: its jobs, registered on an app over ``db``."""
    app = App("shop", storage=f"sqlite:///{db}")

    @app.job(name="shop.send_receipt", queue="mail")
    def send_receipt(order_id: int, email: str) -> str:
        return f"receipt {order_id} sent to {email}"

    @app.job(name="shop.charge_card", max_retries=0)
    def charge_card(order_id: int, amount_cents: int) -> dict[str, object]:
        ctx = current_context()
        ctx.report_progress(0.6, "3-D Secure passed, capturing")
        if order_id % 7 == 0:
            raise ValueError(f"card declined for order {order_id}: insufficient funds")
        return {"order": order_id, "captured": amount_cents}

    @app.job(name="reports.monthly_sales", queue="reports")
    def monthly_sales(month: str) -> int:
        ctx = current_context()
        for step in range(1, 4):
            ctx.report_progress(step / 10, f"{month}: aggregating shop {step} of 10")
        hold.wait(600)
        return 10

    return app


def seed(app: App) -> None:
    """Enqueue the demo jobs and templates."""
    for order in range(1, 29):
        app.enqueue("shop.send_receipt", args=[order, f"customer{order}@example.com"])
        app.enqueue("shop.charge_card", args=[order, 1999 + order * 100])
    app.enqueue("reports.monthly_sales", args=["2026-10"])
    app.enqueue("shop.send_receipt", args=[99, "late@example.com"], delay=3600)
    app.enqueue("shop.charge_card", args=[100, 4500], delay=timedelta(minutes=20))
    app.schedule_recurring("nightly-sales", "0 2 * * *", "reports.monthly_sales",
                           args=["yesterday"], timezone="Europe/Paris")
    app.schedule_recurring("abandoned-carts", "*/15 * * * *", "shop.send_receipt",
                           args=[0, "carts@example.com"])


def screenshots(base: str, app: App, folder: Path) -> list[Path]:
    """Save a full-page PNG of each dashboard page into ``folder``; return the paths."""
    from playwright.sync_api import expect, sync_playwright

    folder.mkdir(parents=True, exist_ok=True)
    failed = app.storage.list_jobs(state="Failed", limit=1)[0]
    running = app.storage.list_jobs(state="Processing", method="reports.monthly_sales",
                                    limit=1)[0]
    pages = [("overview", "/"), ("jobs", "/jobs"), ("job-failed", f"/jobs/{failed.id}"),
             ("job-processing", f"/jobs/{running.id}"), ("recurring", "/recurring"),
             ("servers", "/servers")]
    saved = []
    with sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS)
        page = browser.new_page(viewport={"width": 1280, "height": 860})
        for name, path in pages:
            page.goto(base + path)
            expect(page.locator("#live")).to_have_text("live", timeout=15_000)
            if name == "overview":
                page.wait_for_function("document.querySelector('#throughput').complete")
            target = folder / f"{name}.png"
            page.screenshot(path=str(target), full_page=name != "jobs")
            saved.append(target)
        browser.close()
    return saved


def main() -> None:
    """Seed, run two servers and the dashboard; serve or take screenshots."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--port", type=int, default=8080)
    parser.add_argument("--screenshots", type=Path, default=None, metavar="DIR")
    args = parser.parse_args()
    hold = threading.Event()
    with tempfile.TemporaryDirectory() as tmp:
        app = build_app(Path(tmp) / "shop.db", hold)
        seed(app)
        fast = {"polling_interval": timedelta(milliseconds=100), "enable_heartbeat": True,
                "heartbeat_interval": timedelta(seconds=2), "log_attempts": False}
        servers = [app.server(server_name="web-1", worker_count=4, queues=("default", "mail"),
                              **fast),
                   app.server(server_name="reports-1", worker_count=2, queues=("reports",),
                              **fast)]
        for server in servers:
            server.start()
        wait_until(lambda: app.storage.count_jobs().get(("default", "Enqueued"), 0) == 0
                   and app.storage.count_jobs().get(("mail", "Enqueued"), 0) == 0, timeout=60)
        port = args.port if args.screenshots is None else free_port()
        asgi = create_app(app, DashboardConfig(port=port, throughput_minutes=30))
        server = uvicorn.Server(uvicorn.Config(asgi, host="127.0.0.1", port=port,
                                               log_level="warning", ws=websocket_protocol()))
        thread = threading.Thread(target=server.run, daemon=True)
        thread.start()
        wait_until(lambda: server.started, timeout=15)
        base = f"http://127.0.0.1:{port}"
        try:
            if args.screenshots is not None:
                for path in screenshots(base, app, args.screenshots):
                    print(f"saved {path}")
            else:
                print(f"dashboard on {base}/ (Ctrl-C to stop)")
                while thread.is_alive():
                    time.sleep(0.5)
        except KeyboardInterrupt:
            pass
        finally:
            hold.set()
            server.should_exit = True
            thread.join(10)
            for worker in servers:
                worker.stop()
            app.close()


if __name__ == "__main__":
    main()
