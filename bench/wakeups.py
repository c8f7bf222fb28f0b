"""Wake-ups versus polling: start latency of an idle worker, and idle storage load.

For each wake-up transport given (default: SQLite storage with ``filesystem://``, and
SQLite with ``redis://`` and ``amqp://`` when those brokers run on 127.0.0.1), prints:

* enqueue-to-start latency p50/p99 of an idle worker, the client being another ``App``
  (as another process would be): polling interval 5 s with wake-ups, versus the default
  1 s polling without;
* storage queries per second of an idle server with 8 worker threads, both modes.

    python bench/wakeups.py [--jobs 100] [--idle-seconds 10]
"""

from __future__ import annotations

import argparse
import socket
import tempfile
import threading
import time
from datetime import timedelta
from pathlib import Path
from typing import Any

from qmlkit import App
from qmlkit.testing import wait_until

COUNTED = ("claim", "claim_changes", "next_due_at", "promote_due", "list_recurring",
           "delete_expired", "heartbeat", "reclaim_dead_servers", "transition_many")


def up(port: int) -> bool:
    try:
        socket.create_connection(("127.0.0.1", port), timeout=0.5).close()
        return True
    except OSError:
        return False


def latency(db: str, wakeup: str | None, poll_s: float, n: int) -> tuple[float, float]:
    worker = App("w", storage=db, autoload=False, wakeup_url=wakeup, wakeup_exchange="bench.wk")
    started: dict[int, float] = {}
    done = threading.Event()

    @worker.job(name="stamp")
    def stamp(i: int) -> None:
        started[i] = time.perf_counter()
        done.set()

    server = worker.server(worker_count=1, log_attempts=False,
                           polling_interval=timedelta(seconds=poll_s))
    client = App("c", storage=db, autoload=False, wakeup_url=wakeup, wakeup_exchange="bench.wk")
    server.start()
    if wakeup:
        wait_until(lambda: server._listener.connected.is_set(), timeout=15)
    samples = []
    for i in range(n):
        done.clear()
        t0 = time.perf_counter()
        client.enqueue("stamp", args=[i])
        if not done.wait(poll_s * 2 + 5):
            raise RuntimeError("job did not start")
        samples.append((started[i] - t0) * 1000)
        time.sleep(0.02)
    server.stop()
    client.close()
    worker.close()
    samples.sort()
    return samples[len(samples) // 2], samples[max(0, int(len(samples) * 0.99) - 1)]


def idle_queries(db: str, wakeup: str | None, poll_s: float, seconds: float) -> float:
    app = App("idle", storage=db, autoload=False, wakeup_url=wakeup, wakeup_exchange="bench.wk")
    store: Any = app.storage
    counts = {"n": 0}
    for name in COUNTED:
        original = getattr(store, name)

        def counted(*a: Any, _f: Any = original, **k: Any) -> Any:
            counts["n"] += 1
            return _f(*a, **k)

        setattr(store, name, counted)
    server = app.server(worker_count=8, log_attempts=False,
                        polling_interval=timedelta(seconds=poll_s))
    server.start()
    if wakeup:
        wait_until(lambda: server._listener.connected.is_set(), timeout=15)
    time.sleep(1.0)  # let start-up queries pass
    counts["n"] = 0
    time.sleep(seconds)
    rate = counts["n"] / seconds
    server.stop()
    app.close()
    return rate


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--jobs", type=int, default=100)
    parser.add_argument("--idle-seconds", type=float, default=10.0)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        transports = [("SQLite + filesystem://", f"filesystem://{Path(tmp) / 'wk'}")]
        if up(6379):
            transports.append(("SQLite + redis://", "redis://127.0.0.1:6379/0"))
        if up(5672):
            transports.append(("SQLite + amqp://", "amqp://guest:guest@127.0.0.1:5672//"))
        print(f"qmlkit wake-up bench, {time.strftime('%Y-%m-%d')}; {args.jobs} jobs with "
              f"wake-ups, {max(20, args.jobs // 5)} polling; idle load over {args.idle_seconds:g} s")
        db = lambda tag: f"sqlite:///{Path(tmp) / f'{tag}-{time.perf_counter_ns()}.db'}"  # noqa: E731
        p50, p99 = latency(db("poll"), None, 1.0, max(20, args.jobs // 5))
        base_q = idle_queries(db("idle-poll"), None, 1.0, args.idle_seconds)
        print(f"\n{'polling only, 1 s':<28} latency p50 {p50:8.2f} ms  p99 {p99:8.2f} ms"
              f"   idle queries {base_q:6.2f}/s")
        for label, url in transports:
            w50, w99 = latency(db("wk"), url, 5.0, args.jobs)
            q = idle_queries(db("idle-wk"), url, 5.0, args.idle_seconds)
            print(f"{label + ', poll 5 s':<28} latency p50 {w50:8.2f} ms  p99 {w99:8.2f} ms"
                  f"   idle queries {q:6.2f}/s ({q / base_q:.2f}x)")


if __name__ == "__main__":
    main()
