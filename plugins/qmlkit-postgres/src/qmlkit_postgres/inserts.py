"""Inserting new job rows into PostgreSQL, in one statement whatever their number.

* one row: a plain ``INSERT … VALUES`` (no arrays to dump);
* a few rows: ``INSERT … SELECT * FROM unnest(%b::type[], …)``, one binary array per column
  (psycopg escapes a text array's elements in Python);
* `COPY_MIN_ROWS` rows or more: one ``COPY … FROM STDIN (FORMAT BINARY)``, whose rows
  psycopg writes in C. It took 10,000 rows at 1.9 times the rate of unnest (91,403 against
  48,149 rows/s, insert and commit, load average 7) and 1,000 at 1.25 times; at 100 rows the
  two were even, and below that COPY's extra round trip costs more than it saves.

A binary COPY needs each column's exact type: it is read once from the catalog. A column
of a type this module does not write in binary (a schema changed by hand) makes the COPY
a text one, slower but correct for any type.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from qmlkit.storage.sql import INSERT_COLUMNS

__all__ = ["COPY_MIN_ROWS", "JobInserter", "insert_sql"]

#: Array types of the inserted columns, in ``INSERT_COLUMNS`` order (unnest).
_INSERT_TYPES = (
    "text", "text", "text", "int", "text", "int", "int", "int", "float8", "timestamptz",
    "timestamptz", "timestamptz", "timestamptz", "text", "timestamptz", "text", "text", "text",
)

#: From this many rows an insert is a binary COPY (see the module docstring).
COPY_MIN_ROWS = 100

#: Type oids whose binary form psycopg writes from qmlkit's row values (str, int, float,
#: aware datetime): text, varchar, int2, int4, int8, float4, float8, timestamptz.
_BINARY_OIDS = frozenset({25, 1043, 21, 23, 20, 700, 701, 1184})

_COLUMNS = ", ".join(INSERT_COLUMNS)


def insert_sql(jobs_sql: str) -> str:
    """``INSERT … SELECT * FROM unnest(%b::type[], …)`` into the table ``jobs_sql``: one
    binary array per column, in ``INSERT_COLUMNS`` order."""
    arrays = ", ".join(f"%b::{t}[]" for t in _INSERT_TYPES)
    return f"INSERT INTO {jobs_sql} ({_COLUMNS}) SELECT * FROM unnest({arrays})"


class JobInserter:
    """Inserts encoded job rows into one jobs table (see the module docstring).

    Args:
        jobs_sql: The table's quoted, schema-qualified name.
    """

    def __init__(self, jobs_sql: str) -> None:
        self.jobs_sql = jobs_sql
        self._copy_types: list[int] | None = None  # oids for a binary COPY, once read
        self._binary = True  # False once a column turned out not binary-writable

    def insert(self, cursor: Any, rows: Sequence[tuple[Any, ...]]) -> None:
        """Insert ``rows`` (tuples in ``INSERT_COLUMNS`` order) with one statement on a
        psycopg cursor, inside the caller's transaction (or as its own, in autocommit).

        Raises:
            psycopg.IntegrityError: An id is taken (the caller names it); nothing inserted.
        """
        if len(rows) == 1:
            marks = ", ".join(["%s"] * len(INSERT_COLUMNS))
            cursor.execute(f"INSERT INTO {self.jobs_sql} ({_COLUMNS}) VALUES ({marks})", rows[0])
        elif len(rows) < COPY_MIN_ROWS:
            cursor.execute(insert_sql(self.jobs_sql), [list(c) for c in zip(*rows, strict=True)])
        else:
            self._copy(cursor, rows)

    def _copy(self, cursor: Any, rows: Sequence[tuple[Any, ...]]) -> None:
        types = self._types(cursor) if self._binary else None
        sql = f"COPY {self.jobs_sql} ({_COLUMNS}) FROM STDIN"
        with cursor.copy(sql + " (FORMAT BINARY)" if types else sql) as copy:
            if types:
                copy.set_types(types)
            write = copy.write_row
            for row in rows:
                write(row)

    def _types(self, cursor: Any) -> list[int] | None:
        """The inserted columns' type oids, read from the catalog on first use; ``None``
        (and text COPYs from then on) if one is not a type written in binary here."""
        if self._copy_types is None:
            cursor.execute("SELECT attname, atttypid::int FROM pg_attribute WHERE attrelid = "
                           "%s::regclass AND attnum > 0 AND NOT attisdropped", (self.jobs_sql,))
            found = dict(cursor.fetchall())
            oids = [found.get(name, 0) for name in INSERT_COLUMNS]
            if not set(oids) <= _BINARY_OIDS:
                self._binary = False
                return None
            self._copy_types = oids
        return self._copy_types
