"""The straggler duty: unblock a batch stuck behind a slow job (field case C18)."""

from __future__ import annotations

import logging
from typing import TYPE_CHECKING

from qmlkit.processing.duties.base import DutyBase

if TYPE_CHECKING:
    from qmlkit.processing.config import ServerConfig
    from qmlkit.processing.runtime import Runtime

__all__ = ["StragglerDuty"]

log = logging.getLogger("qmlkit.processing.server")  # the logger these lines always had


class StragglerDuty(DutyBase):
    """Unblock a batch stuck behind a slow job.

    A worker claims as many jobs as fit its estimate of ``prefetch_window``; when one of
    them runs far longer than that estimate (over four windows, and 0.2 s at least), the
    jobs claimed after it are released to their queues (fenced, as on stop) and the
    server's idle workers woken to take them, instead of waiting behind it; outcomes of
    the jobs it finished before still in its box (a worker that stores its own, as in
    inline mode) are stored now (the thread pool's storer stores them within a window
    anyway). Looks every window (20 ms at least).
    """

    name = "stragglers"
    failure = "straggler check failed"
    run_at_start = False
    nudgeable = False

    def enabled(self, config: ServerConfig) -> bool:
        """See `Duty.enabled`: only batches (``fetch_batch_size > 1``) of the thread pool
        can straggle; the asyncio pool starts every job it claims at once."""
        return config.fetch_batch_size > 1 and config.worker_count > 0 and config.pool == "threads"

    def interval(self, runtime: Runtime) -> float:
        """See `Duty.interval`: one prefetch window, 0.02 s at least."""
        return max(runtime.config.prefetch_window.total_seconds(), 0.02)

    def run_once(self, runtime: Runtime) -> float | None:
        """Store the outcomes ahead of each slow job, and release the jobs behind it."""
        threshold = max(4 * runtime.config.prefetch_window.total_seconds(), 0.2)
        claims = runtime.claims
        stuck = claims.stuck_workers(threshold)
        if not stuck:
            return None
        for worker_id in stuck:  # the finished jobs ahead of the slow one
            try:
                runtime.store_outcomes(claims.take_outcomes(worker_id))
            except Exception as exc:  # a duty must outlive any failure
                log.warning("storing outcomes ahead of a slow job failed: %s", exc)
        waiting = claims.release_waiting(stuck)
        if not waiting:
            return None
        try:
            runtime.release(waiting, "released unstarted: behind a slow job")
        except Exception as exc:  # a duty must outlive any failure
            log.warning("releasing jobs behind a slow one failed: %s", exc)
            return None
        log.info("released %d job(s) waiting behind a slow job", len(waiting))
        for queue in {job.queue for job in waiting}:
            runtime.wake(queue)
        return None
