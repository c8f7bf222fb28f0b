"""What the dashboard reads and does, as plain data: one layer under the API and the pages.

Every function here is synchronous (the storage is) and is called from a worker thread
by the web layer. Shapes are pydantic models, so the REST API's OpenAPI description and
the HTML pages use exactly the same data.
"""

from __future__ import annotations

import json
import threading
import time
from datetime import datetime, timedelta
from typing import Any

from qmlkit.app import App
from qmlkit.dashboard.models import (
    ActionResult,
    ErrorInfo,
    JobDetail,
    JobPage,
    JobRow,
    Progress,
    RecurringRow,
    ServerRow,
    Stats,
    Throughput,
    ThroughputPoint,
)
from qmlkit.errors import JobNotFound
from qmlkit.job import STATE_NAMES, Job, JobState, utcnow
from qmlkit.storage.base import Storage

__all__ = ["COUNTS_TTL_S", "MAX_OFFSET", "MAX_PAGE", "ActionResult", "DashboardService",
           "ErrorInfo", "JobDetail", "JobPage", "JobRow", "Progress", "RecurringRow",
           "ServerRow", "Stats", "Throughput", "ThroughputPoint", "actions_for", "job_row",
           "progress_of", "state_time"]

#: Most jobs one page of the jobs list may hold.
MAX_PAGE = 500
#: The largest offset into the jobs list (the REST API's bound, for the WebSocket too).
MAX_OFFSET = 100_000_000
#: How long one ``count_jobs`` answer is reused, in seconds: a page and the live loop
#: asking within this window share one count (a full scan: ~50 ms at 100,000 SQLite jobs).
COUNTS_TTL_S = 0.2



def state_time(state: JobState) -> datetime | None:
    """Return when ``state`` was entered (UTC), from whichever field the state has."""
    for field in ("enqueued_at", "scheduled_at", "started_at", "succeeded_at", "failed_at",
                  "deleted_at"):
        value: datetime | None = getattr(state, field, None)
        if value is not None:
            return value
    return None


def _detail(job: Job) -> str:
    state = job.state
    text = ""
    if state.name == "Failed":
        text = f"{state.exception_type}: {state.message}"
    elif state.name == "AwaitingRetry":
        text = (f"retry {state.retry_count} at {state.retry_at:%Y-%m-%d %H:%M:%S} UTC: "
                f"{state.last_exception}")
    elif state.name == "Scheduled":
        text = f"runs at {state.enqueue_at:%Y-%m-%d %H:%M:%S} UTC"
    elif state.name == "Succeeded":
        text = (f"{state.duration_ms:.0f} ms → "
                + json.dumps(state.result, ensure_ascii=False))
    elif state.name == "Processing":
        text = f"on {state.worker_id}"
    elif state.name in ("Enqueued", "Deleted") and state.reason:
        text = state.reason
    return text if len(text) <= 200 else text[:199] + "…"


def progress_of(job: Job) -> Progress | None:
    """Return the job's stored progress report, or ``None`` if it has none (or a bad one,
    or one left by an earlier attempt of a retried job)."""
    raw = job.metadata.get("progress")
    if not isinstance(raw, dict):
        return None
    if raw.get("attempt") not in (None, job.attempts):
        return None
    try:
        return Progress.model_validate(raw)
    except ValueError:
        return None


def job_row(job: Job) -> JobRow:
    """Return ``job`` as a list row."""
    return JobRow(id=job.id, method=job.method, queue=job.queue, state=job.state.name,
                  priority=job.priority, attempts=job.attempts, retry_count=job.retry_count,
                  created_at=job.created_at, state_at=state_time(job.state),
                  detail=_detail(job), progress=progress_of(job))


def actions_for(state_name: str) -> list[str]:
    """Return the actions that apply to a job in ``state_name``.

    ``retry`` for Failed, Succeeded and Deleted (`App.retry`); ``requeue`` for Scheduled
    and AwaitingRetry (`App.requeue`); ``delete`` for every state but Deleted.
    """
    found = []
    if state_name in ("Failed", "Succeeded", "Deleted"):
        found.append("retry")
    if state_name in ("Scheduled", "AwaitingRetry"):
        found.append("requeue")
    if state_name != "Deleted":
        found.append("delete")
    return found


class DashboardService:
    """The dashboard's reads and actions over one `App` and its storage.

    Args:
        app: The application; actions go through it so observers and wake-ups fire.
        dead_server_after: A server whose heartbeat is older counts as dead.
    """

    def __init__(self, app: App, *, dead_server_after: timedelta = timedelta(seconds=60)) -> None:
        self.app = app
        self.dead_server_after = dead_server_after
        self._lock = threading.Lock()
        self._counts: dict[tuple[str, str], int] | None = None
        self._counts_at = 0.0

    def invalidate(self) -> None:
        """Forget the cached counts (a state changed); thread-safe."""
        with self._lock:
            self._counts = None

    def raw_counts(self) -> dict[tuple[str, str], int]:
        """Return ``count_jobs()``, reused for up to `COUNTS_TTL_S` unless invalidated."""
        with self._lock:
            if self._counts is not None and time.monotonic() - self._counts_at < COUNTS_TTL_S:
                return self._counts
        found = self.storage.count_jobs()
        with self._lock:
            self._counts, self._counts_at = found, time.monotonic()
        return found

    @property
    def storage(self) -> Storage:
        """The app's opened storage."""
        return self.app.storage

    # --- reads ---------------------------------------------------------------------------

    def counts(self) -> tuple[dict[str, int], dict[str, dict[str, int]]]:
        """Return ``({state: count}, {queue: {state: count}})``; every state name present."""
        raw = self.raw_counts()
        states = dict.fromkeys(STATE_NAMES, 0)
        queues: dict[str, dict[str, int]] = {}
        for (queue, state), n in sorted(raw.items()):
            states[state] = states.get(state, 0) + n
            queues.setdefault(queue, dict.fromkeys(STATE_NAMES, 0))[state] = n
        return states, queues

    def stats(self) -> Stats:
        """Return the counts by state and queue, and how many servers are live and dead."""
        states, queues = self.counts()
        servers = self.servers()
        live = sum(1 for s in servers if s.alive)
        return Stats(states=states, queues=queues, total=sum(states.values()),
                     servers_live=live, servers_dead=len(servers) - live)

    def jobs(self, *, state: str | None = None, queue: str | None = None,
             method: str | None = None, limit: int = 50, offset: int = 0) -> JobPage:
        """Return one page of jobs, newest first, filtered by every given filter.

        Args:
            state: A state name, or ``None``.
            queue: A queue name, or ``None``.
            method: A job name, or ``None``.
            limit: Rows per page, 1 to `MAX_PAGE`.
            offset: Rows to skip, 0 to `MAX_OFFSET`.

        Raises:
            ValueError: ``state`` is not a state name, or ``limit``/``offset`` out of bounds.
        """
        if state is not None and state not in STATE_NAMES:
            raise ValueError(f"unknown state {state!r}; one of {', '.join(STATE_NAMES)}")
        if not 1 <= limit <= MAX_PAGE or not 0 <= offset <= MAX_OFFSET:
            raise ValueError(f"limit must be 1 to {MAX_PAGE} and offset 0 to {MAX_OFFSET}")
        found = self.storage.list_jobs(state=state, queue=queue, method=method,
                                       limit=limit + 1, offset=offset)
        total: int | None = None
        if method is None:
            raw = self.raw_counts()
            total = sum(n for (q, s), n in raw.items()
                        if (queue is None or q == queue) and (state is None or s == state))
        return JobPage(jobs=[job_row(j) for j in found[:limit]], limit=limit, offset=offset,
                       has_next=len(found) > limit, total=total)

    def job(self, job_id: str) -> JobDetail:
        """Return everything about one job, its state history included where kept.

        Raises:
            JobNotFound: No such job.
        """
        job = self.storage.get(job_id)
        if job is None:
            raise JobNotFound(job_id)
        state = job.state
        error: ErrorInfo | None = None
        if state.name == "Failed":
            error = ErrorInfo(type=state.exception_type, message=state.message,
                              stack_trace=state.stack_trace)
        elif state.name == "AwaitingRetry":
            error = ErrorInfo(type=None, message=state.last_exception,
                              stack_trace=state.stack_trace)
        row = job_row(job)
        return JobDetail(
            **row.model_dump(), args=job.args, kwargs=job.kwargs, metadata=job.metadata,
            max_retries=job.max_retries, timeout_s=job.timeout_s, expires_at=job.expires_at,
            state_data=state.model_dump(mode="json"), error=error,
            result=getattr(state, "result", None), history=self.history(job_id),
            actions=actions_for(state.name),
        )

    def history(self, job_id: str) -> list[dict[str, Any]] | None:
        """Return the job's states oldest first as JSON objects (`Storage.job_history`).

        Returns:
            One ``state.model_dump(mode="json")`` per state, the current one last; ``None``
            when the backend keeps no history (its ``job_history`` raises
            ``NotImplementedError``, as the contract's default does).
        """
        try:
            states = self.storage.job_history(job_id)
        except NotImplementedError:
            return None
        return [s.model_dump(mode="json") for s in states]

    def throughput(self, *, minutes: int = 60, now: datetime | None = None) -> Throughput:
        """Return succeeded and failed counts per UTC minute for the last ``minutes``.

        From `Storage.throughput`; ``available`` is ``False`` when the backend does not
        count (its ``throughput`` raises ``NotImplementedError``).

        Args:
            minutes: How many minutes, the current one included (1 to 1440).
            now: The current time (tests pass one); default now.

        Raises:
            ValueError: ``minutes`` is out of bounds.
        """
        if not 1 <= minutes <= 1440:
            raise ValueError("minutes must be 1 to 1440")
        now = now or utcnow()
        end = now.replace(second=0, microsecond=0)
        start = end - timedelta(minutes=minutes - 1)
        try:
            found = self.storage.throughput(since=start, until=now)
        except NotImplementedError:
            return Throughput(available=False, points=[])
        by_minute = {m: (s, f) for m, s, f in found}
        points = []
        for i in range(minutes):
            minute = start + timedelta(minutes=i)
            s, f = by_minute.get(minute, (0, 0))
            points.append(ThroughputPoint(minute=minute, succeeded=s, failed=f))
        return Throughput(available=True, points=points)

    def recurring(self) -> list[RecurringRow]:
        """Return every recurring template, ordered by id."""
        return [RecurringRow(id=t.id, cron=t.cron, timezone=t.timezone, method=t.method,
                             queue=t.queue, enabled=t.enabled, next_run_at=t.next_run_at,
                             last_run_at=t.last_run_at, args=t.args, kwargs=t.kwargs)
                for t in self.app.list_recurring(storage=self.storage)]

    def servers(self, *, now: datetime | None = None) -> list[ServerRow]:
        """Return every registered server, oldest first, with its heartbeat age."""
        now = now or utcnow()
        rows = []
        for info in self.storage.list_servers():
            age = (now - info.last_heartbeat).total_seconds()
            rows.append(ServerRow(id=info.id, name=info.name, worker_count=info.worker_count,
                                  pool=info.pool, busy=info.busy, queues=list(info.queues),
                                  started_at=info.started_at,
                                  last_heartbeat=info.last_heartbeat,
                                  heartbeat_age_s=round(max(age, 0.0), 3),
                                  alive=age <= self.dead_server_after.total_seconds()))
        return rows

    # --- actions -------------------------------------------------------------------------

    def retry(self, job_id: str) -> ActionResult:
        """Enqueue a Failed, Succeeded or Deleted job again (`App.retry`).

        Raises:
            JobNotFound: No such job.
            InvalidTransition: It is in another state.
        """
        return _enqueued(self.app.retry(job_id))

    def requeue(self, job_id: str) -> ActionResult:
        """Run a Scheduled or AwaitingRetry job now (`App.requeue`).

        Raises:
            JobNotFound: No such job.
            InvalidTransition: It is in another state.
        """
        return _enqueued(self.app.requeue(job_id))

    def delete(self, job_id: str) -> ActionResult:
        """Move a job to Deleted (`App.delete`; cleanup removes it after 24 hours).

        Raises:
            JobNotFound: No such job.
            InvalidTransition: It is Deleted already.
        """
        job = self.app.delete(job_id, reason="deleted from the dashboard")
        return ActionResult(job=job_row(job), job_id=job.id, message=f"job {job.id} deleted")

    def trigger(self, template_id: str) -> ActionResult:
        """Enqueue one job from a recurring template now (`App.trigger_recurring`).

        Raises:
            JobNotFound: No such template.
        """
        job_id = self.app.trigger_recurring(template_id, storage=self.storage)
        return ActionResult(job_id=job_id, message=f"{template_id} triggered: job {job_id}")

    def remove_recurring(self, template_id: str) -> ActionResult:
        """Remove a recurring template; jobs it made are kept.

        Raises:
            JobNotFound: No such template.
        """
        if not self.app.remove_recurring(template_id, storage=self.storage):
            raise JobNotFound(template_id)
        return ActionResult(message=f"recurring job {template_id} removed")


def _enqueued(job: Job) -> ActionResult:
    return ActionResult(job=job_row(job), job_id=job.id,
                        message=f"job {job.id} enqueued in {job.queue}")
