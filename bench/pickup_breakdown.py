"""Where an idle worker's enqueue-to-start latency goes, step by step (issue #16 item 5).

An idle ``App.server()`` at its defaults (the ``qmlkit worker`` defaults: 5 threads, 1 s
polling, wake-ups on) runs in a process of its own on qmlkit-redis; this process
enqueues one job every 20 ms and reads, on the one CLOCK_MONOTONIC clock both processes
share, when each step was reached, counted from just before the enqueue call:

* ``enqueue returned``: the enqueue call (the storage's script, then the hand-off of
  the wake-up to the publisher thread);
* ``publish began`` / ``publish ended``: the publisher thread's kombu publish;
* ``wake-up heard``: the worker's listener received it;
* ``job started``: the job's first line ran (the idle worker woke, claimed, began).

    python bench/pickup_breakdown.py [--jobs 200] [--threads 0] [--push]

``--threads N`` runs N worker threads without attempt logging instead of the defaults.
``--push`` runs the tuned setting instead of kombu wake-ups: ``push_wakeups=1`` on the
storage URL and ``wakeup_url=None`` on both sides (`qmlkit_redis.push`); the publish
steps are then part of the enqueue, and ``wake-up heard`` is the push listener's.
Prints the p50 of each step and the p50/p99 of the total. Keys live under a prefix of
the run's own, deleted at the end. A reading, not a test: no figure is asserted.
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import time
import uuid
from typing import Any

from qmlkit import App
from qmlkit.testing import wait_until

PREFIX = os.environ.setdefault("QMLKIT_BENCH_PREFIX", f"qmlkit-bench-pickup-{uuid.uuid4().hex[:6]}")
STORAGE = f"redis://127.0.0.1:6379/0?prefix={PREFIX}"
PUSH_STORAGE = STORAGE + "&push_wakeups=1"


def now_ns() -> int:
    return time.clock_gettime_ns(time.CLOCK_MONOTONIC)


def serve(threads: int, push: bool) -> None:
    """The worker process: prints ``<i> <job start ns> <last wake-up heard ns>``."""
    app = (App("pickup-worker", storage=PUSH_STORAGE, wakeup_url=None) if push
           else App("pickup-worker", storage=STORAGE))
    heard = [0]

    @app.job(name="stamp")
    def stamp(i: int) -> None:
        sys.stdout.write(f"{i} {now_ns()} {heard[0]}\n")
        sys.stdout.flush()

    server = app.server() if threads <= 0 else app.server(worker_count=threads,
                                                          log_attempts=False)
    server.start()
    listener: Any = server._push if push else server._listener
    wait_until(lambda: listener.connected.is_set(), timeout=15)
    original = listener._on_wakeup

    def on_wakeup(queue: str | None) -> None:
        heard[0] = now_ns()
        original(queue)

    listener._on_wakeup = on_wakeup
    print("ready", flush=True)
    sys.stdin.read()  # until the parent closes the pipe
    server.stop()
    app.close()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--jobs", type=int, default=200)
    parser.add_argument("--threads", type=int, default=0)
    parser.add_argument("--push", action="store_true")
    parser.add_argument("--serve", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.serve:
        serve(args.threads, args.push)
        return
    sends: list[tuple[int, int]] = []
    if args.push:
        client = App("pickup-client", storage=STORAGE, wakeup_url=None)
    else:
        client = App("pickup-client", storage=STORAGE)
        publisher: Any = client.notifier.wakeup_publisher()
        original = publisher._send

        def timed_send(queues: list[str]) -> None:
            began = now_ns()
            original(queues)
            sends.append((began, now_ns()))

        publisher._send = timed_send
    worker = subprocess.Popen([sys.executable, __file__, "--serve", "--threads",
                               str(args.threads), *(["--push"] if args.push else [])],
                              stdin=subprocess.PIPE,
                              stdout=subprocess.PIPE, text=True)
    assert worker.stdin is not None and worker.stdout is not None
    steps: dict[str, list[float]] = {k: [] for k in (
        "enqueue returned", "publish began", "publish ended", "wake-up heard", "job started")}
    try:
        if worker.stdout.readline().strip() != "ready":
            raise RuntimeError("the worker process did not start")
        for i in range(-1, args.jobs):  # job -1 warms both sides up, and is not counted
            t0 = now_ns()
            client.enqueue("stamp", args=[i])
            returned = now_ns()
            index, started, heard = (int(x) for x in worker.stdout.readline().split())
            if index != i:
                raise RuntimeError(f"job {index} started, expected {i}")
            if i >= 0:
                began, ended = sends[-1] if sends else (returned, returned)
                for name, at in zip(steps, (returned, began, ended, heard, started)):
                    steps[name].append((at - t0) / 1e6)
            time.sleep(0.02)
    finally:
        worker.stdin.close()
        worker.wait(30)
        client.close()
        import redis

        r = redis.Redis(host="127.0.0.1", port=6379)
        keys = list(r.scan_iter(match=f"{PREFIX}*", count=1000))
        if keys:
            r.delete(*keys)
        r.close()
    print(f"load average {os.getloadavg()[0]:.2f}; {args.jobs} jobs, "
          f"{'defaults' if args.threads <= 0 else f'{args.threads} threads'}"
          f"{', push_wakeups=1 and no kombu' if args.push else ''}")
    for name, samples in steps.items():
        if args.push and name.startswith("publish"):
            continue
        samples.sort()
        print(f"  {name:<18} p50 {samples[len(samples) // 2]:6.2f} ms")
    total = steps["job started"]
    print(f"  total              p99 {total[max(0, int(len(total) * 0.99) - 1)]:6.2f} ms")


if __name__ == "__main__":
    main()
