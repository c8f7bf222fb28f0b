"""The qmlkit hooks of qmlkit-postgres (loaded through the ``qmlkit.storage`` entry point).

Nothing heavy is imported here: SQLAlchemy's PostgreSQL dialect and psycopg load only
when a PostgreSQL URL is opened.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

from qmlkit import hookimpl
from qmlkit.config import url_scheme
from qmlkit.storage.base import Storage

#: URL schemes answered here.
SCHEMES = ("postgresql", "postgresql+psycopg", "postgres")


@hookimpl
def qmlkit_storage_schemes() -> Sequence[str]:
    """Return ``("postgresql", "postgresql+psycopg", "postgres")``."""
    return SCHEMES


@hookimpl
def qmlkit_storage(url: str, options: Mapping[str, Any]) -> Storage | None:
    """Build a `PostgresStorage` for a PostgreSQL URL, else ``None``.

    Args:
        url: The storage URL.
        options: `PostgresStorage` keyword arguments (``schema``, ``auto_migrate``, …).

    Raises:
        ConfigurationError: A bad URL or an unknown option.
    """
    if url_scheme(url) not in SCHEMES:
        return None
    from qmlkit_postgres.storage import PostgresStorage

    return PostgresStorage.from_url(url, options)
