"""The timeout watchdog: one thread that cancels attempts past their deadline."""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable

from qmlkit.processing.context import JobContext

__all__ = ["Watchdog"]

log = logging.getLogger("qmlkit.processing.server")

#: Longest single wait of the thread, in seconds (a day, far below ``TIMEOUT_MAX``).
_LONGEST_WAIT_S = 86400.0


class Watchdog:
    """One thread that sets ``context.cancelled`` on running attempts past their deadline.

    Workers register an attempt with `watch` and remove it with `done`, both O(1); the
    thread sleeps until the earliest deadline among the (at most ``worker_count``)
    running attempts, and is woken only when a new deadline is earlier. A timed-out
    context gets ``timed_out = True`` before ``cancelled`` is set, then its ``on_timeout``
    callback (if any) is called on the watchdog's thread. The thread starts on
    construction and ends after `close`.
    """

    def __init__(self) -> None:
        self._running: dict[int, tuple[float, JobContext, Callable[[], None] | None, float]] = {}
        self._cond = threading.Condition()
        self._next_wake = float("inf")
        self._closed = False
        self._thread = threading.Thread(target=self._run, name="qmlkit-watchdog", daemon=True)
        self._thread.start()

    def watch(self, context: JobContext, timeout_s: float,
              on_timeout: Callable[[], None] | None = None) -> None:
        """Cancel ``context`` once ``timeout_s`` seconds (monotonic) have passed from now.

        Args:
            context: The running attempt's context.
            timeout_s: Its limit, in seconds from now.
            on_timeout: Called (no arguments, on the watchdog's thread) right after
                ``context.cancelled`` is set: the asyncio pool cancels the attempt's task
                with it. It must not block; an exception it raises is logged.
        """
        deadline = time.monotonic() + timeout_s
        # Single dict operations are atomic under the GIL; the lock is needed only to
        # wake the thread for a deadline earlier than the one it sleeps towards.
        self._running[id(context)] = (deadline, context, on_timeout, timeout_s)
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
                for key, (deadline, ctx, on_timeout, timeout_s) in list(self._running.items()):
                    # `done` may have removed it since the copy (a worker's attempt ended
                    # while this loop logged or cancelled another): then it is not timed out.
                    if deadline <= now and self._running.pop(key, None) is not None:
                        ctx.timed_out = True
                        ctx.cancelled.set()
                        _log_timeout(ctx, timeout_s, cancels=on_timeout is not None)
                        if on_timeout is not None:
                            try:
                                on_timeout()
                            except Exception:  # the watchdog must outlive any callback
                                log.exception("timeout callback of job %s failed", ctx.job.id)
                self._next_wake = min((entry[0] for entry in self._running.values()),
                                      default=float("inf"))
                # At most `threading.TIMEOUT_MAX` (longer raises OverflowError): a stored
                # row's timeout_s may be any float; it wakes early and sleeps again.
                wait = (None if self._next_wake == float("inf")
                        else min(max(self._next_wake - now, 0.001), _LONGEST_WAIT_S))
                self._cond.wait(wait)

    def close(self) -> None:
        """End the thread (it cancels nothing more). Idempotent."""
        with self._cond:
            self._closed = True
            self._cond.notify()


def _log_timeout(ctx: JobContext, timeout_s: float, *, cancels: bool) -> None:
    """One WARNING line for an attempt that ran past its timeout, saying what happens."""
    job = ctx.job
    if cancels:
        log.warning("job %s (%s) ran past its timeout of %g s: cancelling it", job.id,
                    job.method, timeout_s)
    else:
        log.warning("job %s (%s) ran past its timeout of %g s: told to stop through "
                    "context.cancelled (an async def job is cancelled too; a def job cannot "
                    "be interrupted: it keeps its thread until it returns, unless the "
                    "process pool's hard timeout ends its child)", job.id, job.method,
                    timeout_s)
