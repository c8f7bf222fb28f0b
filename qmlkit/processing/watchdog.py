"""The timeout watchdog: one thread that cancels attempts past their deadline."""

from __future__ import annotations

import threading
import time

from qmlkit.processing.context import JobContext

__all__ = ["Watchdog"]


class Watchdog:
    """One thread that sets ``context.cancelled`` on running attempts past their deadline.

    Workers register an attempt with `watch` and remove it with `done`, both O(1); the
    thread sleeps until the earliest deadline among the (at most ``worker_count``)
    running attempts, and is woken only when a new deadline is earlier. A timed-out
    context gets ``timed_out = True`` before ``cancelled`` is set. The thread starts on
    construction and ends after `close`.
    """

    def __init__(self) -> None:
        self._running: dict[int, tuple[float, JobContext]] = {}
        self._cond = threading.Condition()
        self._next_wake = float("inf")
        self._closed = False
        self._thread = threading.Thread(target=self._run, name="qmlkit-watchdog", daemon=True)
        self._thread.start()

    def watch(self, context: JobContext, timeout_s: float) -> None:
        """Cancel ``context`` once ``timeout_s`` seconds (monotonic) have passed from now."""
        deadline = time.monotonic() + timeout_s
        # Single dict operations are atomic under the GIL; the lock is needed only to
        # wake the thread for a deadline earlier than the one it sleeps towards.
        self._running[id(context)] = (deadline, context)
        if deadline < self._next_wake:
            with self._cond:
                self._cond.notify()

    def done(self, context: JobContext) -> None:
        """Stop watching ``context`` (its attempt ended); a no-op if not watched."""
        self._running.pop(id(context), None)

    def _run(self) -> None:
        with self._cond:
            while not self._closed:
                now = time.monotonic()
                for key, (deadline, ctx) in list(self._running.items()):
                    if deadline <= now:
                        del self._running[key]
                        ctx.timed_out = True
                        ctx.cancelled.set()
                self._next_wake = min((d for d, _ in self._running.values()), default=float("inf"))
                wait = (None if self._next_wake == float("inf")
                        else max(self._next_wake - now, 0.001))
                self._cond.wait(wait)

    def close(self) -> None:
        """End the thread (it cancels nothing more). Idempotent."""
        with self._cond:
            self._closed = True
            self._cond.notify()
