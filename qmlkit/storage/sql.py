"""``SQLStorage``: jobs in a SQL database through SQLAlchemy 2 Core; SQLite by default.

``sqlite:///path/to/qmlkit.db`` is qmlkit's embedded default storage. The file is opened
in WAL mode with ``synchronous=NORMAL`` and a busy timeout, and every write transaction
starts with ``BEGIN IMMEDIATE``, so several worker processes on one machine can share one
file: a claim is one short write transaction, and two claimers never see the same row
(field case C19). Brief lock contention is retried with backoff inside the storage and
only surfaces, as ``StorageUnavailable``, if it outlasts ``busy_timeout_s``.

Claims and acknowledgements are batched: one claim transaction takes up to ``limit``
jobs, one ``transition_many`` transaction stores every outcome of a batch. Other SQL
dialects can reuse this class (the PostgreSQL plugin builds on it); only SQLite is
configured here.
"""

from __future__ import annotations

import json
import logging
import operator
import random
import threading
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, TypeVar

import sqlalchemy as sa
import sqlalchemy.dialects.postgresql
import sqlalchemy.dialects.sqlite
from pydantic import TypeAdapter, ValidationError
from sqlalchemy import event
from sqlalchemy.engine import Connection, Engine
from sqlalchemy.exc import DBAPIError, IntegrityError, OperationalError

from qmlkit.errors import (
    ConfigurationError,
    DuplicateJob,
    InvalidTransition,
    JobNotFound,
    StaleClaim,
    StorageError,
    StorageUnavailable,
)
from qmlkit.job import (
    AwaitingRetry,
    Enqueued,
    Failed,
    Job,
    JobState,
    Processing,
    Scheduled,
    check_transition,
    encode_metadata,
    encode_payload,
    trusted,
)
from qmlkit.limits import storable_id
from qmlkit.recurring import RecurringJob
from qmlkit.storage.base import (
    MAX_CLAIM,
    STATS_RETENTION,
    ServerInfo,
    StateChange,
    Storage,
    Transition,
    minute_of,
)

log = logging.getLogger(__name__)
T = TypeVar("T")

_STATE = TypeAdapter(JobState)
_EXPIRABLE = ("Succeeded", "Failed", "Deleted")


def state_is(column: Any, *names: str) -> sa.ColumnElement[bool]:
    """``column = 'Name'`` (or ``IN (...)``) with the names as SQL literals, not parameters.

    The job table's partial indexes are declared with literal state names; a query only
    uses such an index when its own condition is written the same way, so every state
    test in this module goes through here.
    """
    literals = [sa.literal_column(f"'{name}'") for name in names]
    return column == literals[0] if len(literals) == 1 else column.in_(literals)


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


def build_metadata(schema: str | None = None, prefix: str = "qmlkit_") -> sa.MetaData:
    """Return the tables qmlkit keeps, optionally in ``schema``.

    Args:
        schema: A database schema name (PostgreSQL), or ``None`` for the default.
        prefix: Table name prefix.

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
    def partial(name: str, *cols: Any, where: sa.ColumnElement[bool]) -> None:
        # Partial indexes: rows outside ``where`` cost nothing to insert or update.
        sa.Index(name, *cols, sqlite_where=where, postgresql_where=where)

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


class SQLStorage(Storage):
    """SQL storage on SQLAlchemy 2 Core. See the module docstring.

    Args:
        url: A SQLAlchemy URL, e.g. ``"sqlite:///qmlkit.db"``.
        busy_timeout_s: How long a write waits for the database lock, in seconds,
            retries included, before ``StorageUnavailable``.
        pool_size: Connections kept open (SQLite: one per worker thread is plenty).
        max_payload_bytes: Largest encoded arguments accepted, in bytes.
        schema: Database schema for the tables (not for SQLite).
        engine_options: Extra keyword arguments for ``sqlalchemy.create_engine``.

    Raises:
        ConfigurationError: The URL cannot be parsed, its driver is missing, or the
            SQLite file's directory does not exist (the message names the path).
    """

    def __init__(
        self,
        url: str,
        *,
        busy_timeout_s: float = 30.0,
        pool_size: int = 16,
        max_payload_bytes: int | None = None,
        schema: str | None = None,
        engine_options: Mapping[str, Any] | None = None,
    ) -> None:
        self.url = url
        if max_payload_bytes is not None:
            self.max_payload_bytes = max_payload_bytes
        self.busy_timeout_s = busy_timeout_s
        try:
            self._sa_url = sa.engine.make_url(url)
        except sa.exc.ArgumentError as exc:
            raise ConfigurationError(f"cannot parse storage URL {url!r}: {exc}") from exc
        self.is_sqlite = self._sa_url.get_backend_name() == "sqlite"
        if self.is_sqlite:
            database = self._sa_url.database
            if not database or database == ":memory:":
                raise ConfigurationError(
                    f"storage URL {url!r} names no SQLite file; use 'sqlite:///path/to/file.db' "
                    "(or 'memory://' for in-process storage)"
                )
            parent = Path(database).expanduser().resolve().parent
            if not parent.is_dir():
                raise ConfigurationError(
                    f"SQLite storage {url!r}: directory {str(parent)!r} does not exist; "
                    "create it or choose another path"
                )
            schema = None
        self._pool_size = pool_size
        self._engine_options = dict(engine_options or {})
        self._md = build_metadata(schema)
        self.jobs = self._md.tables[f"{schema + '.' if schema else ''}qmlkit_jobs"]
        self.servers = self._md.tables[f"{schema + '.' if schema else ''}qmlkit_servers"]
        self.recurring = self._md.tables[f"{schema + '.' if schema else ''}qmlkit_recurring"]
        self.stats = self._md.tables[f"{schema + '.' if schema else ''}qmlkit_stats"]
        self._engine: Engine | None = None
        self._open_lock = threading.Lock()
        self._sql_cache: dict[tuple[Any, ...], tuple[str, Any, dict[str, Any]]] = {}
        self._multi_sql: dict[int, str] = {}

    @classmethod
    def from_url(cls, url: str, options: Mapping[str, Any]) -> SQLStorage:
        """Build from a URL and the storage options.

        Raises:
            ConfigurationError: An unknown option, named, or a bad URL.
        """
        known = {"busy_timeout_s", "pool_size", "max_payload_bytes", "schema", "engine_options"}
        unknown = set(options) - known
        if unknown:
            raise ConfigurationError(
                f"SQL storage: unknown option(s) {sorted(unknown)}; known: {sorted(known)}"
            )
        return cls(url, **options)

    # --- lifecycle -------------------------------------------------------------------

    @property
    def engine(self) -> Engine:
        """The SQLAlchemy engine (opening the storage on first use)."""
        if self._engine is None:
            self.open()
        assert self._engine is not None
        return self._engine

    def open(self) -> None:
        """See `Storage.open`. Creates the tables and indexes if missing."""
        with self._open_lock:
            if self._engine is not None:
                return
            options: dict[str, Any] = {"pool_pre_ping": not self.is_sqlite}
            if self.is_sqlite:
                options.update(pool_size=self._pool_size, max_overflow=self._pool_size)
                options["connect_args"] = {"check_same_thread": False, "timeout": 5.0}
            options.update(self._engine_options)
            try:
                engine = sa.create_engine(self._sa_url, **options)
            except (ImportError, sa.exc.ArgumentError) as exc:
                raise ConfigurationError(
                    f"cannot create a database engine for {self!r}: {exc}"
                ) from exc
            if self.is_sqlite:
                _configure_sqlite(engine)
            try:
                self._retry(lambda: self._md.create_all(engine), engine=engine)
                if self.is_sqlite:
                    self._retry(lambda: _add_missing_columns(engine, self.jobs), engine=engine)
            except StorageUnavailable:
                engine.dispose()
                raise
            self._engine = engine

    def close(self) -> None:
        """See `Storage.close`."""
        with self._open_lock:
            if self._engine is not None:
                self._engine.dispose()
                self._engine = None

    # --- transactions with retry ---------------------------------------------------------

    def _retry(self, fn: Callable[[], T], *, engine: Engine | None = None) -> T:
        """Run ``fn``, retrying lock contention and dropped connections with backoff."""
        deadline = time.monotonic() + self.busy_timeout_s
        delay = 0.005
        while True:
            try:
                result = fn()
            except OperationalError as exc:
                transient = self._is_transient(exc)
                if not transient or time.monotonic() >= deadline:
                    raise StorageUnavailable(f"{self!r}: {exc.orig}") from exc
                self._note_connection_lost(exc)
                log.debug("storage busy (%s); retrying in %.3f s", exc.orig, delay)
            except IntegrityError:
                raise
            except DBAPIError as exc:
                if not exc.connection_invalidated or time.monotonic() >= deadline:
                    raise StorageError(f"{self!r}: {exc.orig}") from exc
                self._note_connection_lost(exc)
            else:
                if self._connection_lost:
                    self._connection_lost = False
                    log.info("%r: connection restored", self)
                return result
            time.sleep(delay * (0.5 + random.random()))  # noqa: S311 - jitter, not crypto
            delay = min(delay * 2, 0.5)

    #: Whether the last storage call saw a dropped connection (for logging state changes).
    _connection_lost = False

    def _note_connection_lost(self, exc: DBAPIError) -> None:
        """Log, once per outage, that the database connection dropped (not lock contention)."""
        text = str(exc.orig).lower()
        if "locked" in text or "busy" in text or self._connection_lost:
            return
        self._connection_lost = True
        log.warning("%r: connection lost (%s); retrying with backoff",
                    self, str(exc.orig).strip().splitlines()[0] if str(exc.orig).strip() else exc)

    def _is_transient(self, exc: OperationalError) -> bool:
        if exc.connection_invalidated:
            return True
        text = str(exc.orig).lower()
        return "locked" in text or "busy" in text or not self.is_sqlite

    @contextmanager
    def _read(self) -> Iterator[Connection]:
        with self.engine.connect().execution_options(qmlkit_read=True) as conn, conn.begin():
            yield conn

    def _write(self, fn: Callable[[Connection], T]) -> T:
        """Run ``fn(conn)`` in one write transaction (``BEGIN IMMEDIATE`` on SQLite), retried."""

        def attempt() -> T:
            with self.engine.begin() as conn:
                return fn(conn)

        return self._retry(attempt)

    def _write_raw(self, fn: Callable[[Any], T], *, engine: Engine | None = None) -> T:
        """Run ``fn(cursor)`` in one write transaction on a pooled DBAPI connection, retried.

        The hot paths (enqueue, claim, acknowledge) use this: it skips SQLAlchemy's
        per-statement execution machinery, which costs more than SQLite's own work for a
        batch. Driver errors are wrapped as SQLAlchemy's (``OperationalError``, …) so
        ``_retry`` treats them like any other.
        """
        engine = engine or self.engine
        dbapi = engine.dialect.loaded_dbapi

        def attempt() -> T:
            try:  # the pool's connect errors are the driver's own: wrap them too
                raw = engine.raw_connection()
            except dbapi.Error as exc:
                raise sa.exc.DBAPIError.instance(
                    None, None, exc, dbapi.Error, dialect=engine.dialect
                ) from exc
            try:
                cursor = raw.cursor()
                try:
                    if self.is_sqlite:
                        cursor.execute("BEGIN IMMEDIATE")
                    result = fn(cursor)
                    self._commit_raw(raw)
                    return result
                except BaseException:
                    try:
                        raw.rollback()
                    except dbapi.Error:
                        raw.invalidate()
                    raise
                finally:
                    cursor.close()
            except dbapi.Error as exc:
                raise sa.exc.DBAPIError.instance(
                    None, None, exc, dbapi.Error, dialect=engine.dialect
                ) from exc
            finally:
                raw.close()  # back to the pool

        return self._retry(attempt)

    # --- history and counters ------------------------------------------------------------

    @property
    def _history_append(self) -> Any:
        """SQL for ``history`` with the row's current state appended (SET sees old values).

        One JSON state per line: text concatenation, so a row whose state data is not
        JSON still moves (and is quarantined) instead of failing the statement.
        """
        newline = "char(10)" if self.is_sqlite else "chr(10)"
        return sa.literal_column(f"coalesce(history, '') || state_data || {newline}")

    def _count_outcomes(self, cursor: Any, states: Sequence[JobState]) -> None:
        """Add Succeeded/Failed outcomes to the per-minute counters (one upsert)."""
        counts: dict[tuple[Any, str], int] = {}
        for state in states:
            if state.name == "Succeeded":
                at = state.succeeded_at  # type: ignore[union-attr]
            elif state.name == "Failed":
                at = state.failed_at  # type: ignore[union-attr]
            else:
                continue
            key = (self._bind_ts(minute_of(at)), state.name)
            counts[key] = counts.get(key, 0) + 1
        if not counts:
            return
        st = self.stats

        def build() -> Any:
            insert = (sa.dialects.sqlite.insert if self.is_sqlite
                      else sa.dialects.postgresql.insert)(st).values(
                minute=sa.bindparam("m", type_=sa.Float if self.is_sqlite else None),
                state=sa.bindparam("s"), count=sa.bindparam("n"))
            return insert.on_conflict_do_update(
                index_elements=[st.c.minute, st.c.state],
                set_={"count": st.c.count + insert.excluded.count})

        self._run(cursor, ("stats-upsert",), build,
                  [{"m": m, "s": name, "n": n} for (m, name), n in counts.items()], many=True)

    def job_history(self, job_id: str) -> list[JobState]:
        """See `Storage.job_history`."""
        c = self.jobs.c
        query = sa.select(c.history, c.state_data).where(c.id == job_id)

        def read() -> Any:
            with self._read() as conn:
                return conn.execute(query).first()

        row = self._retry(read)
        if row is None:
            return []
        states: list[JobState] = []
        for raw in [*(row[0] or "").splitlines(), row[1]]:
            try:
                states.append(_STATE.validate_json(raw))
            except ValidationError:
                log.warning("job %s: a history entry cannot be decoded; skipped", job_id)
        return states

    def throughput(self, *, since: datetime, until: datetime) -> list[tuple[datetime, int, int]]:
        """See `Storage.throughput`."""
        st = self.stats
        query = (sa.select(st.c.minute, st.c.state, st.c.count)
                 .where(st.c.minute >= minute_of(since)).where(st.c.minute <= until))

        def read() -> list[Any]:
            with self._read() as conn:
                return list(conn.execute(query))

        buckets: dict[datetime, list[int]] = {}
        for minute, state, count in self._retry(read):
            bucket = buckets.setdefault(minute, [0, 0])
            bucket[0 if state == "Succeeded" else 1] += count
        return [(m, ok, failed) for m, (ok, failed) in sorted(buckets.items())]

    def _commit_raw(self, raw: Any) -> None:
        """Commit a `_write_raw` transaction (a subclass may skip it in autocommit mode)."""
        raw.commit()

    # --- row <-> job -------------------------------------------------------------------------

    #: Column order of inserted rows (the table's order).
    _INSERT_COLUMNS = (
        "id", "method", "queue", "priority", "state", "attempts", "retry_count", "max_retries",
        "timeout_s", "created_at", "enqueued_at", "due_at", "started_at", "server_name",
        "expires_at", "payload", "job_metadata", "state_data",
    )

    #: Rows per multi-row INSERT (18 parameters each; SQLite allows 32,766 per statement).
    _ROWS_PER_INSERT = 500

    def _insert_rows(self, jobs: Sequence[Job]) -> list[tuple[Any, ...]]:
        """Encode jobs as insert rows (tuples in ``_INSERT_COLUMNS`` order), checking each.

        Raises:
            PayloadError: A job's arguments or metadata are not JSON or too large.
            InvalidTransition: A job is not Enqueued or Scheduled.
        """
        ts = self._bind_ts
        limit = self.max_payload_bytes
        states: dict[int, tuple[Any, ...]] = {}  # jobs of one bulk enqueue share a state
        rows = []
        for job in jobs:
            state = job.state
            cols = states.get(id(state))
            if cols is None:
                check_transition(job.id, None, state.name)
                c = self._state_columns(state)
                cols = states[id(state)] = (
                    c["state"], ts(c["enqueued_at"]), ts(c["due_at"]), ts(c["started_at"]),
                    c["server_name"], c["state_data"],
                )
            rows.append((
                job.id, job.method, job.queue, job.priority, cols[0], job.attempts,
                job.retry_count, job.max_retries, job.timeout_s, ts(job.created_at),
                cols[1], cols[2], cols[3], cols[4], ts(job.expires_at),
                encode_payload(job.args, job.kwargs, limit),
                encode_metadata(job.metadata, limit),
                cols[5],
            ))
        return rows

    def _insert_jobs(self, cursor: Any, rows: list[tuple[Any, ...]]) -> None:
        """Insert encoded rows at driver level.

        With ``qmark`` parameters (SQLite) rows go in multi-row ``INSERT … VALUES`` of up
        to ``_ROWS_PER_INSERT`` rows, measured faster than ``executemany`` here; other
        drivers get one ``executemany``.
        """
        cols = self._INSERT_COLUMNS
        sql, order, _ = self._compiled(("insert",), lambda: self.jobs.insert().values(
            {k: sa.bindparam(k) for k in cols}))
        if self.engine.dialect.paramstyle == "qmark" and sql.count("?") == len(cols):
            head, _, group = sql.partition(" VALUES ")
            for start in range(0, len(rows), self._ROWS_PER_INSERT):
                chunk = rows[start:start + self._ROWS_PER_INSERT]
                if len(chunk) == 1:
                    cursor.execute(sql, chunk[0])
                    continue
                many = self._multi_sql.get(len(chunk))
                if many is None:
                    many = self._multi_sql[len(chunk)] = f"{head} VALUES {','.join([group] * len(chunk))}"
                cursor.execute(many, [value for row in chunk for value in row])
        elif order is not None:
            cursor.executemany(sql, [_as_tuple(order(dict(zip(cols, r)))) for r in rows])
        else:
            cursor.executemany(sql, [dict(zip(cols, r)) for r in rows])

    @staticmethod
    def _state_columns(state: JobState) -> dict[str, Any]:
        values: dict[str, Any] = {
            "state": state.name, "state_data": state.model_dump_json(),
            "enqueued_at": None, "due_at": None, "started_at": None, "server_name": None,
        }
        if isinstance(state, Enqueued):
            values["enqueued_at"] = state.enqueued_at
        elif isinstance(state, Processing):
            values["started_at"] = state.started_at
            values["server_name"] = state.server_name
        elif isinstance(state, Scheduled):
            values["due_at"] = state.enqueue_at
        elif isinstance(state, AwaitingRetry):
            values["due_at"] = state.retry_at
        return values

    def _decode(self, row: sa.Row[Any] | Mapping[str, Any]) -> tuple[Job, str | None]:
        """Row -> (job, None), or (a Failed stand-in, reason) for a row that will not decode."""
        m = row._mapping if isinstance(row, sa.Row) else row
        try:
            payload = json.loads(m["payload"])
            job = Job(
                id=m["id"], method=m["method"], args=payload["args"], kwargs=payload["kwargs"],
                queue=m["queue"], priority=m["priority"], attempts=m["attempts"],
                retry_count=m["retry_count"], max_retries=m["max_retries"],
                timeout_s=m["timeout_s"], metadata=json.loads(m["job_metadata"]),
                created_at=m["created_at"], expires_at=m["expires_at"],
                state=_STATE.validate_json(m["state_data"]),
            )
            if job.state.name != m["state"]:
                raise ValueError(f"state column {m['state']!r} disagrees with state data")
        except (ValueError, TypeError, KeyError, ValidationError) as exc:
            reason = f"stored row cannot be decoded: {type(exc).__name__}: {exc}"[:2000]
            stand_in = Job(
                id=str(m["id"]), method=str(m["method"] or "?"), queue=str(m["queue"] or "?"),
                created_at=_safe_time(m, "created_at"),
                state=Failed(failed_at=datetime.now(timezone.utc),
                             exception_type="qmlkit.errors.PayloadError", message=reason),
            )
            return stand_in, reason
        return job, None

    # --- enqueue and read --------------------------------------------------------------------

    def enqueue_many(self, jobs: Sequence[Job]) -> list[Job]:
        """See `Storage.enqueue_many`."""
        if not jobs:
            return []
        rows = self._insert_rows(jobs)

        def insert(cursor: Any) -> None:
            self._insert_jobs(cursor, rows)

        try:
            self._write_raw(insert)
        except IntegrityError as exc:
            raise DuplicateJob(_duplicate_id(self, [j.id for j in jobs])) from exc
        return list(jobs)

    def get(self, job_id: str) -> Job | None:
        """See `Storage.get`."""
        if not storable_id(job_id):  # a NUL or a lone surrogate: no driver can send it
            return None

        def read() -> sa.Row[Any] | None:
            with self._read() as conn:
                return conn.execute(self.jobs.select().where(self.jobs.c.id == job_id)).first()

        row = self._retry(read)
        return None if row is None else self._decode(row)[0]

    def list_jobs(
        self,
        *,
        state: str | None = None,
        queue: str | None = None,
        method: str | None = None,
        limit: int = 100,
        offset: int = 0,
    ) -> list[Job]:
        """See `Storage.list_jobs`."""
        c = self.jobs.c
        query = (self.jobs.select().order_by(c.created_at.desc(), c.id.desc())
                 .limit(limit).offset(offset))
        for column, value in ((c.state, state), (c.queue, queue), (c.method, method)):
            if value is not None:
                query = query.where(column == value)

        def read() -> list[sa.Row[Any]]:
            with self._read() as conn:
                return list(conn.execute(query))

        return [self._decode(row)[0] for row in self._retry(read)]

    def count_jobs(self) -> dict[tuple[str, str], int]:
        """See `Storage.count_jobs`."""
        c = self.jobs.c
        query = sa.select(c.queue, c.state, sa.func.count()).group_by(c.queue, c.state)

        def read() -> dict[tuple[str, str], int]:
            with self._read() as conn:
                return {(q, s): n for q, s, n in conn.execute(query)}

        return self._retry(read)

    def change_state(
        self,
        job_id: str,
        state: JobState,
        *,
        expected: Sequence[str] = (),
        expires_at: datetime | None = None,
    ) -> StateChange:
        """See `Storage.change_state`."""
        c = self.jobs.c

        def change(conn: Connection) -> StateChange:
            row = conn.execute(self.jobs.select().where(c.id == job_id)).first()
            if row is None:
                raise JobNotFound(job_id)
            job, corrupt = self._decode(row)
            if corrupt and state.name != "Deleted":
                raise InvalidTransition(job_id, "corrupt", state.name)
            if expected and job.state.name not in expected:
                raise InvalidTransition(job_id, job.state.name, state.name)
            changed = job if corrupt else job.with_state(state, expires_at=expires_at)
            values = {**self._state_columns(state), "expires_at": expires_at,
                      "history": self._history_append}
            conn.execute(self.jobs.update().where(c.id == job_id).values(values))
            cursor = conn.connection.driver_connection.cursor()
            try:
                self._count_outcomes(cursor, [state])
            finally:
                cursor.close()
            return StateChange(changed.model_copy(update={"state": state}), job.state)

        return self._write(change)

    # --- claim and fenced transitions -------------------------------------------------------------

    # Hot paths (claim, acknowledge) run statements compiled once per dialect and shape,
    # executed at driver level: SQLAlchemy's per-call statement building and per-value
    # type processing cost more than SQLite's own work for a small batch.

    def _compiled(
        self, key: tuple[Any, ...], build: Callable[[], Any]
    ) -> tuple[str, Any, dict[str, Any]]:
        """Return ``(sql, param_order, constants)``, compiling the statement on first use."""
        found = self._sql_cache.get(key)
        if found is None:
            compiled = build().compile(dialect=self.engine.dialect)
            order = (
                operator.itemgetter(*compiled.positiontup)
                if compiled.positional and compiled.positiontup else None
            )
            constants = {k: v for k, v in compiled.params.items() if v is not None}
            found = self._sql_cache[key] = (str(compiled), order, constants)
        return found

    def _run(self, cursor: Any, key: tuple[Any, ...], build: Callable[[], Any],
             params: Any, many: bool = False) -> Any:
        """Execute a cached compiled statement on a DBAPI cursor; returns the cursor."""
        sql, order, constants = self._compiled(key, build)
        if constants:
            params = [{**constants, **p} for p in params] if many else {**constants, **params}
        if order is not None:
            params = [_as_tuple(order(p)) for p in params] if many else _as_tuple(order(params))
        if many:
            cursor.executemany(sql, params)
        else:
            cursor.execute(sql, params)
        return cursor

    def _bind_ts(self, value: datetime | None) -> Any:
        if value is None:
            return None
        return value.timestamp() if self.is_sqlite else value

    def _result_ts(self, value: Any) -> datetime | None:
        if value is None or isinstance(value, datetime):
            return value.astimezone(timezone.utc) if value is not None else None
        return datetime.fromtimestamp(float(value), timezone.utc)

    def _claim_rows(self, cursor: Any, queues: Sequence[str], limit: int) -> list[dict[str, Any]]:
        c = self.jobs.c
        names = [f"q{i}" for i in range(len(queues))]
        claimed_columns = [col for col in self.jobs.columns if col.key != "history"]

        def build() -> Any:
            query = (
                sa.select(*claimed_columns)
                .where(state_is(c.state, "Enqueued"))
                .order_by(c.priority.desc(), c.enqueued_at, c.id)  # id: FIFO within a batch
                .limit(sa.bindparam("limit", type_=sa.Integer, literal_execute=False))
            )
            if names:
                query = query.where(sa.or_(*(c.queue == sa.bindparam(n) for n in names)))
            if not self.is_sqlite:
                query = query.with_for_update(skip_locked=True)
            return query

        params = dict(zip(names, queues), limit=limit)
        result = self._run(cursor, ("claim", len(names)), build, params)
        keys = [col.key for col in claimed_columns]
        rows = []
        for raw in result.fetchall():
            row = dict(zip(keys, raw))
            for k in ("created_at", "expires_at"):
                row[k] = self._result_ts(row[k])
            rows.append(row)
        return rows

    def claim(
        self,
        *,
        worker_id: str,
        server_name: str,
        queues: Sequence[str],
        limit: int,
        now: datetime,
    ) -> list[Job]:
        """See `Storage.claim`; this path never decodes the previous states."""
        return [job for job, _ in self._claim(worker_id, server_name, queues, limit, now, False)]

    def claim_changes(
        self,
        *,
        worker_id: str,
        server_name: str,
        queues: Sequence[str],
        limit: int,
        now: datetime,
    ) -> list[StateChange]:
        """See `Storage.claim_changes`."""
        return [StateChange(job, previous)
                for job, previous in self._claim(worker_id, server_name, queues, limit, now, True)]

    def _claim(
        self,
        worker_id: str,
        server_name: str,
        queues: Sequence[str],
        limit: int,
        now: datetime,
        with_previous: bool,
    ) -> list[tuple[Job, JobState | None]]:
        limit = max(1, min(limit, MAX_CLAIM))
        c = self.jobs.c
        processing = Processing(started_at=now, worker_id=worker_id, server_name=server_name)
        columns = self._state_columns(processing)
        queues = list(queues)

        def build_update() -> Any:
            return (
                self.jobs.update()
                .where(c.id == sa.bindparam("b_id"))
                .values(state=sa.bindparam("state"), state_data=sa.bindparam("state_data"),
                        enqueued_at=None, due_at=None,
                        started_at=sa.bindparam("started_at", type_=sa.Float),
                        server_name=sa.bindparam("server_name"),
                        attempts=c.attempts + 1, history=self._history_append)
            )

        def claim(cursor: Any) -> list[tuple[Job, JobState | None]]:
            rows = self._claim_rows(cursor, queues, limit)
            if not rows:
                return []
            claimed, updates = [], []
            started = self._bind_ts(now)
            for row in rows:
                if row["state_data"].startswith('{"name":"Enqueued"'):
                    try:  # fast path: the new state is known, only the payload needs decoding
                        job = claimed_job(row, row["attempts"] + 1, processing)
                        previous = (_STATE.validate_json(row["state_data"])
                                    if with_previous else None)
                    except (ValueError, TypeError, KeyError, ValidationError):
                        pass  # decoded again below, for the reason
                    else:
                        claimed.append((job, previous))
                        updates.append({**columns, "started_at": started, "b_id": job.id})
                        continue
                stand_in, reason = self._decode(row)
                if reason is None:  # valid after all (an unusual encoding of the state)
                    claimed.append((stand_in.with_state(processing, attempts=stand_in.attempts + 1),
                                    stand_in.state))
                    updates.append({**columns, "started_at": started, "b_id": stand_in.id})
                    continue
                log.error("job %s quarantined: %s", stand_in.id, reason)
                updates.append({**self._state_columns(stand_in.state), "b_id": stand_in.id})
            self._run(cursor, ("claim-update",), build_update, updates, many=True)
            return claimed

        return self._write_raw(claim)

    def transition_many(self, items: Sequence[Transition]) -> list[Job | StaleClaim]:
        """See `Storage.transition_many`."""
        if not items:
            return []
        c = self.jobs.c
        applied = [item.applied() for item in items]
        params = []
        cache: dict[int, dict[str, Any]] = {}
        for item, job in zip(items, applied):
            columns = cache.get(id(job.state))
            if columns is None:
                columns = cache[id(job.state)] = self._state_columns(job.state)
            params.append({
                **columns, "b_id": item.job.id, "b_token": item.token,
                "retry_count": job.retry_count,
            })
            for key in ("enqueued_at", "due_at", "started_at"):
                params[-1][key] = self._bind_ts(columns[key])
            params[-1]["expires_at"] = self._bind_ts(job.expires_at)
        n = len(items)

        def build_check() -> Any:
            return sa.select(c.id, c.attempts).where(state_is(c.state, "Processing")).where(
                c.id.in_([sa.bindparam(f"i{k}") for k in range(n)]))

        def build_update() -> Any:
            fields = ("state", "state_data", "enqueued_at", "due_at", "started_at",
                      "server_name", "retry_count", "expires_at")
            return (
                self.jobs.update()
                .where(c.id == sa.bindparam("b_id"))
                .values({**{f: sa.bindparam(f) for f in fields}, "history": self._history_append})
            )

        def write(cursor: Any) -> set[str]:
            ids = {f"i{k}": item.job.id for k, item in enumerate(items)}
            live = set(map(tuple, self._run(cursor, ("ack-check", n), build_check, ids).fetchall()))
            ok = [p for p in params if (p["b_id"], p["b_token"]) in live]
            if ok:
                self._run(cursor, ("ack-update",), build_update, ok, many=True)
                done_ids = {p["b_id"] for p in ok}
                self._count_outcomes(cursor, [job.state for item, job in zip(items, applied)
                                              if item.job.id in done_ids])
            return {p["b_id"] for p in ok}

        done = self._write_raw(write)
        return [
            job if item.job.id in done else StaleClaim(item.job.id, item.token)
            for item, job in zip(items, applied)
        ]

    def report_progress(self, job_id: str, *, token: int, progress: Mapping[str, Any]) -> bool:
        """See `Storage.report_progress`: one fenced ``UPDATE`` with the database's JSON
        functions, so a concurrent change to other metadata keys is never overwritten."""
        c = self.jobs.c
        entry = json.dumps(dict(progress), separators=(",", ":"))
        if self.is_sqlite:
            merged = sa.func.json_set(c.job_metadata, "$.progress", sa.func.json(entry))
        else:
            merged = sa.cast(
                sa.cast(c.job_metadata, sa.dialects.postgresql.JSONB).op("||")(
                    sa.func.jsonb_build_object("progress", sa.cast(
                        sa.bindparam("progress_entry", entry, type_=sa.Text),
                        sa.dialects.postgresql.JSONB))
                ),
                sa.Text,
            )
        stmt = (self.jobs.update()
                .where(c.id == job_id).where(state_is(c.state, "Processing"))
                .where(c.attempts == token).values(job_metadata=merged))
        return bool(self._write(lambda conn: conn.execute(stmt).rowcount))

    # --- background duties ------------------------------------------------------------

    def _move(
        self,
        conn: Connection,
        where: sa.ColumnElement[bool],
        make_state: Callable[[Job], JobState],
        limit: int | None = None,
    ) -> list[StateChange]:
        """Move every job matching ``where`` to ``make_state(job)`` in this transaction."""
        c = self.jobs.c
        query = self.jobs.select().where(where).order_by(c.id)
        if limit is not None:
            query = query.limit(limit)
        if not self.is_sqlite:
            query = query.with_for_update(skip_locked=True)
        changes = []
        for row in conn.execute(query).all():
            job, corrupt = self._decode(row)
            if corrupt:
                continue
            state = make_state(job)
            moved = job.with_state(state)
            conn.execute(
                self.jobs.update().where(c.id == job.id).values(
                    {**self._state_columns(state), "history": self._history_append})
            )
            changes.append(StateChange(moved, job.state))
        return changes

    def promote_due(self, *, now: datetime, limit: int = 1000) -> list[StateChange]:
        """See `Storage.promote_due`."""
        c = self.jobs.c
        where = state_is(c.state, "Scheduled", "AwaitingRetry") & (c.due_at <= now)
        return self._write(
            lambda conn: self._move(
                conn, where, lambda j: Enqueued(enqueued_at=now, queue=j.queue), limit
            )
        )

    def next_due_at(self) -> datetime | None:
        """See `Storage.next_due_at`."""
        c = self.jobs.c
        query = sa.select(sa.func.min(c.due_at)).where(state_is(c.state, "Scheduled", "AwaitingRetry"))

        def read() -> datetime | None:
            with self._read() as conn:
                value = conn.execute(query).scalar()
            return UTCTimestamp().process_result_value(value, self.engine.dialect)

        return self._retry(read)

    def requeue_stranded(
        self,
        *,
        started_before: datetime,
        now: datetime,
        exclude_servers: Sequence[str] = (),
    ) -> list[StateChange]:
        """See `Storage.requeue_stranded`."""
        c = self.jobs.c
        where = state_is(c.state, "Processing") & (c.started_at < started_before)
        if exclude_servers:
            where = where & c.server_name.not_in(list(exclude_servers))
        return self._write(
            lambda conn: self._move(
                conn, where, lambda j: Enqueued(enqueued_at=now, queue=j.queue, reason="stranded")
            )
        )

    def delete_expired(self, *, now: datetime, limit: int = 1000) -> int:
        """See `Storage.delete_expired`."""
        c = self.jobs.c
        doomed = (
            sa.select(c.id)
            .where(c.expires_at <= now)
            .where(state_is(c.state, *_EXPIRABLE))
            .limit(limit)
            .scalar_subquery()
        )
        st = self.stats

        def write(conn: Connection) -> int:
            deleted = conn.execute(self.jobs.delete().where(c.id.in_(doomed))).rowcount
            conn.execute(st.delete().where(st.c.minute < minute_of(now - STATS_RETENTION)))
            return deleted

        return self._write(write)

    # --- recurring templates -------------------------------------------------------------

    def _template(self, definition: str, next_run_at: Any, last_run_at: Any) -> RecurringJob:
        template = RecurringJob.model_validate_json(definition)
        return template.model_copy(update={
            "next_run_at": self._result_ts(next_run_at), "last_run_at": self._result_ts(last_run_at)
        })

    def upsert_recurring(self, template: RecurringJob, *, keep_schedule: bool = False) -> None:
        """See `Storage.upsert_recurring`."""
        r = self.recurring
        values: dict[str, Any] = {"definition": template.model_dump_json()}
        if not keep_schedule:
            values.update(next_run_at=template.next_run_at, last_run_at=template.last_run_at)

        def write(conn: Connection) -> None:
            updated = conn.execute(r.update().where(r.c.id == template.id).values(values))
            if updated.rowcount == 0:
                conn.execute(r.insert().values(
                    id=template.id, definition=template.model_dump_json(),
                    next_run_at=template.next_run_at, last_run_at=template.last_run_at))

        self._write(write)

    def get_recurring(self, template_id: str) -> RecurringJob | None:
        """See `Storage.get_recurring`."""
        r = self.recurring
        query = sa.select(r.c.definition, r.c.next_run_at, r.c.last_run_at).where(
            r.c.id == template_id)

        def read() -> RecurringJob | None:
            with self._read() as conn:
                row = conn.execute(query).first()
            return None if row is None else self._template(*row)

        return self._retry(read)

    def list_recurring(self) -> list[RecurringJob]:
        """See `Storage.list_recurring`."""
        r = self.recurring
        query = sa.select(r.c.definition, r.c.next_run_at, r.c.last_run_at).order_by(r.c.id)

        def read() -> list[RecurringJob]:
            with self._read() as conn:
                return [self._template(*row) for row in conn.execute(query)]

        return self._retry(read)

    def remove_recurring(self, template_id: str) -> bool:
        """See `Storage.remove_recurring`."""
        r = self.recurring
        stmt = r.delete().where(r.c.id == template_id)
        return bool(self._write(lambda conn: conn.execute(stmt).rowcount))

    def fire_recurring(
        self,
        template_id: str,
        *,
        expected_next_run_at: datetime,
        next_run_at: datetime,
        job: Job | None,
    ) -> bool:
        """See `Storage.fire_recurring`."""
        r = self.recurring
        rows = self._insert_rows([job]) if job is not None else []
        values: dict[str, Any] = {"next_run_at": next_run_at}
        if job is not None:
            values["last_run_at"] = expected_next_run_at
        stmt = (r.update().where(r.c.id == template_id)
                .where(r.c.next_run_at == expected_next_run_at).values(values))

        def write(conn: Connection) -> bool:
            if conn.execute(stmt).rowcount != 1:
                return False  # another server advanced it first
            if rows:
                cursor = conn.connection.driver_connection.cursor()
                try:
                    self._insert_jobs(cursor, rows)
                finally:
                    cursor.close()
            return True

        dbapi_integrity = self.engine.dialect.loaded_dbapi.IntegrityError
        try:
            return self._write(write)
        except (IntegrityError, dbapi_integrity) as exc:
            raise DuplicateJob(job.id if job is not None else template_id) from exc

    # --- server registry --------------------------------------------------------------------

    def register_server(self, info: ServerInfo) -> None:
        """See `Storage.register_server`."""
        s = self.servers

        def write(conn: Connection) -> None:
            conn.execute(s.delete().where(s.c.id == info.id))
            conn.execute(s.insert().values(id=info.id, info=info.model_dump_json(),
                                           last_heartbeat=info.last_heartbeat))

        self._write(write)

    def heartbeat(self, server_id: str, *, now: datetime) -> bool:
        """See `Storage.heartbeat`."""
        s = self.servers
        stmt = s.update().where(s.c.id == server_id).values(last_heartbeat=now)
        return bool(self._write(lambda conn: conn.execute(stmt).rowcount))

    def deregister_server(self, server_id: str) -> None:
        """See `Storage.deregister_server`."""
        s = self.servers
        self._write(lambda conn: conn.execute(s.delete().where(s.c.id == server_id)))

    def list_servers(self) -> list[ServerInfo]:
        """See `Storage.list_servers`."""
        s = self.servers

        def read() -> list[ServerInfo]:
            with self._read() as conn:
                rows = conn.execute(sa.select(s.c.info, s.c.last_heartbeat)).all()
            infos = [
                ServerInfo.model_validate_json(info).model_copy(update={"last_heartbeat": beat})
                for info, beat in rows
            ]
            return sorted(infos, key=lambda i: i.started_at)

        return self._retry(read)

    def reclaim_dead_servers(
        self, *, heartbeat_before: datetime, now: datetime
    ) -> list[StateChange]:
        """See `Storage.reclaim_dead_servers`."""
        s, c = self.servers, self.jobs.c

        def write(conn: Connection) -> list[StateChange]:
            dead = list(conn.execute(
                sa.select(s.c.id).where(s.c.last_heartbeat < heartbeat_before)
            ).scalars())
            if not dead:
                return []
            conn.execute(s.delete().where(s.c.id.in_(dead)))
            where = state_is(c.state, "Processing") & c.server_name.in_(dead)
            return self._move(
                conn, where, lambda j: Enqueued(enqueued_at=now, queue=j.queue, reason="reclaimed")
            )

        return self._write(write)


def claimed_job(row: Mapping[str, Any], attempts: int, processing: Processing) -> Job:
    """Build a just-claimed job from its row, decoding only the JSON columns.

    The claim's hot path: the new state is known, so the stored state is not decoded and
    the job is built without validation (`qmlkit.job.trusted`). Shared by every SQL
    storage.

    Args:
        row: The job's columns (``created_at``/``expires_at`` as aware datetimes).
        attempts: The attempt number (fencing token) of this claim.
        processing: The Processing state the claim stored.

    Raises:
        ValueError, TypeError, KeyError: A JSON column does not decode, or holds the wrong
            type; the caller quarantines the row with the reason.
    """
    payload = json.loads(row["payload"])
    metadata = json.loads(row["job_metadata"])
    if not (isinstance(payload["args"], list) and isinstance(payload["kwargs"], dict)
            and isinstance(metadata, dict)):
        raise TypeError("args, kwargs or metadata of the wrong JSON type")
    return trusted(Job, {
        "id": row["id"], "method": row["method"], "args": payload["args"],
        "kwargs": payload["kwargs"], "queue": row["queue"], "priority": row["priority"],
        "attempts": attempts, "retry_count": row["retry_count"],
        "max_retries": row["max_retries"], "timeout_s": row["timeout_s"],
        "metadata": metadata, "created_at": row["created_at"],
        "expires_at": row["expires_at"], "state": processing,
    })


def _as_tuple(value: Any) -> tuple[Any, ...]:
    """``itemgetter`` with one key returns a bare value; parameters need a tuple."""
    return value if isinstance(value, tuple) else (value,)


def _safe_time(mapping: Mapping[str, Any], key: str) -> datetime:
    value = mapping.get(key)
    return value if isinstance(value, datetime) else datetime.now(timezone.utc)


def _duplicate_id(storage: SQLStorage, ids: list[str]) -> str:
    seen: set[str] = set()
    for job_id in ids:
        if job_id in seen:
            return job_id
        seen.add(job_id)
    c = storage.jobs.c
    with storage._read() as conn:
        taken = conn.execute(sa.select(c.id).where(c.id.in_(ids)).limit(1)).scalar()
    return str(taken or ids[0])


def _add_missing_columns(engine: Engine, table: sa.Table) -> None:
    """Bring an older SQLite file's table up to date: add the nullable columns and the
    indexes a newer qmlkit declares."""
    with engine.begin() as conn:
        have = {row[1] for row in conn.exec_driver_sql(f'PRAGMA table_info("{table.name}")')}
        for column in table.columns:
            if column.name not in have and column.nullable:
                kind = column.type.compile(dialect=engine.dialect)
                conn.exec_driver_sql(f'ALTER TABLE "{table.name}" ADD COLUMN "{column.name}" {kind}')
        for index in table.indexes:
            index.create(conn, checkfirst=True)


def _configure_sqlite(engine: Engine) -> None:
    """WAL, a busy timeout, and ``BEGIN IMMEDIATE`` for every write transaction."""

    @event.listens_for(engine, "connect")
    def on_connect(dbapi_conn: Any, _record: Any) -> None:
        dbapi_conn.isolation_level = None  # we issue BEGIN ourselves
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
