"""Middleware: code wrapped around every job execution, as in qml-rs's ``JobMiddleware``.

A middleware is any callable ``middleware(job, context, call_next) -> result``.
``call_next()`` runs the rest of the chain (and finally the job) and returns its result;
a middleware may act before and after it, return its own result without calling it, or
catch and translate the exception it raises. The first middleware in the chain is the
outermost.

In the asyncio pool (`compose_async`) a middleware may also be ``async def
middleware(job, context, call_next)``, awaiting ``call_next()`` (or offer such a
``call_async`` method beside its sync ``__call__``, to work in both pools); a sync one
works there unchanged, around ``def`` and ``async def`` jobs alike
(`qmlkit.processing.syncbridge`).
"""

from __future__ import annotations

import asyncio
import functools
import inspect
import logging
import time
from collections.abc import Awaitable, Callable, Sequence
from typing import Any, Protocol

from qmlkit.errors import MiddlewareError
from qmlkit.job import Job
from qmlkit.processing.context import JobContext

log = logging.getLogger("qmlkit.attempt")


class EnqueueMiddleware(Protocol):
    """The client-side (enqueue) middleware call signature; see ``qmlkit_enqueue_middleware``."""

    def __call__(self, jobs: list[Job], call_next: Callable[[list[Job]], list[str]]) -> list[str]:
        """Wrap one enqueue of ``jobs``; return the stored ids (usually ``call_next``'s)."""


class Middleware(Protocol):
    """The middleware call signature."""

    def __call__(self, job: Job, context: JobContext, call_next: Callable[[], Any]) -> Any:
        """Run around one attempt; return the result (usually ``call_next()``'s)."""


class LoggingMiddleware:
    """Log one structured line per attempt (qml-rs ``TracingMiddleware``).

    The line carries job id, method, queue, attempt, duration in ms and outcome
    (``ok`` or the exception type), at INFO for success and WARNING for failure. The
    same fields are attached to the record as ``extra`` for structured log handlers.
    """

    def __call__(self, job: Job, context: JobContext, call_next: Callable[[], Any]) -> Any:
        """Time the attempt and log its outcome; re-raise any exception unchanged."""
        start = time.perf_counter()
        outcome = "ok"
        try:
            return call_next()
        except BaseException as exc:
            outcome = outcome_name(exc, context)
            raise
        finally:
            self.log_attempt(job, context, start, outcome)

    async def call_async(self, job: Job, context: JobContext,
                         call_next: Callable[[], Awaitable[Any]]) -> Any:
        """The same, awaited in the asyncio pool (no greenlet needed)."""
        start = time.perf_counter()
        outcome = "ok"
        try:
            return await call_next()
        except BaseException as exc:
            outcome = outcome_name(exc, context)
            raise
        finally:
            self.log_attempt(job, context, start, outcome)

    @staticmethod
    def log_attempt(job: Job, context: JobContext, start: float, outcome: str) -> None:
        """Log the line of one attempt that began at ``start`` (``time.perf_counter()``
        seconds) and ended with ``outcome`` (``"ok"`` or the exception type's name).

        The job processor calls it directly for a `LoggingMiddleware` that is outermost
        in the chain, instead of wrapping the attempt in it: the same line, at less
        cost per attempt.
        """
        if outcome == "ok" and context.timed_out:  # returned, but past its timeout:
            outcome = "JobTimeout"  # stored as JobTimeout, so logged as one
        if log.isEnabledFor(logging.INFO):
            ms = (time.perf_counter() - start) * 1000
            fields = {"job_id": job.id, "method": job.method, "queue": job.queue,
                      "attempt": context.attempt, "duration_ms": round(ms, 3),
                      "outcome": outcome}
            level = logging.INFO if outcome == "ok" else logging.WARNING
            # A broken handler must not fail the job (a job that closed sys.stderr makes
            # logging's own handleError raise ValueError): the outcome is stored anyway.
            # (try, not contextlib.suppress: free when nothing raises, once per attempt)
            try:  # noqa: SIM105
                log.log(level, " ".join(f"{k}={v}" for k, v in fields.items()), extra=fields)
            except Exception:
                pass


def compose(
    middleware: Sequence[Middleware], job: Job, context: JobContext, run: Callable[[], Any]
) -> Any:
    """Run ``run`` inside ``middleware`` (first = outermost) and return the result.

    Any exception the chain raises propagates unchanged.

    Raises:
        MiddlewareError: A middleware neither called ``call_next`` nor returned a result
            (it returned ``None`` without running the job): almost always a forgotten
            ``return call_next()``. The message names the middleware.
    """
    if not middleware:
        return run()

    def step(i: int) -> Any:
        if i == len(middleware):
            return run()
        called = False

        def call_next() -> Any:
            nonlocal called
            called = True
            return step(i + 1)

        result = middleware[i](job, context, call_next)
        if result is None and not called:
            raise MiddlewareError(describe(middleware[i]))
        return result

    return step(0)


def outcome_name(exc: BaseException, context: JobContext) -> str:
    """The outcome an attempt's log line gives for ``exc``: its type's name, except
    ``"JobTimeout"`` for the ``CancelledError`` of an attempt past its timeout (the
    asyncio pool's watchdog cancels the attempt's whole task, so code of a middleware
    awaiting after ``call_next`` sees it raw), as the attempt is stored.

    Args:
        exc: What the attempt (or a middleware of it) raised.
        context: The attempt's context (``timed_out`` is set before the cancel).

    Returns:
        The name to log.
    """
    if isinstance(exc, asyncio.CancelledError) and context.timed_out:
        return "JobTimeout"
    return type(job_error(exc)).__name__


def job_error(exc: BaseException) -> BaseException:
    """The error a job raised: ``exc``, or the ``StopIteration`` inside the
    ``RuntimeError`` Python makes of one that leaves a coroutine (PEP 479), so a job's
    ``StopIteration`` is stored and logged as itself in every pool.

    Args:
        exc: What the attempt raised.

    Returns:
        ``exc``, or the ``StopIteration`` it wraps.
    """
    cause = exc.__cause__
    if type(exc) is RuntimeError and isinstance(cause, StopIteration):
        return cause
    return exc


def async_form(middleware: object) -> Callable[..., Awaitable[Any]] | None:
    """The ``async def`` form of ``middleware`` for `compose_async`, or ``None``.

    That is the middleware itself if it is ``async def`` (a function, or an object whose
    ``__call__`` is), else its ``call_async`` method if it has one (a middleware that
    works in both pools, like `LoggingMiddleware`) and its class does not override
    ``__call__`` below where ``call_async`` is defined, else ``None`` (a sync middleware:
    `compose_async` runs it through the sync bridge).
    """
    if inspect.iscoroutinefunction(middleware) or (
            callable(middleware) and inspect.iscoroutinefunction(middleware.__call__)):
        return middleware
    method = getattr(middleware, "call_async", None)
    if not inspect.iscoroutinefunction(method):
        return None
    mro = type(middleware).__mro__
    defines = [next((i for i, cls in enumerate(mro) if name in vars(cls)), len(mro))
               for name in ("call_async", "__call__")]
    # A subclass that overrides ``__call__`` but not ``call_async`` runs its own
    # ``__call__`` in the asyncio pool too, not the inherited async form.
    return method if defines[0] <= defines[1] else None


@functools.cache
def sync_bridge() -> tuple[Callable[..., Awaitable[Any]], Callable[[Awaitable[Any]], Any]]:
    """``(run_sync, wait_for)`` of `qmlkit.processing.syncbridge`, imported on first use.

    The bridge needs greenlet, which only a sync middleware in the asyncio pool uses:
    a thread-pool worker, or an asyncio pool whose middleware are all ``async``, never
    loads it.
    """
    from qmlkit.processing.syncbridge import run_sync, wait_for

    return run_sync, wait_for


async def compose_async(
    middleware: Sequence[Any], job: Job, context: JobContext,
    run: Callable[[], Awaitable[Any]],
    forms: Sequence[Callable[..., Awaitable[Any]] | None] | None = None,
) -> Any:
    """Await ``run()`` inside ``middleware`` (first = outermost) on the running loop.

    An ``async def`` middleware (see `async_form`) gets a ``call_next`` returning an
    awaitable; a sync one runs on the loop's thread through
    `qmlkit.processing.syncbridge.run_sync`, and its ``call_next()`` returns the result
    as in `compose`. Any exception propagates unchanged.

    Args:
        middleware: The chain, outermost first.
        job: The attempt's job.
        context: Its context.
        run: Awaits the job itself.
        forms: ``async_form`` of each middleware, computed once by the caller;
            ``None`` computes them now.

    Raises:
        MiddlewareError: A middleware neither called ``call_next`` nor returned a result.
    """
    if forms is None:
        forms = [async_form(m) for m in middleware]

    async def step(i: int) -> Any:
        if i == len(middleware):
            return await run()
        called = False
        current, form = middleware[i], forms[i]
        if form is not None:
            def call_next() -> Awaitable[Any]:
                nonlocal called
                called = True
                return step(i + 1)

            result = await form(job, context, call_next)
        else:
            run_sync, wait_for = sync_bridge()

            def call_next_sync() -> Any:
                nonlocal called
                called = True
                return wait_for(step(i + 1))

            result = await run_sync(current, job, context, call_next_sync)
        if result is None and not called:
            raise MiddlewareError(describe(current))
        return result

    return await step(0)


def compose_enqueue(
    middleware: Sequence[EnqueueMiddleware],
    jobs: list[Job],
    store: Callable[[list[Job]], list[str]],
) -> list[str]:
    """Run ``store(jobs)`` inside the enqueue middleware (first = outermost).

    Raises:
        MiddlewareError: A middleware returned ``None`` instead of the stored ids.
    """

    def step(i: int, current: list[Job]) -> list[str]:
        if i == len(middleware):
            return store(current)
        result = middleware[i](current, lambda js: step(i + 1, list(js)))
        if result is None:
            raise MiddlewareError(describe(middleware[i]))
        return result

    return step(0, jobs)


def describe(obj: object) -> str:
    """Name a middleware for messages: ``module.QualName``."""
    target = obj if callable(obj) and hasattr(obj, "__qualname__") else type(obj)
    return f"{getattr(target, '__module__', '?')}.{getattr(target, '__qualname__', repr(obj))}"
