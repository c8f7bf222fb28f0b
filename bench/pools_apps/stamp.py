"""The job every system runs in bench/pools.py: wait 100 ms, and count it, with no I/O.

Each job records its start and end in its worker process's memory (first start, last
end, count, the most jobs of that process between their start and their end at once, and
the process's CPU time, ``time.process_time()``, at the first start and the last end); a
daemon thread of that process writes them to Redis every 50 ms, as a hash
``BENCH_KEYS + "proc:<pid>"`` the driver sums over processes. So the figures measure how
a system runs 100 ms waits, not a client library's cost per call (redis-py's asyncio
client alone costs more per call than a thread pool's whole scheduling), and every system
pays the same few bytes per job.
"""

from __future__ import annotations

import asyncio
import os
import threading
import time

WAIT_S = 0.1  #: each job's wait, seconds
URL = os.environ.get("BENCH_REDIS", "redis://127.0.0.1:6379/0")
KEYS = os.environ.get("BENCH_KEYS", "bench-pools:stamps:")
FLUSH_S = 0.02

_lock = threading.Lock()
_state = {"first": float("inf"), "last": 0.0, "done": 0, "cpu_first": -1.0, "cpu_last": 0.0,
          "running": 0, "peak": 0}
_flusher: list[threading.Thread] = []


def _flush_forever() -> None:
    import redis

    client = redis.Redis.from_url(URL)
    key, written = f"{KEYS}proc:{os.getpid()}", -1
    while True:
        time.sleep(FLUSH_S)
        with _lock:
            state = dict(_state)
        if state["done"] != written:
            client.hset(key, mapping=state)
            written = state["done"]


def _start() -> float:
    with _lock:
        if _state["cpu_first"] < 0:
            _state["cpu_first"] = time.process_time()
        _state["running"] += 1
        _state["peak"] = max(_state["peak"], _state["running"])
    return time.time()


def _record(start: float, end: float) -> None:
    with _lock:
        _state["first"] = min(_state["first"], start)
        _state["last"] = max(_state["last"], end)
        _state["done"] += 1
        _state["running"] -= 1
        _state["cpu_last"] = time.process_time()
        if not _flusher:
            thread = threading.Thread(target=_flush_forever, name="bench-stamps", daemon=True)
            thread.start()
            _flusher.append(thread)


async def wait_and_stamp_async() -> None:
    """``await asyncio.sleep(0.1)``, then count it."""
    start = _start()
    await asyncio.sleep(WAIT_S)
    _record(start, time.time())


def wait_and_stamp_sync() -> None:
    """``time.sleep(0.1)``, then count it."""
    start = _start()
    time.sleep(WAIT_S)
    _record(start, time.time())
