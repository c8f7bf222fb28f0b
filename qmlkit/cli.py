"""The ``qmlkit`` command: run workers, enqueue jobs, inspect and manage them.

Every option can also come from an environment variable, named on ``--help``
(``QMLKIT_STORAGE``, ``QMLKIT_QUEUES``, ``QMLKIT_THREADS``, …).
"""

from __future__ import annotations

import importlib
import json
import logging
import os
import signal
import sys
import threading
from datetime import timedelta
from types import FrameType
from typing import Any

import click
from rich.console import Console
from rich.table import Table

from qmlkit.app import App
from qmlkit.errors import QmlError
from qmlkit.job import STATE_NAMES, Job
from qmlkit.storage.base import Storage

console = Console(highlight=False)
if not console.is_terminal:  # piped or captured: never cut ids or names to 80 columns
    console = Console(highlight=False, width=400)


def load_app(spec: str) -> App:
    """Import ``module:attribute`` and return the ``App`` it names.

    The working directory is put on ``sys.path`` first, as ``python -m`` would.

    Raises:
        click.BadParameter: The spec is malformed, the import fails, or the attribute is
            missing or not an ``App``.
    """
    module_name, sep, attr = spec.partition(":")
    if not sep or not module_name or not attr:
        raise click.BadParameter(f"{spec!r} is not of the form module:attribute", param_hint="APP")
    if os.getcwd() not in sys.path:
        sys.path.insert(0, os.getcwd())
    try:
        module = importlib.import_module(module_name)
    except ImportError as exc:
        raise click.BadParameter(f"cannot import {module_name!r}: {exc}", param_hint="APP") from exc
    if not hasattr(module, attr):
        raise click.BadParameter(f"module {module_name!r} has no attribute {attr!r}",
                                 param_hint="APP")
    app = getattr(module, attr)
    if not isinstance(app, App):
        raise click.BadParameter(
            f"{module_name}.{attr} is {type(app).__name__}, not a qmlkit App", param_hint="APP"
        )
    return app


def _app_for(app_spec: str | None, storage: str | None) -> App:
    if app_spec:
        app = load_app(app_spec)
        if storage:
            app = _with_storage(app, storage)
    elif storage:
        app = App("qmlkit-cli", storage=storage)
    else:
        app = App("qmlkit-cli")
    return app


def _open_storage(app_spec: str | None, storage: str | None) -> tuple[App, Storage]:
    """The app and its opened storage, for inspection and management commands.

    These commands never change a storage's schema: a backend with versioned migrations
    (``auto_migrate``) is opened with them off, so a mistyped schema name is reported
    instead of created, and schemas change only through ``worker`` or ``migrate``.
    """
    from qmlkit.plugins import resolve_storage

    app = _app_for(app_spec, storage)
    try:
        spec = app._storage_spec
        if isinstance(spec, str):
            store = resolve_storage(app.plugin_manager, spec, app.storage_options)
            if hasattr(store, "auto_migrate"):
                store.auto_migrate = False
            app._storage_spec = store
        return app, app.storage
    except QmlError as exc:
        raise click.ClickException(str(exc)) from exc


app_option = click.option("--app", "app_spec", envvar="QMLKIT_APP", metavar="MODULE:ATTR",
                          help="The application, for its storage URL. [env: QMLKIT_APP]")
storage_option = click.option(
    "--storage", envvar="QMLKIT_STORAGE", metavar="URL",
    help="Storage URL; default the app's, else sqlite:///qmlkit.db. [env: QMLKIT_STORAGE]",
)


_wakeup_exchange_option = click.option(
    "--wakeup-exchange", "wakeup_exchange", envvar="QMLKIT_WAKEUP_EXCHANGE", default=None,
    metavar="NAME", help="Wake-up fanout exchange; default the app's ('qmlkit.wakeup' unless "
    "it sets one). Clients and workers must use the same. [env: QMLKIT_WAKEUP_EXCHANGE]")


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
@click.option("--log-level", envvar="QMLKIT_LOG_LEVEL", default="INFO", show_default=True,
              type=click.Choice(["DEBUG", "INFO", "WARNING", "ERROR"], case_sensitive=False),
              help="[env: QMLKIT_LOG_LEVEL]")
@click.version_option(package_name="qmlkit")
def main(log_level: str) -> None:
    """qmlkit: background jobs with pluggable storage."""
    logging.basicConfig(level=log_level.upper(),
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")


@main.command()
@click.argument("app_spec", metavar="APP", envvar="QMLKIT_APP")
@storage_option
@click.option("--queues", envvar="QMLKIT_QUEUES", default="default", show_default=True,
              help="Comma-separated queues to serve; '*' for all. [env: QMLKIT_QUEUES]")
@click.option("--threads", envvar="QMLKIT_THREADS", type=click.IntRange(1, 1024), default=5,
              show_default=True, help="Worker threads. [env: QMLKIT_THREADS]")
@click.option("--polling-interval", envvar="QMLKIT_POLLING_INTERVAL", type=click.FloatRange(0.001),
              default=1.0, show_default=True, help="Seconds an idle worker waits between polls. "
              "[env: QMLKIT_POLLING_INTERVAL]")
@click.option("--shutdown-timeout", envvar="QMLKIT_SHUTDOWN_TIMEOUT", type=click.FloatRange(0.001),
              default=30.0, show_default=True, help="Seconds running jobs get to finish after the "
              "first SIGINT/SIGTERM. [env: QMLKIT_SHUTDOWN_TIMEOUT]")
@click.option("--name", "server_name", envvar="QMLKIT_SERVER_NAME", default=None,
              help="Server name; default the host name. [env: QMLKIT_SERVER_NAME]")
@click.option("--heartbeat/--no-heartbeat", envvar="QMLKIT_HEARTBEAT", default=False,
              help="Register, heartbeat, and reclaim dead servers' jobs. [env: QMLKIT_HEARTBEAT]")
@click.option("--heartbeat-interval", envvar="QMLKIT_HEARTBEAT_INTERVAL",
              type=click.FloatRange(0.001), default=10.0, show_default=True,
              help="Seconds between heartbeats. [env: QMLKIT_HEARTBEAT_INTERVAL]")
@click.option("--dead-server-timeout", envvar="QMLKIT_DEAD_SERVER_TIMEOUT",
              type=click.FloatRange(0.001), default=60.0, show_default=True,
              help="Seconds without a heartbeat before a server's jobs are reclaimed. "
              "[env: QMLKIT_DEAD_SERVER_TIMEOUT]")
@click.option("--wakeup", "wakeup_url", envvar="QMLKIT_WAKEUP_URL", default=None,
              metavar="URL", help="kombu URL for wake-ups (redis://, amqp://, "
              "filesystem:///dir); default the app's, else poll only. [env: QMLKIT_WAKEUP_URL]")
@_wakeup_exchange_option
@click.option("--recurring-poll-interval", envvar="QMLKIT_RECURRING_POLL_INTERVAL",
              type=click.FloatRange(0.001), default=5.0, show_default=True,
              help="Longest wait between looks at recurring templates. "
              "[env: QMLKIT_RECURRING_POLL_INTERVAL]")
@click.option("--stale-after", "stale_after", envvar="QMLKIT_STALE_PROCESSING_AFTER",
              type=click.FloatRange(0.001), default=None,
              help="Without heartbeats: seconds after which a Processing job no live worker "
              "holds is requeued when a server starts (default 300). "
              "[env: QMLKIT_STALE_PROCESSING_AFTER]")
def worker(app_spec: str, storage: str | None, queues: str, threads: int,
           polling_interval: float, shutdown_timeout: float, server_name: str | None,
           heartbeat: bool, heartbeat_interval: float, dead_server_timeout: float,
           wakeup_url: str | None, wakeup_exchange: str | None, recurring_poll_interval: float,
           stale_after: float | None) -> None:
    """Run a worker for APP (module:attribute) until SIGINT or SIGTERM.

    The first signal stops claiming and lets running jobs finish within the shutdown
    timeout; a second signal (or the timeout) releases unfinished jobs to their queues
    at once. Exits 0 after a clean drain, 1 if jobs had to be released.
    """
    app = load_app(app_spec)
    fields: dict[str, Any] = {
        "worker_count": threads,
        "polling_interval": timedelta(seconds=polling_interval),
        "shutdown_timeout": timedelta(seconds=shutdown_timeout),
        "queues": () if queues.strip() == "*" else tuple(q.strip() for q in queues.split(",") if q.strip()),
        "enable_heartbeat": heartbeat,
        "heartbeat_interval": timedelta(seconds=heartbeat_interval),
        "dead_server_timeout": timedelta(seconds=dead_server_timeout),
        "recurring_poll_interval": timedelta(seconds=recurring_poll_interval),
    }
    if stale_after is not None:
        fields["stale_processing_after"] = timedelta(seconds=stale_after)
    if storage:
        fields["storage_url"] = storage
    if wakeup_url:
        fields["wakeup_url"] = wakeup_url
    if wakeup_exchange:
        fields["wakeup_exchange"] = wakeup_exchange
    if server_name:
        fields["server_name"] = server_name
    try:
        server = app.server(**fields)
    except QmlError as exc:
        raise click.ClickException(str(exc)) from exc

    # Handlers go in before the server claims anything, so no signal can end the
    # process without a drain. They only record; this thread acts on them.
    signals = {"count": 0}
    first = threading.Event()
    started = threading.Event()
    cli_log = logging.getLogger("qmlkit.cli")

    def on_signal(signum: int, _frame: FrameType | None) -> None:
        signals["count"] += 1
        if signals["count"] == 1:
            cli_log.info("%s: draining (send again to stop at once)", signal.Signals(signum).name)
            first.set()
        else:
            cli_log.warning("second signal: releasing unfinished jobs")
            if started.is_set():  # else the main thread aborts once start() returns
                threading.Thread(target=server.abort, name="qmlkit-abort").start()

    signal.signal(signal.SIGINT, on_signal)
    signal.signal(signal.SIGTERM, on_signal)
    try:
        server.start()
    except QmlError as exc:
        raise click.ClickException(str(exc)) from exc
    started.set()
    while not first.wait(0.5):
        pass
    if signals["count"] > 1:  # both signals came while the server was starting
        server.abort()
    stopper = threading.Thread(target=server.stop, name="qmlkit-stop")
    stopper.start()
    while stopper.is_alive():
        stopper.join(0.2)
    app.close()
    sys.exit(1 if server.aborted else 0)


@main.command()
@click.argument("app_spec", metavar="APP", envvar="QMLKIT_APP")
@click.argument("method")
@storage_option
@click.option("--args", "args_json", default="[]", help="Positional arguments, a JSON list.")
@click.option("--kwargs", "kwargs_json", default="{}", help="Keyword arguments, a JSON object.")
@click.option("--queue", default=None, help="Queue; default the job's registered queue.")
@click.option("--priority", type=click.IntRange(-(2**31), 2**31 - 1), default=None,
              help="Priority; higher runs first.")
@click.option("--wakeup", "wakeup_url", envvar="QMLKIT_WAKEUP_URL", default=None, metavar="URL",
              help="kombu URL to send the wake-up on; default the app's. [env: QMLKIT_WAKEUP_URL]")
@_wakeup_exchange_option
@click.option("--force", is_flag=True,
              help="Enqueue even if APP does not register METHOD (another worker may).")
@click.option("--delay", type=click.FloatRange(0), default=None, help="Seconds before it may run.")
def enqueue(app_spec: str, method: str, storage: str | None, args_json: str, kwargs_json: str,
            queue: str | None, priority: int | None, delay: float | None, wakeup_url: str | None,
            wakeup_exchange: str | None, force: bool) -> None:
    """Enqueue METHOD of APP with JSON arguments; print the job id.

    METHOD must be a job name APP registers, unless --force is given.
    """
    args, kwargs = _json_args(args_json, kwargs_json)
    app = load_app(app_spec)
    if method not in app.registry and not force:
        raise click.BadParameter(
            f"{app_spec} registers no job named {method!r}; registered: "
            f"{', '.join(sorted(app.registry)) or '(none)'} (use --force to enqueue anyway)",
            param_hint="METHOD")
    try:
        if storage or wakeup_url or wakeup_exchange:
            app = _with_storage(app, storage or app._storage_spec, wakeup_url or app.wakeup_url,
                                wakeup_exchange)
        job_id = app.enqueue(method, args=args, kwargs=kwargs, queue=queue, priority=priority,
                             delay=delay)
    except QmlError as exc:
        raise click.ClickException(str(exc)) from exc
    finally:
        app.close()  # sends a pending wake-up
    click.echo(job_id)


def _json_args(args_json: str, kwargs_json: str) -> tuple[list[Any], dict[str, Any]]:
    """Parse ``--args`` and ``--kwargs``, naming the bad option on error."""
    parsed = []
    for hint, text in (("--args", args_json), ("--kwargs", kwargs_json)):
        try:
            parsed.append(json.loads(text))
        except json.JSONDecodeError as exc:
            raise click.BadParameter(f"not JSON: {exc}", param_hint=hint) from exc
    args, kwargs = parsed
    if not isinstance(args, list):
        raise click.BadParameter("--args must be a JSON list", param_hint="--args")
    if not isinstance(kwargs, dict):
        raise click.BadParameter("--kwargs must be a JSON object", param_hint="--kwargs")
    return args, kwargs


def _with_storage(app: App, storage: Any, wakeup_url: str | None = None,
                  wakeup_exchange: str | None = None) -> App:
    """A copy of ``app`` (same jobs) on ``storage``; wake-ups as given, else the app's."""
    clone = App(app.name, storage=storage, wakeup_url=wakeup_url or app.wakeup_url,
                wakeup_exchange=wakeup_exchange or app.wakeup_exchange)
    clone.registry = app.registry
    return clone


@main.group()
def jobs() -> None:
    """List, show, retry and delete jobs."""


@jobs.command("list")
@app_option
@storage_option
@click.option("--state", type=click.Choice(STATE_NAMES, case_sensitive=False), default=None)
@click.option("--queue", default=None)
@click.option("--method", default=None)
@click.option("--limit", type=click.IntRange(1, 10_000), default=50, show_default=True)
@click.option("--offset", type=click.IntRange(0), default=0)
@click.option("--json", "as_json", is_flag=True, help="One JSON object per line.")
def jobs_list(app_spec: str | None, storage: str | None, state: str | None, queue: str | None,
              method: str | None, limit: int, offset: int, as_json: bool) -> None:
    """List jobs, newest first."""
    _, store = _open_storage(app_spec, storage)
    if state:
        state = next(s for s in STATE_NAMES if s.lower() == state.lower())
    found = store.list_jobs(state=state, queue=queue, method=method, limit=limit, offset=offset)
    if as_json:
        for job in found:
            click.echo(job.model_dump_json())
        return
    if not found:
        console.print("no jobs match" if (state or queue or method or offset) else "no jobs")
        return
    table = Table("id", "method", "queue", "state", "attempts", "created (UTC)", "detail")
    for job in found:
        table.add_row(job.id, job.method, job.queue, job.state.name, str(job.attempts),
                      job.created_at.strftime("%Y-%m-%d %H:%M:%S"), _detail(job))
    console.print(table)


def _detail(job: Job) -> str:
    state = job.state
    if state.name == "Failed":
        return f"{state.exception_type}: {state.message}"[:80]  # type: ignore[union-attr]
    if state.name == "AwaitingRetry":
        return f"retry at {state.retry_at:%H:%M:%S}: {state.last_exception}"[:80]  # type: ignore[union-attr]
    if state.name == "Scheduled":
        return f"at {state.enqueue_at:%Y-%m-%d %H:%M:%S}"  # type: ignore[union-attr]
    if state.name == "Succeeded":
        return json.dumps(state.result, ensure_ascii=False)[:80]  # type: ignore[union-attr]
    return ""


@jobs.command("show")
@click.argument("job_id")
@app_option
@storage_option
def jobs_show(job_id: str, app_spec: str | None, storage: str | None) -> None:
    """Show one job as JSON: state, stack trace, progress and state history included."""
    _, store = _open_storage(app_spec, storage)
    job = store.get(job_id)
    if job is None:
        raise click.ClickException(f"no job with id {job_id!r}")
    shown = job.model_dump(mode="json")
    try:
        shown["history"] = [state.model_dump(mode="json") for state in store.job_history(job_id)]
    except NotImplementedError:
        pass  # a third-party backend without history
    click.echo(json.dumps(shown, indent=2, ensure_ascii=False))


@jobs.command("retry")
@click.argument("job_id")
@app_option
@storage_option
def jobs_retry(job_id: str, app_spec: str | None, storage: str | None) -> None:
    """Enqueue a Failed, Succeeded or Deleted job again."""
    app, _ = _open_storage(app_spec, storage)
    try:
        job = app.retry(job_id)
    except QmlError as exc:
        raise click.ClickException(str(exc)) from exc
    click.echo(f"{job.id} enqueued in {job.queue}")


@jobs.command("delete")
@click.argument("job_id")
@app_option
@storage_option
@click.option("--reason", default="deleted from the command line")
def jobs_delete(job_id: str, app_spec: str | None, storage: str | None, reason: str) -> None:
    """Move a job to Deleted (cleanup removes it after its TTL)."""
    app, _ = _open_storage(app_spec, storage)
    try:
        job = app.delete(job_id, reason=reason)
    except QmlError as exc:
        raise click.ClickException(str(exc)) from exc
    click.echo(f"{job.id} deleted")


@main.command()
@app_option
@storage_option
@click.option("--json", "as_json", is_flag=True, help="Print JSON.")
def stats(app_spec: str | None, storage: str | None, as_json: bool) -> None:
    """Count jobs by queue and state."""
    _, store = _open_storage(app_spec, storage)
    counts = store.count_jobs()
    queues = sorted({q for q, _ in counts})
    if as_json:
        click.echo(json.dumps({q: {s: counts.get((q, s), 0) for s in STATE_NAMES} for q in queues}))
        return
    table = Table("queue", *STATE_NAMES, "total")
    for queue in queues:
        row = [counts.get((queue, s), 0) for s in STATE_NAMES]
        table.add_row(queue, *map(str, row), str(sum(row)))
    totals = [sum(counts.get((q, s), 0) for q in queues) for s in STATE_NAMES]
    table.add_row("[b]all[/b]", *map(str, totals), str(sum(totals)))
    console.print(table)


@main.command()
@app_option
@storage_option
def migrate(app_spec: str | None, storage: str | None) -> None:
    """Apply pending storage schema migrations (qmlkit-postgres); safe to repeat.

    Run it once per deploy before starting workers when they are configured with
    automatic migration off (``?migrate=false``). Backends without versioned schemas
    (memory, SQLite) have nothing to do.
    """
    from qmlkit.plugins import resolve_storage

    app = _app_for(app_spec, storage)
    spec = app._storage_spec
    try:
        store = (spec if isinstance(spec, Storage)
                 else resolve_storage(app.plugin_manager, spec, app.storage_options))
        applied = store.migrate()
    except QmlError as exc:
        raise click.ClickException(str(exc)) from exc
    for line in applied:
        click.echo(f"applied migration {line}")
    click.echo(f"{store!r}: schema is current" + ("" if applied else " (nothing to apply)"))


@main.group()
def recurring() -> None:
    """List, add, remove and trigger recurring (cron) jobs."""


@recurring.command("list")
@app_option
@storage_option
@click.option("--json", "as_json", is_flag=True, help="One JSON object per line.")
def recurring_list(app_spec: str | None, storage: str | None, as_json: bool) -> None:
    """List recurring templates with their next and last runs (UTC)."""
    app, _ = _open_storage(app_spec, storage)
    templates = app.list_recurring()
    if as_json:
        for t in templates:
            click.echo(t.model_dump_json())
        return
    table = Table("id", "cron", "time zone", "method", "queue", "enabled", "next run (UTC)",
                  "last run (UTC)")
    for t in templates:
        table.add_row(t.id, t.cron, t.timezone, t.method, t.queue, "yes" if t.enabled else "no",
                      f"{t.next_run_at:%Y-%m-%d %H:%M:%S}" if t.next_run_at else "-",
                      f"{t.last_run_at:%Y-%m-%d %H:%M:%S}" if t.last_run_at else "-")
    console.print(table)


@recurring.command("add")
@click.argument("template_id")
@click.argument("cron")
@click.argument("method")
@app_option
@storage_option
@click.option("--args", "args_json", default="[]", help="Positional arguments, a JSON list.")
@click.option("--kwargs", "kwargs_json", default="{}", help="Keyword arguments, a JSON object.")
@click.option("--queue", default=None, help="Queue; default the job's registered queue.")
@click.option("--timezone", "tz", default="UTC", show_default=True, help="IANA time zone.")
@click.option("--misfire", type=click.Choice(["fire_once", "skip"]), default="fire_once",
              show_default=True, help="What missed ticks do after downtime.")
@click.option("--disabled", is_flag=True, help="Register it disabled.")
@click.option("--force", is_flag=True,
              help="Accept a METHOD that --app does not register (another worker may).")
def recurring_add(template_id: str, cron: str, method: str, app_spec: str | None,
                  storage: str | None, args_json: str, kwargs_json: str, queue: str | None,
                  tz: str, misfire: str, disabled: bool, force: bool) -> None:
    """Add or replace TEMPLATE_ID running METHOD on CRON (5 fields, or 6 seconds-first).

    With --app, METHOD must be a job name the app registers, unless --force is given.
    """
    args, kwargs = _json_args(args_json, kwargs_json)
    app, _ = _open_storage(app_spec, storage)
    if app_spec and method not in app.registry and not force:
        raise click.BadParameter(
            f"{app_spec} registers no job named {method!r}; registered: "
            f"{', '.join(sorted(app.registry)) or '(none)'} (use --force to add it anyway)",
            param_hint="METHOD")
    try:
        t = app.schedule_recurring(template_id, cron, method, args=args, kwargs=kwargs,
                                   queue=queue, timezone=tz, misfire=misfire,
                                   enabled=not disabled)
    except QmlError as exc:
        raise click.ClickException(str(exc)) from exc
    click.echo(f"{t.id}: next run {t.next_run_at:%Y-%m-%d %H:%M:%S} UTC")


@recurring.command("remove")
@click.argument("template_id")
@app_option
@storage_option
def recurring_remove(template_id: str, app_spec: str | None, storage: str | None) -> None:
    """Remove a recurring template (jobs it already made are kept)."""
    app, _ = _open_storage(app_spec, storage)
    if not app.remove_recurring(template_id):
        raise click.ClickException(f"no recurring job {template_id!r}")
    click.echo(f"{template_id} removed")


@recurring.command("trigger")
@click.argument("template_id")
@app_option
@storage_option
def recurring_trigger(template_id: str, app_spec: str | None, storage: str | None) -> None:
    """Enqueue one job from a template now; its schedule is unchanged. Prints the job id."""
    app, _ = _open_storage(app_spec, storage)
    try:
        click.echo(app.trigger_recurring(template_id))
    except QmlError as exc:
        raise click.ClickException(str(exc)) from exc


@main.command()
@app_option
@storage_option
@click.option("--dead-after", type=click.FloatRange(0.001), default=60.0, show_default=True,
              help="Seconds without a heartbeat after which a server counts as dead.")
@click.option("--json", "as_json", is_flag=True, help="One JSON object per line.")
def servers(app_spec: str | None, storage: str | None, dead_after: float, as_json: bool) -> None:
    """List registered servers (those run with heartbeats), live and dead."""
    from qmlkit.job import utcnow

    _, store = _open_storage(app_spec, storage)
    now = utcnow()
    rows = []
    for info in store.list_servers():
        age = (now - info.last_heartbeat).total_seconds()
        rows.append((info, age, "dead" if age > dead_after else "live"))
    if as_json:
        for info, age, status in rows:
            click.echo(json.dumps({**info.model_dump(mode="json"), "heartbeat_age_s": round(age, 3),
                                   "status": status}))
        return
    table = Table("server", "status", "heartbeat age (s)", "workers", "queues", "started (UTC)")
    for info, age, status in rows:
        table.add_row(info.id, status, f"{age:.1f}", str(info.worker_count),
                      ",".join(info.queues) or "all", f"{info.started_at:%Y-%m-%d %H:%M:%S}")
    console.print(table)


@main.command()
@app_option
@storage_option
@click.option("--host", envvar="QMLKIT_DASHBOARD_HOST", default="127.0.0.1", show_default=True,
              help="Address to bind; anything but loopback needs --token. "
              "[env: QMLKIT_DASHBOARD_HOST]")
@click.option("--port", envvar="QMLKIT_DASHBOARD_PORT", type=click.IntRange(0, 65535),
              default=8080, show_default=True, help="TCP port. [env: QMLKIT_DASHBOARD_PORT]")
@click.option("--token", envvar="QMLKIT_DASHBOARD_TOKEN", default=None, metavar="TOKEN",
              help="Access token: Bearer header, basic-auth password, or the login page. "
              "[env: QMLKIT_DASHBOARD_TOKEN]")
@click.option("--read-only", envvar="QMLKIT_DASHBOARD_READ_ONLY", is_flag=True,
              help="Hide actions; the API refuses them with 403. [env: QMLKIT_DASHBOARD_READ_ONLY]")
@click.option("--wakeup", "wakeup_url", envvar="QMLKIT_WAKEUP_URL", default=None, metavar="URL",
              help="kombu URL whose wake-ups refresh the pages at once, and on which actions "
              "wake workers; default the app's. [env: QMLKIT_WAKEUP_URL]")
@_wakeup_exchange_option
@click.option("--poll-interval", envvar="QMLKIT_DASHBOARD_POLL_INTERVAL",
              type=click.FloatRange(0.05, 10), default=0.5, show_default=True,
              help="Seconds between looks at the storage for live updates. "
              "[env: QMLKIT_DASHBOARD_POLL_INTERVAL]")
@click.option("--dead-after", envvar="QMLKIT_DASHBOARD_DEAD_AFTER", type=click.FloatRange(0.001),
              default=60.0, show_default=True,
              help="Seconds without a heartbeat after which a server shows as dead.")
def dashboard(app_spec: str | None, storage: str | None, host: str, port: int, token: str | None,
              read_only: bool, wakeup_url: str | None, wakeup_exchange: str | None,
              poll_interval: float, dead_after: float) -> None:
    """Serve the web dashboard (pages, REST API under /api/, live updates) until Ctrl-C.

    Binds to 127.0.0.1 unless --host says otherwise; any other address needs a token.
    Needs the optional dependencies: pip install 'qmlkit[dashboard]'.
    """
    try:
        import fastapi  # noqa: F401
        import jinja2  # noqa: F401
        import uvicorn  # noqa: F401
    except ImportError as exc:
        from qmlkit.dashboard import MISSING_DEPENDENCIES

        raise click.ClickException(f"{MISSING_DEPENDENCIES} ({exc})") from exc
    from qmlkit.dashboard import DashboardConfig, serve

    app = _app_for(app_spec, storage)
    if wakeup_url or wakeup_exchange:
        app = _with_storage(app, app._storage_spec, wakeup_url or app.wakeup_url, wakeup_exchange)
    try:
        config = DashboardConfig(host=host, port=port, token=token or None, read_only=read_only,
                                 poll_interval_s=poll_interval, dead_server_after_s=dead_after,
                                 wakeup_url=wakeup_url)
        config.check_bind()
        app.storage  # noqa: B018 - open it now: a bad URL fails before the server starts
    except QmlError as exc:
        raise click.ClickException(str(exc)) from exc
    click.echo(f"qmlkit dashboard on http://{host}:{port}/ for {app.storage!r}"
               + (" (read-only)" if read_only else "") + (" (token required)" if token else ""))
    try:
        serve(app, config)
    finally:
        app.close()


@main.command()
@click.option("--json", "as_json", is_flag=True, help="Print JSON.")
def plugins(as_json: bool) -> None:
    """List every registered plugin, the hooks it implements, and the storage schemes.

    Built-ins come first, then entry-point plugins (groups qmlkit.storage,
    qmlkit.middleware, qmlkit.observers) with their distribution and version. Plugins
    named in QMLKIT_DISABLE_PLUGINS are left out.
    """
    from qmlkit.plugins import describe_plugins, known_schemes, make_plugin_manager
    from qmlkit.processing.middleware import describe

    try:
        pm = make_plugin_manager()
    except QmlError as exc:
        raise click.ClickException(str(exc)) from exc
    found = describe_plugins(pm)
    schemes = known_schemes(pm)
    chain = [describe(m) for provided in pm.hook.qmlkit_middleware(config={})
             for m in (provided or ())]
    if as_json:
        click.echo(json.dumps({"plugins": found, "schemes": schemes, "middleware": chain}))
        return
    table = Table("plugin", "group", "distribution", "version", "hooks")
    for info in found:
        table.add_row(info["name"], info["group"], info["distribution"] or "-",
                      info["version"] or "-", ", ".join(info["hooks"]))
    console.print(table)
    console.print(f"storage schemes: {', '.join(schemes)}")
    console.print(f"middleware chain (outermost first): {', '.join(chain) or '(none)'}")


if __name__ == "__main__":  # pragma: no cover
    main()
