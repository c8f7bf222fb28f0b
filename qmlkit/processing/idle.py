"""The idle gate: where idle worker threads wait for a wake-up or their next poll.

A wake-up names a queue, not a job count, so the gate wakes ``n`` workers rather than
all of them; a worker whose claim came back full wakes the next one, so a burst still
fans out over every worker. A sequence number moves on every wake, so a worker between
its claim and its wait sees the move and claims again instead of sleeping.

While wake-ups arrive, one idle worker at a time polls and the others wait for a wake
(with a long safety timeout), so an idle server costs the storage one query per polling
interval instead of one per worker.
"""

from __future__ import annotations

import threading

__all__ = ["IdleGate"]

#: How many polling intervals a non-polling idle worker waits at most (safety timeout).
SAFETY_FACTOR = 10


class IdleGate:
    """The idle/wake protocol of one server's worker threads. Thread-safe.

    Attributes:
        idle_workers: Worker threads in their idle wait now (tests, metrics).
        waiting: Of those, the ones not yet woken: a woken worker still counts in
            ``idle_workers`` until it gets the CPU back and leaves its wait.
        seq: The wake sequence number; it grows by one on every wake.
        poller: Whether one idle worker is the polling one now.
    """

    def __init__(self) -> None:
        self._cond = threading.Condition()
        self.seq = 0
        self.poller = False
        self.idle_workers = 0
        self.waiting = 0

    def seen(self) -> int:
        """Return the wake sequence number; pass it to `wait` after an empty claim."""
        with self._cond:
            return self.seq

    def wait(self, seen: int, interval_s: float, *, stopping: threading.Event,
             shared_poll: bool) -> None:
        """Wait for a wake-up or the next poll; return at once if woken since ``seen``.

        Args:
            seen: The sequence number read before the claim that came back empty.
            interval_s: The polling interval, in seconds.
            stopping: Return at once when set.
            shared_poll: Wake-ups arrive now: if another idle worker polls already, wait
                up to ``SAFETY_FACTOR`` intervals for a wake instead of polling too.
        """
        with self._cond:
            if self.seq != seen or stopping.is_set():
                return
            self.idle_workers += 1
            self.waiting += 1
            try:
                if shared_poll and self.poller:
                    self._wait(interval_s * SAFETY_FACTOR)  # someone polls already
                    return
                self.poller = True
                try:
                    self._wait(interval_s)
                finally:
                    self.poller = False
            finally:
                self.idle_workers -= 1

    def _wait(self, timeout_s: float) -> None:
        # A notified waiter was counted out of ``waiting`` by its notifier; one whose
        # wait timed out (``wait`` returns False) counts itself out.
        if not self._cond.wait(timeout_s):
            self.waiting -= 1

    def _notify(self, n: int) -> None:
        self.waiting -= min(n, self.waiting)
        self._cond.notify(n)

    def wake(self, n: int) -> None:
        """Wake ``n`` idle workers (not all of them) and move the sequence number."""
        with self._cond:
            self.seq += 1
            self._notify(n)

    def wake_all(self) -> None:
        """Wake every idle worker and move the sequence number."""
        with self._cond:
            self.seq += 1
            self.waiting = 0
            self._cond.notify_all()

    def keep_a_poller(self) -> None:
        """If idle workers wait and none of them polls, wake one to take the poller's place.

        Called by a worker leaving with a job: without it, a job that came with no
        wake-up (a lost message, a client without ``wakeup_url``) would wait for the
        others' long safety timeout instead of the polling interval.
        """
        with self._cond:
            if not self.poller and self.waiting > 0:
                self._notify(1)
