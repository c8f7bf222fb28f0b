"""Inspection and control verbs: ``jobs``, ``stats``, ``servers`` and ``recurring``."""

from __future__ import annotations

import contextlib
import json

import click
from rich.table import Table

from qmlkit.cli.apploading import app_option, json_args, open_storage, storage_option
from qmlkit.cli.output import console
from qmlkit.errors import QmlError
from qmlkit.job import STATE_NAMES, Job, utcnow

# --- jobs ----------------------------------------------------------------------------------


@click.group()
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
    _, store = open_storage(app_spec, storage)
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
                      job.created_at.strftime("%Y-%m-%d %H:%M:%S"), detail(job))
    console.print(table)


def detail(job: Job) -> str:
    """The detail column of ``jobs list``: error, retry time, due time or result (80 chars)."""
    state = job.state
    if state.name == "Failed":
        return f"{state.exception_type}: {state.message}"[:80]
    if state.name == "AwaitingRetry":
        return f"retry at {state.retry_at:%H:%M:%S}: {state.last_exception}"[:80]
    if state.name == "Scheduled":
        return f"at {state.enqueue_at:%Y-%m-%d %H:%M:%S}"
    if state.name == "Succeeded":
        return json.dumps(state.result, ensure_ascii=False)[:80]
    return ""


@jobs.command("show")
@click.argument("job_id")
@app_option
@storage_option
def jobs_show(job_id: str, app_spec: str | None, storage: str | None) -> None:
    """Show one job as JSON: state, stack trace, progress and state history included."""
    _, store = open_storage(app_spec, storage)
    job = store.get(job_id)
    if job is None:
        raise click.ClickException(f"no job with id {job_id!r}")
    shown = job.model_dump(mode="json")
    with contextlib.suppress(NotImplementedError):  # a third-party backend without history
        shown["history"] = [state.model_dump(mode="json") for state in store.job_history(job_id)]
    click.echo(json.dumps(shown, indent=2, ensure_ascii=False))


@jobs.command("retry")
@click.argument("job_id")
@app_option
@storage_option
def jobs_retry(job_id: str, app_spec: str | None, storage: str | None) -> None:
    """Enqueue a Failed, Succeeded or Deleted job again."""
    app, _ = open_storage(app_spec, storage)
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
    app, _ = open_storage(app_spec, storage)
    try:
        job = app.delete(job_id, reason=reason)
    except QmlError as exc:
        raise click.ClickException(str(exc)) from exc
    click.echo(f"{job.id} deleted")


# --- stats and servers -----------------------------------------------------------------------


@click.command()
@app_option
@storage_option
@click.option("--json", "as_json", is_flag=True, help="Print JSON.")
def stats(app_spec: str | None, storage: str | None, as_json: bool) -> None:
    """Count jobs by queue and state."""
    _, store = open_storage(app_spec, storage)
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


@click.command()
@app_option
@storage_option
@click.option("--dead-after", type=click.FloatRange(0.001), default=60.0, show_default=True,
              help="Seconds without a heartbeat after which a server counts as dead.")
@click.option("--json", "as_json", is_flag=True, help="One JSON object per line.")
def servers(app_spec: str | None, storage: str | None, dead_after: float, as_json: bool) -> None:
    """List registered servers (those run with heartbeats), live and dead, with each one's
    pool, concurrency and busy slots (as of its last heartbeat)."""
    _, store = open_storage(app_spec, storage)
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
    table = Table("server", "status", "heartbeat age (s)", "pool", "concurrency", "busy",
                  "queues", "started (UTC)")
    for info, age, status in rows:
        table.add_row(info.id, status, f"{age:.1f}", info.pool, str(info.worker_count),
                      str(info.busy), ",".join(info.queues) or "all",
                      f"{info.started_at:%Y-%m-%d %H:%M:%S}")
    console.print(table)


# --- recurring -------------------------------------------------------------------------------


@click.group()
def recurring() -> None:
    """List, add, remove and trigger recurring (cron) jobs."""


@recurring.command("list")
@app_option
@storage_option
@click.option("--json", "as_json", is_flag=True, help="One JSON object per line.")
def recurring_list(app_spec: str | None, storage: str | None, as_json: bool) -> None:
    """List recurring templates with their next and last runs (UTC)."""
    app, _ = open_storage(app_spec, storage)
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
    args, kwargs = json_args(args_json, kwargs_json)
    app, _ = open_storage(app_spec, storage, create=True)
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
    app, _ = open_storage(app_spec, storage)
    if not app.remove_recurring(template_id):
        raise click.ClickException(f"no recurring job {template_id!r}")
    click.echo(f"{template_id} removed")


@recurring.command("trigger")
@click.argument("template_id")
@app_option
@storage_option
def recurring_trigger(template_id: str, app_spec: str | None, storage: str | None) -> None:
    """Enqueue one job from a template now; its schedule is unchanged. Prints the job id."""
    app, _ = open_storage(app_spec, storage)
    try:
        click.echo(app.trigger_recurring(template_id))
    except QmlError as exc:
        raise click.ClickException(str(exc)) from exc
