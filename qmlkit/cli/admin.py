"""``qmlkit migrate`` and ``qmlkit plugins``: the storage schema and the plugins found."""

from __future__ import annotations

import json

import click
from rich.table import Table

from qmlkit.cli.apploading import MigrateFirst, app_for, app_option, storage_option
from qmlkit.cli.output import console
from qmlkit.errors import QmlError


@click.command()
@app_option
@storage_option
def migrate(app_spec: str | None, storage: str | None) -> None:
    """Apply pending storage schema migrations (qmlkit-postgres); safe to repeat.

    Run it once per deploy before starting workers when they are configured with
    automatic migration off (``?migrate=false``). Backends without versioned schemas
    (memory, SQLite) have nothing to do.
    """
    app = app_for(app_spec, storage)
    migrations = MigrateFirst()
    try:
        app.plugin_manager.register(migrations, name="qmlkit-cli:migrate-first")
        store = app.storage
        applied = migrations.applied if migrations.resolved else store.migrate()
    except QmlError as exc:
        raise click.ClickException(str(exc)) from exc
    finally:
        app.close()
    for line in applied:
        click.echo(f"applied migration {line}")
    click.echo(f"{store!r}: schema is current" + ("" if applied else " (nothing to apply)"))


@click.command()
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
