"""`JobHandle`: what ``enqueue`` returns, a job id you can wait on for the result.

A handle *is* the job id (a ``str`` subclass: equal to, hashing like and storable as
the id string), with reads of the stored job on top::

    handle = add.enqueue(2, 3)          # JobHandle[int]
    handle.state                        # "Enqueued", read now
    handle.result(timeout=10)           # 5, once a worker ran it
    await handle.result_async(timeout=10)
    app.job_handle(str(handle))         # the same handle, rebuilt from a stored id

The model is Celery's ``AsyncResult.get(timeout=)``, RQ's ``job.latest_result()`` and
Dramatiq's ``message.get_result(block=True, timeout=)``: the result is the job's stored
JSON return value (JSON types kept: a tuple comes back a list); a Failed job raises
`qmlkit.errors.JobFailed` with the stored exception type, message and traceback.
Waiting is done by the app's shared `qmlkit.waiting.ResultWaiter`, which polls with
backoff in batches and is poked by this process's servers when they store outcomes.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Iterable
from datetime import timedelta
from typing import TYPE_CHECKING, Any, ClassVar, Generic, Protocol, TypeVar, cast

import qmlkit.limits as limits
from qmlkit.errors import JobDeleted, JobFailed, JobNotFound
from qmlkit.job import Deleted, Failed, Job, Succeeded

if TYPE_CHECKING:
    from qmlkit.storage.base import Storage
    from qmlkit.waiting import ResultWaiter

__all__ = ["HandleSource", "JobHandle", "handle_class", "handles", "outcome"]

R_co = TypeVar("R_co", covariant=True)


class HandleSource(Protocol):
    """What a handle needs of its app (``qmlkit.client.App`` is one)."""

    @property
    def storage(self) -> Storage:
        """The opened storage the job lives in."""

    @property
    def result_waiter(self) -> ResultWaiter:
        """The app's shared waiter."""


def outcome(job: Job) -> Any:
    """The result of a settled job: its return value, or the error it ended with.

    Args:
        job: A job in a terminal state (Succeeded, Failed or Deleted).

    Returns:
        ``job.state.result``: the stored JSON value (``None`` for a function that
        returned nothing).

    Raises:
        JobFailed: The job is Failed; carries the stored type, message and traceback.
        JobDeleted: The job is Deleted.
    """
    state = job.state
    if isinstance(state, Succeeded):
        return state.result
    if isinstance(state, Failed):
        raise JobFailed(job.id, state.exception_type, state.message,
                        stack_trace=state.stack_trace, retry_count=state.retry_count,
                        note=state.note)
    if isinstance(state, Deleted):
        raise JobDeleted(job.id, state.reason)
    raise ValueError(f"job {job.id} is {state.name}, not finished")  # callers check first


def _deadline(timeout: float | timedelta | None) -> float | None:
    """``timeout`` from now as a ``time.monotonic()`` value (``None``: no deadline)."""
    if timeout is None:
        return None
    return time.monotonic() + limits.seconds(timeout, "timeout")


class JobHandle(str, Generic[R_co]):
    """A stored job's id, with its state and result (Celery's ``AsyncResult``).

    A ``str`` subclass: ``handle == job_id``, ``hash(handle) == hash(job_id)``, and it
    can be stored, logged, JSON-encoded or passed as a job argument as the id string.
    Pickling gives the plain id string. Each app has its own subclass, holding the
    app, so a handle costs no more memory than its string. Typed with the job
    function's return type (``JobHandle[int]`` for ``def add(...) -> int``; an
    ``async def`` job's awaited type). Reads are never cached: each property or method
    call reads the storage. Made by ``JobHandle(job_id, source)``, with ``source`` its
    app (`HandleSource`).
    """

    __slots__ = ()
    _source: ClassVar[HandleSource]  # set on the handle class of each source

    def __new__(cls, job_id: str, source: HandleSource) -> JobHandle[Any]:
        """Make the handle of ``job_id`` in ``source``'s storage (no storage read)."""
        return str.__new__(handle_class(source), job_id)

    @property
    def id(self) -> str:
        """The job id, as a plain ``str``."""
        return str.__str__(self)

    @property
    def state(self) -> str:
        """The job's current state name, read now, e.g. ``"Processing"``.

        Raises:
            JobNotFound: No job has this id (never stored, or deleted after its TTL).
            StorageError: The storage failed.
        """
        return self.refresh().state.name

    def refresh(self) -> Job:
        """Read the stored job now (one storage read).

        Returns:
            The `qmlkit.job.Job` as stored, in its current state.

        Raises:
            JobNotFound: No job has this id (never stored, or deleted after its TTL).
            StorageError: The storage failed.
        """
        job = self._source.storage.get(self.id)
        if job is None:
            raise JobNotFound(self.id)
        return job

    def result(self, timeout: float | timedelta | None = None) -> R_co:
        """Wait for the job to finish and return its stored return value.

        A finished job costs one storage read. An unfinished one is waited on through
        the app's shared `qmlkit.waiting.ResultWaiter`: polled from 10 ms growing to
        0.32 s, and read at once when a server of this process stores its outcome.
        Retries in between (AwaitingRetry) are waited through.

        Args:
            timeout: Longest wait, in seconds or a ``timedelta``; ``0`` checks once;
                ``None`` waits for ever.

        Returns:
            The JSON value the job function returned (JSON types: a tuple comes back
            a list, dict keys are strings; ``None`` for no return value).

        Raises:
            JobFailed: The job is Failed (retries used up, not retryable, or a result
                that was not JSON: the message says which); the stored exception type,
                message and traceback are its attributes.
            JobDeleted: The job was deleted before finishing.
            JobNotFound: No job has this id, or it expired while waited on.
            TimeoutError: ``timeout`` passed first (the built-in exception).
            ConfigurationError: A negative or non-numeric ``timeout``.
        """
        deadline = _deadline(timeout)
        job = self.refresh()
        if not job.state.terminal:
            if deadline is not None and deadline <= time.monotonic():
                raise TimeoutError(f"job {self.id} is {job.state.name}, not finished")
            settled = self._source.result_waiter.wait(self.id, deadline)
            if settled is None:
                raise JobNotFound(self.id)
            job = settled
        return cast(R_co, outcome(job))

    async def result_async(self, timeout: float | timedelta | None = None) -> R_co:
        """`result`, awaited: the event loop is never blocked (the app's waiter thread
        reads the storage, in batches shared by every waiting handle).

        Raises:
            JobFailed, JobDeleted, JobNotFound, TimeoutError: As `result`.
        """
        deadline = _deadline(timeout)
        if deadline is not None and deadline <= time.monotonic():  # timeout=0: look once
            job = await asyncio.to_thread(self.refresh)
            if not job.state.terminal:
                raise TimeoutError(f"job {self.id} is {job.state.name}, not finished")
            return cast(R_co, outcome(job))
        settled = await self._source.result_waiter.wait_async(self.id, deadline)
        if settled is None:
            raise JobNotFound(self.id)
        return cast(R_co, outcome(settled))

    def __reduce__(self) -> tuple[type[str], tuple[str]]:
        """Pickle as the plain id string (the app is not picklable)."""
        return (str, (self.id,))

    def __repr__(self) -> str:
        """``JobHandle('<id>')``; no storage read."""
        return f"JobHandle({self.id!r})"


def handle_class(source: HandleSource) -> type[JobHandle[Any]]:
    """The `JobHandle` subclass of ``source`` (made on first use and kept on it): its
    handles carry their app in their class, so making one is a string copy."""
    cls: type[JobHandle[Any]] | None = getattr(source, "_qmlkit_handle_class", None)
    if cls is None:
        cls = cast("type[JobHandle[Any]]", type("JobHandle", (JobHandle,), {
            "__slots__": (), "_source": source, "__module__": __name__,
            "__qualname__": "JobHandle"}))
        source._qmlkit_handle_class = cls  # type: ignore[attr-defined]
    return cls


def handles(job_ids: Iterable[str], source: HandleSource) -> list[JobHandle[Any]]:
    """Handles of ``job_ids`` in ``source`` (bulk enqueue makes one per job; the ids are
    not checked).

    Returns:
        One `JobHandle` per id, in order.
    """
    new, cls = str.__new__, handle_class(source)
    return [new(cls, job_id) for job_id in job_ids]
