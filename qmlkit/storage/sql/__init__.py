"""SQL storage: jobs in a SQL database through SQLAlchemy 2 Core; SQLite by default.

``sqlite:///path/to/qmlkit.db`` is qmlkit's embedded default storage (see
`qmlkit.storage.sql.sqlite`). The package's rooms:

* `qmlkit.storage.sql.schema`: the tables and column types (the stored format);
* `qmlkit.storage.sql.executor`: transactions with retry and compiled hot statements;
* `qmlkit.storage.sql.dialect`: `SQLDialect`, the seam a SQL backend implements;
* `qmlkit.storage.sql.portable`: the dialect's default operations, portable SQL;
* `qmlkit.storage.sql.sqlite`: `SQLiteDialect`;
* `qmlkit.storage.sql.storage` and `qmlkit.storage.sql.registry`: `SQLStorage`, the
  storage contract written once over a dialect.

A new SQL backend subclasses `SQLDialect` and passes it as ``SQLStorage(url,
dialect=...)``; the PostgreSQL plugin is built that way. Logs go to the
``qmlkit.storage.sql`` logger.
"""

from __future__ import annotations

from qmlkit.storage.codec import claimed_job
from qmlkit.storage.sql.dialect import SQLDialect
from qmlkit.storage.sql.executor import Executor
from qmlkit.storage.sql.schema import INSERT_COLUMNS, UTCTimestamp, build_metadata, state_is
from qmlkit.storage.sql.sqlite import SQLiteDialect
from qmlkit.storage.sql.storage import SQLStorage, decode_row, dialect_for

__all__ = [
    "INSERT_COLUMNS",
    "Executor",
    "SQLDialect",
    "SQLStorage",
    "SQLiteDialect",
    "UTCTimestamp",
    "build_metadata",
    "claimed_job",
    "decode_row",
    "dialect_for",
    "state_is",
]
