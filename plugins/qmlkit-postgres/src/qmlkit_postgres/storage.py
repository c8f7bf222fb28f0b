"""``PostgresStorage``: qmlkit jobs in PostgreSQL, on SQLAlchemy 2 with psycopg 3.

It builds on the core ``SQLStorage`` (same tables, row encoding, decoding and reads) and
replaces the hot and the bulk paths with PostgreSQL statements that do each step in one
round trip:

* claim: ``WITH picked AS (SELECT … FOR UPDATE SKIP LOCKED LIMIT n) UPDATE … RETURNING``,
  so concurrent workers never wait on each other's rows and never claim one twice
  (the technique of Que, GoodJob and procrastinate);
* acknowledge: one ``UPDATE … FROM unnest(…)`` per batch, fenced by the attempt number;
* enqueue: one ``INSERT … SELECT FROM unnest(…)`` per batch, also inside a caller's own
  transaction (`PostgresStorage.enqueue_many` with ``connection=``);
* promotion, stranded requeue and dead-server reclaim: one ``UPDATE`` each.

Lost replies are made harmless: a claim retried after a dropped connection first picks
up the rows its first attempt may have committed, and an acknowledgement retried after a
dropped connection recognises its own already-applied change.
"""

from __future__ import annotations

import logging
import time
import weakref
from collections.abc import Callable, Mapping, Sequence
from datetime import datetime, timezone
from typing import Any, TypeVar

import sqlalchemy as sa
from pydantic import ValidationError
from sqlalchemy.engine import Connection
from sqlalchemy.exc import IntegrityError, OperationalError

from qmlkit.backoff import Backoff
from qmlkit.errors import ConfigurationError, DuplicateJob, StaleClaim, StorageUnavailable
from qmlkit.job import Job, JobState, Processing
from qmlkit.storage.base import MAX_CLAIM, StateChange, Transition, minute_of
from qmlkit.storage.codec import (
    DECODE_ERRORS,
    JOB_STATE,
    QUARANTINE_EXCEPTION,
    claimed_job,
    undecodable_reason,
)
from qmlkit.storage.sql import SQLStorage, _duplicate_id
from qmlkit_postgres import migrations

log = logging.getLogger(__name__)
T = TypeVar("T")

#: First and largest wait between attempts to reach the server at `open`, in seconds.
CONNECT_RETRY_INITIAL_S, CONNECT_RETRY_CAP_S = 0.1, 1.0

#: Columns returned by claims and moves, in this order.
_RETURNED = (
    "id", "method", "queue", "priority", "state", "attempts", "retry_count", "max_retries",
    "timeout_s", "created_at", "enqueued_at", "due_at", "started_at", "server_name",
    "expires_at", "payload", "job_metadata", "state_data",
)

#: Array types of the inserted columns, in ``SQLStorage._INSERT_COLUMNS`` order.
_INSERT_TYPES = (
    "text", "text", "text", "int", "text", "int", "int", "int", "float8", "timestamptz",
    "timestamptz", "timestamptz", "timestamptz", "text", "timestamptz", "text", "text", "text",
)


#: SET clause appending the row's current state to its history, one JSON document per
#: line (SET sees old values; plain text concatenation cannot fail on a corrupt row).
_HISTORY = "history = coalesce(j.history, '') || j.state_data || chr(10)"


def describe(url: sa.URL) -> str:
    """``host:port/database`` of a URL, never its password."""
    return f"{url.host or 'localhost'}:{url.port or 5432}/{url.database or ''}"


class PostgresStorage(SQLStorage):
    """Storage in a PostgreSQL schema. See the module docstring.

    Args:
        url: ``postgresql://user@host:port/database`` (``postgresql+psycopg://`` and
            ``postgres://`` too). Query parameters ``schema=NAME`` and ``migrate=false``
            are read here and removed; the rest go to psycopg (e.g. ``sslmode``).
        schema: Schema holding the tables (default ``public``), so several apps can
            share one database. Overrides the URL's ``schema``.
        auto_migrate: Apply pending migrations on `open` (default ``True``). With
            ``False``, `open` refuses a schema that is not at the current version and
            names ``qmlkit migrate``.
        connect_timeout_s: How long `open` keeps trying to reach the server, in seconds.
        busy_timeout_s: How long an operation retries a dropped connection, in seconds,
            before ``StorageUnavailable``.
        pool_size: Connections kept open (one per worker thread plus a few).
        max_payload_bytes: Largest encoded arguments accepted, in bytes.
        engine_options: Extra keyword arguments for ``sqlalchemy.create_engine``.

    Raises:
        ConfigurationError: The URL cannot be parsed or an option is unknown.
    """

    #: `qmlkit.App.transaction` may pass a caller's connection to `enqueue_many`.
    supports_transactional_enqueue = True

    def __init__(
        self,
        url: str,
        *,
        schema: str | None = None,
        auto_migrate: bool | None = None,
        connect_timeout_s: float = 10.0,
        busy_timeout_s: float = 60.0,
        pool_size: int = 12,
        max_payload_bytes: int | None = None,
        engine_options: Mapping[str, Any] | None = None,
    ) -> None:
        try:
            parsed = sa.engine.make_url(url)
        except (sa.exc.ArgumentError, ValueError):
            # SQLAlchemy's message quotes the whole URL, password included: not repeated.
            raise ConfigurationError(
                "cannot parse the PostgreSQL URL; expected "
                "postgresql://user[:password]@host[:port]/database[?schema=NAME]"
            ) from None
        if parsed.get_backend_name() not in ("postgresql", "postgres"):
            raise ConfigurationError(f"not a PostgreSQL URL: {parsed.render_as_string()}")
        if parsed.host and "@" in parsed.host:
            raise ConfigurationError(
                "the PostgreSQL URL's host part contains '@': percent-encode special "
                "characters of the password (@ as %40, : as %3A, / as %2F)"
            )
        query = dict(parsed.query)
        schema = schema or _single(query.pop("schema", None)) or "public"
        _check_schema_name(schema)
        migrate_flag = _single(query.pop("migrate", None))
        if auto_migrate is None:
            auto_migrate = _flag("migrate", migrate_flag, default=True)
        for name, value, low in (("connect_timeout_s", connect_timeout_s, 0.0),
                                 ("busy_timeout_s", busy_timeout_s, 0.0),
                                 ("pool_size", pool_size, 1)):
            if not isinstance(value, (int, float)) or value < low or (low == 0.0 and value == 0):
                raise ConfigurationError(
                    f"PostgreSQL storage option {name}={value!r}: must be "
                    + ("a whole number of at least 1" if name == "pool_size"
                       else "a number of seconds above 0"))
        parsed = parsed.set(drivername="postgresql+psycopg", query=query)
        super().__init__(
            parsed.render_as_string(hide_password=False),
            busy_timeout_s=busy_timeout_s, pool_size=pool_size,
            max_payload_bytes=max_payload_bytes, schema=schema, engine_options=engine_options,
        )
        self._sa_url = parsed
        self.url = parsed.render_as_string(hide_password=True)
        self.schema = schema
        self.auto_migrate = auto_migrate
        self.connect_timeout_s = connect_timeout_s
        self._q = '"' + schema.replace('"', '""') + '"'
        self._jobs_sql = f"{self._q}.qmlkit_jobs"
        self._auto_engine: sa.Engine | None = None

    @classmethod
    def from_url(cls, url: str, options: Mapping[str, Any]) -> PostgresStorage:
        """Build from a URL and the storage options (the keyword arguments above).

        Raises:
            ConfigurationError: An unknown option, named, or a bad URL.
        """
        known = {"schema", "auto_migrate", "connect_timeout_s", "busy_timeout_s", "pool_size",
                 "max_payload_bytes", "engine_options"}
        unknown = set(options) - known
        if unknown:
            raise ConfigurationError(
                f"PostgreSQL storage: unknown option(s) {sorted(unknown)}; known: {sorted(known)}"
            )
        return cls(url, **options)

    def __repr__(self) -> str:
        return f"PostgresStorage({describe(self._sa_url)}, schema={self.schema!r})"

    # --- lifecycle ---------------------------------------------------------------------

    def open(self) -> None:
        """Connect, then migrate the schema (or check it is current).

        Raises:
            ConfigurationError: The server refused the credentials or the database does
                not exist (naming host, port and database, never the password).
            StorageUnavailable: The server could not be reached within
                ``connect_timeout_s``.
            SchemaVersionError: The schema is newer than this package, or not current
                while ``auto_migrate`` is off.
        """
        with self._open_lock:
            if self._engine is not None:
                return
            options: dict[str, Any] = {
                "pool_size": self._pool_size, "max_overflow": 4,
                "connect_args": {"connect_timeout": max(1, int(min(self.connect_timeout_s, 10)))},
            }
            options.update(self._engine_options)
            try:
                engine = sa.create_engine(self._sa_url, **options)
            except (ImportError, sa.exc.ArgumentError) as exc:
                raise ConfigurationError(f"cannot create an engine for {self!r}: {exc}") from exc
            _ping_idle_connections(engine, PRE_PING_AFTER_IDLE_S)
            # Single-statement hot paths run on connections kept in autocommit mode.
            auto_engine = sa.create_engine(
                self._sa_url, **{**options, "isolation_level": "AUTOCOMMIT",
                                 "pool_reset_on_return": None})
            _ping_idle_connections(auto_engine, PRE_PING_AFTER_IDLE_S)
            try:
                self._connect_and_migrate(engine)
            except BaseException:
                engine.dispose()
                auto_engine.dispose()
                raise
            self._engine = engine
            self._auto_engine = auto_engine

    def close(self) -> None:
        """Dispose of both connection pools. Idempotent."""
        with self._open_lock:
            for engine in (self._engine, self._auto_engine):
                if engine is not None:
                    engine.dispose()
            self._engine = self._auto_engine = None

    def _connect_and_migrate(self, engine: sa.Engine) -> None:
        where = describe(self._sa_url)
        deadline = time.monotonic() + self.connect_timeout_s
        backoff = Backoff(CONNECT_RETRY_INITIAL_S, CONNECT_RETRY_CAP_S)
        while True:
            try:
                with engine.begin() as conn:
                    if self.auto_migrate:
                        for migration in migrations.migrate(conn, self.schema):
                            log.info("%r: applied migration %d (%s)", self, migration.version,
                                     migration.name)
                    else:
                        version = migrations.applied_version(conn, self.schema)
                        migrations.check_not_newer(version, self.schema)
                        if version < migrations.LATEST:
                            raise migrations.SchemaVersionError(
                                f"PostgreSQL schema {self.schema!r} at {where} is at "
                                f"qmlkit-postgres schema version {version}, this package "
                                f"needs {migrations.LATEST}, and automatic migration is off: "
                                "run 'qmlkit migrate --storage URL' first"
                            )
                return
            except sa.exc.ProgrammingError as exc:
                # e.g. an unknown connection option in the URL's query, or tables in the
                # schema that no qmlkit-postgres migration made
                raise ConfigurationError(
                    f"PostgreSQL at {where}, schema {self.schema!r}: {_first_line(exc.orig)}"
                ) from None
            except OperationalError as exc:
                text = _first_line(exc.orig)
                if _is_config_error(text):
                    raise ConfigurationError(
                        f"PostgreSQL at {where} refused the connection: {text}"
                    ) from None
                if time.monotonic() >= deadline:
                    raise StorageUnavailable(
                        f"PostgreSQL at {where} is unreachable after "
                        f"{self.connect_timeout_s:g} s: {text}"
                    ) from None
            time.sleep(backoff.jittered(backoff.next()))

    def migrate(self) -> list[str]:
        """Apply pending schema migrations now (what ``qmlkit migrate`` runs).

        Returns:
            ``"<version>: <name>"`` for each migration applied, oldest first.

        Raises:
            SchemaVersionError: The schema is newer than this package knows.
            StorageUnavailable: The server cannot be reached.
        """
        engine = self._engine
        if engine is None:
            engine = sa.create_engine(self._sa_url, pool_pre_ping=True)
        try:
            with engine.begin() as conn:
                done = migrations.migrate(conn, self.schema)
        except OperationalError as exc:
            raise StorageUnavailable(
                f"PostgreSQL at {describe(self._sa_url)}: {_first_line(exc.orig)}"
            ) from None
        finally:
            if engine is not self._engine:
                engine.dispose()
        return [f"{m.version}: {m.name}" for m in done]

    def _write_one(self, fn: Callable[[Any], T]) -> T:
        """Run ``fn(cursor)``, which issues exactly one statement, in autocommit mode.

        One statement is its own transaction in PostgreSQL, so the separate ``COMMIT``
        round trip is saved; hot paths (enqueue, claim, acknowledge) use this. Retried
        like `_write_raw`; ``fn`` must be safe to run again after a lost reply.
        """
        if self._auto_engine is None:
            self.open()
        return self._write_raw(fn, engine=self._auto_engine)

    def _commit_raw(self, raw: Any) -> None:
        """Commit unless the connection is in autocommit (`_write_one`)."""
        if not raw.driver_connection.autocommit:
            raw.commit()

    # --- enqueue ------------------------------------------------------------------------

    def _insert_sql(self) -> str:
        cols = ", ".join(self._INSERT_COLUMNS)
        arrays = ", ".join(f"%s::{t}[]" for t in _INSERT_TYPES)
        return f"INSERT INTO {self._jobs_sql} ({cols}) SELECT * FROM unnest({arrays})"

    def _insert_jobs(self, cursor: Any, rows: list[tuple[Any, ...]]) -> None:
        """Insert encoded rows with one ``INSERT … SELECT FROM unnest(arrays)`` statement
        (a single row: plain ``VALUES``, which spares dumping 18 one-element arrays)."""
        if len(rows) == 1:
            cols = ", ".join(self._INSERT_COLUMNS)
            marks = ", ".join(["%s"] * len(self._INSERT_COLUMNS))
            cursor.execute(f"INSERT INTO {self._jobs_sql} ({cols}) VALUES ({marks})", rows[0])
            return
        for start in range(0, len(rows), 5000):
            chunk = rows[start:start + 5000]
            cursor.execute(self._insert_sql(), [list(col) for col in zip(*chunk)])

    def enqueue_many(self, jobs: Sequence[Job], *, connection: Any = None) -> list[Job]:
        """Store new jobs in one statement; optionally inside the caller's transaction.

        Args:
            jobs: Enqueued or Scheduled jobs.
            connection: A SQLAlchemy ``Connection`` or ``Session`` on this database whose
                transaction the caller controls, or ``None`` for a transaction of this
                storage's own. With a connection the jobs exist only if, and once, the
                caller commits; a rollback leaves no trace.

        Returns:
            The stored jobs, as given.

        Raises:
            DuplicateJob: An id is already taken (with a caller's connection, its
                transaction is then aborted, as for any failed statement).
            PayloadError: A job's arguments are not JSON or are too large.
            ConfigurationError: ``connection`` is not a SQLAlchemy connection or session
                on PostgreSQL.
        """
        if not jobs:
            return []
        if connection is None:
            return self._enqueue_own(jobs)
        rows = self._insert_rows(jobs)
        conn = _connection_of(connection)
        self._check_same_database(conn)
        params = tuple(list(col) for col in zip(*rows))
        try:
            conn.exec_driver_sql(self._insert_sql(), params)
        except IntegrityError as exc:
            raise DuplicateJob(str(jobs[0].id) if len(jobs) == 1 else
                               f"one of {len(jobs)} jobs ({exc.orig})") from exc
        return list(jobs)

    def _enqueue_own(self, jobs: Sequence[Job]) -> list[Job]:
        """Insert in one autocommitted statement; a retry after a lost reply that finds
        its own rows already there counts as done, not as a duplicate."""
        rows = self._insert_rows(jobs)
        ids = [job.id for job in jobs]
        attempt = [0]

        def insert(cursor: Any) -> None:
            attempt[0] += 1
            try:
                self._insert_jobs(cursor, rows)
            except self._dbapi_integrity_error():
                if attempt[0] == 1 or len(ids) > 5000:
                    raise
                cursor.execute(f"SELECT count(*) FROM {self._jobs_sql} WHERE id = ANY(%s)", (ids,))
                if cursor.fetchone()[0] != len(ids):
                    raise
                log.warning("enqueue of %d job(s) was committed before a dropped connection",
                            len(ids))

        try:
            self._write_one(insert) if len(rows) <= 5000 else self._write_raw(insert)
        except IntegrityError as exc:
            raise DuplicateJob(_duplicate_id(self, ids)) from exc
        return list(jobs)

    def _check_same_database(self, conn: Connection) -> None:
        """Refuse a caller's connection to another database (checked once per DBAPI
        connection): jobs written there would never reach a worker.

        Raises:
            ConfigurationError: Another database, or no qmlkit tables in the schema.
        """
        dbapi_conn = conn.connection.dbapi_connection
        if dbapi_conn in _VERIFIED:
            return
        theirs = conn.exec_driver_sql(
            "SELECT current_database(), to_regclass(%s) IS NOT NULL",
            (f"{self._q}.qmlkit_jobs",)).one()
        ours = self._sa_url.database or ""
        if ours and theirs[0] != ours:
            raise ConfigurationError(
                f"transactional enqueue: the connection is to database {theirs[0]!r}, but "
                f"the storage is in {ours!r}; jobs written there would never run")
        if not theirs[1]:
            raise ConfigurationError(
                f"transactional enqueue: database {theirs[0]!r} has no qmlkit tables in "
                f"schema {self.schema!r}; is the connection to the storage's server?")
        _VERIFIED[dbapi_conn] = True

    def existing_ids(self, ids: Sequence[str]) -> set[str]:
        """Return which of ``ids`` are stored (committed and not deleted), in one query.

        `qmlkit.App.transaction` uses it after the caller's commit, to announce only the
        jobs that a rolled-back savepoint did not take away.

        Raises:
            StorageUnavailable: The server cannot be reached.
        """
        if not ids:
            return set()
        sql = f"SELECT id FROM {self._jobs_sql} WHERE id = ANY(%s)"

        def read(cursor: Any) -> set[str]:
            cursor.execute(sql, (list(ids),))
            return {row[0] for row in cursor.fetchall()}

        return self._write_one(read)

    def _dbapi_integrity_error(self) -> type[Exception]:
        return self.engine.dialect.loaded_dbapi.IntegrityError

    # --- claim and fenced acknowledgements ------------------------------------------------

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
        processing = Processing(started_at=now, worker_id=worker_id, server_name=server_name)
        state_data = processing.model_dump_json()
        queues = list(queues)
        if len(queues) == 1:
            where, qparams = "AND queue = %(queue)s", {"queue": queues[0]}
        elif queues:
            where, qparams = "AND queue = ANY(%(queues)s)", {"queues": queues}
        else:
            where, qparams = "", {}
        returning = ", ".join(f"j.{c}" for c in _RETURNED)
        claim_sql = (
            f"WITH picked AS (SELECT id, state_data AS prev, enqueued_at AS prev_enqueued "
            f"FROM {self._jobs_sql} WHERE state = 'Enqueued' {where} "
            f"ORDER BY priority DESC, enqueued_at, id LIMIT %(limit)s FOR UPDATE SKIP LOCKED) "
            f"UPDATE {self._jobs_sql} AS j SET state = 'Processing', state_data = %(data)s, "
            f"enqueued_at = NULL, due_at = NULL, started_at = %(now)s, "
            f"server_name = %(server)s, attempts = j.attempts + 1, {_HISTORY} "
            f"FROM picked WHERE j.id = picked.id "
            f"RETURNING {returning}, picked.prev, picked.prev_enqueued"
        )
        # A retry after a dropped connection first collects what the lost attempt may
        # have committed: rows Processing under this server since exactly ``now``.
        recover_sql = (
            f"SELECT {', '.join(_RETURNED)}, NULL, NULL FROM {self._jobs_sql} "
            f"WHERE state = 'Processing' AND server_name = %(server)s "
            f"AND started_at = %(now)s AND state_data = %(data)s"
        )
        params = {"limit": limit, "data": state_data, "now": now, "server": server_name, **qparams}
        attempt = [0]

        backends: list[int] = []

        def claim(cursor: Any) -> list[tuple[Any, ...]]:
            attempt[0] += 1
            if attempt[0] > 1:
                # The lost attempt may still be running on the server, holding its rows
                # (SKIP LOCKED would pass them by) and committing them later for nobody:
                # end it first, then collect whatever it committed.
                _end_backends(cursor, backends)
                cursor.execute(recover_sql, params)
                found = cursor.fetchall()
                if found:
                    log.warning("recovered %d job(s) claimed before a dropped connection",
                                len(found))
                    return found
            backends.append(cursor.connection.info.backend_pid)
            cursor.execute(claim_sql, params)
            return cursor.fetchall()

        rows = self._write_one(claim)
        if not rows:
            return []
        rows.sort(key=lambda r: (-r[3], r[-1] or now, r[0]))
        claimed: list[tuple[Job, JobState | None]] = []
        corrupt: list[tuple[str, str]] = []
        for raw in rows:
            row = dict(zip(_RETURNED, raw))
            try:
                row["created_at"] = row["created_at"].astimezone(timezone.utc)
                if row["expires_at"] is not None:
                    row["expires_at"] = row["expires_at"].astimezone(timezone.utc)
                job = claimed_job(row, row["attempts"], processing)  # RETURNING: incremented
                previous = None
                prev = raw[-2]
                if prev is not None and (with_previous or not prev.startswith('{"name":"Enqueued"')):
                    previous = JOB_STATE.validate_json(prev)  # a row that lies is quarantined
                    if previous.name != "Enqueued":
                        raise ValueError(
                            f"state column 'Enqueued' disagrees with state data {previous.name!r}")
            except DECODE_ERRORS as exc:
                corrupt.append((row["id"], undecodable_reason(exc, "row")))
                continue
            claimed.append((job, previous))
        if corrupt:
            self._quarantine(corrupt, now)
        return claimed

    def _quarantine(self, corrupt: list[tuple[str, str]], now: datetime) -> None:
        """Move rows that will not decode to Failed with the reason; the worker goes on."""
        from qmlkit.job import Failed

        sql = (f"UPDATE {self._jobs_sql} AS j SET state = 'Failed', state_data = %s, "
               f"started_at = NULL, server_name = NULL, {_HISTORY} WHERE id = %s")
        values = []
        for job_id, reason in corrupt:
            log.error("job %s quarantined: %s", job_id, reason)
            failed = Failed(failed_at=now, exception_type=QUARANTINE_EXCEPTION, message=reason)
            values.append((failed.model_dump_json(), job_id))
        self._write_raw(lambda cursor: cursor.executemany(sql, values))

    def transition_many(self, items: Sequence[Transition]) -> list[Job | StaleClaim]:
        """See `Storage.transition_many`: one ``UPDATE … FROM unnest(…)`` per batch.

        A change retried after a lost reply finds its own result already stored (same
        attempt, same state data) and counts as applied, not as stale.
        """
        if not items:
            return []
        applied = [item.applied() for item in items]
        cols: list[list[Any]] = [[] for _ in range(11)]
        cache: dict[int, tuple[dict[str, Any], datetime | None]] = {}
        for item, job in zip(items, applied):
            found = cache.get(id(job.state))
            if found is None:
                state = job.state
                at = getattr(state, "succeeded_at", None) or getattr(state, "failed_at", None)
                found = cache[id(state)] = (self._state_columns(state),
                                            minute_of(at) if at is not None else None)
            c, minute = found
            for i, value in enumerate((
                item.job.id, item.token, c["state"], c["state_data"], c["enqueued_at"],
                c["due_at"], c["started_at"], c["server_name"], job.retry_count, job.expires_at,
                minute,
            )):
                cols[i].append(value)
        jobs, stats = self._jobs_sql, f"{self._q}.qmlkit_stats"
        # One statement: ``live`` reads, from the statement's snapshot, which rows are
        # still Processing under the token; the UPDATE also accepts a row already holding
        # exactly this outcome (a retry after a lost reply) but appends history and
        # counts throughput only for rows that were live.
        sql = (
            "WITH v AS (SELECT * FROM unnest(%s::text[], %s::int[], %s::text[], %s::text[], "
            "%s::timestamptz[], %s::timestamptz[], %s::timestamptz[], %s::text[], %s::int[], "
            "%s::timestamptz[], %s::timestamptz[]) AS v(id, token, state, state_data, "
            "enqueued_at, due_at, started_at, server_name, retry_count, expires_at, minute)), "
            f"live AS (SELECT j.id FROM {jobs} AS j JOIN v ON j.id = v.id "
            "WHERE j.state = 'Processing' AND j.attempts = v.token), "
            f"upd AS (UPDATE {jobs} AS j SET state = v.state, state_data = v.state_data, "
            "enqueued_at = v.enqueued_at, due_at = v.due_at, started_at = v.started_at, "
            "server_name = v.server_name, retry_count = v.retry_count, expires_at = v.expires_at, "
            "history = CASE WHEN j.state = 'Processing' "
            "THEN coalesce(j.history, '') || j.state_data || chr(10) ELSE j.history END "
            "FROM v WHERE j.id = v.id AND j.attempts = v.token "
            "AND (j.state = 'Processing' OR (j.state = v.state AND j.state_data = v.state_data)) "
            "RETURNING j.id, v.state, v.minute), "
            f"counted AS (INSERT INTO {stats} (minute, state, count) "
            "SELECT upd.minute, upd.state, count(*) FROM upd JOIN live ON live.id = upd.id "
            "WHERE upd.minute IS NOT NULL GROUP BY upd.minute, upd.state "
            f"ON CONFLICT (minute, state) DO UPDATE SET count = {stats}.count + excluded.count) "
            "SELECT id FROM upd"
        )

        def write(cursor: Any) -> set[str]:
            cursor.execute(sql, cols)
            return {r[0] for r in cursor.fetchall()}

        done = self._write_one(write)
        return [
            job if item.job.id in done else StaleClaim(item.job.id, item.token)
            for item, job in zip(items, applied)
        ]

    # --- background duties: one statement each -------------------------------------------

    def _requeue(
        self, cursor: Any, condition: str, params: dict[str, Any], now: datetime,
        reason: str | None, limit: int | None, order: str = "id", prefix: str = "",
    ) -> list[StateChange]:
        """Move rows matching ``condition`` to Enqueued in one statement; return the changes."""
        returning = ", ".join(f"j.{c}" for c in _RETURNED)
        sql = (
            f"{prefix}{', ' if prefix else 'WITH '}picked AS (SELECT id, state_data AS prev "
            f"FROM {self._jobs_sql} WHERE {condition} ORDER BY {order} "
            f"{'LIMIT %(limit)s ' if limit is not None else ''}FOR UPDATE SKIP LOCKED) "
            f"UPDATE {self._jobs_sql} AS j SET state = 'Enqueued', enqueued_at = %(now)s, "
            f"due_at = NULL, started_at = NULL, server_name = NULL, {_HISTORY}, "
            "state_data = json_build_object('name', 'Enqueued', 'enqueued_at', %(now_iso)s::text, "
            "'queue', j.queue, 'reason', %(reason)s::text)::text "
            f"FROM picked WHERE j.id = picked.id RETURNING {returning}, picked.prev"
        )
        cursor.execute(sql, {**params, "now": now, "reason": reason, "limit": limit,
                             "now_iso": now.isoformat().replace("+00:00", "Z")})
        changes = []
        for raw in cursor.fetchall():
            row = dict(zip(_RETURNED, raw))
            job, problem = self._decode(row)
            try:
                previous = JOB_STATE.validate_json(raw[-1])
            except ValidationError:
                problem = problem or "previous state cannot be decoded"
            if problem:
                log.error("job %s requeued but cannot be decoded: %s", row["id"], problem)
                continue
            changes.append(StateChange(job, previous))
        return changes

    def promote_due(self, *, now: datetime, limit: int = 1000) -> list[StateChange]:
        """See `Storage.promote_due`: one ``UPDATE`` over the due index."""
        return self._write_one(lambda cursor: self._requeue(
            cursor, "state IN ('Scheduled', 'AwaitingRetry') AND due_at <= %(now)s", {},
            now, None, limit, order="due_at"))

    def requeue_stranded(
        self,
        *,
        started_before: datetime,
        now: datetime,
        exclude_servers: Sequence[str] = (),
    ) -> list[StateChange]:
        """See `Storage.requeue_stranded`: one ``UPDATE``."""
        condition = "state = 'Processing' AND started_at < %(before)s"
        if exclude_servers:
            condition += " AND NOT (server_name = ANY(%(excluded)s))"
        params = {"before": started_before, "excluded": list(exclude_servers)}
        return self._write_one(lambda cursor: self._requeue(
            cursor, condition, params, now, "stranded", None))

    def reclaim_dead_servers(
        self, *, heartbeat_before: datetime, now: datetime
    ) -> list[StateChange]:
        """See `Storage.reclaim_dead_servers`: deregister and requeue in one statement."""
        prefix = (f"WITH dead AS (DELETE FROM {self._q}.qmlkit_servers "
                  "WHERE last_heartbeat < %(before)s RETURNING id)")
        condition = "state = 'Processing' AND server_name IN (SELECT id FROM dead)"
        return self._write_one(lambda cursor: self._requeue(
            cursor, condition, {"before": heartbeat_before}, now, "reclaimed", None,
            prefix=prefix))


def _end_backends(cursor: Any, pids: list[int]) -> None:
    """Terminate those of ``pids`` still running a statement, and wait until they are gone.

    Used before a claim is retried: a statement whose connection dropped keeps running
    on the server until it notices. Terminating it rolls it back unless it has already
    committed; either way the retry then sees the final state of its rows.
    """
    if not pids:
        return
    if cursor.connection.info.server_version >= 140000:  # waits for the exit itself
        cursor.execute(
            "SELECT pg_terminate_backend(pid, 5000) FROM pg_stat_activity "
            "WHERE pid = ANY(%s) AND state <> 'idle' AND pid <> pg_backend_pid()", (pids,))
        cursor.fetchall()
        return
    cursor.execute(
        "SELECT pg_terminate_backend(pid) FROM pg_stat_activity "
        "WHERE pid = ANY(%s) AND state <> 'idle' AND pid <> pg_backend_pid()", (pids,))
    deadline = time.monotonic() + 5.0
    while time.monotonic() < deadline:
        cursor.execute("SELECT count(*) FROM pg_stat_activity WHERE pid = ANY(%s)", (pids,))
        if cursor.fetchone()[0] == 0:
            return
        time.sleep(0.02)


def _single(value: Any) -> str | None:
    """A URL query value (a string, or a tuple when repeated) as one string."""
    if isinstance(value, tuple):
        return str(value[-1]) if value else None
    return None if value is None else str(value)


def _first_line(error: Any) -> str:
    return (str(error).strip().splitlines() or ["connection failed"])[0]


def _is_config_error(text: str) -> bool:
    """Errors that waiting will not fix: credentials, missing database or role, bad
    connection options, SSL refused."""
    text = text.lower()
    return any(part in text for part in (
        "password authentication failed", "does not exist", "no password supplied",
        "authentication failed", "invalid connection option", "invalid sslmode",
        "server does not support ssl", "invalid dsn", "invalid integer value",
        "invalid value for parameter",
    ))


def _flag(name: str, value: str | None, *, default: bool) -> bool:
    """A boolean URL query value.

    Raises:
        ConfigurationError: Not one of true/false/1/0/yes/no/on/off (the value named).
    """
    if value is None:
        return default
    lowered = value.strip().lower()
    if lowered in ("true", "1", "yes", "on"):
        return True
    if lowered in ("false", "0", "no", "off"):
        return False
    raise ConfigurationError(
        f"PostgreSQL URL: {name}={value!r} is not a boolean; use true or false")


def _check_schema_name(schema: str) -> None:
    """Refuse schema names PostgreSQL would cut or the driver would misread.

    Raises:
        ConfigurationError: Empty, longer than 63 bytes, or containing ``%`` or NUL.
    """
    if not schema or len(schema.encode()) > 63 or "%" in schema or "\x00" in schema:
        raise ConfigurationError(
            f"PostgreSQL schema name {schema!r}: use 1 to 63 bytes, without '%' or NUL")


def _connection_of(connection: Any) -> Connection:
    """The SQLAlchemy ``Connection`` of a ``Connection`` or ``Session``.

    Raises:
        ConfigurationError: Something else, or not on PostgreSQL.
    """
    conn = connection
    if not isinstance(conn, Connection):
        getter = getattr(connection, "connection", None)
        if getter is None or not callable(getter):
            raise ConfigurationError(
                f"transactional enqueue needs a SQLAlchemy Connection or Session, "
                f"not {type(connection).__name__}"
            )
        conn = getter()
    if conn.dialect.name != "postgresql":
        raise ConfigurationError(
            f"transactional enqueue needs a connection to PostgreSQL, not {conn.dialect.name}"
        )
    return conn


#: Callers' DBAPI connections already checked by `PostgresStorage._check_same_database`.
_VERIFIED: weakref.WeakKeyDictionary[Any, bool] = weakref.WeakKeyDictionary()

#: A pooled connection idle for longer than this is pinged before use (seconds).
PRE_PING_AFTER_IDLE_S = 1.0


def _ping_idle_connections(engine: sa.Engine, idle_s: float) -> None:
    """Pre-ping pooled connections that sat idle for more than ``idle_s`` seconds.

    SQLAlchemy's ``pool_pre_ping`` costs a round trip on every checkout; a worker checks
    out a connection per batch, so this pings only connections that may have gone stale
    (the pessimistic-disconnect recipe of SQLAlchemy's pooling documentation). A dead
    one raises ``DisconnectionError``, and the pool replaces it with a fresh connection.
    Connections that break while busy are caught by the storage's retry with backoff.
    """
    @sa.event.listens_for(engine, "checkin")
    def checkin(dbapi_connection: Any, record: Any) -> None:
        record.info["qmlkit_idle_since"] = time.monotonic()

    @sa.event.listens_for(engine, "checkout")
    def checkout(dbapi_connection: Any, record: Any, proxy: Any) -> None:
        since = record.info.get("qmlkit_idle_since")
        if since is None or time.monotonic() - since < idle_s:
            return
        try:
            dbapi_connection.execute("SELECT 1")
            if not dbapi_connection.autocommit:
                dbapi_connection.rollback()
        except Exception as exc:
            raise sa.exc.DisconnectionError(f"stale pooled connection: {exc}") from exc
