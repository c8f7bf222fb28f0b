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
from collections.abc import Iterable, Mapping, Sequence
from typing import Any, cast

import pluggy

import qmlkit.hookspecs as hookspecs
from qmlkit.config import url_scheme
from qmlkit.errors import (
    DuplicateStorageScheme,
    PluginError,
    PluginLoadError,
    UnknownStorageScheme,
)

log = logging.getLogger(__name__)

#: Entry-point groups searched for third-party plugins.
ENTRY_POINT_GROUPS = ("qmlkit.storage", "qmlkit.middleware", "qmlkit.observers")

#: Built-in plugins, registered before any entry point, under these names.
BUILTIN_PLUGINS = {
    "qmlkit.storage": "qmlkit.storage.builtin",
    "qmlkit.logging": "qmlkit.processing.builtin",
}


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
        disable: Plugin names not to load: an entry-point name, a distribution name,
            or a built-in's name (``qmlkit.storage``, ``qmlkit.logging``); added to those
            in ``QMLKIT_DISABLE_PLUGINS`` (comma-separated), in the spirit of
            ``pytest -p no:NAME``.

    Returns:
        The manager, with every hookimpl validated against its hookspec.

    Raises:
        PluginLoadError: An entry point failed to import (names it and its distribution).
        PluginError: A plugin implements an unknown hook (a misspelt ``qmlkit_*`` name)
            or takes arguments its hook does not have; pluggy's message is included.
    """
    pm = pluggy.PluginManager("qmlkit")
    pm.add_hookspecs(hookspecs)
    skip = {n.lower() for n in disable} | disabled_from_env()
    for name, modname in BUILTIN_PLUGINS.items():
        if name not in skip:
            _register(pm, importlib.import_module(modname), name)
    seen: set[str] = set(BUILTIN_PLUGINS)
    if autoload and not _env_flag("QMLKIT_DISABLE_PLUGIN_AUTOLOAD"):
        seen |= _load_entry_points(pm, skip)
    unknown = skip - {n.lower() for n in seen}
    if unknown and autoload:
        log.warning("QMLKIT_DISABLE_PLUGINS names no installed plugin: %s (names are "
                    "entry-point, distribution, 'distribution:entry-point' or built-in "
                    "names, as `qmlkit plugins` shows them)", ", ".join(sorted(unknown)))
    for plugin in extra:
        if not pm.is_registered(plugin):
            _register(pm, plugin, None)
    try:
        pm.check_pending()
    except pluggy.PluginValidationError as exc:
        raise PluginError(f"plugin {exc.plugin!r} implements no known hook: {exc}") from exc
    return pm


def _load_entry_points(pm: pluggy.PluginManager, skip: set[str]) -> set[str]:
    """Register every entry-point plugin not in ``skip``; return every name seen.

    Raises:
        PluginLoadError: An entry point failed to import.
    """
    seen: set[str] = set()
    for group in ENTRY_POINT_GROUPS:
        for ep in importlib.metadata.entry_points(group=group):
            dist = ep.dist.name if ep.dist is not None else None
            names = {ep.name.lower(), f"{dist}:{ep.name}".lower()}
            if dist:
                names.add(dist.lower())
            seen |= names
            if names & skip:
                continue
            try:
                plugin = ep.load()
            except Exception as exc:
                raise PluginLoadError(f"{group}:{ep.name} = {ep.value}", dist, exc) from exc
            if not pm.is_registered(plugin):
                _register(pm, plugin, f"{dist}:{ep.name}")
                _ORIGINS[id(plugin)] = (group, ep.name, dist, _version(ep))
    return seen


#: Where entry-point plugins came from: id(plugin) -> (group, name, distribution, version).
_ORIGINS: dict[int, tuple[str, str, str | None, str | None]] = {}


def _version(ep: importlib.metadata.EntryPoint) -> str | None:
    return ep.dist.version if ep.dist is not None else None


def _register(pm: pluggy.PluginManager, plugin: object, name: str | None) -> None:
    """Register one plugin, turning pluggy's validation error into a clear PluginError."""
    try:
        pm.register(plugin, name=name)
    except pluggy.PluginValidationError as exc:
        raise PluginError(
            f"plugin {name or plugin!r} does not match qmlkit's hooks: {exc}. Check the "
            "hook names (qmlkit_*) and that each takes only arguments its hookspec has."
        ) from exc


def disabled_from_env() -> set[str]:
    """Plugin names listed in ``QMLKIT_DISABLE_PLUGINS`` (comma-separated), lower-cased."""
    return {n.strip().lower() for n in os.environ.get("QMLKIT_DISABLE_PLUGINS", "").split(",")
            if n.strip()}


def _env_flag(name: str) -> bool:
    """A boolean environment variable: unset, empty, 0, false, no and off mean false."""
    return os.environ.get(name, "").strip().lower() not in ("", "0", "false", "no", "off")


def describe_plugins(pm: pluggy.PluginManager) -> list[dict[str, Any]]:
    """Describe every registered plugin, for ``qmlkit plugins``.

    Returns:
        One mapping per plugin: ``name``, ``group`` (entry-point group, or ``builtin`` /
        ``extra``), ``distribution``, ``version``, ``hooks`` (names it implements) and
        ``schemes`` (storage URL schemes it declares).
    """
    from qmlkit.version import __version__

    out = []
    for name, plugin in pm.list_name_plugin():
        if plugin is None:
            continue
        hooks = sorted(c.name for c in pm.get_hookcallers(plugin) or ())
        origin = _ORIGINS.get(id(plugin))
        dist: str | None
        version: str | None
        if name in BUILTIN_PLUGINS:
            group, dist, version = "builtin", "qmlkit-core", __version__
        elif origin is not None:
            group, _, dist, version = origin
        else:
            group, dist, version = "extra", None, None
        schemes: list[str] = []
        impl = getattr(plugin, "qmlkit_storage_schemes", None)
        if impl is not None and "qmlkit_storage_schemes" in hooks:
            schemes = list(impl())
        out.append({"name": name, "group": group, "distribution": dist, "version": version,
                    "hooks": hooks, "schemes": schemes})
    return out


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
        DuplicateStorageScheme: Two installed plugins declare the scheme (an installed
            plugin does take precedence over a built-in one).
        ConfigurationError: The URL has no scheme, or the backend rejected it or an option.
    """
    scheme = url_scheme(url)
    claimants = [
        pm.get_name(impl.plugin) or repr(impl.plugin)
        for impl in pm.hook.qmlkit_storage_schemes.get_hookimpls()
        if pm.get_name(impl.plugin) not in BUILTIN_PLUGINS
        and scheme in cast("Sequence[str]", impl.function())  # qmlkit_storage_schemes' type
    ]
    if len(claimants) > 1:  # an installed plugin may override a built-in, not another plugin
        raise DuplicateStorageScheme(scheme, claimants)
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
