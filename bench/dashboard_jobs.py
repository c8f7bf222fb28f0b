"""Time the dashboard's jobs pages against a SQLite store of 100,000 jobs.

    python bench/dashboard_jobs.py [--jobs 100000] [--repeat 5] [--db /tmp/qmlkit-dash.db]

Fills the store once (90% Succeeded, 5% Failed, 5% Enqueued, over three queues and
three methods), then times, through the real ASGI application (FastAPI's test client,
no network), the HTML jobs page and ``/api/jobs`` for: the first page, a page in the
middle, the last page, a state filter, a queue filter and a method filter. Prints the
median and worst of ``--repeat`` runs in milliseconds. Record figures in
``docs/dashboard.md``.
"""

from __future__ import annotations

import argparse
import statistics
import time
from datetime import timedelta
from pathlib import Path

from fastapi.testclient import TestClient

from qmlkit.app import App
from qmlkit.dashboard import DashboardConfig, create_app
from qmlkit.job import Enqueued, Failed, Job, Succeeded, utcnow


def fill(app: App, total: int) -> None:
    """Store ``total`` jobs in batches of 5,000, in mixed states, queues and methods."""
    store = app.storage
    now = utcnow()
    batch: list[Job] = []
    for i in range(total):
        queue = ("default", "mail", "reports")[i % 3]
        method = ("shop.send", "shop.bill", "shop.report")[i % 3 - 1]
        created = now - timedelta(seconds=total - i)
        job = Job(method=method, queue=queue, args=[i], created_at=created,
                  state=Enqueued(enqueued_at=now, queue=queue))
        batch.append(job)
        if len(batch) == 5000:
            store.enqueue_many(batch)
            batch = []
    if batch:
        store.enqueue_many(batch)
    # Move 95% to terminal states the way workers would (claim, then fenced transition).
    from qmlkit.storage.base import Transition

    done = 0
    while done < total * 0.95:
        claimed = store.claim(worker_id="bench", server_name="bench", queues=(), limit=1000,
                              now=utcnow())
        if not claimed:
            break
        items = []
        for job in claimed:
            done += 1
            if done % 19 == 0:
                state = Failed(failed_at=utcnow(), exception_type="ValueError", message="bench")
            else:
                state = Succeeded(succeeded_at=utcnow(), duration_ms=1.0, result=done)
            items.append(Transition(job=job, state=state))
        store.transition_many(items)


def timed(client: TestClient, url: str, repeat: int) -> tuple[float, float]:
    """Return the median and worst time of ``repeat`` GETs of ``url``, in milliseconds.

    The dashboard's cached counts are dropped before each GET, so every one pays for
    its ``count_jobs`` as a first visit would.
    """
    times = []
    for _ in range(repeat):
        client.app.state.service.invalidate()  # type: ignore[attr-defined]
        start = time.perf_counter()
        response = client.get(url)
        times.append((time.perf_counter() - start) * 1000)
        response.raise_for_status()
    return statistics.median(times), max(times)


def main() -> None:
    """Fill (once) and time; see the module docstring."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--jobs", type=int, default=100_000)
    parser.add_argument("--repeat", type=int, default=5)
    parser.add_argument("--db", default="/tmp/qmlkit-dash-bench.db")
    args = parser.parse_args()
    app = App("bench", storage=f"sqlite:///{args.db}", autoload=False)
    if sum(app.storage.count_jobs().values()) != args.jobs:
        app.close()
        Path(args.db).unlink(missing_ok=True)
        app = App("bench", storage=f"sqlite:///{args.db}", autoload=False)
        start = time.perf_counter()
        fill(app, args.jobs)
        print(f"filled {args.jobs} jobs in {time.perf_counter() - start:.1f} s")
    print("counts:", dict(sorted(app.storage.count_jobs().items())))
    size = 50
    last = (args.jobs - 1) // size + 1
    cases = [
        ("first page", "state=&queue=&method=&page=1", "offset=0"),
        ("middle page", f"page={last // 2}", f"offset={(last // 2 - 1) * size}"),
        ("last page", f"page={last}", f"offset={(last - 1) * size}"),
        ("state=Failed", "state=Failed", "state=Failed"),
        ("state=Enqueued", "state=Enqueued", "state=Enqueued"),
        ("queue=mail", "queue=mail", "queue=mail"),
        ("method=shop.bill", "method=shop.bill", "method=shop.bill"),
        ("method=shop.bill, page 500", "method=shop.bill&page=500",
         f"method=shop.bill&offset={499 * size}"),
    ]
    with TestClient(create_app(app, DashboardConfig()), base_url="http://127.0.0.1") as client:
        print(f"{'case':32} {'/jobs median':>13} {'worst':>7} {'/api/jobs median':>17} "
              f"{'worst':>7}")
        for name, page_q, api_q in cases:
            pm, pw = timed(client, f"/jobs?{page_q}", args.repeat)
            am, aw = timed(client, f"/api/jobs?limit={size}&{api_q}", args.repeat)
            print(f"{name:32} {pm:10.1f} ms {pw:7.1f} {am:14.1f} ms {aw:7.1f}")
        om, ow = timed(client, "/", args.repeat)
        print(f"{'overview /':32} {om:10.1f} ms {ow:7.1f}")
    app.close()


if __name__ == "__main__":
    main()
