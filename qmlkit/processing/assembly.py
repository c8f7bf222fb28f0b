"""What ``Server.from_plugins`` assembles before a server exists: config, storage, chain."""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping, Sequence
from typing import Any

import pluggy

from qmlkit.errors import ConfigurationError
from qmlkit.hookspecs import hookimpl
from qmlkit.job import Job
from qmlkit.plugins import make_plugin_manager, resolve_storage
from qmlkit.processing.config import ServerConfig
from qmlkit.processing.middleware import Middleware
from qmlkit.storage.base import Storage

__all__ = ["Assembly", "CallableObserver", "assemble"]


class CallableObserver:
    """Adapts a plain callable ``(job, previous, current)`` to ``qmlkit_job_state_changed``."""

    def __init__(self, fn: Callable[[Job, Any, Any], None]) -> None:
        self.fn = fn

    @hookimpl
    def qmlkit_job_state_changed(self, job: Job, previous: Any, current: Any) -> None:
        """Call the adapted callable."""
        self.fn(job, previous, current)


class Assembly:
    """The parts of a server: its config, storage, plugin manager and middleware chain."""

    def __init__(self, config: ServerConfig, storage: Storage, pm: pluggy.PluginManager,
                 middleware: list[Middleware]) -> None:
        self.config = config
        self.storage = storage
        self.pm = pm
        self.middleware = middleware


def assemble(*, storage: str | Storage | None, config: ServerConfig | Mapping[str, Any] | None,
             plugins: Iterable[object], middleware: Sequence[Middleware],
             observers: Sequence[Callable[[Job, Any, Any], None]],
             plugin_manager: pluggy.PluginManager | None, autoload: bool) -> Assembly:
    """Resolve what ``Server.from_plugins`` is given; see it for the arguments and errors."""
    if config is None:
        config = ServerConfig()
    elif not isinstance(config, ServerConfig):
        try:
            config = ServerConfig(**config)
        except ValueError as exc:
            raise ConfigurationError(f"invalid server configuration: {exc}") from exc
    if isinstance(storage, str):
        config = config.model_copy(update={"storage_url": storage})
    pm = plugin_manager or make_plugin_manager(autoload=autoload, extra=plugins)
    if storage is None or isinstance(storage, str):
        store: Storage = resolve_storage(pm, config.storage_url, config.storage_options)
    else:
        store = storage
    chain: list[Middleware] = []
    for provided in pm.hook.qmlkit_middleware(config=config.model_dump()):
        chain.extend(provided or ())
    chain.extend(middleware)
    for observer in observers:
        pm.register(CallableObserver(observer))
    return Assembly(config, store, pm, chain)
