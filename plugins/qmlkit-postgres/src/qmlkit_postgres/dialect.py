"""`PostgresDialect`: the PostgreSQL side of `qmlkit.storage.sql.SQLDialect`.

`qmlkit_postgres.storage.PostgresStorage` is the core `SQLStorage` with this dialect: the
same tables, row encoding, decoding and reads, and PostgreSQL statements that do each
hot or bulk step in one round trip:

* claim: ``WITH picked AS (SELECT … FOR UPDATE SKIP LOCKED LIMIT n) UPDATE … RETURNING``,
  so concurrent workers never wait on each other's rows and never claim one twice
  (the technique of Que, GoodJob and procrastinate);
* acknowledge: one ``UPDATE … FROM unnest(…)`` per batch, fenced by the attempt number;
* enqueue: one statement per call, a binary ``COPY`` for a large bulk
  (`qmlkit_postgres.inserts`);
* ``unnest`` arrays bound in binary (``%b``): psycopg escapes a text array's elements in
  Python (1.12 ms of CPU for a 50-row acknowledgement, against 0.11 ms in binary);
* promotion, stranded requeue and dead-server reclaim: one ``UPDATE`` each;
* engines: a transactional pool, an autocommit one (`CLAIM_SETTINGS`) for single
  statements, idle connections pinged; tables made by `qmlkit_postgres.migrations`.

Lost replies are made harmless: a claim retried after a dropped connection first picks
up the rows its first attempt may have committed, and an acknowledgement retried after a
dropped connection recognises its own already-applied change.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Mapping, Sequence
from datetime import datetime, timezone
from typing import TYPE_CHECKING, Any

import sqlalchemy as sa
import sqlalchemy.dialects.postgresql
from pydantic import ValidationError
from sqlalchemy.exc import OperationalError

import qmlkit_postgres.migrations as migrations
from qmlkit.backoff import Backoff
from qmlkit.errors import ConfigurationError, StaleClaim, StorageUnavailable
from qmlkit.job import Failed, Job, JobState, Processing
from qmlkit.storage.base import MAX_CLAIM, StateChange, Transition, minute_of
from qmlkit.storage.codec import (
    DECODE_ERRORS,
    JOB_STATE,
    QUARANTINE_EXCEPTION,
    claimed_job,
    state_columns,
    undecodable_reason,
)
from qmlkit.storage.sql import SQLDialect
from qmlkit_postgres.connections import (
    PRE_PING_AFTER_IDLE_S,
    end_backends,
    first_line,
    is_config_error,
    ping_idle_connections,
    with_server_options,
)
from qmlkit_postgres.inserts import JobInserter, insert_sql

if TYPE_CHECKING:
    import psycopg

    from qmlkit.storage.sql.seam import SQLStore

__all__ = ["CLAIM_SETTINGS", "KEEPALIVE_OPTIONS", "PRE_PING_AFTER_IDLE_S", "PostgresDialect",
           "describe"]

log = logging.getLogger("qmlkit_postgres.storage")

#: First and largest wait between attempts to reach the server at `open`, in seconds.
CONNECT_RETRY_INITIAL_S, CONNECT_RETRY_CAP_S = 0.1, 1.0

#: Columns returned by claims and moves, in this order.
_RETURNED = (
    "id", "method", "queue", "priority", "state", "attempts", "retry_count", "max_retries",
    "timeout_s", "created_at", "enqueued_at", "due_at", "started_at", "server_name",
    "expires_at", "payload", "job_metadata", "state_data",
)

#: Settings of the autocommit pool's connections, where the claim runs (libpq ``options``
#: after the user's): with sorting off, the one cheap plan for its ``ORDER BY … LIMIT n``
#: is an ordered scan of a claim index, whatever the statistics say, prepared or not. The
#: pool's other statements sort nothing they could not read in order or hash (issue #16).
CLAIM_SETTINGS = "-c enable_sort=off -c enable_incremental_sort=off"

#: libpq's TCP options on every connection, unless the URL sets them: a vanished server
#: (partition, power loss) fails a waiting call as a dropped connection (retried with
#: backoff) in about 25 s (probes after 10 s idle, 3 of them 5 s apart) or 30 s of unacked
#: sends (``tcp_user_timeout``, ms, Linux only), not after the kernel's 15 minutes or more.
#: Like the defaults of Celery's and Kombu's broker connections.
KEEPALIVE_OPTIONS: dict[str, int] = {
    "keepalives": 1, "keepalives_idle": 10, "keepalives_interval": 5, "keepalives_count": 3,
    "tcp_user_timeout": 30_000,
}

#: SET clause appending the row's current state to its history, one JSON document per
#: line (SET sees old values; plain text concatenation cannot fail on a corrupt row).
_HISTORY = "history = coalesce(j.history, '') || j.state_data || chr(10)"


def describe(url: sa.URL) -> str:
    """``host:port/database`` of a URL, never its password."""
    return f"{url.host or 'localhost'}:{url.port or 5432}/{url.database or ''}"


class PostgresDialect(SQLDialect):
    """PostgreSQL through psycopg 3. See the module docstring.

    Args:
        url: The parsed URL (for messages: host, port and database only).
        schema: The schema holding the tables.
        auto_migrate: Apply pending migrations in `prepare` (else only check).
        connect_timeout_s: How long `prepare` keeps trying to reach the server, in seconds.
    """

    name = "postgresql"

    def __init__(self, url: sa.URL, *, schema: str, auto_migrate: bool,
                 connect_timeout_s: float) -> None:
        self.where = describe(url)
        self.schema = schema
        self.auto_migrate = auto_migrate
        self.connect_timeout_s = connect_timeout_s
        self.quoted_schema = '"' + schema.replace('"', '""') + '"'
        self.jobs_sql = f"{self.quoted_schema}.qmlkit_jobs"
        self.inserter = JobInserter(self.jobs_sql)
        #: Names the storage in messages (set by `PostgresStorage`).
        self.label = f"PostgresStorage({self.where}, schema={schema!r})"

    # --- primitives ------------------------------------------------------------------

    def create_engines(self, url: sa.URL, *, pool_size: int,
                       engine_options: Mapping[str, Any]) -> tuple[sa.Engine, sa.Engine | None]:
        """A transactional pool and an autocommit pool (for single-statement hot paths),
        both pinging connections idle for over `PRE_PING_AFTER_IDLE_S`, their
        connections opened with `KEEPALIVE_OPTIONS` (where the URL does not set them).

        Raises:
            ConfigurationError: The driver is missing or an engine option is wrong.
        """
        connect_args: dict[str, Any] = {
            "connect_timeout": max(1, int(min(self.connect_timeout_s, 10))),
            **{k: v for k, v in KEEPALIVE_OPTIONS.items() if k not in url.query},
        }
        options: dict[str, Any] = {
            "pool_size": pool_size, "max_overflow": 4, "connect_args": connect_args,
            **engine_options,
        }
        try:
            engine = sa.create_engine(url, **options)
        except (ImportError, sa.exc.ArgumentError) as exc:
            raise ConfigurationError(f"cannot create an engine for {self.label}: {exc}") from exc
        ping_idle_connections(engine, PRE_PING_AFTER_IDLE_S)
        auto_engine = sa.create_engine(url, **{
            **options, "isolation_level": "AUTOCOMMIT", "pool_reset_on_return": None,
            "connect_args": with_server_options(options["connect_args"], url, CLAIM_SETTINGS)})
        ping_idle_connections(auto_engine, PRE_PING_AFTER_IDLE_S)
        return engine, auto_engine

    def prepare(self, storage: SQLStore, engine: sa.Engine) -> None:
        """Connect within ``connect_timeout_s`` (retried with backoff), then migrate the
        schema, or check it is current when ``auto_migrate`` is off.

        Raises:
            ConfigurationError: Credentials refused, no such database, a bad option.
            StorageUnavailable: The server stayed unreachable.
            SchemaVersionError: The schema is newer, or not current without auto_migrate.
        """
        where = self.where
        deadline = time.monotonic() + self.connect_timeout_s
        backoff = Backoff(CONNECT_RETRY_INITIAL_S, CONNECT_RETRY_CAP_S)
        while True:
            try:
                with engine.begin() as conn:
                    if self.auto_migrate:
                        for migration in migrations.migrate(conn, self.schema):
                            log.info("%r: applied migration %d (%s)", storage, migration.version,
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
                    f"PostgreSQL at {where}, schema {self.schema!r}: {first_line(exc.orig)}"
                ) from None
            except OperationalError as exc:
                text = first_line(exc.orig)
                if is_config_error(text):
                    raise ConfigurationError(
                        f"PostgreSQL at {where} refused the connection: {text}"
                    ) from None
                if time.monotonic() >= deadline:
                    raise StorageUnavailable(
                        f"PostgreSQL at {where} is unreachable after "
                        f"{self.connect_timeout_s:g} s: {text}"
                    ) from None
            time.sleep(backoff.jittered(backoff.next()))

    def insert(self, table: sa.Table) -> Any:
        """PostgreSQL's ``INSERT … ON CONFLICT``."""
        return sa.dialects.postgresql.insert(table)

    def progress_merge(self, column: sa.ColumnElement[Any], entry: str) -> sa.ColumnElement[Any]:
        """``(column::jsonb || jsonb_build_object('progress', entry::jsonb))::text``."""
        jsonb = sa.dialects.postgresql.JSONB
        return sa.cast(
            sa.cast(column, jsonb).op("||")(
                sa.func.jsonb_build_object("progress", sa.cast(
                    sa.bindparam("progress_entry", entry, type_=sa.Text), jsonb))
            ),
            sa.Text,
        )

    # --- operations ----------------------------------------------------------------------

    def insert_sql(self) -> str:
        """``INSERT … SELECT * FROM unnest(%b::type[], …)``: one binary array per column."""
        return insert_sql(self.jobs_sql)

    def insert_jobs(self, storage: SQLStore, cursor: Any, rows: list[tuple[Any, ...]]) -> None:
        """Insert encoded rows in one statement, whatever their number: ``VALUES`` for one,
        ``unnest`` of binary arrays for a few, a binary ``COPY`` for many
        (`qmlkit_postgres.inserts.COPY_MIN_ROWS`)."""
        self.inserter.insert(cursor, rows)

    def claim(
        self,
        storage: SQLStore,
        *,
        worker_id: str,
        server_name: str,
        queues: Sequence[str],
        limit: int,
        now: datetime,
        with_previous: bool,
    ) -> list[tuple[Job, JobState | None]]:
        """One ``WITH picked AS (SELECT … FOR UPDATE SKIP LOCKED) UPDATE … RETURNING``;
        a retry after a dropped connection first ends the lost attempt's backend and
        collects what it committed. See `SQLDialect.claim`."""
        processing = Processing(started_at=now, worker_id=worker_id, server_name=server_name)
        claim_sql, recover_sql, params = self.claim_statements(
            list(queues), max(1, min(limit, MAX_CLAIM)), processing)
        attempt = [0]
        backends: list[int] = []

        def claim(cursor: psycopg.Cursor[tuple[Any, ...]]) -> list[tuple[Any, ...]]:
            attempt[0] += 1
            if attempt[0] > 1:
                # The lost attempt may still run on the server, holding rows SKIP LOCKED
                # passes by: end it, then collect whatever it committed.
                end_backends(cursor, backends)
                cursor.execute(recover_sql, params)
                found = cursor.fetchall()
                if found:
                    log.warning("recovered %d job(s) claimed before a dropped connection",
                                len(found))
                    return found
            backends.append(cursor.connection.info.backend_pid)
            cursor.execute(claim_sql, params)  # prepared by psycopg once it repeats
            return cursor.fetchall()

        rows = storage.executor.write_one(claim)
        if not rows:
            return []
        rows.sort(key=lambda r: (-r[3], r[-1] or now, r[0]))
        return self._claimed(storage, rows, processing, with_previous)

    def _claimed(self, storage: SQLStore, rows: list[tuple[Any, ...]], processing: Processing,
                 with_previous: bool) -> list[tuple[Job, JobState | None]]:
        """Jobs from the claim's RETURNING rows; rows that lie are quarantined."""
        claimed: list[tuple[Job, JobState | None]] = []
        corrupt: list[tuple[str, str]] = []
        for raw in rows:
            row = dict(zip(_RETURNED, raw, strict=False))
            try:
                row["created_at"] = row["created_at"].astimezone(timezone.utc)
                if row["expires_at"] is not None:
                    row["expires_at"] = row["expires_at"].astimezone(timezone.utc)
                job = claimed_job(row, row["attempts"], processing)  # RETURNING: incremented
                previous = None
                prev = raw[-2]
                if prev is not None and (
                        with_previous or not prev.startswith('{"name":"Enqueued"')):
                    previous = JOB_STATE.validate_json(prev)  # a row that lies is quarantined
                    if previous.name != "Enqueued":
                        raise ValueError(
                            f"state column 'Enqueued' disagrees with state data {previous.name!r}")
            except DECODE_ERRORS as exc:
                corrupt.append((row["id"], undecodable_reason(exc, "row")))
                continue
            claimed.append((job, previous))
        if corrupt:
            self._quarantine(storage, corrupt, processing.started_at)
        return claimed


    def claim_statements(self, queues: list[str], limit: int, processing: Processing
                         ) -> tuple[str, str, dict[str, Any]]:
        """The claim statement, the recovery query of a retried claim, and their
        parameters (``%(name)s``). It runs with `CLAIM_SETTINGS`; its limit is written in,
        as a generic plan of ``LIMIT $n`` expects a tenth of the table and reads it all.

        Args:
            queues: The queues to take from; empty means all of them.
            limit: 1 to ``MAX_CLAIM`` jobs.
            processing: The Processing state the claimed rows get.
        """
        state_data = processing.model_dump_json()
        qparams: dict[str, Any]
        if len(queues) == 1:
            where, qparams = "AND queue = %(queue)s", {"queue": queues[0]}
        elif queues:
            where, qparams = "AND queue = ANY(%(queues)s)", {"queues": queues}
        else:
            where, qparams = "", {}
        returning = ", ".join(f"j.{c}" for c in _RETURNED)
        claim_sql = (
            f"WITH picked AS (SELECT id, state_data AS prev, enqueued_at AS prev_enqueued "
            f"FROM {self.jobs_sql} WHERE state = 'Enqueued' {where} "
            f"ORDER BY priority DESC, enqueued_at, id LIMIT {int(limit)} "
            f"FOR UPDATE SKIP LOCKED) "
            f"UPDATE {self.jobs_sql} AS j SET state = 'Processing', state_data = %(data)s, "
            f"due_at = NULL, started_at = %(now)s, "  # enqueued_at kept: requeues restore it
            f"server_name = %(server)s, attempts = j.attempts + 1, {_HISTORY} "
            f"FROM picked WHERE j.id = picked.id "
            f"RETURNING {returning}, picked.prev, picked.prev_enqueued"
        )
        # A retry after a dropped connection first collects what the lost attempt may
        # have committed: rows Processing under this server since exactly ``now``.
        recover_sql = (
            f"SELECT {', '.join(_RETURNED)}, NULL, NULL FROM {self.jobs_sql} "
            f"WHERE state = 'Processing' AND server_name = %(server)s "
            f"AND started_at = %(now)s AND state_data = %(data)s"
        )
        params = {"data": state_data, "now": processing.started_at,
                  "server": processing.server_name, **qparams}
        return claim_sql, recover_sql, params

    def _quarantine(self, storage: SQLStore, corrupt: list[tuple[str, str]], now: datetime) -> None:
        """Move rows that will not decode to Failed with the reason; the worker goes on."""
        sql = (f"UPDATE {self.jobs_sql} AS j SET state = 'Failed', state_data = %s, "
               f"started_at = NULL, server_name = NULL, {_HISTORY} WHERE id = %s")
        values = []
        for job_id, reason in corrupt:
            log.error("job %s quarantined: %s", job_id, reason)
            failed = Failed(failed_at=now, exception_type=QUARANTINE_EXCEPTION, message=reason)
            values.append((failed.model_dump_json(), job_id))
        storage.executor.write_raw(lambda cursor: cursor.executemany(sql, values))

    def acknowledge(self, storage: SQLStore, items: Sequence[Transition]) -> list[Job | StaleClaim]:
        """See `SQLDialect.acknowledge`: one ``UPDATE … FROM unnest(…)`` per batch.

        A change retried after a lost reply finds its own result already stored (same
        attempt, same state data) and counts as applied, not as stale.
        """
        applied = [item.applied() for item in items]
        cols: list[list[Any]] = [[] for _ in range(11)]
        cache: dict[int, tuple[dict[str, Any], datetime | None]] = {}
        for item, job in zip(items, applied, strict=True):
            found = cache.get(id(job.state))
            if found is None:
                state = job.state
                at = getattr(state, "succeeded_at", None) or getattr(state, "failed_at", None)
                found = cache[id(state)] = (state_columns(state),
                                            minute_of(at) if at is not None else None)
            c, minute = found
            for i, value in enumerate((
                item.job.id, item.token, c["state"], c["state_data"], c["enqueued_at"],
                c["due_at"], c["started_at"], c["server_name"], job.retry_count, job.expires_at,
                minute,
            )):
                cols[i].append(value)
        jobs, stats = self.jobs_sql, f"{self.quoted_schema}.qmlkit_stats"
        # One statement: ``live`` reads, from the statement's snapshot, which rows are
        # still Processing under the token; the UPDATE also accepts a row already holding
        # exactly this outcome (a retry after a lost reply) but appends history and
        # counts throughput only for rows that were live. Arrays bound in binary.
        sql = (
            "WITH v AS (SELECT * FROM unnest(%b::text[], %b::int[], %b::text[], %b::text[], "
            "%b::timestamptz[], %b::timestamptz[], %b::timestamptz[], %b::text[], %b::int[], "
            "%b::timestamptz[], %b::timestamptz[]) AS v(id, token, state, state_data, "
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

        done = storage.executor.write_one(write)
        return [
            job if item.job.id in done else StaleClaim(item.job.id, item.token)
            for item, job in zip(items, applied, strict=True)
        ]

    # --- background duties: one statement each ---------------------------------------

    def _requeue(
        self, storage: SQLStore, cursor: Any, condition: str, params: dict[str, Any], now: datetime,
        reason: str | None, limit: int | None, order: str = "id", prefix: str = "",
        keep_place: bool = False,
    ) -> list[StateChange]:
        """Move rows matching ``condition`` to Enqueued in one statement; return the changes.

        With ``keep_place``, a row keeps the ``enqueued_at`` it still holds (claims keep
        the column), so a requeued job goes back to its place in the queue.
        """
        returning = ", ".join(f"j.{c}" for c in _RETURNED)
        at = "coalesce(j.enqueued_at, %(now)s)" if keep_place else "%(now)s"
        at_iso = (f"""to_char({at} AT TIME ZONE 'UTC', 'YYYY-MM-DD"T"HH24:MI:SS.US"Z"')"""
                  if keep_place else "%(now_iso)s::text")
        sql = (
            f"{prefix}{', ' if prefix else 'WITH '}picked AS (SELECT id, state_data AS prev "
            f"FROM {self.jobs_sql} WHERE {condition} ORDER BY {order} "
            f"{'LIMIT %(limit)s ' if limit is not None else ''}FOR UPDATE SKIP LOCKED) "
            f"UPDATE {self.jobs_sql} AS j SET state = 'Enqueued', enqueued_at = {at}, "
            f"due_at = NULL, started_at = NULL, server_name = NULL, {_HISTORY}, "
            f"state_data = json_build_object('name', 'Enqueued', 'enqueued_at', {at_iso}, "
            "'queue', j.queue, 'reason', %(reason)s::text)::text "
            f"FROM picked WHERE j.id = picked.id RETURNING {returning}, picked.prev"
        )
        cursor.execute(sql, {**params, "now": now, "reason": reason, "limit": limit,
                             "now_iso": now.isoformat().replace("+00:00", "Z")})
        changes = []
        for raw in cursor.fetchall():
            row = dict(zip(_RETURNED, raw, strict=False))
            job, problem = storage.decode(row)
            try:
                previous = JOB_STATE.validate_json(raw[-1])
            except ValidationError:
                problem = problem or "previous state cannot be decoded"
            if problem:
                log.error("job %s requeued but cannot be decoded: %s", row["id"], problem)
                continue
            changes.append(StateChange(job, previous))
        return changes

    def promote_due(self, storage: SQLStore, *, now: datetime, limit: int) -> list[StateChange]:
        """See `Storage.promote_due`: one ``UPDATE`` over the due index."""
        return storage.executor.write_one(lambda cursor: self._requeue(
            storage, cursor, "state IN ('Scheduled', 'AwaitingRetry') AND due_at <= %(now)s", {},
            now, None, limit, order="due_at"))

    def requeue_stranded(
        self,
        storage: SQLStore,
        *,
        started_before: datetime,
        now: datetime,
        exclude_servers: Sequence[str],
    ) -> list[StateChange]:
        """See `Storage.requeue_stranded`: one ``UPDATE``."""
        condition = "state = 'Processing' AND started_at < %(before)s"
        if exclude_servers:
            condition += " AND NOT (server_name = ANY(%(excluded)s))"
        params = {"before": started_before, "excluded": list(exclude_servers)}
        return storage.executor.write_one(lambda cursor: self._requeue(
            storage, cursor, condition, params, now, "stranded", None, keep_place=True))

    def reclaim_dead_servers(
        self, storage: SQLStore, *, heartbeat_before: datetime, now: datetime
    ) -> list[StateChange]:
        """See `Storage.reclaim_dead_servers`: deregister and requeue in one statement."""
        prefix = (f"WITH dead AS (DELETE FROM {self.quoted_schema}.qmlkit_servers "
                  "WHERE last_heartbeat < %(before)s RETURNING id)")
        # A dead row, or an orphan: a registered-id stamp ("name#uuid") with no live row,
        # claimed before the bound (a server registering right now is not robbed).
        condition = (
            "state = 'Processing' AND (server_name IN (SELECT id FROM dead) OR "
            "(strpos(server_name, '#') > 0 AND started_at < %(before)s AND NOT EXISTS "
            f"(SELECT 1 FROM {self.quoted_schema}.qmlkit_servers AS srv "
            "WHERE srv.id = server_name AND srv.last_heartbeat >= %(before)s)))")
        return storage.executor.write_one(lambda cursor: self._requeue(
            storage, cursor, condition, {"before": heartbeat_before}, now, "reclaimed", None,
            prefix=prefix, keep_place=True))
