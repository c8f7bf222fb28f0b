"""The tables qmlkit keeps in a SQL database, and the column types they use.

Every SQL dialect shares these tables (the PostgreSQL plugin's migrations create the
same ones): the stored format is defined here and nowhere else.
"""

from __future__ import annotations

from datetime import datetime, timezone
from typing import Any

import sqlalchemy as sa
from sqlalchemy.engine import Engine

__all__ = ["INSERT_COLUMNS", "UTCTimestamp", "add_missing_columns", "build_metadata", "state_is"]

#: Column order of inserted job rows (the table's order, without ``history``).
INSERT_COLUMNS = (
    "id", "method", "queue", "priority", "state", "attempts", "retry_count", "max_retries",
    "timeout_s", "created_at", "enqueued_at", "due_at", "started_at", "server_name",
    "expires_at", "payload", "job_metadata", "state_data",
)


def state_is(column: Any, *names: str) -> sa.ColumnElement[bool]:
    """``column = 'Name'`` (or ``IN (...)``) with the names as SQL literals, not parameters.

    The job table's partial indexes are declared with literal state names; a query only
    uses such an index when its own condition is written the same way, so every state
    test in this module goes through here.
    """
    literals: list[sa.ColumnElement[Any]] = [sa.literal_column(f"'{name}'") for name in names]
    column_element: sa.ColumnElement[Any] = column
    if len(literals) == 1:
        return column_element == literals[0]
    return column_element.in_(literals)


class UTCTimestamp(sa.types.TypeDecorator[datetime]):
    """An aware UTC datetime column: a float of Unix seconds on SQLite, ``timestamptz`` elsewhere.

    Floats keep SQLite comparisons numeric and exact to the microsecond range that
    matters for ordering; naive datetimes are refused on the way in.
    """

    impl = sa.Float
    cache_ok = True

    def load_dialect_impl(self, dialect: sa.Dialect) -> sa.types.TypeEngine[Any]:
        """Float on SQLite, timezone-aware DateTime on other dialects."""
        if dialect.name == "sqlite":
            return dialect.type_descriptor(sa.Float())
        return dialect.type_descriptor(sa.DateTime(timezone=True))

    def process_bind_param(self, value: datetime | None, dialect: sa.Dialect) -> Any:
        """Aware datetime -> column value."""
        if value is None:
            return None
        if value.tzinfo is None:
            raise ValueError("naive datetime given to a UTC column")
        return value.timestamp() if dialect.name == "sqlite" else value.astimezone(timezone.utc)

    def process_result_value(self, value: Any, dialect: sa.Dialect) -> datetime | None:
        """Column value -> aware UTC datetime."""
        if value is None:
            return None
        if isinstance(value, datetime):
            return value.astimezone(timezone.utc)
        return datetime.fromtimestamp(float(value), timezone.utc)


#: The backends whose partial indexes take a ``WHERE`` clause (``{backend}_where``).
PARTIAL_INDEX_BACKENDS = ("sqlite", "postgresql")


def build_metadata(schema: str | None = None, prefix: str = "qmlkit_",
                   backend: str | None = None) -> sa.MetaData:
    """Return the tables qmlkit keeps, optionally in ``schema``.

    Args:
        schema: A database schema name (PostgreSQL), or ``None`` for the default.
        prefix: Table name prefix.
        backend: SQLAlchemy's backend name of the engine the tables are for
            (``sa.URL.get_backend_name()``: ``"sqlite"``, ``"postgresql"``). Only that
            backend's partial-index option is attached, so SQLAlchemy imports no other
            dialect to check it (the PostgreSQL dialect would add about 2 MiB to a
            SQLite worker). ``None``, or a backend not in `PARTIAL_INDEX_BACKENDS`: the
            options of both, as the DDL of either needs.

    Returns:
        Metadata holding ``{prefix}jobs``, ``{prefix}recurring``, ``{prefix}stats``
        (per-minute throughput counters) and ``{prefix}servers``.
    """
    md = sa.MetaData(schema=schema)
    jobs = sa.Table(
        f"{prefix}jobs",
        md,
        sa.Column("id", sa.String(64), primary_key=True),
        sa.Column("method", sa.String(255), nullable=False),
        sa.Column("queue", sa.String(255), nullable=False),
        sa.Column("priority", sa.Integer, nullable=False, default=0),
        sa.Column("state", sa.String(16), nullable=False),
        sa.Column("attempts", sa.Integer, nullable=False, default=0),
        sa.Column("retry_count", sa.Integer, nullable=False, default=0),
        sa.Column("max_retries", sa.Integer, nullable=False),
        sa.Column("timeout_s", sa.Float, nullable=True),
        sa.Column("created_at", UTCTimestamp, nullable=False),
        sa.Column("enqueued_at", UTCTimestamp, nullable=True),
        sa.Column("due_at", UTCTimestamp, nullable=True),
        sa.Column("started_at", UTCTimestamp, nullable=True),
        sa.Column("server_name", sa.String(255), nullable=True),
        sa.Column("expires_at", UTCTimestamp, nullable=True),
        sa.Column("payload", sa.Text, nullable=False),
        sa.Column("job_metadata", sa.Text, nullable=False),
        sa.Column("state_data", sa.Text, nullable=False),
        # Earlier states, oldest first: one JSON state object per line (Storage.job_history).
        sa.Column("history", sa.Text, nullable=True),
    )
    backends = [backend] if backend in PARTIAL_INDEX_BACKENDS else PARTIAL_INDEX_BACKENDS

    def partial(name: str, *cols: Any, where: sa.ColumnElement[bool]) -> None:
        # Partial indexes: rows outside ``where`` cost nothing to insert or update.
        options: dict[str, Any] = {f"{b}_where": where for b in backends}  # dialect kwargs
        sa.Index(name, *cols, **options)

    c = jobs.c
    partial(f"{prefix}jobs_claim", c.queue, c.priority.desc(), c.enqueued_at, c.id,
            where=state_is(c.state, "Enqueued"))
    partial(f"{prefix}jobs_due", c.due_at, where=state_is(c.state, "Scheduled", "AwaitingRetry"))
    partial(f"{prefix}jobs_expires", c.expires_at, where=c.expires_at.isnot(None))
    partial(f"{prefix}jobs_processing", c.server_name, c.started_at,
            where=state_is(c.state, "Processing"))
    sa.Index(f"{prefix}jobs_created", c.created_at)
    # Counts by queue and state (stats, the dashboard) read this index, not the table.
    sa.Index(f"{prefix}jobs_queue_state", c.queue, c.state)
    sa.Table(
        f"{prefix}recurring",
        md,
        sa.Column("id", sa.String(255), primary_key=True),
        sa.Column("definition", sa.Text, nullable=False),
        sa.Column("next_run_at", UTCTimestamp, nullable=True),
        sa.Column("last_run_at", UTCTimestamp, nullable=True),
    )
    sa.Table(
        f"{prefix}stats",
        md,
        sa.Column("minute", UTCTimestamp, primary_key=True),
        sa.Column("state", sa.String(16), primary_key=True),
        sa.Column("count", sa.Integer, nullable=False),
    )
    sa.Table(
        f"{prefix}servers",
        md,
        sa.Column("id", sa.String(255), primary_key=True),
        sa.Column("info", sa.Text, nullable=False),
        sa.Column("last_heartbeat", UTCTimestamp, nullable=False),
    )
    return md



def add_missing_columns(engine: Engine, table: sa.Table) -> None:
    """Bring an older SQLite file's table up to date: add the nullable columns and the
    indexes a newer qmlkit declares."""
    with engine.begin() as conn:
        have = {row[1] for row in conn.exec_driver_sql(f'PRAGMA table_info("{table.name}")')}
        for column in table.columns:
            if column.name not in have and column.nullable:
                kind = column.type.compile(dialect=engine.dialect)
                conn.exec_driver_sql(
                    f'ALTER TABLE "{table.name}" ADD COLUMN "{column.name}" {kind}')
        for index in table.indexes:
            index.create(conn, checkfirst=True)
