"""The recurring duty: materialise the due ticks of recurring templates this server wins."""

from __future__ import annotations

import logging
from datetime import datetime
from typing import TYPE_CHECKING

from qmlkit.errors import DuplicateJob
from qmlkit.job import utcnow
from qmlkit.processing.duties.base import DutyBase
from qmlkit.storage.base import StateChange

if TYPE_CHECKING:
    from qmlkit.processing.config import ServerConfig
    from qmlkit.processing.runtime import Runtime
    from qmlkit.recurring import RecurringJob

__all__ = ["RecurringDuty", "fire_due_recurring"]

log = logging.getLogger("qmlkit.processing.server")  # the logger these lines always had


def fire_due_recurring(runtime: Runtime) -> datetime | None:
    """Materialise every due tick this server wins; return the earliest next tick.

    Each due template is advanced with one compare-and-set (`Storage.fire_recurring`),
    so with several servers polling, each tick becomes exactly one job. One broken
    template is logged and never holds up the others.

    Returns:
        The earliest ``next_run_at`` (aware UTC) of the enabled templates, or ``None``.
    """
    now = utcnow()
    earliest: datetime | None = None
    for template in runtime.storage.list_recurring():
        if not template.enabled or template.next_run_at is None:
            continue
        upcoming = due = template.next_run_at
        if due <= now:
            try:  # one broken template must never hold up the others
                upcoming = _fire(runtime, template, due, now)
            except Exception as exc:
                log.error("recurring job %s: tick %s not fired: %s: %s", template.id,
                          template.next_run_at.isoformat(), type(exc).__name__, exc)
                continue
        if earliest is None or upcoming < earliest:
            earliest = upcoming
    return earliest


def _fire(runtime: Runtime, template: RecurringJob, due: datetime, now: datetime) -> datetime:
    """Materialise one due template's tick (if this server wins it); return its next.

    ``due`` is the template's ``next_run_at`` as read, the compare-and-set's expectation.
    """
    tick, following = template.plan(now)
    job = runtime.tick_job(template, tick) if tick is not None else None
    if tick is not None and job is None:
        log.warning("recurring job %s: an enqueue middleware dropped tick %s",
                    template.id, tick.isoformat())
    storage = runtime.storage
    try:
        won = storage.fire_recurring(template.id, expected_next_run_at=due,
                                     next_run_at=following, job=job)
    except DuplicateJob:
        # The tick's job exists already (its schedule was rolled back under us):
        # advance the schedule without storing it twice.
        won = storage.fire_recurring(template.id, expected_next_run_at=due,
                                     next_run_at=following, job=None)
        job = None
    if won and job is not None:
        runtime.notify([StateChange(job, None)])
        runtime.runnable([StateChange(job, None)])
    elif won and tick is None:
        log.warning("recurring job %s: missed tick %s skipped (misfire=skip)",
                    template.id, due.isoformat())
    return following


class RecurringDuty(DutyBase):
    """Polls the templates; sleeps until the earliest ``next_run_at``, at most its interval.

    A nudge (a template registered in this process, or a ``RECURRING`` wake-up) makes it
    look now.
    """

    name = "recurring"
    failure = "recurring poll failed"

    def enabled(self, config: ServerConfig) -> bool:
        """See `Duty.enabled`: ``config.enable_recurring``."""
        return config.enable_recurring

    def interval(self, runtime: Runtime) -> float:
        """See `Duty.interval`: the capped ``recurring_poll_interval``."""
        return runtime.cap(runtime.config.recurring_poll_interval)

    def run_once(self, runtime: Runtime) -> float | None:
        """Fire what is due; return the seconds until the earliest next tick, if any."""
        upcoming = fire_due_recurring(runtime)
        return None if upcoming is None else (upcoming - utcnow()).total_seconds()
