"""One child of the process pool: a server of its own, reporting attempts to its parent.

A child imports the app by its ``module:attribute`` path (never a copy of the parent's
objects: children start by ``forkserver`` or ``spawn``), then builds and starts an
ordinary server with ``app.server(...)`` running the child pool (threads or asyncio).
It opens its own storage, wake-up listener and publisher after it started, so nothing
is shared with the parent or a sibling.

It tells the parent, over a one-way pipe (`multiprocessing.connection.Connection`), when
each attempt begins (job id, fencing token, timeout, start time on the shared monotonic
clock) and ends: that is all the parent needs to enforce hard timeouts and to settle
the attempts of a child that died. The parent steers it over a second pipe:
``("drain", grace_s)`` (stop gracefully within ``grace_s`` seconds), ``"abort"``
(release everything now), ``"wake"`` (poll now). End of file on that pipe means the
parent died: the child drains and exits.

Signals: SIGINT is ignored (Ctrl-C reaches the whole process group; the parent decides),
SIGTERM keeps the default action (the process ends at once, even inside a C call), so
the parent's SIGTERM is a kill and its drain is a message.
"""

from __future__ import annotations

import importlib
import logging
import os
import signal
import sys
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from multiprocessing.connection import Connection
from typing import Any

from qmlkit.config import LOG_FORMAT, log_stream
from qmlkit.gcpause import freeze_startup_heap
from qmlkit.hookspecs import hookimpl
from qmlkit.job import Job
from qmlkit.processing.config import ServerConfig
from qmlkit.processing.context import JobContext

__all__ = ["ChildSpec", "Reporter", "child_main", "import_app", "rss_mib"]

log = logging.getLogger("qmlkit.processing.pools")

#: How often the child's main thread looks at its control pipe and recycle flag, seconds.
CONTROL_POLL_S = 0.2
#: The same while its server starts (short: the wait is added to every child's start).
START_POLL_S = 0.02


@dataclass(frozen=True)
class ChildSpec:
    """What a child needs to become a server (pickled to it at start).

    Attributes:
        app_spec: ``module:attribute`` of the app.
        config: The child server's configuration (``pool`` is the child pool, the
            ``server_name`` unique to this child).
        slot: The child's slot number in the pool, 0 to ``processes - 1``.
        log_level: The parent's root log level, so the child logs alike.
    """

    app_spec: str
    config: ServerConfig
    slot: int
    log_level: int


def import_app(spec: str) -> Any:
    """Import ``module:attribute`` and return the object it names.

    Raises:
        ImportError: The module cannot be imported.
        AttributeError: The module has no such attribute.
    """
    module_name, _, attr = spec.partition(":")
    target: Any = importlib.import_module(module_name)
    for part in attr.split("."):
        target = getattr(target, part)
    return target


def rss_mib() -> float:
    """This process's resident memory now, in MiB (Linux ``/proc``; elsewhere the peak
    from ``getrusage``, as Celery's ``--max-memory-per-child`` reads it)."""
    try:
        with open("/proc/self/statm", encoding="ascii") as fh:
            pages = int(fh.read().split()[1])
        return pages * os.sysconf("SC_PAGE_SIZE") / (1024 * 1024)
    except (OSError, ValueError, IndexError):
        import resource

        peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
        return peak / (1024 * 1024) if sys.platform == "darwin" else peak / 1024


class Reporter:
    """Middleware (outermost) that reports each attempt's begin and end to the parent,
    and asks for a recycle once ``max_jobs_per_child`` or ``max_memory_per_child`` is
    reached.

    Args:
        send: Sends one message to the parent (thread-safe; never raises).
        config: The child server's configuration (timeouts and recycle limits).
        recycle: Called once, with the reason, when a limit is reached.
    """

    def __init__(self, send: Callable[[tuple[Any, ...]], None], config: ServerConfig,
                 recycle: Callable[[str], None]) -> None:
        self.send = send
        self.default_timeout = (config.job_timeout.total_seconds()
                                if config.job_timeout is not None else None)
        self.max_jobs = config.max_jobs_per_child
        self.max_mib = config.max_memory_per_child
        self.recycle = recycle
        self.done = 0
        self._lock = threading.Lock()

    @hookimpl(tryfirst=True)
    def qmlkit_middleware(self, config: dict[str, Any]) -> list[Any]:
        """This reporter, first (outermost) in the chain."""
        return [self]

    def __call__(self, job: Job, context: JobContext, call_next: Callable[[], Any]) -> Any:
        """Report ``("begin", id, token, timeout_s, started)`` and ``("end", id, token)``
        around the attempt; ``started`` is ``time.monotonic()`` (shared by every process
        of the machine on Linux)."""
        timeout = job.timeout_s if job.timeout_s is not None else self.default_timeout
        self.send(("begin", job.id, job.attempts, timeout, time.monotonic()))
        try:
            return call_next()
        finally:
            self.send(("end", job.id, job.attempts))
            self._count()

    def _count(self) -> None:
        with self._lock:
            self.done += 1
            done = self.done
        if self.max_jobs is not None and done >= self.max_jobs:
            self.recycle(f"max_jobs_per_child={self.max_jobs} reached")
        elif self.max_mib is not None and (mib := rss_mib()) > self.max_mib:
            self.recycle(f"resident memory {mib:.0f} MiB over max_memory_per_child="
                         f"{self.max_mib}")


class _Outbox:
    """The child's end of the report pipe, shared by every worker thread."""

    def __init__(self, conn: Connection) -> None:
        self.conn = conn
        self.lock = threading.Lock()
        self.gone = False

    def send(self, message: tuple[Any, ...]) -> None:
        with self.lock:
            if self.gone:
                return
            try:
                self.conn.send(message)
            except (OSError, EOFError):  # the parent died: the control pipe says so too
                self.gone = True


def _setup(spec: ChildSpec) -> None:
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, signal.SIG_DFL)
    if not logging.getLogger().handlers:
        logging.basicConfig(level=spec.log_level, stream=log_stream(),
                            format=LOG_FORMAT.format(where=f"child-{spec.slot} "))


def child_main(spec: ChildSpec, reports: Connection, control: Connection) -> None:
    """A child process's target: run a server until the parent says stop (or dies).

    Args:
        spec: What to run.
        reports: Write end of the child -> parent pipe.
        control: Read end of the parent -> child pipe.
    """
    _setup(spec)
    outbox = _Outbox(reports)
    recycle_reason: list[str] = []
    recycle = threading.Event()

    servers: list[Any] = []

    def ask_recycle(reason: str) -> None:
        if not recycle.is_set():
            recycle_reason.append(reason)
            recycle.set()
            if servers:  # claim nothing more from now on; the main thread stops it
                servers[0].stopping.set()

    app = import_app(spec.app_spec)
    reporter = Reporter(outbox.send, spec.config, ask_recycle)
    app.plugin_manager.register(reporter, name="qmlkit:process-pool-reporter")
    fields = spec.config.model_dump()
    server = app.server(**fields)
    servers.append(server)
    freeze_startup_heap()
    pending: list[Any] = []  # what the parent said while the server was starting
    if not _start(server, control, pending):
        # Told to stop while its storage was still unreachable: nothing was claimed, so
        # nothing is left to settle; "aborted", so the worker exits 1 as one pool does.
        outbox.send(("bye", True))
        logging.shutdown()
        os._exit(0)
    outbox.send(("ready", server.server_id, os.getpid()))
    _serve(server, control, outbox, recycle, recycle_reason, pending)
    outbox.send(("bye", bool(server.aborted)))
    logging.shutdown()
    os._exit(0)  # threads a release left running must not keep the process alive


def _start(server: Any, control: Connection, pending: list[Any]) -> bool:
    """``server.start()``, given up (`Server.cancel_start`) if the parent says anything
    but ``"wake"`` meanwhile (a drain, an abort, or end of file: a storage that is
    unreachable must not keep a stopping pool waiting for ``connect_timeout``). What the
    parent said is left in ``pending`` for `_serve`. Returns whether the server runs."""
    from qmlkit.errors import StorageUnavailable

    started = threading.Event()

    def listen() -> None:  # the only reader of ``control`` until the server has started
        while not started.is_set():
            try:
                if not control.poll(START_POLL_S):
                    continue
                message = control.recv()
            except (EOFError, OSError):
                message = None  # the parent is gone
            if message != "wake":
                pending.append(message)
                server.cancel_start()
                return

    listener = threading.Thread(target=listen, name="qmlkit-child-start", daemon=True)
    listener.start()
    try:
        server.start()
    except StorageUnavailable as exc:
        if not pending:
            raise  # unreachable past connect_timeout: the child fails, and is replaced
        log.warning("stopping before the storage was reached: %s", exc)
        return False
    finally:
        started.set()
        listener.join()
    return True


def _serve(server: Any, control: Connection, outbox: _Outbox, recycle: threading.Event,
           recycle_reason: list[str], pending: list[Any]) -> None:
    """Follow the parent's messages (``pending`` ones first) until one ends the server;
    then stop it."""
    while True:
        if recycle.is_set():
            log.info("recycling this child: %s", recycle_reason[0])
            outbox.send(("retiring", recycle_reason[0]))
            server.stop()
            return
        try:
            if pending:
                message = pending.pop(0)
                if message is None:
                    raise EOFError
            elif not control.poll(CONTROL_POLL_S):
                continue
            else:
                message = control.recv()
        except (EOFError, OSError):
            log.warning("the supervisor process is gone; draining this child")
            server.stop()
            return
        if message == "wake":
            server.wake()
        elif message == "drain":
            server.stop()
            return
        elif isinstance(message, tuple) and message[0] == "drain":
            server.stop(message[1])  # the supervisor's grace period, seconds
            return
        elif message == "abort":
            server.abort()
            server.stop()
            return
