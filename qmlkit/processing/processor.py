"""``JobProcessor``: one attempt from claimed job to the transition that records it.

Port of qml-rs's ``JobProcessor``: look up the job's function, run it inside the
middleware chain with a timeout, and turn the outcome into Succeeded, AwaitingRetry
(per the retry policy) or Failed. It never raises for anything a job does: a bad
payload, an unknown name, an unprintable exception or an unstorable result all end as a
Failed state with the reason (field cases C11, C13). Storing the transition is the
caller's job, so a worker can store a whole batch in one transaction.
"""

from __future__ import annotations

import asyncio
import json
import logging
import time
import traceback
from pathlib import Path
from types import TracebackType
from collections.abc import Callable, Sequence
from datetime import timedelta
from typing import Any, Protocol

from qmlkit.errors import JobTimeout, PayloadError, Retry, UnknownJobName
from qmlkit.job import (
    AwaitingRetry,
    Failed,
    Job,
    Succeeded,
    cap_text,
    encode_json,
    trusted,
    utcnow,
)
from qmlkit.processing.context import JobContext, reset_current, set_current
from qmlkit.processing.middleware import Middleware, compose
from qmlkit.processing.retry import RetryPolicy, _qualname
from qmlkit.storage.base import Transition

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


_PROCESSING_DIR = str(Path(__file__).resolve().parent)


def _user_frames(tb: TracebackType | None) -> TracebackType | None:
    """Skip the leading frames of qmlkit's own processing machinery (processor,
    middleware chain), so a stored traceback starts where the job's code does.
    Frames of middleware written by users stay."""
    first = tb
    while tb is not None:
        if not tb.tb_frame.f_code.co_filename.startswith(_PROCESSING_DIR):
            return tb
        tb = tb.tb_next
    return first  # the error is qmlkit's own (e.g. an unknown job name): keep it all


def describe_exception(exc: BaseException) -> tuple[str, str, str | None, str | None]:
    """Turn an exception into text that can always be stored.

    Never raises, even for an exception whose ``__str__`` or traceback formatting fails.

    Returns:
        ``(type_name, message, stack_trace, note)``; ``note`` says what could not be
        rendered, else ``None``. Message and trace are capped (``cap_text``).
    """
    note = None
    type_name = _qualname(type(exc))
    try:
        message = str(exc)
    except Exception as err:  # an exception whose __str__ fails must not hide the failure
        message = f"<unprintable {type(exc).__name__}>"
        note = f"str() of the exception raised {type(err).__name__}: {err!r}"[:500]
    try:
        trace: str | None = "".join(
            traceback.format_exception(type(exc), exc, _user_frames(exc.__traceback__)))
    except Exception as err:
        trace = None
        note = (note + "; " if note else "") + f"traceback could not be formatted: {err!r}"[:500]
    return type_name, cap_text(message), cap_text(trace) if trace else None, note


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
    ) -> None:
        self.lookup = lookup
        self.registered = registered
        self.retry_policy = retry_policy
        self.middleware = tuple(middleware)
        self.job_timeout = job_timeout
        self.succeeded_ttl = succeeded_ttl
        self.failed_ttl = failed_ttl
        self.max_result_bytes = max_result_bytes

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
        now = utcnow()
        return Transition(
            job,
            # Built unvalidated: every field is of a known type, and this is per attempt.
            trusted(Succeeded, {"succeeded_at": now, "duration_ms": round(duration_ms, 3),
                                "result": stored}),
            expires_at=now + self.succeeded_ttl if self.succeeded_ttl else None,
        )

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
        type_name, message, trace, note = describe_exception(exc)
        policy = (runnable.retry if runnable is not None else None) or self.retry_policy
        now = utcnow()
        retryable = policy.should_retry(exc, job.retry_count, job.max_retries)
        if retryable:
            retry_number = job.retry_count + 1
            delay = policy.backoff(retry_number)
            if isinstance(exc, Retry) and exc.delay is not None:
                try:  # a usable delay from the job; NaN, negative or huge ones are ignored
                    asked = timedelta(seconds=float(exc.delay))
                    if asked >= timedelta(0):
                        now + asked  # noqa: B018 - raises OverflowError past year 9999
                        delay = asked
                except (TypeError, ValueError, OverflowError):
                    log.warning("job %s: Retry(delay=%r) is unusable; using the policy's backoff",
                                job.id, exc.delay)
            return Transition(
                job,
                AwaitingRetry(retry_at=now + delay, retry_count=retry_number,
                              last_exception=f"{type_name}: {message}", stack_trace=trace),
                retry_count=retry_number,
            )
        return Transition(
            job,
            Failed(failed_at=now, exception_type=type_name, message=message, stack_trace=trace,
                   retry_count=job.retry_count, note=note),
            expires_at=now + self.failed_ttl if self.failed_ttl else None,
        )
