"""``OutcomeStorer``: one thread that stores the outcomes of all of a pool's attempts.

A pool's claimers hand every finished attempt's outcome (a fenced `Transition`) to the
storer with `OutcomeStorer.add` and go on at once; the storer thread stores what has
gathered in one transaction (`Runtime.store_outcomes`):

- once `FLUSH_AT` outcomes wait;
- once the oldest waiting outcome is ``prefetch_window`` old (`MAX_WAIT_S` at most);
- at once when the pool says it is idle (`OutcomeStorer.flush`: nothing runs, so no
  more outcomes are coming soon and waiting would only delay a lone job's result);
- and, after `OutcomeStorer.close`, everything left, before its thread ends.

So ``worker_count`` threads or slots make one acknowledgement transaction per window,
not one each: the commits (and connections) an acknowledgement costs do not grow with
concurrency. Dramatiq's worker threads hand their acks to the consumer thread in the
same way; Celery's prefork pool hands results back to the parent.

A crash loses what the storer had not stored yet (at most one window of outcomes, or
`FLUSH_AT`): those jobs are still Processing in the storage and are reclaimed and run
again, as any claim of a dead server is (at-least-once delivery).
"""

from __future__ import annotations

import logging
import threading
import time
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from qmlkit.processing.runtime import Runtime
    from qmlkit.storage.base import Transition

__all__ = ["FLUSH_AT", "MAX_WAIT_S", "OutcomeStorer"]

log = logging.getLogger("qmlkit.processing.server")

#: Outcomes waiting that make the storer store at once instead of at the window's end.
FLUSH_AT = 200
#: Longest wait of the storer for outcomes while none wait, seconds.
POLL_S = 0.1
#: Longest an outcome waits to be stored, seconds, whatever ``prefetch_window`` is (a
#: long window is set for big claims, not to hold results back).
MAX_WAIT_S = 1.0


class OutcomeStorer:
    """Stores a pool's outcomes in batches from one thread (see the module's text).

    Args:
        runtime: The server (``store_outcomes``, which retries while the storage is
            down, and ``config.prefetch_window``, the longest an outcome waits, up to
            `MAX_WAIT_S`).
        name: The storer thread's name.

    Attributes:
        thread: The storer thread (a daemon), started by `start`.
    """

    def __init__(self, runtime: Runtime, *, name: str) -> None:
        self.runtime = runtime
        self.window_s = min(runtime.config.prefetch_window.total_seconds(), MAX_WAIT_S)
        self._cond = threading.Condition()
        self._pending: list[Transition] = []  # under _cond
        self._first_at = 0.0  # monotonic time the oldest pending outcome was added
        self._now = False  # `flush` asked for a store of what waits, under _cond
        self._closed = False  # `close` was called: store the rest and end, under _cond
        self.thread = threading.Thread(target=self._run, name=name, daemon=True)

    def start(self) -> None:
        """Start the storer thread."""
        self.thread.start()

    def add(self, outcome: Transition) -> None:
        """Queue ``outcome`` to be stored (thread-safe; returns at once)."""
        with self._cond:
            if not self._pending:
                self._first_at = time.monotonic()
            self._pending.append(outcome)
            if len(self._pending) in (1, FLUSH_AT):
                self._cond.notify()

    def flush(self) -> None:
        """Store what waits now, without waiting for the window (the pool is idle)."""
        with self._cond:
            if self._pending:
                self._now = True
                self._cond.notify()

    def close(self) -> None:
        """No more outcomes will come: store the rest, then end the thread."""
        with self._cond:
            self._closed = True
            self._cond.notify()

    def pending(self) -> int:
        """Outcomes added and not yet handed to the storage."""
        with self._cond:
            return len(self._pending)

    def _take(self) -> list[Transition] | None:
        """Wait for a batch to store; ``None`` once closed and nothing is left."""
        with self._cond:
            while not self._pending and not self._closed:
                self._cond.wait(POLL_S)
            if not self._pending:
                return None
            while (len(self._pending) < FLUSH_AT and not self._now and not self._closed
                   and (left := self._first_at + self.window_s - time.monotonic()) > 0):
                self._cond.wait(left)
            batch, self._pending, self._now = self._pending, [], False
            return batch

    def _run(self) -> None:
        while (batch := self._take()) is not None:
            try:
                self.runtime.store_outcomes(batch)  # retried while storage is down
            except Exception:  # the storer must outlive any failure
                log.exception("storing %d outcome(s) failed", len(batch))
