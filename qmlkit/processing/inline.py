"""Inline mode: enqueue runs the job at once, in the caller, as a worker would.

``with app.inline():`` (or ``App(..., inline=True)``) makes every enqueue of that app
store its jobs as usual and then run them to their end before returning, through the
server's own code: the jobs are claimed from the app's real storage (Enqueued ->
Processing, ``attempts`` counted as the fencing token), run by a `Worker` of an
unstarted `Server` built by ``app.server()`` (the same `JobProcessor`, middleware
chain, timeouts, JSON checks of the result), and their outcomes stored by
`qmlkit.processing.outcome` and announced to the state-change observers. So a test sees
what a worker would have stored: ``app.storage.get(job_id)`` is Succeeded with the
result, or Failed with the exception. What differs from a worker, and why:

- Waits are skipped, not the states: a retry is stored AwaitingRetry, then moved to
  Enqueued at once (as ``qmlkit jobs requeue`` does) and run again, until it succeeds or
  its retries are spent; a scheduled job (``schedule(delay=...)``/``at=``) is stored
  Scheduled, then promoted at once. This follows Celery's ``task_always_eager`` (a
  countdown is ignored) and RQ's ``is_async=False`` (``enqueue_in`` runs now), not
  Dramatiq's ``StubBroker``, which keeps delayed messages until ``join()``.
- Jobs enqueued by a job running inline run inline too, on the same thread, right after
  the attempt that enqueued them has ended and been stored (first in, first out), and
  before the outermost enqueue returns. Running them after, not inside, the attempt keeps
  the stack flat (a job that enqueues itself does not recurse) and keeps the order a
  worker would see. A chain longer than `MAX_INLINE_STEPS` steps stops with a warning,
  leaving the rest Enqueued.
- A claim takes the job's queue's next job, as a worker's does: a job already Enqueued
  in that queue before (with a higher priority, or older) runs first, inline too. If
  another thread's inline run or a worker claims the job first, the enqueue waits for it
  to end (looking every `PROCESSING_POLL_S`), so it still returns a finished job.
- By default the job's exception does not reach the caller (the stored state says
  Failed). ``raise_errors=True`` re-raises it from the enqueue once the job is Failed
  (its retries spent), like Celery's ``task_eager_propagates``; jobs enqueued but not yet
  run stay Enqueued then.
- Inside ``app.transaction(...)`` jobs are not run inline: they are not committed yet.
"""

from __future__ import annotations

import asyncio
import collections
import concurrent.futures
import contextvars
import copy
import logging
import threading
import time
from collections.abc import Iterator, Mapping, Sequence
from contextlib import AbstractContextManager, contextmanager
from typing import Any, Protocol

from qmlkit.errors import InvalidTransition
from qmlkit.job import Enqueued, Job, utcnow
from qmlkit.processing.idle import IdleGate
from qmlkit.processing.watchdog import Watchdog
from qmlkit.processing.worker import Worker

__all__ = ["MAX_INLINE_STEPS", "InlineClient", "InlineMode", "InlineRunner"]

log = logging.getLogger(__name__)

#: Claims one outermost inline enqueue may make (its jobs, their retries, the jobs they
#: enqueue) before it stops with a warning and leaves the rest Enqueued.
MAX_INLINE_STEPS = 10_000

#: While another thread or a worker runs the job, how often to look again, in seconds.
PROCESSING_POLL_S = 0.005

_WAITING = ("Scheduled", "AwaitingRetry")


class InlineApp(Protocol):
    """What inline mode needs of an app (``qmlkit.client.App``)."""

    def server(self, config: Any = None, **fields: Any) -> Any:
        """An unstarted `qmlkit.processing.server.Server` on the app's storage."""


class InlineRunner:
    """Runs stored jobs to their end in the calling thread, with a server's parts.

    Args:
        app: The app; ``app.server(config)`` builds the unstarted server lent its
            processor, claim ledger, observers and outcome storage.
        config: ``ServerConfig`` fields for that server (retry policy, job timeout,
            TTLs, ``log_attempts``...), or ``None`` for the defaults of ``App.server``.
    """

    def __init__(self, app: InlineApp, config: Mapping[str, Any] | Any = None) -> None:
        self.server = app.server(config)
        self.storage = self.server.storage
        self.processor = copy.copy(self.server.processor)
        self.processor.on_failure = self._record
        self.observed = bool(self.server.pm.hook.qmlkit_job_state_changed.get_hookimpls())
        self.watchdog = Watchdog()
        self._errors: dict[str, BaseException] = {}
        self._local = threading.local()

    def close(self) -> None:
        """End the timeout watchdog's thread. Idempotent."""
        self.watchdog.close()

    def _record(self, job: Job, exc: BaseException) -> None:
        self._errors[job.id] = exc

    def run(self, jobs: Sequence[Job], *, raise_errors: bool) -> None:
        """Run ``jobs`` (just stored) to their end; see the module docstring.

        Called from inside an inline job (same thread), it only queues them to run
        after that job's attempt.

        Raises:
            BaseException: With ``raise_errors``, the exception of the first job that
                ended Failed (a ``JobTimeout``, ``UnknownJobName`` or ``PayloadError``
                when qmlkit failed it).
        """
        pending: collections.deque[str] | None = getattr(self._local, "pending", None)
        if pending is not None:
            pending.extend(job.id for job in jobs)
            return
        ids = [job.id for job in jobs]
        try:
            asyncio.get_running_loop()
        except RuntimeError:
            self._drive(ids, raise_errors)
            return
        # An event loop runs in this thread (an async test): async jobs need a loop of
        # their own, so the whole run goes to a helper thread, context included.
        with concurrent.futures.ThreadPoolExecutor(1, "qmlkit-inline") as helper:
            ctx = contextvars.copy_context()
            helper.submit(ctx.run, self._drive, ids, raise_errors).result()

    def _drive(self, ids: list[str], raise_errors: bool) -> None:
        pending = self._local.pending = collections.deque(ids)
        worker = Worker(self.server, worker_id=f"{self.server.config.server_name}:inline:"
                        f"{threading.get_ident()}", server_name=self.server.config.server_name,
                        processor=self.processor, idle=IdleGate(), watchdog=self.watchdog,
                        observed=self.observed, wakeups_live=lambda: False)
        loop = asyncio.new_event_loop()
        steps = [0]
        try:
            while pending:
                if steps[0] >= MAX_INLINE_STEPS:
                    log.warning("inline mode: %d claims in one enqueue, the limit; %d job(s) "
                                "left as stored (Enqueued) for a worker or drain()",
                                steps[0], len(pending))
                    break
                self._run_to_end(pending.popleft(), worker, loop, steps, raise_errors)
        finally:
            self._local.pending = None
            loop.close()

    def _run_to_end(self, job_id: str, worker: Worker, loop: asyncio.AbstractEventLoop,
                    steps: list[int], raise_errors: bool) -> None:
        held_since: float | None = None
        while True:
            job = self.storage.get(job_id)
            if job is None:
                return
            state = job.state.name
            if state in _WAITING:
                self._promote(job)
                continue
            if state not in ("Enqueued", "Processing"):  # it has ended: done here
                error = self._errors.pop(job_id, None)
                if raise_errors and state == "Failed" and error is not None:
                    raise error
                return
            if steps[0] >= MAX_INLINE_STEPS:
                return  # the caller says so
            claimed = self._claim(worker, job.queue) if state == "Enqueued" else []
            if not claimed:  # another thread's inline run or a worker has it, or is taking it
                held_since = held_since or time.monotonic()
                if self._given_up(job, time.monotonic() - held_since):
                    return
                time.sleep(PROCESSING_POLL_S)
                continue
            held_since = None
            steps[0] += 1
            worker.run_batch(claimed, loop)
            for other in claimed:
                if other.id != job_id:
                    self._errors.pop(other.id, None)

    def _given_up(self, job: Job, waited_s: float) -> bool:
        """Whether to stop waiting for a job someone else holds: after the server's
        ``stale_processing_after`` (a holder that died leaves it Processing)."""
        limit = self.server.config.stale_processing_after.total_seconds()
        if waited_s < limit:
            return False
        log.warning("inline mode: job %s is still %s (held by %s) after %.0f s; not "
                    "waiting longer", job.id, job.state.name,
                    getattr(job.state, "worker_id", "another claimer"), waited_s)
        return True

    def _promote(self, job: Job) -> None:
        """Skip the wait of a Scheduled or AwaitingRetry job: store it Enqueued now."""
        try:
            change = self.storage.change_state(
                job.id, Enqueued(enqueued_at=utcnow(), queue=job.queue),
                expected=(job.state.name,))
        except InvalidTransition:
            return  # it moved on meanwhile: the caller reads it again
        self.server.notify([change])

    def _claim(self, worker: Worker, queue: str) -> list[Job]:
        """Claim the next job of ``queue`` for ``worker``, as `Worker` claims."""
        kwargs: dict[str, Any] = {"worker_id": worker.worker_id, "queues": [queue], "limit": 1,
                                  "server_name": worker.server_name, "now": utcnow()}
        if not self.observed:
            return list(self.storage.claim(**kwargs))
        changes = self.storage.claim_changes(**kwargs)
        self.server.notify(changes)
        return [change.job for change in changes]


class InlineMode:
    """An app's inline switch: on for the app's life, or inside ``with app.inline():``.

    The switch is the app's, not a thread's: an enqueue from any thread of the process
    (a web test client's server thread, say) runs inline while it is on.

    Args:
        app: The app whose enqueues it runs.
        enabled: On from the start (``App(..., inline=True)``).
    """

    def __init__(self, app: InlineApp, *, enabled: bool = False) -> None:
        self._app = app
        self._base: dict[str, Any] | None = (
            {"raise_errors": False, "config": None} if enabled else None)
        self._stack: list[dict[str, Any]] = []
        self._runners: list[tuple[str, InlineRunner]] = []  # (config's key, its runner)
        self._lock = threading.Lock()

    @property
    def active(self) -> bool:
        """Whether enqueues run inline now."""
        return bool(self._stack) or self._base is not None

    @contextmanager
    def block(self, *, raise_errors: bool = False, config: Any = None) -> Iterator[None]:
        """Turn inline mode on for the ``with`` block (nested blocks: the innermost wins)."""
        settings = {"raise_errors": raise_errors, "config": config}
        with self._lock:
            self._stack.append(settings)
        try:
            yield
        finally:
            with self._lock:
                self._stack.remove(settings)

    def run(self, jobs: Sequence[Job]) -> None:
        """Run just-stored ``jobs`` inline with the current settings; see `InlineRunner.run`."""
        settings = self._stack[-1] if self._stack else self._base
        if settings is None or not jobs:
            return
        config = settings["config"]
        key = repr(sorted(dict(config).items())) if isinstance(config, Mapping) else repr(config)
        with self._lock:
            runner = next((r for k, r in self._runners if k == key), None)
            if runner is None:  # one per distinct config, however often it is passed
                runner = InlineRunner(self._app, config)
                self._runners.append((key, runner))
        runner.run(jobs, raise_errors=settings["raise_errors"])

    def close(self) -> None:
        """Drop the runners (their servers were never started); they are rebuilt on use."""
        with self._lock:
            runners, self._runners = self._runners, []
        for _, runner in runners:
            runner.close()


class InlineClient:
    """The inline half of the client API (``qmlkit.client.App`` inherits it)."""

    _inline: InlineMode

    def inline(self, *, raise_errors: bool = False,
               config: Any = None) -> AbstractContextManager[None]:
        """Run this app's enqueues at once, in the caller, inside the ``with`` block (tests).

        Each enqueue stores its jobs, then runs them to their end before returning, with
        a worker's own code (`qmlkit.processing.inline`): claimed from the real storage,
        through the middleware and retries (backoff waits and ``schedule`` delays
        skipped, attempts counted), so ``app.storage.get(job_id)`` shows what a worker
        would store. Jobs enqueued by an inline job run after it, before the outermost
        enqueue returns. Celery's ``task_always_eager``, RQ's ``is_async=False``.

        Args:
            raise_errors: Re-raise a Failed job's exception from the enqueue (Celery's
                ``task_eager_propagates``); by default only its stored state says Failed.
            config: ``ServerConfig`` fields for the attempts (``retry``, ``job_timeout``,
                ``log_attempts``...); default those of `server`.

        Returns:
            A context manager (not re-entrant per object; nested blocks: the innermost's
            settings apply).
        """
        return self._inline.block(raise_errors=raise_errors, config=config)
