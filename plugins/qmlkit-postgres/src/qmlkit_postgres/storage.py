"""``PostgresStorage``: qmlkit jobs in PostgreSQL, on SQLAlchemy 2 with psycopg 3.

The core ``SQLStorage`` (same tables, row encoding, decoding and reads) with
`qmlkit_postgres.dialect.PostgresDialect`, whose statements do each hot or bulk step in
one round trip (see that module). Added here: URL and option checks, schema migrations
(`PostgresStorage.migrate`, ``qmlkit migrate``), and enqueue inside a caller's own
transaction (`PostgresStorage.enqueue_many` with ``connection=``).
"""

from __future__ import annotations

import logging
import weakref
from collections.abc import Mapping, Sequence
from typing import Any, ClassVar

import sqlalchemy as sa
from pydantic import Field
from sqlalchemy.engine import Connection
from sqlalchemy.exc import IntegrityError, OperationalError

import qmlkit_postgres.migrations as migrations
from qmlkit.errors import ConfigurationError, DuplicateJob, StorageUnavailable
from qmlkit.job import Job
from qmlkit.storage.capabilities import DefaultWakeup
from qmlkit.storage.options import StorageOptions
from qmlkit.storage.sql import SQLStorage
from qmlkit_postgres.connections import PRE_PING_AFTER_IDLE_S, first_line
from qmlkit_postgres.dialect import PostgresDialect, describe

__all__ = ["PRE_PING_AFTER_IDLE_S", "PostgresOptions", "PostgresStorage", "describe"]

log = logging.getLogger(__name__)


class PostgresOptions(StorageOptions):
    """Options of `PostgresStorage` (the keyword arguments of its constructor)."""

    backend: ClassVar[str] = "PostgreSQL storage"
    schema_name: str | None = Field(None, alias="schema")
    auto_migrate: bool | None = None
    connect_timeout_s: float = 10.0
    busy_timeout_s: float = 60.0
    pool_size: int = 12
    max_payload_bytes: int | None = None
    engine_options: dict[str, Any] | None = None


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

    dialect: PostgresDialect  # the one __init__ builds

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
        dialect = PostgresDialect(parsed, schema=schema, auto_migrate=auto_migrate,
                                  connect_timeout_s=connect_timeout_s)
        super().__init__(
            parsed.render_as_string(hide_password=False),
            busy_timeout_s=busy_timeout_s, pool_size=pool_size,
            max_payload_bytes=max_payload_bytes, schema=schema, engine_options=engine_options,
            dialect=dialect,
        )
        self.sa_url = parsed
        self.url = parsed.render_as_string(hide_password=True)
        self.schema = schema
        self.connect_timeout_s = connect_timeout_s
        self.jobs_sql = dialect.jobs_sql
        dialect.label = repr(self)

    @classmethod
    def from_url(cls, url: str, options: Mapping[str, Any]) -> PostgresStorage:
        """Build from a URL and the storage options (the keyword arguments above).

        Raises:
            ConfigurationError: An unknown option, named, or a bad URL.
        """
        return cls(url, **PostgresOptions.parse(options).given())

    @property
    def auto_migrate(self) -> bool:
        """Whether `open` applies pending migrations (else it only checks the version).
        May be changed before `open` (``qmlkit`` inspection commands turn it off)."""
        return self.dialect.auto_migrate

    @auto_migrate.setter
    def auto_migrate(self, value: bool) -> None:
        self.dialect.auto_migrate = value

    def default_wakeup(self) -> DefaultWakeup:
        """Wake-ups over ``LISTEN/NOTIFY`` on this storage's own database, through the
        kombu transport of `qmlkit_postgres.wakeup` (a connection of their own, no
        table), on an exchange of this schema's own (see
        `qmlkit.storage.capabilities.WakeupProvider`).

        Returns:
            ``pgnotify+postgresql://`` with this storage's host, port, database,
            credentials and driver parameters; the schema as the scope.
        """
        url = self.sa_url.set(drivername="postgresql").render_as_string(hide_password=False)
        return DefaultWakeup(f"pgnotify+{url}", scope=self.schema)

    def __repr__(self) -> str:
        """``PostgresStorage(host:port/database, schema='name')``, never the password."""
        return f"PostgresStorage({describe(self.sa_url)}, schema={self.schema!r})"

    # --- schema -------------------------------------------------------------------

    def migrate(self) -> list[str]:
        """Apply pending schema migrations now (what ``qmlkit migrate`` runs).

        Returns:
            ``"<version>: <name>"`` for each migration applied, oldest first.

        Raises:
            SchemaVersionError: The schema is newer than this package knows.
            StorageUnavailable: The server cannot be reached.
        """
        own = self.executor.is_open
        engine = self.executor.engine if own else sa.create_engine(self.sa_url, pool_pre_ping=True)
        try:
            with engine.begin() as conn:
                done = migrations.migrate(conn, self.schema)
        except OperationalError as exc:
            raise StorageUnavailable(
                f"PostgreSQL at {describe(self.sa_url)}: {first_line(exc.orig)}"
            ) from None
        finally:
            if not own:
                engine.dispose()
        return [f"{m.version}: {m.name}" for m in done]

    # --- enqueue ------------------------------------------------------------------

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
        rows = self.insert_rows(jobs)
        conn = _connection_of(connection)
        self._check_same_database(conn)
        params = tuple(list(col) for col in zip(*rows, strict=False))
        try:
            conn.exec_driver_sql(self.dialect.insert_sql(), params)
        except IntegrityError as exc:
            raise DuplicateJob(str(jobs[0].id) if len(jobs) == 1 else
                               f"one of {len(jobs)} jobs ({exc.orig})") from exc
        return list(jobs)

    def _enqueue_own(self, jobs: Sequence[Job]) -> list[Job]:
        """Insert in one autocommitted statement; a retry after a lost reply that finds
        its own rows already there counts as done, not as a duplicate."""
        rows = self.insert_rows(jobs)
        ids = [job.id for job in jobs]
        attempt = [0]

        def insert(cursor: Any) -> None:
            attempt[0] += 1
            try:
                self.dialect.insert_jobs(self, cursor, rows)
            except self.engine.dialect.loaded_dbapi.IntegrityError:
                if attempt[0] == 1:
                    raise
                cursor.execute(f"SELECT count(*) FROM {self.jobs_sql} WHERE id = ANY(%s)", (ids,))
                if cursor.fetchone()[0] != len(ids):
                    raise
                log.warning("enqueue of %d job(s) was committed before a dropped connection",
                            len(ids))

        try:
            self.executor.write_one(insert)  # one statement, whatever the number of rows
        except IntegrityError as exc:
            raise DuplicateJob(self.duplicate_id(ids)) from exc
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
            (self.jobs_sql,)).one()
        ours = self.sa_url.database or ""
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
        sql = f"SELECT id FROM {self.jobs_sql} WHERE id = ANY(%s)"

        def read(cursor: Any) -> set[str]:
            cursor.execute(sql, (list(ids),))
            return {row[0] for row in cursor.fetchall()}

        return self.executor.write_one(read)


def _single(value: Any) -> str | None:
    """A URL query value (a string, or a tuple when repeated) as one string."""
    if isinstance(value, tuple):
        return str(value[-1]) if value else None
    return None if value is None else str(value)

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
        if not isinstance(conn, Connection):
            raise ConfigurationError(
                f"transactional enqueue needs a SQLAlchemy Connection or Session; "
                f"{type(connection).__name__}.connection() gave {type(conn).__name__}"
            )
    if conn.dialect.name != "postgresql":
        raise ConfigurationError(
            f"transactional enqueue needs a connection to PostgreSQL, not {conn.dialect.name}"
        )
    return conn


#: Callers' DBAPI connections already checked by `PostgresStorage._check_same_database`.
_VERIFIED: weakref.WeakKeyDictionary[Any, bool] = weakref.WeakKeyDictionary()
