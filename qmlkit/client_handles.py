"""The handle and async half of the client API (``App`` inherits it): job handles, the
shared result waiter, and ``await``-able enqueues that never block the event loop."""

from __future__ import annotations

import asyncio
import contextvars
import functools
import os
import threading
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from typing import TYPE_CHECKING, Any, ParamSpec, TypeVar

import qmlkit.limits as limits
from qmlkit.handle import JobHandle
from qmlkit.handle import handles as make_handles
from qmlkit.waiting import ResultWaiter

if TYPE_CHECKING:
    from qmlkit.job import Job
    from qmlkit.notify import Notifier
    from qmlkit.storage.base import Storage

__all__ = ["ENQUEUE_THREADS", "HandleClient"]

P = ParamSpec("P")
T = TypeVar("T")

#: Threads an app's async enqueues run on (each holds a storage connection at most).
ENQUEUE_THREADS = 4


class HandleClient:
    """Job handles and async enqueue for an app (`qmlkit.client.App`)."""

    _notifier: Notifier
    _handles_lock = threading.Lock()  # guards lazy creation below, per process
    _waiter: ResultWaiter | None = None
    _executor: ThreadPoolExecutor | None = None
    _executor_pid = 0  # the process that made it: a forked child makes its own

    if TYPE_CHECKING:
        @property
        def storage(self) -> Storage: ...

        def enqueue(self, method: str, **options: Any) -> JobHandle[Any]: ...

        def enqueue_jobs(self, jobs: Sequence[Job], *,
                         storage: Storage | None = None) -> list[str]: ...

    # --- handles -------------------------------------------------------------------

    @property
    def result_waiter(self) -> ResultWaiter:
        """This app's shared `qmlkit.waiting.ResultWaiter` (made on first use); this
        process's servers poke it when they store outcomes."""
        if self._waiter is None:
            with self._handles_lock:
                if self._waiter is None:
                    waiter = ResultWaiter(lambda: self.storage)
                    self._notifier.watch_settled(waiter.poke)
                    self._waiter = waiter
        return self._waiter

    def job_handle(self, job_id: str) -> JobHandle[Any]:
        """Rebuild the `qmlkit.handle.JobHandle` of a stored job id (no storage read).

        Like Celery's ``AsyncResult(task_id)`` and RQ's ``Job.fetch(id)``. A handle
        typed with the job's result type: ``handle: JobHandle[int] = app.job_handle(i)``.

        Args:
            job_id: An id ``enqueue`` returned (or ``str()`` of a handle).

        Returns:
            The handle; an id with no job raises `qmlkit.errors.JobNotFound` on first
            read (``state``, ``refresh()``, ``result()``).

        Raises:
            ConfigurationError: ``job_id`` is not a possible id (empty, too long, NUL).
        """
        return JobHandle(limits.check_name(job_id, "job_id", limits.MAX_ID_LENGTH), self)

    def handles(self, job_ids: Sequence[str]) -> list[JobHandle[Any]]:
        """Handles of ids this app just stored (unchecked: they came from storage)."""
        return make_handles(job_ids, self)

    # --- async enqueue -------------------------------------------------------------

    async def offload(self, fn: Callable[P, T], *args: P.args, **kwargs: P.kwargs) -> T:
        """Run a blocking client call on this app's enqueue threads and await it.

        The caller's context variables go along (so ``app.transaction(...)`` blocks
        apply); at most `ENQUEUE_THREADS` calls run at once per app, the rest queue.
        The loop is blocked only for handing the call over (microseconds).

        Returns:
            What ``fn`` returns; whatever it raises is raised in the awaiting task.
        """
        executor = self._executor
        if executor is None or self._executor_pid != os.getpid():
            with self._handles_lock:
                if self._executor is None or self._executor_pid != os.getpid():
                    self._executor = ThreadPoolExecutor(ENQUEUE_THREADS,
                                                        thread_name_prefix="qmlkit-enqueue")
                    self._executor_pid = os.getpid()
                executor = self._executor
        call = functools.partial(contextvars.copy_context().run, fn, *args, **kwargs)
        return await asyncio.get_running_loop().run_in_executor(executor, call)

    async def enqueue_async(self, method: str, **options: Any) -> JobHandle[Any]:
        """`qmlkit.client.App.enqueue`, awaited: same options, middleware, validation,
        wake-ups and errors, run on this app's enqueue threads (`offload`).

        Returns:
            The job's handle.
        """
        return await self.offload(self.enqueue, method, **options)

    async def enqueue_jobs_async(self, jobs: Sequence[Job]) -> list[str]:
        """`qmlkit.client.App.enqueue_jobs`, awaited (`offload`)."""
        return await self.offload(self.enqueue_jobs, jobs)

    def shutdown_enqueue_threads(self) -> None:
        """Stop this app's enqueue threads after their current calls (``App.close``)."""
        with self._handles_lock:
            executor, self._executor = self._executor, None
        if executor is not None:
            executor.shutdown(wait=True)
