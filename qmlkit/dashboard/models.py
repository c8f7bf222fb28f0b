"""The dashboard's data shapes: pydantic models shared by the REST API (and its OpenAPI
description) and the HTML pages. `qmlkit.dashboard.service` builds them.
"""

from __future__ import annotations

from datetime import datetime
from typing import Any

from pydantic import BaseModel, Field


class Progress(BaseModel):
    """A running job's last progress report (``JobContext.report_progress``).

    Attributes:
        fraction: Done so far, 0.0 to 1.0.
        message: The job's note, or ``None``.
        at: When it was reported (ISO 8601 UTC text, as stored).
    """

    fraction: float = Field(ge=0.0, le=1.0)
    message: str | None = None
    at: str | None = None


class JobRow(BaseModel):
    """One job as a row of the jobs list.

    Attributes:
        id: The job id.
        method: Its job name.
        queue: Its queue.
        state: Its state's name.
        priority: Higher runs first.
        attempts: Claims so far.
        retry_count: Retries so far.
        created_at: When it was made (UTC).
        state_at: When it entered its current state (UTC).
        detail: A one-line summary of the state (error, retry time, result), at most
            200 characters; plain text.
        progress: Its last progress report, or ``None``.
    """

    id: str
    method: str
    queue: str
    state: str
    priority: int
    attempts: int
    retry_count: int
    created_at: datetime
    state_at: datetime | None
    detail: str
    progress: Progress | None = None


class ErrorInfo(BaseModel):
    """The error of a Failed job, or of the last attempt of an AwaitingRetry one.

    Attributes:
        type: The exception's qualified name, or ``None`` if only ``"Type: message"``
            text was kept.
        message: The message (plain text).
        stack_trace: The formatted traceback, or ``None``.
    """

    type: str | None
    message: str
    stack_trace: str | None = None


class JobDetail(JobRow):
    """Everything the dashboard shows about one job.

    Attributes:
        args: Positional arguments (JSON).
        kwargs: Keyword arguments (JSON).
        metadata: The job's metadata (JSON object), progress included.
        max_retries: Retries allowed.
        timeout_s: Per-attempt limit in seconds, or ``None``.
        expires_at: When cleanup may delete it (UTC), or ``None``.
        state_data: The current state's fields (JSON object).
        error: The error to show, or ``None``.
        result: A Succeeded job's return value (JSON), else ``None``.
        history: Earlier and current states, oldest first, each a state's fields; ``None``
            when the storage keeps no history.
        actions: The actions that apply now: a subset of ``retry``, ``requeue``,
            ``delete``.
    """

    args: list[Any]
    kwargs: dict[str, Any]
    metadata: dict[str, Any]
    max_retries: int
    timeout_s: float | None
    expires_at: datetime | None
    state_data: dict[str, Any]
    error: ErrorInfo | None
    result: Any = None
    history: list[dict[str, Any]] | None
    actions: list[str]


class JobPage(BaseModel):
    """One page of the jobs list, newest first.

    Attributes:
        jobs: The rows.
        limit: Page size asked for.
        offset: Rows skipped before this page.
        has_next: Whether another page follows.
        total: How many jobs match the filters, or ``None`` when not known cheaply (a
            ``method`` filter).
    """

    jobs: list[JobRow]
    limit: int
    offset: int
    has_next: bool
    total: int | None


class Stats(BaseModel):
    """Job counts and server liveness.

    Attributes:
        states: ``{state_name: count}`` for every state name (zeros included).
        queues: ``{queue: {state_name: count}}`` for each queue holding jobs.
        total: All jobs.
        servers_live: Registered servers with a recent heartbeat.
        servers_dead: Registered servers whose heartbeat is older than the threshold.
    """

    states: dict[str, int]
    queues: dict[str, dict[str, int]]
    total: int
    servers_live: int
    servers_dead: int


class ThroughputPoint(BaseModel):
    """Jobs that reached Succeeded and Failed in one UTC minute.

    Attributes:
        minute: The minute's start (UTC).
        succeeded: Jobs that succeeded in it.
        failed: Jobs that failed for good in it.
    """

    minute: datetime
    succeeded: int
    failed: int


class Throughput(BaseModel):
    """Throughput over the last minutes, one point per minute (zeros included).

    Attributes:
        available: ``False`` when the storage does not count throughput; ``points`` is
            then empty.
        points: Oldest first.
    """

    available: bool
    points: list[ThroughputPoint]


class RecurringRow(BaseModel):
    """One recurring template.

    Attributes:
        id: Template id.
        cron: Cron expression.
        timezone: IANA zone it is read in.
        method: Job name.
        queue: Queue of its jobs.
        enabled: Whether ticks make jobs.
        next_run_at: Next tick (UTC), or ``None``.
        last_run_at: Last tick that made a job (UTC), or ``None``.
        args: Arguments of its jobs (JSON).
        kwargs: Keyword arguments of its jobs (JSON).
    """

    id: str
    cron: str
    timezone: str
    method: str
    queue: str
    enabled: bool
    next_run_at: datetime | None
    last_run_at: datetime | None
    args: list[Any]
    kwargs: dict[str, Any]


class ServerRow(BaseModel):
    """One registered server.

    Attributes:
        id: ``name#uuid``.
        name: Configured name.
        worker_count: Its concurrency (worker threads, or asyncio slots).
        pool: Its execution pool (``threads``, ``asyncio``).
        busy: Slots running an attempt as of its last heartbeat.
        queues: Queues served (empty: all).
        started_at: When it registered (UTC).
        last_heartbeat: Last heartbeat (UTC).
        heartbeat_age_s: Seconds since the last heartbeat.
        alive: Whether the heartbeat is younger than the dashboard's threshold.
    """

    id: str
    name: str
    worker_count: int
    pool: str = "threads"
    busy: int = 0
    queues: list[str]
    started_at: datetime
    last_heartbeat: datetime
    heartbeat_age_s: float
    alive: bool


class ActionResult(BaseModel):
    """What an action did.

    Attributes:
        ok: Always ``True`` (failures are HTTP errors).
        job: The job after the action (retry, requeue, delete), or ``None``.
        job_id: The new job's id (trigger), or the job acted on.
        message: A sentence for people.
    """

    ok: bool = True
    job: JobRow | None = None
    job_id: str | None = None
    message: str
