"""``App``: the job registry, the client API (enqueue, schedule) and the way to a server.

::

    app = App("shop", storage="sqlite:///qmlkit.db")

    @app.job(queue="mail", max_retries=5)
    def send_receipt(order_id: int) -> str: ...

    job_id = send_receipt.enqueue(42)          # runs on a worker
    send_receipt.schedule(42, delay=60)         # runs in a minute
    send_receipt(42)                            # runs here, now
    app.server(worker_count=8).start()          # or: qmlkit worker shop:app
"""

from __future__ import annotations

import functools
import os
import threading
import weakref
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from contextvars import ContextVar
from datetime import datetime, timedelta
from typing import TYPE_CHECKING, Any, Generic, ParamSpec, Protocol, TypeVar

import pluggy
from pydantic import ValidationError

from qmlkit import limits
from qmlkit.errors import ConfigurationError, JobNotFound, MiddlewareError, QmlError
from qmlkit.job import (
    Deleted,
    Enqueued,
    Job,
    Scheduled,
    encode_payload,
    new_job_id,
    trusted,
    utcnow,
)
from qmlkit.plugins import (
    has_observers,
    make_plugin_manager,
    notify_state_changed,
    resolve_storage,
)
from qmlkit.processing.context import JobContext
from qmlkit.processing.middleware import EnqueueMiddleware, compose_enqueue, describe
from qmlkit.processing.retry import RetryPolicy
from qmlkit.recurring import RecurringJob
from qmlkit.wakeup import RECURRING, SCHEDULED, WakeupPublisher, connection_for
from qmlkit.storage.base import StateChange, Storage

if TYPE_CHECKING:
    from qmlkit.processing.server import Server

P = ParamSpec("P")
R = TypeVar("R")

#: Default storage: a SQLite file in the working directory.
DEFAULT_STORAGE_URL = "sqlite:///qmlkit.db"


class ClassWorker(Protocol):
    """A class-based worker, as qml-rs's ``Worker`` trait: a name and an ``execute``."""

    method_name: str

    def execute(self, job: Job, context: JobContext) -> Any:
        """Run ``job``; return a JSON-serialisable result (or a coroutine of one)."""


class JobOptions:
    """Defaults stamped on each job of one registered name.

    Attributes:
        queue: Queue name.
        priority: Higher runs first.
        max_retries: Retries after a failed first attempt (``None``: the policy's).
        timeout: Per-attempt limit (``None``: the server's ``job_timeout``).
        retry: A retry policy for this job name (``None``: the server's).
    """

    def __init__(
        self,
        *,
        queue: str = "default",
        priority: int = 0,
        max_retries: int | None = None,
        timeout: timedelta | float | None = None,
        retry: RetryPolicy | None = None,
    ) -> None:
        limits.check_name(queue, "queue")
        limits.check_int32(priority, "priority")
        if max_retries is not None:
            limits.check_int32(max_retries, "max_retries", minimum=0)
        self.queue = queue
        self.priority = priority
        self.retry = retry
        self.max_retries = max_retries if max_retries is not None else (
            retry.max_retries if retry is not None else RetryPolicy().max_retries
        )
        if max_retries is not None and max_retries < 0:
            raise ConfigurationError("max_retries must be >= 0")
        self.timeout_s = _seconds(timeout)


def _seconds(value: timedelta | float | None) -> float | None:
    return None if value is None else limits.seconds(value, "timeout", allow_zero=False)


class JobFunction(Generic[P, R]):
    """A function registered with ``@app.job``. Calling it runs it here and now.

    Attributes:
        name: The registered job name (default ``module.qualname``).
        fn: The wrapped function (``def`` or ``async def``).
        options: Its `JobOptions`.
    """

    def __init__(self, app: App, fn: Callable[P, R], name: str, options: JobOptions) -> None:
        self.app = app
        self.fn = fn
        self.name = name
        self.options = options
        self.retry = options.retry
        functools.update_wrapper(self, fn)  # type: ignore[arg-type]

    def __call__(self, *args: P.args, **kwargs: P.kwargs) -> R:
        """Run the function directly, in this process (no storage involved)."""
        return self.fn(*args, **kwargs)

    def execute(self, job: Job, context: JobContext) -> Any:
        """Run the stored job's arguments through the function (used by workers)."""
        return self.fn(*job.args, **job.kwargs)

    def enqueue(self, *args: P.args, **kwargs: P.kwargs) -> str:
        """Store a job that calls this function with these arguments; return its id.

        Raises:
            PayloadError: An argument is not JSON-serialisable (named) or the arguments
                are over the size limit; nothing is stored.
            StorageError: The storage failed; nothing is stored.
        """
        return self.app.enqueue(self.name, args=args, kwargs=kwargs)

    def schedule(
        self,
        *args: Any,
        at: datetime | None = None,
        delay: timedelta | float | None = None,
        **kwargs: Any,
    ) -> str:
        """Store a job that becomes runnable at ``at`` or after ``delay``; return its id.

        ``at`` and ``delay`` are reserved here; use `App.enqueue` to pass job
        arguments with those names.

        Args:
            *args: Job arguments.
            at: An aware datetime (naive is refused: it would be ambiguous).
            delay: Seconds or a ``timedelta`` from now.
            **kwargs: Job keyword arguments.

        Raises:
            ConfigurationError: Neither or both of ``at`` and ``delay``, or a naive ``at``.
            PayloadError: As for `enqueue`.
        """
        if (at is None) == (delay is None):
            raise ConfigurationError("schedule() takes exactly one of at= or delay=")
        return self.app.enqueue(self.name, args=args, kwargs=kwargs, at=at, delay=delay)

    def enqueue_many(self, calls: Iterable[Sequence[Any] | tuple[Sequence[Any], Mapping[str, Any]]]) -> list[str]:
        """Store many jobs of this function in one transaction; return their ids.

        Args:
            calls: Each item is an argument tuple/list, or an ``(args, kwargs)`` pair
                whose second member is a mapping.

        Raises:
            PayloadError: One call's arguments cannot be stored; none are stored.
        """
        template: Job | None = None
        jobs = []
        for call in calls:
            if (isinstance(call, tuple) and len(call) == 2
                    and isinstance(call[1], Mapping) and isinstance(call[0], (list, tuple))):
                args, kwargs = list(call[0]), dict(call[1])
            else:
                args, kwargs = list(call), {}
            if template is None:
                template = self.app.make_job(self.name, args=args, kwargs=kwargs)
                jobs.append(template)
            else:  # same options and timestamps: copy the validated first job
                jobs.append(template._replace(id=new_job_id(), args=args, kwargs=kwargs,
                                              metadata=dict(template.metadata)))
        return self.app.enqueue_jobs(jobs) if jobs else []


class _RegisteredWorker:
    def __init__(self, worker: ClassWorker, options: JobOptions) -> None:
        self.worker = worker
        self.options = options
        self.retry = options.retry

    def execute(self, job: Job, context: JobContext) -> Any:
        return self.worker.execute(job, context)


class App:
    """An application: its job names, its storage, and servers built from it.

    Args:
        name: A label for logs and the CLI.
        storage: Storage URL (default ``sqlite:///qmlkit.db``) or a ``Storage`` object.
        storage_options: Backend options for the URL.
        plugins: Extra plugin objects for this app's plugin manager.
        autoload: Load entry-point plugins.
        max_payload_bytes: Override the storage's argument size limit, in bytes.
        wakeup_url: A kombu URL: after each commit that makes jobs runnable, a wake-up
            names their queues so idle servers start them at once (`qmlkit.wakeup`).
            Servers built with `server()` listen on it too. ``None``: servers poll.
        wakeup_exchange: The fanout exchange's name on that broker.
    """

    def __init__(
        self,
        name: str = "qmlkit",
        *,
        storage: str | Storage = DEFAULT_STORAGE_URL,
        storage_options: Mapping[str, Any] | None = None,
        plugins: Iterable[object] = (),
        autoload: bool = True,
        max_payload_bytes: int | None = None,
        wakeup_url: str | None = None,
        wakeup_exchange: str = "qmlkit.wakeup",
    ) -> None:
        self.name = name
        self.wakeup_url = wakeup_url
        self.wakeup_exchange = wakeup_exchange
        self._publisher: WakeupPublisher | None = None
        self._publisher_pid = 0  # the process that made _publisher (see _wakeup_publisher)
        self._after_commit: _AfterCommit | None = None
        if wakeup_url:
            connection_for(wakeup_url)  # a bad URL fails here, naming it
        self.registry: dict[str, JobFunction[Any, Any] | _RegisteredWorker] = {}
        self._storage_spec = storage
        self.storage_options = dict(storage_options or {})
        if max_payload_bytes is not None:
            self.storage_options["max_payload_bytes"] = max_payload_bytes
        self._plugins = tuple(plugins)
        self._autoload = autoload
        self._pm: pluggy.PluginManager | None = None
        self._storage: Storage | None = None
        self._lock = threading.Lock()
        self._servers: weakref.WeakSet[Server] = weakref.WeakSet()
        self._enqueue_mw: list[EnqueueMiddleware] | None = None

    # --- registration ------------------------------------------------------------------

    def job(
        self,
        fn: Callable[P, R] | None = None,
        *,
        name: str | None = None,
        queue: str = "default",
        priority: int = 0,
        max_retries: int | None = None,
        timeout: timedelta | float | None = None,
        retry: RetryPolicy | None = None,
    ) -> Any:
        """Register a job function; usable as ``@app.job`` or ``@app.job(...)``.

        Args:
            fn: The function (``def`` or ``async def``); its arguments must be JSON.
            name: The stored job name; default ``"module.qualname"``.
            queue: Default queue.
            priority: Default priority (higher first).
            max_retries: Retries after a failed attempt; default the policy's (3).
            timeout: Per-attempt limit, seconds or ``timedelta``; default the server's.
            retry: Retry policy for this job name.

        Returns:
            A `JobFunction` (or a decorator making one).

        Raises:
            ConfigurationError: The name is taken, or an option is invalid.
        """
        options = JobOptions(queue=queue, priority=priority, max_retries=max_retries,
                             timeout=timeout, retry=retry)

        def register(f: Callable[P, R]) -> JobFunction[P, R]:
            job_name = name or f"{f.__module__}.{f.__qualname__}"
            self._register(limits.check_name(job_name, "job name"),
                           JobFunction(self, f, job_name, options))
            return self.registry[job_name]  # type: ignore[return-value]

        return register(fn) if fn is not None else register

    def register_worker(
        self,
        worker: ClassWorker,
        *,
        queue: str = "default",
        priority: int = 0,
        max_retries: int | None = None,
        timeout: timedelta | float | None = None,
        retry: RetryPolicy | None = None,
    ) -> None:
        """Register a class-based worker under ``worker.method_name`` (qml-rs style).

        Raises:
            ConfigurationError: No ``method_name``/``execute``, or the name is taken.
        """
        name = getattr(worker, "method_name", None)
        if not isinstance(name, str) or not name or not callable(getattr(worker, "execute", None)):
            raise ConfigurationError("a class-based worker needs a method_name and execute(job, context)")
        options = JobOptions(queue=queue, priority=priority, max_retries=max_retries,
                             timeout=timeout, retry=retry)
        self._register(name, _RegisteredWorker(worker, options))

    def _register(self, name: str, entry: JobFunction[Any, Any] | _RegisteredWorker) -> None:
        existing = self.registry.get(name)
        if existing is not None and getattr(existing, "fn", None) is not getattr(entry, "fn", None):
            raise ConfigurationError(f"job name {name!r} is registered already")
        self.registry[name] = entry

    # --- plugins and storage ----------------------------------------------------------------

    @property
    def plugin_manager(self) -> pluggy.PluginManager:
        """This app's plugin manager (built on first use)."""
        with self._lock:
            if self._pm is None:
                self._pm = make_plugin_manager(autoload=self._autoload, extra=self._plugins)
            return self._pm

    @property
    def storage(self) -> Storage:
        """The opened storage (resolved through the plugins and opened on first use).

        Raises:
            UnknownStorageScheme, ConfigurationError, StorageUnavailable: As for opening.
        """
        if self._storage is None:
            pm = self.plugin_manager
            with self._lock:
                if self._storage is None:
                    spec = self._storage_spec
                    store = spec if isinstance(spec, Storage) else resolve_storage(
                        pm, spec, self.storage_options
                    )
                    store.open()
                    self._storage = store
        return self._storage

    def close(self) -> None:
        """Close the storage (it reopens on next use) and the wake-up publisher."""
        with self._lock:
            if self._publisher is not None:
                self._publisher.close()
                self._publisher = None
            if self._storage is not None:
                self._storage.close()
                self._storage = None

    # --- enqueue -------------------------------------------------------------------------

    def make_job(
        self,
        method: str,
        *,
        args: Sequence[Any] = (),
        kwargs: Mapping[str, Any] | None = None,
        queue: str | None = None,
        priority: int | None = None,
        at: datetime | None = None,
        delay: timedelta | float | None = None,
        metadata: Mapping[str, Any] | None = None,
        job_id: str | None = None,
        max_retries: int | None = None,
        timeout: timedelta | float | None = None,
    ) -> Job:
        """Build (not store) a job for ``method``, applying its registered defaults.

        A name not registered in this app is allowed (another process may run it); it
        gets the default queue and options.

        Raises:
            ConfigurationError: A naive ``at``, both ``at`` and ``delay``, or a bad option.
        """
        entry = self.registry.get(method)
        now = utcnow()
        if (entry is not None and at is None and delay is None and queue is None
                and priority is None and metadata is None and job_id is None
                and max_retries is None and timeout is None):
            # The common case: only the arguments are new, and they are checked when the
            # storage encodes them; every other field comes from validated options.
            opts = entry.options
            return trusted(Job, {
                "id": new_job_id(), "method": method, "args": list(args),
                "kwargs": dict(kwargs or {}), "queue": opts.queue, "priority": opts.priority,
                "attempts": 0, "retry_count": 0, "max_retries": opts.max_retries,
                "timeout_s": opts.timeout_s, "metadata": {}, "created_at": now,
                "expires_at": None,
                "state": trusted(Enqueued, {"enqueued_at": now, "queue": opts.queue,
                                            "reason": None}),
            })
        opts = entry.options if entry is not None else JobOptions()
        run_at = _run_at(now, at, delay)
        q = opts.queue if queue is None else queue
        state: Enqueued | Scheduled
        try:
            if run_at is None:
                state = Enqueued(enqueued_at=now, queue=q)
            else:
                reason = (f"delay {(run_at - now).total_seconds():g} s" if delay is not None
                          else "at")
                state = Scheduled(enqueue_at=run_at, scheduled_at=now, reason=reason)
            fields: dict[str, Any] = {
                "method": method, "args": list(args), "kwargs": dict(kwargs or {}),
                "queue": q, "priority": opts.priority if priority is None else priority,
                "max_retries": opts.max_retries if max_retries is None else max_retries,
                "timeout_s": _seconds(timeout) if timeout is not None else opts.timeout_s,
                "metadata": dict(metadata or {}), "created_at": now, "state": state,
            }
            if job_id is not None:
                fields["id"] = job_id
            return Job(**fields)
        except ValidationError as exc:
            raise limits.invalid_job(method, exc) from None

    def enqueue(self, method: str, **options: Any) -> str:
        """Store one job for ``method``; return its id. Options as `make_job`.

        Raises:
            PayloadError: Arguments not JSON (the message names the argument) or too
                large; nothing stored.
            DuplicateJob: ``job_id`` given and taken.
            StorageError: The storage failed; nothing stored.
        """
        ids = self.enqueue_jobs([self.make_job(method, **options)])
        if not ids:
            raise MiddlewareError(
                ", ".join(describe(m) for m in self._enqueue_chain()),
                "stored nothing for this enqueue: an enqueue middleware must call "
                "call_next(jobs), or raise to refuse the job")
        return ids[0]

    @contextmanager
    def transaction(self, connection: Any) -> Iterator[None]:
        """Enqueue inside the caller's own database transaction (transactional enqueue).

        Every enqueue of this app made in the ``with`` block (``fn.enqueue``,
        ``fn.schedule``, ``fn.enqueue_many``, ``app.enqueue``, in this thread or task)
        writes through ``connection``: the jobs exist only if the caller's transaction
        commits, and a rollback leaves no trace — the pattern of Rails' GoodJob and of
        procrastinate, which Celery and RQ cannot offer. State-change observers and
        wake-ups run after the commit, and never after a rollback.

        Example::

            with Session(engine) as session, session.begin():
                session.add(order)
                with app.transaction(session):
                    send_receipt.enqueue(order.id)

        Args:
            connection: A SQLAlchemy ``Session`` or ``Connection`` on the same database
                as the app's storage, inside a transaction the caller commits.

        Jobs enqueued inside a savepoint (``session.begin_nested()``) that is rolled
        back are gone with it, and are not announced at the outer commit.

        Raises:
            ConfigurationError: On entry, when the app's storage cannot take part in a
                caller's transaction (a storage says it can with
                ``supports_transactional_enqueue = True``, an ``enqueue_many`` that takes
                ``connection=`` and an ``existing_ids(ids) -> set[str]``; qmlkit-postgres
                does).
        """
        if not getattr(self.storage, "supports_transactional_enqueue", False):
            raise ConfigurationError(
                f"{self.storage!r} cannot enqueue inside a caller's transaction; "
                "transactional enqueue needs the PostgreSQL storage (pip install qmlkit-postgres)"
            )
        token = _TRANSACTION.set((self, connection))
        try:
            yield
        finally:
            _TRANSACTION.reset(token)

    def _announce_after_commit(self, connection: Any, stored: list[Job]) -> None:
        """Run observers and wake-ups for ``stored`` once ``connection`` commits; drop them
        if it rolls back.

        Pending announcements are kept per connection or session object; one set of
        event listeners per object drains them, so a long-lived session gathers no
        listeners. A ``Session`` reports the end of its commit (``after_commit``); a
        ``Connection`` only the moment before it (``commit``), so its jobs are handed to
        a background thread that announces them as soon as the commit is visible.
        Either way only jobs that exist after the commit are announced: a savepoint
        rolled back inside the transaction takes its jobs, and their announcements, away.
        """
        from sqlalchemy import event
        from sqlalchemy.orm import Session

        # Keyed by the Connection/Session object itself: a Connection's ``info`` belongs
        # to the pooled DBAPI connection and outlives it.
        known = connection in _PENDING
        pending = _PENDING.setdefault(connection, [])
        pending.append((self, stored))
        if known:
            return
        is_session = isinstance(connection, Session)

        def take() -> list[tuple[App, list[Job]]]:
            waiting = list(_PENDING.get(connection, ()))
            _PENDING[connection] = []
            return waiting

        def on_commit(*_: Any) -> None:
            for app, jobs in take():
                if is_session:
                    app._announce_existing(jobs)
                else:
                    app._after_commit_thread().put(jobs)

        def on_rollback(*args: Any) -> None:
            if is_session and args[1].parent is not None:
                return  # a savepoint: the commit will tell which jobs survived
            take()

        if is_session:
            event.listen(connection, "after_commit", on_commit)
            event.listen(connection, "after_soft_rollback", on_rollback)
        else:
            event.listen(connection, "commit", on_commit)
            event.listen(connection, "rollback", on_rollback)

    def _announce_existing(self, jobs: list[Job]) -> bool:
        """Announce those of ``jobs`` that are stored; return whether any were."""
        real = self.storage.existing_ids([j.id for j in jobs])  # type: ignore[attr-defined]
        kept = [j for j in jobs if j.id in real]
        if kept:
            self._announce(kept)
        return bool(kept)

    def _after_commit_thread(self) -> _AfterCommit:
        with self._lock:
            if self._after_commit is None:
                self._after_commit = _AfterCommit(self)
            return self._after_commit

    def _announce(self, stored: list[Job]) -> None:
        if has_observers(self.plugin_manager):
            notify_state_changed(self.plugin_manager, [StateChange(j, None) for j in stored])
        self._after_change(stored)

    def enqueue_jobs(self, jobs: Sequence[Job], *, storage: Storage | None = None) -> list[str]:
        """Store built jobs in one transaction, wake local servers, notify observers.

        The jobs pass through the enqueue middleware first. Inside `transaction` they
        are written through the caller's connection and announced after its commit.

        Args:
            jobs: Built jobs (see `make_job`).
            storage: Where to store them (default the app's).

        Returns:
            The ids of the jobs stored, in order (fewer than given if a middleware
            dropped some).
        """
        store = storage or self.storage
        active = _TRANSACTION.get()
        connection = active[1] if active is not None and active[0] is self else None
        if connection is not None:
            def insert(batch: Sequence[Job]) -> list[Job]:
                return store.enqueue_many(batch, connection=connection)  # type: ignore[call-arg]
        else:
            insert = store.enqueue_many
        chain = self._enqueue_chain()
        if chain:
            by_id: dict[str, Job] = {}

            def store_all(final: list[Job]) -> list[str]:
                for job in insert(final):
                    by_id[job.id] = job
                return [job.id for job in final]

            compose_enqueue(chain, list(jobs), store_all)
            # What was stored counts, whatever ids a middleware chose to return.
            stored = list(by_id.values())
        else:
            stored = insert(jobs)
        if connection is not None:
            self._announce_after_commit(connection, stored)
        else:
            self._announce(stored)
        return [j.id for j in stored]

    def _wakeup_publisher(self) -> WakeupPublisher:
        """This process's publisher. A process forked after the first wake-up (gunicorn
        ``--preload``, multiprocessing) inherits the parent's publisher without its
        thread or its connection, so it gets one of its own."""
        with self._lock:
            if self._publisher is not None and self._publisher_pid != os.getpid():
                self._publisher = None  # the parent's: its socket is not ours to close
            if self._publisher is None:
                assert self.wakeup_url is not None
                self._publisher = WakeupPublisher(self.wakeup_url, self.wakeup_exchange)
                self._publisher_pid = os.getpid()
            return self._publisher

    def _enqueue_chain(self) -> list[EnqueueMiddleware]:
        """The enqueue middleware from ``qmlkit_enqueue_middleware``, built on first use."""
        if self._enqueue_mw is None:
            chain: list[EnqueueMiddleware] = []
            config = {"name": self.name, "storage": str(self._storage_spec)}
            for provided in self.plugin_manager.hook.qmlkit_enqueue_middleware(config=config):
                chain.extend(provided or ())
            self._enqueue_mw = chain
        return self._enqueue_mw

    def _after_change(self, jobs: Iterable[Job]) -> None:
        if not self.wakeup_url and not self._servers:
            return
        queues: set[str] = set()
        scheduled = False
        for job in jobs:
            if job.state.name == "Enqueued":
                queues.add(job.queue)
            else:
                scheduled = True
        if self.wakeup_url and (queues or scheduled):
            self._wakeup_publisher().publish(queues | ({SCHEDULED} if scheduled else set()))
        for server in list(self._servers):
            for queue in queues:
                server.wake(queue)
            if scheduled:
                server.nudge_scheduler()

    # --- management ------------------------------------------------------------------------

    def retry(self, job_id: str) -> Job:
        """Put a Failed, Succeeded or Deleted job back in its queue now.

        Returns:
            The job, Enqueued.

        Raises:
            JobNotFound: No such job.
            InvalidTransition: It is Enqueued, Scheduled, Processing or AwaitingRetry.
        """
        now = utcnow()
        job = self.storage.get(job_id)
        queue = job.queue if job is not None else "default"
        change = self.storage.change_state(
            job_id, Enqueued(enqueued_at=now, queue=queue, reason="retried by hand"),
            expected=("Failed", "Succeeded", "Deleted"),
        )
        notify_state_changed(self.plugin_manager, [change])
        self._after_change([change.job])
        return change.job

    def requeue(self, job_id: str) -> Job:
        """Run a waiting job now: move a Scheduled or AwaitingRetry job to Enqueued.

        Hangfire's dashboard calls this "Requeue"; the job keeps its retry count, and the
        scheduler no longer waits for its due time.

        Returns:
            The job, Enqueued in its queue.

        Raises:
            JobNotFound: No such job.
            InvalidTransition: It is not Scheduled or AwaitingRetry.
        """
        now = utcnow()
        job = self.storage.get(job_id)
        queue = job.queue if job is not None else "default"
        change = self.storage.change_state(
            job_id, Enqueued(enqueued_at=now, queue=queue, reason="requeued by hand"),
            expected=("Scheduled", "AwaitingRetry"),
        )
        notify_state_changed(self.plugin_manager, [change])
        self._after_change([change.job])
        return change.job

    def delete(self, job_id: str, *, reason: str | None = None,
               ttl: timedelta | None = timedelta(hours=24)) -> Job:
        """Move a job to Deleted (kept for ``ttl``, then removed by cleanup).

        A Processing job's worker loses its claim: its outcome will be discarded.

        Raises:
            JobNotFound: No such job.
            InvalidTransition: It is Deleted already.
        """
        now = utcnow()
        change = self.storage.change_state(
            job_id, Deleted(deleted_at=now, reason=reason),
            expires_at=now + ttl if ttl is not None else None,
        )
        notify_state_changed(self.plugin_manager, [change])
        return change.job

    # --- recurring jobs ------------------------------------------------------------------

    def schedule_recurring(
        self,
        template_id: str,
        cron: str,
        method: str | JobFunction[Any, Any],
        *,
        args: Sequence[Any] = (),
        kwargs: Mapping[str, Any] | None = None,
        queue: str | None = None,
        priority: int | None = None,
        timezone: str = "UTC",
        enabled: bool = True,
        misfire: str = "fire_once",
        storage: Storage | None = None,
    ) -> RecurringJob:
        """Register (or replace) a recurring job template (qml-rs ``schedule_recurring``).

        Re-registering a template with the same cron and time zone keeps its schedule
        (so every server may register its templates at start); a changed cron or zone
        starts a new schedule from now.

        Args:
            template_id: Unique id of the template.
            cron: 5 fields (minute-first) or 6 fields (seconds-first); see
                `qmlkit.recurring`.
            method: A job name or a registered job function.
            args: Arguments of every materialised job (JSON).
            kwargs: Keyword arguments of every materialised job (JSON).
            queue: Queue; default the job's registered queue.
            priority: Priority; default the job's registered priority.
            timezone: IANA zone the cron is read in.
            enabled: Whether ticks are materialised.
            misfire: ``"fire_once"`` or ``"skip"``.
            storage: The storage to use (default the app's).

        Returns:
            The stored template, ``next_run_at`` set.

        Raises:
            InvalidCron: The expression is refused (the field is named).
            ConfigurationError: An unknown time zone or another bad option.
            PayloadError: ``args``/``kwargs`` are not JSON.
        """
        name = method if isinstance(method, str) else method.name
        entry = self.registry.get(name)
        opts = entry.options if entry is not None else JobOptions()
        store = storage or self.storage
        encode_payload(list(args), dict(kwargs or {}))
        try:
            template = RecurringJob(
                id=template_id, cron=cron, method=name, args=list(args), kwargs=dict(kwargs or {}),
                queue=queue or opts.queue, priority=opts.priority if priority is None else priority,
                timezone=timezone, enabled=enabled, misfire=misfire,
            )
        except ValueError as exc:
            if isinstance(exc.__cause__, QmlError):
                raise exc.__cause__ from None
            raise ConfigurationError(f"recurring job {template_id!r}: {exc}") from exc
        existing = store.get_recurring(template_id)
        keep = (existing is not None and existing.cron == template.cron
                and existing.timezone == template.timezone)
        # Keeping the schedule happens in storage, atomically: servers may be advancing
        # next_run_at right now, and a stale copy written back would repeat a tick.
        store.upsert_recurring(template, keep_schedule=keep)
        if keep:
            template = store.get_recurring(template_id) or template
        for server in list(self._servers):
            server.nudge_recurring()
        if self.wakeup_url:
            self._wakeup_publisher().publish([RECURRING])
        return template

    def remove_recurring(self, template_id: str, *, storage: Storage | None = None) -> bool:
        """Remove a template; return whether it existed. Jobs already made are kept."""
        return (storage or self.storage).remove_recurring(template_id)

    def list_recurring(self, *, storage: Storage | None = None) -> list[RecurringJob]:
        """Return every recurring template, ordered by id."""
        return (storage or self.storage).list_recurring()

    def trigger_recurring(self, template_id: str, *, storage: Storage | None = None) -> str:
        """Enqueue one job from a template now, leaving its schedule as it is.

        Returns:
            The new job's id.

        Raises:
            JobNotFound: No template with that id (the error names the id).
        """
        store = storage or self.storage
        template = store.get_recurring(template_id)
        if template is None:
            raise JobNotFound(template_id)
        job = self.make_job(template.method, args=template.args, kwargs=template.kwargs,
                            queue=template.queue, priority=template.priority,
                            metadata={"recurring_id": template.id, "triggered": True})
        ids = self.enqueue_jobs([job], storage=store)
        if not ids:
            raise MiddlewareError(", ".join(describe(m) for m in self._enqueue_chain()),
                                  "stored nothing for this trigger")
        return ids[0]

    def tick_job(self, template: RecurringJob, tick: datetime) -> Job | None:
        """Build the job that materialises ``tick`` of ``template`` (id derived from both).

        The enqueue middleware sees it as it sees every enqueue (it may stamp metadata);
        its ``call_next`` returns the id at once, and the server stores the job with the
        template's atomic advance. ``None`` if a middleware dropped it: the tick is
        skipped.
        """
        job = self.make_job(template.method, args=template.args, kwargs=template.kwargs,
                            queue=template.queue, priority=template.priority,
                            metadata={"recurring_id": template.id, "tick": tick.isoformat()},
                            job_id=template.tick_job_id(tick))
        chain = self._enqueue_chain()
        if not chain:
            return job
        final: list[Job] = []

        def capture(jobs: list[Job]) -> list[str]:
            final[:] = jobs
            return [j.id for j in jobs]

        compose_enqueue(chain, [job], capture)
        return final[0] if final else None

    # --- servers ---------------------------------------------------------------------------

    def server(self, config: Any = None, **fields: Any) -> Server:
        """Build a server for this app through the plugins; see ``Server.from_plugins``.

        Args:
            config: A ``ServerConfig`` or mapping; ``fields`` override its fields.
            **fields: ``ServerConfig`` fields, e.g. ``worker_count=8``.

        Raises:
            ConfigurationError: A bad field (named).
        """
        from qmlkit.processing.server import Server, ServerConfig

        base: dict[str, Any] = {}
        if isinstance(config, ServerConfig):
            base = config.model_dump(exclude_unset=True)
        elif config is not None:
            base = dict(config)
        base.update(fields)
        storage: str | Storage = self._storage_spec
        if "storage_url" in base:
            storage = base["storage_url"]
        elif isinstance(storage, str):
            storage = self.storage  # share the app's opened storage
        elif not isinstance(storage, Storage):
            raise ConfigurationError(f"unusable storage {storage!r}")
        if self.wakeup_url and "wakeup_url" not in base:
            base["wakeup_url"] = self.wakeup_url
        base.setdefault("wakeup_exchange", self.wakeup_exchange)  # whatever the URL's source
        if isinstance(self._storage_spec, str) and "storage_url" not in base:
            base["storage_url"] = self._storage_spec
            base.setdefault("storage_options", self.storage_options)
        try:
            cfg = ServerConfig(**base)
        except ValueError as exc:
            raise ConfigurationError(f"invalid server configuration: {exc}") from exc
        return Server.from_plugins(app=self, storage=storage, config=cfg,
                                   plugin_manager=self.plugin_manager)

    def _attach(self, server: Server) -> None:
        self._servers.add(server)

    def _detach(self, server: Server) -> None:
        self._servers.discard(server)

    def __iter__(self) -> Iterator[str]:
        """Iterate over the registered job names."""
        return iter(self.registry)

    def __repr__(self) -> str:
        """Name and storage."""
        return f"App({self.name!r}, storage={self._storage_spec!r})"


class _AfterCommit:
    """Announces transactionally enqueued jobs once a ``Connection``'s commit is visible.

    SQLAlchemy tells a ``Connection``'s listeners about a commit just before it happens;
    this thread polls for the jobs (every 2 ms, for up to 5 s) and announces them when
    they appear. Jobs that never appear were rolled back and are dropped.
    """

    def __init__(self, app: App) -> None:
        import queue

        self._app = weakref.ref(app)
        self._queue: queue.SimpleQueue[list[Job]] = queue.SimpleQueue()
        threading.Thread(target=self._run, name="qmlkit-after-commit", daemon=True).start()

    def put(self, jobs: list[Job]) -> None:
        self._queue.put(jobs)

    def _run(self) -> None:
        import time

        while True:
            jobs = self._queue.get()
            app = self._app()
            if app is None:
                return
            deadline = time.monotonic() + 5.0
            try:
                while not app._announce_existing(jobs) and time.monotonic() < deadline:
                    time.sleep(0.002)
            except Exception:  # an announcement is best effort; workers also poll
                import logging

                logging.getLogger(__name__).exception("announcing committed jobs failed")
            del app


#: Jobs enqueued through a caller's Connection or Session, awaiting its commit.
_PENDING: weakref.WeakKeyDictionary[Any, list[tuple[App, list[Job]]]] = weakref.WeakKeyDictionary()

#: The (app, connection) of the innermost `App.transaction` block, if any.
_TRANSACTION: ContextVar[tuple[App, Any] | None] = ContextVar("qmlkit_transaction", default=None)


def _run_at(now: datetime, at: datetime | None, delay: timedelta | float | None) -> datetime | None:
    return limits.run_at(now, at, delay)

