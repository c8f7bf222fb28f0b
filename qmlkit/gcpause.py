"""The cyclic garbage collector and qmlkit's hot paths: `gc_paused` holds it off while a
bulk enqueue runs; `freeze_startup_heap` keeps a worker's full collections short.

A bulk enqueue of 10,000 jobs keeps some 30,000 container objects alive for a few
hundredths of a second (each job, its field dict and its argument list), and frees them
all when it returns. With the collector on, those objects trigger collections that
promote them to the oldest generation, and then a full collection that walks every
object of the process: 52 to 77 ms measured here, against about 200 ms for the whole
10,000-job call (load average 6, 2 cores). Held off, the collector never looks at them:
they die before it runs again. Whatever cyclic garbage the call leaves (an exception's
traceback, say) is collected after the pause, as it would have been a little later.

`JobFunction.enqueue_many` holds the pause for the whole call, enqueue middleware,
observers and inline mode's runs included; ``App.enqueue_jobs`` holds it while a bulk of
`PAUSE_FROM` jobs or more is stored.

Process-wide, like the collector: threads in a bulk enqueue at the same time share one
pause, which ends with the last of them. A child forked during a pause starts with the
collector as it was before the pause.
"""

from __future__ import annotations

import gc
import os
import threading
from collections.abc import Callable, Iterator, Sequence, Sized
from contextlib import AbstractContextManager, contextmanager, nullcontext
from typing import TypeVar

__all__ = ["PAUSE_FROM", "freeze_startup_heap", "gc_paused", "inserting_with_gc_paused"]

#: Fewest jobs whose enqueue pauses the collector: for fewer, the pause's own cost (a
#: lock and two calls, about a microsecond) is most of what it saves.
PAUSE_FROM = 100

T = TypeVar("T")
R = TypeVar("R")

_lock = threading.Lock()
_depth = 0  # calls inside a pause, over all threads
_ours = False  # the pause disabled the collector (it was on), so its end enables it


def gc_paused(jobs: int = PAUSE_FROM) -> AbstractContextManager[None]:
    """Hold off the cyclic garbage collector inside the ``with`` block, for a bulk
    enqueue of ``jobs`` jobs; for fewer than `PAUSE_FROM`, do nothing.

    Reentrant and thread-safe: nested or concurrent blocks share one pause; the
    collector is enabled again when the last block ends, and only if it was enabled
    when the first began (a program that turned it off keeps it off). Code that calls
    ``gc.disable()`` inside a pause sees the collector enabled again at its end.

    Args:
        jobs: How many jobs the block makes or stores.

    Returns:
        A context manager; ``gc.collect()`` still works inside it.
    """
    return _pause() if jobs >= PAUSE_FROM else _NOTHING


def inserting_with_gc_paused(insert: Callable[[Sequence[T]], R],
                             jobs: Sized) -> Callable[[Sequence[T]], R]:
    """``insert`` (a storage's ``enqueue_many``) run inside `gc_paused`, for a bulk of
    ``jobs``; ``insert`` itself for fewer than `PAUSE_FROM` jobs.

    Returns:
        A function of the same argument and result.
    """
    if len(jobs) < PAUSE_FROM:
        return insert

    def paused(batch: Sequence[T]) -> R:
        with _pause():
            return insert(batch)

    return paused


_NOTHING = nullcontext()


@contextmanager
def _pause() -> Iterator[None]:
    """The pause of `gc_paused` (see there), whatever the number of jobs."""
    global _depth, _ours
    with _lock:
        if _depth == 0:
            _ours = gc.isenabled()
            if _ours:
                gc.disable()
        _depth += 1
    try:
        yield
    finally:
        with _lock:
            _depth -= 1
            if _depth == 0 and _ours:
                _ours = False
                gc.enable()


def freeze_startup_heap() -> int:
    """Collect once, then move every object alive into the collector's permanent
    generation (`gc.freeze`), so later collections never walk them again.

    A worker process holds a few hundred thousand objects from its start (modules,
    classes, the app, the storage client) that live as long as it does. Each full
    collection walked all of them: 30 to 60 ms in which no attempt ran, every few
    thousand jobs on the asyncio pool (measured with ``bench/pools.py``: 500 attempts in
    flight finished at 3,200 jobs/s with them, 3,600 to 3,800 with the collector off).
    Frozen, they are still freed by reference counting; only cycles among them are
    never collected, as with any module-level object. The same as CPython's advice for
    pre-fork servers (and what Instagram's Django workers do); called by ``qmlkit
    worker`` and each process-pool child once the server is built, before it claims.

    Returns:
        How many objects are now frozen (`gc.get_freeze_count`).
    """
    gc.collect()
    gc.freeze()
    return gc.get_freeze_count()


def _after_fork_in_child() -> None:
    """A forked child has no thread to end the parent's pause: end it now."""
    global _depth, _ours, _lock
    _lock = threading.Lock()  # the parent's may have been held by another thread
    if _depth and _ours:
        gc.enable()
    _depth, _ours = 0, False


if hasattr(os, "register_at_fork"):
    os.register_at_fork(after_in_child=_after_fork_in_child)
