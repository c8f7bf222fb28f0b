"""``qmlkit dashboard``: serve the web dashboard for a storage."""

from __future__ import annotations

import click
from pydantic import SecretStr

from qmlkit.cli.apploading import (
    app_for,
    app_option,
    given_wakeup,
    require_existing_storage,
    storage_option,
    wakeup_exchange_option,
)
from qmlkit.errors import QmlError


@click.command()
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
              help="Wake-ups that refresh the pages at once, and on which actions wake "
              "workers: 'auto' (the storage's own channel), a kombu URL, or 'none'; default "
              "the app's. [env: QMLKIT_WAKEUP_URL]")
@wakeup_exchange_option
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
    Needs the optional dependencies: pip install 'qmlkit-core[dashboard]'.
    """
    try:
        import fastapi  # noqa: F401
        import jinja2  # noqa: F401
        import uvicorn  # noqa: F401
    except ImportError as exc:
        from qmlkit.dashboard import MISSING_DEPENDENCIES

        raise click.ClickException(f"{MISSING_DEPENDENCIES} ({exc})") from exc
    from qmlkit.dashboard import DashboardConfig, serve

    app = app_for(app_spec, storage)
    if wakeup_url or wakeup_exchange:
        app = app.with_storage(None, **given_wakeup(wakeup_url, wakeup_exchange))
    try:
        secret = SecretStr(token) if token else None
        config = DashboardConfig(host=host, port=port, token=secret, read_only=read_only,
                                 poll_interval_s=poll_interval, dead_server_after_s=dead_after)
        # --wakeup went into the app's copy above: the dashboard listens on app.wakeup_url
        config.check_bind()
        require_existing_storage(app)  # it shows and acts on stored jobs: invent no database
        app.storage  # noqa: B018 - open it now: a bad URL fails before the server starts
    except QmlError as exc:
        raise click.ClickException(str(exc)) from exc
    click.echo(f"qmlkit dashboard on http://{host}:{port}/ for {app.storage!r}"
               + (" (read-only)" if read_only else "") + (" (token required)" if token else ""))
    try:
        serve(app, config)
    finally:
        app.close()
