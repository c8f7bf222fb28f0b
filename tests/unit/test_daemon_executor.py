"""The asyncio pool's executor of def jobs (qmlkit.processing.pools.executor.DaemonExecutor):
bounded daemon threads, started as work comes, that never keep the process alive."""

from __future__ import annotations

import threading

import pytest

from qmlkit.processing.pools.executor import DaemonExecutor


def test_it_runs_everything_on_at_most_size_daemon_threads() -> None:
    executor = DaemonExecutor(3, name="t-sync")
    seen: set[threading.Thread] = set()
    lock, gate = threading.Lock(), threading.Event()

    def work(i: int) -> int:
        with lock:
            seen.add(threading.current_thread())
        gate.wait(30)
        return i * 2

    futures = [executor.submit(work, i) for i in range(10)]
    gate.set()
    assert [f.result(timeout=30) for f in futures] == [i * 2 for i in range(10)]
    assert 1 <= len(seen) <= 3
    assert all(t.daemon and t.name.startswith("t-sync-") for t in seen)
    executor.shutdown()


def test_an_idle_thread_is_reused_rather_than_a_new_one_started() -> None:
    executor = DaemonExecutor(8, name="t-reuse")
    names = [executor.submit(lambda: threading.current_thread().name).result(timeout=30)
             for _ in range(5)]
    assert len(set(names)) == 1  # one at a time: the same thread each time
    executor.shutdown()


def test_a_failure_reaches_the_future_and_the_thread_goes_on() -> None:
    executor = DaemonExecutor(1, name="t-fail")

    def boom() -> None:
        raise ValueError("bad")

    with pytest.raises(ValueError, match="bad"):
        executor.submit(boom).result(timeout=30)
    assert executor.submit(lambda x, y=1: x + y, 2, y=3).result(timeout=30) == 5
    executor.shutdown()


def test_shutdown_cancels_what_has_not_started_and_refuses_more() -> None:
    executor = DaemonExecutor(1, name="t-shut")
    gate, started = threading.Event(), threading.Event()

    def block() -> str:
        started.set()
        gate.wait(30)
        return "ran"

    running = executor.submit(block)
    assert started.wait(30)
    queued = executor.submit(lambda: "never")
    executor.shutdown(wait=False, cancel_futures=True)
    assert queued.cancelled()
    with pytest.raises(RuntimeError, match="after shutdown"):
        executor.submit(lambda: None)
    gate.set()
    assert running.result(timeout=30) == "ran"  # what had started finishes
