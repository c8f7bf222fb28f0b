"""``JobContext``: what a running job can know and ask about its attempt."""

from __future__ import annotations

import asyncio
import contextvars
import logging
import math
import threading
from collections.abc import Callable, Mapping
from typing import Any

from qmlkit.job import Job, cap_text, utcnow

#: ``(job_id, token, progress) -> stored?``: how a context stores progress (the
#: storage's ``report_progress``).
ProgressSink = Callable[..., bool]

_current: contextvars.ContextVar[JobContext | None] = contextvars.ContextVar(
    "qmlkit_job_context", default=None
)


_EVENT_LOCK = threading.Lock()


class CancelEvent(threading.Event):
    """`JobContext.cancelled`: a `threading.Event` whose truth is whether it is set.

    So ``while not context.cancelled:`` reads as it should (a plain `threading.Event` is
    always true); ``is_set()``, ``wait(timeout)`` and ``set()`` work as on any event.
    """

    def __bool__(self) -> bool:
        return self.is_set()


class JobContext:
    """The context of one attempt, passed to middleware and class-based workers.

    Job functions reach it with `current_context`.

    Attributes:
        job: The job, in Processing, as claimed.
        worker_id: The worker thread running it.
        server_name: The server it runs on.
        stopping: Set when the server begins a graceful stop: finish soon, or checkpoint.
            The attempt is still allowed to complete.
        timed_out: Whether ``cancelled`` was set because the timeout passed.
    """

    __slots__ = ("_cancelled", "_progress_sink", "job", "server_name", "stopping", "timed_out",
                 "worker_id")

    def __init__(
        self,
        job: Job,
        worker_id: str,
        server_name: str,
        stopping: threading.Event | None = None,
        progress_sink: ProgressSink | None = None,
    ) -> None:
        """Make the context of one attempt.

        Args:
            job: The claimed job.
            worker_id: The worker running it.
            server_name: Its server.
            stopping: The server's stopping event; a fresh one if ``None``.
            progress_sink: Where `report_progress` stores progress (the server passes
                its storage's ``report_progress``); ``None`` keeps reports in memory only.
        """
        self._progress_sink = progress_sink
        self.job = job
        self.worker_id = worker_id
        self.server_name = server_name
        self.stopping = stopping if stopping is not None else threading.Event()
        self.timed_out = False
        self._cancelled: CancelEvent | None = None

    @property
    def cancelled(self) -> CancelEvent:
        """Set when the attempt must end now: its timeout passed, or the server's grace
        period ran out. Cooperative: long jobs should check `is_cancelled()` (or
        ``while not context.cancelled:``, or wait on this event) and return or raise.
        Made on first use: most attempts never look.
        """
        event = self._cancelled
        if event is None:
            with _EVENT_LOCK:
                if self._cancelled is None:
                    self._cancelled = CancelEvent()
                event = self._cancelled
        return event

    @property
    def logger(self) -> logging.LoggerAdapter[logging.Logger]:
        """A logger for the job, with ``job_id`` and ``method`` as record attributes."""
        return logging.LoggerAdapter(
            logging.getLogger("qmlkit.job"), {"job_id": self.job.id, "method": self.job.method}
        )

    @property
    def attempt(self) -> int:
        """This attempt's number, 1 for the first claim: also its fencing token."""
        return self.job.attempts

    def report_progress(self, fraction: float, message: str | None = None) -> bool:
        """Record how far the attempt has got; the dashboard shows it as a progress bar.

        Stored under the job's ``metadata["progress"]`` as ``{"fraction", "message",
        "at", "attempt"}``, fenced by this attempt's token (a report from an attempt that lost its
        claim is dropped). Each call is one storage write: report a few times per second
        at most. Like Celery's ``update_state(state="PROGRESS", meta=...)``.

        Args:
            fraction: Done so far, from 0.0 to 1.0.
            message: A short human note (capped at 500 characters), e.g. ``"row 40/100"``.

        Returns:
            Whether the report was stored.

        Raises:
            ValueError: ``fraction`` is not a number from 0 to 1 (the value is named).
        """
        progress = self._progress(fraction, message)
        if self._progress_sink is None:
            self.job = self.job._replace(metadata={**self.job.metadata, "progress": progress})
            return True
        return bool(self._progress_sink(self.job.id, token=self.job.attempts, progress=progress))

    async def report_progress_async(self, fraction: float, message: str | None = None) -> bool:
        """`report_progress` for an ``async def`` job: the storage write runs on a thread
        of the loop's default executor (`asyncio.to_thread`), so the event loop, and the
        other attempts on it, go on meanwhile.

        Args:
            fraction: Done so far, from 0.0 to 1.0.
            message: A short human note (capped at 500 characters).

        Returns:
            Whether the report was stored.

        Raises:
            ValueError: ``fraction`` is not a number from 0 to 1 (raised before any write).
        """
        progress = self._progress(fraction, message)
        sink = self._progress_sink
        if sink is None:
            self.job = self.job._replace(metadata={**self.job.metadata, "progress": progress})
            return True
        return bool(await asyncio.to_thread(sink, self.job.id, token=self.job.attempts,
                                            progress=progress))

    def _progress(self, fraction: float, message: str | None) -> Mapping[str, Any]:
        if (isinstance(fraction, bool) or not isinstance(fraction, (int, float))
                or math.isnan(fraction) or not 0.0 <= fraction <= 1.0):
            raise ValueError(f"progress fraction must be a number from 0 to 1, not {fraction!r}")
        return {
            "fraction": float(fraction),
            # NUL and lone surrogates cannot be stored as text by every database
            "message": None if message is None else cap_text(
                str(message).replace("\x00", "\ufffd")
                .encode("utf-8", "replace").decode("utf-8"), 500),
            "at": utcnow().isoformat().replace("+00:00", "Z"),
            "attempt": self.job.attempts,  # a retry does not show its predecessor's
        }

    def is_cancelled(self) -> bool:
        """Return whether the attempt has been asked to end now (timeout or hard stop)."""
        return self._cancelled is not None and self._cancelled.is_set()


def current_context() -> JobContext:
    """Return the context of the job running on this thread (or in this task).

    Returns:
        The running attempt's ``JobContext``.

    Raises:
        RuntimeError: Called outside a job run by a qmlkit worker.
    """
    ctx = _current.get()
    if ctx is None:
        raise RuntimeError("current_context() called outside a job run by a qmlkit worker")
    return ctx


def set_current(ctx: JobContext | None) -> contextvars.Token[JobContext | None]:
    """Make ``ctx`` the current context; returns the token to reset it with."""
    return _current.set(ctx)


def reset_current(token: contextvars.Token[JobContext | None]) -> None:
    """Undo `set_current`."""
    _current.reset(token)
