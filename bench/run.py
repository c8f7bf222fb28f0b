"""qmlkit benchmark: enqueue, drain and latency on the built-in backends.

Prints, for ``memory://`` and a SQLite file: enqueue jobs/s one by one and in bulk
(1,000 per call), drain jobs/s of 10,000 no-op jobs with 1 and 8 worker threads, and the
enqueue-to-start latency (p50/p99) of an idle in-process worker. Each figure is the
median of ``--repeat`` runs. Ratios are against the figures other queues reached on this
kind of machine (shared/reference/peer-figures.md; not re-measured in this run).

    python bench/run.py [--repeat 3] [--jobs 10000]
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import threading
import time
from pathlib import Path

from qmlkit import App
from qmlkit.job import utcnow

#: Best drain and enqueue figures of other Python queues on this kind of machine (jobs/s),
#: from shared/reference/peer-figures.md (Huey 3.5 and RQ 3.0 on Redis).
PEER_DRAIN = ("Huey 1 thread", 1781)
PEER_BULK = ("RQ pipeline", 11854)
PEER_SINGLE = ("Huey", 6709)


def make_app(url: str) -> App:
    app = App("bench", storage=url, autoload=False)

    @app.job(name="noop")
    def noop(i: int) -> None:
        return None

    return app


def bench_enqueue(url: str, n_single: int, n_bulk: int) -> tuple[float, float]:
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
        def qmlkit_job_state_changed(self, job, previous, current):  # noqa: ANN001, ANN202
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
    print(f"qmlkit bench, {time.strftime('%Y-%m-%d')} ({utcnow():%H:%M} UTC), "
          f"median of {args.repeat}, {args.jobs} jobs")
    with tempfile.TemporaryDirectory() as tmp:
        for name in ("memory", "sqlite"):
            def url(tag: str, _name: str = name) -> str:
                if _name == "memory":
                    return "memory://"
                return f"sqlite:///{Path(tmp) / f'{tag}-{time.perf_counter_ns()}.db'}"

            singles, bulks = zip(*(bench_enqueue(url("enq"), 2000, args.jobs)
                                   for _ in range(args.repeat)))
            drain1 = [bench_drain(url("d1"), args.jobs, 1) for _ in range(args.repeat)]
            drain8 = [bench_drain(url("d8"), args.jobs, 8) for _ in range(args.repeat)]
            p50, p99 = bench_latency(url("lat"))
            single, bulk = statistics.median(singles), statistics.median(bulks)
            d1, d8 = statistics.median(drain1), statistics.median(drain8)
            print(f"\n{name}")
            print(f"  enqueue one by one  {single:>9,.0f} jobs/s  ({single / PEER_SINGLE[1]:.1f}x {PEER_SINGLE[0]})")
            print(f"  enqueue bulk (1000) {bulk:>9,.0f} jobs/s  ({bulk / PEER_BULK[1]:.1f}x {PEER_BULK[0]})")
            print(f"  drain, 1 thread     {d1:>9,.0f} jobs/s  ({d1 / PEER_DRAIN[1]:.1f}x {PEER_DRAIN[0]})")
            print(f"  drain, 8 threads    {d8:>9,.0f} jobs/s  ({d8 / PEER_DRAIN[1]:.1f}x {PEER_DRAIN[0]})")
            print(f"  latency, idle worker, in-process enqueue  p50 {p50:.2f} ms  p99 {p99:.2f} ms")


if __name__ == "__main__":
    main()
