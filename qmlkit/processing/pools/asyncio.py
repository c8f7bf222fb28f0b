"""The asyncio pool: one event loop running up to ``worker_count`` attempts at once.

Three threads of the server's process (arq's and saq's shape, with qmlkit's claim ledger):

- the **loop** thread runs the event loop. Every attempt is a task on it: an ``async
  def`` job runs in the task itself; a ``def`` job runs in a bounded thread executor
  beside the loop (``min(SYNC_THREADS_MAX, worker_count)`` threads), so a mixed app
  works, and the task awaits it.
- the **claimer** thread makes every storage claim: it waits for free slots, claims up
  to ``min(free slots, fetch_batch_size)`` jobs in one call (while the pool is busy it
  lets freed slots gather for up to `GATHER_S` first, so one claim serves many slots),
  records them in the server's `qmlkit.processing.claims.ClaimLedger` and hands them
  to the loop at once.
  It waits at the server's idle gate when a claim comes back empty, so wake-ups reach
  it as they reach worker threads. Nothing is claimed that cannot start now, so no job
  waits behind a slow one (what ``prefetch_window`` guards against in the thread pool).
- the **storer** thread (`qmlkit.processing.pools.storer.OutcomeStorer`, as in the
  thread pool) stores outcomes in batches (`Runtime.store_outcomes`, one transaction
  each): at least every ``prefetch_window``, sooner once ``FLUSH_AT`` wait or once every
  slot is free.

So storage calls never block the loop, and 500 attempts in flight use two storage
connections (claimer and storer), not 500. Timeouts: an ``async def`` job is cancelled
at its timeout (the server's watchdog cancels its task: no timer per attempt on the
loop) and ends with ``JobTimeout``, following the retry
policy; a ``def`` job is told through ``context.cancelled`` (the watchdog), as in the
thread pool, and keeps its slot until it returns (a slot given back would be no use: the
job holds an executor thread). Its timeout counts from when it gets a thread, not while
it waits for one. An ``async def`` attempt still running `CANCEL_GRACE_S` after its
timeout (a coroutine that swallowed its ``CancelledError``) is *detached*: its slot is
given back, so the pool keeps its strength, while its job stays claimed (Processing,
under this server's heartbeats) until the attempt really ends and stores
``JobTimeout``: the job is never run twice at once. Only the process pool's hard timeout
can end such an attempt for good. Stop: the claimer stops, running attempts (detached
ones too) get the grace period, then the server releases what still runs and
`AsyncioPool.abort` cancels their tasks; an attempt ending after that stores nothing
(its job was released). The executor's threads are daemons, so a ``def`` job that never
returns does not keep the process from exiting.

What a job does to the loop it shares is contained: a ``CancelledError`` it raises of its
own (no cancellation of its task) fails it like any other error; a ``GeneratorExit`` or
``StopIteration`` from a ``def`` job fails it as in the thread pool (they travel back as
values, `qmlkit.processing.pools.executor.catching`); a job calling ``loop.stop()`` is
logged and the loop runs on under the other attempts, since only the pool's own stop
ends it. A job that blocks the loop (``time.sleep`` in an ``async def``) is named in
the log by the `qmlkit.processing.pools.loopwatch.LoopWatch` once the loop has gone 2 s
without a beat.
"""

from __future__ import annotations

import asyncio
import contextlib
import contextvars
import functools
import logging
import threading
import time
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

from qmlkit.backoff import Backoff
from qmlkit.job import Job
from qmlkit.processing.claims import LOST, RELEASE
from qmlkit.processing.context import JobContext
from qmlkit.processing.pools.base import any_alive, join_all
from qmlkit.processing.pools.executor import DaemonExecutor, Raised, catching
from qmlkit.processing.pools.loopwatch import LoopWatch
from qmlkit.processing.pools.storer import OutcomeStorer
from qmlkit.processing.pools.threads import (
    CLAIM_RETRY_CAP_S,
    CLAIM_RETRY_INITIAL_S,
    DISTRUST_WAIT_S,
    claim_jobs,
)
from qmlkit.processing.processor import uncancel_current_task

if TYPE_CHECKING:
    from qmlkit.processing.pools.base import PoolParts

__all__ = ["CANCEL_GRACE_S", "SYNC_THREADS_MAX", "AsyncioPool", "DaemonExecutor"]

log = logging.getLogger("qmlkit.processing.server")

#: Most threads of the executor running ``def`` jobs (fewer if ``worker_count`` is less).
SYNC_THREADS_MAX = 32
#: Longest wait of the claimer for a free slot, seconds.
POLL_S = 0.1
#: How long an attempt may run past its timeout (its task cancelled, or ``def`` job told)
#: before its slot is given back to the pool and the attempt is detached, seconds.
CANCEL_GRACE_S = 1.0
#: How often the loop looks for attempts to detach, seconds.
SWEEP_S = 0.5
#: At the loop's end, how long it waits for attempts it cancelled (an abort) before it
#: closes anyway, seconds: a coroutine that swallows its cancellation must not keep the
#: storer from storing the others' outcomes.
LEFTOVER_S = 2.0
#: While some slots are busy, how long the claimer lets freed slots gather before it
#: claims for them (seconds): one claim for many slots, not one per slot.
GATHER_S = 0.005


class AsyncioPool:
    """One event loop running up to ``worker_count`` attempts (the
    `qmlkit.processing.pools.base.Pool` named ``"asyncio"``; see the module's text).

    Args:
        parts: What the pool needs from its server.

    Attributes:
        sync_threads: Threads of the executor for ``def`` jobs.
    """

    name = "asyncio"

    def __init__(self, parts: PoolParts) -> None:
        self.parts = parts
        self.size = parts.runtime.config.worker_count
        self.sync_threads = min(SYNC_THREADS_MAX, self.size)
        self._slots = threading.Condition()
        self._free = list(range(self.size))  # free slot numbers, under _slots
        self._want = min(parts.runtime.config.fetch_batch_size, self.size)  # a full claim
        self._claimer_done = False  # under _slots
        self._storer = OutcomeStorer(parts.runtime, name="qmlkit-asyncio-storer")
        self._loop = asyncio.new_event_loop()
        self._executor = DaemonExecutor(self.sync_threads, name="qmlkit-sync")
        self.loop_watch = LoopWatch(self._loop, self._describe_task)
        self._tasks: set[asyncio.Task[None]] = set()
        self._running: dict[int, _Running] = {}  # by slot; loop thread only
        self._detached: set[_Running] = set()  # loop thread only
        self._next_slot = self.size  # under _slots: a detached attempt's slot is retired
        self._detached_count = 0  # under _slots: len(_detached), for other threads
        self._stop_sent = False  # under _slots: the loop has been told to stop (once)
        self._loop_ended = False  # loop thread only: the pool's own stop has run
        self._aborted = False  # the server released what runs: store no more outcomes
        self._threads: list[threading.Thread] = []
        self._worker_id = f"{parts.runtime.config.server_name}:asyncio"

    # --- the Pool protocol ----------------------------------------------------------------

    def start(self) -> None:
        """Start the loop, claimer and storer threads (``qmlkit-asyncio-*`` daemons)."""
        self._storer.start()
        self._threads.append(self._storer.thread)
        self.loop_watch.start()
        for name, target in (("loop", self._run_loop), ("claimer", self._claim_loop)):
            thread = threading.Thread(target=target, name=f"qmlkit-asyncio-{name}", daemon=True)
            thread.start()
            self._threads.append(thread)

    def busy(self) -> int:
        """Slots running an attempt now."""
        with self._slots:
            return self.size - len(self._free)

    def detached(self) -> int:
        """Attempts running past their timeout whose slots were given back (see the
        module's text); read without a lock, for reports."""
        return len(self._detached)

    def alive(self) -> bool:
        """Whether the loop, claimer or storer still runs."""
        return any_alive(self._threads)

    def join(self, timeout_s: float) -> None:
        """Wait up to ``timeout_s`` seconds in all for the pool's threads to end."""
        join_all(self._threads, timeout_s)

    def abort(self) -> None:
        """Cancel every running task (the server has released their jobs); outcomes of
        attempts that end from now on are not stored."""
        self._aborted = True
        with contextlib.suppress(RuntimeError):  # the loop has closed already: nothing runs
            self._loop.call_soon_threadsafe(self._cancel_all)

    # --- the claimer thread ---------------------------------------------------------------

    def _claim_loop(self) -> None:
        runtime, idle = self.parts.runtime, self.parts.idle
        config, stopping = runtime.config, runtime.stopping
        queues, interval_s = list(config.queues), config.polling_interval.total_seconds()
        backoff = Backoff(CLAIM_RETRY_INITIAL_S, CLAIM_RETRY_CAP_S)
        try:
            while not stopping.is_set():
                if not runtime.claims.trusted():  # claim nothing until a heartbeat
                    runtime.claims.wait_trusted(min(interval_s, DISTRUST_WAIT_S))
                    continue
                free = self._wait_for_free_slots(stopping)
                if not free:
                    continue
                seen = idle.seen()
                began = runtime.claims.clock()  # the claim's lease starts before it
                try:
                    jobs = claim_jobs(runtime, worker_id=self._worker_id,
                                      server_name=self.parts.server_name, queues=queues,
                                      limit=min(free, config.fetch_batch_size),
                                      observed=self.parts.observed)
                    backoff.reset()
                except Exception as exc:  # the loop must outlive any storage failure
                    delay = backoff.next()
                    log.warning("claim failed (%s: %s); retrying in %.1f s",
                                type(exc).__name__, exc, delay)
                    stopping.wait(backoff.jittered(delay))
                    continue
                if not jobs:
                    idle.wait(seen, interval_s, stopping=stopping,
                              shared_poll=self.parts.wakeups_live())
                    continue
                self._dispatch(jobs, began)
        finally:
            with self._slots:
                self._claimer_done = True
            self._stop_loop_if_done()

    def _wait_for_free_slots(self, stopping: threading.Event) -> int:
        with self._slots:
            while not self._free and not stopping.is_set():
                self._slots.wait(POLL_S)
            deadline = time.monotonic() + GATHER_S
            while (len(self._free) < self._want and not stopping.is_set()
                   and (left := deadline - time.monotonic()) > 0):
                self._slots.wait(left)  # let more slots free up: one claim for them all
            return 0 if stopping.is_set() else len(self._free)

    def _dispatch(self, jobs: list[Job], claimed_at: float) -> None:
        """Give each claimed job a slot, start it in the ledger, hand it to the loop.

        When the ledger answers `LOST` (this server may have been presumed dead, its
        claims reclaimed: `ClaimLedger.start`), that job and every later one of the
        claim are not started but released, fenced, so a reclaimed job is left alone.
        """
        runtime, claims = self.parts.runtime, self.parts.runtime.claims
        with self._slots:  # only this thread takes slots: there are enough
            slots = [self._free.pop() for _ in jobs]
        released: list[Job] = []
        started: list[tuple[Job, JobContext, int, str]] = []
        lost: list[Job] = []
        for job, slot in zip(jobs, slots, strict=True):
            slot_id = f"{runtime.config.server_name}:slot:{slot}"
            claims.hold([job], slot_id, claimed_at=claimed_at)
            ctx = LOST if lost else claims.start(
                job, slot_id, stopping=runtime.stopping.is_set(),
                make_context=functools.partial(self._context, job, slot_id))
            if isinstance(ctx, JobContext):
                started.append((job, ctx, slot, slot_id))
                continue
            if ctx == RELEASE:
                released.append(job)
            elif ctx == LOST:
                lost.extend(claims.release_waiting({slot_id}))
            claims.end_batch(slot_id, [job])
            self._free_slot(slot)
        if started:  # one wake-up of the loop for the whole claim
            self._loop.call_soon_threadsafe(self._spawn, started)
        if released:  # (a skipped claim was released by the server already)
            runtime.release(released, "released unstarted: server stopping")
        if lost:
            age = claims.heartbeat_age()
            log.warning("asyncio pool: not starting %d claimed job(s): this server may have "
                        "been presumed dead (last heartbeat %s ago); releasing those still "
                        "ours", len(lost), "never" if age is None else f"{age:.1f} s")
            runtime.release(lost, "released unstarted: claim may have been reclaimed")

    def _context(self, job: Job, slot_id: str) -> JobContext:
        runtime = self.parts.runtime
        return JobContext(job=job, worker_id=slot_id, server_name=self.parts.server_name,
                          stopping=runtime.stopping, progress_sink=runtime.storage.report_progress)

    def _free_slot(self, slot: int) -> None:
        with self._slots:
            self._free.append(slot)
            if len(self._free) in (1, self._want):  # what the claimer waits for
                self._slots.notify()
            idle = len(self._free) == self.size
        if idle:  # nothing runs: a lone job's result is not held for the window
            self._storer.flush()
        self._stop_loop_if_done()

    def _stop_loop_if_done(self) -> None:
        """Once the claimer has ended, every slot is free and no detached attempt runs
        (or the server has aborted: it released them), end the loop (once: not while it
        finishes what an abort cancelled: a second stop would end that too soon)."""
        with self._slots:
            done = (self._claimer_done and len(self._free) == self.size
                    and (not self._detached_count or self._aborted) and not self._stop_sent)
            self._stop_sent = self._stop_sent or done
        if done:
            with contextlib.suppress(RuntimeError):  # closed already
                self._loop.call_soon_threadsafe(self._end_loop)

    def _end_loop(self) -> None:
        """Stop the loop for good (loop thread): only a stop made here ends it."""
        self._loop_ended = True
        self._loop.stop()

    # --- the loop thread ------------------------------------------------------------------

    def _run_loop(self) -> None:
        loop = self._loop
        asyncio.set_event_loop(loop)
        try:
            loop.call_soon(self._sweep)
            restarts = 0
            while True:
                loop.run_forever()
                if self._loop_ended:
                    break
                restarts += 1  # a job called loop.stop(): the other attempts run on
                if restarts & (restarts - 1) == 0:  # the 1st, 2nd, 4th, 8th...: no flood
                    log.error("asyncio pool: a job stopped the pool's event loop "
                              "(loop.stop(), %d time(s) so far); running it on with %d "
                              "attempt(s) in flight", restarts,
                              len(self._running) + len(self._detached))
            leftover = [t for t in self._tasks if not t.done()]
            for task in leftover:  # after an abort, or detached attempts still running
                task.cancel()
            if leftover:
                _, pending = loop.run_until_complete(asyncio.wait(leftover, timeout=LEFTOVER_S))
                if pending:
                    log.warning("asyncio pool: %d attempt(s) still running %.0f s after being "
                                "cancelled at stop (they swallow CancelledError); closing the "
                                "loop without them", len(pending), LEFTOVER_S)
            loop.run_until_complete(loop.shutdown_asyncgens())
        finally:
            self.loop_watch.stop()
            loop.close()
            self._executor.shutdown(wait=False, cancel_futures=True)
            self._storer.close()  # no more outcomes: it stores the rest and ends

    def _spawn(self, started: list[tuple[Job, JobContext, int, str]]) -> None:
        for job, ctx, slot, slot_id in started:
            run = _Running(job, ctx, slot, self.parts.processor.runs_on_loop(job.method))
            run.task = task = self._loop.create_task(self._attempt(run, slot_id))
            self._running[slot] = run
            self._tasks.add(task)
            task.add_done_callback(self._tasks.discard)

    def _sweep(self) -> None:
        """Detach attempts running `CANCEL_GRACE_S` past their timeout (loop thread,
        every `SWEEP_S`): the slot is given back, the job stays claimed. Beats for the
        `LoopWatch`."""
        self.loop_watch.beat()
        now = time.monotonic()
        overdue = []
        for run in self._running.values():
            if run.ctx.timed_out and run.on_loop:
                if run.timed_out_at is None:
                    run.timed_out_at = now
                elif now - run.timed_out_at >= CANCEL_GRACE_S:
                    overdue.append(run)
        for run in overdue:
            self._detach(run)
        if not self._loop.is_closed():
            self._loop.call_later(SWEEP_S, self._sweep)

    def _detach(self, run: _Running) -> None:
        del self._running[run.slot]
        self._detached.add(run)
        if run.task is not None:
            run.task.cancel()  # once more: a coroutine may take the second one
        with self._slots:
            replacement, self._next_slot = self._next_slot, self._next_slot + 1
            self._detached_count += 1
        log.warning(
            "asyncio pool: job %s (%s) still runs %.0f s past its timeout (it swallowed its "
            "cancellation); its slot is given back and the job stays claimed until it "
            "ends, then fails with JobTimeout (%d detached now; the process pool's hard "
            "timeout ends such jobs for good)",
            run.job.id, run.job.method, CANCEL_GRACE_S, len(self._detached))
        self._free_slot(replacement)

    def _cancel_all(self) -> None:
        for task in self._tasks:
            task.cancel()
        self._stop_loop_if_done()  # (detached attempts no longer hold the loop)

    async def _attempt(self, run: _Running, slot_id: str) -> None:
        parts, job, ctx = self.parts, run.job, run.ctx
        outcome = None
        try:
            outcome = await parts.processor.run_async(job, ctx, self._offload, parts.watchdog,
                                                      aborted=self._was_aborted)
        except asyncio.CancelledError:
            pass  # aborted: the server has released the job; no outcome to store
        except Exception:  # run_async records every failure of a job; this is a bug
            log.exception("attempt of job %s ended without an outcome", job.id)
        finally:
            parts.runtime.claims.finish(job)
            parts.runtime.claims.end_batch(slot_id, [job])
            if outcome is not None and not self._aborted:  # (after an abort: released)
                self._storer.add(outcome)
            if run in self._detached:  # its slot was given back already
                self._detached.discard(run)
                with self._slots:
                    self._detached_count -= 1
                log.warning("asyncio pool: detached job %s ended, %.1f s past its timeout",
                            job.id, time.monotonic() - (run.timed_out_at or 0.0))
                self._stop_loop_if_done()
            else:
                del self._running[run.slot]
                self._free_slot(run.slot)

    def _describe_task(self, task: asyncio.Task[object] | None) -> str:
        """What the `LoopWatch` calls ``task`` (on its thread: it only reads)."""
        if task is None:
            return "a callback, not a task (scheduled by job code?)"
        try:
            runs = [*self._running.values(), *self._detached]
        except RuntimeError:  # changed while read: the loop is not blocked after all
            runs = []
        for run in runs:
            if run.task is task:
                return f"job {run.job.id} ({run.job.method})"
        return f"task {task.get_name()!r}, not an attempt's own (started by job code?)"

    def _was_aborted(self) -> bool:
        """Whether `abort` has run: a cancellation of an attempt's task before that came
        from job code (its own, or another job's) and fails the attempt."""
        return self._aborted

    async def _offload(self, fn: Callable[[], Any]) -> Any:
        """Run a ``def`` job's call on the executor, with the task's context variables.

        What the call raises comes back as a value and is raised here: carried in the
        future, a ``GeneratorExit`` would be thrown into the task (which closes every
        coroutine awaiting it, losing the attempt's outcome) and a ``StopIteration``
        could not be set on an asyncio future at all (the attempt would never end). A
        cancellation of the task by job code waits for the thread (see the code); only
        the pool's abort ends the wait early.
        """
        future = self._executor.submit(catching, contextvars.copy_context().run, fn)
        while True:
            try:  # (what run_in_executor awaits; a cancel cannot stop a running thread)
                result = await asyncio.wrap_future(future, loop=self._loop)
                break
            except asyncio.CancelledError:
                if self._aborted or future.cancelled():
                    raise  # the server released the job, or it never started
                # Job code cancelled this task. A def job cannot be interrupted (as at its
                # timeout): its attempt ends when its thread returns, never before, or its
                # retry could run beside it; it ends with what the thread returned.
                uncancel_current_task()
        if isinstance(result, Raised):
            raise result.exc
        return result


class _Running:
    """One attempt on the loop: what `AsyncioPool._sweep` needs to detach it."""

    __slots__ = ("ctx", "job", "on_loop", "slot", "task", "timed_out_at")

    def __init__(self, job: Job, ctx: JobContext, slot: int, on_loop: bool) -> None:
        self.job, self.ctx, self.slot, self.on_loop = job, ctx, slot, on_loop
        self.task: asyncio.Task[None] | None = None
        self.timed_out_at: float | None = None  # monotonic, when the sweep first saw it
