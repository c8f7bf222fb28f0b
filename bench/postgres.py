"""qmlkit-postgres benchmark, with procrastinate measured in the same run on the same server.

Prints enqueue jobs/s (one by one, and bulk: 1,000 per call), drain jobs/s of 10,000
no-op jobs by one worker process with 1 and 8 threads (procrastinate: ``concurrency``
1 and 8), the enqueue-to-start latency p50/p99 of an idle worker (qmlkit polling every
5 s with wake-ups over RabbitMQ when it is up, else polling every 0.05 s; procrastinate
with its LISTEN/NOTIFY), and qmlkit's drain again with 1,000,000 Succeeded rows in the
table, to show that the claim's cost does not grow with finished jobs. Each system works
in a schema of its own in database ``test`` on 127.0.0.1:5432, dropped afterwards.

    pip install -e plugins/qmlkit-postgres -e '.[bench]'
    python bench/postgres.py [--repeat 3] [--jobs 10000] [--history 1000000]
"""

from __future__ import annotations

import argparse
import asyncio
import logging
import socket
import statistics
import threading
import time
import uuid
from collections.abc import Iterator
from contextlib import contextmanager

import sqlalchemy as sa
from run import bench_drain, bench_enqueue, make_app

BASE = "postgresql+psycopg://127.0.0.1:5432/test"


@contextmanager
def schema(tag: str) -> Iterator[str]:
    """A fresh schema name, dropped on exit."""
    name = f"bench_{tag}_{uuid.uuid4().hex[:6]}"
    try:
        yield name
    finally:
        engine = sa.create_engine(BASE)
        with engine.begin() as conn:
            conn.execute(sa.text(f'DROP SCHEMA IF EXISTS "{name}" CASCADE'))
        engine.dispose()


def qmlkit_url(name: str) -> str:
    return f"{BASE}?schema={name}"


def rabbit_up() -> bool:
    try:
        socket.create_connection(("127.0.0.1", 5672), timeout=0.5).close()
        return True
    except OSError:
        return False


def qmlkit_latency(url: str, n: int = 200) -> tuple[float, float]:
    """p50/p99 ms from enqueue to start, idle worker, wake-ups over RabbitMQ if up."""
    wakeup = "amqp://guest:guest@127.0.0.1:5672//" if rabbit_up() else None
    from qmlkit import App

    app = App("bench", storage=url, wakeup_url=wakeup,
              wakeup_exchange=f"qmlkit.bench.{uuid.uuid4().hex[:6]}")
    started: dict[str, float] = {}
    ready = threading.Event()

    @app.job(name="stamp")
    def stamp(key: str) -> None:
        started[key] = time.perf_counter()
        ready.set()

    server = app.server(worker_count=1, log_attempts=False,
                        polling_interval=5.0 if wakeup else 0.05)
    server.start()
    if wakeup:
        deadline = time.monotonic() + 15
        while not server._listener.connected.is_set() and time.monotonic() < deadline:
            time.sleep(0.05)
    latencies = []
    for i in range(n):
        ready.clear()
        t0 = time.perf_counter()
        stamp.enqueue(str(i))
        if not ready.wait(10):
            raise RuntimeError("job did not start")
        latencies.append((started[str(i)] - t0) * 1000)
        time.sleep(0.02)
    server.stop()
    app.close()
    latencies.sort()
    return latencies[len(latencies) // 2], latencies[int(len(latencies) * 0.99) - 1]


def add_history(url: str, rows: int) -> None:
    """Insert ``rows`` Succeeded jobs (one INSERT … SELECT generate_series) and ANALYZE."""
    from qmlkit_postgres import PostgresStorage

    store = PostgresStorage(url)
    store.open()
    table = f'"{store.schema}".qmlkit_jobs'
    with store.engine.begin() as conn:
        conn.execute(sa.text(
            f"INSERT INTO {table} (id, method, queue, priority, state, attempts, retry_count, "
            "max_retries, created_at, payload, job_metadata, state_data) "
            "SELECT 'old-' || g, 'noop', 'default', 0, 'Succeeded', 1, 0, 3, "
            "now() - interval '1 day', :payload, '{}', :state FROM generate_series(1, :n) AS g"),
            {"n": rows, "payload": '{"args":[0],"kwargs":{}}',
             "state": '{"name":"Succeeded","succeeded_at":"2026-01-01T00:00:00Z",'
                      '"duration_ms":1.0,"result":null}'})
        conn.execute(sa.text(f"ANALYZE {table}"))
    store.close()


# --- procrastinate -------------------------------------------------------------------------


def _procrastinate(name: str):
    import procrastinate

    engine = sa.create_engine(BASE)
    with engine.begin() as conn:
        conn.execute(sa.text(f'CREATE SCHEMA "{name}"'))
    engine.dispose()
    conninfo = f"postgresql://127.0.0.1:5432/test?options=-csearch_path%3D{name}"
    app = procrastinate.App(connector=procrastinate.PsycopgConnector(conninfo=conninfo))
    started: dict[int, float] = {}
    ready = asyncio.Event()

    @app.task(name="noop")
    def noop(i: int) -> None:
        return None

    @app.task(name="stamp")
    async def stamp(i: int) -> None:
        started[i] = time.perf_counter()
        ready.set()

    return app, noop, stamp, started, ready


def procrastinate_figures(n: int, n_single: int) -> dict[str, float]:
    """Enqueue single/bulk, drain with concurrency 1 and 8, latency p50/p99."""
    out: dict[str, float] = {}
    for concurrency in (1, 8):
        with schema("pc") as name:
            app, noop, _, _, _ = _procrastinate(name)
            with app.open():
                app.schema_manager.apply_schema()
                if concurrency == 1:
                    t = time.perf_counter()
                    for i in range(n_single):
                        noop.defer(i=i)
                    out["single"] = n_single / (time.perf_counter() - t)
                    t = time.perf_counter()
                    for k in range(0, n - n_single, 1000):
                        noop.batch_defer(*({"i": i} for i in range(k, min(k + 1000, n - n_single))))
                    out["bulk"] = (n - n_single) / (time.perf_counter() - t)
                else:
                    for k in range(0, n, 1000):
                        noop.batch_defer(*({"i": i} for i in range(k, min(k + 1000, n))))
                total = n
                t = time.perf_counter()
                app.run_worker(concurrency=concurrency, wait=False, install_signal_handlers=False,
                               listen_notify=False)
                out[f"drain{concurrency}"] = total / (time.perf_counter() - t)
    with schema("pcl") as name:
        out["p50"], out["p99"] = asyncio.run(_procrastinate_latency(name))
    return out


async def _procrastinate_latency(name: str, n: int = 200) -> tuple[float, float]:
    """p50/p99 ms from defer to start of an idle procrastinate worker (LISTEN/NOTIFY)."""
    app, _, stamp, started, ready = _procrastinate(name)
    async with app.open_async():
        await app.schema_manager.apply_schema_async()
        worker = asyncio.ensure_future(app.run_worker_async(
            concurrency=1, wait=True, install_signal_handlers=False))
        await asyncio.sleep(2)  # let the worker start listening
        latencies = []
        for i in range(n):
            ready.clear()
            t0 = time.perf_counter()
            await stamp.defer_async(i=i)
            await asyncio.wait_for(ready.wait(), 10)
            latencies.append((started[i] - t0) * 1000)
            await asyncio.sleep(0.02)
        worker.cancel()
        try:
            await worker
        except BaseException:
            pass
    latencies.sort()
    return latencies[len(latencies) // 2], latencies[int(len(latencies) * 0.99) - 1]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeat", type=int, default=3)
    parser.add_argument("--jobs", type=int, default=10_000)
    parser.add_argument("--history", type=int, default=1_000_000)
    args = parser.parse_args()
    logging.basicConfig(level=logging.WARNING)
    logging.getLogger("procrastinate").setLevel(logging.ERROR)
    n, rep, median = args.jobs, args.repeat, statistics.median
    print(f"qmlkit-postgres bench, {time.strftime('%Y-%m-%d %H:%M')} UTC, median of {rep}, "
          f"{n} no-op jobs; peer: procrastinate in the same run, same PostgreSQL")

    def fresh(fn, *a):
        with schema("q") as name:
            return fn(qmlkit_url(name), *a)

    singles, bulks = zip(*(fresh(bench_enqueue, 2000, n) for _ in range(rep)), strict=False)
    drains = {t: median(fresh(bench_drain, n, t) for _ in range(rep)) for t in (1, 8)}
    p50, p99 = fresh(qmlkit_latency)
    peer = [procrastinate_figures(n, 2000) for _ in range(rep)]

    def theirs(key: str) -> float:
        return median(p[key] for p in peer)

    rows = [("enqueue one by one", median(singles), theirs("single")),
            ("enqueue bulk (1,000 per call)", median(bulks), theirs("bulk")),
            ("drain, 1 thread", drains[1], theirs("drain1")),
            ("drain, 8 threads", drains[8], theirs("drain8"))]
    print(f"\n{'':<34}{'qmlkit':>12}{'procrastinate':>15}{'ratio':>8}")
    for label, ours, other in rows:
        print(f"  {label:<32}{ours:>12,.0f}{other:>15,.0f}{ours / other:>7.1f}x")
    print(f"  {'idle latency p50 / p99 (ms)':<32}{p50:>6.2f} / {p99:<6.2f}"
          f"{theirs('p50'):>7.2f} / {theirs('p99'):.2f}")

    with schema("h") as name:
        url = qmlkit_url(name)
        make_app(url).close()  # migrate
        t = time.perf_counter()
        add_history(url, args.history)
        filled = time.perf_counter() - t
        with_history = {t: bench_drain(url, n, t) for t in (1, 8)}
    print(f"\n  with {args.history:,} Succeeded rows present (inserted in {filled:.0f} s):")
    for t in (1, 8):
        label = f"drain, {t} thread{'s' if t > 1 else ''}"
        print(f"  {label:<32}{with_history[t]:>12,.0f}"
              f"   ({with_history[t] / drains[t]:.2f}x of the empty-table figure)")


if __name__ == "__main__":
    main()
