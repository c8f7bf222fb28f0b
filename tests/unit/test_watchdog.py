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
