"""``qmlkit enqueue``: store one job from the command line."""

from __future__ import annotations

import click

from qmlkit.cli.apploading import (
    given_wakeup,
    json_args,
    load_app,
    storage_option,
    wakeup_exchange_option,
)
from qmlkit.errors import PayloadError, QmlError


@click.command()
@click.argument("app_spec", metavar="APP", envvar="QMLKIT_APP")
@click.argument("method")
@storage_option
@click.option("--args", "args_json", default="[]", help="Positional arguments, a JSON list.")
@click.option("--kwargs", "kwargs_json", default="{}", help="Keyword arguments, a JSON object.")
@click.option("--queue", default=None, help="Queue; default the job's registered queue.")
@click.option("--priority", type=click.IntRange(-(2**31), 2**31 - 1), default=None,
              help="Priority; higher runs first.")
@click.option("--wakeup", "wakeup_url", envvar="QMLKIT_WAKEUP_URL", default=None, metavar="URL",
              help="Where the wake-up goes: 'auto' (the storage's own channel), a kombu URL, "
                   "or 'none'; default the app's. [env: QMLKIT_WAKEUP_URL]")
@wakeup_exchange_option
@click.option("--force", is_flag=True,
              help="Enqueue even if APP does not register METHOD (another worker may).")
@click.option("--delay", type=click.FloatRange(0), default=None, help="Seconds before it may run.")
def enqueue(app_spec: str, method: str, storage: str | None, args_json: str, kwargs_json: str,
            queue: str | None, priority: int | None, delay: float | None, wakeup_url: str | None,
            wakeup_exchange: str | None, force: bool) -> None:
    """Enqueue METHOD of APP with JSON arguments; print the job id.

    METHOD must be a job name APP registers, unless --force is given.
    """
    args, kwargs = json_args(args_json, kwargs_json)
    app = load_app(app_spec)
    if method not in app.registry and not force:
        raise click.BadParameter(
            f"{app_spec} registers no job named {method!r}; registered: "
            f"{', '.join(sorted(app.registry)) or '(none)'} (use --force to enqueue anyway)",
            param_hint="METHOD")
    try:
        if storage or wakeup_url or wakeup_exchange:
            app = app.with_storage(storage, **given_wakeup(wakeup_url, wakeup_exchange))
        job_id = app.enqueue(method, args=args, kwargs=kwargs, queue=queue, priority=priority,
                             delay=delay)
    except PayloadError as exc:  # JSON the parser took but qmlkit refuses: still a bad option
        raise click.BadParameter(str(exc), param_hint=option_of(exc)) from exc
    except QmlError as exc:
        raise click.ClickException(str(exc)) from exc
    finally:
        app.close()  # sends a pending wake-up
    click.echo(job_id)


def option_of(exc: PayloadError) -> str | tuple[str, str]:
    """The option a refused argument came from: ``--args``, ``--kwargs``, or both when
    the error is about the whole payload (its size, its nesting)."""
    where = exc.where or ""
    if where.startswith("kwargs"):
        return "--kwargs"
    if where.startswith("args"):
        return "--args"
    return ("--args", "--kwargs")
