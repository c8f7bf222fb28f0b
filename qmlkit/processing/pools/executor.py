"""The asyncio pool's executor of ``def`` jobs, and how their failures travel back to
the loop (`qmlkit.processing.pools.asyncio`)."""

from __future__ import annotations

import functools
import threading
from collections.abc import Callable
from concurrent.futures import Executor, Future
from typing import Any

__all__ = ["DaemonExecutor", "Raised", "catching"]


class DaemonExecutor(Executor):
    """The executor of ``def`` jobs: up to ``size`` daemon threads, started as work comes.

    `concurrent.futures.ThreadPoolExecutor` joins its threads at interpreter exit, so one
    ``def`` job that never returns would keep a stopped worker's process alive for good
    (the server has released its job; the thread pool's threads are daemons too).

    Args:
        size: Most threads.
        name: Prefix of the threads' names (``name-N``).
    """

    def __init__(self, size: int, name: str) -> None:
        import queue

        self.size, self.name = size, name
        self._work: queue.SimpleQueue[tuple[Future[Any], Callable[..., Any], tuple[Any, ...]]
                                      | None] = queue.SimpleQueue()
        self._lock = threading.Lock()
        self._threads = 0
        self._idle = 0  # under _lock: threads waiting for work
        self._shut = False

    def submit(self, fn: Callable[..., Any], /, *args: Any, **kwargs: Any) -> Future[Any]:
        """Run ``fn(*args, **kwargs)`` on a thread; return its future.

        Raises:
            RuntimeError: After `shutdown`.
        """
        future: Future[Any] = Future()
        with self._lock:
            if self._shut:
                raise RuntimeError("cannot schedule new work after shutdown")
            self._work.put((future, functools.partial(fn, *args, **kwargs) if kwargs else fn,
                            args if not kwargs else ()))
            # _idle is idle threads minus queued items: below 0 only with every thread busy
            start = self._idle <= 0 and self._threads < self.size
            if start:
                self._threads += 1
            else:
                self._idle -= 1  # an idle thread (or the next to finish) takes it
        if start:
            threading.Thread(target=self._run, name=f"{self.name}-{self._threads}",
                             daemon=True).start()
        return future

    def _run(self) -> None:
        while True:
            item = self._work.get()
            if item is None:
                return
            future, fn, args = item
            if future.set_running_or_notify_cancel():
                try:
                    future.set_result(fn(*args))
                except BaseException as exc:  # the job's own failure, carried to its task
                    future.set_exception(exc)
            with self._lock:
                self._idle += 1

    def shutdown(self, wait: bool = True, *, cancel_futures: bool = False) -> None:
        """Accept no more work; with ``cancel_futures``, cancel what has not started.
        Threads end once idle; ``wait`` is accepted for `asyncio`'s sake and ignored
        (a thread may run a job that never returns)."""
        import queue

        with self._lock:
            self._shut = True
            threads = self._threads
        if cancel_futures:
            while True:
                try:
                    item = self._work.get_nowait()
                except queue.Empty:
                    break
                if item is not None:
                    item[0].cancel()
        for _ in range(threads):
            self._work.put(None)


class Raised:
    """What a ``def`` job's call raised, carried back to the loop as a value.

    Args:
        exc: The exception (any `BaseException`).
    """

    __slots__ = ("exc",)

    def __init__(self, exc: BaseException) -> None:
        self.exc = exc


def catching(run: Callable[[Callable[[], Any]], Any], fn: Callable[[], Any]) -> Any:
    """Call ``run(fn)`` and return its result, or a `Raised` holding what it raised
    (any `BaseException`; see `qmlkit.processing.pools.asyncio.AsyncioPool._offload`).

    Args:
        run: Runs ``fn`` (a context's ``run``: the task's context variables).
        fn: The ``def`` job's call.

    Returns:
        ``fn``'s result, or a `Raised`. Never raises.
    """
    try:
        return run(fn)
    except BaseException as exc:  # every failure of a def job, carried to its task
        return Raised(exc)
