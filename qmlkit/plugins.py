"""The plugin manager: built-ins registered as plugins, then entry-point plugins loaded.

Each ``Server`` (and each ``App``) builds its own manager; importing qmlkit loads no
plugin. Entry-point groups: ``qmlkit.storage``, ``qmlkit.middleware``,
``qmlkit.observers``. Set ``QMLKIT_DISABLE_PLUGIN_AUTOLOAD=1`` to load none of them, or
``QMLKIT_DISABLE_PLUGINS=name,name`` to skip some by entry-point or distribution name.
"""

from __future__ import annotations

import importlib
import importlib.metadata
import logging
import os
from collections.abc import Iterable, Mapping
from typing import Any

import pluggy

from qmlkit import hookspecs
from qmlkit.config import url_scheme
from qmlkit.errors import PluginLoadError, UnknownStorageScheme

log = logging.getLogger(__name__)

#: Entry-point groups searched for third-party plugins.
ENTRY_POINT_GROUPS = ("qmlkit.storage", "qmlkit.middleware", "qmlkit.observers")

#: Modules registered as plugins before any entry point is loaded.
BUILTIN_PLUGINS = ("qmlkit.storage.builtin",)


def make_plugin_manager(
    *,
    autoload: bool = True,
    extra: Iterable[object] = (),
    disable: Iterable[str] = (),
) -> pluggy.PluginManager:
    """Build a plugin manager with the built-ins and the installed plugins.

    Args:
        autoload: Load entry-point plugins (off also when
            ``QMLKIT_DISABLE_PLUGIN_AUTOLOAD`` is set).
        extra: Plugin objects (modules or instances with hookimpls) to register last.
        disable: Entry-point or distribution names not to load, added to those in
            ``QMLKIT_DISABLE_PLUGINS`` (comma-separated).

    Returns:
        The manager, with every hookimpl validated against its hookspec.

    Raises:
        PluginLoadError: An entry point failed to import (names it and its distribution).
        pluggy.PluginValidationError: A plugin implements an unknown hook or takes
            arguments its hook does not have.
    """
    pm = pluggy.PluginManager("qmlkit")
    pm.add_hookspecs(hookspecs)
    for modname in BUILTIN_PLUGINS:
        pm.register(importlib.import_module(modname), name=f"qmlkit:{modname}")
    skip = set(disable) | {
        n.strip() for n in os.environ.get("QMLKIT_DISABLE_PLUGINS", "").split(",") if n.strip()
    }
    if autoload and not os.environ.get("QMLKIT_DISABLE_PLUGIN_AUTOLOAD"):
        for group in ENTRY_POINT_GROUPS:
            for ep in importlib.metadata.entry_points(group=group):
                dist = ep.dist.name if ep.dist is not None else None
                if ep.name in skip or (dist and dist in skip):
                    continue
                try:
                    plugin = ep.load()
                except Exception as exc:
                    raise PluginLoadError(f"{group}:{ep.name} = {ep.value}", dist, exc) from exc
                if not pm.is_registered(plugin):
                    pm.register(plugin, name=f"{dist}:{ep.name}")
    for plugin in extra:
        if not pm.is_registered(plugin):
            pm.register(plugin)
    pm.check_pending()
    return pm


def known_schemes(pm: pluggy.PluginManager) -> list[str]:
    """Return every storage URL scheme some registered plugin understands, sorted."""
    return sorted({s for result in pm.hook.qmlkit_storage_schemes() for s in result})


def resolve_storage(
    pm: pluggy.PluginManager, url: str, options: Mapping[str, Any] | None = None
) -> Any:
    """Return the unopened storage for ``url``, asked of the plugins.

    Args:
        pm: A manager from `make_plugin_manager`.
        url: The storage URL.
        options: Backend options.

    Returns:
        A ``Storage``.

    Raises:
        UnknownStorageScheme: No plugin understands the URL's scheme (lists the known).
        ConfigurationError: The URL has no scheme, or the backend rejected it or an option.
    """
    scheme = url_scheme(url)
    storage = pm.hook.qmlkit_storage(url=url, options=dict(options or {}))
    if storage is None:
        raise UnknownStorageScheme(scheme, known_schemes(pm))
    return storage


def has_observers(pm: pluggy.PluginManager) -> bool:
    """Return whether any plugin implements ``qmlkit_job_state_changed``."""
    return bool(pm.hook.qmlkit_job_state_changed.get_hookimpls())


def notify_state_changed(pm: pluggy.PluginManager, changes: Iterable[Any]) -> None:
    """Call every ``qmlkit_job_state_changed`` observer for each committed change.

    Each observer is called in its own ``try``: one that raises is logged with its
    plugin's name and neither stops the others nor reaches the caller.

    Args:
        pm: The manager.
        changes: ``StateChange`` objects, already committed.
    """
    impls = pm.hook.qmlkit_job_state_changed.get_hookimpls()
    if not impls:
        return
    for change in changes:
        kwargs = {"job": change.job, "previous": change.previous, "current": change.job.state}
        for impl in reversed(impls):
            try:
                impl.function(*(kwargs[name] for name in impl.argnames))
            except Exception:
                log.exception("state-change observer %s raised; ignored", impl.plugin_name)


def call_safely(pm: pluggy.PluginManager, hook_name: str, **kwargs: Any) -> None:
    """Call every implementation of a notification hook, logging and isolating raises."""
    for impl in reversed(getattr(pm.hook, hook_name).get_hookimpls()):
        try:
            impl.function(*(kwargs[name] for name in impl.argnames))
        except Exception:
            log.exception("%s of plugin %s raised; ignored", hook_name, impl.plugin_name)
