"""``App``: the client API (make, enqueue, schedule, retry, delete, recurring) and ``server()``.

The registry is `qmlkit.registry`, the after-commit fan-out `qmlkit.notify`, transactional
enqueue `qmlkit.transactional`; ``qmlkit.app`` re-exports everything here.

::

    app = App("shop", storage="sqlite:///qmlkit.db")

    @app.job(queue="mail", max_retries=5)
    def send_receipt(order_id: int) -> str: ...

    handle = send_receipt.enqueue(42)          # runs on a worker; handle == the job id
    handle.result(timeout=30)                   # "sent 42", once a worker ran it
    send_receipt.schedule(42, delay=60)         # runs in a minute
    send_receipt(42)                            # runs here, now
    app.server(worker_count=8).start()          # or: qmlkit worker shop:app
"""

from __future__ import annotations

import inspect
import threading
from collections.abc import Callable, Coroutine, Iterable, Iterator, Mapping, Sequence
from contextlib import AbstractContextManager
from datetime import datetime, timedelta
from typing import TYPE_CHECKING, Any, ParamSpec, TypeVar, cast, overload

import pluggy

import qmlkit.limits as limits
from qmlkit.client_handles import HandleClient
from qmlkit.errors import ConfigurationError, MiddlewareError
from qmlkit.gcpause import inserting_with_gc_paused
from qmlkit.handle import JobHandle
from qmlkit.job import Job
from qmlkit.management import JobManagement
from qmlkit.notify import Notifier
from qmlkit.plugins import make_plugin_manager, resolve_storage
from qmlkit.processing.inline import InlineClient, InlineMode
from qmlkit.processing.middleware import EnqueueMiddleware, compose_enqueue, describe
from qmlkit.processing.retry import RetryPolicy
from qmlkit.recurring_client import RecurringClient
from qmlkit.registry import (
    AsyncJobFunction,
    ClassWorker,
    JobDecorator,
    JobFunction,
    JobOptions,
    RegisteredWorker,
    Registry,
    build_job,
)
from qmlkit.storage.base import Storage
from qmlkit.transactional import Transactional
from qmlkit.wakeup import AUTO, WakeupPublisher

if TYPE_CHECKING:
    from qmlkit.processing.pools.processes import ProcessPool
    from qmlkit.processing.server import Server

__all__ = ["DEFAULT_STORAGE_URL", "App", "ClassWorker", "JobDecorator", "JobFunction",
           "JobOptions"]

#: ``App.with_storage``: keep this app's setting.
_SAME: Any = object()

P = ParamSpec("P")
R = TypeVar("R")

#: Default storage: a SQLite file in the working directory.
DEFAULT_STORAGE_URL = "sqlite:///qmlkit.db"


class App(HandleClient, InlineClient, JobManagement, RecurringClient):
    """An application: its job names, its storage, and servers built from it.

    Args:
        name: A label for logs and the CLI.
        storage: Storage URL (default ``sqlite:///qmlkit.db``) or a ``Storage`` object.
        storage_options: Backend options for the URL.
        plugins: Extra plugin objects for this app's plugin manager.
        autoload: Load entry-point plugins.
        max_payload_bytes: Override the storage's argument size limit, in bytes.
        wakeup_url: After each commit that makes jobs runnable, a wake-up names their
            queues so idle servers (and those of `server()`) start them at once
            (`qmlkit.wakeup`). ``"auto"`` (default): the storage's own channel, if any
            (SQLite: a folder beside the file; Redis: its server; PostgreSQL: LISTEN/
            NOTIFY); a kombu URL: that broker; ``None``: no wake-ups, servers poll.
        wakeup_exchange: The fanout exchange's name (``"auto"`` appends the storage's
            scope: ``qmlkit.wakeup.<prefix or schema>``).
        inline: Run every enqueue inline, for a whole test session (see `inline`).
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
        wakeup_url: str | None = AUTO,
        wakeup_exchange: str = "qmlkit.wakeup",
        inline: bool = False,
    ) -> None:
        self.name = name
        self.registry: Registry = Registry()
        self._storage_spec = storage
        self.storage_options = dict(storage_options or {})
        if max_payload_bytes is not None:
            self.storage_options["max_payload_bytes"] = max_payload_bytes
        self._plugins = tuple(plugins)
        self._autoload = autoload
        self._pm: pluggy.PluginManager | None = None
        self._storage: Storage | None = None
        self._lock = threading.Lock()
        self._enqueue_mw: list[EnqueueMiddleware] | None = None
        self._notifier = Notifier(lambda: self._pm or self.plugin_manager, wakeup_url=wakeup_url,
                                  wakeup_exchange=wakeup_exchange, storage=lambda: self.storage)
        self._transactional = Transactional(lambda: self.storage, self._notifier)
        self._inline = InlineMode(self, enabled=inline)

    @property
    def wakeup_url(self) -> str | None:
        """The URL wake-ups go to, or ``None``; for ``"auto"``, the storage's (opened)."""
        return self._notifier.wakeup_url

    @property
    def wakeup_exchange(self) -> str:
        """The wake-up fanout exchange's name (for ``"auto"``, with the storage's scope)."""
        return self._notifier.wakeup_exchange

    @property
    def notifier(self) -> Notifier:
        """The after-commit fan-out (`qmlkit.notify`); local servers subscribe to it."""
        return self._notifier

    @property
    def storage_spec(self) -> str | Storage:
        """The storage as given: a URL, or a ``Storage`` object."""
        return self._storage_spec

    def with_storage(self, storage: str | Storage | None, *,
                     options: Mapping[str, Any] | None = None,
                     wakeup_url: str | None = _SAME, wakeup_exchange: str = _SAME) -> App:
        """A copy of this app on another storage (or the same), with the same registry.

        The copy shares this app's job registry (the same object), name, plugins and
        autoload setting, and has its own plugin manager, storage connection and wake-up
        publisher. Job functions stay bound to this app (``fn.enqueue`` writes here; use
        ``copy.enqueue(name, ...)``). The CLI's ``--storage``/``--wakeup`` use it.

        Args:
            storage: A storage URL or a ``Storage`` object (shared, not copied);
                ``None`` keeps this app's storage (URL or object).
            options: Backend options for ``storage``. ``None``: this app's options when
                ``storage`` is ``None``, else none (options belong to a URL).
            wakeup_url: Wake-up setting of the copy (a URL, ``"auto"`` or ``None``);
                default this app's setting (``"auto"`` then means the new storage's).
            wakeup_exchange: Wake-up exchange of the copy; by default this app's.

        Returns:
            The new, unopened app; its storage opens on first use.

        Raises:
            ConfigurationError: A bad wake-up URL.
        """
        if options is None:
            options = self.storage_options if storage is None else {}
        clone = App(self.name, storage=self._storage_spec if storage is None else storage,
                    storage_options=options, plugins=self._plugins, autoload=self._autoload,
                    wakeup_url=self._notifier.url_setting if wakeup_url is _SAME else wakeup_url,
                    wakeup_exchange=(self._notifier.exchange_setting
                                     if wakeup_exchange is _SAME else wakeup_exchange))
        clone.registry = self.registry
        return clone

    # --- registration ------------------------------------------------------------------

    @overload
    def job(self, fn: Callable[P, Coroutine[Any, Any, R]], /, *, name: str | None = None,
            queue: str = "default", priority: int = 0, max_retries: int | None = None,
            timeout: timedelta | float | None = None,
            retry: RetryPolicy | None = None) -> AsyncJobFunction[P, R]: ...

    @overload
    def job(self, fn: Callable[P, R], /, *, name: str | None = None,
            queue: str = "default", priority: int = 0, max_retries: int | None = None,
            timeout: timedelta | float | None = None,
            retry: RetryPolicy | None = None) -> JobFunction[P, R]: ...

    @overload
    def job(self, fn: None = None, /, *, name: str | None = None,
            queue: str = "default", priority: int = 0, max_retries: int | None = None,
            timeout: timedelta | float | None = None,
            retry: RetryPolicy | None = None) -> JobDecorator: ...

    def job(
        self,
        fn: Callable[P, Any] | None = None,
        /,
        *,
        name: str | None = None,
        queue: str = "default",
        priority: int = 0,
        max_retries: int | None = None,
        timeout: timedelta | float | None = None,
        retry: RetryPolicy | None = None,
    ) -> JobFunction[P, Any] | JobDecorator:
        """Register a job function; usable as ``@app.job`` or ``@app.job(...)``.

        Typed with ``ParamSpec`` overloads: the result is a ``JobFunction[P, R]`` whose
        ``enqueue`` takes the function's own parameters and returns a
        ``JobHandle[R]``; for an ``async def`` function it is an `AsyncJobFunction`
        and ``R`` is the awaited type.

        Args:
            fn: The function (``def`` or ``async def``); its arguments must be JSON.
            name: The stored job name; default ``"module.qualname"``.
            queue: Default queue.
            priority: Default priority (higher first).
            max_retries: Retries after a failed attempt; default the policy's (3).
            timeout: Per-attempt limit, seconds or ``timedelta``; default the server's.
            retry: Retry policy for this job name.

        Returns:
            A `JobFunction` (or a `JobDecorator` making one).

        Raises:
            ConfigurationError: The name is taken, or an option is invalid.
        """
        options = JobOptions(queue=queue, priority=priority, max_retries=max_retries,
                             timeout=timeout, retry=retry)

        def register(f: Callable[P, Any]) -> JobFunction[P, Any]:
            job_name = name or f"{f.__module__}.{f.__qualname__}"
            kind = AsyncJobFunction if inspect.iscoroutinefunction(f) else JobFunction
            self._register(limits.check_name(job_name, "job name"),
                           kind(self, f, job_name, options))
            # The entry kept for ``f``: this one, or the same function's earlier one.
            return cast("JobFunction[P, Any]", self.registry[job_name])

        # The overloads above give each call its precise type; this body serves them all.
        return register(fn) if fn is not None else register  # type: ignore[return-value]

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
            raise ConfigurationError(
                "a class-based worker needs a method_name and execute(job, context)")
        options = JobOptions(queue=queue, priority=priority, max_retries=max_retries,
                             timeout=timeout, retry=retry)
        self._register(name, RegisteredWorker(worker, options))

    def _register(self, name: str, entry: JobFunction[Any, Any] | RegisteredWorker) -> None:
        self.registry.register(name, entry)

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
        """Close the storage (it reopens on next use), the wake-up publisher, the
        async-enqueue threads (after their current calls) and inline mode's runners."""
        self.shutdown_enqueue_threads()
        self._inline.close()
        with self._lock:
            self._notifier.close()
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
        return build_job(self.registry, method, args=args, kwargs=kwargs, queue=queue,
                         priority=priority, at=at, delay=delay, metadata=metadata,
                         job_id=job_id, max_retries=max_retries, timeout=timeout)

    def enqueue(self, method: str, **options: Any) -> JobHandle[Any]:
        """Store one job for ``method``; return its `qmlkit.handle.JobHandle` (a ``str``
        subclass: the id). Options as `make_job`. `enqueue_async` is the awaited form.

        Raises:
            PayloadError: Arguments not JSON (the message names the argument) or too
                large; nothing stored.
            DuplicateJob: ``job_id`` given and taken.
            StorageError: The storage failed; nothing stored.
        """
        ids = self.enqueue_jobs([build_job(self.registry, method, **options)])  # = make_job
        if not ids:
            raise MiddlewareError(
                ", ".join(describe(m) for m in self._enqueue_chain()),
                "stored nothing for this enqueue: an enqueue middleware must call "
                "call_next(jobs), or raise to refuse the job")
        return self.handles(ids)[0]

    def transaction(self, connection: Any) -> AbstractContextManager[None]:
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
                caller's transaction: it must be a
                `qmlkit.storage.capabilities.TransactionalStorage` with
                ``supports_transactional_enqueue = True``, as qmlkit-postgres is.
        """
        return self._transactional.block(connection)

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
        connection = self._transactional.connection()
        insert = inserting_with_gc_paused(store.enqueue_many if connection is None else
                                          Transactional.insert_through(store, connection), jobs)
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
            self._transactional.announce_after_commit(connection, stored)
        else:
            self._notifier.announce(stored)
            if self._inline.active:
                self._inline.run(stored)
        return [j.id for j in stored]

    @property
    def _publisher(self) -> WakeupPublisher | None:
        """This process's wake-up publisher, once one was needed (tests)."""
        return self._notifier.publisher

    def _enqueue_chain(self) -> list[EnqueueMiddleware]:
        """The enqueue middleware from ``qmlkit_enqueue_middleware``, built on first use."""
        if self._enqueue_mw is None:
            chain: list[EnqueueMiddleware] = []
            config = {"name": self.name, "storage": str(self._storage_spec)}
            for provided in self.plugin_manager.hook.qmlkit_enqueue_middleware(config=config):
                chain.extend(provided or ())
            self._enqueue_mw = chain
        return self._enqueue_mw

    # --- servers ---------------------------------------------------------------------------

    def server(self, config: Any = None, **fields: Any) -> Server | ProcessPool:
        """Build a server for this app through the plugins; see ``Server.from_plugins``.

        Args:
            config: A ``ServerConfig`` or mapping; ``fields`` override its fields.
            **fields: ``ServerConfig`` fields, e.g. ``worker_count=8``.

        Returns:
            An unstarted `Server`, or a ``ProcessPool`` supervisor for ``pool="processes"``.

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
        if base.get("pool") == "processes":  # a supervisor; this process opens nothing
            from qmlkit.processing.pools.processes import ProcessPool

            return ProcessPool.for_app(self, base)
        storage: str | Storage = self._storage_spec
        if "storage_url" in base:
            storage = base["storage_url"]
        elif isinstance(storage, str):
            storage = self.storage  # share the app's opened storage
        elif not isinstance(storage, Storage):
            raise ConfigurationError(f"unusable storage {storage!r}")
        base.setdefault("wakeup_url", self._notifier.url_setting)  # "auto": the server's storage
        base.setdefault("wakeup_exchange", self._notifier.exchange_setting)
        if isinstance(self._storage_spec, str) and "storage_url" not in base:
            base["storage_url"] = self._storage_spec
            base.setdefault("storage_options", self.storage_options)
        try:
            cfg = ServerConfig(**base)
        except ValueError as exc:
            raise ConfigurationError(f"invalid server configuration: {exc}") from exc
        return Server.from_plugins(app=self, storage=storage, config=cfg,
                                   plugin_manager=self.plugin_manager)

    def __iter__(self) -> Iterator[str]:
        """Iterate over the registered job names."""
        return iter(self.registry)

    def __repr__(self) -> str:
        """Name and storage."""
        return f"App({self.name!r}, storage={self._storage_spec!r})"
