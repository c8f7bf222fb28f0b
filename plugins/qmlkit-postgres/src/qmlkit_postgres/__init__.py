"""qmlkit-postgres: PostgreSQL storage for qmlkit.

Installing the package is all it takes: qmlkit finds it through the ``qmlkit.storage``
entry point, and ``App(storage="postgresql://user@host/db?schema=myapp")`` uses it.
See `qmlkit_postgres.storage.PostgresStorage`.

Importing the package (as the entry point's `qmlkit_postgres.plugin` does, in every
qmlkit process) loads neither SQLAlchemy nor psycopg: the names below are imported from
their modules on first use (PEP 562), so a worker on another storage does not pay for
them.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from qmlkit_postgres.migrations import LATEST, SchemaVersionError
    from qmlkit_postgres.storage import PostgresStorage

__all__ = ["LATEST", "PostgresStorage", "SchemaVersionError"]
__version__ = "0.1.0"

#: Each lazily imported name -> the module that defines it.
_LAZY = {
    "LATEST": "qmlkit_postgres.migrations",
    "SchemaVersionError": "qmlkit_postgres.migrations",
    "PostgresStorage": "qmlkit_postgres.storage",
}


def __getattr__(name: str) -> Any:
    """``LATEST``, ``SchemaVersionError`` or ``PostgresStorage``, imported on first use.

    Raises:
        AttributeError: Any other name.
    """
    if name not in _LAZY:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    import importlib

    value = getattr(importlib.import_module(_LAZY[name]), name)
    globals()[name] = value
    return value
