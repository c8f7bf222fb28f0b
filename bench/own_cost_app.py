"""The app of ``bench/own_cost.py``: ``qmlkit worker own_cost_app:app`` (run from ``bench/``).

Environment (set by ``own_cost.py``):

- ``BENCH_OWN_STORAGE``: the storage URL;
- ``BENCH_OWN_JOB``: ``harness`` (the shared harness's job: one pipelined Redis round trip,
  ``SET first NX``, ``SET last``, ``INCR done``) or ``noop`` (nothing);
- ``BENCH_OWN_REDIS`` and ``BENCH_OWN_KEYS``: where the job's keys and the worker's
  counts go.

Either job also counts itself in the worker's memory: the number done and the wall clock
at the first and the latest start. A daemon thread writes those to the hash
``BENCH_OWN_KEYS + "proc:<pid>"`` (one per worker process, named in the set
``BENCH_OWN_KEYS + "procs"``) every 20 ms, with the process's CPU time
(``time.process_time()``: every thread's user + system time) read then, and the count and
CPU time of its first write after the first job. So the driver reads the drain's CPU per
job with the worker's start-up left out, and neither job reads the process's CPU clock
(with a dozen threads, one read costs the kernel several µs: as much as the job).
"""

from __future__ import annotations

import os
import threading
import time

import redis

from qmlkit import App

STORAGE = os.environ.get("BENCH_OWN_STORAGE", "memory://")
JOB = os.environ.get("BENCH_OWN_JOB", "harness")
REDIS_URL = os.environ.get("BENCH_OWN_REDIS", "redis://127.0.0.1:6379/0")
KEYS = os.environ.get("BENCH_OWN_KEYS", "bench-own:")

app = App("bench-own", storage=STORAGE, wakeup_url=None)

_client = redis.Redis.from_url(REDIS_URL)
_lock = threading.Lock()
_state = {"done": 0, "t_first": 0.0, "t_last": 0.0}
_flusher: list[threading.Thread] = []


def harness_round_trip(client: redis.Redis, keys: str) -> None:
    """The shared harness's job (``../shared/bench/peers/common.py``, ``record``): one
    pipelined round trip stamping this start."""
    now = time.time()
    pipe = client.pipeline(transaction=False)
    pipe.set(keys + "first", now, nx=True)
    pipe.set(keys + "last", now)
    pipe.incr(keys + "done")
    pipe.execute()


def _flush_forever() -> None:
    key, written, first = f"{KEYS}proc:{os.getpid()}", -1, {}
    while True:
        time.sleep(0.02)
        cpu = time.process_time()
        with _lock:
            state = dict(_state)
        if not first:
            first = {"done_first": state["done"], "cpu_first": cpu}
            _client.sadd(KEYS + "procs", key)  # the driver reads these keys, never scans
        if state["done"] != written:
            _client.hset(key, mapping={**state, **first, "cpu": cpu})
            written = int(state["done"])


def _count() -> None:
    now = time.time()
    with _lock:
        if not _state["done"]:
            _state["t_first"] = now
        _state["t_last"] = now
        _state["done"] += 1
        if not _flusher:
            thread = threading.Thread(target=_flush_forever, name="bench-own", daemon=True)
            thread.start()
            _flusher.append(thread)


@app.job(name="bench.own")
def own() -> None:
    _count()
    if JOB == "harness":
        harness_round_trip(_client, KEYS)
