"""``JobProcessor``: one attempt from claimed job to the transition that records it.

Port of qml-rs's ``JobProcessor``: look up the job's function, run it inside the
middleware chain with a timeout, and turn the outcome into Succeeded, AwaitingRetry
(per the retry policy) or Failed through `qmlkit.processing.outcome`. It never raises
for anything a job does: a bad payload, an unknown name, an unprintable exception or an
unstorable result all end as a Failed state with the reason (field cases C11, C13).
Storing the transition is the caller's job, so a worker can store a whole batch in one
transaction.

`JobProcessor.run` runs an attempt on the calling thread (the thread pool);
`JobProcessor.run_async` awaits it on a running event loop (the asyncio pool), with
``def`` jobs handed to an executor and the middleware chain run by
`qmlkit.processing.middleware.compose_async`.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import inspect
import json
import logging
import time
from collections.abc import Awaitable, Callable, Sequence
from datetime import timedelta
from typing import TYPE_CHECKING, Any, Protocol

from qmlkit.errors import JobTimeout, PayloadError, UnknownJobName
from qmlkit.job import Job, encode_json
from qmlkit.processing import outcome
from qmlkit.processing.context import JobContext, reset_current, set_current
from qmlkit.processing.middleware import (
    LoggingMiddleware,
    Middleware,
    async_form,
    compose,
    compose_async,
    job_error,
    outcome_name,
)
from qmlkit.processing.outcome import describe_exception
from qmlkit.processing.retry import RetryPolicy
from qmlkit.storage.base import Transition

if TYPE_CHECKING:
    from qmlkit.processing.watchdog import Watchdog

__all__ = ["JobProcessor", "Offload", "Runnable", "describe_exception", "is_async_runnable"]

#: ``asyncio.timeout`` where the Python has it (3.11+), else ``None`` (``wait_for``).
_TIMEOUT = getattr(asyncio, "timeout", None)

#: How the asyncio pool runs a ``def`` job: ``await offload(fn)`` calls ``fn()`` on an
#: executor thread (with the attempt's context variables) and returns its result.
Offload = Callable[[Callable[[], Any]], Awaitable[Any]]

log = logging.getLogger(__name__)


class _Encoded:
    """A job's result already encoded to stored JSON inside the middleware chain."""

    __slots__ = ("value",)

    def __init__(self, value: Any) -> None:
        self.value = value


class Runnable(Protocol):
    """What the registry holds for each job name: a function or a class-based worker."""

    retry: RetryPolicy | None

    def execute(self, job: Job, context: JobContext) -> Any:
        """Run the job; return its result (a coroutine for ``async def`` jobs)."""


def is_async_runnable(runnable: object) -> bool:
    """Whether a registered runnable is ``async def`` (its function, or a class-based
    worker's ``execute``): the asyncio pool then runs it on the loop, not the executor."""
    target = getattr(runnable, "fn", None)
    if target is None:
        target = getattr(getattr(runnable, "worker", None), "execute", None)
    return inspect.iscoroutinefunction(target if target is not None
                                       else getattr(runnable, "execute", None))


class JobProcessor:
    """Runs attempts and decides their outcome.

    Args:
        lookup: Returns the registered runnable for a job name, or ``None``.
        registered: Returns every registered name (for the unknown-name error).
        retry_policy: The default policy; a job function's own policy overrides it.
        middleware: The chain, outermost first.
        job_timeout: Default per-attempt limit when a job has no ``timeout_s``.
        succeeded_ttl: ``expires_at`` offset stamped on Succeeded jobs.
        failed_ttl: ``expires_at`` offset stamped on Failed jobs.
        max_result_bytes: Largest stored result, in bytes of JSON.
        on_failure: Called with ``(job, exc)`` for every attempt that raised, with the
            exception its outcome records (after timeout translation), before the
            outcome is built; inline mode uses it to re-raise. ``None``: nothing called.
    """

    def __init__(
        self,
        *,
        lookup: Callable[[str], Runnable | None],
        registered: Callable[[], Sequence[str]],
        retry_policy: RetryPolicy,
        middleware: Sequence[Middleware],
        job_timeout: timedelta | None,
        succeeded_ttl: timedelta | None,
        failed_ttl: timedelta | None,
        max_result_bytes: int,
        on_failure: Callable[[Job, BaseException], None] | None = None,
    ) -> None:
        self.lookup = lookup
        self.registered = registered
        self.retry_policy = retry_policy
        self.middleware = tuple(middleware)
        # The outermost built-in logging middleware run inline (`_log_attempt`), not as
        # a layer of the chain: the same lines, without a closure and a coroutine frame
        # per attempt and layer. Only exact `LoggingMiddleware` instances: a subclass may
        # override `__call__`.
        lead = 0
        while lead < len(self.middleware) and type(self.middleware[lead]) is LoggingMiddleware:
            lead += 1
        self._logging: tuple[LoggingMiddleware, ...] = tuple(
            m for m in self.middleware[:lead] if isinstance(m, LoggingMiddleware))
        self._chain = self.middleware[lead:]
        self._async_forms = tuple(async_form(m) for m in self._chain)
        self._on_loop: dict[int, tuple[object, bool]] = {}  # id(runnable) -> (it, async?)
        self.job_timeout = job_timeout
        self.succeeded_ttl = succeeded_ttl
        self.failed_ttl = failed_ttl
        self.max_result_bytes = max_result_bytes
        self.on_failure = on_failure

    def timeout_for(self, job: Job) -> float | None:
        """Return the attempt's limit in seconds, or ``None`` for none."""
        if job.timeout_s is not None:
            return job.timeout_s
        return self.job_timeout.total_seconds() if self.job_timeout else None

    def run(self, job: Job, context: JobContext,
            loop: asyncio.AbstractEventLoop | None) -> Transition:
        """Run one attempt of ``job`` and return the transition that records its outcome.

        Args:
            job: The claimed job (Processing).
            context: Its context; ``context.cancelled`` is set by the caller's watchdog
                when the timeout passes.
            loop: An event loop owned by this thread, for ``async def`` jobs.

        Returns:
            The transition to store. Never raises for a failure of the job.
        """
        runnable = self.lookup(job.method)
        start = time.perf_counter()
        try:
            if runnable is None:
                raise UnknownJobName(job.method, self.registered())
            result = self._call(runnable, job, context, loop)
            if context.timed_out:
                raise JobTimeout(self.timeout_for(job) or 0.0)
            stored = result.value if isinstance(result, _Encoded) else self._encode_result(result)
        except BaseException as exc:  # every failure of a job is recorded
            # Even SystemExit or KeyboardInterrupt raised by job code fails only that job:
            # on a worker thread, it would otherwise end the thread and strand the batch.
            if context.timed_out and not isinstance(exc, JobTimeout):
                exc = JobTimeout(self.timeout_for(job) or 0.0)
            return self._failure(job, exc, runnable)
        duration_ms = (time.perf_counter() - start) * 1000
        return outcome.succeeded(job, stored, duration_ms, ttl=self.succeeded_ttl)

    def _call(
        self,
        runnable: Runnable,
        job: Job,
        context: JobContext,
        loop: asyncio.AbstractEventLoop | None,
    ) -> Any:
        token = set_current(context)
        start, logged = time.perf_counter(), "ok"
        try:
            if not self._chain:  # the default: nothing to wrap but the inline logging
                result = runnable.execute(job, context)
                if asyncio.iscoroutine(result):
                    result = self._await(result, job, context, loop)
                return _Encoded(self._encode_result(result))

            encoded: list[Any] = []

            def invoke() -> Any:
                result = runnable.execute(job, context)
                if asyncio.iscoroutine(result):
                    result = self._await(result, job, context, loop)
                # Encode inside the chain, so middleware sees an unstorable result fail.
                encoded.append((result, self._encode_result(result)))
                return result

            result = compose(self._chain, job, context, invoke)
            if encoded and encoded[0][0] is result:
                return _Encoded(encoded[0][1])
            return result  # a middleware's own result: encoded by the caller
        except BaseException as exc:
            logged = outcome_name(exc, context)
            raise
        finally:
            if self._logging:
                self._log_attempt(job, context, start, logged)
            reset_current(token)

    def _log_attempt(self, job: Job, context: JobContext, start: float, outcome: str) -> None:
        """What each inline `LoggingMiddleware` logs, innermost first (as nested ones)."""
        for middleware in reversed(self._logging):
            middleware.log_attempt(job, context, start, outcome)  # (never raises)

    def _await(
        self, coro: Any, job: Job, context: JobContext, loop: asyncio.AbstractEventLoop | None
    ) -> Any:
        timeout = self.timeout_for(job)
        own = loop is None  # no loop of the worker's: one for this attempt, closed after
        run_on = asyncio.new_event_loop() if own else loop
        assert run_on is not None
        try:
            return run_on.run_until_complete(asyncio.wait_for(coro, timeout))
        except (asyncio.TimeoutError, TimeoutError) as exc:
            context.timed_out = True
            context.cancelled.set()
            raise JobTimeout(timeout or 0.0) from exc
        finally:
            if own:
                run_on.close()

    async def run_async(self, job: Job, context: JobContext, offload: Offload,
                        watchdog: Watchdog | None = None,
                        aborted: Callable[[], bool] | None = None) -> Transition:
        """Run one attempt of ``job`` on the running event loop (the asyncio pool).

        As `run`, but the middleware chain is awaited (`compose_async`): an ``async
        def`` job runs as part of this task, and its timeout cancels it (the task is
        cancelled, and the attempt ends with ``JobTimeout`` following the retry policy);
        a ``def`` job runs through ``offload`` and, as in the thread pool, is only told of
        its timeout through ``context.cancelled``.

        Args:
            job: The claimed job (Processing).
            context: Its context.
            offload: Runs a ``def`` job's call on an executor thread.
            watchdog: Enforces the timeout: it sets ``context.cancelled`` at the deadline
                and, for an ``async def`` job, cancels this task. ``None``: an
                ``asyncio.timeout`` of the attempt's own does it (a timer per attempt).
            aborted: Whether the caller has aborted this attempt (the server released
                its job): only then is a cancellation of the task not a failure of the
                job. ``None``: every cancellation of the task is taken as an abort.

        Returns:
            The transition to store. Never raises for a failure of the job.

        Raises:
            asyncio.CancelledError: The task was cancelled and ``aborted()`` is true (the
                pool aborts). Any other ``CancelledError`` (one the job raises of its own,
                or a cancellation of the task by the job's code or another job's) fails
                the attempt like any other error; past the timeout it is ``JobTimeout``.
        """
        runnable = self.lookup(job.method)
        start = time.perf_counter()
        timeout = self.timeout_for(job)
        watched = False
        try:
            if runnable is None:
                raise UnknownJobName(job.method, self.registered())
            on_loop = self._runs_on_loop(runnable)
            canceller = None
            watch = None
            if watchdog is not None and timeout is not None:
                if on_loop:
                    canceller = _TaskCanceller(context)
                    watchdog.watch(context, timeout, canceller)
                else:  # from when it gets its executor thread, not while it waits for one
                    watch = functools.partial(watchdog.watch, context, timeout)
                watched = True
            result = await self._call_async(runnable, job, context, offload, on_loop,
                                            canceller=canceller, watch=watch)
            if context.timed_out:
                raise JobTimeout(timeout or 0.0)
            stored = result.value if isinstance(result, _Encoded) else self._encode_result(result)
        except asyncio.CancelledError as exc:
            if not context.timed_out and (aborted is None or aborted()):
                raise  # the pool is aborting: the server released the job already
            uncancel_current_task()  # the task goes on: to store this attempt's outcome
            return self._failure(job, JobTimeout(timeout or 0.0) if context.timed_out
                                 else exc, runnable)
        except BaseException as exc:  # every failure of a job is recorded
            if context.timed_out and not isinstance(exc, JobTimeout):
                exc = JobTimeout(timeout or 0.0)
            return self._failure(job, exc, runnable)
        finally:
            if watched:
                assert watchdog is not None
                watchdog.done(context)
        duration_ms = (time.perf_counter() - start) * 1000
        return outcome.succeeded(job, stored, duration_ms, ttl=self.succeeded_ttl)

    def runs_on_loop(self, method: str) -> bool:
        """Whether jobs named ``method`` run on the event loop (``async def``) in
        `run_async`, rather than on its executor; ``False`` for an unknown name."""
        runnable = self.lookup(method)
        return runnable is not None and self._runs_on_loop(runnable)

    def _runs_on_loop(self, runnable: Runnable) -> bool:
        """Whether ``runnable`` is ``async def`` (`is_async_runnable`), remembered."""
        known = self._on_loop.get(id(runnable))
        if known is None or known[0] is not runnable:
            known = self._on_loop[id(runnable)] = (runnable, is_async_runnable(runnable))
        return known[1]

    async def _call_async(self, runnable: Runnable, job: Job, context: JobContext,
                          offload: Offload, on_loop: bool, *,
                          canceller: _TaskCanceller | None,
                          watch: Callable[[], None] | None = None) -> Any:
        token = set_current(context)
        start, logged = time.perf_counter(), "ok"
        try:
            if not self._chain:  # the default: nothing to wrap but the inline logging
                return _Encoded(self._encode_result(
                    await self._invoke_async(runnable, job, context, offload, on_loop,
                                             canceller, watch)))
            encoded: list[Any] = []

            async def invoke() -> Any:
                result = await self._invoke_async(runnable, job, context, offload, on_loop,
                                                  canceller, watch)
                encoded.append((result, self._encode_result(result)))
                return result

            result = await compose_async(self._chain, job, context, invoke, self._async_forms)
            if encoded and encoded[0][0] is result:
                return _Encoded(encoded[0][1])
            return result
        except BaseException as exc:
            logged = outcome_name(exc, context)
            raise
        finally:
            if self._logging:
                self._log_attempt(job, context, start, logged)
            reset_current(token)

    async def _invoke_async(self, runnable: Runnable, job: Job, context: JobContext,
                            offload: Offload, on_loop: bool,
                            canceller: _TaskCanceller | None,
                            watch: Callable[[], None] | None = None) -> Any:
        """The job itself: on the loop, or offloaded (``watch``, if given, starts its
        timeout on the executor thread); its timeout made `JobTimeout`."""
        if on_loop:
            result = runnable.execute(job, context)
        elif watch is None:
            result = await offload(lambda: runnable.execute(job, context))
        else:
            def started() -> Any:
                watch()
                return runnable.execute(job, context)

            result = await offload(started)
        if not inspect.isawaitable(result):
            return result
        if canceller is None:  # no watchdog cancels this task: a timer of its own
            return await self._await_on_loop(result, job, context)
        try:
            return await result
        except asyncio.CancelledError as exc:
            if not context.timed_out:
                raise
            uncancel_current_task()
            raise JobTimeout(self.timeout_for(job) or 0.0) from exc
        finally:
            # The timeout covers the job, as a timer around it would: middleware code
            # after ``call_next`` is not cancelled by it.
            canceller.disarm()

    async def _await_on_loop(self, awaitable: Any, job: Job, context: JobContext) -> Any:
        timeout = self.timeout_for(job)
        try:
            if timeout is None:
                return await awaitable
            if _TIMEOUT is not None:  # Python 3.11+: no extra task per attempt
                async with _TIMEOUT(timeout):
                    return await awaitable
            return await asyncio.wait_for(awaitable, timeout)
        except (asyncio.TimeoutError, TimeoutError) as exc:
            context.timed_out = True
            context.cancelled.set()
            raise JobTimeout(timeout or 0.0) from exc

    def _encode_result(self, result: Any) -> Any:
        if result is None:
            return None
        text = encode_json(result, "result")
        if text.isascii():
            size = len(text)
        else:  # count its bytes, and refuse what no storage can encode
            try:
                size = len(text.encode("utf-8"))
            except UnicodeEncodeError as exc:
                raise PayloadError(
                    f"result holds text that is not valid UTF-8 (a lone surrogate at "
                    f"character {exc.start} of its JSON, as from undecodable bytes "
                    f"decoded with os.fsdecode or 'surrogateescape'); return bytes as "
                    f"base64 or decode them with errors='replace'",
                    where="result",
                ) from None
        if size > self.max_result_bytes:
            raise PayloadError(
                f"result encodes to {size} bytes, over the limit of {self.max_result_bytes}",
                where="result",
            )
        return json.loads(text)

    def timed_out(self, job: Job) -> Transition:
        """The outcome of an attempt of ``job`` ended for running past its timeout, from
        outside the attempt (the server stopping while it still runs): ``JobTimeout``,
        following the job's retry policy, as if the attempt had raised it.

        Args:
            job: The claimed job (Processing).

        Returns:
            The transition to store (AwaitingRetry or Failed).
        """
        return self._failure(job, JobTimeout(self.timeout_for(job) or 0.0),
                             self.lookup(job.method))

    def _failure(self, job: Job, exc: BaseException, runnable: Runnable | None) -> Transition:
        exc = job_error(exc)
        if self.on_failure is not None:
            self.on_failure(job, exc)
        policy = (runnable.retry if runnable is not None else None) or self.retry_policy
        return outcome.failed(job, exc, policy, ttl=self.failed_ttl)


class _TaskCanceller:
    """For `Watchdog.watch`: cancels the running task (this attempt's) from the watchdog's
    thread once ``context`` has timed out, while the job itself runs (`disarm` ends that
    when its ``await`` returns); nothing once the task has ended."""

    __slots__ = ("armed", "context", "loop", "task")

    def __init__(self, context: JobContext) -> None:
        task = asyncio.current_task()
        assert task is not None
        self.task, self.loop, self.context = task, asyncio.get_running_loop(), context
        self.armed = True

    def __call__(self) -> None:
        with contextlib.suppress(RuntimeError):  # the loop has closed: nothing runs
            self.loop.call_soon_threadsafe(self._cancel)

    def _cancel(self) -> None:
        if self.armed and not self.task.done() and self.context.timed_out:
            self.task.cancel()

    def disarm(self) -> None:
        """The job's ``await`` has ended: a later timeout cancels nothing (loop thread)."""
        self.armed = False


def uncancel_current_task() -> None:
    """Take back a cancellation of the running task that was handled (a timeout's, or
    one by job code that the attempt outlives), so its later ``await``s (and any
    ``asyncio.timeout`` in them) work as in an uncancelled task. Does nothing before
    Python 3.11 (no ``Task.uncancel``) or outside a task."""
    task = asyncio.current_task()
    cancelling = getattr(task, "cancelling", None)  # Python 3.11+
    if cancelling is not None and cancelling():
        task.uncancel()  # type: ignore[union-attr]
