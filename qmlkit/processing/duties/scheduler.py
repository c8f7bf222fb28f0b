"""The scheduler duty: promote due Scheduled and AwaitingRetry jobs to Enqueued."""

from __future__ import annotations

from typing import TYPE_CHECKING

from qmlkit.job import utcnow
from qmlkit.processing.duties.base import DutyBase

if TYPE_CHECKING:
    from qmlkit.processing.config import ServerConfig
    from qmlkit.processing.runtime import Runtime

__all__ = ["PROMOTE_BATCH", "SchedulerDuty", "promote_due"]

#: Jobs promoted per storage call.
PROMOTE_BATCH = 1000


def promote_due(runtime: Runtime) -> int:
    """Promote every due Scheduled/AwaitingRetry job now, in batches; return how many."""
    total = 0
    while True:
        changes = runtime.storage.promote_due(now=utcnow(), limit=PROMOTE_BATCH)
        total += len(changes)
        runtime.notify(changes)
        runtime.runnable(changes)
        if len(changes) < PROMOTE_BATCH:
            return total


class SchedulerDuty(DutyBase):
    """Promotes due jobs; sleeps until the earliest known due time, at most its interval.

    While idle it costs one indexed query (``next_due_at``) per interval; a nudge (a
    schedule or retry in this process, or a ``SCHEDULED`` wake-up) makes it look now.
    """

    name = "scheduler"
    failure = "promoting due jobs failed"

    def enabled(self, config: ServerConfig) -> bool:
        """See `Duty.enabled`: ``config.enable_scheduler``."""
        return config.enable_scheduler

    def interval(self, runtime: Runtime) -> float:
        """See `Duty.interval`: the capped ``scheduler_poll_interval``."""
        return runtime.cap(runtime.config.scheduler_poll_interval)

    def run_once(self, runtime: Runtime) -> float | None:
        """Promote what is due; return the seconds until the next due job, if known."""
        next_due = runtime.storage.next_due_at()  # one indexed query while idle
        if next_due is not None and next_due <= utcnow():
            promote_due(runtime)
            next_due = runtime.storage.next_due_at()
        if next_due is None:
            return None
        return (next_due - utcnow()).total_seconds()
