"""Waiting for jobs to finish: one shared reader per app, polling in batches with backoff.

`ResultWaiter` is what ``JobHandle.result()`` and ``result_async()`` wait on (see
`qmlkit.handle`). Every job waited on is an entry with its own poll interval, starting
at `FIRST_POLL_S` and doubling up to `MAX_POLL_S`. Reads fall on a grid shared by all
entries of the same interval (each read is one to two intervals after the previous
one), so handles waited on together are read together: one daemon thread per app reads
the state names of every due entry's job in one ``job_states`` query, and the whole
jobs of those that are final in one ``get_many``
(`qmlkit.storage.capabilities.BatchRead`). Waiting on 1,000 unfinished handles at once
costs one light query per poll (two above `BATCH` ids), and each job is read at most
once per its poll interval. Nothing ever spins: the thread sleeps until the next entry
is due or it is poked, and ends when nothing is waited on.

Wake-ups over kombu only say "queue Q has runnable jobs", so they cannot tell a waiter
that a job finished. Servers of this process can: after storing outcomes they call
``Notifier.settled`` (`qmlkit.notify`), which pokes this waiter, and the jobs named are
read again at once. Jobs finished by other processes are found by the poll, at most
about two `MAX_POLL_S` late. The same pattern as Celery's result backends without a
pub/sub channel (``AsyncResult.get(interval=0.5)``) and Dramatiq's
``get_result(block=True)`` with a capped backoff.
"""

from __future__ import annotations

import asyncio
import logging
import math
import threading
import time
from collections.abc import Callable, Iterable, Sequence
from typing import Any

import qmlkit.storage.capabilities as capabilities
from qmlkit.backoff import Backoff
from qmlkit.job import Deleted, Failed, Job, Succeeded
from qmlkit.storage.base import Storage

__all__ = ["FIRST_POLL_S", "MAX_POLL_S", "SETTLED", "ResultWaiter", "is_settled"]

log = logging.getLogger("qmlkit.waiting")

#: First poll interval of a waited job, in seconds; each unfinished read doubles it.
FIRST_POLL_S = 0.01
#: Longest poll interval, in seconds (``FIRST_POLL_S`` times a power of two, so the
#: grids of all intervals line up).
MAX_POLL_S = 0.32
#: Most job ids read in one ``get_many`` call.
BATCH = 500
#: Entries due within this many seconds are read together (so handles waited on at
#: about the same time share their reads from then on); new waits are first read
#: this long after they start.
COALESCE_S = 0.002


def is_settled(job: Job) -> bool:
    """Whether a waiter stops at ``job``: Succeeded, Failed or Deleted (terminal states)."""
    return bool(job.state.terminal)


#: The state names a waiter stops at.
SETTLED = frozenset(cls.__name__ for cls in (Succeeded, Failed, Deleted) if cls.terminal)

_UNFINISHED: Any = object()  # a job read and found not settled


class _Entry:
    """One wait: a job id, when to read it next, and what to call with the answer."""

    __slots__ = ("deliver", "interval", "job_id", "next_at", "poked")

    def __init__(self, job_id: str, deliver: Callable[[Job | None], None], now: float) -> None:
        self.job_id = job_id
        self.deliver = deliver  # called once, from the waiter thread: the job or None
        self.interval = FIRST_POLL_S / 2  # doubled at the first unfinished read
        self.next_at = now
        self.poked = False  # poked while being read: read again at once


class ResultWaiter:
    """Waits for jobs of one storage to settle; shared by every handle of an app.

    Thread-safe. The reading thread starts on the first wait and ends when nothing is
    waited on any more.

    Args:
        storage: Returns the opened storage (an app's ``storage`` property).
    """

    def __init__(self, storage: Callable[[], Storage]) -> None:
        self._storage = storage
        self._cond = threading.Condition()
        self._entries: set[_Entry] = set()
        self._by_id: dict[str, set[_Entry]] = {}  # for pokes: job id -> its waits
        self._poked: set[_Entry] = set()  # to read at once
        self._next_scan = math.inf  # no entry is due before this (time.monotonic())
        self._thread: threading.Thread | None = None

    # --- waiting -------------------------------------------------------------------

    def wait(self, job_id: str, deadline: float | None) -> Job | None:
        """Block until job ``job_id`` settles, it is gone, or ``deadline`` passes.

        Args:
            job_id: The job to wait for.
            deadline: A ``time.monotonic()`` value, or ``None`` to wait for ever.

        Returns:
            The settled job, or ``None`` when no job has this id (any more).

        Raises:
            TimeoutError: ``deadline`` passed first (the built-in exception).
        """
        done = threading.Event()
        answer: list[Job | None] = []

        def deliver(job: Job | None) -> None:
            answer.append(job)
            done.set()

        entry = self.add(job_id, deliver)
        timeout = None if deadline is None else max(0.0, deadline - time.monotonic())
        if not done.wait(timeout):
            self.discard(entry)
            if not done.is_set():
                raise TimeoutError(f"job {job_id} did not finish within the timeout")
        return answer[0]

    async def wait_async(self, job_id: str, deadline: float | None) -> Job | None:
        """As `wait`, without blocking the event loop (the reading thread answers it).

        Raises:
            TimeoutError: ``deadline`` passed first.
        """
        loop = asyncio.get_running_loop()
        future: asyncio.Future[Job | None] = loop.create_future()

        def settle(job: Job | None) -> None:
            if not future.done():
                future.set_result(job)

        def deliver(job: Job | None) -> None:
            try:
                loop.call_soon_threadsafe(settle, job)
            except RuntimeError:  # the loop closed while we waited: nobody listens
                pass

        entry = self.add(job_id, deliver)
        timeout = None if deadline is None else max(0.0, deadline - time.monotonic())
        try:
            return await asyncio.wait_for(future, timeout)
        except asyncio.TimeoutError:
            raise TimeoutError(f"job {job_id} did not finish within the timeout") from None
        finally:
            self.discard(entry)

    def add(self, job_id: str, deliver: Callable[[Job | None], None]) -> _Entry:
        """Wait for ``job_id``: ``deliver`` is called once, from the reading thread, with
        the settled job or ``None`` (no such job). It is read within `COALESCE_S`
        seconds, then with backoff.
        """
        with self._cond:
            entry = _Entry(job_id, deliver, time.monotonic() + COALESCE_S)
            self._entries.add(entry)
            self._by_id.setdefault(job_id, set()).add(entry)
            self._next_scan = min(self._next_scan, entry.next_at)
            if self._thread is None or not self._thread.is_alive():  # none, or forked
                self._thread = threading.Thread(target=self._run, name="qmlkit-result-waiter",
                                                daemon=True)
                self._thread.start()
            self._cond.notify()
            return entry

    def discard(self, entry: _Entry) -> None:
        """Stop waiting on ``entry`` (its ``deliver`` may still run once if it is being
        read right now)."""
        with self._cond:
            self._forget(entry)
            if not self._entries:
                self._cond.notify()  # the reading thread ends now, not at its next poll

    def _forget(self, entry: _Entry) -> None:
        """Drop ``entry`` from every index (the caller holds the lock)."""
        self._entries.discard(entry)
        self._poked.discard(entry)
        same = self._by_id.get(entry.job_id)
        if same is not None:
            same.discard(entry)
            if not same:
                del self._by_id[entry.job_id]

    def poke(self, job_ids: Iterable[str]) -> None:
        """Jobs ``job_ids`` may have settled: read the waited ones now (from
        ``Notifier.settled``, after a local server stored their outcomes)."""
        with self._cond:
            if not self._by_id:
                return
            hit = False
            for job_id in job_ids:
                for entry in self._by_id.get(job_id, ()):
                    entry.poked = True
                    self._poked.add(entry)
                    hit = True
            if hit:
                self._cond.notify()

    @property
    def waiting(self) -> int:
        """How many waits are pending (tests, diagnostics)."""
        with self._cond:
            return len(self._entries)

    # --- the reading thread --------------------------------------------------------

    def _due(self) -> list[_Entry] | None:
        """Sleep until some entries are due; ``None`` ends the thread (nothing waited)."""
        with self._cond:
            while True:
                if not self._entries:
                    self._thread = None
                    return None
                now = time.monotonic()
                due = set(self._poked)
                self._poked.clear()
                if self._next_scan <= now:  # a timed poll: scan everything once
                    soon = now + COALESCE_S
                    due.update(e for e in self._entries if e.next_at <= soon)
                    self._next_scan = min((e.next_at for e in self._entries if e not in due),
                                          default=math.inf)
                if due:
                    for entry in due:
                        entry.poked = False
                    return list(due)
                self._cond.wait(None if self._next_scan == math.inf
                                else self._next_scan - now)

    def _run(self) -> None:
        backoff = Backoff(FIRST_POLL_S * 10, MAX_POLL_S * 10)
        while (due := self._due()) is not None:
            try:
                found = self._read(sorted({e.job_id for e in due}))
            except Exception as exc:  # storage down: keep waiting, read again later
                delay = backoff.jittered(backoff.next())
                log.warning("reading %d waited job(s) failed (%s: %s); retrying in %.2f s",
                            len(due), type(exc).__name__, exc, delay)
                with self._cond:
                    for entry in due:
                        entry.next_at = time.monotonic() + delay
                        self._next_scan = min(self._next_scan, entry.next_at)
                continue
            backoff.reset()
            self._settle(due, found)

    def _read(self, ids: Sequence[str]) -> dict[str, Job | None]:
        """The settled jobs among ``ids`` by id (``None``: not stored); unfinished ones are
        left out. State names first, whole jobs only for the settled ones."""
        store = self._storage()
        found: dict[str, Job | None] = {}
        for start in range(0, len(ids), BATCH):
            chunk = ids[start:start + BATCH]
            states = capabilities.job_states(store, chunk)
            found.update((i, None) for i in chunk if i not in states)
            final = [i for i, name in states.items() if name in SETTLED]
            if final:
                jobs = capabilities.get_many(store, final)
                found.update((i, jobs.get(i)) for i in final)
        return found

    def _settle(self, due: list[_Entry], found: dict[str, Job | None]) -> None:
        finished: list[tuple[_Entry, Job | None]] = []
        with self._cond:
            now = time.monotonic()
            for entry in due:
                if entry not in self._entries:
                    continue  # given up meanwhile (a timeout)
                job = found.get(entry.job_id, _UNFINISHED)
                if job is None or (job is not _UNFINISHED and is_settled(job)):
                    self._forget(entry)
                    finished.append((entry, job))
                elif not entry.poked:  # (a poked one is read again at once)
                    entry.interval = step = min(entry.interval * 2, MAX_POLL_S)
                    entry.next_at = (math.floor(now / step) + 2) * step  # on the grid
                    self._next_scan = min(self._next_scan, entry.next_at)
        for entry, job in finished:
            try:
                entry.deliver(job)
            except Exception:  # a waiter's own bug must not stop the others
                log.exception("delivering job %s to its waiter failed", entry.job_id)
