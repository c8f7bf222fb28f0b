"""The cleanup duty: delete jobs whose ``expires_at`` has passed (TTL)."""

from __future__ import annotations

from typing import TYPE_CHECKING

from qmlkit.job import utcnow
from qmlkit.processing.duties.base import DutyBase

if TYPE_CHECKING:
    from qmlkit.processing.config import ServerConfig
    from qmlkit.processing.runtime import Runtime

__all__ = ["DELETE_BATCH", "CleanupDuty"]

#: Rows deleted per storage call.
DELETE_BATCH = 1000


class CleanupDuty(DutyBase):
    """Every ``cleanup_interval``, deletes expired jobs in batches until none are left."""

    name = "cleanup"
    failure = "cleanup failed"
    run_at_start = False
    nudgeable = False

    def enabled(self, config: ServerConfig) -> bool:
        """See `Duty.enabled`: ``config.enable_cleanup``."""
        return config.enable_cleanup

    def interval(self, runtime: Runtime) -> float:
        """See `Duty.interval`: ``cleanup_interval``."""
        return runtime.config.cleanup_interval.total_seconds()

    def run_once(self, runtime: Runtime) -> float | None:
        """Delete expired rows, a batch at a time, until a batch comes back short."""
        while runtime.storage.delete_expired(now=utcnow(), limit=DELETE_BATCH) == DELETE_BATCH:
            if runtime.stopping.is_set():
                break
        return None
