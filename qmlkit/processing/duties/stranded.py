"""The stranded sweep: without heartbeats, requeue Processing jobs nobody holds any more."""

from __future__ import annotations

import logging
from datetime import timedelta
from typing import TYPE_CHECKING

from qmlkit.errors import QmlError
from qmlkit.job import utcnow
from qmlkit.processing.duties.base import DutyBase

if TYPE_CHECKING:
    from qmlkit.processing.config import ServerConfig
    from qmlkit.processing.runtime import Runtime
    from qmlkit.storage.base import Storage

__all__ = ["StrandedDuty", "requeue_stranded_on_start", "warn_recent_processing"]

log = logging.getLogger("qmlkit.processing.server")


class StrandedDuty(DutyBase):
    """Every ``stale_sweep_interval``, for a server that runs WITHOUT heartbeats: requeue
    Processing jobs claimed longer than ``stale_processing_after`` ago.

    As on start, jobs of registered servers are left to heartbeat reclaim (which knows
    whether they live), and so are this server's own (stamped with its ``server_name``):
    its long jobs are not taken from it. Without this duty a killed worker's jobs waited
    for the next server *start*.
    """

    name = "stranded"
    failure = "stranded sweep failed"
    run_at_start = False
    nudgeable = False

    def enabled(self, config: ServerConfig) -> bool:
        """See `Duty.enabled`: only servers without heartbeats (with them, reclaim does it)."""
        return not config.enable_heartbeat

    def interval(self, runtime: Runtime) -> float:
        """See `Duty.interval`: ``stale_sweep_interval``."""
        return runtime.config.stale_sweep_interval.total_seconds()

    def run_once(self, runtime: Runtime) -> float | None:
        """Requeue stale Processing jobs that no live registered server and not this one holds."""
        storage = runtime.storage
        cfg = runtime.config
        now = utcnow()
        exclude = [s.id for s in storage.list_servers()] + [cfg.server_name]
        changes = storage.requeue_stranded(
            started_before=now - cfg.stale_processing_after, now=now, exclude_servers=exclude)
        if changes:
            log.info("requeued %d stranded Processing job(s)", len(changes))
            runtime.notify(changes)
            runtime.runnable(changes)
        return None


def warn_recent_processing(storage: Storage, stale_after: timedelta) -> None:
    """Log a warning when jobs sit in Processing that a sweep may not touch yet.

    Args:
        storage: The opened storage.
        stale_after: ``stale_processing_after``: younger claims are left alone.
    """
    try:
        held = sum(n for (_, state), n in storage.count_jobs().items()
                   if state == "Processing")
    except Exception:  # a warning is not worth failing start over
        return
    if held:
        log.warning(
            "%d job(s) are Processing, claimed less than %s ago; if their worker died, "
            "they are requeued by the stranded sweep once older than that, or at once by "
            "heartbeat reclaim (enable_heartbeat / qmlkit worker --heartbeat)",
            held, stale_after)


def requeue_stranded_on_start(runtime: Runtime) -> None:
    """On a server's start: requeue Processing jobs a crashed predecessor left (claimed
    longer than ``stale_processing_after`` ago), or, without heartbeats, warn about
    recent ones. Registered servers' jobs are left to heartbeat reclaim, which knows
    whether they are alive: a long job of a live server is never taken. A storage error
    is logged, not raised (the server starts anyway)."""
    cfg, storage = runtime.config, runtime.storage
    now = utcnow()
    try:
        registered = [s.id for s in storage.list_servers()] if cfg.enable_heartbeat else []
        stranded = storage.requeue_stranded(
            started_before=now - cfg.stale_processing_after, now=now,
            exclude_servers=registered,
        )
    except QmlError as exc:
        log.warning("could not requeue stranded jobs on start: %s", exc)
        stranded = []
    if stranded:
        log.info("requeued %d stranded Processing job(s) on start", len(stranded))
        runtime.notify(stranded)
    if not cfg.enable_heartbeat:
        warn_recent_processing(storage, cfg.stale_processing_after)
