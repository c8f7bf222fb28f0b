"""``Server``: an execution pool and background duties (qml-rs ``BackgroundJobServer``).

``start()`` requeues jobs a crashed predecessor left in Processing, registers the server
(``name#uuid``) when heartbeats are on, then starts the duties of
`qmlkit.processing.duties` in order (stragglers, scheduler, recurring, cleanup,
heartbeat) and its pool (`qmlkit.processing.pools`: ``threads`` or ``asyncio``, of
``worker_count`` slots). ``stop()`` stops claiming, releases claimed-but-unstarted jobs
at once, lets running attempts finish within ``shutdown_timeout``, then cancels and
releases whatever is still held (so nothing is left in Processing, field case C10),
deregisters and returns. How each pool claims, runs and stores outcomes is in its module.

The parts live in rooms of their own: `qmlkit.processing.config` (``ServerConfig``,
re-exported here), `claims` (the claim ledger), `idle` (the idle gate), `watchdog`,
`outcome` (exception or result -> Succeeded / AwaitingRetry / Failed, and storing
outcomes), `runtime` (what a duty may ask of this server), `duties` and `pools`.
"""

from __future__ import annotations

import functools
import logging
import threading
import time
import uuid
from collections.abc import Callable, Iterable, Mapping, Sequence
from datetime import datetime, timedelta
from typing import TYPE_CHECKING, Any

import pluggy

import qmlkit.processing.duties as duties
from qmlkit.errors import ConfigurationError, QmlError
from qmlkit.job import Enqueued, Job, utcnow
from qmlkit.plugins import call_safely, notify_state_changed
from qmlkit.processing.assembly import assemble
from qmlkit.processing.claims import ClaimLedger
from qmlkit.processing.config import ServerConfig
from qmlkit.processing.connect import open_storage
from qmlkit.processing.duties.stranded import requeue_stranded_on_start
from qmlkit.processing.idle import IdleGate
from qmlkit.processing.middleware import Middleware
from qmlkit.processing.outcome import store_outcomes
from qmlkit.processing.pools.asyncio import AsyncioPool
from qmlkit.processing.pools.base import Pool, PoolParts
from qmlkit.processing.pools.threads import ThreadPool
from qmlkit.processing.processor import JobProcessor
from qmlkit.processing.watchdog import Watchdog
from qmlkit.storage.base import ServerInfo, StateChange, Storage, Transition
from qmlkit.wakeup import RECURRING, SCHEDULED, WakeupListener, WakeupPublisher
from qmlkit.wakeup.defaults import PushListener, open_channel, push_listener, resolve_wakeup

if TYPE_CHECKING:
    from qmlkit.recurring import RecurringJob
    from qmlkit.registry import JobSource

__all__ = ["Server", "ServerConfig"]

log = logging.getLogger(__name__)

#: ``ServerConfig.pool`` -> the pool a server composes in its own process.
POOLS: dict[str, Callable[[PoolParts], Pool]] = {"threads": ThreadPool, "asyncio": AsyncioPool}


class Server:
    """A job server: an execution pool plus scheduler, cleanup and heartbeat duties.

    Build it with `from_plugins` (or ``App.server()``), which resolves the storage
    and middleware through the plugin manager. A server is also the
    `qmlkit.processing.runtime.Runtime` its duties run against.

    Args:
        app: The application whose registered jobs this server runs.
        storage: An opened or unopened storage (opened on ``start()``).
        config: The configuration; `config` keeps it with the wake-up URL and exchange
            in use (``wakeup_url="auto"`` resolved against ``storage``).
        plugin_manager: The manager whose observers and lifecycle hooks are called.
        middleware: The middleware chain, outermost first.

    Raises:
        ConfigurationError: ``config.pool`` is ``"processes"`` (a supervisor of servers,
            started by ``qmlkit worker --pool processes``), or a bad ``wakeup_url``.
    """

    def __init__(
        self,
        app: JobSource,
        storage: Storage,
        config: ServerConfig,
        *,
        plugin_manager: pluggy.PluginManager,
        middleware: Sequence[Middleware] = (),
    ) -> None:
        self.app = app
        self.storage = storage
        url, exchange = resolve_wakeup(config.wakeup_url, config.wakeup_exchange, storage)
        self.config = config.model_copy(update={"wakeup_url": url, "wakeup_exchange": exchange})
        self.pm = plugin_manager
        self.middleware = tuple(middleware)
        if config.pool not in POOLS:
            raise ConfigurationError(
                f"pool={config.pool!r}: the process pool is not run by a Server directly; "
                "start it with `qmlkit worker APP --pool processes` or "
                f"`App.server(pool='processes')` (the supervisor), or use one of "
                f"{sorted(POOLS)} here")
        self.server_id: str | None = None
        self.claims = ClaimLedger.for_config(config)
        self.duties: list[duties.Duty] = duties.default_duties()
        self.pool: Pool | None = None
        self._started_at = utcnow()
        self._running = False
        self._lock = threading.Lock()
        self._stopping = threading.Event()
        self._halted = threading.Event()  # set once every attempt is stored or released
        self._duty_threads: list[threading.Thread] = []  # duties that end on stopping
        self._beating: list[threading.Thread] = []  # duties that outlive the grace period
        self._hard_stop = threading.Event()
        self._abort_lock = threading.Lock()
        self._start_cancelled = threading.Event()  # see cancel_start
        self._abort_settled: int | None = None  # jobs released or failed by abort()
        self._idle = IdleGate()
        self._watchdog: Watchdog | None = None
        self._observed = bool(self.pm.hook.qmlkit_job_state_changed.get_hookimpls())
        self._publisher: WakeupPublisher | None = None
        self._listener: WakeupListener | None = None
        self._push: PushListener | None = None  # the storage's own (qmlkit_redis.push)
        self.processor = JobProcessor(
            lookup=app.registry.get, registered=lambda: list(app.registry),
            retry_policy=config.retry, middleware=self.middleware, job_timeout=config.job_timeout,
            succeeded_ttl=config.succeeded_ttl, failed_ttl=config.failed_ttl,
            max_result_bytes=config.max_result_bytes)

    @classmethod
    def from_plugins(
        cls,
        *,
        app: JobSource,
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
        parts = assemble(storage=storage, config=config, plugins=plugins, middleware=middleware,
                         observers=observers, plugin_manager=plugin_manager, autoload=autoload)
        return cls(app, parts.storage, parts.config, plugin_manager=parts.pm,
                   middleware=parts.middleware)

    # --- lifecycle --------------------------------------------------------------------

    @property
    def aborted(self) -> bool:
        """Whether the last stop had to release (or fail) unfinished jobs: ``abort()``
        ran and found some."""
        return bool(self._abort_settled)

    @property
    def is_running(self) -> bool:
        """Whether ``start()`` has run and ``stop()`` has not."""
        return self._running

    def start(self) -> None:
        """Start the duties and the worker threads (qml-rs ``start``).

        Raises:
            ConfigurationError: The server is already running.
            StorageError: The storage cannot be opened (`StorageUnavailable` after
                ``connect_timeout`` or `cancel_start`), or registering the server failed.
        """
        with self._lock:
            if self._running:
                raise ConfigurationError("server is already running")
            cfg = self.config
            open_storage(self.storage.open, timeout=cfg.connect_timeout, what=repr(self.storage),
                         cancelled=self._start_cancelled)  # retries while unreachable
            requeue_stranded_on_start(self)  # what a crashed predecessor left
            self._stopping, self._halted = threading.Event(), threading.Event()
            self._hard_stop = threading.Event()
            self._abort_settled = None
            stamped, self._started_at = cfg.server_name, utcnow()
            if cfg.enable_heartbeat:
                self.server_id = f"{cfg.server_name}#{uuid.uuid4()}"
                began = self.claims.clock()
                self.storage.register_server(self.server_info())
                self.claims.beat(began)  # workers trust their claims from now on
                stamped = self.server_id
            self._watchdog = Watchdog()
            self._duty_threads, self._beating = [], []
            self._start_wakeups()
            for duty in self.duties:
                if duty.enabled(cfg):
                    self._spawn(duty.name, functools.partial(duties.run_duty, duty, self),
                                through_grace=getattr(duty, "through_grace", False))
            # Logged before the workers start, so no job's log line comes first.
            log.info("server %s started: pool %s, concurrency %d, storage %r, queues %s",
                     self.server_id or cfg.server_name, cfg.pool, cfg.worker_count,
                     self.storage, list(cfg.queues) or "all")
            self.pool = POOLS[cfg.pool](PoolParts(
                runtime=self, processor=self.processor, idle=self._idle,
                watchdog=self._watchdog, server_name=stamped, observed=self._observed,
                wakeups_live=lambda: self._wakeups_live))
            self.pool.start()
            self._running = True
            self.app.notifier.subscribe(self)
        call_safely(self.pm, "qmlkit_server_started", server=self)

    def cancel_start(self) -> None:
        """Make a ``start()`` waiting for its storage give up now (raising
        `StorageUnavailable`); from any thread or a signal handler."""
        self._start_cancelled.set()

    def _start_wakeups(self) -> None:
        cfg = self.config
        if cfg.wakeup_url:
            self._publisher, self._listener = open_channel(
                cfg.wakeup_url, cfg.wakeup_exchange, self.wake, self.server_id or cfg.server_name)
        self._push = push_listener(self.storage, self.wake, self.server_id or cfg.server_name)

    def stop(self, timeout: timedelta | float | None = None) -> None:
        """Stop gracefully: claim nothing more, let running attempts finish, then return.

        Claimed-but-unstarted jobs are released to Enqueued at once. Attempts still
        running when the grace period ends are cancelled through their context and
        released (no retry used) or, past their timeout, failed (`abort`); their later
        outcome is rejected by fencing. Idempotent.

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
        self._idle.wake_all()
        for duty in self.duties:
            duty.nudge()
        self._release_unstarted()
        self._join(grace_s)
        if self._pool_alive():
            self.abort()
        self._finish()

    def _pool_alive(self) -> bool:
        """Whether the pool or a duty (other than the heartbeat) still runs."""
        return ((self.pool is not None and self.pool.alive())
                or any(t.is_alive() for t in self._duty_threads))

    def _join(self, grace_s: float) -> None:
        """Wait up to ``grace_s`` seconds for the pool, less if ``abort()`` runs."""
        deadline = time.monotonic() + grace_s
        while self._pool_alive() and not self._hard_stop.is_set():
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                break
            if self.pool is not None:
                self.pool.join(min(0.1, remaining))
            for thread in self._duty_threads:
                thread.join(max(0.0, min(0.1, deadline - time.monotonic())))

    def abort(self) -> None:
        """Stop at once: cancel running attempts and release every held job to Enqueued.

        Called by ``stop()`` when the grace period runs out, and by the CLI on a second
        signal. Unstarted claims and attempts within their timeout go back to their
        queues (no retry used); attempts past it end ``JobTimeout`` by their retry policy.
        Their threads end on their own; outcomes stored later are stale. Idempotent.
        """
        self._stopping.set()
        self._hard_stop.set()  # stop() stops waiting for threads at once
        with self._abort_lock:  # a second caller waits until the first has released
            if self._abort_settled is None:
                self._abort_settled = self._abort()

    def _abort(self) -> int:
        self._idle.wake_all()
        running, overran = self.claims.release_running()
        if released := (self.release(running, "released: server stopped before it finished")
                        + self._release_unstarted()):
            log.warning("released %d unfinished job(s) back to their queues", released)
        if overran:  # (said first: a storage that is down logs its own error after)
            log.warning("failing %d job(s) still running past their timeout with JobTimeout "
                        "(their retry policy applies)", len(overran))
            self.store_outcomes([self.processor.timed_out(job) for job in overran])
        if self.pool is not None:
            self.pool.abort()
            self.pool.join(0.5)  # let threads that can end quickly do so
        return released + len(overran)

    def _release_unstarted(self) -> int:
        """Release held jobs that no worker has started; return how many."""
        return self.release(self.claims.release_unstarted(), "released unstarted: server stopping")

    def _finish(self) -> None:
        if self._watchdog is not None:
            self._watchdog.close()
        for listener in (self._listener, self._push):
            if listener is not None:
                listener.stop()
        self._listener = self._push = None
        if self._publisher is not None:
            self._publisher.close()
            self._publisher = None
        self._halted.set()  # every attempt is stored or released: the heartbeat may end
        for thread in self._beating:
            thread.join(5.0)
        if self.server_id is not None:
            try:
                self.storage.deregister_server(self.server_id)
            except QmlError as exc:
                log.warning("could not deregister %s: %s", self.server_id, exc)
            self.server_id = None
        self.app.notifier.unsubscribe(self)
        log.info("server stopped")

    def _spawn(self, name: str, target: Callable[[], None], *, through_grace: bool = False) -> None:
        thread = threading.Thread(target=target, name=f"qmlkit-{name}", daemon=True)
        thread.start()
        (self._beating if through_grace else self._duty_threads).append(thread)

    # --- wake-ups and nudges ----------------------------------------------------------

    def _duty(self, kind: type[Any]) -> Any:
        return next(d for d in self.duties if isinstance(d, kind))

    def wake(self, queue: str | None = None) -> None:
        """Wake an idle worker for ``queue`` now (``None``: every idle worker).

        One worker, not all: if its claim comes back full it wakes the next
        (`qmlkit.processing.idle.IdleGate`). A queue this server does not serve wakes
        nobody.

        The reserved names `qmlkit.wakeup.SCHEDULED` and `qmlkit.wakeup.RECURRING`
        nudge the scheduler and the recurring poller instead.
        """
        if queue is None:
            self.nudge_scheduler()
            self.nudge_recurring()
            self._idle.wake_all()
            return
        if queue == SCHEDULED:
            self.nudge_scheduler()
            return
        if queue == RECURRING:
            self.nudge_recurring()
            return
        if self.config.queues and queue not in self.config.queues:
            return
        self._idle.wake(1)

    def nudge_scheduler(self) -> None:
        """Make the scheduler look for due jobs now (after a schedule in this process)."""
        self._duty(duties.SchedulerDuty).nudge()

    def nudge_recurring(self) -> None:
        """Make the recurring poller look at the templates now."""
        self._duty(duties.RecurringDuty).nudge()

    @property
    def idle_workers(self) -> int:
        """Claimers in their idle wait now: worker threads (threads pool), or the one
        claimer of the asyncio pool (tests, metrics)."""
        return self._idle.idle_workers

    @property
    def waiting_workers(self) -> int:
        """Idle worker threads not yet woken: ``idle_workers`` less the woken ones."""
        return self._idle.waiting

    @property
    def _wakeups_live(self) -> bool:
        """Whether wake-ups are arriving now (so the duties may poll less)."""
        return any(x is not None and x.connected.is_set() for x in (self._listener, self._push))

    # --- the runtime duties use (qmlkit.processing.runtime.Runtime) --------------------

    @property
    def stopping(self) -> threading.Event:
        """Set once the server begins to stop (replaced by each ``start()``)."""
        return self._stopping

    @property
    def halted(self) -> threading.Event:
        """Set once a stopping server's attempts are all stored or released."""
        return self._halted

    def cap(self, interval: timedelta) -> float:
        """A duty's longest sleep, in seconds: ``interval``, or the polling interval if
        longer while wake-ups arrive (schedules and template changes are announced over
        them)."""
        seconds = interval.total_seconds()
        if self._wakeups_live:
            seconds = max(seconds, self.config.polling_interval.total_seconds())
        return seconds

    def server_info(self) -> ServerInfo:
        """This server's registry entry, stamped now.

        Raises:
            AssertionError: The server is not registered (heartbeats off, or stopped).
        """
        now = utcnow()
        assert self.server_id is not None
        return ServerInfo(id=self.server_id, name=self.config.server_name,
                          worker_count=self.config.worker_count, queues=list(self.config.queues),
                          started_at=self._started_at, last_heartbeat=now,
                          pool=self.config.pool, busy=self.busy_slots)

    @property
    def busy_slots(self) -> int:
        """Slots of the pool running an attempt now (0 when stopped)."""
        return self.pool.busy() if self.pool is not None else 0

    def notify(self, changes: Sequence[StateChange]) -> None:
        """Tell the state-change observers about committed ``changes`` (if any listen)."""
        if self._observed and changes:
            notify_state_changed(self.pm, changes)

    def runnable(self, changes: Sequence[StateChange]) -> None:
        """After a commit that made jobs Enqueued: wake local workers and, over the
        broker, every other server serving their queues."""
        runnable = [c.job.queue for c in changes if c.job.state.name == "Enqueued"]
        if not runnable:
            return
        self._idle.wake(len(runnable))
        if self._publisher is not None:
            self._publisher.publish(set(runnable))

    def store_outcomes(self, outcomes: Sequence[Transition]) -> None:
        """Store a batch of outcomes in one transaction (`qmlkit.processing.outcome`),
        then notify observers, announce released jobs and nudge the scheduler for
        retries."""
        if not outcomes:
            return
        changes = store_outcomes(self.storage, outcomes, aborting=self._hard_stop,
                                 observed=self._observed)
        if changes is None:
            return
        self.app.notifier.settled([item.job.id for item in outcomes])  # result waiters
        self.notify(changes)
        if self._publisher is not None:  # released jobs: let other servers take them
            self.runnable(changes)
        if any(item.state.name == "AwaitingRetry" for item in outcomes):
            self.nudge_scheduler()  # it may sleep past the retry time otherwise

    def release(self, jobs: Sequence[Job], reason: str) -> int:
        """Store held ``jobs`` back to Enqueued (fenced; no retry used); return how many."""
        if not jobs:
            return 0
        now = utcnow()
        self.store_outcomes([Transition(j, Enqueued(enqueued_at=now, queue=j.queue, reason=reason))
                             for j in jobs])
        return len(jobs)

    def tick_job(self, template: RecurringJob, tick: datetime) -> Job | None:
        """Build the job materialising ``tick`` of ``template``; see ``App.tick_job``."""
        return self.app.tick_job(template, tick)

    def promote_due(self) -> int:
        """Promote every due Scheduled/AwaitingRetry job now; return how many."""
        return duties.promote_due(self)

    def fire_due_recurring(self) -> datetime | None:
        """Materialise every due tick this server wins; return the earliest next tick.

        Each due template is advanced with one compare-and-set (`Storage.fire_recurring`),
        so with several servers polling, each tick becomes exactly one job.
        """
        return duties.fire_due_recurring(self)
