"""``qmlkit worker``: run a server for an app until SIGINT or SIGTERM.

The worker's flags come from one table, `FLAGS`: each row names a `ServerConfig` field,
its flag, its environment variable, the click type of the flag's value and how that
value becomes the field's. A flag that is not given leaves the field to the app and
`ServerConfig` (so ``--help`` shows `ServerConfig`'s own defaults); to expose another
field, add a row.
"""

from __future__ import annotations

import contextlib
import logging
import os
import signal
import sys
import threading
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from datetime import timedelta
from types import FrameType
from typing import TYPE_CHECKING, Any, NoReturn

import click

from qmlkit.cli.apploading import load_app, wakeup_exchange_option
from qmlkit.errors import QmlError
from qmlkit.gcpause import freeze_startup_heap
from qmlkit.processing.config import ServerConfig
from qmlkit.wakeup import wakeup_setting

if TYPE_CHECKING:  # the process pool loads only when ``--pool processes`` asks for it
    from qmlkit.processing.pools.processes import ProcessPool
    from qmlkit.processing.server import Server

log = logging.getLogger("qmlkit.cli")

#: The click type of every flag given in seconds.
SECONDS = click.FloatRange(0.001)


def seconds(value: float) -> timedelta:
    """A flag's seconds as the field's ``timedelta``."""
    return timedelta(seconds=value)


def queue_list(value: str) -> tuple[str, ...]:
    """``"a, b"`` as ``("a", "b")``; ``"*"`` as ``()`` (every queue)."""
    if value.strip() == "*":
        return ()
    queues = tuple(q.strip() for q in value.split(",") if q.strip())
    if not queues:
        raise click.BadParameter(f"{value!r} names no queue; give queue names, or '*' for "
                                 "every queue", param_hint="'--queues'")
    return queues


def same(value: Any) -> Any:
    """A flag's value used as the field's unchanged."""
    return value


@dataclass(frozen=True)
class Flag:
    """One row of `FLAGS`: a `ServerConfig` field exposed as a ``qmlkit worker`` flag.

    Attributes:
        field: The `ServerConfig` field.
        flag: The option's declaration, e.g. ``"--threads"`` or ``"--heartbeat/--no-heartbeat"``.
        env: The environment variable that may give it instead.
        type: The click type of the flag's value (``bool`` for an on/off pair).
        convert: The flag's value → the field's value.
        help: What it does; the environment variable and default are appended.
        default_text: The default shown on ``--help``; ``None`` derives it from the field.
        metavar: The value's name on ``--help``; ``None``: click's.
        aliases: More declarations of the same option (e.g. ``("-c", "--threads")``),
            kept so that older scripts work.
        env_aliases: More environment variables, read when ``env`` is not set.
    """

    field: str
    flag: str
    env: str
    type: Any
    convert: Callable[[Any], Any]
    help: str
    default_text: str | None = None
    metavar: str | None = None
    aliases: tuple[str, ...] = ()
    env_aliases: tuple[str, ...] = ()

    @property
    def param(self) -> str:
        """The click parameter name (the field's name)."""
        return self.field

    def shown_default(self) -> str:
        """The default ``--help`` shows: `ServerConfig`'s, in the flag's units."""
        if self.default_text is not None:
            return self.default_text
        default = ServerConfig.model_fields[self.field].default
        if isinstance(default, timedelta):
            return f"{default.total_seconds():g}"
        if isinstance(default, bool):
            return "on" if default else "off"
        if isinstance(default, tuple):
            return ",".join(default) or "*"
        return str(default)

    def option(self) -> Callable[[Any], Any]:
        """The click option for this row (given or ``None``)."""
        is_pair = "/" in self.flag  # "--on/--off": click makes it a boolean pair
        return click.option(
            self.flag, *self.aliases, self.param, envvar=[self.env, *self.env_aliases],
            default=None,
            type=None if is_pair else self.type, metavar=self.metavar,
            show_default=self.shown_default(), help=f"{self.help} [env: {self.env}]")


#: Every ``qmlkit worker`` flag that sets a `ServerConfig` field, in ``--help`` order.
FLAGS: tuple[Flag, ...] = (
    Flag("storage_url", "--storage", "QMLKIT_STORAGE", str, same,
         "Storage URL.", default_text="the app's", metavar="URL"),
    Flag("queues", "--queues", "QMLKIT_QUEUES", str, queue_list,
         "Comma-separated queues to serve; '*' for all."),
    Flag("pool", "--pool", "QMLKIT_POOL", click.Choice(["threads", "asyncio", "processes"]),
         same, "Execution pool: worker threads; one event loop running up to -c attempts "
         "(async def jobs); or child processes.", default_text="threads"),
    Flag("worker_count", "--concurrency", "QMLKIT_CONCURRENCY", click.IntRange(1, 10_000),
         same, "Concurrency: worker threads (threads pool), or attempts at once (asyncio "
         "pool). --threads and QMLKIT_THREADS are the same.", aliases=("-c", "--threads"),
         env_aliases=("QMLKIT_THREADS",), metavar="N"),
    Flag("processes", "--processes", "QMLKIT_PROCESSES", click.IntRange(1, 256), same,
         "With --pool processes: child processes, each a server of its own.",
         default_text="the number of cores"),
    Flag("child_pool", "--child-pool", "QMLKIT_CHILD_POOL", click.Choice(["threads", "asyncio"]),
         same, "With --pool processes: the pool each child runs."),
    Flag("max_jobs_per_child", "--max-jobs-per-child", "QMLKIT_MAX_JOBS_PER_CHILD",
         click.IntRange(1), same, "With --pool processes: recycle a child after about N "
         "attempts (it finishes what runs; a new one replaces it).", default_text="never",
         metavar="N"),
    Flag("max_memory_per_child", "--max-memory-per-child", "QMLKIT_MAX_MEMORY_PER_CHILD",
         click.IntRange(1), same, "With --pool processes: recycle a child whose resident "
         "memory passes this many MiB after an attempt.", default_text="never",
         metavar="MIB"),
    Flag("start_method", "--start-method", "QMLKIT_START_METHOD",
         click.Choice(["forkserver", "spawn"]), same,
         "With --pool processes: how children start.",
         default_text="forkserver on Linux, else spawn"),
    Flag("polling_interval", "--polling-interval", "QMLKIT_POLLING_INTERVAL", SECONDS, seconds,
         "Seconds an idle worker waits between polls."),
    Flag("shutdown_timeout", "--shutdown-timeout", "QMLKIT_SHUTDOWN_TIMEOUT", SECONDS, seconds,
         "Seconds running jobs get to finish after the first SIGINT/SIGTERM."),
    Flag("server_name", "--name", "QMLKIT_SERVER_NAME", str, same,
         "Server name.", default_text="the host name"),
    Flag("enable_heartbeat", "--heartbeat/--no-heartbeat", "QMLKIT_HEARTBEAT", bool, same,
         "Register, heartbeat, and reclaim dead servers' jobs (on by default)."),
    Flag("heartbeat_interval", "--heartbeat-interval", "QMLKIT_HEARTBEAT_INTERVAL", SECONDS,
         seconds, "Seconds between heartbeats."),
    Flag("dead_server_timeout", "--dead-server-timeout", "QMLKIT_DEAD_SERVER_TIMEOUT", SECONDS,
         seconds, "Seconds without a heartbeat before a server's jobs are reclaimed."),
    Flag("wakeup_url", "--wakeup", "QMLKIT_WAKEUP_URL", str, wakeup_setting,
         "Wake-ups: 'auto' (the storage's own channel, if it has one), a kombu URL "
         "(redis://, amqp://, filesystem:///dir), or 'none' to poll only.",
         default_text="the app's, 'auto' unless it sets one", metavar="URL"),
    Flag("recurring_poll_interval", "--recurring-poll-interval",
         "QMLKIT_RECURRING_POLL_INTERVAL", SECONDS, seconds,
         "Longest wait between looks at recurring templates."),
    Flag("stale_processing_after", "--stale-after", "QMLKIT_STALE_PROCESSING_AFTER", SECONDS,
         seconds, "Without heartbeats: seconds after which a Processing job no live worker "
         "holds is requeued (on start, and every --stale-sweep-interval)."),
    Flag("stale_sweep_interval", "--stale-sweep-interval", "QMLKIT_STALE_SWEEP_INTERVAL",
         SECONDS, seconds, "Without heartbeats: seconds between stranded sweeps."),
    Flag("connect_timeout", "--connect-timeout", "QMLKIT_CONNECT_TIMEOUT",
         click.FloatRange(0), seconds,
         "Seconds to keep retrying at start while the storage is unreachable; 0 fails "
         "at once."),
)


def server_flags(command: Callable[..., Any]) -> Callable[..., Any]:
    """Decorate ``command`` with one click option per row of `FLAGS`."""
    for row in reversed(FLAGS):
        command = row.option()(command)
    return command


def config_fields(given: dict[str, Any]) -> dict[str, Any]:
    """The `ServerConfig` fields the flags given set, converted (``None``: not given)."""
    return {row.field: row.convert(given[row.param]) for row in FLAGS
            if given.get(row.param) is not None}


@click.command()
@click.argument("app_spec", metavar="APP", envvar="QMLKIT_APP")
@server_flags
@wakeup_exchange_option
def worker(app_spec: str, wakeup_exchange: str | None, **flags: Any) -> None:
    """Run a worker for APP (module:attribute) until SIGINT or SIGTERM.

    The first signal stops claiming and lets running jobs finish within the shutdown
    timeout; a second signal (or the timeout) releases unfinished jobs to their queues
    at once. Exits 0 after a clean drain, 1 if jobs had to be released.
    """
    app = load_app(app_spec)
    fields = config_fields(flags)
    if wakeup_exchange:
        fields["wakeup_exchange"] = wakeup_exchange
    refuse_process_flags_without_the_pool(fields)
    if fields.get("pool") == "processes":
        fields["app_spec"] = app_spec  # what the child processes import
    if "storage_url" not in fields and isinstance(app.storage_spec, str):
        # The server opens its own storage in start(), retrying while it is unreachable
        # (--connect-timeout); the app's storage opens on first use, once it is up.
        fields["storage_url"] = app.storage_spec
        fields.setdefault("storage_options", app.storage_options)
    try:
        server = app.server(**fields)
    except QmlError as exc:
        raise click.ClickException(str(exc)) from exc
    warn_unserved(app.registry, server.config.queues)
    aborted = run_until_signalled(server)
    app.close()
    if aborted:
        # Every unfinished job is released, so nothing is left to wait for; but a
        # ``def`` job still running on an executor thread (asyncio pool) would keep the
        # interpreter from exiting until it returns, as it joins those threads at exit.
        exit_now(1)
    sys.exit(0)


def exit_now(code: int) -> NoReturn:
    """Flush the logs and standard streams, then end the process with ``code`` without
    joining its threads (a job's, or one blocked on an unreachable storage)."""
    logging.shutdown()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)


#: The fields only the process pool reads (``--processes`` and the per-child flags).
PROCESS_POOL_FIELDS = ("processes", "child_pool", "max_jobs_per_child", "max_memory_per_child",
                       "start_method")


def refuse_process_flags_without_the_pool(fields: Mapping[str, Any]) -> None:
    """Refuse process-pool flags given without ``--pool processes`` (they would do nothing).

    Raises:
        click.UsageError: e.g. ``--processes 2`` with the default thread pool (a Dramatiq
            user's habit): naming the flags, and the ``--pool processes`` they need.
    """
    if fields.get("pool") == "processes":
        return
    given = [row.flag for row in FLAGS if row.field in PROCESS_POOL_FIELDS
             and row.field in fields]
    if given:
        verb = "applies" if len(given) == 1 else "apply"
        raise click.UsageError(f"{', '.join(given)} only {verb} to the process pool: add "
                               f"--pool processes (the pool now is "
                               f"{fields.get('pool', 'threads')!r})")


def unserved_queues(registry: Mapping[str, Any], served: Sequence[str]) -> list[str]:
    """The registered job names' default queues that ``served`` leaves out, sorted.

    Args:
        registry: Job names -> registered entries (each with ``options.queue``).
        served: ``ServerConfig.queues``; empty serves every queue.
    """
    if not served:
        return []
    wanted = {entry.options.queue for entry in registry.values() if hasattr(entry, "options")}
    return sorted(wanted - set(served))


def warn_unserved(registry: Mapping[str, Any], served: Sequence[str]) -> None:
    """Log one warning at start naming the registered queues this worker will not serve.

    Jobs enqueued there would wait for ever for this worker: the usual cause is a
    ``@app.job(queue="mail")`` and a worker started without ``--queues``.
    """
    missing = unserved_queues(registry, served)
    if missing:
        names = ", ".join(missing)
        log.warning("this worker serves %s but jobs are registered on %s too, which it will "
                    "not run; add --queues '%s' or --queues '*' for every queue",
                    ",".join(served), names, ",".join((*served, *missing)))


def run_until_signalled(server: Server | ProcessPool) -> bool:
    """Start ``server``, drain it on the first SIGINT/SIGTERM, abort it on the second.

    Handlers go in before the server claims anything, so no signal can end the process
    without a drain. They only record; this thread acts on them. Releasing jobs needs
    the storage: should it not answer, the process exits anyway `COLD_STOP_S` after the
    abort began (the second signal, or the end of the grace period), or at a third
    signal, leaving what it held Processing for dead-server reclaim (`cold_exit`).
    Celery's cold shutdown ends the same way.

    Returns:
        Whether unfinished jobs had to be released (`Server.aborted`).

    Raises:
        click.ClickException: The server could not start.
    """
    signals: dict[str, Any] = {"count": 0, "abort_at": None}
    first, third = threading.Event(), threading.Event()
    started = threading.Event()

    def on_signal(signum: int, _frame: FrameType | None) -> None:
        signals["count"] += 1
        if signals["count"] == 1:
            log.info("%s: draining (send again to stop at once)", signal.Signals(signum).name)
            first.set()
            if not started.is_set():  # still waiting for its storage: nothing to drain
                getattr(server, "cancel_start", lambda: None)()
        elif signals["count"] == 2:
            log.warning("second signal: releasing unfinished jobs (send again to exit "
                        "without waiting for the storage)")
            signals["abort_at"] = time.monotonic()
            if started.is_set():  # else the main thread aborts once start() returns
                threading.Thread(target=server.abort, name="qmlkit-abort", daemon=True).start()
        else:
            third.set()

    signal.signal(signal.SIGINT, on_signal)
    signal.signal(signal.SIGTERM, on_signal)
    from qmlkit.processing.server import Server  # loaded already: `server` exists

    if isinstance(server, Server):  # it runs jobs here (a process pool's parent runs
        freeze_startup_heap()  # none; each of its children freezes its own heap)
    try:
        server.start()
    except QmlError as exc:
        raise click.ClickException(str(exc)) from exc
    started.set()
    while not first.wait(0.5):
        pass

    def stop() -> None:
        if signals["count"] > 1:  # both signals came while the server was starting
            server.abort()
        server.stop()

    stopper = threading.Thread(target=stop, name="qmlkit-stop", daemon=True)
    if signals["abort_at"] is not None:  # its abort begins now, not at the signal
        signals["abort_at"] = time.monotonic()
    stopper.start()
    grace_ends = time.monotonic() + stop_budget_s(server)
    while stopper.is_alive():
        stopper.join(0.2)
        abort_at = signals["abort_at"]
        cold_at = (grace_ends if abort_at is None else min(grace_ends, abort_at)) + COLD_STOP_S
        if stopper.is_alive() and (third.is_set() or time.monotonic() >= cold_at):
            cold_exit(server, "a third signal" if third.is_set() else
                      f"the stop had not ended {COLD_STOP_S:.0f} s after the abort began: "
                      "the storage does not answer")
    return bool(server.aborted)


#: How long past the start of an abort (the second signal, or the end of the grace
#: period) the worker waits for it to release what it holds before it exits anyway,
#: seconds. A release is one storage call; only an unreachable storage takes longer.
COLD_STOP_S = 10.0


def stop_budget_s(server: Server | ProcessPool) -> float:
    """Seconds from the first signal until ``server.stop()`` aborts on its own: the
    grace period, plus, for a process pool, the margins it gives its children."""
    grace = server.config.shutdown_timeout.total_seconds()
    from qmlkit.processing.server import Server

    if isinstance(server, Server):
        return grace
    from qmlkit.processing.pools.processes import ABORT_WAIT_S, CHILD_EXIT_MARGIN_S

    return grace + CHILD_EXIT_MARGIN_S + ABORT_WAIT_S


def cold_exit(server: Server | ProcessPool, why: str) -> NoReturn:
    """Exit with status 1 while ``server`` is still stopping (``why``: its storage does
    not answer, or a third signal): jobs it still holds stay Processing under its
    registration until peers presume it dead (no heartbeat for ``dead_server_timeout``)
    and reclaim them, as after a kill -9. Nothing is lost; those jobs run again later
    (at-least-once). A process pool's children still alive are killed first (SIGKILL):
    told to go, they too would wait on the storage."""
    log.error("exiting without a clean stop (%s); jobs this "
              "worker still held stay Processing until dead-server reclaim returns them to "
              "their queues, %.0f s after its last heartbeat", why,
              server.config.dead_server_timeout.total_seconds())
    children = getattr(server, "children", None)  # a process pool: else each child, told
    for child in children() if children else ():  # to go, would wait on the storage too
        with contextlib.suppress(OSError, TypeError):
            os.kill(child["pid"], signal.SIGKILL)
    exit_now(1)
