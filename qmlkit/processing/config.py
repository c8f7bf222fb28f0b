"""``ServerConfig``: how a server runs (qml-rs ``ServerConfig``, with qmlkit's additions).

Also importable as ``qmlkit.processing.server.ServerConfig`` and ``qmlkit.ServerConfig``.
"""

from __future__ import annotations

import socket
from datetime import timedelta
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator

from qmlkit.config import mask_url
from qmlkit.job import DEFAULT_MAX_PAYLOAD_BYTES
from qmlkit.processing.retry import RetryPolicy

__all__ = ["ServerConfig"]


class ServerConfig(BaseModel):
    """How a server runs. Defaults are qml-rs's ``ServerConfig`` defaults except where noted.

    Attributes:
        storage_url: Storage URL, resolved through the ``qmlkit_storage`` hook.
        storage_options: Backend options passed to that hook.
        wakeup_url: Where wake-up messages come from (`qmlkit.wakeup`): ``"auto"`` (the
            default, qmlkit's addition) for the storage's own channel if it offers one
            (SQLite: a ``filesystem://`` folder beside the file; qmlkit-redis: its Redis;
            qmlkit-postgres: ``LISTEN/NOTIFY``), a kombu URL, or ``None`` to poll only.
            With wake-ups, ``polling_interval`` can be long without delaying jobs. A
            `Server` keeps the resolved URL in its ``config``.
        wakeup_exchange: The fanout exchange's name; apps sharing a broker use their own.
            With ``"auto"`` the storage's scope is appended (``qmlkit.wakeup.<prefix>``).
        server_name: Name of this server; default the host name (qml-rs: "qml-server").
        pool: The execution pool (`qmlkit.processing.pools`): ``"threads"`` (worker
            threads, the default: every ``def`` job works as written, nothing to learn),
            ``"asyncio"`` (one event loop running up to ``worker_count`` attempts at once,
            for ``async def`` I/O fan-out; ``def`` jobs in a bounded executor beside it),
            or ``"processes"`` (a supervisor and ``processes`` child processes, each a
            server of its own running ``child_pool`` with ``worker_count`` slots:
            Dramatiq's processes x threads; started by ``qmlkit worker --pool processes``
            or ``App.server(pool="processes")``; a `Server` refuses it). See docs/pools.md.
        worker_count: The concurrency (``qmlkit worker -c``): worker threads in the thread
            pool, the most attempts running at once in the asyncio pool; per child
            process in the process pool.
        polling_interval: How long an idle worker waits before polling again.
        job_timeout: Default per-attempt limit (a job's ``timeout_s`` overrides it);
            ``None`` for none.
        queues: Queues served; empty means all.
        fetch_batch_size: Most jobs one worker claims at a time (qml-rs: 10; qmlkit 50,
            bounded further by ``prefetch_window``).
        prefetch_window: Most estimated work a worker claims ahead, as time (qmlkit's
            addition: keeps batches from reordering slow jobs). ``0`` claims one at a time.
        enable_scheduler: Promote due Scheduled and AwaitingRetry jobs.
        scheduler_poll_interval: Longest wait between promotions (qml-rs: 30 s; qmlkit
            1 s, and it wakes earlier for a known due time).
        shutdown_timeout: Grace period for running attempts on ``stop()``.
        stale_processing_after: On start, and every ``stale_sweep_interval`` for a server
            without heartbeats, Processing jobs claimed longer ago than this that no live
            registered server holds are requeued as stranded.
        stale_sweep_interval: Between stranded sweeps of a server without heartbeats.
        connect_timeout: On start, how long to keep retrying (capped backoff, each
            attempt logged) while the storage is unreachable; ``timedelta(0)`` fails at
            once. Configuration errors always fail at once.
        enable_recurring: Materialise due ticks of recurring templates.
        recurring_poll_interval: Longest wait between looks at the templates (qml-rs:
            5 s); the poller also wakes for the earliest known ``next_run_at``.
        enable_cleanup: Delete jobs whose ``expires_at`` has passed.
        cleanup_interval: Between cleanup sweeps.
        succeeded_ttl: ``expires_at`` offset for Succeeded jobs; ``None`` keeps them.
        failed_ttl: ``expires_at`` offset for Failed jobs; ``None`` keeps them.
        enable_heartbeat: Register in the server registry, heartbeat, reclaim dead peers
            (qmlkit: on by default, so a killed worker's jobs return without a restart).
        heartbeat_interval: Between heartbeats (and dead-peer scans); qmlkit 5 s.
        dead_server_timeout: A peer whose heartbeat is older is dead; qmlkit 30 s (six
            missed heartbeats), so a killed worker's jobs are back within about 35 s.
        retry: The retry policy for job names registered without their own: backoff,
            jitter and which exceptions retry. How many retries a job gets is fixed when it
            is enqueued (``Job.max_retries``, from its registration, default 3).
        max_result_bytes: Largest stored job result, in bytes of UTF-8 JSON.
        log_attempts: Let the built-in ``qmlkit.logging`` plugin add its
            ``LoggingMiddleware``.
        processes: Child processes of the ``"processes"`` pool; ``None``: the number of
            cores (``os.cpu_count()``).
        child_pool: The pool each child process runs, ``"threads"`` or ``"asyncio"``.
        max_jobs_per_child: Recycle a child after about this many attempts (it stops
            claiming, finishes what runs, exits, and is replaced; Celery's
            ``--max-tasks-per-child``); ``None``: never.
        max_memory_per_child: Recycle a child whose resident memory passes this many
            MiB after an attempt (Celery's ``--max-memory-per-child``); ``None``: never.
        start_method: How children start: ``"forkserver"`` (Linux default: forks from a
            clean server process that opened nothing) or ``"spawn"`` (a fresh
            interpreter; the default elsewhere). Plain ``fork`` is refused: the parent's
            threads and connections would be copied mid-use.
        app_spec: ``module:attribute`` of the app the children import; ``None``: found
            by looking the app up in ``sys.modules`` (the CLI passes its ``APP``).
    """

    model_config = ConfigDict(frozen=True, extra="forbid")

    storage_url: str = "sqlite:///qmlkit.db"
    storage_options: dict[str, Any] = Field(default_factory=dict)
    wakeup_url: str | None = "auto"
    wakeup_exchange: str = Field(default="qmlkit.wakeup", min_length=1)
    server_name: str = Field(default_factory=socket.gethostname, min_length=1)
    pool: Literal["threads", "asyncio", "processes"] = "threads"
    worker_count: int = Field(default=5, ge=1, le=10_000)
    polling_interval: timedelta = timedelta(seconds=1)
    job_timeout: timedelta | None = timedelta(minutes=5)
    queues: tuple[str, ...] = ("default",)
    fetch_batch_size: int = Field(default=50, ge=1, le=1000)
    prefetch_window: timedelta = timedelta(milliseconds=50)
    enable_scheduler: bool = True
    scheduler_poll_interval: timedelta = timedelta(seconds=1)
    shutdown_timeout: timedelta = timedelta(seconds=30)
    stale_processing_after: timedelta = timedelta(minutes=5)
    stale_sweep_interval: timedelta = timedelta(minutes=1)
    connect_timeout: timedelta = timedelta(seconds=60)
    enable_recurring: bool = True
    recurring_poll_interval: timedelta = timedelta(seconds=5)
    enable_cleanup: bool = True
    cleanup_interval: timedelta = timedelta(minutes=1)
    succeeded_ttl: timedelta | None = timedelta(hours=24)
    failed_ttl: timedelta | None = timedelta(days=7)
    enable_heartbeat: bool = True
    heartbeat_interval: timedelta = timedelta(seconds=5)
    dead_server_timeout: timedelta = timedelta(seconds=30)
    retry: RetryPolicy = Field(default_factory=RetryPolicy)
    max_result_bytes: int = Field(default=DEFAULT_MAX_PAYLOAD_BYTES, ge=1)
    log_attempts: bool = True
    processes: int | None = Field(default=None, ge=1, le=256)
    child_pool: Literal["threads", "asyncio"] = "threads"
    max_jobs_per_child: int | None = Field(default=None, ge=1)
    max_memory_per_child: int | None = Field(default=None, ge=1)
    start_method: Literal["forkserver", "spawn"] | None = None
    app_spec: str | None = Field(default=None, pattern=r"^[\w.]+:[\w.]+$")

    @field_validator(
        "polling_interval", "shutdown_timeout", "scheduler_poll_interval", "cleanup_interval",
        "heartbeat_interval", "dead_server_timeout", "stale_processing_after",
        "recurring_poll_interval", "stale_sweep_interval",
    )
    @classmethod
    def _positive(cls, value: timedelta) -> timedelta:
        if value <= timedelta(0):
            raise ValueError("must be a positive duration")
        return value

    @field_validator("connect_timeout")
    @classmethod
    def _not_negative(cls, value: timedelta) -> timedelta:
        if value < timedelta(0):
            raise ValueError("must be zero (fail at once) or a positive duration")
        return value

    def __repr__(self) -> str:
        """Show every field, with secrets in URLs masked."""
        fields = {**self.__dict__, "storage_url": mask_url(self.storage_url),
                  "wakeup_url": mask_url(self.wakeup_url) if self.wakeup_url else None}
        return f"ServerConfig({', '.join(f'{k}={v!r}' for k, v in fields.items())})"
