"""qmlkit benchmark: enqueue, drain and latency on the built-in backends.

Prints, for ``memory://`` and a SQLite file: enqueue jobs/s one by one and in bulk
(1,000 per call), drain jobs/s of 10,000 no-op jobs with 1 and 8 worker threads, and the
enqueue-to-start latency (p50/p99) of an idle in-process worker. Each figure is the
median of ``--repeat`` runs. Huey, measured in the same run on the same kind of storage
(``bench/peers.py``; ``pip install huey``), gives the ratios; without Huey installed only
qmlkit's figures are printed.

    python bench/run.py [--repeat 3] [--jobs 10000]
"""

from __future__ import annotations

import argparse
import gc
import statistics
import tempfile
import threading
import time
from pathlib import Path

from qmlkit import App
from qmlkit.job import utcnow


def make_app(url: str) -> App:
    # Built-in backends need no plugins; PostgreSQL and Redis come from installed ones.
    app = App("bench", storage=url, autoload=not url.startswith(("memory", "sqlite")))

    @app.job(name="noop")
    def noop(i: int) -> None:
        return None

    return app


def bench_enqueue(url: str, n_single: int, n_bulk: int) -> tuple[float, float]:
    gc.collect()  # earlier measurements' garbage must not tax this one
    app = make_app(url)
    noop = app.registry["noop"]
    start = time.perf_counter()
    for i in range(n_single):
        noop.enqueue(i)
    single = n_single / (time.perf_counter() - start)
    start = time.perf_counter()
    for k in range(0, n_bulk, 1000):
        noop.enqueue_many([(i,) for i in range(k, min(k + 1000, n_bulk))])
    bulk = n_bulk / (time.perf_counter() - start)
    app.close()
    return single, bulk


def bench_drain(url: str, n: int, threads: int) -> float:
    gc.collect()  # earlier measurements' garbage must not tax this one
    app = make_app(url)
    noop = app.registry["noop"]
    for k in range(0, n, 1000):
        noop.enqueue_many([(i,) for i in range(k, min(k + 1000, n))])
    done = threading.Event()
    count = [0]
    lock = threading.Lock()

    class Counter:  # counts outcomes as the server stores them, without polling storage
        from qmlkit import hookimpl

        @hookimpl
        def qmlkit_job_state_changed(self, job, previous, current):
            if current.name == "Succeeded":
                with lock:
                    count[0] += 1
                    if count[0] == n:
                        done.set()

    app.plugin_manager.register(Counter())
    server = app.server(worker_count=threads, log_attempts=False, enable_cleanup=False,
                        polling_interval=0.05)
    start = time.perf_counter()
    server.start()
    if not done.wait(300):
        raise RuntimeError(f"drain did not finish: {count[0]} of {n}")
    elapsed = time.perf_counter() - start
    server.stop()
    app.close()
    return n / elapsed


def bench_latency(url: str, n: int = 200) -> tuple[float, float]:
    gc.collect()  # earlier measurements' garbage must not tax this one
    app = make_app(url)
    started: dict[str, float] = {}
    ready = threading.Event()

    @app.job(name="stamp")
    def stamp(key: str) -> None:
        started[key] = time.perf_counter()
        ready.set()

    server = app.server(worker_count=1, log_attempts=False, polling_interval=5.0)
    server.start()
    latencies = []
    for i in range(n):
        ready.clear()
        t0 = time.perf_counter()
        stamp.enqueue(str(i))
        if not ready.wait(10):
            raise RuntimeError("job did not start")
        latencies.append((started[str(i)] - t0) * 1000)
        time.sleep(0.02)  # an idle gap between jobs, as in the peer measurements
    server.stop()
    app.close()
    latencies.sort()
    return latencies[len(latencies) // 2], latencies[int(len(latencies) * 0.99) - 1]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeat", type=int, default=3)
    parser.add_argument("--jobs", type=int, default=10_000)
    args = parser.parse_args()
    try:
        import huey  # noqa: F401
        from peers import huey_drain, huey_enqueue
    except ImportError:
        huey_drain = huey_enqueue = None  # type: ignore[assignment]
    n, rep = args.jobs, args.repeat
    print(f"qmlkit bench, {time.strftime('%Y-%m-%d')} ({utcnow():%H:%M} UTC), "
          f"median of {rep}, {n} no-op jobs; peer: Huey in the same run")
    median = statistics.median
    with tempfile.TemporaryDirectory() as tmp:
        for name in ("memory", "sqlite"):
            def url(tag: str, _name: str = name) -> str:
                if _name == "memory":
                    return "memory://"
                return f"sqlite:///{Path(tmp) / f'{tag}-{time.perf_counter_ns()}.db'}"

            runs = [bench_enqueue(url("enq"), 2000, n) for _ in range(rep)]
            singles, bulks = zip(*runs, strict=True)
            rows = [
                ("enqueue one by one", median(singles),
                 huey_enqueue and median(huey_enqueue(name, 2000) for _ in range(rep))),
                ("enqueue bulk (1,000 per call)", median(bulks), None),
            ]
            for threads in (1, 8):
                ours = median(bench_drain(url("d"), n, threads) for _ in range(rep))
                theirs = huey_drain and median(huey_drain(name, n, threads) for _ in range(rep))
                rows.append((f"drain, {threads} thread{'s' if threads > 1 else ''}", ours, theirs))
            p50, p99 = bench_latency(url("lat"))
            print(f"\n{name:<32}{'qmlkit':>12}{'Huey':>12}{'ratio':>8}")
            for label, ours, theirs in rows:
                peer = f"{theirs:>12,.0f}{ours / theirs:>7.1f}x" if theirs else f"{'-':>12}{'':>8}"
                print(f"  {label:<30}{ours:>12,.0f}{peer}")
            print(f"  {'idle latency p50 / p99 (ms)':<30}{p50:>7.2f} / {p99:.2f}"
                  "   (in-process enqueue)")


if __name__ == "__main__":
    main()
