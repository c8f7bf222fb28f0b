"""Versioned schema migrations for qmlkit-postgres.

Each migration is a numbered list of SQL statements applied in one transaction, under a
transaction-scoped advisory lock so two processes starting at once never both apply it.
Applied versions are recorded in ``<schema>.qmlkit_migrations``. A schema whose recorded
version is newer than this package knows is refused: an older qmlkit must not write to
tables a newer one has reshaped.

The table and column names are those of ``qmlkit.storage.sql.build_metadata``, which
the shared SQL storage code queries.
"""

from __future__ import annotations

import zlib
from dataclasses import dataclass

import sqlalchemy as sa
from sqlalchemy.engine import Connection

from qmlkit.errors import ConfigurationError


@dataclass(frozen=True)
class Migration:
    """One schema version.

    Attributes:
        version: Its number, from 1, consecutive.
        name: What it does, for logs and ``qmlkit migrate``.
        statements: SQL with ``{schema}`` where the quoted schema name goes.
    """

    version: int
    name: str
    statements: tuple[str, ...]


MIGRATIONS: tuple[Migration, ...] = (
    Migration(1, "jobs, recurring templates and servers, with claim indexes", (
        "CREATE SCHEMA IF NOT EXISTS {schema}",
        """CREATE TABLE {schema}.qmlkit_jobs (
            id varchar(64) PRIMARY KEY,
            method varchar(255) NOT NULL,
            queue varchar(255) NOT NULL,
            priority integer NOT NULL DEFAULT 0,
            state varchar(16) NOT NULL,
            attempts integer NOT NULL DEFAULT 0,
            retry_count integer NOT NULL DEFAULT 0,
            max_retries integer NOT NULL,
            timeout_s double precision,
            created_at timestamptz NOT NULL,
            enqueued_at timestamptz,
            due_at timestamptz,
            started_at timestamptz,
            server_name varchar(255),
            expires_at timestamptz,
            payload text NOT NULL,
            job_metadata text NOT NULL,
            state_data text NOT NULL
        )""",
        # Partial indexes: a million finished rows cost a claim nothing.
        """CREATE INDEX qmlkit_jobs_claim ON {schema}.qmlkit_jobs
            (queue, priority DESC, enqueued_at) WHERE state = 'Enqueued'""",
        """CREATE INDEX qmlkit_jobs_claim_any ON {schema}.qmlkit_jobs
            (priority DESC, enqueued_at) WHERE state = 'Enqueued'""",
        """CREATE INDEX qmlkit_jobs_due ON {schema}.qmlkit_jobs (due_at)
            WHERE state IN ('Scheduled', 'AwaitingRetry')""",
        """CREATE INDEX qmlkit_jobs_expires ON {schema}.qmlkit_jobs (expires_at)
            WHERE expires_at IS NOT NULL""",
        """CREATE INDEX qmlkit_jobs_processing ON {schema}.qmlkit_jobs (server_name, started_at)
            WHERE state = 'Processing'""",
        "CREATE INDEX qmlkit_jobs_created ON {schema}.qmlkit_jobs (created_at)",
        "CREATE INDEX qmlkit_jobs_state_created ON {schema}.qmlkit_jobs (state, created_at)",
        """CREATE TABLE {schema}.qmlkit_recurring (
            id varchar(255) PRIMARY KEY,
            definition text NOT NULL,
            next_run_at timestamptz,
            last_run_at timestamptz
        )""",
        """CREATE TABLE {schema}.qmlkit_servers (
            id varchar(255) PRIMARY KEY,
            info text NOT NULL,
            last_heartbeat timestamptz NOT NULL
        )""",
    )),
    Migration(2, "state history per job and per-minute throughput counters", (
        "ALTER TABLE {schema}.qmlkit_jobs ADD COLUMN history text",
        """CREATE TABLE {schema}.qmlkit_stats (
            minute timestamptz NOT NULL,
            state varchar(16) NOT NULL,
            count integer NOT NULL,
            PRIMARY KEY (minute, state)
        )""",
    )),
    Migration(3, "claim indexes end in the job id (FIFO within a bulk enqueue)", (
        "DROP INDEX {schema}.qmlkit_jobs_claim",
        "DROP INDEX {schema}.qmlkit_jobs_claim_any",
        """CREATE INDEX qmlkit_jobs_claim ON {schema}.qmlkit_jobs
            (queue, priority DESC, enqueued_at, id) WHERE state = 'Enqueued'""",
        """CREATE INDEX qmlkit_jobs_claim_any ON {schema}.qmlkit_jobs
            (priority DESC, enqueued_at, id) WHERE state = 'Enqueued'""",
    )),
    Migration(4, "an index for counts by queue and state", (
        "CREATE INDEX qmlkit_jobs_queue_state ON {schema}.qmlkit_jobs (queue, state)",
    )),
)

#: The newest schema version this package writes.
LATEST = MIGRATIONS[-1].version


class SchemaVersionError(ConfigurationError):
    """The schema is at a version this package cannot use (newer, or not yet migrated)."""


def quote(conn: Connection, name: str) -> str:
    """Return ``name`` quoted as a PostgreSQL identifier."""
    return conn.dialect.identifier_preparer.quote_identifier(name)


def applied_version(conn: Connection, schema: str) -> int:
    """Return the highest applied migration of ``schema``, 0 when none.

    Args:
        conn: A connection to the database.
        schema: The schema name (unquoted).
    """
    table = conn.execute(
        sa.text("SELECT to_regclass(:name)"), {"name": f"{quote(conn, schema)}.qmlkit_migrations"}
    ).scalar()
    if table is None:
        return 0
    found = conn.execute(
        sa.text(f"SELECT max(version) FROM {quote(conn, schema)}.qmlkit_migrations")
    ).scalar()
    return int(found or 0)


def check_not_newer(version: int, schema: str) -> None:
    """Refuse a schema written by a newer qmlkit-postgres.

    Raises:
        SchemaVersionError: ``version`` > `LATEST`, naming both versions.
    """
    if version > LATEST:
        raise SchemaVersionError(
            f"PostgreSQL schema {schema!r} is at qmlkit-postgres schema version {version}, "
            f"but this qmlkit-postgres knows versions up to {LATEST}: it was migrated by a "
            "newer qmlkit-postgres; upgrade this one (pip install -U qmlkit-postgres) "
            "before it uses that schema"
        )


def migrate(conn: Connection, schema: str) -> list[Migration]:
    """Apply every pending migration to ``schema`` inside ``conn``'s transaction.

    Takes a transaction-scoped advisory lock keyed on the schema name first, so
    concurrent callers serialise and the second finds nothing left to do.

    Args:
        conn: A connection with a transaction begun; the caller commits.
        schema: The schema name (unquoted); created if missing.

    Returns:
        The migrations applied now, oldest first (empty when up to date).

    Raises:
        SchemaVersionError: The schema is newer than `LATEST`.
    """
    key = zlib.crc32(f"qmlkit-migrate:{schema}".encode())
    conn.execute(sa.text("SELECT pg_advisory_xact_lock(:key)"), {"key": key})
    current = applied_version(conn, schema)
    check_not_newer(current, schema)
    q = quote(conn, schema)
    if current == 0:
        conn.execute(sa.text(f"CREATE SCHEMA IF NOT EXISTS {q}"))
        conn.execute(sa.text(
            f"CREATE TABLE IF NOT EXISTS {q}.qmlkit_migrations ("
            "version integer PRIMARY KEY, name text NOT NULL, "
            "applied_at timestamptz NOT NULL DEFAULT now())"
        ))
    done = []
    for migration in MIGRATIONS:
        if migration.version <= current:
            continue
        for statement in migration.statements:
            conn.execute(sa.text(statement.format(schema=q)))
        conn.execute(
            sa.text(f"INSERT INTO {q}.qmlkit_migrations (version, name) VALUES (:v, :n)"),
            {"v": migration.version, "n": migration.name},
        )
        done.append(migration)
    return done
