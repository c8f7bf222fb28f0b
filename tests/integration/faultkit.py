"""Helpers shared by the fault tests that stop and kill real ``qmlkit worker`` processes
(test_zombie.py, test_pool_faults.py): is a process stopped, which processes descend
from a worker, and may a peer take every lock a reclaim needs now."""

from __future__ import annotations

import sqlite3
from collections.abc import Callable
from pathlib import Path

__all__ = ["descendants", "gone", "lock_free_probe", "stopped"]


def stopped(pid: int) -> bool:
    """Whether the process is stopped by a signal now (``T`` in ``/proc/PID/stat``)."""
    stat = Path(f"/proc/{pid}/stat").read_text()
    return stat.rpartition(")")[2].split()[0] == "T"


def gone(pid: int) -> bool:
    """Whether the process has exited (no such process, or a zombie not yet reaped)."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except (FileNotFoundError, ProcessLookupError):
        return True
    return stat.rpartition(")")[2].split()[0] in ("Z", "X")


def descendants(pid: int) -> set[int]:
    """Every live process below ``pid`` (children, their children...), from ``/proc``.

    A process pool's children descend from its worker through the forkserver, so they
    are grandchildren, not children, of the ``qmlkit worker`` process.
    """
    parent_of: dict[int, int] = {}
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rpartition(")")[2].split()
        except (FileNotFoundError, ProcessLookupError):
            continue  # exited while we looked
        parent_of[int(stat.parent.name)] = int(fields[1])
    found: set[int] = set()
    frontier = {pid}
    while frontier:
        frontier = {p for p, parent in parent_of.items() if parent in frontier} - found
        found |= frontier
    return found


def lock_free_probe(url: str) -> Callable[[], bool]:
    """Whether a writer can take every lock a reclaim needs now (a stopped process may
    hold one mid-transaction; then the test continues it and stops it again)."""
    if url.startswith("sqlite"):
        path = url.removeprefix("sqlite:///")

        def sqlite_free() -> bool:
            conn = sqlite3.connect(path, timeout=0.3)
            try:
                conn.execute("BEGIN IMMEDIATE")
                conn.rollback()
                return True
            except sqlite3.OperationalError:
                return False
            finally:
                conn.close()

        return sqlite_free
    if url.startswith("postgres"):
        import sqlalchemy as sa

        schema = url.partition("schema=")[2]

        def postgres_free() -> bool:
            engine = sa.create_engine("postgresql+psycopg://127.0.0.1:5432/test")
            try:
                with engine.connect() as conn, conn.begin() as tx:
                    conn.execute(sa.text("SET LOCAL lock_timeout = '300ms'"))
                    for table in ("qmlkit_jobs", "qmlkit_servers"):
                        conn.execute(sa.text(f'SELECT 1 FROM "{schema}".{table} '
                                             "WHERE true FOR UPDATE"))
                    tx.rollback()
                return True
            except sa.exc.OperationalError:
                return False
            finally:
                engine.dispose()

        return postgres_free
    return lambda: True  # Redis: scripts are atomic, a client holds no lock
