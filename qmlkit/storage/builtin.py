"""The built-in storage plugin: ``memory://`` and SQL URLs (SQLite by default).

Registered through the same hooks as third-party plugins, marked ``trylast`` so an
installed plugin for the same scheme takes precedence.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

from qmlkit.config import url_scheme
from qmlkit.hookspecs import hookimpl
from qmlkit.storage.base import Storage

#: Schemes answered by ``MemoryStorage``.
MEMORY_SCHEMES = ("memory",)
#: Schemes answered by ``SQLStorage``.
SQL_SCHEMES = ("sqlite", "sqlite+pysqlite")


@hookimpl
def qmlkit_storage_schemes() -> Sequence[str]:
    """Return the built-in schemes."""
    return (*MEMORY_SCHEMES, *SQL_SCHEMES)


@hookimpl(trylast=True)
def qmlkit_storage(url: str, options: Mapping[str, Any]) -> Storage | None:
    """Build ``MemoryStorage`` or ``SQLStorage`` for a built-in scheme, else ``None``."""
    scheme = url_scheme(url)
    if scheme in MEMORY_SCHEMES:
        from qmlkit.storage.memory import MemoryStorage

        return MemoryStorage.from_url(url, options)
    if scheme in SQL_SCHEMES:
        from qmlkit.storage.sql import SQLStorage

        return SQLStorage.from_url(url, options)
    return None
