"""`Watchdog`: the thread that times out running attempts outlives every race with `done`."""

from __future__ import annotations

from qmlkit.processing.context import JobContext
from qmlkit.processing.watchdog import Watchdog
from qmlkit.testing import make_job, wait_until


def context() -> JobContext:
    return JobContext(job=make_job(), worker_id="w:0", server_name="s")


def test_an_attempt_ending_while_the_watchdog_times_out_others_does_not_kill_it() -> None:
    # Attempts A and B pass their deadline together; while the watchdog handles A (its
    # WARNING line, its task's cancel), B's attempt ends and its worker calls `done` (the
    # asyncio pool's loop thread, concurrently: seen with 500 attempts timing out at once).
    # A's callback calling `done(B)` makes that interleaving deterministic. The watchdog
    # must go on timing out later attempts.
    watchdog = Watchdog()
    try:
        a, b, later = context(), context(), context()
        with watchdog._cond:  # (its thread holds it while it checks): both due in one pass
            watchdog.watch(a, 0.0, lambda: watchdog.done(b))
            watchdog.watch(b, 0.0)  # after A in the dict
        wait_until(lambda: a.cancelled.is_set(), timeout=30)
        watchdog.watch(later, 0.01)
        wait_until(lambda: later.cancelled.is_set(), timeout=30)
        assert not b.timed_out  # its attempt ended before the watchdog reached it
    finally:
        watchdog.close()


def test_a_timeout_longer_than_a_thread_can_wait_does_not_kill_it() -> None:
    # A claimed job's ``timeout_s`` comes from the stored row: one written by hand (or
    # by another client) may be past `threading.TIMEOUT_MAX` (some 9.2e9 s): waiting
    # that long raised OverflowError on the watchdog's thread, and no timeout of the
    # server fired after it (seen with a row's timeout_s set to 1e12 on SQLite).
    watchdog = Watchdog()
    try:
        far, soon = context(), context()
        watchdog.watch(far, 1e12)
        wait_until(lambda: watchdog._next_wake < float("inf"), timeout=30)  # it waits
        watchdog.watch(soon, 0.01)
        wait_until(lambda: soon.cancelled.is_set(), timeout=30)
        assert not far.timed_out
    finally:
        watchdog.close()
