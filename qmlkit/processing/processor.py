"""``JobProcessor``: one attempt from claimed job to the transition that records it.

Port of qml-rs's ``JobProcessor``: look up the job's function, run it inside the
middleware chain with a timeout, and turn the outcome into Succeeded, AwaitingRetry
(per the retry policy) or Failed through `qmlkit.processing.outcome`. It never raises for anything a job does: a bad
payload, an unknown name, an unprintable exception or an unstorable result all end as a
Failed state with the reason (field cases C11, C13). Storing the transition is the
caller's job, so a worker can store a whole batch in one transaction.
"""

from __future__ import annotations

import asyncio
import json
import logging
import time
from collections.abc import Callable, Sequence
from datetime import timedelta
from typing import Any, Protocol

from qmlkit.errors import JobTimeout, PayloadError, UnknownJobName
from qmlkit.job import Job, encode_json
from qmlkit.processing import outcome
from qmlkit.processing.context import JobContext, reset_current, set_current
from qmlkit.processing.middleware import Middleware, compose
from qmlkit.processing.outcome import describe_exception
from qmlkit.processing.retry import RetryPolicy
from qmlkit.storage.base import Transition

__all__ = ["JobProcessor", "Runnable", "describe_exception"]

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

    def run(self, job: Job, context: JobContext, loop: asyncio.AbstractEventLoop | None) -> Transition:
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
        except BaseException as exc:  # noqa: BLE001 - every failure of a job is recorded
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
        try:

            encoded: list[Any] = []

            def invoke() -> Any:
                result = runnable.execute(job, context)
                if asyncio.iscoroutine(result):
                    result = self._await(result, job, context, loop)
                # Encode inside the chain, so middleware sees an unstorable result fail.
                encoded.append((result, self._encode_result(result)))
                return result

            result = compose(self.middleware, job, context, invoke)
            if encoded and encoded[0][0] is result:
                return _Encoded(encoded[0][1])
            return result  # a middleware's own result: encoded by the caller
        finally:
            reset_current(token)

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

    def _encode_result(self, result: Any) -> Any:
        if result is None:
            return None
        text = encode_json(result, "result")
        size = len(text.encode("utf-8")) if len(text) * 4 > self.max_result_bytes else len(text)
        if size > self.max_result_bytes:
            raise PayloadError(
                f"result encodes to {size} bytes, over the limit of {self.max_result_bytes}",
                where="result",
            )
        return json.loads(text)

    def _failure(self, job: Job, exc: BaseException, runnable: Runnable | None) -> Transition:
        if self.on_failure is not None:
            self.on_failure(job, exc)
        policy = (runnable.retry if runnable is not None else None) or self.retry_policy
        return outcome.failed(job, exc, policy, ttl=self.failed_ttl)
