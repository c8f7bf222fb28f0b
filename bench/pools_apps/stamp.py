"""The job every system runs in bench/pools.py, and counts: by default a 100 ms wait.

``BENCH_JOB`` chooses the job:

- ``wait`` (default): wait 100 ms (``await asyncio.sleep`` or ``time.sleep``), no I/O;
- ``mixed`` (issue #16 item 6): one PostgreSQL ``INSERT`` (autocommit, into the run's
  table ``BENCH_MIXED_TABLE`` at ``BENCH_PG_DSN``) and one Redis ``INCR`` (at
  ``BENCH_REDIS``). ``def`` jobs use psycopg 3 with one connection per worker thread
  (``threading.local``) and one redis-py client shared by the threads; ``async def`` jobs
  use a per-process stack of ``psycopg.AsyncConnection`` (one per concurrent job at most)
  and one ``redis.asyncio`` client.

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
JOB = os.environ.get("BENCH_JOB", "wait")
PG_DSN = os.environ.get("BENCH_PG_DSN", "postgresql://127.0.0.1:5432/test")
MIXED_TABLE = os.environ.get("BENCH_MIXED_TABLE", "bench_mixed")
MIXED_SQL = f"INSERT INTO {MIXED_TABLE} (at) VALUES (%s)"
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


_local = threading.local()
_sync_redis: list = []
_async_redis: list = []
_async_pg: list = []  # idle psycopg.AsyncConnection objects of this process


def _mixed_sync(start: float) -> None:
    import psycopg
    import redis

    conn = getattr(_local, "pg", None)
    if conn is None:
        conn = _local.pg = psycopg.connect(PG_DSN, autocommit=True)
    if not _sync_redis:
        with _lock:  # created once (see docs/pools.md: a client shared by the threads)
            if not _sync_redis:
                _sync_redis.append(redis.Redis.from_url(URL))
    conn.execute(MIXED_SQL, (start,))
    _sync_redis[0].incr(KEYS + "mixed")


async def _mixed_async(start: float) -> None:
    import psycopg
    import redis.asyncio

    conn = _async_pg.pop() if _async_pg else await psycopg.AsyncConnection.connect(
        PG_DSN, autocommit=True)
    try:
        await conn.execute(MIXED_SQL, (start,))
    finally:
        _async_pg.append(conn)
    if not _async_redis:
        _async_redis.append(redis.asyncio.Redis.from_url(URL))
    await _async_redis[0].incr(KEYS + "mixed")


async def wait_and_stamp_async() -> None:
    """Run the chosen job (``BENCH_JOB``) in its ``async`` form, then count it."""
    start = _start()
    if JOB == "mixed":
        await _mixed_async(start)
    else:
        await asyncio.sleep(WAIT_S)
    _record(start, time.time())


def wait_and_stamp_sync() -> None:
    """Run the chosen job (``BENCH_JOB``) in its ``def`` form, then count it."""
    start = _start()
    if JOB == "mixed":
        _mixed_sync(start)
    else:
        time.sleep(WAIT_S)
    _record(start, time.time())
