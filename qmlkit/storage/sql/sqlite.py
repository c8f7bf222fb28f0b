"""`SQLiteDialect`: qmlkit's embedded default storage, ``sqlite:///path/to/qmlkit.db``.

The file is opened in WAL mode with ``synchronous=NORMAL`` and a busy timeout, and every
write transaction starts with ``BEGIN IMMEDIATE``, so several worker processes on one
machine can share one file: a claim is one short write transaction, and two claimers
never see the same row (field case C19). Brief lock contention is retried with backoff
by the storage's executor and only surfaces, as ``StorageUnavailable``, if it outlasts
``busy_timeout_s``. Timestamps are stored as floats of Unix seconds.
"""

from __future__ import annotations

from collections.abc import Mapping
from datetime import datetime
from pathlib import Path
from typing import TYPE_CHECKING, Any
from urllib.parse import quote

import sqlalchemy as sa
import sqlalchemy.dialects.sqlite
from sqlalchemy import event
from sqlalchemy.engine import Connection, Engine
from sqlalchemy.exc import OperationalError

from qmlkit.errors import ConfigurationError
from qmlkit.storage.capabilities import DefaultWakeup
from qmlkit.storage.sql.dialect import SQLDialect
from qmlkit.storage.sql.schema import INSERT_COLUMNS, add_missing_columns

if TYPE_CHECKING:
    from qmlkit.storage.sql.seam import SQLStore

__all__ = ["SQLiteDialect"]


class SQLiteDialect(SQLDialect):
    """SQLite through the standard library's ``sqlite3``. See the module docstring."""

    name = "sqlite"
    uses_schema = False
    timestamp_bind_type = sa.Float
    newline_sql = "char(10)"

    #: Rows per multi-row INSERT (18 parameters each; SQLite allows 32,766 per statement).
    ROWS_PER_INSERT = 500

    def __init__(self) -> None:
        self._multi_sql: dict[int, str] = {}

    def check_url(self, url: sa.URL, text: str) -> None:
        """Refuse a URL without a file, or whose directory does not exist.

        Raises:
            ConfigurationError: Names the URL or the missing directory.
        """
        database = url.database
        if not database or database == ":memory:":
            raise ConfigurationError(
                f"storage URL {text!r} names no SQLite file; use 'sqlite:///path/to/file.db' "
                "(or 'memory://' for in-process storage)"
            )
        parent = Path(database).expanduser().resolve().parent
        if not parent.is_dir():
            raise ConfigurationError(
                f"SQLite storage {text!r}: directory {str(parent)!r} does not exist; "
                "create it or choose another path"
            )

    def default_wakeup(self, url: sa.URL) -> DefaultWakeup | None:
        """``filesystem://`` wake-ups in the folder ``<file>-wakeup`` beside the database
        file (as SQLite keeps ``<file>-wal`` there): every process on this machine that
        opens the same file uses the same folder, and nothing is installed or run."""
        folder = f"{Path(url.database or '').expanduser().resolve()}-wakeup"
        return DefaultWakeup(f"filesystem://{quote(folder, safe='/')}")

    def create_engines(self, url: sa.URL, *, pool_size: int,
                       engine_options: Mapping[str, Any]) -> tuple[Engine, Engine | None]:
        """One pooled engine in WAL mode, with ``BEGIN IMMEDIATE`` for writes."""
        options: dict[str, Any] = {
            "pool_pre_ping": False, "pool_size": pool_size, "max_overflow": pool_size,
            "connect_args": {"check_same_thread": False, "timeout": 5.0},
            **engine_options,
        }
        engine = sa.create_engine(url, **options)
        _configure(engine)
        return engine, None

    def prepare(self, storage: SQLStore, engine: Engine) -> None:
        """Create missing tables, then add columns and indexes an older file lacks."""
        super().prepare(storage, engine)
        storage.executor.retry(lambda: add_missing_columns(engine, storage.jobs))

    def is_transient(self, exc: OperationalError) -> bool:
        """Lock contention (``database is locked``/``busy``) and dropped connections."""
        if exc.connection_invalidated:
            return True
        text = str(exc.orig).lower()
        return "locked" in text or "busy" in text

    def begin_raw(self, cursor: Any) -> None:
        """``BEGIN IMMEDIATE``: take the write lock at once (no deadlock on upgrade)."""
        cursor.execute("BEGIN IMMEDIATE")

    def bind_ts(self, value: datetime | None) -> Any:
        """Float Unix seconds."""
        return None if value is None else value.timestamp()

    def lock_rows(self, query: sa.Select[Any]) -> sa.Select[Any]:
        """Unchanged: ``BEGIN IMMEDIATE`` already serialises writers."""
        return query

    def insert(self, table: sa.Table) -> Any:
        """SQLite's ``INSERT … ON CONFLICT``."""
        return sa.dialects.sqlite.insert(table)

    def progress_merge(self, column: sa.ColumnElement[Any], entry: str) -> sa.ColumnElement[Any]:
        """``json_set(column, '$.progress', json(entry))``."""
        return sa.func.json_set(column, "$.progress", sa.func.json(entry))

    def insert_jobs(self, storage: SQLStore, cursor: Any, rows: list[tuple[Any, ...]]) -> None:
        """Multi-row ``INSERT … VALUES`` of up to `ROWS_PER_INSERT` rows, measured
        faster than ``executemany`` here."""
        cols = INSERT_COLUMNS
        sql, _, _ = storage.executor.compiled(("insert",), lambda: storage.jobs.insert().values(
            {k: sa.bindparam(k) for k in cols}))
        if sql.count("?") != len(cols):  # not the plain qmark form: the portable way
            super().insert_jobs(storage, cursor, rows)
            return
        head, _, group = sql.partition(" VALUES ")
        for start in range(0, len(rows), self.ROWS_PER_INSERT):
            chunk = rows[start:start + self.ROWS_PER_INSERT]
            if len(chunk) == 1:
                cursor.execute(sql, chunk[0])
                continue
            many = self._multi_sql.get(len(chunk))
            if many is None:
                values = ",".join([group] * len(chunk))
                many = self._multi_sql[len(chunk)] = f"{head} VALUES {values}"
            cursor.execute(many, [value for row in chunk for value in row])


def _text(raw: bytes) -> str | bytes:
    """A TEXT value as ``str``, or its raw bytes if they are not UTF-8: decoding that row
    then fails and it is quarantined alone (its stored bytes kept), instead of the whole
    statement failing and stopping every claim and list on its queue."""
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError:
        return raw


def _configure(engine: Engine) -> None:
    """WAL, a busy timeout, and ``BEGIN IMMEDIATE`` for every write transaction."""

    @event.listens_for(engine, "connect")
    def on_connect(dbapi_conn: Any, _record: Any) -> None:
        dbapi_conn.isolation_level = None  # we issue BEGIN ourselves
        dbapi_conn.text_factory = _text  # one non-UTF-8 value must not fail the statement
        cur = dbapi_conn.cursor()
        cur.execute("PRAGMA journal_mode=WAL")
        cur.execute("PRAGMA synchronous=NORMAL")
        cur.execute("PRAGMA busy_timeout=5000")
        cur.execute("PRAGMA foreign_keys=ON")
        cur.close()

    @event.listens_for(engine, "begin")
    def on_begin(conn: Connection) -> None:
        if conn.get_execution_options().get("qmlkit_read"):
            conn.exec_driver_sql("BEGIN")
        else:
            conn.exec_driver_sql("BEGIN IMMEDIATE")
