"""The 5 s stall of issue #16 item 7, without qmlkit: a lazily created shared redis-py client.

``--threads`` plain threads start together (a barrier) and each runs the peers harness's
job once: one pipelined round trip through a module-global ``redis.Redis`` created on first
use. Created without a lock (``--racy``, what ``../shared/bench/peers/common.py`` does),
several threads may each create a client; every client but the last one assigned loses its
last reference, and redis-py's ``Redis.__del__`` closes the client's own connection pool,
disconnecting the connections other threads are using at that moment (the capture shows
the client's FIN right after its ``HELLO 3``). The thread whose socket went away then
waits out redis-py 8's default ``socket_timeout`` (5 s) before its retry succeeds, or
fails outright. With the lock (the default), no run has a slow job.

Prints, per round of ``--runs``, each job over 1 s or failed, and the count of such rounds.
Redis on 127.0.0.1:6379, keys ``redis-client-race:*`` (deleted at the end).

    .venv/bin/python bench/redis_client_race.py --threads 8 --runs 60 --racy
    .venv/bin/python bench/redis_client_race.py --threads 8 --runs 60
"""

from __future__ import annotations

import argparse
import gc
import threading
import time

import redis

PREFIX = "redis-client-race:"
_client: redis.Redis | None = None
_lock = threading.Lock()


def shared_client(racy: bool) -> redis.Redis:
    """The module-global client, created on first use (under ``_lock`` unless ``racy``)."""
    global _client
    if _client is None:
        if racy:
            _client = redis.Redis(host="127.0.0.1", port=6379)
        else:
            with _lock:
                if _client is None:
                    _client = redis.Redis(host="127.0.0.1", port=6379)
    return _client


def job(barrier: threading.Barrier, racy: bool, out: list[float | str]) -> None:
    """The harness's job once, after every thread is ready: its duration (s) or error."""
    barrier.wait()
    start = time.time()
    pipe = shared_client(racy).pipeline(transaction=False)
    pipe.set(PREFIX + "first", start, nx=True)
    pipe.incr(PREFIX + "done")
    try:
        pipe.execute()
        out.append(time.time() - start)
    except Exception as exc:  # noqa: BLE001 - reported, as the measure
        out.append(repr(exc))


def main() -> None:
    """Run the rounds and print the slow or failed jobs."""
    global _client
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--threads", type=int, default=8)
    ap.add_argument("--runs", type=int, default=60)
    ap.add_argument("--racy", action="store_true", help="no lock around the creation")
    args = ap.parse_args()
    bad_rounds = 0
    for r in range(args.runs):
        _client = None
        gc.collect()
        barrier, out = threading.Barrier(args.threads), []  # type: ignore[var-annotated]
        threads = [threading.Thread(target=job, args=(barrier, args.racy, out))
                   for _ in range(args.threads)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        bad = [o for o in out if not isinstance(o, float) or o > 1.0]
        if bad:
            bad_rounds += 1
            print(f"round {r}: " + ", ".join(o if isinstance(o, str) else f"{o:.3f} s"
                                             for o in bad), flush=True)
    cleanup = redis.Redis(host="127.0.0.1", port=6379)
    cleanup.delete(PREFIX + "first", PREFIX + "done")
    print(f"{bad_rounds} of {args.runs} rounds of {args.threads} threads had a job over 1 s "
          f"or failing ({'no lock' if args.racy else 'created under a lock'})")


if __name__ == "__main__":
    main()
