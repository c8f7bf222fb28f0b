"""Background duties: each a small step the server starts and stops from a plain list.

As Celery composes a worker from bootsteps (without their dependency graph), a server
runs the duties of `default_duties` in order, each on its own thread through
`run_duty`: scheduler, recurring poller, cleanup, heartbeat, the straggler loop and
(without heartbeats) the stranded sweep.
A duty reaches its server only through `qmlkit.processing.runtime.Runtime`.
"""

from __future__ import annotations

from qmlkit.processing.duties.base import Duty, DutyBase, run_duty
from qmlkit.processing.duties.cleanup import CleanupDuty
from qmlkit.processing.duties.heartbeat import HeartbeatDuty
from qmlkit.processing.duties.recurring import RecurringDuty, fire_due_recurring
from qmlkit.processing.duties.scheduler import SchedulerDuty, promote_due
from qmlkit.processing.duties.stragglers import StragglerDuty
from qmlkit.processing.duties.stranded import StrandedDuty

__all__ = [
    "CleanupDuty",
    "Duty",
    "DutyBase",
    "HeartbeatDuty",
    "RecurringDuty",
    "SchedulerDuty",
    "StragglerDuty",
    "StrandedDuty",
    "default_duties",
    "fire_due_recurring",
    "promote_due",
    "run_duty",
]


def default_duties() -> list[Duty]:
    """A fresh list of the built-in duties, in the order a server starts them."""
    return [StragglerDuty(), SchedulerDuty(), RecurringDuty(), CleanupDuty(), HeartbeatDuty(),
            StrandedDuty()]
