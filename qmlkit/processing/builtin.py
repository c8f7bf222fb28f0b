"""The built-in execution plugin: the logging middleware (qml-rs ``TracingMiddleware``).

Registered as ``qmlkit.logging`` through the same hook third parties use; disable it
with ``ServerConfig.log_attempts=False`` or ``QMLKIT_DISABLE_PLUGINS=qmlkit.logging``.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

from qmlkit.hookspecs import hookimpl
from qmlkit.processing.middleware import LoggingMiddleware, Middleware


@hookimpl(tryfirst=True)
def qmlkit_middleware(config: Mapping[str, Any]) -> Sequence[Middleware] | None:
    """Return the logging middleware unless ``log_attempts`` is off.

    ``tryfirst`` puts it first in the chain, the outermost layer, so the duration it logs
    covers every other middleware and the outcome it logs is the final one.
    """
    return [LoggingMiddleware()] if config.get("log_attempts", True) else None
