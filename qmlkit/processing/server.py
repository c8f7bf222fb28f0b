"""``Server`` and ``ServerConfig``: worker threads and background duties (qml-rs ``BackgroundJobServer``).

``start()`` requeues jobs a crashed predecessor left in Processing, registers the server
(``name#uuid``) when heartbeats are on, then starts the scheduler, the cleanup duty, the
heartbeat duty and ``worker_count`` worker threads. ``stop()`` stops claiming, releases
claimed-but-unstarted jobs at once, lets running attempts finish within
``shutdown_timeout``, then cancels and releases whatever is still held (so nothing is
left in Processing, field case C10), deregisters and returns.

Each worker thread claims a small batch, runs it, and stores every outcome of the batch
in one transaction. The batch size adapts: it is the number of recent average-length jobs
that fit in ``prefetch_window`` (at least 1, at most ``fetch_batch_size``), so fast jobs
are claimed and acknowledged many at a time while a slow job is never held back behind
another one claimed ahead of it (field case C18).
"""

from __future__ import annotations

import asyncio
import logging
import random
import socket
import threading
import time
import uuid
from collections.abc import Callable, Iterable, Mapping, Sequence
from datetime import datetime, timedelta
from typing import TYPE_CHECKING, Any

import pluggy
from pydantic import BaseModel, ConfigDict, Field, field_validator

from qmlkit.errors import ConfigurationError, DuplicateJob, QmlError, StaleClaim
from qmlkit.job import DEFAULT_MAX_PAYLOAD_BYTES, Enqueued, Job, utcnow
from qmlkit.plugins import call_safely, make_plugin_manager, notify_state_changed, resolve_storage
from qmlkit.processing.context import JobContext
from qmlkit.hookspecs import hookimpl
from qmlkit.processing.middleware import Middleware
from qmlkit.processing.processor import JobProcessor
from qmlkit.processing.retry import RetryPolicy
from qmlkit.storage.base import ServerInfo, StateChange, Storage, Transition
from qmlkit.wakeup import (
    RECURRING,
    SCHEDULED,
    WakeupListener,
    WakeupPublisher,
    connection_for,
)

if TYPE_CHECKING:
    from qmlkit.app import App

log = logging.getLogger(__name__)


class ServerConfig(BaseModel):
    """How a server runs. Defaults are qml-rs's ``ServerConfig`` defaults except where noted.

    Attributes:
        storage_url: Storage URL, resolved through the ``qmlkit_storage`` hook.
        storage_options: Backend options passed to that hook.
        wakeup_url: A kombu URL for wake-up messages (`qmlkit.wakeup`), or ``None`` to
            poll only. With it, ``polling_interval`` can be long without delaying jobs.
        wakeup_exchange: The fanout exchange's name; apps sharing a broker use their own.
        server_name: Name of this server; default the host name (qml-rs: "qml-server").
        worker_count: Worker threads.
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
        stale_processing_after: On start, Processing jobs claimed longer ago than this
            are requeued as stranded.
        enable_recurring: Materialise due ticks of recurring templates.
        recurring_poll_interval: Longest wait between looks at the templates (qml-rs:
            5 s); the poller also wakes for the earliest known ``next_run_at``.
        enable_cleanup: Delete jobs whose ``expires_at`` has passed.
        cleanup_interval: Between cleanup sweeps.
        succeeded_ttl: ``expires_at`` offset for Succeeded jobs; ``None`` keeps them.
        failed_ttl: ``expires_at`` offset for Failed jobs; ``None`` keeps them.
        enable_heartbeat: Register in the server registry, heartbeat, reclaim dead peers.
        heartbeat_interval: Between heartbeats (and dead-peer scans).
        dead_server_timeout: A peer whose heartbeat is older is dead.
        retry: The retry policy for job names registered without their own: backoff,
            jitter and which exceptions retry. How many retries a job gets is fixed when it
            is enqueued (``Job.max_retries``, from its registration, default 3).
        max_result_bytes: Largest stored job result, in bytes of UTF-8 JSON.
        log_attempts: Let the built-in ``qmlkit.logging`` plugin add its
            ``LoggingMiddleware``.
    """

    model_config = ConfigDict(frozen=True, extra="forbid")

    storage_url: str = "sqlite:///qmlkit.db"
    storage_options: dict[str, Any] = Field(default_factory=dict)
    wakeup_url: str | None = None
    wakeup_exchange: str = Field(default="qmlkit.wakeup", min_length=1)
    server_name: str = Field(default_factory=socket.gethostname, min_length=1)
    worker_count: int = Field(default=5, ge=1, le=1024)
    polling_interval: timedelta = timedelta(seconds=1)
    job_timeout: timedelta | None = timedelta(minutes=5)
    queues: tuple[str, ...] = ("default",)
    fetch_batch_size: int = Field(default=50, ge=1, le=1000)
    prefetch_window: timedelta = timedelta(milliseconds=50)
    enable_scheduler: bool = True
    scheduler_poll_interval: timedelta = timedelta(seconds=1)
    shutdown_timeout: timedelta = timedelta(seconds=30)
    stale_processing_after: timedelta = timedelta(minutes=5)
    enable_recurring: bool = True
    recurring_poll_interval: timedelta = timedelta(seconds=5)
    enable_cleanup: bool = True
    cleanup_interval: timedelta = timedelta(minutes=1)
    succeeded_ttl: timedelta | None = timedelta(hours=24)
    failed_ttl: timedelta | None = timedelta(days=7)
    enable_heartbeat: bool = False
    heartbeat_interval: timedelta = timedelta(seconds=10)
    dead_server_timeout: timedelta = timedelta(seconds=60)
    retry: RetryPolicy = Field(default_factory=RetryPolicy)
    max_result_bytes: int = Field(default=DEFAULT_MAX_PAYLOAD_BYTES, ge=1)
    log_attempts: bool = True

    @field_validator(
        "polling_interval", "shutdown_timeout", "scheduler_poll_interval", "cleanup_interval",
        "heartbeat_interval", "dead_server_timeout", "stale_processing_after",
        "recurring_poll_interval",
    )
    @classmethod
    def _positive(cls, value: timedelta) -> timedelta:
        if value <= timedelta(0):
            raise ValueError("must be a positive duration")
        return value

    def __repr__(self) -> str:
        """Show every field, with secrets in URLs masked."""
        from qmlkit.config import mask_url

        fields = {**self.__dict__, "storage_url": mask_url(self.storage_url),
                  "wakeup_url": mask_url(self.wakeup_url) if self.wakeup_url else None}
        return f"ServerConfig({', '.join(f'{k}={v!r}' for k, v in fields.items())})"


class _CallableObserver:
    """Adapts a plain callable to the ``qmlkit_job_state_changed`` hook."""

    def __init__(self, fn: Callable[[Job, Any, Any], None]) -> None:
        self.fn = fn

    @hookimpl
    def qmlkit_job_state_changed(self, job: Job, previous: Any, current: Any) -> None:
        self.fn(job, previous, current)


def _claim_key(job: Job) -> tuple[str, int]:
    """A claim's identity in a server: the job id and its fencing token."""
    return job.id, job.attempts


class _Watchdog:
    """One thread that sets ``context.cancelled`` on running attempts past their deadline.

    Workers register an attempt with `watch` and remove it with `done`, both
    O(1); the thread sleeps until the earliest deadline among the (at most
    ``worker_count``) running attempts, and is woken only when a new deadline is earlier.
    """

    def __init__(self) -> None:
        self._running: dict[int, tuple[float, JobContext]] = {}
        self._cond = threading.Condition()
        self._next_wake = float("inf")
        self._closed = False
        self._thread = threading.Thread(target=self._run, name="qmlkit-watchdog", daemon=True)
        self._thread.start()

    def watch(self, context: JobContext, timeout_s: float) -> None:
        deadline = time.monotonic() + timeout_s
        # Single dict operations are atomic under the GIL; the lock is needed only to
        # wake the thread for a deadline earlier than the one it sleeps towards.
        self._running[id(context)] = (deadline, context)
        if deadline < self._next_wake:
            with self._cond:
                self._cond.notify()

    def done(self, context: JobContext) -> None:
        self._running.pop(id(context), None)

    def _run(self) -> None:
        with self._cond:
            while not self._closed:
                now = time.monotonic()
                for key, (deadline, ctx) in list(self._running.items()):
                    if deadline <= now:
                        del self._running[key]
                        ctx.timed_out = True
                        ctx.cancelled.set()
                self._next_wake = min((d for d, _ in self._running.values()), default=float("inf"))
                wait = None if self._next_wake == float("inf") else max(self._next_wake - now, 0.001)
                self._cond.wait(wait)

    def close(self) -> None:
        with self._cond:
            self._closed = True
            self._cond.notify()


class Server:
    """A job server: worker threads plus scheduler, cleanup and heartbeat duties.

    Build it with `from_plugins` (or ``App.server()``), which resolves the storage
    and middleware through the plugin manager.

    Args:
        app: The application whose registered jobs this server runs.
        storage: An opened or unopened storage (opened on ``start()``).
        config: The configuration.
        plugin_manager: The manager whose observers and lifecycle hooks are called.
        middleware: The middleware chain, outermost first.
    """

    def __init__(
        self,
        app: App,
        storage: Storage,
        config: ServerConfig,
        *,
        plugin_manager: pluggy.PluginManager,
        middleware: Sequence[Middleware] = (),
    ) -> None:
        self.app = app
        self.storage = storage
        self.config = config
        self.pm = plugin_manager
        self.middleware = tuple(middleware)
        self.server_id: str | None = None
        self._threads: list[threading.Thread] = []
        self._running = False
        self._lock = threading.Lock()
        self._stopping = threading.Event()
        self._hard_stop = threading.Event()
        self._abort_lock = threading.Lock()
        self._abort_done = False
        self._wake = threading.Condition()
        self._wake_seq = 0
        self._idle_poller = False
        self.idle_workers = 0  #: worker threads in their idle wait now (tests, metrics)
        self._scheduler_nudge = threading.Event()
        self._recurring_nudge = threading.Event()
        # Jobs this server has claimed and not yet stored an outcome for ("held"), the
        # ones running now, and held ones released by stop()/abort() before they started.
        # Held, released and owned claims are keyed by (job id, fencing token): a job
        # released to its queue may be claimed again by another worker of this server.
        self._held: dict[tuple[str, int], Job] = {}
        self._contexts: dict[str, tuple[Job, JobContext]] = {}
        self._released: set[tuple[str, int]] = set()
        self._owner: dict[tuple[str, int], str] = {}  # held claim -> the worker holding it
        self._running_since: dict[str, float] = {}  # worker id -> its current job's start
        self._outcomes: dict[str, list[Transition]] = {}  # worker id -> outcomes not stored
        self._contexts_lock = threading.Lock()
        self._watchdog: _Watchdog | None = None
        self._observed = bool(self.pm.hook.qmlkit_job_state_changed.get_hookimpls())
        self._publisher: WakeupPublisher | None = None
        self._listener: WakeupListener | None = None
        if config.wakeup_url:
            connection_for(config.wakeup_url)  # a bad URL fails now, naming it
        self.processor = JobProcessor(
            lookup=app.registry.get,
            registered=lambda: list(app.registry),
            retry_policy=config.retry,
            middleware=self.middleware,
            job_timeout=config.job_timeout,
            succeeded_ttl=config.succeeded_ttl,
            failed_ttl=config.failed_ttl,
            max_result_bytes=config.max_result_bytes,
        )

    @classmethod
    def from_plugins(
        cls,
        *,
        app: App,
        storage: str | Storage | None = None,
        config: ServerConfig | Mapping[str, Any] | None = None,
        plugins: Iterable[object] = (),
        middleware: Sequence[Middleware] = (),
        observers: Sequence[Callable[[Job, Any, Any], None]] = (),
        plugin_manager: pluggy.PluginManager | None = None,
        autoload: bool = True,
    ) -> Server:
        """Build a ready server: plugins loaded, storage resolved, middleware composed.

        Middleware order, outermost first: the ``qmlkit_middleware`` results in pluggy's
        call order (``tryfirst`` implementations first, the built-in logging middleware
        among them; then the others, the most recently registered first; ``trylast``
        ones last), then ``middleware`` as given.

        Args:
            app: The application with the registered jobs.
            storage: A storage URL (overrides ``config.storage_url``) or a storage object.
            config: A ``ServerConfig`` or a mapping of its fields.
            plugins: Extra plugin objects to register.
            middleware: Middleware added after the plugins' (innermost last).
            observers: Callables ``(job, previous, current)`` called like
                ``qmlkit_job_state_changed`` observers (registered as plugins).
            plugin_manager: Use this manager instead of building one.
            autoload: Load entry-point plugins when building a manager.

        Returns:
            An unstarted server.

        Raises:
            ConfigurationError: A bad config field (named), URL or storage option.
            UnknownStorageScheme: No plugin understands the storage URL.
        """
        if config is None:
            config = ServerConfig()
        elif not isinstance(config, ServerConfig):
            try:
                config = ServerConfig(**config)
            except ValueError as exc:
                raise ConfigurationError(f"invalid server configuration: {exc}") from exc
        if isinstance(storage, str):
            config = config.model_copy(update={"storage_url": storage})
        pm = plugin_manager or make_plugin_manager(autoload=autoload, extra=plugins)
        if storage is None or isinstance(storage, str):
            store: Storage = resolve_storage(pm, config.storage_url, config.storage_options)
        else:
            store = storage
        chain: list[Middleware] = []
        for provided in pm.hook.qmlkit_middleware(config=config.model_dump()):
            chain.extend(provided or ())
        chain.extend(middleware)
        for observer in observers:
            pm.register(_CallableObserver(observer))
        return cls(app, store, config, plugin_manager=pm, middleware=chain)

    # --- lifecycle --------------------------------------------------------------------

    @property
    def aborted(self) -> bool:
        """Whether the last stop had to release unfinished jobs (``abort()`` ran)."""
        return self._hard_stop.is_set()

    @property
    def is_running(self) -> bool:
        """Whether ``start()`` has run and ``stop()`` has not."""
        return self._running

    def start(self) -> None:
        """Start the duties and the worker threads (qml-rs ``start``).

        Raises:
            ConfigurationError: The server is already running.
            StorageError: The storage cannot be opened, or registering the server failed.
        """
        with self._lock:
            if self._running:
                raise ConfigurationError("server is already running")
            cfg = self.config
            self.storage.open()
            now = utcnow()
            try:
                # Registered servers' jobs are left to heartbeat reclaim, which knows
                # whether they are alive: a long job of a live server is never taken.
                registered = ([s.id for s in self.storage.list_servers()]
                              if cfg.enable_heartbeat else [])
                stranded = self.storage.requeue_stranded(
                    started_before=now - cfg.stale_processing_after, now=now,
                    exclude_servers=registered,
                )
            except QmlError as exc:
                log.warning("could not requeue stranded jobs on start: %s", exc)
                stranded = []
            if stranded:
                log.info("requeued %d stranded Processing job(s) on start", len(stranded))
                self._notify(stranded)
            if not cfg.enable_heartbeat:
                self._warn_recent_processing()
            self._stopping = threading.Event()
            self._hard_stop = threading.Event()
            self._abort_done = False
            stamped = cfg.server_name
            if cfg.enable_heartbeat:
                self.server_id = f"{cfg.server_name}#{uuid.uuid4()}"
                self.storage.register_server(self._server_info())
                stamped = self.server_id
            self._watchdog = _Watchdog()
            self._threads = []
            if cfg.wakeup_url:
                self._publisher = WakeupPublisher(cfg.wakeup_url, cfg.wakeup_exchange)
                self._listener = WakeupListener(cfg.wakeup_url, self.wake, cfg.wakeup_exchange,
                                                name=self.server_id or cfg.server_name)
                self._listener.start()
            if cfg.fetch_batch_size > 1 and cfg.worker_count > 0:
                self._spawn("stragglers", self._straggler_loop)
            if cfg.enable_scheduler:
                self._spawn("scheduler", self._scheduler_loop)
            if cfg.enable_recurring:
                self._spawn("recurring", self._recurring_loop)
            if cfg.enable_cleanup:
                self._spawn("cleanup", self._periodic(cfg.cleanup_interval, self._cleanup_once))
            if cfg.enable_heartbeat:
                self._spawn("heartbeat", self._periodic(cfg.heartbeat_interval, self._heartbeat_once))
            # Logged before the workers start, so no job's log line comes first.
            log.info("server %s started with %d worker(s) on %r, queues %s",
                     self.server_id or cfg.server_name, cfg.worker_count, self.storage,
                     list(cfg.queues) or "all")
            for i in range(cfg.worker_count):
                worker_id = f"{cfg.server_name}:worker:{i}"
                self._spawn(f"worker-{i}", lambda w=worker_id: self._worker_loop(w, stamped))
            self._running = True
            self.app._attach(self)
        call_safely(self.pm, "qmlkit_server_started", server=self)

    def stop(self, timeout: timedelta | float | None = None) -> None:
        """Stop gracefully: claim nothing more, let running attempts finish, then return.

        Claimed-but-unstarted jobs are released to Enqueued at once. Attempts still
        running when the grace period ends are cancelled through their context and
        released to Enqueued (their later outcome is rejected by fencing); the release
        uses no retry. Idempotent.

        Args:
            timeout: Grace period; ``config.shutdown_timeout`` when ``None``. Seconds if
                a number.
        """
        with self._lock:
            if not self._running:
                return
            self._running = False
        call_safely(self.pm, "qmlkit_server_stopping", server=self)
        grace = timeout if timeout is not None else self.config.shutdown_timeout
        grace_s = grace.total_seconds() if isinstance(grace, timedelta) else float(grace)
        log.info("stopping: no new claims; waiting up to %.1f s for running jobs", grace_s)
        self._stopping.set()  # also each running attempt's context.stopping
        self._wake_all()
        self._scheduler_nudge.set()
        self._recurring_nudge.set()
        self._release_unstarted()
        deadline = time.monotonic() + grace_s
        while any(t.is_alive() for t in self._threads) and not self._hard_stop.is_set():
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                break
            for thread in self._threads:
                thread.join(min(0.1, remaining))
                if self._hard_stop.is_set():
                    break
        if any(t.is_alive() for t in self._threads):
            self.abort()
        self._finish()

    def abort(self) -> None:
        """Stop at once: cancel running attempts and release every held job to Enqueued.

        Called by ``stop()`` when the grace period runs out, and by the CLI on a second
        signal. Claimed jobs not yet started and attempts still running all go back to
        their queues without using a retry. The threads running those attempts are left
        to end on their own; any outcome they store later is rejected as stale.
        Idempotent.
        """
        self._stopping.set()
        self._hard_stop.set()  # stop() stops waiting for threads at once
        with self._abort_lock:  # a second caller waits until the first has released
            if self._abort_done:
                return
            self._abort_done = True
            self._abort()

    def _abort(self) -> None:
        self._wake_all()
        with self._contexts_lock:
            running = [job for job, _ in self._contexts.values()
                       if _claim_key(job) not in self._released]
            for _, ctx in self._contexts.values():
                ctx.cancelled.set()
            self._released.update(_claim_key(job) for job in running)
        released = self._release(running, "released: server stopped before it finished")
        released += self._release_unstarted()
        if released:
            log.warning("released %d unfinished job(s) back to their queues", released)
        deadline = time.monotonic() + 0.5  # let threads that can end quickly do so
        for thread in self._threads:
            thread.join(max(0.0, deadline - time.monotonic()))

    def _release_unstarted(self) -> int:
        """Release held jobs that no worker has started; return how many."""
        with self._contexts_lock:
            idle = [
                job for key, job in self._held.items()
                if key[0] not in self._contexts and key not in self._released
            ]
            self._released.update(_claim_key(job) for job in idle)
        return self._release(idle, "released unstarted: server stopping")

    def _release(self, jobs: list[Job], reason: str) -> int:
        if not jobs:
            return 0
        now = utcnow()
        self._store([Transition(j, Enqueued(enqueued_at=now, queue=j.queue, reason=reason))
                     for j in jobs])
        return len(jobs)

    def _finish(self) -> None:
        if self._watchdog is not None:
            self._watchdog.close()
        if self._listener is not None:
            self._listener.stop()
            self._listener = None
        if self._publisher is not None:
            self._publisher.close()
            self._publisher = None
        if self.server_id is not None:
            try:
                self.storage.deregister_server(self.server_id)
            except QmlError as exc:
                log.warning("could not deregister %s: %s", self.server_id, exc)
            self.server_id = None
        self.app._detach(self)
        log.info("server stopped")

    def _warn_recent_processing(self) -> None:
        """Say so when jobs sit in Processing that only heartbeats could reclaim now."""
        try:
            held = sum(n for (_, state), n in self.storage.count_jobs().items()
                       if state == "Processing")
        except Exception:  # a warning is not worth failing start over
            return
        if held:
            log.warning(
                "%d job(s) are Processing, claimed less than %s ago; if their worker died, "
                "they are requeued by a server started after that, or at once by heartbeat "
                "reclaim (enable_heartbeat / qmlkit worker --heartbeat)",
                held, self.config.stale_processing_after)

    def wake(self, queue: str | None = None) -> None:
        """Wake an idle worker for ``queue`` now (``None``: every idle worker).

        One worker, not all: if its claim comes back full it wakes the next
        (`_wake_workers`). A queue this server does not serve wakes nobody.

        The reserved names `qmlkit.wakeup.SCHEDULED` and `qmlkit.wakeup.RECURRING`
        nudge the scheduler and the recurring poller instead.
        """
        if queue is None:
            self._scheduler_nudge.set()
            self._recurring_nudge.set()
            self._wake_all()
            return
        if queue == SCHEDULED:
            self._scheduler_nudge.set()
            return
        if queue == RECURRING:
            self._recurring_nudge.set()
            return
        if self.config.queues and queue not in self.config.queues:
            return
        self._wake_workers(1)

    @property
    def _wakeups_live(self) -> bool:
        """Whether wake-ups are arriving now (so the duties may poll less)."""
        return self._listener is not None and self._listener.connected.is_set()

    def _cap(self, interval: timedelta) -> float:
        """A duty's longest sleep: its interval, or the polling interval if longer while
        wake-ups arrive (schedules and template changes are announced over them)."""
        seconds = interval.total_seconds()
        if self._wakeups_live:
            seconds = max(seconds, self.config.polling_interval.total_seconds())
        return seconds

    def nudge_scheduler(self) -> None:
        """Make the scheduler look for due jobs now (after a schedule in this process)."""
        self._scheduler_nudge.set()

    def _wake_all(self) -> None:
        with self._wake:
            self._wake_seq += 1
            self._wake.notify_all()

    def _wake_workers(self, n: int) -> None:
        """Wake ``n`` idle workers, not all of them: a wake-up names a queue, not a job
        count, and waking every idle thread for one job costs each of them a claim
        (about half a millisecond of start latency with 8 workers on Redis). A worker
        whose claim came back full wakes the next one, so a burst still fans out over
        every worker. Workers between a claim and their wait see the sequence number
        move and claim again instead of sleeping."""
        with self._wake:
            self._wake_seq += 1
            self._wake.notify(n)

    def _spawn(self, name: str, target: Callable[[], None]) -> None:
        thread = threading.Thread(target=target, name=f"qmlkit-{name}", daemon=True)
        thread.start()
        self._threads.append(thread)

    def _server_info(self) -> ServerInfo:
        now = utcnow()
        assert self.server_id is not None
        return ServerInfo(id=self.server_id, name=self.config.server_name,
                          worker_count=self.config.worker_count, queues=list(self.config.queues),
                          started_at=now, last_heartbeat=now)

    def _runnable(self, changes: Sequence[StateChange]) -> None:
        """After a commit that made jobs Enqueued: wake local workers and, over the
        broker, every other server serving their queues."""
        runnable = [c.job.queue for c in changes if c.job.state.name == "Enqueued"]
        if not runnable:
            return
        queues = set(runnable)
        self._wake_workers(len(runnable))
        if self._publisher is not None:
            self._publisher.publish(queues)

    def _notify(self, changes: Sequence[StateChange]) -> None:
        if self._observed and changes:
            notify_state_changed(self.pm, changes)

    # --- workers ------------------------------------------------------------------------

    def _worker_loop(self, worker_id: str, server_name: str) -> None:
        cfg = self.config
        queues = list(cfg.queues)
        window = cfg.prefetch_window.total_seconds()
        avg = 0.0  # moving average of attempt length, seconds (0 = unknown yet: claim 1)
        backoff = 0.0
        loop = asyncio.new_event_loop()
        try:
            while not self._stopping.is_set():
                if avg > 0 and window > 0:
                    limit = max(1, min(cfg.fetch_batch_size, int(window / avg)))
                else:
                    limit = 1
                with self._wake:
                    seen = self._wake_seq
                try:
                    if self._observed:
                        changes = self.storage.claim_changes(
                            worker_id=worker_id, server_name=server_name, queues=queues,
                            limit=limit, now=utcnow())
                        self._notify(changes)
                        jobs = [change.job for change in changes]
                    else:
                        jobs = self.storage.claim(worker_id=worker_id, server_name=server_name,
                                                  queues=queues, limit=limit, now=utcnow())
                    backoff = 0.0
                except Exception as exc:  # the loop must outlive any storage failure
                    backoff = min(max(backoff * 2, 0.1), 5.0)
                    log.warning("claim failed (%s: %s); retrying in %.1f s",
                                type(exc).__name__, exc, backoff)
                    self._stopping.wait(backoff * (0.5 + random.random()))  # noqa: S311
                    continue
                if not jobs:
                    self._idle_wait(seen)
                    continue
                if len(jobs) >= limit:  # there may be more: pass the wake-up on
                    self._wake_workers(1)
                else:
                    self._keep_a_poller()
                started = time.perf_counter()
                self._run_batch(jobs, worker_id, server_name, loop)
                per_job = (time.perf_counter() - started) / len(jobs)
                avg = per_job if avg == 0 else 0.8 * avg + 0.2 * per_job
        finally:
            loop.close()

    def _keep_a_poller(self) -> None:
        """If idle workers wait and none of them polls (the poller just left with a job),
        wake one so it takes the poller's place: without it, a job that came with no
        wake-up (a lost message, a client without ``wakeup_url``) would wait for the
        others' long safety timeout instead of ``polling_interval``."""
        with self._wake:
            if not self._idle_poller and self.idle_workers > 0:
                self._wake.notify(1)

    def _idle_wait(self, seen: int) -> None:
        """Wait for a wake-up or the next poll.

        While wake-ups arrive, one idle worker at a time polls and the others wait for
        a wake (with a long safety timeout), so an idle server costs the storage one
        query per polling interval instead of one per worker; a poller that leaves with
        a job hands its place to another idle worker (`_keep_a_poller`). Without
        wake-ups (or once the broker is lost: the listener then wakes everyone) every
        idle worker polls on its own.
        """
        interval = self.config.polling_interval.total_seconds()
        with self._wake:
            if self._wake_seq != seen or self._stopping.is_set():
                return
            self.idle_workers += 1
            try:
                if self._wakeups_live and self._idle_poller:
                    self._wake.wait(interval * 10)  # someone polls already
                    return
                self._idle_poller = True
                try:
                    self._wake.wait(interval)
                finally:
                    self._idle_poller = False
            finally:
                self.idle_workers -= 1

    def _run_batch(
        self, jobs: list[Job], worker_id: str, server_name: str, loop: asyncio.AbstractEventLoop
    ) -> None:
        with self._contexts_lock:
            for job in jobs:
                self._held[_claim_key(job)] = job
                self._owner[_claim_key(job)] = worker_id
        # Outcomes wait here to be stored as one batch; the straggler duty stores them
        # early when a slow job holds up the rest, so they never wait on it.
        outcomes: list[Transition] = []
        with self._contexts_lock:
            self._outcomes[worker_id] = outcomes
        window = self.config.prefetch_window.total_seconds()
        flushed = time.perf_counter()
        try:
            for job in jobs:
                # Outcomes go to storage at least every prefetch window, not only at the
                # end of the batch: finished jobs show as finished, and a crash re-runs
                # no more than the last window's work.
                if outcomes and time.perf_counter() - flushed >= window:
                    self._store(self._take_outcomes(worker_id))
                    flushed = time.perf_counter()
                with self._contexts_lock:
                    key = _claim_key(job)
                    if key in self._released:  # stop(), abort() or the straggler duty
                        self._released.discard(key)  # gave it back already
                        self._held.pop(key, None)
                        self._owner.pop(key, None)
                        continue
                    if self._stopping.is_set():
                        self._released.add(key)
                        release = True
                    else:
                        release = False
                        ctx = JobContext(job=job, worker_id=worker_id, server_name=server_name,
                                         stopping=self._stopping,
                                         progress_sink=self.storage.report_progress)
                        self._contexts[job.id] = (job, ctx)
                        self._running_since[worker_id] = time.monotonic()
                if release:
                    self._release([job], "released unstarted: server stopping")
                    continue
                outcome = self._run_one(job, ctx, loop)
                with self._contexts_lock:
                    outcomes.append(outcome)
        finally:
            self._store(self._take_outcomes(worker_id))
            with self._contexts_lock:
                self._outcomes.pop(worker_id, None)
                self._running_since.pop(worker_id, None)
                for job in jobs:
                    key = _claim_key(job)
                    self._held.pop(key, None)
                    self._owner.pop(key, None)
                    self._released.discard(key)

    def _take_outcomes(self, worker_id: str) -> list[Transition]:
        """Take the outcomes a worker has gathered so far, leaving its list empty."""
        with self._contexts_lock:
            box = self._outcomes.get(worker_id)
            if not box:
                return []
            taken = box[:]
            box.clear()
            return taken

    def _straggler_loop(self) -> None:
        """Unblock a batch stuck behind a slow job.

        A worker claims as many jobs as fit its estimate of ``prefetch_window``; when
        one of them runs far longer than that estimate (over four windows, and 0.2 s at
        least), the outcomes of the jobs it finished before are stored now, and the jobs
        claimed after it are released to their queues (fenced, as on stop) and the
        server's idle workers woken to take them, instead of waiting behind it.
        """
        window = self.config.prefetch_window.total_seconds()
        threshold = max(4 * window, 0.2)
        period = max(window, 0.02)
        while not self._stopping.wait(period):
            now = time.monotonic()
            with self._contexts_lock:
                stuck = {w for w, since in self._running_since.items() if now - since > threshold}
                if not stuck:
                    continue
            for worker_id in stuck:  # the finished jobs ahead of the slow one
                try:
                    self._store(self._take_outcomes(worker_id))
                except Exception as exc:  # a duty must outlive any failure
                    log.warning("storing outcomes ahead of a slow job failed: %s", exc)
            with self._contexts_lock:
                waiting = [job for key, job in self._held.items()
                           if self._owner.get(key) in stuck and key[0] not in self._contexts
                           and key not in self._released]
                self._released.update(_claim_key(job) for job in waiting)
            if waiting:
                try:
                    self._release(waiting, "released unstarted: behind a slow job")
                except Exception as exc:  # a duty must outlive any failure
                    log.warning("releasing jobs behind a slow one failed: %s", exc)
                    continue
                log.info("released %d job(s) waiting behind a slow job", len(waiting))
                for queue in {job.queue for job in waiting}:
                    self.wake(queue)

    def _run_one(self, job: Job, ctx: JobContext, loop: asyncio.AbstractEventLoop) -> Transition:
        timeout = self.processor.timeout_for(job)
        if timeout is not None and self._watchdog is not None:
            self._watchdog.watch(ctx, timeout)
        try:
            return self.processor.run(job, ctx, loop)
        finally:
            if timeout is not None and self._watchdog is not None:
                self._watchdog.done(ctx)
            with self._contexts_lock:  # finished: its outcome is stored with the batch
                self._contexts.pop(job.id, None)
                self._held.pop(_claim_key(job), None)
                self._owner.pop(_claim_key(job), None)

    def _store(self, outcomes: list[Transition]) -> None:
        """Store a batch of outcomes in one transaction, retrying while storage is down."""
        if not outcomes:
            return
        delay = 0.05
        while True:
            try:
                results = self.storage.transition_many(outcomes)
                break
            except Exception as exc:  # never drop outcomes: retry until storage is back
                if self._hard_stop.is_set():
                    log.error("could not store %d outcome(s) during abort: %s", len(outcomes), exc)
                    return
                log.warning("storing %d outcome(s) failed (%s: %s); retrying in %.2f s",
                            len(outcomes), type(exc).__name__, exc, delay)
                time.sleep(delay)
                delay = min(delay * 2, 5.0)
        changes = []
        for item, result in zip(outcomes, results, strict=True):
            if isinstance(result, StaleClaim):
                level = logging.INFO if self._hard_stop.is_set() else logging.WARNING
                log.log(level, "outcome of job %s (attempt %d) discarded: %s",
                        item.job.id, item.token, result)
            elif self._observed or result.state.name == "Enqueued":
                changes.append(StateChange(result, item.job.state))
        self._notify(changes)
        if self._publisher is not None:  # released jobs: let other servers take them
            self._runnable(changes)
        if any(item.state.name == "AwaitingRetry" for item in outcomes):
            self._scheduler_nudge.set()  # it may sleep past the retry time otherwise

    # --- background duties ----------------------------------------------------------------

    def _periodic(self, interval: timedelta, once: Callable[[], None]) -> Callable[[], None]:
        def loop() -> None:
            while not self._stopping.wait(interval.total_seconds()):
                try:
                    once()
                except Exception as exc:  # a duty must outlive any failure
                    log.warning("%s failed: %s: %s", once.__name__, type(exc).__name__, exc)
        return loop

    def _scheduler_loop(self) -> None:
        while not self._stopping.is_set():
            poll = wait = self._cap(self.config.scheduler_poll_interval)
            try:
                next_due = self.storage.next_due_at()  # one indexed query while idle
                if next_due is not None and next_due <= utcnow():
                    self.promote_due()
                    next_due = self.storage.next_due_at()
                if next_due is not None:
                    wait = min(poll, max(0.0, (next_due - utcnow()).total_seconds()))
            except Exception as exc:  # the scheduler must outlive any failure
                log.warning("promoting due jobs failed: %s: %s", type(exc).__name__, exc)
            self._scheduler_nudge.wait(wait)
            self._scheduler_nudge.clear()

    def promote_due(self) -> int:
        """Promote every due Scheduled/AwaitingRetry job now; return how many."""
        total = 0
        while True:
            changes = self.storage.promote_due(now=utcnow(), limit=1000)
            total += len(changes)
            self._notify(changes)
            self._runnable(changes)
            if len(changes) < 1000:
                return total

    def nudge_recurring(self) -> None:
        """Make the recurring poller look at the templates now."""
        self._recurring_nudge.set()

    def _recurring_loop(self) -> None:
        while not self._stopping.is_set():
            poll = wait = self._cap(self.config.recurring_poll_interval)
            try:
                upcoming = self.fire_due_recurring()
                if upcoming is not None:
                    wait = min(poll, max(0.0, (upcoming - utcnow()).total_seconds()))
            except Exception as exc:  # the poller must outlive any failure
                log.warning("recurring poll failed: %s: %s", type(exc).__name__, exc)
            self._recurring_nudge.wait(wait)
            self._recurring_nudge.clear()

    def fire_due_recurring(self) -> datetime | None:
        """Materialise every due tick this server wins; return the earliest next tick.

        Each due template is advanced with one compare-and-set (`Storage.fire_recurring`),
        so with several servers polling, each tick becomes exactly one job.
        """
        now = utcnow()
        earliest: datetime | None = None
        for template in self.storage.list_recurring():
            if not template.enabled or template.next_run_at is None:
                continue
            upcoming = template.next_run_at
            if template.next_run_at <= now:
                try:  # one broken template must never hold up the others
                    upcoming = self._fire(template, now)
                except Exception as exc:
                    log.error("recurring job %s: tick %s not fired: %s: %s", template.id,
                              template.next_run_at.isoformat(), type(exc).__name__, exc)
                    continue
            if earliest is None or upcoming < earliest:
                earliest = upcoming
        return earliest

    def _fire(self, template: Any, now: datetime) -> datetime:
        """Materialise one due template's tick (if this server wins it); return its next."""
        tick, following = template.plan(now)
        job = self.app.tick_job(template, tick) if tick is not None else None
        if tick is not None and job is None:
            log.warning("recurring job %s: an enqueue middleware dropped tick %s",
                        template.id, tick.isoformat())
        try:
            won = self.storage.fire_recurring(template.id, expected_next_run_at=template.next_run_at,
                                              next_run_at=following, job=job)
        except DuplicateJob:
            # The tick's job exists already (its schedule was rolled back under us):
            # advance the schedule without storing it twice.
            won = self.storage.fire_recurring(template.id, expected_next_run_at=template.next_run_at,
                                              next_run_at=following, job=None)
            job = None
        if won and job is not None:
            self._notify([StateChange(job, None)])
            self._runnable([StateChange(job, None)])
        elif won and tick is None:
            log.warning("recurring job %s: missed tick %s skipped (misfire=skip)",
                        template.id, template.next_run_at.isoformat())
        return following

    # --- recurring API (on this server's storage) ---------------------------------------

    def schedule_recurring(self, template_id: str, cron: str, method: Any, **options: Any) -> Any:
        """Register a recurring template on this server's storage; see `App.schedule_recurring`."""
        template = self.app.schedule_recurring(template_id, cron, method, storage=self.storage,
                                               **options)
        self.nudge_recurring()
        return template

    def remove_recurring(self, template_id: str) -> bool:
        """Remove a template from this server's storage; see `App.remove_recurring`."""
        return self.app.remove_recurring(template_id, storage=self.storage)

    def list_recurring(self) -> list[Any]:
        """List the templates in this server's storage."""
        return self.app.list_recurring(storage=self.storage)

    def _cleanup_once(self) -> None:
        while self.storage.delete_expired(now=utcnow(), limit=1000) == 1000:
            if self._stopping.is_set():
                return

    def _heartbeat_once(self) -> None:
        if self.server_id is None:
            return
        now = utcnow()
        if not self.storage.heartbeat(self.server_id, now=now):
            log.warning("server %s was presumed dead by a peer; registering again", self.server_id)
            self.storage.register_server(self._server_info())
        changes = self.storage.reclaim_dead_servers(
            heartbeat_before=now - self.config.dead_server_timeout, now=now
        )
        if changes:
            log.warning("reclaimed %d job(s) from dead servers", len(changes))
            self._notify(changes)
            self._runnable(changes)
