"""``ProcessPool``: a supervising parent over child processes that are servers of their own.

The design (docs/pools.md, "The process pool"): each child is an ordinary qmlkit server
(its own server id ``<name>:proc<slot>-<nonce>#<uuid>``, heartbeats, registry row,
dead-peer reclaim) running the thread or asyncio pool with ``worker_count`` slots, as
Dramatiq's processes x threads. The parent is a supervisor and never runs a job: it
starts the children (``forkserver`` on Linux, else ``spawn``; never a plain ``fork``),
opens its own storage only after they started, and watches them
(`qmlkit.processing.pools.supervisor`). It enforces hard timeouts by killing the child
(Celery's hard time limit, RQ's job timeout), stores what a dead child left behind
(`qmlkit.processing.pools.settle`), and starts a replacement at once.

Lifecycle as `qmlkit.processing.server.Server`'s, so the CLI runs either alike:
``start()``, ``stop()`` (every child drains within ``shutdown_timeout``), ``abort()``
(children release what they hold at once), ``aborted``, ``is_running``.
"""

from __future__ import annotations

import logging
import multiprocessing
import os
import queue
import signal
import sys
import threading
import time
import uuid
from datetime import timedelta
from typing import Any, Literal

from qmlkit.backoff import Backoff
from qmlkit.errors import ConfigurationError, QmlError
from qmlkit.plugins import notify_state_changed, resolve_storage
from qmlkit.processing.config import ServerConfig
from qmlkit.processing.connect import open_storage
from qmlkit.processing.outcome import store_outcomes
from qmlkit.processing.pools.children import ChildSpec, child_main, import_app
from qmlkit.processing.pools.settle import Ending, settle
from qmlkit.processing.pools.supervisor import ChildHandle, Watcher, hard_timeout_margin, watch
from qmlkit.storage.base import StateChange, Storage, Transition

__all__ = ["ProcessPool", "find_app_spec"]

log = logging.getLogger("qmlkit.processing.pools")

#: After ``shutdown_timeout``, how long children get to finish their own abort, seconds.
CHILD_EXIT_MARGIN_S = 5.0
#: How long ``abort()`` waits for children to release and exit before SIGKILL, seconds.
ABORT_WAIT_S = 3.0
#: In ``stop()``, after the children were told to go, how long to wait for the last
#: ones to be reaped, seconds.
KILL_WAIT_S = 5.0
#: Restart delay of a slot whose children die before they are ready: first, cap (s).
RESTART_INITIAL_S, RESTART_CAP_S = 0.5, 10.0


def find_app_spec(app: object) -> str:
    """The ``module:attribute`` path under which ``app`` is importable.

    Looks through ``sys.modules`` for a module-level attribute that *is* ``app``
    (``__main__`` works too: ``spawn`` and ``forkserver`` import it as ``__mp_main__``,
    so the script must guard its start with ``if __name__ == "__main__"``).

    Raises:
        ConfigurationError: No module holds it; pass ``app_spec`` explicitly.
    """
    for name, module in list(sys.modules.items()):
        if module is None or name == "__mp_main__":
            continue
        for attr, value in list(getattr(module, "__dict__", {}).items()):
            if value is app and not attr.startswith("_"):
                return f"{name}:{attr}"
    raise ConfigurationError(
        "pool='processes': the app is not a module-level attribute of any imported "
        "module, so child processes cannot import it; set app_spec='module:attribute'")


def _check(app: object, config: ServerConfig) -> str:
    """Refuse what cannot work across processes; return the app's import path."""
    scheme = config.storage_url.partition("://")[0]
    if scheme == "memory":
        raise ConfigurationError(
            "storage_url: pool='processes' needs a storage every process can reach; "
            "memory:// lives in one process (use sqlite:///file.db, Redis or PostgreSQL)")
    spec = config.app_spec or find_app_spec(app)
    try:
        found = import_app(spec)
    except (ImportError, AttributeError) as exc:
        raise ConfigurationError(f"app_spec: cannot import {spec!r}: {exc}") from exc
    if found is not app and not hasattr(found, "server"):
        raise ConfigurationError(f"app_spec: {spec!r} is a {type(found).__name__}, not an App")
    return spec


class ProcessPool:
    """A supervisor over ``processes`` child servers (see the module docstring).

    Build it with ``App.server(pool="processes", ...)``.

    Args:
        app: The app (its registry gives the retry policies of dead children's jobs).
        config: The pool's configuration (``pool == "processes"``).
        plugin_manager: The app's plugin manager (storage resolution, observers).

    Raises:
        ConfigurationError: A storage only one process can see, or an app the
            children cannot import.
    """

    def __init__(self, app: Any, config: ServerConfig, *, plugin_manager: Any) -> None:
        self.app = app
        self.config = config
        self.pm = plugin_manager
        self.app_spec = _check(app, config)
        self.size = config.processes or os.cpu_count() or 1
        method: Literal["forkserver", "spawn"] = config.start_method or (
            "forkserver" if sys.platform == "linux" else "spawn")
        # Spelled out so the context's type has ``Process`` (get_context(str) has none).
        self._ctx = (multiprocessing.get_context("forkserver") if method == "forkserver"
                     else multiprocessing.get_context("spawn"))
        # Built (a bad URL or option fails now) but not opened: no connection exists
        # in this process until the children have started.
        self._store_obj: Storage = resolve_storage(plugin_manager, config.storage_url,
                                                   config.storage_options)
        if method == "forkserver":  # children fork from a server that imported these
            self._ctx.set_forkserver_preload([
                "qmlkit.processing.pools.children", "qmlkit.processing.server",
                type(self._store_obj).__module__, self.app_spec.partition(":")[0]])
        self.storage: Storage | None = None
        self.stats = {"started": 0, "replaced": 0, "timed_out": 0, "lost": 0, "released": 0}
        self._children: list[ChildHandle] = []
        self._lock = threading.Lock()
        self._slots: list[ChildHandle | None] = [None] * self.size
        self._restart = [Backoff(RESTART_INITIAL_S, RESTART_CAP_S) for _ in range(self.size)]
        self._not_before = [0.0] * self.size
        self._stopping = threading.Event()
        self._closed = threading.Event()
        self._hard_stop = threading.Event()
        self._endings: queue.Queue[Ending | None] = queue.Queue()
        self._threads: list[threading.Thread] = []
        self._running = False
        self._aborted = False
        self._state = threading.Lock()
        self._gone: list[ChildHandle] = []  # children that exited (their bye says aborted)

    @classmethod
    def for_app(cls, app: Any, fields: dict[str, Any]) -> ProcessPool:
        """The pool ``App.server(pool="processes", **fields)`` returns, built without
        opening any storage in this process.

        Args:
            app: The app (``storage_spec``, ``storage_options``, ``notifier`` (its
                wake-up settings), ``plugin_manager``, ``registry``).
            fields: ``ServerConfig`` fields; the app's storage URL and wake-up settings
                fill those not given.

        Raises:
            ConfigurationError: A bad field (named), or an app storage that is an object
                rather than a URL the children can open.
        """
        base = dict(fields)
        if "storage_url" not in base:
            if not isinstance(app.storage_spec, str):
                raise ConfigurationError(
                    "storage_url: pool='processes' needs a storage URL every child can "
                    f"open, not the object {app.storage_spec!r}")
            base["storage_url"] = app.storage_spec
            base.setdefault("storage_options", app.storage_options)
        base.setdefault("wakeup_url", app.notifier.url_setting)  # each child resolves "auto"
        base.setdefault("wakeup_exchange", app.notifier.exchange_setting)
        try:
            config = ServerConfig(**base)
        except ValueError as exc:
            raise ConfigurationError(f"invalid server configuration: {exc}") from exc
        return cls(app, config, plugin_manager=app.plugin_manager)

    # --- lifecycle --------------------------------------------------------------------

    @property
    def is_running(self) -> bool:
        """Whether ``start()`` has run and ``stop()`` has not."""
        return self._running

    @property
    def aborted(self) -> bool:
        """Whether the last stop had to release unfinished jobs (in any child)."""
        return self._aborted

    def start(self) -> None:
        """Start the children, then open the supervisor's storage and watch them.

        Raises:
            ConfigurationError: The pool is already running.
        """
        with self._state:
            if self._running:
                raise ConfigurationError("process pool is already running")
            self._running = True
            self._stopping, self._closed = threading.Event(), threading.Event()
            self._hard_stop, self._aborted = threading.Event(), False
            self._slots = [None] * self.size
        log.info("process pool: %d child process(es) x %d %s slot(s), start method %s, "
                 "app %s", self.size, self.config.worker_count, self.config.child_pool,
                 self._ctx.get_start_method(), self.app_spec)
        self._refill()  # children first: the parent opens nothing before they exist
        watcher = Watcher(children=self._children, lock=self._lock, stopping=self._stopping,
                          closed=self._closed, refill=self._refill, ended=self._ended)
        for name, target in (("supervisor", lambda: watch(watcher)), ("settle", self._settler)):
            thread = threading.Thread(target=target, name=f"qmlkit-{name}", daemon=True)
            thread.start()
            self._threads.append(thread)

    def stop(self, timeout: timedelta | float | None = None) -> None:
        """Drain every child: they claim nothing more and finish what runs (each aborts
        and releases at ``shutdown_timeout``); children still alive
        `CHILD_EXIT_MARGIN_S` later are aborted. Idempotent.

        Args:
            timeout: The children's grace period; ``config.shutdown_timeout`` if ``None``.
        """
        with self._state:
            if not self._running:
                return
            self._running = False
        grace = timeout if timeout is not None else self.config.shutdown_timeout
        grace_s = grace.total_seconds() if isinstance(grace, timedelta) else float(grace)
        log.info("process pool stopping: draining %d child(ren), up to %.1f s",
                 len(self.children()), grace_s)
        self._stopping.set()
        for child in self._live():
            child.tell(("drain", grace_s))
        deadline = time.monotonic() + grace_s + CHILD_EXIT_MARGIN_S
        while self._live() and not self._hard_stop.is_set() and time.monotonic() < deadline:
            time.sleep(0.05)
        if self._live():
            self.abort()
        self._finish()

    def abort(self) -> None:
        """Make every child release what it holds and exit now; SIGKILL those still
        alive after `ABORT_WAIT_S` (their jobs are released by the supervisor).
        Idempotent."""
        self._stopping.set()
        if self._hard_stop.is_set():
            return
        self._hard_stop.set()
        self._aborted = True
        for child in self._live():
            child.tell("abort")
        deadline = time.monotonic() + ABORT_WAIT_S
        while self._live() and time.monotonic() < deadline:
            time.sleep(0.05)
        for child in self._live():
            child.release_running = True
            child.kill(signal.SIGKILL, "still running after abort")

    def _finish(self) -> None:
        deadline = time.monotonic() + KILL_WAIT_S
        while self._live() and time.monotonic() < deadline:
            time.sleep(0.05)
        self._closed.set()
        self._endings.put(None)
        for thread in self._threads:
            thread.join(30.0)
        self._threads = []
        self._aborted = self._aborted or any(c.aborted for c in self._gone)
        if self.storage is not None:
            self.storage.close()
            self.storage = None
        log.info("process pool stopped")

    # --- children ---------------------------------------------------------------------

    def _live(self) -> list[ChildHandle]:
        with self._lock:
            return list(self._children)

    def children(self) -> list[dict[str, Any]]:
        """Every live child now: slot, pid, server id (``None`` until ready), running
        attempts, whether it is retiring (tests, ``qmlkit servers``)."""
        return [{"slot": c.slot, "pid": c.process.pid, "server_id": c.server_id,
                 "running": len(c.running), "retiring": c.retiring or c.killed_at is not None}
                for c in self._live()]

    def strength(self) -> int:
        """Slots whose child is ready and neither retiring nor being killed."""
        return sum(1 for c in self._live()
                   if c.ready and not c.retiring and c.killed_at is None)

    def _refill(self) -> None:
        """Start a child in every slot that is empty (or whose child is retiring)."""
        now = time.monotonic()
        for slot in range(self.size):
            current = self._slots[slot]
            if current is not None and not current.retiring and current.killed_at is None:
                continue
            if now < self._not_before[slot]:
                continue
            self._spawn(slot)

    def _spawn(self, slot: int) -> None:
        name = f"{self.config.server_name}:proc{slot}-{uuid.uuid4().hex[:6]}"
        config = self.config.model_copy(update={"pool": self.config.child_pool,
                                                "server_name": name})
        spec = ChildSpec(self.app_spec, config, slot, logging.getLogger().getEffectiveLevel())
        reports_r, reports_w = self._ctx.Pipe(duplex=False)
        control_r, control_w = self._ctx.Pipe(duplex=False)
        process = self._ctx.Process(target=child_main, args=(spec, reports_w, control_r),
                                    name=f"qmlkit-child-{slot}")
        process.start()
        reports_w.close()
        control_r.close()
        child = ChildHandle(slot=slot, server_name=name, process=process, reports=reports_r,
                            control=control_w,
                            margin_s=hard_timeout_margin(self.config.child_pool,
                                                         self.config.worker_count))
        with self._lock:
            self._children.append(child)
        replaced = self._slots[slot] is not None
        self._slots[slot] = child
        self.stats["started"] += 1
        if replaced:
            self.stats["replaced"] += 1
        log.info("started child %s (pid %s) in slot %d", name, process.pid, slot)

    def _ended(self, child: ChildHandle) -> None:
        """A child exited (called on the supervisor thread)."""
        child.process.join(0)
        self._gone.append(child)
        if self._slots[child.slot] is child:
            self._slots[child.slot] = None
            if not child.ready:  # died while starting: do not restart in a tight loop
                self._not_before[child.slot] = (
                    time.monotonic() + self._restart[child.slot].jittered(
                        self._restart[child.slot].next()))
            else:
                self._restart[child.slot].reset()
        if child.said_bye and not child.overran:
            log.info("child %s (pid %s) exited after a clean stop", child.server_name,
                     child.process.pid)
            return
        ending = child.ending(stopping=self._stopping.is_set())
        log.warning("child %s (pid %s) ended without stopping (exit code %s) with %d "
                    "attempt(s) running; settling its jobs", child.server_name,
                    child.process.pid, ending.exitcode, len(ending.running))
        self._endings.put(ending)

    # --- the supervisor's storage -----------------------------------------------------

    def _open(self) -> Storage:
        storage = self._store_obj
        open_storage(storage.open, timeout=max(self.config.connect_timeout, timedelta(days=1)),
                     what=repr(storage), cancelled=self._closed)  # (given up at the end)
        return storage

    def _settler(self) -> None:
        """Settle endings one by one (its own thread: storage waits never delay a kill)."""
        try:
            self.storage = self._open()
        except QmlError as exc:
            if self._closed.is_set() and self._endings.qsize() <= 1:  # (the end marker)
                log.info("process pool: stopped before its storage was reached")
            else:
                log.error("process pool: cannot open the storage (%s); dead children's "
                          "jobs are left to heartbeat reclaim", exc)
            return
        while True:
            ending = self._endings.get()
            if ending is None:
                return
            try:
                counts = settle(self.storage, ending, registry=self.app.registry,
                                config=self.config, store=self._store)
            except Exception:  # the supervisor must outlive any storage failure
                log.exception("settling child %s failed; heartbeat reclaim will take its "
                              "jobs", ending.server_name)
                continue
            log.warning("child %s settled: %d attempt(s) ended as JobTimeout, %d as "
                        "WorkerLost, %d job(s) released to their queues", ending.server_name,
                        counts["timeout"], counts["lost"], counts["released"])
            self.stats["timed_out"] += counts["timeout"]
            self.stats["lost"] += counts["lost"]
            self.stats["released"] += counts["released"]
            if counts["released"]:
                for child in self._live():
                    child.tell("wake")

    def _store(self, items: list[Transition]) -> list[StateChange] | None:
        assert self.storage is not None
        changes = store_outcomes(self.storage, items, aborting=self._closed, observed=True)
        if changes and self.pm.hook.qmlkit_job_state_changed.get_hookimpls():
            notify_state_changed(self.pm, changes)
        return changes
