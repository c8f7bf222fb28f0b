"""Wake-ups versus polling: start latency of an idle worker, and idle storage load.

For each storage and wake-up transport (each storage at its defaults: SQLite with the
``filesystem://`` folder beside its file, qmlkit-redis over its own Redis, qmlkit-postgres
over ``LISTEN/NOTIFY``; and explicit brokers: SQLite with ``filesystem://``, ``redis://``
and ``amqp://``, Redis with ``redis://``, PostgreSQL with ``amqp://``, when those run on
127.0.0.1), prints:

* enqueue-to-start latency p50/p99 of an idle worker in its own process (as the peers
  in the project's reference figures were measured), the client in this one:
  polling interval 5 s with explicit wake-ups, the server's defaults (``qmlkit worker``'s:
  5 threads, 1 s polling, wake-ups ``auto``) for the default rows, versus 1 s polling
  without wake-ups;
* storage queries per second of an idle server with 8 worker threads, both modes;
* with ``--enqueue N``: one-by-one enqueue rate of a client without and with the default
  wake-ups (an idle listener in another process hearing them), alternating rounds.

    python bench/wakeups.py [--jobs 100] [--idle-seconds 10] [--enqueue 2000]

The polling-only baseline is measured on each storage kind. When Huey is installed
(``pip install -e '.[bench]'``), Huey 3 on the same Redis (a blocking pop: the fastest
start among the peers) is timed the same way in the same run, as the reference row.
"""

from __future__ import annotations

import argparse
import importlib.util
import os
import socket
import tempfile
import time
import uuid
from datetime import timedelta
from pathlib import Path
from typing import Any

from qmlkit import App
from qmlkit.testing import wait_until

COUNTED = ("claim", "claim_changes", "next_due_at", "promote_due", "list_recurring",
           "delete_expired", "heartbeat", "reclaim_dead_servers", "transition_many")


#: This run's own wake-up exchange on the shared brokers (inherited by the worker
#: processes through the environment; deleted from RabbitMQ at the end).
EXCHANGE = os.environ.setdefault("QMLKIT_BENCH_EXCHANGE", f"bench.wk.{uuid.uuid4().hex[:8]}")


def make_app(name: str, db: str, wakeup: str | None) -> App:
    """An app on ``db`` (plugins loaded for non-built-in storages)."""
    return App(name, storage=db, autoload=not db.startswith("sqlite"), wakeup_url=wakeup,
               wakeup_exchange=EXCHANGE)


def up(port: int) -> bool:
    try:
        socket.create_connection(("127.0.0.1", port), timeout=0.5).close()
        return True
    except OSError:
        return False


def serve(db: str, wakeup: str | None, poll_s: float) -> None:
    """The worker process of `latency`: one idle worker; prints each job's start time.

    Start times are CLOCK_MONOTONIC nanoseconds, which both processes share on one
    machine. Prints ``ready`` once the server (and its wake-up listener) is up.
    ``poll_s`` 0 runs the server at its defaults (what ``qmlkit worker APP`` runs:
    5 worker threads, 1 s polling, attempts logged).
    """
    import sys

    worker = make_app("w", db, wakeup)

    @worker.job(name="stamp")
    def stamp(i: int) -> None:
        now = time.clock_gettime_ns(time.CLOCK_MONOTONIC)
        sys.stdout.write(f"{i} {now}\n")
        sys.stdout.flush()

    server = (worker.server() if poll_s <= 0 else
              worker.server(worker_count=1, log_attempts=False,
                            polling_interval=timedelta(seconds=poll_s)))
    server.start()
    if server._listener is not None:
        wait_until(lambda: server._listener.connected.is_set(), timeout=15)
    if server._push is not None:  # qmlkit-redis's push_wakeups
        wait_until(server._push.connected.is_set, timeout=15)
    print("ready", flush=True)
    sys.stdin.read()  # until the parent closes the pipe
    server.stop()
    worker.close()


def huey_app(name: str) -> Any:
    """Huey on the shared Redis with its default blocking pop; tasks stamp their start."""
    import sys

    from huey import RedisHuey

    huey = RedisHuey(name, host="127.0.0.1", port=6379, blocking=True, utc=True)

    @huey.task(name="stamp")
    def stamp(i: int) -> None:
        now = time.clock_gettime_ns(time.CLOCK_MONOTONIC)
        sys.stdout.write(f"{i} {now}\n")
        sys.stdout.flush()

    return huey, stamp


def serve_huey(name: str) -> None:
    """The worker process of the Huey reference row: one consumer thread."""
    import logging
    import sys

    logging.getLogger("huey").setLevel(logging.WARNING)
    huey, _ = huey_app(name)
    consumer = huey.create_consumer(workers=1, worker_type="thread", periodic=False,
                                    check_worker_health=False)
    consumer.start()
    time.sleep(0.5)  # the consumer thread is in its blocking pop
    print("ready", flush=True)
    sys.stdin.read()
    consumer.stop(graceful=True)


def huey_latency(n: int) -> tuple[float, float]:
    """Huey's enqueue-to-start p50/p99 in ms on Redis, measured as `latency` measures."""
    name = f"qmlkit-bench-wk-huey-{uuid.uuid4().hex[:6]}"
    _, stamp = huey_app(name)
    try:
        return _timed(["--serve-huey", name], lambda i: stamp(i), n)
    finally:
        import redis

        client = redis.Redis(host="127.0.0.1", port=6379)
        keys = list(client.scan_iter(match=f"*{name}*", count=1000))
        if keys:
            client.delete(*keys)
        client.close()


def _timed(serve_args: list[str], enqueue: Any, n: int) -> tuple[float, float]:
    """Start a worker process (``bench/wakeups.py <serve_args>``), call ``enqueue(i)``
    ``n`` times 20 ms apart, and return the p50/p99 of enqueue-to-start in ms."""
    import subprocess
    import sys

    worker = subprocess.Popen([sys.executable, __file__, *serve_args],
                              stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    assert worker.stdin is not None and worker.stdout is not None
    samples = []
    try:
        if worker.stdout.readline().strip() != "ready":
            raise RuntimeError("the worker process did not start")
        for i in range(n):
            t0 = time.clock_gettime_ns(time.CLOCK_MONOTONIC)
            enqueue(i)
            index, stamp = worker.stdout.readline().split()
            if int(index) != i:
                raise RuntimeError(f"job {index} started, expected {i}")
            samples.append((int(stamp) - t0) / 1e6)
            time.sleep(0.02)
    finally:
        worker.stdin.close()
        worker.wait(30)
    samples.sort()
    return samples[len(samples) // 2], samples[max(0, int(len(samples) * 0.99) - 1)]


def latency(db: str, wakeup: str | None, poll_s: float, n: int) -> tuple[float, float]:
    """Enqueue-to-start latency p50/p99 in ms of an idle worker in another process.

    As the peers in the project's reference figures were measured: a warm idle
    worker process, jobs 20 ms apart, timed from just before the enqueue call to the
    job's start.
    """
    client = make_app("c", db, wakeup)
    if client.wakeup_url:  # connect the publisher before timing (a first send connects)
        client.notifier.wakeup_publisher().publish(["bench-warm-up"])
    try:
        return _timed(["--serve", db, wakeup or "", str(poll_s)],
                      lambda i: client.enqueue("stamp", args=[i]), n)
    finally:
        client.close()


def idle_queries(db: str, wakeup: str | None, poll_s: float, seconds: float) -> float:
    app = make_app("idle", db, wakeup)
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
    if server._listener is not None:
        wait_until(lambda: server._listener.connected.is_set(), timeout=15)
    if server._push is not None:  # qmlkit-redis's push_wakeups
        wait_until(server._push.connected.is_set, timeout=15)
    time.sleep(1.0)  # let start-up queries pass
    counts["n"] = 0
    time.sleep(seconds)
    rate = counts["n"] / seconds
    server.stop()
    app.close()
    return rate


def serve_listener(url: str, exchange: str) -> None:
    """The process of `enqueue_rate`'s wake-up side: one listener that hears and drops
    every wake-up (as an idle server's would), until stdin closes."""
    import sys

    from qmlkit.wakeup import WakeupListener

    listener = WakeupListener(url, lambda queue: None, exchange, name="bench")
    listener.start()
    listener.connected.wait(15)
    print("ready", flush=True)
    sys.stdin.read()
    listener.stop()


def enqueue_rate(db: str, wakeup: str | None, n: int) -> tuple[float, float]:
    """``n`` one-by-one enqueues of a client `App`: (enqueues/s, CPU µs per enqueue).

    With wake-ups, an idle listener in another process consumes them meanwhile (on
    ``filesystem://`` the publisher writes a file per listening queue)."""
    import subprocess
    import sys

    app = make_app("e", db, wakeup)
    app.enqueue("noop", args=[-1])  # open the storage (and the publisher) first
    if app.wakeup_url:  # its first message sent: the connection is made
        wait_until(lambda: app.notifier.publisher is not None and app.notifier.publisher.sent,
                   timeout=15)
    listener = None
    if app.wakeup_url:
        listener = subprocess.Popen(
            [sys.executable, __file__, "--serve-listener", app.wakeup_url, app.wakeup_exchange],
            stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
        assert listener.stdout is not None and listener.stdout.readline().strip() == "ready"
    try:
        t, c = time.perf_counter(), time.process_time()
        for i in range(n):
            app.enqueue("noop", args=[i])
        wall, cpu = time.perf_counter() - t, time.process_time() - c
    finally:
        app.close()
        if listener is not None:
            assert listener.stdin is not None
            listener.stdin.close()
            listener.wait(30)
    return n / wall, cpu / n * 1e6


def enqueue_costs(backends: list[tuple[str, Any]], n: int, rounds: int) -> None:
    """Print enqueue/s without and with the default wake-ups, alternating, per backend."""
    import statistics

    print(f"\none-by-one enqueue of {n} jobs, without / with default wake-ups, {rounds} "
          f"alternating rounds (medians; CPU µs per enqueue in the client process)")
    for kind, db in backends:
        off, on, off_cpu, on_cpu = [], [], [], []
        for _ in range(rounds):
            rate, cpu = enqueue_rate(db("enq-off"), None, n)
            off.append(rate)
            off_cpu.append(cpu)
            rate, cpu = enqueue_rate(db("enq-on"), "auto", n)
            on.append(rate)
            on_cpu.append(cpu)
        a, b = statistics.median(off), statistics.median(on)
        print(f"{kind:<12} off {a:8,.0f}/s ({statistics.median(off_cpu):5.0f} µs CPU)   "
              f"on {b:8,.0f}/s ({statistics.median(on_cpu):5.0f} µs CPU)   "
              f"cost {100 * (1 - b / a):+5.1f} %   rounds off {[round(x) for x in off]} "
              f"on {[round(x) for x in on]}")


def main() -> None:  # noqa: C901 - one table of rows, each measured the same way
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--jobs", type=int, default=100)
    parser.add_argument("--idle-seconds", type=float, default=10.0)
    parser.add_argument("--only", metavar="TEXT",
                        help="only the rows whose label contains TEXT, e.g. 'Redis +'")
    parser.add_argument("--enqueue", type=int, metavar="N", default=0,
                        help="also time N one-by-one enqueues with and without wake-ups")
    parser.add_argument("--rounds", type=int, default=3, help="rounds of --enqueue")
    parser.add_argument("--serve-huey", metavar="NAME", help=argparse.SUPPRESS)
    parser.add_argument("--serve-listener", nargs=2, help=argparse.SUPPRESS)
    parser.add_argument("--serve", nargs=3, metavar=("DB", "WAKEUP", "POLL_S"),
                        help="internal: run the worker process of the latency figure")
    args = parser.parse_args()
    if args.serve_huey:
        serve_huey(args.serve_huey)
        return
    if args.serve_listener:
        serve_listener(*args.serve_listener)
        return
    if args.serve:
        db, wakeup, poll_s = args.serve
        serve(db, wakeup or None, float(poll_s))
        return
    schemas: list[str] = []

    def pg(tag: str) -> str:
        schemas.append(f"bench_wk_{tag}_{uuid.uuid4().hex[:6]}".replace("-", "_"))
        return f"postgresql+psycopg://127.0.0.1:5432/test?schema={schemas[-1]}"

    prefixes: list[str] = []

    def redis_store(tag: str) -> str:
        prefixes.append(f"qmlkit-bench-wk:{tag}:{uuid.uuid4().hex[:6]}:")
        return f"redis://127.0.0.1:6379/0?prefix={prefixes[-1]}"

    with tempfile.TemporaryDirectory() as tmp:
        def sqlite(tag: str) -> str:
            return f"sqlite:///{Path(tmp) / f'{tag}-{time.perf_counter_ns()}.db'}"

        redis_ok = up(6379) and importlib.util.find_spec("qmlkit_redis") is not None
        pg_ok = up(5432) and importlib.util.find_spec("qmlkit_postgres") is not None
        # (storage, its URLs, label, wake-up URL, polling interval of the latency worker:
        # 0 = the server's defaults)
        rows: list[tuple[str, Any, str, str, float]] = [
            ("SQLite", sqlite, "defaults (filesystem:// beside the file)", "auto", 0.0),
            ("SQLite", sqlite, "filesystem://, poll 5 s", f"filesystem://{Path(tmp) / 'wk'}", 5.0)]
        if up(6379):
            rows.append(("SQLite", sqlite, "redis://, poll 5 s", "redis://127.0.0.1:6379/0", 5.0))
        if up(5672):
            rows.append(("SQLite", sqlite, "amqp://, poll 5 s",
                         "amqp://guest:guest@127.0.0.1:5672//", 5.0))
        if redis_ok:
            rows.append(("Redis", redis_store, "defaults (its own Redis)", "auto", 0.0))
            rows.append(("Redis", redis_store, "redis://, poll 5 s", "redis://127.0.0.1:6379/0",
                         5.0))
            rows.append(("Redis", lambda tag: redis_store(tag) + "&push_wakeups=1",
                         "push_wakeups=1, no kombu, poll 5 s", "", 5.0))
        if pg_ok:
            rows.append(("PostgreSQL", pg, "defaults (LISTEN/NOTIFY)", "auto", 0.0))
        if pg_ok and up(5672):
            rows.append(("PostgreSQL", pg, "amqp://, poll 5 s",
                         "amqp://guest:guest@127.0.0.1:5672//", 5.0))
        if args.only:
            rows = [r for r in rows if args.only in f"{r[0]} + {r[2]}"]
        print(f"qmlkit wake-up bench, {time.strftime('%Y-%m-%d %H:%M')}; {args.jobs} jobs with "
              f"wake-ups, {max(20, args.jobs // 5)} polling; idle load over "
              f"{args.idle_seconds:g} s; load average {os.getloadavg()[0]:.2f}")
        baselines: dict[str, float] = {}
        try:
            for kind, db, label, url, poll_s in rows:
                if kind not in baselines:
                    p50, p99 = latency(db("poll"), None, 1.0, max(20, args.jobs // 5))
                    baselines[kind] = idle_queries(db("idle-poll"), None, 1.0, args.idle_seconds)
                    print(f"\n{kind + ', polling only, 1 s':<52} latency p50 {p50:8.2f} ms  "
                          f"p99 {p99:8.2f} ms   idle queries {baselines[kind]:6.2f}/s")
                w50, w99 = latency(db("wk"), url or None, poll_s, args.jobs)
                q = idle_queries(db("idle-wk"), url or None, poll_s or 1.0, args.idle_seconds)
                print(f"{kind + ' + ' + label:<52} latency p50 {w50:8.2f} ms  "
                      f"p99 {w99:8.2f} ms   idle queries {q:6.2f}/s "
                      f"({q / baselines[kind]:.2f}x)")
                if kind == "Redis" and poll_s and importlib.util.find_spec("huey"):
                    h50, h99 = huey_latency(args.jobs)
                    print(f"{'Huey 3, Redis, blocking pop':<52} latency p50 {h50:8.2f} ms  "
                          f"p99 {h99:8.2f} ms   (qmlkit p50 {w50 / h50:.2f}x Huey's)")
            if args.enqueue:
                backends = [("SQLite", sqlite)] + ([("Redis", redis_store)] if redis_ok else [])
                enqueue_costs(backends + ([("PostgreSQL", pg)] if pg_ok else []), args.enqueue,
                              args.rounds)
            print(f"load average at the end {os.getloadavg()[0]:.2f}")
        finally:
            if up(5672):
                from kombu import Connection, Exchange

                with Connection("amqp://guest:guest@127.0.0.1:5672//") as conn:
                    Exchange(EXCHANGE, type="fanout").bind(conn.default_channel).delete()
            if prefixes:
                import redis

                client = redis.Redis(host="127.0.0.1", port=6379)
                for prefix in prefixes:
                    keys = list(client.scan_iter(match=f"{prefix}*", count=1000))
                    if keys:
                        client.delete(*keys)
                client.close()
            if schemas:
                import sqlalchemy as sa

                engine = sa.create_engine("postgresql+psycopg://127.0.0.1:5432/test")
                with engine.begin() as conn:
                    for name in schemas:
                        conn.execute(sa.text(f'DROP SCHEMA IF EXISTS "{name}" CASCADE'))
                engine.dispose()

if __name__ == "__main__":
    main()
