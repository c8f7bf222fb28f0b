"""What a `SQLDialect`'s operations may use: the two sides of the seam, as protocols.

`SQLStore` is what `SQLStorage` offers a dialect (its tables, its executor, row
decoding and encoding); `Primitives` is what the portable operations
(`qmlkit.storage.sql.portable`) ask of a dialect. Both are satisfied by the classes of
this package; they exist so that a dialect written elsewhere (a plugin) depends on
documented names only.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from datetime import datetime
from typing import Any, Protocol

import sqlalchemy as sa

from qmlkit.job import Job
from qmlkit.storage.sql.executor import Executor

__all__ = ["Primitives", "SQLStore"]


class SQLStore(Protocol):
    """The storage side: what `SQLStorage` gives its dialect.

    Attributes:
        jobs, stats, servers, recurring: The tables of `qmlkit.storage.sql.schema`.
        metadata: Their ``MetaData`` (for ``create_all``).
        executor: Transactions with retry (`qmlkit.storage.sql.executor.Executor`).
        max_payload_bytes: Largest encoded arguments accepted, in bytes.
    """

    jobs: sa.Table
    stats: sa.Table
    servers: sa.Table
    recurring: sa.Table
    metadata: sa.MetaData
    executor: Executor
    max_payload_bytes: int

    def decode(self, row: sa.Row[Any] | Mapping[str, Any]) -> tuple[Job, str | None]:
        """A job row -> ``(job, None)``, or ``(quarantine stand-in, reason)``."""
        ...

    def insert_rows(self, jobs: Sequence[Job]) -> list[tuple[Any, ...]]:
        """Encode jobs as insert rows (``INSERT_COLUMNS`` order), checking each."""
        ...

    def duplicate_id(self, ids: list[str]) -> str:
        """Which of ``ids`` made an insert fail."""
        ...


class Primitives(Protocol):
    """The dialect side used by the portable operations (see `SQLDialect`)."""

    timestamp_bind_type: Any

    def bind_ts(self, value: datetime | None) -> Any:
        """An aware datetime as a bind value."""
        ...

    def result_ts(self, value: Any) -> datetime | None:
        """A timestamp read by a hand-built statement -> aware UTC datetime."""
        ...

    def lock_rows(self, query: sa.Select[Any]) -> sa.Select[Any]:
        """Lock the selected rows, skipping rows others hold."""
        ...

    def history_append(self) -> sa.ColumnElement[Any]:
        """SQL for ``history`` with the current state appended."""
        ...

    def insert(self, table: sa.Table) -> Any:
        """An INSERT construct with ``on_conflict_do_update``."""
        ...
