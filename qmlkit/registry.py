"""The job registry: job names -> runnables, their `JobOptions`, and what a server needs.

A server gets an app only as a `JobSource` (its registry, the after-commit notifier it
subscribes to, and the way to build a recurring tick's job), so ``qmlkit.processing``
never imports the client API (``qmlkit.client``).
"""

from __future__ import annotations

import functools
from collections.abc import Callable, Coroutine, Iterable, Mapping, Sequence
from datetime import datetime, timedelta
from typing import TYPE_CHECKING, Any, Generic, ParamSpec, Protocol, TypeVar, cast, overload

from pydantic import ValidationError

import qmlkit.limits as limits
from qmlkit.errors import ConfigurationError
from qmlkit.gcpause import gc_paused
from qmlkit.job import Enqueued, Job, Scheduled, new_job_id, new_job_ids, trusted, utcnow
from qmlkit.processing.retry import RetryPolicy

if TYPE_CHECKING:
    from qmlkit.handle import JobHandle
    from qmlkit.notify import Notifier
    from qmlkit.processing.context import JobContext
    from qmlkit.processing.processor import Runnable
    from qmlkit.recurring import RecurringJob

__all__ = ["AsyncJobFunction", "ClassWorker", "Enqueuer", "JobDecorator", "JobFunction",
           "JobOptions", "JobSource", "RegisteredWorker", "Registry", "build_job", "seconds"]

P = ParamSpec("P")
R = TypeVar("R")
T = TypeVar("T")


class ClassWorker(Protocol):
    """A class-based worker, as qml-rs's ``Worker`` trait: a name and an ``execute``."""

    method_name: str

    def execute(self, job: Job, context: JobContext) -> Any:
        """Run ``job``; return a JSON-serialisable result (or a coroutine of one)."""


def seconds(value: timedelta | float | None) -> float | None:
    """A positive, finite timeout in seconds (`qmlkit.limits.seconds`), or ``None``.

    Raises:
        ConfigurationError: ``value`` is zero, negative, not finite, too long or not a
            duration.
    """
    return None if value is None else limits.seconds(value, "timeout", allow_zero=False)


class JobOptions:
    """Defaults stamped on each job of one registered name.

    Attributes:
        queue: Queue name.
        priority: Higher runs first.
        max_retries: Retries after a failed first attempt (``None``: the policy's).
        timeout: Per-attempt limit (``None``: the server's ``job_timeout``).
        retry: A retry policy for this job name (``None``: the server's).
    """

    def __init__(
        self,
        *,
        queue: str = "default",
        priority: int = 0,
        max_retries: int | None = None,
        timeout: timedelta | float | None = None,
        retry: RetryPolicy | None = None,
    ) -> None:
        limits.check_name(queue, "queue")
        limits.check_int32(priority, "priority")
        if max_retries is not None:
            limits.check_int32(max_retries, "max_retries", minimum=0)
        self.queue = queue
        self.priority = priority
        self.retry = retry
        self.max_retries = max_retries if max_retries is not None else (
            retry.max_retries if retry is not None else RetryPolicy().max_retries
        )
        if max_retries is not None and max_retries < 0:
            raise ConfigurationError("max_retries must be >= 0")
        self.timeout_s = seconds(timeout)


class Enqueuer(Protocol):
    """What a `JobFunction` needs of its app (``qmlkit.client.App`` is one)."""

    def enqueue(self, method: str, **options: Any) -> JobHandle[Any]:
        """Store one job for ``method``; return its handle."""

    def make_job(self, method: str, *, args: Sequence[Any] = (),
                 kwargs: Mapping[str, Any] | None = None) -> Job:
        """Build (not store) a job for ``method``."""

    def enqueue_jobs(self, jobs: Sequence[Job]) -> list[str]:
        """Store built jobs in one transaction; return their ids."""

    def handles(self, job_ids: Sequence[str]) -> list[JobHandle[Any]]:
        """Handles of ids just stored."""

    async def offload(self, fn: Callable[..., T], *args: Any, **kwargs: Any) -> T:
        """Run a blocking client call off the event loop and await it."""


class JobFunction(Generic[P, R]):
    """A function registered with ``@app.job``. Calling it runs it here and now.

    Generic over the function's parameters ``P`` and its result type ``R`` (for an
    ``async def`` job, the awaited type: see `AsyncJobFunction`), so a type checker
    checks ``enqueue``'s arguments against the signature and types
    ``enqueue(...).result()`` as ``R``.

    Attributes:
        name: The registered job name (default ``module.qualname``).
        fn: The wrapped function (``def`` or ``async def``).
        options: Its `JobOptions`.
    """

    def __init__(self, app: Enqueuer, fn: Callable[P, Any], name: str,
                 options: JobOptions) -> None:
        self.app = app
        self.fn = fn
        self.name = name
        self.options = options
        self.retry = options.retry
        functools.update_wrapper(self, fn)

    def __call__(self, *args: P.args, **kwargs: P.kwargs) -> R:
        """Run the function directly, in this process (no storage involved)."""
        return cast(R, self.fn(*args, **kwargs))

    def execute(self, job: Job, context: JobContext) -> Any:
        """Run the stored job's arguments through the function (used by workers)."""
        return self.fn(*job.args, **job.kwargs)

    def enqueue(self, *args: P.args, **kwargs: P.kwargs) -> JobHandle[R]:
        """Store a job that calls this function with these arguments.

        Returns:
            Its `qmlkit.handle.JobHandle` (a ``str`` subclass: the job id).

        Raises:
            PayloadError: An argument is not JSON-serialisable (named) or the arguments
                are over the size limit; nothing is stored.
            StorageError: The storage failed; nothing is stored.
        """
        return self.app.enqueue(self.name, args=args, kwargs=kwargs)

    async def enqueue_async(self, *args: P.args, **kwargs: P.kwargs) -> JobHandle[R]:
        """`enqueue`, awaited: the same middleware, validation, wake-ups and errors, run
        on the app's enqueue threads so the event loop is not blocked."""
        return await self.app.offload(self.app.enqueue, self.name, args=args, kwargs=kwargs)

    def schedule(
        self,
        *args: Any,
        at: datetime | None = None,
        delay: timedelta | float | None = None,
        **kwargs: Any,
    ) -> JobHandle[R]:
        """Store a job that becomes runnable at ``at`` or after ``delay``.

        ``at`` and ``delay`` are reserved here; use `App.enqueue` to pass job
        arguments with those names. The job arguments are not type-checked (a
        signature cannot add keywords to ``P``); `enqueue`'s are.

        Args:
            *args: Job arguments.
            at: An aware datetime (naive is refused: it would be ambiguous).
            delay: Seconds or a ``timedelta`` from now.
            **kwargs: Job keyword arguments.

        Returns:
            Its `qmlkit.handle.JobHandle`.

        Raises:
            ConfigurationError: Neither or both of ``at`` and ``delay``, or a naive ``at``.
            PayloadError: As for `enqueue`.
        """
        if (at is None) == (delay is None):
            raise ConfigurationError("schedule() takes exactly one of at= or delay=")
        return self.app.enqueue(self.name, args=args, kwargs=kwargs, at=at, delay=delay)

    async def schedule_async(self, *args: Any, at: datetime | None = None,
                             delay: timedelta | float | None = None,
                             **kwargs: Any) -> JobHandle[R]:
        """`schedule`, awaited (on the app's enqueue threads); same arguments and errors."""
        return await self.app.offload(functools.partial(self.schedule, at=at, delay=delay),
                                      *args, **kwargs)

    def enqueue_many(
        self, calls: Iterable[Sequence[Any] | tuple[Sequence[Any], Mapping[str, Any]]]
    ) -> list[JobHandle[R]]:
        """Store many jobs of this function in one transaction.

        Args:
            calls: Each item is an argument tuple/list, or an ``(args, kwargs)`` pair
                whose second member is a mapping.

        Returns:
            Their handles, in order.

        Raises:
            PayloadError: One call's arguments cannot be stored; none are stored.
        """
        with gc_paused():  # its jobs live only during the call: see qmlkit.gcpause
            return self._enqueue_calls(calls)

    def _enqueue_calls(self, calls: Iterable[Sequence[Any] | tuple[Sequence[Any],
                                                                  Mapping[str, Any]]],
                       ) -> list[JobHandle[R]]:
        """`enqueue_many`'s work, inside its pause of the collector."""
        all_args: list[list[Any]] = []
        all_kwargs: list[dict[str, Any]] = []
        for call in calls:
            if (isinstance(call, tuple) and len(call) == 2 and isinstance(call[1], Mapping)
                    and isinstance(call[0], (list, tuple))):
                all_args.append(list(call[0]))
                all_kwargs.append(dict(call[1]))
            else:
                all_args.append(list(call))
                all_kwargs.append({})
        if not all_args:
            return []
        template = self.app.make_job(self.name, args=all_args[0], kwargs=all_kwargs[0])
        jobs = [template]
        # The others have the same options and timestamps: copies of the validated first.
        metadata = template.metadata
        for args, kwargs, job_id in zip(all_args[1:], all_kwargs[1:],
                                        new_job_ids(len(all_args) - 1), strict=True):
            jobs.append(template._replace(id=job_id, args=args, kwargs=kwargs,
                                          metadata=dict(metadata) if metadata else {}))
        return self.app.handles(self.app.enqueue_jobs(jobs))

    async def enqueue_many_async(
        self, calls: Iterable[Sequence[Any] | tuple[Sequence[Any], Mapping[str, Any]]],
    ) -> list[JobHandle[R]]:
        """`enqueue_many`, awaited (on the app's enqueue threads); same arguments.

        ``calls`` is consumed on the enqueue thread: pass a list, not a generator that
        shares state with the event loop."""
        return await self.app.offload(self.enqueue_many, calls)


class AsyncJobFunction(JobFunction[P, R]):
    """A registered ``async def`` function: as `JobFunction`, with ``R`` the awaited type.

    Calling it returns the coroutine, as calling the function would; workers await it.
    """

    # R is the awaited type here, so calling returns a coroutine of it, not R itself.
    def __call__(self, *args: P.args, **kwargs: P.kwargs) -> Coroutine[Any, Any, R]:  # type: ignore[override]
        """Call the function here: the coroutine to await (no storage involved)."""
        return cast("Coroutine[Any, Any, R]", self.fn(*args, **kwargs))


class JobDecorator(Protocol):
    """What ``@app.job(...)`` with options returns: it registers the function it gets."""

    @overload
    def __call__(self, fn: Callable[P, Coroutine[Any, Any, R]], /) -> AsyncJobFunction[P, R]:
        ...

    @overload
    def __call__(self, fn: Callable[P, R], /) -> JobFunction[P, R]: ...

    def __call__(self, fn: Callable[P, Any], /) -> JobFunction[P, Any]:
        """Register ``fn``; see `App.job`."""


class RegisteredWorker:
    """A class-based worker in the registry, with its options.

    Args:
        worker: The worker object.
        options: Its `JobOptions`.
    """

    def __init__(self, worker: ClassWorker, options: JobOptions) -> None:
        self.worker = worker
        self.options = options
        self.retry = options.retry

    def execute(self, job: Job, context: JobContext) -> Any:
        """Run the job through the worker's ``execute``."""
        return self.worker.execute(job, context)


#: What a registry holds for one job name.
Entry = JobFunction[Any, Any] | RegisteredWorker


class Registry(dict[str, Entry]):
    """Job names -> runnables (``JobFunction``s and `RegisteredWorker`s); a plain dict."""

    def register(self, name: str, entry: Entry) -> None:
        """Register ``entry`` under ``name``; re-registering the same function is allowed.

        Raises:
            ConfigurationError: ``name`` is taken by another function or worker.
        """
        existing = self.get(name)
        if existing is not None and getattr(existing, "fn", None) is not getattr(entry, "fn", None):
            raise ConfigurationError(f"job name {name!r} is registered already")
        self[name] = entry

    def options_for(self, name: str) -> JobOptions:
        """The registered options of ``name``, or the defaults for an unknown name."""
        entry = self.get(name)
        return entry.options if entry is not None else JobOptions()


class JobSource(Protocol):
    """What a server needs from an application (``qmlkit.client.App`` is one).

    Attributes:
        registry: Job names -> runnables.
        notifier: The after-commit fan-out local servers subscribe to for wake-ups.
    """

    @property
    def registry(self) -> Mapping[str, Runnable]:
        """Job names -> runnables."""

    @property
    def notifier(self) -> Notifier:
        """The app's after-commit notifier."""

    def tick_job(self, template: RecurringJob, tick: datetime) -> Job | None:
        """Build the job materialising ``tick`` of ``template``; ``None`` if dropped."""


def build_job(
    registry: Mapping[str, Any],
    method: str,
    *,
    args: Sequence[Any] = (),
    kwargs: Mapping[str, Any] | None = None,
    queue: str | None = None,
    priority: int | None = None,
    at: datetime | None = None,
    delay: timedelta | float | None = None,
    metadata: Mapping[str, Any] | None = None,
    job_id: str | None = None,
    max_retries: int | None = None,
    timeout: timedelta | float | None = None,
) -> Job:
    """Build (not store) a job for ``method`` with its registered defaults; see
    ``App.make_job`` for the arguments.

    Raises:
        ConfigurationError: A naive ``at``, both ``at`` and ``delay``, or a bad option.
    """
    entry = registry.get(method)
    now = utcnow()
    if (entry is not None and at is None and delay is None and queue is None
            and priority is None and metadata is None and job_id is None
            and max_retries is None and timeout is None):
        # The common case: only the arguments are new, and they are checked when the
        # storage encodes them; every other field comes from validated options.
        return _quick_job(entry.options, method, args, kwargs, now)
    opts = entry.options if entry is not None else JobOptions()
    run_at = limits.run_at(now, at, delay)
    q = opts.queue if queue is None else queue
    state: Enqueued | Scheduled
    try:
        if run_at is None:
            state = Enqueued(enqueued_at=now, queue=q)
        else:
            reason = (f"delay {(run_at - now).total_seconds():g} s" if delay is not None
                      else "at")
            state = Scheduled(enqueue_at=run_at, scheduled_at=now, reason=reason)
        fields: dict[str, Any] = {
            "method": method, "args": list(args), "kwargs": dict(kwargs or {}), "queue": q,
            "priority": opts.priority if priority is None else priority,
            "max_retries": opts.max_retries if max_retries is None else max_retries,
            "timeout_s": seconds(timeout) if timeout is not None else opts.timeout_s,
            "metadata": dict(metadata or {}), "created_at": now, "state": state,
        }
        if job_id is not None:
            fields["id"] = job_id
        return Job(**fields)
    except ValidationError as exc:
        raise limits.invalid_job(method, exc) from None


def _quick_job(opts: JobOptions, method: str, args: Sequence[Any],
               kwargs: Mapping[str, Any] | None, now: datetime) -> Job:
    """An Enqueued job built unvalidated: every field but the arguments comes from
    validated options."""
    return trusted(Job, {
        "id": new_job_id(), "method": method, "args": list(args),
        "kwargs": dict(kwargs) if kwargs else {}, "queue": opts.queue,
        "priority": opts.priority, "attempts": 0, "retry_count": 0,
        "max_retries": opts.max_retries, "timeout_s": opts.timeout_s, "metadata": {},
        "created_at": now, "expires_at": None,
        "state": trusted(Enqueued, {"name": "Enqueued", "enqueued_at": now,
                                    "queue": opts.queue, "reason": None}),
    })
