"""The one room where an attempt's end becomes its outcome, and outcomes are stored.

An attempt that returned becomes Succeeded (`succeeded`); one that raised becomes
AwaitingRetry or Failed (`failed`), as its `RetryPolicy` decides (the policy itself
lives in `qmlkit.processing.retry`); `describe_exception` turns any exception into text
that can always be stored (field cases C11, C13). `store_outcomes` writes a batch of
outcomes in one transaction, retrying while the storage is down, and says which were
rejected by fencing.
"""

from __future__ import annotations

import logging
import threading
import time
import traceback
from collections.abc import Sequence
from datetime import datetime, timedelta
from pathlib import Path
from types import TracebackType
from typing import Any

from qmlkit.backoff import Backoff
from qmlkit.errors import QmlError, Retry, StaleClaim
from qmlkit.job import AwaitingRetry, Failed, Job, Succeeded, cap_text, trusted, utcnow
from qmlkit.limits import MAX_TIMESTAMP
from qmlkit.processing.retry import RetryPolicy, qualname
from qmlkit.storage.base import StateChange, Storage, Transition

__all__ = [
    "describe_exception", "failed", "storable_text", "store_outcomes", "succeeded", "unstorable",
]

log = logging.getLogger("qmlkit.processing.processor")  # the logger these lines had

_PROCESSING_DIR = str(Path(__file__).resolve().parent)

#: Store retries: the first wait and the longest one, in seconds.
STORE_RETRY_INITIAL_S = 0.05
STORE_RETRY_CAP_S = 5.0


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
        rendered, else ``None``. Message and trace are capped (``cap_text``), and a lone
        surrogate in them (text made from undecodable bytes, as ``os.fsdecode`` does)
        is written as its ``\\udcxx`` escape, so the text is valid UTF-8.
    """
    note = None
    type_name = qualname(type(exc))
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
    return (storable_text(type_name), storable_text(cap_text(message)),
            storable_text(cap_text(trace)) if trace else None, note)


def storable_text(text: str) -> str:
    """``text`` as valid UTF-8: each lone surrogate written as its backslash escape
    (``"caf\\udce9"``), the rest unchanged. Every storage encodes states as UTF-8."""
    if text.isascii():
        return text
    try:
        text.encode("utf-8")
        return text
    except UnicodeEncodeError:
        return text.encode("utf-8", "backslashreplace").decode("utf-8")


def capped(now: datetime, offset: timedelta) -> datetime:
    """``now + offset``, but never later than `qmlkit.limits.MAX_TIMESTAMP`.

    Args:
        now: An aware UTC time.
        offset: A non-negative duration (any size: a sum past year 9999 is capped too).

    Returns:
        The aware UTC time every backend can store.
    """
    if offset >= MAX_TIMESTAMP - now:
        return MAX_TIMESTAMP
    return now + offset


def expiry(now: datetime, ttl: timedelta | None) -> datetime | None:
    """The ``expires_at`` for a TTL: ``None`` keeps the job, ``timedelta(0)`` expires it at once.

    Args:
        now: The terminal state's time (aware UTC).
        ttl: The offset, or ``None`` to keep the job for ever.

    Returns:
        ``now + ttl`` capped to `qmlkit.limits.MAX_TIMESTAMP`, or ``None``.
    """
    if ttl is None:
        return None
    return capped(now, max(ttl, timedelta(0)))


def succeeded(job: Job, result: Any, duration_ms: float, *, ttl: timedelta | None) -> Transition:
    """The outcome of an attempt that returned ``result`` (already encoded to JSON values).

    Args:
        job: The claimed job.
        result: The stored result.
        duration_ms: How long the attempt ran, in milliseconds.
        ttl: ``expires_at`` offset from now, or ``None`` to keep the job.
    """
    now = utcnow()
    return Transition(
        job,
        # Built unvalidated: every field is of a known type, and this is per attempt.
        trusted(Succeeded, {"succeeded_at": now, "duration_ms": round(duration_ms, 3),
                            "result": result}),
        expires_at=expiry(now, ttl),
    )


def _retry_delay(job: Job, exc: BaseException, policy: RetryPolicy, retry_number: int) -> timedelta:
    delay = policy.backoff(retry_number)
    if isinstance(exc, Retry) and exc.delay is not None:
        try:  # a usable delay from the job; NaN or negative ones are ignored
            seconds = float(exc.delay)
            if seconds >= 0:  # False for NaN
                try:
                    delay = timedelta(seconds=seconds)
                except OverflowError:  # beyond timedelta: the latest storable time
                    delay = timedelta.max
            else:
                raise ValueError(seconds)
        except (TypeError, ValueError, OverflowError):
            log.warning("job %s: Retry(delay=%r) is unusable; using the policy's backoff",
                        job.id, exc.delay)
    return delay


def failed(job: Job, exc: BaseException, policy: RetryPolicy, *,
           ttl: timedelta | None) -> Transition:
    """The outcome of an attempt that raised ``exc``: AwaitingRetry or Failed.

    ``policy.should_retry`` decides; the delay is the policy's backoff, or a usable
    ``Retry(delay=...)`` the job raised (NaN or negative delays are logged and ignored);
    ``retry_at`` and ``expires_at`` are capped to `qmlkit.limits.MAX_TIMESTAMP`.

    Args:
        job: The claimed job.
        exc: What the attempt raised (a ``JobTimeout`` for a timeout).
        policy: The job name's own policy, else the server's.
        ttl: ``expires_at`` offset for a Failed job, or ``None`` to keep it.
    """
    type_name, message, trace, note = describe_exception(exc)
    now = utcnow()
    if policy.should_retry(exc, job.retry_count, job.max_retries):
        retry_number = job.retry_count + 1
        delay = _retry_delay(job, exc, policy, retry_number)
        return Transition(
            job,
            AwaitingRetry(retry_at=capped(now, delay), retry_count=retry_number,
                          last_exception=f"{type_name}: {message}", stack_trace=trace),
            retry_count=retry_number,
        )
    return Transition(
        job,
        Failed(failed_at=now, exception_type=type_name, message=message, stack_trace=trace,
               retry_count=job.retry_count, note=note),
        expires_at=expiry(now, ttl),
    )


def store_outcomes(storage: Storage, outcomes: Sequence[Transition], *,
                   aborting: threading.Event, observed: bool) -> list[StateChange] | None:
    """Store a batch of outcomes in one transaction, retrying while storage is down.

    Outcomes are never dropped: a store failing with a qmlkit error (`StorageError`:
    the storage is down or busy; `ConfigurationError`: credentials refused) or an
    ``OSError`` is retried with a capped, jittered backoff (`qmlkit.backoff.Backoff`,
    0.05 s to 5 s) until it succeeds, unless ``aborting`` is set, when it gives up after
    logging. Any other error says one outcome may never be storable (a state the storage
    cannot encode): the batch is then stored one outcome at a time, so the others are
    not held back, and an outcome that still fails so is replaced once by a ``Failed``
    state naming the error (`unstorable`); if even that fails, it is logged and left
    (its job stays Processing until a stranded sweep requeues it). An outcome that
    fencing rejects (``StaleClaim``: the job was released, claimed again or deleted
    since this attempt's claim) is logged and discarded.

    Args:
        storage: Where to store them.
        outcomes: The transitions; empty is a no-op.
        aborting: Set while the server aborts: give up instead of retrying.
        observed: Whether state-change observers listen (else only changes back to
            Enqueued are returned, for wake-ups).

    Returns:
        The committed changes to announce, or ``None`` if the store was given up.
    """
    if not outcomes:
        return []
    logger = logging.getLogger("qmlkit.processing.server")  # the logger these lines had
    backoff = Backoff(STORE_RETRY_INITIAL_S, STORE_RETRY_CAP_S)
    replaced = False
    while True:
        try:
            results = storage.transition_many(list(outcomes))
            break
        except Exception as exc:  # never drop outcomes: retry until storage is back
            if aborting.is_set():
                logger.error("could not store %d outcome(s) during abort: %s", len(outcomes), exc)
                return None
            if not isinstance(exc, (QmlError, OSError)):  # not the storage: one outcome?
                if len(outcomes) > 1:
                    logger.warning("storing %d outcome(s) failed (%s: %s); storing them "
                                   "one by one", len(outcomes), type(exc).__name__, exc)
                    return _one_by_one(storage, outcomes, aborting=aborting, observed=observed)
                if replaced:
                    logger.error("outcome of job %s could not be stored, nor a Failed state "
                                 "in its place (%s: %s); left Processing", outcomes[0].job.id,
                                 type(exc).__name__, exc)
                    return None
                logger.error("outcome of job %s cannot be stored (%s: %s); storing it as "
                             "Failed", outcomes[0].job.id, type(exc).__name__, exc)
                outcomes, replaced = [unstorable(outcomes[0], exc)], True
                continue
            delay = backoff.next()
            logger.warning("storing %d outcome(s) failed (%s: %s); retrying in %.2f s",
                           len(outcomes), type(exc).__name__, exc, delay)
            time.sleep(backoff.jittered(delay))
    changes = []
    for item, result in zip(outcomes, results, strict=True):
        if isinstance(result, StaleClaim):
            if aborting.is_set():  # this server released it when its grace period ran out
                logger.info("outcome of job %s (attempt %d) discarded: the job was released "
                            "to its queue when this server stopped (%s)",
                            item.job.id, item.token, result)
            else:
                logger.warning("outcome of job %s (attempt %d) discarded: %s",
                               item.job.id, item.token, result)
        elif observed or result.state.name == "Enqueued":
            changes.append(StateChange(result, item.job.state))
    return changes


def _one_by_one(storage: Storage, outcomes: Sequence[Transition], *,
                aborting: threading.Event, observed: bool) -> list[StateChange] | None:
    """`store_outcomes` of each outcome alone; the changes of those stored."""
    changes: list[StateChange] = []
    stored_any = False
    for item in outcomes:
        done = store_outcomes(storage, [item], aborting=aborting, observed=observed)
        if done is not None:
            stored_any = True
            changes.extend(done)
    return changes if stored_any else None


def unstorable(item: Transition, exc: BaseException) -> Transition:
    """A ``Failed`` state for a job whose outcome the storage could not store.

    Args:
        item: The outcome that failed to store (fenced by its job's attempt).
        exc: What storing it raised.

    Returns:
        The same job's transition to ``Failed`` (no retry: the outcome would fail again),
        with ``exception_type`` ``qmlkit.errors.PayloadError`` and a message naming
        ``exc`` and the state that could not be stored. Kept for ever (no TTL), so it
        can be looked at.
    """
    message = storable_text(cap_text(
        f"the attempt ended {item.state.name}, but that state could not be stored "
        f"({qualname(type(exc))}: {exc})"))
    state = Failed(failed_at=utcnow(), exception_type="qmlkit.errors.PayloadError",
                   message=message, stack_trace=None, retry_count=item.job.retry_count)
    return Transition(item.job, state)
