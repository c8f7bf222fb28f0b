"""Every qmlkit hook. Plugins import ``hookimpl`` from ``qmlkit``.

Hooks are called with keyword arguments; an implementation may accept any subset of a
hook's arguments. Hooks may gain arguments in later releases, never lose or rename one.
Built-in storages, middleware and observers implement these same hooks (see
``qmlkit.plugins.BUILTIN_PLUGINS``), so nothing built in is special.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import TYPE_CHECKING, Any

import pluggy

if TYPE_CHECKING:  # the ground floor only (see qmlkit.protocols)
    from qmlkit.job import Job, JobState
    from qmlkit.protocols import EnqueueMiddleware, Middleware, ServerHandle
    from qmlkit.storage.base import Storage

hookspec = pluggy.HookspecMarker("qmlkit")
hookimpl = pluggy.HookimplMarker("qmlkit")


# --- storage resolution ----------------------------------------------------------------


@hookspec(firstresult=True)
def qmlkit_storage(url: str, options: Mapping[str, Any]) -> Storage | None:
    """Build the storage for ``url``, or return ``None`` if the scheme is not yours.

    The first non-``None`` answer wins; built-in storages are ``trylast``, so an installed
    plugin for the same scheme takes precedence. If nobody answers, resolution raises
    ``UnknownStorageScheme`` listing every scheme from ``qmlkit_storage_schemes``.

    Args:
        url: The configured URL, unchanged, e.g. ``"sqlite:///qmlkit.db"``.
        options: Backend options (``ServerConfig.storage_options``); raise
            ``ConfigurationError`` naming any key you do not know.

    Returns:
        An unopened ``Storage``, or ``None``. The caller opens and closes it.
    """


@hookspec
def qmlkit_storage_schemes() -> Sequence[str]:
    """Return the URL schemes this plugin's ``qmlkit_storage`` understands.

    Used for error messages and ``qmlkit plugins``. Every result is collected.

    Returns:
        Scheme names without ``://``, e.g. ``["sqlite", "sqlite+pysqlite"]``.
    """


# --- execution -----------------------------------------------------------------------------


@hookspec
def qmlkit_middleware(config: Mapping[str, Any]) -> Sequence[Middleware] | None:
    """Return middleware to wrap every job execution on a server.

    Called once when a server is built. Results are chained in pluggy's call order (the
    first implementation's middleware outermost; ``tryfirst``/``trylast`` honoured),
    then the middleware passed to the server explicitly. A middleware is called as
    ``middleware(job, context, call_next)`` and returns the job's result.

    Args:
        config: The server's configuration, as a plain mapping.

    Returns:
        Middleware objects, or ``None`` for none.
    """


@hookspec
def qmlkit_enqueue_middleware(config: Mapping[str, Any]) -> Sequence[EnqueueMiddleware] | None:
    """Return client-side middleware to wrap every enqueue of an ``App``.

    Called once when an app first enqueues. An enqueue middleware is called as
    ``middleware(jobs, call_next)`` with the list of jobs about to be stored; it returns
    ``call_next(jobs)`` (the stored jobs' ids), usually after replacing some jobs, e.g.
    ``job.model_copy(update={"metadata": {**job.metadata, "tenant": "acme"}})`` to stamp
    metadata that execution middleware reads back from ``job.metadata``. It may raise to
    refuse the enqueue (nothing is stored). Chained in pluggy's call order, first
    outermost.

    Args:
        config: The app's settings, as a plain mapping (``name``, ``storage``).

    Returns:
        Enqueue middleware objects, or ``None`` for none.
    """


@hookspec
def qmlkit_job_state_changed(job: Job, previous: JobState | None, current: JobState) -> None:
    """Observe one committed state change. ``previous`` is ``None`` for a new job.

    Fired after the storage write commits, never before, for changes made by workers,
    the scheduler and clients (enqueue, delete, retry), claims (Enqueued -> Processing)
    included. Within one server, the changes of one transaction are reported in order.
    Runs on the thread that made the change, so keep it under about a millisecond. The
    return value is ignored; a raise is logged with the plugin's name and reaches neither
    the job nor other observers.
    """


# --- server lifecycle --------------------------------------------------------------------


@hookspec
def qmlkit_server_started(server: ServerHandle) -> None:
    """Called once a server's workers are running. A raise is logged and ignored.

    ``server`` is the ``qmlkit.processing.server.Server``.
    """


@hookspec
def qmlkit_server_stopping(server: ServerHandle) -> None:
    """Called when a server begins to stop, before it drains. A raise is logged and ignored."""
