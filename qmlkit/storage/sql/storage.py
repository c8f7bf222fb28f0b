"""`SQLStorage`: the storage contract over SQL tables, through SQLAlchemy 2 Core.

The operations are written once here; what differs between databases is asked of a
`qmlkit.storage.sql.dialect.SQLDialect` (SQLite's is built in, PostgreSQL's comes with
qmlkit-postgres). Claims and acknowledgements are batched: one claim transaction takes
up to ``limit`` jobs, one ``transition_many`` transaction stores every outcome of a
batch. Transactions are retried by `qmlkit.storage.sql.executor.Executor`.
"""

from __future__ import annotations

import json
import threading
from collections.abc import Mapping, Sequence
from datetime import datetime
from typing import Any, ClassVar, cast

import sqlalchemy as sa
from pydantic import Field
from sqlalchemy.engine import Connection, Engine
from sqlalchemy.exc import IntegrityError

from qmlkit.errors import (
    ConfigurationError,
    DuplicateJob,
    InvalidTransition,
    JobNotFound,
    StaleClaim,
)
from qmlkit.job import Job, JobState
from qmlkit.limits import storable_id
from qmlkit.storage.base import STATS_RETENTION, StateChange, Storage, Transition, minute_of
from qmlkit.storage.capabilities import DefaultWakeup
from qmlkit.storage.codec import (
    decode_history,
    decode_job,
    decode_state,
    group_new_jobs,
    load_json,
    quarantine_stand_in,
    state_columns,
)
from qmlkit.storage.options import StorageOptions
from qmlkit.storage.sql.batch import SQLBatchRead
from qmlkit.storage.sql.dialect import SQLDialect
from qmlkit.storage.sql.executor import Executor, driver_cursor, log
from qmlkit.storage.sql.registry import SQLRegistry
from qmlkit.storage.sql.schema import UTCTimestamp, build_metadata, state_is
from qmlkit.storage.sql.sqlite import SQLiteDialect

__all__ = ["SQLOptions", "SQLStorage", "decode_row", "dialect_for"]

_EXPIRABLE = ("Succeeded", "Failed", "Deleted")


def dialect_for(url: sa.URL, text: str) -> SQLDialect:
    """The built-in dialect for a URL (SQLite only).

    Raises:
        ConfigurationError: No built-in dialect for the URL's backend; a plugin (e.g.
            qmlkit-postgres) passes its own ``dialect=``.
    """
    if url.get_backend_name() == "sqlite":
        return SQLiteDialect()
    raise ConfigurationError(
        f"no built-in SQL dialect for {url.get_backend_name()!r} (storage URL "
        f"{url.render_as_string()!r}); install the plugin for it (e.g. qmlkit-postgres) "
        "or pass SQLStorage(dialect=...)")


class SQLOptions(StorageOptions):
    """Options of `SQLStorage` (the keyword arguments of its constructor)."""

    backend: ClassVar[str] = "SQL storage"
    busy_timeout_s: float = 30.0
    pool_size: int = 16
    max_payload_bytes: int | None = None
    schema_name: str | None = Field(None, alias="schema")
    engine_options: dict[str, Any] | None = None


class SQLStorage(SQLBatchRead, SQLRegistry, Storage):
    """SQL storage on SQLAlchemy 2 Core. See the module docstring.

    Args:
        url: A SQLAlchemy URL, e.g. ``"sqlite:///qmlkit.db"``.
        busy_timeout_s: How long a write waits for the database lock, in seconds,
            retries included, before ``StorageUnavailable``.
        pool_size: Connections kept open (SQLite: one per worker thread is plenty).
        max_payload_bytes: Largest encoded arguments accepted, in bytes.
        schema: Database schema for the tables (ignored by dialects without schemas).
        engine_options: Extra keyword arguments for ``sqlalchemy.create_engine``.
        dialect: The database's `SQLDialect`; default the built-in one for the URL
            (`SQLiteDialect`).

    Raises:
        ConfigurationError: The URL cannot be parsed, no dialect serves it, its driver
            is missing (at `open`), or the dialect refuses it (SQLite: the file's
            directory does not exist, the message names the path).
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
        dialect: SQLDialect | None = None,
    ) -> None:
        self.url = url
        if max_payload_bytes is not None:
            self.max_payload_bytes = max_payload_bytes
        self.busy_timeout_s = busy_timeout_s
        try:
            self.sa_url = sa.engine.make_url(url)
        except sa.exc.ArgumentError as exc:
            raise ConfigurationError(f"cannot parse storage URL {url!r}: {exc}") from exc
        self.dialect = dialect or dialect_for(self.sa_url, url)
        self.dialect.check_url(self.sa_url, url)
        if not self.dialect.uses_schema:
            schema = None
        self.pool_size = pool_size
        self.engine_options = dict(engine_options or {})
        self.metadata = build_metadata(schema, backend=self.sa_url.get_backend_name())
        names = {t.name: t for t in self.metadata.tables.values()}
        self.jobs, self.servers = names["qmlkit_jobs"], names["qmlkit_servers"]
        self.recurring, self.stats = names["qmlkit_recurring"], names["qmlkit_stats"]
        self.executor = Executor(self.dialect, busy_timeout_s=busy_timeout_s, owner=self,
                                 opener=self.open)
        self._open_lock = threading.Lock()

    @classmethod
    def from_url(cls, url: str, options: Mapping[str, Any]) -> SQLStorage:
        """Build from a URL and the storage options.

        Raises:
            ConfigurationError: An unknown option, named, or a bad URL.
        """
        return cls(url, **SQLOptions.parse(options).given())

    def default_wakeup(self) -> DefaultWakeup | None:
        """See `qmlkit.storage.capabilities.WakeupProvider`: what the dialect offers
        (SQLite: a ``filesystem://`` folder beside the file)."""
        return self.dialect.default_wakeup(self.sa_url)

    # --- lifecycle -------------------------------------------------------------------

    @property
    def engine(self) -> Engine:
        """The SQLAlchemy engine (opening the storage on first use)."""
        return self.executor.engine

    def open(self) -> None:
        """See `Storage.open`. Creates the engines and prepares the tables (the dialect's
        `SQLDialect.prepare`: SQLite creates missing tables and indexes)."""
        with self._open_lock:
            if self.executor.is_open:
                return
            try:
                engine, autocommit = self.dialect.create_engines(
                    self.sa_url, pool_size=self.pool_size, engine_options=self.engine_options)
            except (ImportError, sa.exc.ArgumentError) as exc:
                raise ConfigurationError(
                    f"cannot create a database engine for {self!r}: {exc}"
                ) from exc
            try:
                self.dialect.prepare(self, engine)
            except BaseException:
                for created in (engine, autocommit):
                    if created is not None:
                        created.dispose()
                raise
            self.executor.attach(engine, autocommit)

    def close(self) -> None:
        """See `Storage.close`. Idempotent; the storage may be opened again."""
        with self._open_lock:
            for engine in self.executor.detach():
                engine.dispose()

    # --- rows <-> jobs ---------------------------------------------------------------

    def decode(self, row: sa.Row[Any] | Mapping[str, Any]) -> tuple[Job, str | None]:
        """A job row -> ``(job, None)``, or ``(quarantine stand-in, reason)``."""
        # A row of our own tables is keyed by column name (RowMapping allows columns too).
        mapping = cast("Mapping[str, Any]", row._mapping) if isinstance(row, sa.Row) else row
        return decode_row(mapping)

    def insert_rows(self, jobs: Sequence[Job]) -> list[tuple[Any, ...]]:
        """Encode jobs as insert rows (tuples in ``INSERT_COLUMNS`` order), checking each.

        Raises:
            PayloadError: A job's arguments or metadata are not JSON or too large.
            InvalidTransition: A job is not Enqueued or Scheduled.
        """
        ts = self.dialect.bind_ts
        rows = []
        for job, members in group_new_jobs(jobs, self.max_payload_bytes):
            c = state_columns(job.state)
            head = (job.method, job.queue, job.priority, c["state"], job.attempts,
                    job.retry_count, job.max_retries, job.timeout_s, ts(job.created_at),
                    ts(c["enqueued_at"]), ts(c["due_at"]), ts(c["started_at"]),
                    c["server_name"], ts(job.expires_at))
            state_data = c["state_data"]
            rows += [(job_id, *head, payload, metadata, state_data) for job_id, payload, metadata
                     in zip(members[::3], members[1::3], members[2::3], strict=True)]
        return rows

    def duplicate_id(self, ids: list[str]) -> str:
        """Which of ``ids`` made an insert fail: the first repeated one, else one taken."""
        seen: set[str] = set()
        for job_id in ids:
            if job_id in seen:
                return job_id
            seen.add(job_id)
        c = self.jobs.c
        with self.executor.read() as conn:
            taken = conn.execute(sa.select(c.id).where(c.id.in_(ids)).limit(1)).scalar()
        return str(taken or ids[0])

    # --- enqueue and read ------------------------------------------------------------

    def enqueue_many(self, jobs: Sequence[Job]) -> list[Job]:
        """See `Storage.enqueue_many`."""
        if not jobs:
            return []
        rows = self.insert_rows(jobs)

        def insert(cursor: Any) -> None:
            self.dialect.insert_jobs(self, cursor, rows)

        try:
            self.executor.write_raw(insert)
        except IntegrityError as exc:
            raise DuplicateJob(self.duplicate_id([j.id for j in jobs])) from exc
        return list(jobs)

    def get(self, job_id: str) -> Job | None:
        """See `Storage.get`."""
        if not storable_id(job_id):  # a NUL or a lone surrogate: no driver can send it
            return None

        def read() -> sa.Row[Any] | None:
            with self.executor.read() as conn:
                return conn.execute(self.jobs.select().where(self.jobs.c.id == job_id)).first()

        row = self.executor.retry(read)
        return None if row is None else self.decode(row)[0]

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
            with self.executor.read() as conn:
                return list(conn.execute(query))

        return [self.decode(row)[0] for row in self.executor.retry(read)]

    def count_jobs(self) -> dict[tuple[str, str], int]:
        """See `Storage.count_jobs`."""
        c = self.jobs.c
        query = sa.select(c.queue, c.state, sa.func.count()).group_by(c.queue, c.state)

        def read() -> dict[tuple[str, str], int]:
            with self.executor.read() as conn:
                return {(q, s): n for q, s, n in conn.execute(query)}

        return self.executor.retry(read)

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
            job, corrupt = self.decode(row)
            if corrupt and state.name != "Deleted":
                raise InvalidTransition(job_id, "corrupt", state.name)
            if expected and job.state.name not in expected:
                raise InvalidTransition(job_id, job.state.name, state.name)
            changed = job if corrupt else job.with_state(state, expires_at=expires_at)
            values = {**state_columns(state), "expires_at": expires_at,
                      "history": self.dialect.history_append()}
            conn.execute(self.jobs.update().where(c.id == job_id).values(values))
            cursor = driver_cursor(conn)
            try:
                self.dialect.count_outcomes(self, cursor, [state])
            finally:
                cursor.close()
            return StateChange(changed.model_copy(update={"state": state}), job.state)

        return self.executor.write(change)

    # --- claim and fenced transitions ------------------------------------------------

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
        return [job for job, _ in self.dialect.claim(
            self, worker_id=worker_id, server_name=server_name, queues=queues, limit=limit,
            now=now, with_previous=False)]

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
        return [StateChange(job, previous) for job, previous in self.dialect.claim(
            self, worker_id=worker_id, server_name=server_name, queues=queues, limit=limit,
            now=now, with_previous=True)]

    def transition_many(self, items: Sequence[Transition]) -> list[Job | StaleClaim]:
        """See `Storage.transition_many` (the dialect's `SQLDialect.acknowledge`)."""
        if not items:
            return []
        return self.dialect.acknowledge(self, items)

    def report_progress(self, job_id: str, *, token: int, progress: Mapping[str, Any]) -> bool:
        """See `Storage.report_progress`: one fenced ``UPDATE`` with the database's JSON
        functions, so a concurrent change to other metadata keys is never overwritten."""
        c = self.jobs.c
        entry = json.dumps(dict(progress), separators=(",", ":"))
        merged = self.dialect.progress_merge(c.job_metadata, entry)
        stmt = (self.jobs.update()
                .where(c.id == job_id).where(state_is(c.state, "Processing"))
                .where(c.attempts == token).values(job_metadata=merged))
        return bool(self.executor.write(lambda conn: conn.execute(stmt).rowcount))

    # --- background duties -------------------------------------------------------------

    def promote_due(self, *, now: datetime, limit: int = 1000) -> list[StateChange]:
        """See `Storage.promote_due`."""
        return self.dialect.promote_due(self, now=now, limit=limit)

    def requeue_stranded(
        self,
        *,
        started_before: datetime,
        now: datetime,
        exclude_servers: Sequence[str] = (),
    ) -> list[StateChange]:
        """See `Storage.requeue_stranded`."""
        return self.dialect.requeue_stranded(self, started_before=started_before, now=now,
                                             exclude_servers=exclude_servers)

    def reclaim_dead_servers(
        self, *, heartbeat_before: datetime, now: datetime
    ) -> list[StateChange]:
        """See `Storage.reclaim_dead_servers`."""
        return self.dialect.reclaim_dead_servers(self, heartbeat_before=heartbeat_before,
                                                 now=now)

    def next_due_at(self) -> datetime | None:
        """See `Storage.next_due_at`."""
        c = self.jobs.c
        query = sa.select(sa.func.min(c.due_at)).where(
            state_is(c.state, "Scheduled", "AwaitingRetry"))

        def read() -> datetime | None:
            with self.executor.read() as conn:
                value = conn.execute(query).scalar()
            return UTCTimestamp().process_result_value(value, self.engine.dialect)

        return self.executor.retry(read)

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

        return self.executor.write(write)

    # --- history and counters ------------------------------------------------------

    def job_history(self, job_id: str) -> list[JobState]:
        """See `Storage.job_history`."""
        c = self.jobs.c
        query = sa.select(c.history, c.state_data).where(c.id == job_id)

        def read() -> Any:
            with self.executor.read() as conn:
                return conn.execute(query).first()

        row = self.executor.retry(read)
        if row is None:
            return []
        return decode_history(row[0], row[1], job_id=job_id, logger=log)

    def throughput(self, *, since: datetime, until: datetime) -> list[tuple[datetime, int, int]]:
        """See `Storage.throughput`."""
        st = self.stats
        query = (sa.select(st.c.minute, st.c.state, st.c.count)
                 .where(st.c.minute >= minute_of(since)).where(st.c.minute <= until))

        def read() -> list[Any]:
            with self.executor.read() as conn:
                return list(conn.execute(query))

        buckets: dict[datetime, list[int]] = {}
        for minute, state, count in self.executor.retry(read):
            bucket = buckets.setdefault(minute, [0, 0])
            bucket[0 if state == "Succeeded" else 1] += count
        return [(m, ok, failed) for m, (ok, failed) in sorted(buckets.items())]


def decode_row(m: Mapping[str, Any]) -> tuple[Job, str | None]:
    """A job table row (column name -> value) -> ``(job, None)``, or its quarantine
    stand-in and the reason (see `qmlkit.storage.codec.decode_job`)."""

    def build() -> Job:
        payload = load_json(m["payload"], "payload")
        return Job(
            id=m["id"], method=m["method"], args=payload["args"], kwargs=payload["kwargs"],
            queue=m["queue"], priority=m["priority"], attempts=m["attempts"],
            retry_count=m["retry_count"], max_retries=m["max_retries"],
            timeout_s=m["timeout_s"], metadata=load_json(m["job_metadata"], "job_metadata"),
            created_at=m["created_at"], expires_at=m["expires_at"],
            state=decode_state(m["state_data"]),
        )

    def stand_in(reason: str) -> Job:
        created = m.get("created_at")
        return quarantine_stand_in(
            job_id=m["id"], method=m["method"], queue=m["queue"], reason=reason,
            created_at=created if isinstance(created, datetime) else None)

    return decode_job(build, stand_in, stored_state=m["state"],
                      disagreement=f"state column {m['state']!r} disagrees with state data")
