"""What every ``qmlkit`` verb shares: loading ``APP``, choosing and opening its storage,
the common options, and parsing JSON arguments.
"""

from __future__ import annotations

import importlib
import json
import math
import os
import sys
from collections.abc import Generator
from pathlib import Path
from typing import Any, TypedDict

import click

from qmlkit.app import App
from qmlkit.errors import QmlError
from qmlkit.hookspecs import hookimpl
from qmlkit.storage.base import Storage
from qmlkit.wakeup import wakeup_setting


def __getattr__(name: str) -> Any:
    """``console``, imported on first use from `qmlkit.cli.output` (rich loads then).

    Raises:
        AttributeError: Any other missing name.
    """
    if name == "console":
        from qmlkit.cli.output import console

        return console
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


#: The name of an app the CLI makes when no ``--app`` is given.
CLI_APP_NAME = "qmlkit-cli"

app_option = click.option("--app", "app_spec", envvar="QMLKIT_APP", metavar="MODULE:ATTR",
                          help="The application, for its storage URL. [env: QMLKIT_APP]")
storage_option = click.option(
    "--storage", envvar="QMLKIT_STORAGE", metavar="URL",
    help="Storage URL; default the app's, else sqlite:///qmlkit.db. [env: QMLKIT_STORAGE]",
)
wakeup_exchange_option = click.option(
    "--wakeup-exchange", "wakeup_exchange", envvar="QMLKIT_WAKEUP_EXCHANGE", default=None,
    metavar="NAME", help="Wake-up fanout exchange; default the app's ('qmlkit.wakeup' unless "
    "it sets one). Clients and workers must use the same. [env: QMLKIT_WAKEUP_EXCHANGE]")


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


def app_for(app_spec: str | None, storage: str | None) -> App:
    """The app a verb works on: ``APP`` (on ``storage`` if given), else a bare CLI app.

    Args:
        app_spec: ``module:attribute`` or ``None``.
        storage: A storage URL overriding the app's, or ``None``.

    Returns:
        A fresh copy (`App.with_storage`) when ``app_spec`` is given, so the CLI may add
        plugins to its manager without touching the loaded app; else a new ``App`` on
        ``storage`` (default ``sqlite:///qmlkit.db``).

    Raises:
        click.BadParameter: As `load_app`.
    """
    if app_spec:
        return load_app(app_spec).with_storage(storage)
    if storage:
        return App(CLI_APP_NAME, storage=storage)
    return App(CLI_APP_NAME)


class MigrationsOff:
    """A plugin that turns automatic schema migration off on the storage resolved.

    Inspection and management verbs never change a storage's schema: a backend with
    versioned migrations (an ``auto_migrate`` attribute, as qmlkit-postgres has) is
    opened with them off, so a mistyped schema name is reported instead of created, and
    schemas change only through ``worker`` or ``migrate``.
    """

    @hookimpl(wrapper=True)
    def qmlkit_storage(self, url: str, options: Any) -> Generator[None, Any, Any]:
        """Let the storage plugins build the storage, then switch its migrations off."""
        store = yield
        if store is not None and hasattr(store, "auto_migrate"):
            store.auto_migrate = False
        return store


class MigrateFirst:
    """A plugin that applies a storage's pending migrations as it is resolved.

    What ``qmlkit migrate`` registers: whatever storage URL the app names, the lines of
    ``Storage.migrate`` are kept in `applied` (and `resolved` is set), and opening it
    afterwards finds it current. An app built on a ``Storage`` object resolves nothing.
    """

    def __init__(self) -> None:
        self.applied: list[str] = []
        self.resolved = False

    @hookimpl(wrapper=True)
    def qmlkit_storage(self, url: str, options: Any) -> Generator[None, Any, Any]:
        """Let the storage plugins build the storage, then migrate it."""
        store = yield
        if isinstance(store, Storage):
            self.applied = store.migrate()
            self.resolved = True
        return store


def missing_sqlite_file(spec: str | Storage) -> Path | None:
    """The file a SQLite storage URL names, if that file does not exist; else ``None``.

    ``None`` too for any other storage, an in-memory or ``file:`` URI database, or a URL
    SQLAlchemy cannot parse (opening it reports that).

    Args:
        spec: A storage URL (``sqlite:///relative.db``, ``sqlite:////abs.db``) or a
            ``Storage`` object.
    """
    if not isinstance(spec, str) or not spec.partition("://")[0].startswith("sqlite"):
        return None
    import sqlalchemy as sa

    try:
        database = sa.make_url(spec).database
    except sa.exc.ArgumentError:
        return None
    if not database or database == ":memory:" or database.startswith("file:"):
        return None
    path = Path(database).expanduser()
    return None if path.exists() else path.resolve()


def require_existing_storage(app: App) -> None:
    """Refuse to let a command that reads (or acts on existing jobs) create a database.

    Opening a SQLite URL creates the file; for ``jobs``, ``stats``, ``servers`` and the
    dashboard that would invent an empty database (a typo'd path prints zeros), so they
    stop here instead. ``worker``, ``enqueue``, ``migrate`` and ``recurring add`` create
    it as before.

    Raises:
        click.UsageError: The SQLite file does not exist (exit status 2); the message
            names the path and the URL.
    """
    missing = missing_sqlite_file(app.storage_spec)
    if missing is not None:
        raise click.UsageError(
            f"no SQLite database at {missing} (storage {app.storage_spec}); this command "
            "does not create one. Check the path, or run 'qmlkit worker' or enqueue a job "
            "to create it; if your app uses other storage, name it with --app module:app "
            "(or QMLKIT_APP) or --storage URL")


def open_storage(app_spec: str | None, storage: str | None, *,
                 create: bool = False) -> tuple[App, Storage]:
    """The app and its opened storage, for inspection and management commands.

    The storage is opened with automatic migrations off (`MigrationsOff`).

    Args:
        app_spec: ``module:attribute`` or ``None``.
        storage: A storage URL overriding the app's, or ``None``.
        create: Allow opening to create a SQLite file (a command that writes new state,
            ``recurring add``); else a missing file is refused (`require_existing_storage`).

    Raises:
        click.UsageError: ``create`` is false and the SQLite file does not exist (exit 2).
        click.ClickException: The storage cannot be resolved or opened (the message).
    """
    app = app_for(app_spec, storage)
    if not create:
        require_existing_storage(app)
    try:
        app.plugin_manager.register(MigrationsOff(), name="qmlkit-cli:migrations-off")
        return app, app.storage
    except QmlError as exc:
        raise click.ClickException(str(exc)) from exc


def json_args(args_json: str, kwargs_json: str) -> tuple[list[Any], dict[str, Any]]:
    """Parse ``--args`` and ``--kwargs``, naming the bad option on error.

    Returns:
        The positional arguments (a list) and the keyword arguments (a dict).

    Raises:
        click.BadParameter: Not JSON (``NaN`` and ``Infinity`` are not, nor is a number
            too large for a float), nested too deeply for the parser, an integer longer
            than Python's digit limit, or not a list / an object (usage error, exit 2).
    """
    parsed = []
    for hint, text in (("--args", args_json), ("--kwargs", kwargs_json)):
        parsed.append(parse_json(text, hint))
    args, kwargs = parsed
    if not isinstance(args, list):
        raise click.BadParameter("--args must be a JSON list", param_hint="--args")
    if not isinstance(kwargs, dict):
        raise click.BadParameter("--kwargs must be a JSON object", param_hint="--kwargs")
    return args, kwargs


def parse_json(text: str, hint: str) -> Any:
    """Parse one JSON option value.

    Raises:
        click.BadParameter: Anything the parser refuses, named after ``hint``.
    """
    try:
        return json.loads(text, parse_constant=_refuse_constant, parse_float=_finite_float)
    except json.JSONDecodeError as exc:
        raise click.BadParameter(f"not JSON: {exc}", param_hint=hint) from exc
    except RecursionError:  # e.g. 50,000 nested brackets
        raise click.BadParameter("not usable JSON: nested too deeply", param_hint=hint) from None
    except ValueError as exc:  # e.g. an integer over sys.get_int_max_str_digits() digits
        raise click.BadParameter(f"not usable JSON: {exc}", param_hint=hint) from None


def _refuse_constant(name: str) -> Any:
    """``NaN``, ``Infinity`` and ``-Infinity`` are not JSON (Python's parser allows them)."""
    raise ValueError(f"{name} is not a JSON value")


def _finite_float(text: str) -> float:
    """A JSON number as a float; one too large for a float (``1e400``) is refused."""
    value = float(text)
    if not math.isfinite(value):
        raise ValueError(f"the number {text[:40]} is too large")
    return value


class WakeupKeywords(TypedDict, total=False):
    """`App.with_storage`'s wake-up keywords; a key left out keeps the app's setting."""

    wakeup_url: str | None
    wakeup_exchange: str


def given_wakeup(wakeup_url: str | None, wakeup_exchange: str | None) -> WakeupKeywords:
    """The ``--wakeup``/``--wakeup-exchange`` values given, as `App.with_storage` keywords
    (an option not given keeps the app's setting; ``--wakeup none`` or ``off`` turns
    wake-ups off, ``auto`` asks the storage, see `qmlkit.wakeup.wakeup_setting`)."""
    given = WakeupKeywords()
    if wakeup_url:
        given["wakeup_url"] = wakeup_setting(wakeup_url)
    if wakeup_exchange:
        given["wakeup_exchange"] = wakeup_exchange
    return given
