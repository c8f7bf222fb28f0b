"""What heartbeats cost: storage queries per idle server per minute, by thread.

Starts one idle server with the defaults (``App.server()``: 5 worker threads polling
every 1 s, heartbeat every 5 s with a dead-server scan, scheduler 1 s, recurring 5 s,
cleanup 60 s, no wake-ups) on SQLite, Redis and PostgreSQL in turn, for ``--seconds``
each, and counts the storage queries made meanwhile, attributed to the thread that
made them (duty threads are named ``qmlkit-<duty>``, worker threads
``qmlkit-worker-<n>``):

- SQLite: every statement the ``sqlite3`` connection runs (its trace callback, set
  from a SQLAlchemy pool ``connect`` listener), without BEGIN/COMMIT/ROLLBACK/PRAGMA;
- PostgreSQL: every ``execute``/``executemany`` of the psycopg connections (a counting
  cursor class, set from the same listener): the database ``test`` here has no
  ``pg_stat_statements``, and the shared server's statistics would mix other clients';
- Redis: every round trip to the server (a command, a pipeline or a script call each
  count one), counted at ``redis.connection.Connection.send_packed_command``:
  ``INFO commandstats`` is server-wide and the Redis on loopback is shared.

Prints a table of queries per minute per idle server (heartbeat, polling, the other
duties) and the load average; asserts nothing.

    python bench/heartbeat_cost.py [--seconds 60] [--backends sqlite,redis,postgres]
"""

from __future__ import annotations

import argparse
import os
import tempfile
import threading
import time
import uuid
from collections import Counter
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import sqlalchemy as sa

from qmlkit import App

COUNTS: Counter[str] = Counter()
_LOCK = threading.Lock()
SKIPPED = ("BEGIN", "COMMIT", "ROLLBACK", "PRAGMA", "SAVEPOINT", "RELEASE")


def category() -> str:
    """The counting bucket of the current thread: heartbeat, polling or the duty."""
    name = threading.current_thread().name
    if name == "qmlkit-heartbeat":
        return "heartbeat"
    if name.startswith("qmlkit-worker-"):
        return "polling"
    return name.removeprefix("qmlkit-") if name.startswith("qmlkit-") else "other"


def count() -> None:
    with _LOCK:
        COUNTS[category()] += 1


def install_counters() -> None:
    """Count SQL statements per thread on every new DBAPI connection, and Redis round
    trips per thread."""
    import psycopg
    import redis.connection

    class CountingCursor(psycopg.Cursor):  # type: ignore[type-arg]
        def execute(self, *args: Any, **kwargs: Any) -> Any:
            count()
            return super().execute(*args, **kwargs)

        def executemany(self, *args: Any, **kwargs: Any) -> Any:
            count()
            return super().executemany(*args, **kwargs)

    def traced(statement: str) -> None:
        if not statement.lstrip().upper().startswith(SKIPPED):
            count()

    @sa.event.listens_for(sa.pool.Pool, "connect")
    def on_connect(dbapi_connection: Any, _record: Any) -> None:
        if isinstance(dbapi_connection, psycopg.Connection):
            dbapi_connection.cursor_factory = CountingCursor
        elif hasattr(dbapi_connection, "set_trace_callback"):
            dbapi_connection.set_trace_callback(traced)

    original = redis.connection.Connection.send_packed_command

    def send_packed_command(self: Any, *args: Any, **kwargs: Any) -> Any:
        count()
        return original(self, *args, **kwargs)

    redis.connection.Connection.send_packed_command = send_packed_command  # type: ignore[method-assign]


@contextmanager
def backend(name: str) -> Iterator[str]:
    """A fresh, isolated storage URL for ``name``, cleaned up afterwards."""
    tag = uuid.uuid4().hex[:8]
    if name == "sqlite":
        with tempfile.TemporaryDirectory() as folder:
            yield f"sqlite:///{folder}/hb.db"
        return
    if name == "redis":
        import redis

        prefix = f"bench-hb-{tag}:"
        try:
            yield f"redis://127.0.0.1:6379/0?prefix={prefix}"
        finally:
            client = redis.Redis(host="127.0.0.1", port=6379)
            keys = list(client.scan_iter(match=f"{prefix}*", count=1000))
            if keys:
                client.delete(*keys)
            client.close()
        return
    schema = f"bench_hb_{tag}"
    try:
        yield f"postgresql+psycopg://127.0.0.1:5432/test?schema={schema}"
    finally:
        engine = sa.create_engine("postgresql+psycopg://127.0.0.1:5432/test")
        with engine.begin() as conn:
            conn.execute(sa.text(f'DROP SCHEMA IF EXISTS "{schema}" CASCADE'))
        engine.dispose()


def measure(url: str, seconds: float) -> Counter[str]:
    """Queries by bucket made by one idle default server during ``seconds``."""
    app = App("heartbeat-cost", storage=url,
              autoload=not url.startswith(("memory", "sqlite")))
    server = app.server(log_attempts=False)
    server.start()
    try:
        time.sleep(1.0)  # let start-up queries (registration, first polls) pass
        with _LOCK:
            before = Counter(COUNTS)
        time.sleep(seconds)
        with _LOCK:
            after = Counter(COUNTS)
    finally:
        server.stop()
        app.close()
    return after - before


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seconds", type=float, default=60.0)
    parser.add_argument("--backends", default="sqlite,redis,postgres")
    args = parser.parse_args()
    install_counters()
    print(f"load average at start: {' '.join(f'{x:.2f}' for x in os.getloadavg())}")
    print(f"one idle server with the defaults, {args.seconds:.0f} s per backend; "
          "storage queries per minute")
    columns = ("heartbeat", "polling", "scheduler", "recurring", "cleanup", "other")
    print(f"{'backend':<10}" + "".join(f"{c:>11}" for c in columns) + f"{'total':>9}"
          + f"{'heartbeat share':>17}")
    for name in args.backends.split(","):
        with backend(name) as url:
            counted = measure(url, args.seconds)
        per_min = {k: v * 60.0 / args.seconds for k, v in counted.items()}
        others = sum(v for k, v in per_min.items() if k not in columns[:-1])
        row = [per_min.get(c, 0.0) for c in columns[:-1]] + [others]
        total = sum(row)
        share = per_min.get("heartbeat", 0.0) / total if total else 0.0
        print(f"{name:<10}" + "".join(f"{v:>11.1f}" for v in row) + f"{total:>9.1f}"
              + f"{share:>16.1%}")
    print(f"load average at end: {' '.join(f'{x:.2f}' for x in os.getloadavg())}")


if __name__ == "__main__":
    main()
