"""qmlkit app for bench/stalls.py: ``qmlkit worker stalls_app:app --threads N``.

The job is the peers harness's (``../shared/bench/peers/common.py`` ``record()``): one
pipelined Redis round trip through a lazily created module-global client shared by the
worker threads, created under a lock. ``STALLS_RACY_CLIENT=1`` creates it without the lock,
as the harness does: threads that start their first job together may each create a client,
and the ones overwritten are finalized (redis-py's ``Redis.__del__`` closes the client's
own pool, connections in use by other threads included), which is the 5 s stall of issue
#16 item 7 (redis-py 8's default ``socket_timeout`` of 5 s, then its retry). Each attempt
also appends one line to ``STALLS_OUT`` (one ``os.write`` on an ``O_APPEND`` descriptor,
atomic for a short line): the worker id, the claim's stamp
(``Processing.started_at``, read before the claim's storage call), the attempt's start and
its end (``time.time()``, seconds).
"""

from __future__ import annotations

import os
import sys
import threading
import time

import redis

from qmlkit import App, current_context

app = App("bench-stalls", storage=os.environ.get("STALLS_STORAGE", "memory://"))

_out = os.open(os.environ.get("STALLS_OUT", os.devnull), os.O_WRONLY | os.O_APPEND | os.O_CREAT)
_client: redis.Redis | None = None
_client_lock = threading.Lock()
_RACY = os.environ.get("STALLS_RACY_CLIENT") == "1"


def _new_client() -> redis.Redis:
    return redis.Redis(host="127.0.0.1", port=int(os.environ.get("STALLS_REDIS_PORT", "6379")),
                       db=int(os.environ.get("STALLS_REDIS_DB", "0")))


def _redis() -> redis.Redis:
    global _client
    if _client is None:
        if _RACY:  # as the harness does: a client another thread overwrites is finalized
            _client = _new_client()
        else:
            with _client_lock:
                if _client is None:
                    _client = _new_client()
    return _client


@app.job(name="bench.stalls.record")
def record() -> None:
    """The harness's job, stamped: claim, start and end of this attempt."""
    start = time.time()
    state = current_context().job.state
    prefix = os.environ.get("STALLS_PREFIX", "stalls:")
    p = _redis().pipeline(transaction=False)
    p.set(prefix + "first", start, nx=True)
    p.set(prefix + "last", start)
    p.incr(prefix + "done")
    p.execute()
    end = time.time()
    claimed = state.started_at.timestamp()  # type: ignore[attr-defined]  # Processing
    os.write(_out, f"{state.worker_id} {claimed:.6f} {start:.6f} {end:.6f}\n".encode())  # type: ignore[attr-defined]


def enqueue(n: int) -> None:
    """Enqueue ``n`` jobs in chunks of 1,000 (`JobFunction.enqueue_many`)."""
    for first in range(0, n, 1000):
        record.enqueue_many([() for _ in range(min(1000, n - first))])
    app.close()


if __name__ == "__main__":
    enqueue(int(sys.argv[1]))
