"""The process pool's bookkeeping of one child, and the loop that watches them all.

`ChildHandle` is the supervisor's view of one child process: its pipes, its server
name, the attempts it reported running (with their deadlines), and how it is being
ended. `watch` is the supervisor thread's loop: read reports, reap children that
exited, kill children whose attempt overran its timeout (SIGTERM, SIGKILL after
`KILL_GRACE_S`), and fill empty slots. It never touches the storage; endings are handed
to `qmlkit.processing.pools.settle` on another thread, so a slow or unreachable storage
never delays a kill.
"""

from __future__ import annotations

import contextlib
import logging
import os
import signal
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from multiprocessing import connection
from multiprocessing.connection import Connection
from multiprocessing.process import BaseProcess
from typing import Any

from qmlkit.processing.pools.settle import Ending

__all__ = ["HARD_TIMEOUT_MARGIN_S", "KILL_GRACE_S", "Attempt", "ChildHandle",
           "hard_timeout_margin", "watch"]

log = logging.getLogger("qmlkit.processing.pools")

#: Past an attempt's deadline, how long the child's own (cooperative) timeout gets
#: before the supervisor kills the child, seconds.
HARD_TIMEOUT_MARGIN_S = 0.2
#: In a child running an asyncio pool, the extra margin per slot, seconds: the loop's
#: cancellation of a timed-out coroutine waits behind up to that many ready attempts,
#: and killing the child would restart every other attempt in flight in it.
ASYNCIO_MARGIN_PER_SLOT_S = 0.002
#: The longest margin, seconds.
HARD_TIMEOUT_MARGIN_MAX_S = 2.0
#: After SIGTERM, how long before SIGKILL, seconds.
KILL_GRACE_S = 1.0
#: The supervisor loop's longest wait between looks, seconds.
WATCH_TICK_S = 0.1
#: After reading reports, how long the loop lets the next ones gather before it looks
#: again, seconds: each child reports two messages per attempt, and a loop woken for each
#: took a core of the machine's two at 6,000 jobs/s. Far below `HARD_TIMEOUT_MARGIN_S`
#: and the pipes' buffers (64 KiB hold about a thousand reports).
REPORT_GATHER_S = 0.005
#: An attempt that ended this shortly before its child died is treated as running when
#: it is still Processing in the storage (its outcome was never stored): the crash may
#: be its doing (a signal sent to the process lands on another thread first), seconds.
SUSPECT_WINDOW_S = 1.0


def hard_timeout_margin(child_pool: str, concurrency: int) -> float:
    """How long past an attempt's deadline its child is killed, in seconds.

    `HARD_TIMEOUT_MARGIN_S` for a thread child; for an asyncio child, that plus
    `ASYNCIO_MARGIN_PER_SLOT_S` per slot, at most `HARD_TIMEOUT_MARGIN_MAX_S` (0.2 s at
    1 slot, 1.2 s at 500): there the child's own cancellation really ends a coroutine and
    the child lives on, while a kill restarts all its other attempts in flight.

    Args:
        child_pool: ``"threads"`` or ``"asyncio"``.
        concurrency: The child's slots (``worker_count``), at least 1.
    """
    if child_pool != "asyncio":
        return HARD_TIMEOUT_MARGIN_S
    return min(HARD_TIMEOUT_MARGIN_MAX_S,
               HARD_TIMEOUT_MARGIN_S + ASYNCIO_MARGIN_PER_SLOT_S * max(1, concurrency))


@dataclass
class Attempt:
    """One attempt a child reported begun: its timeout and deadline (monotonic s)."""

    timeout_s: float | None
    deadline: float | None


@dataclass
class ChildHandle:
    """The supervisor's view of one child process.

    Attributes:
        slot: Its slot in the pool.
        server_name: The child server's unique name (jobs are stamped ``name#uuid``).
        process: The process.
        reports: Read end of the child -> parent pipe.
        control: Write end of the parent -> child pipe.
        started: When it was started (monotonic s).
        server_id: Its registry id once it reported ready.
        running: Attempts reported begun and not yet ended, by (job id, token).
        overran: Attempts it is being killed for.
        killed_at: When the supervisor sent SIGTERM (monotonic s), else ``None``.
        release_running: Its running attempts are released rather than failed.
        retiring: It stopped claiming (recycle, drain): its slot is free.
        said_bye: It reported a clean exit.
        aborted: Its server had to release unfinished jobs.
        margin_s: How long past an attempt's deadline the child is killed, seconds
            (`hard_timeout_margin`).
    """

    slot: int
    server_name: str
    process: BaseProcess
    reports: Connection
    control: Connection
    started: float = field(default_factory=time.monotonic)
    server_id: str | None = None
    running: dict[tuple[str, int], Attempt] = field(default_factory=dict)
    overran: set[tuple[str, int]] = field(default_factory=set)
    killed_at: float | None = None
    release_running: bool = False
    retiring: bool = False
    said_bye: bool = False
    aborted: bool = False
    ended: dict[tuple[str, int], tuple[float, Attempt]] = field(default_factory=dict)
    margin_s: float = HARD_TIMEOUT_MARGIN_S
    _lock: threading.Lock = field(default_factory=threading.Lock)

    @property
    def ready(self) -> bool:
        """Whether its server started (it reported its registry id)."""
        return self.server_id is not None

    def tell(self, message: str | tuple[str, float]) -> None:
        """Send ``("drain", grace_s)``, ``"abort"`` or ``"wake"``; a child already gone
        is ignored."""
        with self._lock, contextlib.suppress(OSError, EOFError, ValueError):  # child gone
            self.control.send(message)

    def kill(self, sig: int, why: str) -> None:
        """Signal the process (SIGTERM first; SIGKILL once `KILL_GRACE_S` passed)."""
        if self.killed_at is None:
            self.killed_at = time.monotonic()
            log.warning("killing child %s (pid %s): %s", self.server_name, self.process.pid, why)
        with contextlib.suppress(ProcessLookupError, PermissionError):  # it exited already
            os.kill(self.process.pid or 0, sig)

    def take_reports(self) -> None:
        """Read every report waiting in the pipe (also after the child exited)."""
        try:
            while self.reports.poll():
                self._apply(self.reports.recv())
        except (EOFError, OSError):
            pass

    def _apply(self, message: tuple[Any, ...]) -> None:
        kind = message[0]
        if kind == "begin":
            _, job_id, token, timeout_s, started = message
            deadline = started + timeout_s if timeout_s is not None else None
            self.running[(job_id, token)] = Attempt(timeout_s, deadline)
        elif kind == "end":
            key, now = (message[1], message[2]), time.monotonic()
            attempt = self.running.pop(key, None)
            if attempt is not None:
                self.ended[key] = (now, attempt)
            # Entries are in the order they ended: drop the expired ones from the front.
            # (Scanning them all at each end cost the parent a whole core at 6,000 jobs/s.)
            ended = self.ended
            while ended:
                oldest = next(iter(ended))
                if now - ended[oldest][0] <= SUSPECT_WINDOW_S:
                    break
                del ended[oldest]
        elif kind == "ready":
            self.server_id = message[1]
        elif kind == "retiring":
            self.retiring = True
            log.info("child %s (pid %s) is recycling: %s", self.server_name,
                     self.process.pid, message[1])
        elif kind == "bye":
            self.said_bye, self.aborted = True, bool(message[1])

    def overdue(self, now: float) -> list[tuple[str, int]]:
        """Running attempts past their deadline plus ``margin_s``."""
        return [key for key, attempt in self.running.items()
                if attempt.deadline is not None
                and now >= attempt.deadline + self.margin_s]

    def ending(self, *, stopping: bool) -> Ending:
        """How this (exited) child ended, for `qmlkit.processing.pools.settle`."""
        exitcode = self.process.exitcode
        by_sigterm = exitcode == -signal.SIGTERM
        running = {key: a.timeout_s for key, a in self.running.items()}
        if self.killed_at is None:  # a crash: recent ends may be its cause
            now = time.monotonic()
            running.update({key: a.timeout_s for key, (at, a) in self.ended.items()
                            if now - at <= SUSPECT_WINDOW_S})
        return Ending(
            server_name=self.server_name, exitcode=exitcode, running=running,
            overran=set(self.overran),
            release_running=self.release_running or (stopping and by_sigterm),
        )


class Watcher:
    """What `watch` needs of the pool: its children and what to do as they change.

    Args:
        children: The live children (the loop removes those that exited).
        lock: Guards ``children``.
        stopping: Set once the pool stops (no new children).
        closed: Set to end the loop.
        refill: Starts children for empty slots (called every tick unless stopping).
        ended: Called with each child that exited (after its last reports are read).
    """

    def __init__(self, *, children: list[ChildHandle], lock: threading.Lock,
                 stopping: threading.Event, closed: threading.Event,
                 refill: Callable[[], None], ended: Callable[[ChildHandle], None]) -> None:
        self.children = children
        self.lock = lock
        self.stopping = stopping
        self.closed = closed
        self.refill = refill
        self.ended = ended


def _wait_time(children: list[ChildHandle], now: float) -> float:
    nearest = WATCH_TICK_S
    for child in children:
        for attempt in child.running.values():
            if attempt.deadline is not None:
                nearest = min(nearest, attempt.deadline + child.margin_s - now)
    return max(nearest, 0.005)


def _enforce(child: ChildHandle, now: float) -> None:
    """Kill ``child`` if an attempt overran; escalate to SIGKILL after the grace."""
    if child.killed_at is not None:
        if now - child.killed_at >= KILL_GRACE_S and child.process.is_alive():
            child.kill(signal.SIGKILL, "still alive after SIGTERM")
        return
    overdue = child.overdue(now)
    if overdue:
        child.overran.update(overdue)
        child.release_running = True  # the others in it did nothing wrong
        jobs = ", ".join(f"{job_id} (attempt {token})" for job_id, token in overdue)
        child.kill(signal.SIGTERM, f"hard timeout: {jobs} overran")


def watch(w: Watcher) -> None:
    """The supervisor thread's loop (see the module docstring); ends once ``w.closed``."""
    while not w.closed.is_set():
        with w.lock:
            children = list(w.children)
        now = time.monotonic()
        handles: list[Any] = [c.reports for c in children] + [c.process.sentinel for c in children]
        if handles:
            ready = set(connection.wait(handles, timeout=_wait_time(children, now)))
        else:
            w.closed.wait(WATCH_TICK_S)
            ready = set()
        now = time.monotonic()
        for child in children:
            if child.reports in ready:
                child.take_reports()
            if child.process.sentinel in ready or not child.process.is_alive():
                child.process.join(0.1)
                if child.process.exitcode is None:
                    continue
                child.take_reports()
                with w.lock:
                    w.children.remove(child)
                w.ended(child)
                continue
            _enforce(child, now)
        if not w.stopping.is_set():
            w.refill()
        if any(child.reports in ready for child in children):
            w.closed.wait(REPORT_GATHER_S)
