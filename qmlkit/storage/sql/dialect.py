"""`SQLDialect`: the documented seam between `SQLStorage` and one database.

`SQLStorage` implements the storage contract once, over the tables of
`qmlkit.storage.sql.schema`; everything that differs between databases is asked of its
dialect. A dialect supplies two kinds of members:

**Primitives** (small, mostly one-liners): engine creation (`create_engines`, with an
optional autocommit engine for single-statement hot paths), schema preparation
(`prepare`: create tables or run migrations), error classification (`is_transient`),
how a raw write transaction starts (`begin_raw`), timestamp binding (`bind_ts`,
`result_ts`, `timestamp_bind_type`), row locking for claims and moves (`lock_rows`),
the history append expression (`history_append`), the upsert construct for the
throughput counters (`insert`) and the JSON merge of a job's progress (`progress_merge`).

**Operations** with portable defaults (`qmlkit.storage.sql.portable`, SQLAlchemy Core
only) that a dialect may replace with faster statements of its own: bulk insert
(`insert_jobs`), the claim (`claim`), the fenced acknowledgement (`acknowledge`),
promotion (`promote_due`), stranded requeue (`requeue_stranded`) and dead-server
reclaim (`reclaim_dead_servers`). Each receives the `SQLStorage` and may use its public
members: ``jobs``, ``stats``, ``servers``, ``recurring`` (tables), ``metadata``,
``executor`` (transactions with retry), ``decode`` and ``insert_rows``.

To add a SQL backend: subclass `SQLDialect` (or `SQLiteDialect`), implement the two
abstract primitives (`insert`, `progress_merge`), override what the database does
differently, and pass an instance as ``SQLStorage(url, dialect=...)``; then add its
URL to the contract suite (``tests/contract``). The PostgreSQL plugin
(``qmlkit_postgres.dialect.PostgresDialect``) is a complete example. The atomic fencing
checks stay inside each operation: a claim must hand a row to one caller only, and an
acknowledgement must apply only while the row is Processing under the same attempt.
"""

from __future__ import annotations

import abc
from collections.abc import Mapping, Sequence
from datetime import datetime, timezone
from typing import TYPE_CHECKING, Any

import sqlalchemy as sa
from sqlalchemy.engine import Engine
from sqlalchemy.exc import OperationalError

import qmlkit.storage.sql.portable as portable
from qmlkit.errors import StaleClaim
from qmlkit.job import Job, JobState
from qmlkit.storage.base import StateChange, Transition
from qmlkit.storage.capabilities import DefaultWakeup
from qmlkit.storage.sql.executor import as_tuple
from qmlkit.storage.sql.schema import INSERT_COLUMNS

if TYPE_CHECKING:
    from qmlkit.storage.sql.seam import SQLStore

__all__ = ["SQLDialect"]


class SQLDialect(abc.ABC):
    """What `SQLStorage` asks of one database. See the module docstring.

    One instance serves one storage (it may cache compiled statements). Every method is
    called with the storage open unless it says otherwise, from any thread.
    """

    #: Short name, for messages (e.g. ``"sqlite"``).
    name = "sql"
    #: Whether the database has schemas (``SQLStorage(schema=...)``); if not, the
    #: schema option is ignored.
    uses_schema = True
    #: SQLAlchemy type for binding timestamps given by `bind_ts` in hand-built
    #: statements (``None``: the column's own type).
    timestamp_bind_type: Any = None
    #: SQL expression of a newline character, for the history column.
    newline_sql = "chr(10)"

    # --- primitives ----------------------------------------------------------------

    def default_wakeup(self, url: sa.URL) -> DefaultWakeup | None:
        """The wake-up channel this database offers by default (see
        `qmlkit.storage.capabilities.WakeupProvider`); ``None`` here: none. Called with
        the storage closed; does no I/O."""
        return None

    def check_url(self, url: sa.URL, text: str) -> None:  # noqa: B027 - optional, no-op
        """Refuse a URL this dialect cannot use; called by ``SQLStorage.__init__``.

        Args:
            url: The parsed URL.
            text: The URL as given, for messages.

        Raises:
            ConfigurationError: The URL is unusable (the message says why).
        """

    def create_engines(self, url: sa.URL, *, pool_size: int,
                       engine_options: Mapping[str, Any]) -> tuple[Engine, Engine | None]:
        """Create the storage's engines; called once by ``SQLStorage.open``.

        Args:
            url: The parsed URL.
            pool_size: Connections to keep open.
            engine_options: The user's extra ``create_engine`` keyword arguments (they
                override the dialect's own).

        Returns:
            ``(engine, autocommit_engine)``: the transactional engine, and optionally an
            engine whose connections are in autocommit mode, used by
            ``Executor.write_one`` for single-statement writes (``None``: not used).

        Raises:
            ImportError, sqlalchemy.exc.ArgumentError: The driver is missing or the URL
                is wrong (the storage turns these into ``ConfigurationError``).
        """
        return sa.create_engine(url, **{"pool_pre_ping": True, **engine_options}), None

    def prepare(self, storage: SQLStore, engine: Engine) -> None:
        """Make the tables ready on a fresh engine (called by ``open``, not yet attached).

        The default creates missing tables and indexes, retried like any write.

        Raises:
            StorageUnavailable: The database cannot be reached in time.
            ConfigurationError: The database refuses the schema.
        """
        storage.executor.retry(lambda: storage.metadata.create_all(engine))

    def is_transient(self, exc: OperationalError) -> bool:
        """Whether an ``OperationalError`` is worth retrying (the default: all are)."""
        return True

    def begin_raw(self, cursor: Any) -> None:  # noqa: B027 - optional, no-op
        """Start a raw write transaction on a DBAPI cursor (the default: the driver's own)."""

    def bind_ts(self, value: datetime | None) -> Any:
        """An aware datetime as a value for a hand-built statement (default unchanged)."""
        return value

    def result_ts(self, value: Any) -> datetime | None:
        """A timestamp column value read by a hand-built statement -> aware UTC datetime."""
        if value is None:
            return None
        if isinstance(value, datetime):
            return value.astimezone(timezone.utc)
        return datetime.fromtimestamp(float(value), timezone.utc)

    def lock_rows(self, query: sa.Select[Any]) -> sa.Select[Any]:
        """Lock the rows a claim or move selects, skipping rows other transactions hold.

        The default is ``FOR UPDATE SKIP LOCKED``; a database that serialises writers
        (SQLite) returns the query unchanged.
        """
        return query.with_for_update(skip_locked=True)

    def history_append(self) -> sa.ColumnElement[Any]:
        """SQL for ``history`` with the row's current state appended (SET sees old values).

        One JSON state per line: text concatenation, so a row whose state data is not
        JSON still moves (and is quarantined) instead of failing the statement.
        """
        return sa.literal_column(f"coalesce(history, '') || state_data || {self.newline_sql}")

    @abc.abstractmethod
    def insert(self, table: sa.Table) -> Any:
        """An INSERT construct of this database with ``on_conflict_do_update`` and
        ``excluded`` (e.g. ``sqlalchemy.dialects.sqlite.insert(table)``), for the
        throughput counters' upsert."""

    @abc.abstractmethod
    def progress_merge(self, column: sa.ColumnElement[Any], entry: str) -> sa.ColumnElement[Any]:
        """The JSON text ``column`` with key ``progress`` set to the JSON ``entry``, in
        one expression (a concurrent change to other keys must not be overwritten)."""

    # --- operations (portable defaults) ----------------------------------------------------

    def insert_jobs(self, storage: SQLStore, cursor: Any, rows: list[tuple[Any, ...]]) -> None:
        """Insert encoded job rows (``INSERT_COLUMNS`` order) on a DBAPI cursor, inside
        the caller's transaction. The default is one ``executemany``.

        Raises:
            The driver's IntegrityError: An id is taken (the caller names it).
        """
        cols = INSERT_COLUMNS
        sql, order, _ = storage.executor.compiled(("insert",), lambda: storage.jobs.insert().values(
            {k: sa.bindparam(k) for k in cols}))
        if order is not None:
            cursor.executemany(
                sql, [as_tuple(order(dict(zip(cols, r, strict=False)))) for r in rows])
        else:
            cursor.executemany(sql, [dict(zip(cols, r, strict=False)) for r in rows])

    def claim(self, storage: SQLStore, *, worker_id: str, server_name: str,
              queues: Sequence[str], limit: int, now: datetime,
              with_previous: bool) -> list[tuple[Job, JobState | None]]:
        """Atomically move up to ``limit`` Enqueued jobs to Processing (see
        ``Storage.claim``); quarantine rows that will not decode.

        Returns:
            ``(job, previous state or None)`` in claim order; the previous state is
            decoded only with ``with_previous``.
        """
        return portable.claim(self, storage, worker_id=worker_id, server_name=server_name,
                              queues=queues, limit=limit, now=now, with_previous=with_previous)

    def acknowledge(self, storage: SQLStore, items: Sequence[Transition]
                    ) -> list[Job | StaleClaim]:
        """Store a batch of fenced outcomes (see ``Storage.transition_many``), counting
        Succeeded/Failed in the throughput table in the same transaction."""
        return portable.acknowledge(self, storage, items)

    def promote_due(self, storage: SQLStore, *, now: datetime, limit: int) -> list[StateChange]:
        """See ``Storage.promote_due``."""
        return portable.promote_due(self, storage, now=now, limit=limit)

    def requeue_stranded(self, storage: SQLStore, *, started_before: datetime, now: datetime,
                         exclude_servers: Sequence[str]) -> list[StateChange]:
        """See ``Storage.requeue_stranded``."""
        return portable.requeue_stranded(self, storage, started_before=started_before, now=now,
                                         exclude_servers=exclude_servers)

    def reclaim_dead_servers(self, storage: SQLStore, *, heartbeat_before: datetime,
                             now: datetime) -> list[StateChange]:
        """See ``Storage.reclaim_dead_servers``."""
        return portable.reclaim_dead_servers(self, storage, heartbeat_before=heartbeat_before,
                                             now=now)

    def count_outcomes(self, storage: SQLStore, cursor: Any, states: Sequence[JobState]) -> None:
        """Add Succeeded/Failed states to the per-minute counters, on ``cursor``."""
        portable.count_outcomes(self, storage, cursor, states)
