"""The records the storage contract passes around: transitions, state changes, server
rows, and the contract's bounds. Re-exported by `qmlkit.storage.base`."""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime, timedelta, timezone
from typing import Any

from pydantic import BaseModel, ConfigDict, Field

from qmlkit.job import Job, JobState, UtcDateTime

__all__ = ["MAX_CLAIM", "STATS_RETENTION", "ServerInfo", "StateChange", "Transition",
           "minute_of"]

#: Most jobs one ``claim`` call may return.
MAX_CLAIM = 1000

#: How long per-minute throughput counters are kept.
STATS_RETENTION = timedelta(days=7)


def minute_of(moment: datetime) -> datetime:
    """``moment`` rounded down to its UTC minute (the throughput bucket)."""
    return moment.astimezone(timezone.utc).replace(second=0, microsecond=0)


@dataclass(frozen=True)
class Transition:
    """A fenced state change requested by the worker that claimed ``job``.

    Attributes:
        job: The job as the worker holds it: Processing, with its claim's fencing token
            in ``job.attempts``.
        state: The target state: Succeeded, Failed, AwaitingRetry, or Enqueued (a claim
            released unstarted).
        expires_at: When cleanup may delete the job (UTC), or ``None`` for never.
        retry_count: The job's new ``retry_count``, or ``None`` to keep it.
    """

    job: Job
    state: JobState
    expires_at: datetime | None = None
    retry_count: int | None = None

    @property
    def token(self) -> int:
        """The fencing token presented: the claim's attempt number."""
        return self.job.attempts

    def applied(self) -> Job:
        """Return the job as it is once this transition is stored.

        Raises:
            InvalidTransition: ``state`` may not follow the job's current state.
        """
        changes: dict[str, Any] = {"expires_at": self.expires_at}
        if self.retry_count is not None:
            changes["retry_count"] = self.retry_count
        return self.job.with_state(self.state, **changes)


@dataclass(frozen=True)
class StateChange:
    """One committed state change, as observers receive it.

    Attributes:
        job: The job after the change.
        previous: Its state before, or ``None`` for a newly stored job.
    """

    job: Job
    previous: JobState | None


class ServerInfo(BaseModel):
    """One row of the server registry (qml-rs ``ServerInfo``).

    Attributes:
        id: Unique id, ``"{name}#{uuid4}"``.
        name: The configured server name.
        worker_count: Its concurrency: worker threads, or the asyncio pool's slots.
        queues: The queues it serves (empty means all).
        started_at: When it registered (UTC).
        last_heartbeat: When it last reported alive (UTC).
        pool: Its execution pool: ``"threads"``, ``"asyncio"`` (``ServerConfig.pool``).
        busy: Slots running an attempt when it last registered or refreshed its entry
            (the heartbeat refreshes it when it changed), 0 to ``worker_count``.
    """

    model_config = ConfigDict(frozen=True, extra="forbid")
    id: str
    name: str
    worker_count: int = Field(ge=0)
    queues: list[str] = Field(default_factory=list)
    started_at: UtcDateTime
    last_heartbeat: UtcDateTime
    pool: str = "threads"  # a row written before pools existed ran worker threads
    busy: int = Field(default=0, ge=0)
