"""qmlkit-postgres: PostgreSQL storage for qmlkit.

Installing the package is all it takes: qmlkit finds it through the ``qmlkit.storage``
entry point, and ``App(storage="postgresql://user@host/db?schema=myapp")`` uses it.
See `qmlkit_postgres.storage.PostgresStorage`.
"""

from qmlkit_postgres.migrations import LATEST, SchemaVersionError
from qmlkit_postgres.storage import PostgresStorage

__all__ = ["LATEST", "PostgresStorage", "SchemaVersionError"]
__version__ = "0.1.0"
