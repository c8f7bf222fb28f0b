"""The same measurements for Huey, the peer that offers in-memory and SQLite storage too.

Huey 3 (``pip install huey``) is measured in the same run as qmlkit, on the same kind of
storage: ``MemoryHuey`` against ``memory://`` and ``SqliteHuey`` against a SQLite file.
Huey has no bulk enqueue; its bulk figure is a loop of single enqueues, as in
``shared/reference/peer-figures.md``.
"""

from __future__ import annotations

import gc
import logging
import tempfile
import threading
import time
from pathlib import Path
from typing import Any


def _huey(kind: str, tmp: str) -> Any:
    from huey import MemoryHuey, SqliteHuey

    if kind == "memory":
        return MemoryHuey("bench", utc=True)
    return SqliteHuey("bench", filename=str(Path(tmp) / f"huey-{time.perf_counter_ns()}.db"),
                      utc=True)


def huey_enqueue(kind: str, n: int) -> float:
    """Single enqueues per second into a fresh Huey of ``kind``."""
    gc.collect()
    with tempfile.TemporaryDirectory() as tmp:
        huey = _huey(kind, tmp)

        @huey.task()
        def noop(i: int) -> None:
            return None

        start = time.perf_counter()
        for i in range(n):
            noop(i)
        return n / (time.perf_counter() - start)


def huey_drain(kind: str, n: int, threads: int) -> float:
    """Jobs per second a Huey consumer with ``threads`` worker threads drains."""
    gc.collect()
    logging.getLogger("huey").setLevel(logging.WARNING)
    with tempfile.TemporaryDirectory() as tmp:
        huey = _huey(kind, tmp)
        count = [0]
        lock = threading.Lock()
        done = threading.Event()

        @huey.task()
        def noop(i: int) -> None:
            with lock:
                count[0] += 1
                if count[0] == n:
                    done.set()

        for i in range(n):
            noop(i)
        consumer = huey.create_consumer(workers=threads, worker_type="thread", periodic=False,
                                        initial_delay=0.001, backoff=1.15, max_delay=0.1,
                                        check_worker_health=False)
        start = time.perf_counter()
        consumer.start()
        finished = done.wait(600)
        elapsed = time.perf_counter() - start
        consumer.stop(graceful=True)
        if not finished:
            raise RuntimeError(f"huey drained only {count[0]} of {n}")
        return n / elapsed
