"""The thread pool: ``worker_count`` worker threads, each claiming a batch and running it.

`ThreadPool` starts the threads; each runs one `Worker` loop. Read `Worker.run` top to
bottom (as arq's ``_poll_iteration``): wait while this server may be presumed dead
(`ClaimLedger.trusted`), size the batch, claim (through the pool's
`qmlkit.processing.pools.claimgroup.ClaimGroup`, so threads asking at once share one
storage claim; retrying with `qmlkit.backoff.Backoff` while storage fails), wait at the
idle gate if nothing came, pass the wake-up on if the claim came back full, run the batch.

The batch size adapts: it is the number of recent average-length jobs that fit in
``prefetch_window`` (at least 1, at most ``fetch_batch_size``), so fast jobs are claimed
many at a time while a slow job is never held back behind another one claimed ahead of
it (field case C18; the straggler duty covers a job that turns out slow).

Outcomes are acknowledged by the pool's one `qmlkit.processing.pools.storer.OutcomeStorer`
thread, for all worker threads together (one transaction per window, sooner when the pool
falls idle), not by each thread for its own batch: with a transaction per thread and
batch, 40 threads drained slower than 10 (issue #16 item 6, docs/benchmarks.md). A
`Worker` given no storer (inline mode) stores its batch's outcomes itself before
`Worker.run_batch` returns.
"""

from __future__ import annotations

import asyncio
import functools
import logging
import threading
import time
from collections.abc import Callable
from typing import TYPE_CHECKING

from qmlkit.backoff import Backoff
from qmlkit.job import Job, utcnow
from qmlkit.processing.claims import LOST, RELEASE, SKIP
from qmlkit.processing.context import JobContext
from qmlkit.processing.pools.base import any_alive, join_all
from qmlkit.processing.pools.claimgroup import ClaimGroup
from qmlkit.processing.pools.storer import OutcomeStorer

if TYPE_CHECKING:
    from qmlkit.processing.config import ServerConfig
    from qmlkit.processing.idle import IdleGate
    from qmlkit.processing.pools.base import PoolParts
    from qmlkit.processing.processor import JobProcessor
    from qmlkit.processing.runtime import Runtime
    from qmlkit.processing.watchdog import Watchdog
    from qmlkit.storage.base import Transition

__all__ = ["BatchSize", "ThreadPool", "Worker", "claim_jobs"]

log = logging.getLogger("qmlkit.processing.server")  # the logger these lines always had

#: Claim retries while storage fails: first and longest wait, seconds (jittered).
CLAIM_RETRY_INITIAL_S = 0.1
CLAIM_RETRY_CAP_S = 5.0
#: Longest wait, seconds, for a heartbeat while this server may be presumed dead.
DISTRUST_WAIT_S = 0.5


class BatchSize:
    """How many jobs a worker claims next: as many recent average-length jobs as fit in
    ``prefetch_window`` (at least 1, at most ``fetch_batch_size``; 1 while unknown)."""

    def __init__(self, config: ServerConfig) -> None:
        self.window = config.prefetch_window.total_seconds()
        self.most = config.fetch_batch_size
        self.avg = 0.0  # moving average of attempt length, seconds (0 = unknown yet)

    def limit(self) -> int:
        """The next claim's limit, 1 to ``fetch_batch_size``."""
        if self.avg > 0 and self.window > 0:
            return max(1, min(self.most, int(self.window / self.avg)))
        return 1

    def observe(self, per_job_s: float) -> None:
        """Fold one batch's mean attempt length (seconds) into the moving average."""
        self.avg = per_job_s if self.avg == 0 else 0.8 * self.avg + 0.2 * per_job_s


def claim_jobs(runtime: Runtime, *, worker_id: str, server_name: str, queues: list[str],
               limit: int, observed: bool) -> list[Job]:
    """Claim up to ``limit`` jobs (`Storage.claim`), reporting the claims to observers
    when they listen (`Storage.claim_changes`).

    Raises:
        StorageError: The claim failed (nothing was claimed); callers retry with backoff.
    """
    storage = runtime.storage
    if not observed:
        return storage.claim(worker_id=worker_id, server_name=server_name,
                             queues=queues, limit=limit, now=utcnow())
    changes = storage.claim_changes(worker_id=worker_id, server_name=server_name,
                                    queues=queues, limit=limit, now=utcnow())
    runtime.notify(changes)
    return [change.job for change in changes]


class Worker:
    """The loop of one worker thread of a server.

    Args:
        runtime: The server (storage, config, claims, stopping, notify, store, release).
        worker_id: ``<server name>:worker:<n>``.
        server_name: Stamped on claims: the server id when registered, else its name.
        processor: Runs one attempt and returns its outcome.
        idle: The server's idle gate.
        watchdog: Cancels attempts past their timeout (``None``: no timeouts enforced).
        observed: Whether state-change observers listen (claims are then reported).
        wakeups_live: Whether wake-ups arrive now (idle workers then share one poll).
        storer: The pool's shared storer, which acknowledges every outcome; ``None``:
            this worker stores its batch's outcomes itself (inline mode).
        group: The pool's claim group, through which this worker claims with the
            others asking at the same moment; ``None``: it claims alone (inline mode).
        on_batch_end: Called after each batch (the pool then flushes its storer if idle).
    """

    def __init__(self, runtime: Runtime, *, worker_id: str, server_name: str,
                 processor: JobProcessor, idle: IdleGate, watchdog: Watchdog | None,
                 observed: bool, wakeups_live: Callable[[], bool],
                 storer: OutcomeStorer | None = None, group: ClaimGroup | None = None,
                 on_batch_end: Callable[[], None] | None = None) -> None:
        self.runtime = runtime
        self.worker_id = worker_id
        self.server_name = server_name
        self.processor = processor
        self.idle = idle
        self.watchdog = watchdog
        self.observed = observed
        self.wakeups_live = wakeups_live
        self.storer = storer
        self.group = group
        self.on_batch_end = on_batch_end

    def run(self) -> None:
        """Claim and run batches until the server stops (a thread's target)."""
        config, stopping = self.runtime.config, self.runtime.stopping
        queues = list(config.queues)
        interval_s = config.polling_interval.total_seconds()
        size = BatchSize(config)
        backoff = Backoff(CLAIM_RETRY_INITIAL_S, CLAIM_RETRY_CAP_S)
        loop = asyncio.new_event_loop()
        try:
            while not stopping.is_set():
                if not self.runtime.claims.trusted():  # claim nothing until a heartbeat
                    self.runtime.claims.wait_trusted(min(interval_s, DISTRUST_WAIT_S))
                    continue
                limit = size.limit()
                try:
                    jobs, seen, began, full = self._claim_batch(queues, limit)
                    backoff.reset()
                except Exception as exc:  # the loop must outlive any storage failure
                    delay = backoff.next()
                    log.warning("claim failed (%s: %s); retrying in %.1f s",
                                type(exc).__name__, exc, delay)
                    stopping.wait(backoff.jittered(delay))
                    continue
                if not jobs:
                    self.idle.wait(seen, interval_s, stopping=stopping,
                                   shared_poll=self.wakeups_live())
                    continue
                if full:  # there may be more: pass the wake-up on
                    self.idle.wake(1)
                else:
                    self.idle.keep_a_poller()
                started = time.perf_counter()
                self.run_batch(jobs, loop, claimed_at=began)
                size.observe((time.perf_counter() - started) / len(jobs))
        finally:
            loop.close()

    def _claim_batch(self, queues: list[str], limit: int) -> tuple[list[Job], int, float, bool]:
        """Claim up to ``limit`` jobs, through the group when there is one.

        Returns:
            ``(jobs, seen, began, full)``: the jobs; the idle gate's sequence number and
            the ledger's clock, both read before the claim; whether the claim returned
            all it asked for (more may be waiting).
        """
        if self.group is not None:
            share = self.group.claim(self.worker_id, limit)
            return share.jobs, share.seen, share.began, share.full
        seen = self.idle.seen()
        began = self.runtime.claims.clock()  # the claim's lease starts before it
        jobs = claim_jobs(self.runtime, worker_id=self.worker_id, server_name=self.server_name,
                          queues=queues, limit=limit, observed=self.observed)
        return jobs, seen, began, len(jobs) >= limit

    def _context(self, job: Job) -> JobContext:
        return JobContext(job=job, worker_id=self.worker_id, server_name=self.server_name,
                          stopping=self.runtime.stopping,
                          progress_sink=self.runtime.storage.report_progress)

    def run_batch(self, jobs: list[Job], loop: asyncio.AbstractEventLoop, *,
                  claimed_at: float | None = None) -> None:
        """Run a claimed batch in order and acknowledge its outcomes.

        With a storer, each outcome goes to it as its attempt ends (stored within a
        window). Without one, outcomes are stored together, at least every prefetch
        window, and the rest before this returns; the straggler duty may store them
        earlier. Either way a crash re-runs no more than the last window's work. A job
        given back meanwhile (stop, abort, the straggler duty) is skipped; once
        stopping, the rest are released. When the ledger answers `LOST` (this server
        may have been presumed dead, so its claims reclaimed), nothing more of the
        batch starts: the unstarted claims are released, fenced, so a job a peer has
        reclaimed is left alone.

        Args:
            jobs: The claimed jobs, in claim order.
            loop: This worker's event loop (for ``async def`` jobs).
            claimed_at: The ledger's clock read before the claim's storage call (see
                `ClaimLedger.hold`); ``None``: now.
        """
        runtime, claims, worker_id = self.runtime, self.runtime.claims, self.worker_id
        claims.hold(jobs, worker_id, claimed_at=claimed_at)
        window = runtime.config.prefetch_window.total_seconds()
        flushed = time.perf_counter()
        boxed = self.storer is None  # else outcomes go to the storer, never to the box
        try:
            for job in jobs:
                if (boxed and time.perf_counter() - flushed >= window
                        and claims.has_outcomes(worker_id)):
                    runtime.store_outcomes(claims.take_outcomes(worker_id))
                    flushed = time.perf_counter()
                ctx = claims.start(job, worker_id, stopping=runtime.stopping.is_set(),
                                   make_context=functools.partial(self._context, job))
                if ctx == SKIP:
                    continue
                if ctx == RELEASE:
                    runtime.release([job], "released unstarted: server stopping")
                    continue
                if ctx == LOST:
                    self._drop_lost()
                    break
                assert isinstance(ctx, JobContext)
                self._run_one(job, ctx, loop)  # its outcome is now boxed or with the storer
        finally:
            if boxed:
                runtime.store_outcomes(claims.take_outcomes(worker_id))
            claims.end_batch(worker_id, jobs)
            if self.on_batch_end is not None:
                self.on_batch_end()

    def _drop_lost(self) -> None:
        """Release (fenced) the unstarted claims of a batch whose claim may be lost."""
        lost = self.runtime.claims.release_waiting({self.worker_id})
        age = self.runtime.claims.heartbeat_age()
        log.warning("%s: not starting %d claimed job(s): this server may have been presumed "
                    "dead (last heartbeat %s ago); releasing those still ours", self.worker_id,
                    len(lost), "never" if age is None else f"{age:.1f} s")
        self.runtime.release(lost, "released unstarted: claim may have been reclaimed")

    def _run_one(self, job: Job, ctx: JobContext, loop: asyncio.AbstractEventLoop) -> None:
        """Run one attempt; its outcome goes to the storer, or to this worker's box."""
        timeout = self.processor.timeout_for(job)
        watchdog = self.watchdog if timeout is not None else None
        if watchdog is not None and timeout is not None:
            watchdog.watch(ctx, timeout)
        outcome: Transition | None = None
        try:
            outcome = self.processor.run(job, ctx, loop)
        finally:
            if watchdog is not None:
                watchdog.done(ctx)
            if self.storer is None:  # forgotten, its outcome boxed to store with the batch
                self.runtime.claims.finish(
                    job, None if outcome is None else (self.worker_id, outcome))
            else:  # forgotten, then handed to the storer (stored within a window)
                self.runtime.claims.finish(job)
                if outcome is not None:
                    self.storer.add(outcome)


class ThreadPool:
    """``worker_count`` worker threads, each running one `Worker` loop, and one storer
    thread acknowledging their outcomes (the `qmlkit.processing.pools.base.Pool` named
    ``"threads"``).

    Each thread claims a batch sized by `BatchSize` and runs it in order; the storer
    stores the outcomes of all threads together (`OutcomeStorer`). An ``async def`` job
    runs on its thread's own event loop (one coroutine per thread at a time). qml-rs's
    worker threads; Celery's ``threads`` pool; Dramatiq's worker threads with acks
    handed to one thread.

    Args:
        parts: What the pool needs from its server.
    """

    name = "threads"

    def __init__(self, parts: PoolParts) -> None:
        self.parts = parts
        self.size = parts.runtime.config.worker_count
        self._threads: list[threading.Thread] = []
        self.storer = OutcomeStorer(parts.runtime, name="qmlkit-storer")
        queues = list(parts.runtime.config.queues)
        self.group = ClaimGroup(
            lambda worker_id, limit: claim_jobs(
                parts.runtime, worker_id=worker_id, server_name=parts.server_name,
                queues=queues, limit=limit, observed=parts.observed),
            idle=parts.idle, claims=parts.runtime.claims,
            pool_id=f"{parts.runtime.config.server_name}:threads")
        self._lock = threading.Lock()
        self._running_workers = 0  # worker threads not ended yet, under _lock

    def start(self) -> None:
        """Start the worker threads (daemons named ``qmlkit-worker-<n>``) and the
        storer (``qmlkit-storer``)."""
        parts, cfg = self.parts, self.parts.runtime.config
        self.storer.start()
        self._running_workers = self.size
        if not self.size:
            self.storer.close()
        for i in range(self.size):
            worker = Worker(parts.runtime, worker_id=f"{cfg.server_name}:worker:{i}",
                            server_name=parts.server_name, processor=parts.processor,
                            idle=parts.idle, watchdog=parts.watchdog, observed=parts.observed,
                            wakeups_live=parts.wakeups_live, storer=self.storer,
                            group=self.group, on_batch_end=self._batch_ended)
            thread = threading.Thread(target=self._work, args=(worker,),
                                      name=f"qmlkit-worker-{i}", daemon=True)
            thread.start()
            self._threads.append(thread)

    def _work(self, worker: Worker) -> None:
        """A worker thread's target: its loop; the last one to end closes the storer."""
        try:
            worker.run()
        finally:
            with self._lock:
                self._running_workers -= 1
                last = self._running_workers == 0
            if last:
                self.storer.close()

    def _batch_ended(self) -> None:
        """After any worker's batch: if no attempt runs now, store what waits at once
        (a lone job's result is not held for the window)."""
        if not self.parts.runtime.claims.any_running():
            self.storer.flush()

    def busy(self) -> int:
        """Worker threads running an attempt now."""
        return len(self.parts.runtime.claims.running())

    def alive(self) -> bool:
        """Whether any worker thread, or the storer, still runs."""
        return any_alive([*self._threads, self.storer.thread])

    def join(self, timeout_s: float) -> None:
        """Wait up to ``timeout_s`` seconds in all for the worker threads and then the
        storer to end."""
        started = self.storer.thread.ident is not None
        join_all([*self._threads, *([self.storer.thread] if started else [])], timeout_s)

    def abort(self) -> None:
        """Nothing to cancel: a thread cannot be stopped; its attempt was told through
        ``context.cancelled`` and its outcome will be rejected by fencing."""
