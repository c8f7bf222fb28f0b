"""Recurring templates and the server registry of `SQLStorage` (portable SQL only)."""

from __future__ import annotations

from collections.abc import Sequence
from datetime import datetime
from typing import TYPE_CHECKING, Any, cast

import sqlalchemy as sa
from sqlalchemy.engine import Connection
from sqlalchemy.exc import IntegrityError

from qmlkit.errors import DuplicateJob
from qmlkit.job import Job
from qmlkit.recurring import RecurringJob
from qmlkit.storage.base import ServerInfo
from qmlkit.storage.sql.executor import driver_cursor

if TYPE_CHECKING:
    from qmlkit.storage.sql.dialect import SQLDialect
    from qmlkit.storage.sql.executor import Executor
    from qmlkit.storage.sql.seam import SQLStore

__all__ = ["SQLRegistry"]


class SQLRegistry:
    """The recurring-template and server-registry half of `SQLStorage` (a mixin).

    Uses the storage's ``recurring`` and ``servers`` tables, its ``executor`` and
    ``dialect``, and ``insert_rows`` for the job a recurring tick materialises.
    """

    recurring: sa.Table
    servers: sa.Table
    executor: Executor
    dialect: SQLDialect

    def insert_rows(self, jobs: Sequence[Job]) -> list[tuple[Any, ...]]:
        """Encode jobs as insert rows (implemented by `SQLStorage`)."""
        raise NotImplementedError

    # --- recurring templates ---------------------------------------------------------

    def _template(self, definition: str, next_run_at: Any, last_run_at: Any) -> RecurringJob:
        template = RecurringJob.model_validate_json(definition)
        return template.model_copy(update={
            "next_run_at": self.dialect.result_ts(next_run_at),
            "last_run_at": self.dialect.result_ts(last_run_at),
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

        self.executor.write(write)

    def get_recurring(self, template_id: str) -> RecurringJob | None:
        """See `Storage.get_recurring`."""
        r = self.recurring
        query = sa.select(r.c.definition, r.c.next_run_at, r.c.last_run_at).where(
            r.c.id == template_id)

        def read() -> RecurringJob | None:
            with self.executor.read() as conn:
                row = conn.execute(query).first()
            return None if row is None else self._template(*row)

        return self.executor.retry(read)

    def list_recurring(self) -> list[RecurringJob]:
        """See `Storage.list_recurring`."""
        r = self.recurring
        query = sa.select(r.c.definition, r.c.next_run_at, r.c.last_run_at).order_by(r.c.id)

        def read() -> list[RecurringJob]:
            with self.executor.read() as conn:
                return [self._template(*row) for row in conn.execute(query)]

        return self.executor.retry(read)

    def remove_recurring(self, template_id: str) -> bool:
        """See `Storage.remove_recurring`."""
        r = self.recurring
        stmt = r.delete().where(r.c.id == template_id)
        return bool(self.executor.write(lambda conn: conn.execute(stmt).rowcount))

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
        rows = self.insert_rows([job]) if job is not None else []
        values: dict[str, Any] = {"next_run_at": next_run_at}
        if job is not None:
            values["last_run_at"] = expected_next_run_at
        stmt = (r.update().where(r.c.id == template_id)
                .where(r.c.next_run_at == expected_next_run_at).values(values))

        def write(conn: Connection) -> bool:
            if conn.execute(stmt).rowcount != 1:
                return False  # another server advanced it first
            if rows:
                cursor = driver_cursor(conn)
                try:  # this mixin is only ever part of an SQLStorage, an SQLStore
                    self.dialect.insert_jobs(cast("SQLStore", self), cursor, rows)
                finally:
                    cursor.close()
            return True

        dbapi_integrity = self.executor.engine.dialect.loaded_dbapi.IntegrityError
        try:
            return self.executor.write(write)
        except (IntegrityError, dbapi_integrity) as exc:
            raise DuplicateJob(job.id if job is not None else template_id) from exc

    # --- server registry ----------------------------------------------------------------

    def register_server(self, info: ServerInfo) -> None:
        """See `Storage.register_server`."""
        s = self.servers

        def write(conn: Connection) -> None:
            conn.execute(s.delete().where(s.c.id == info.id))
            conn.execute(s.insert().values(id=info.id, info=info.model_dump_json(),
                                           last_heartbeat=info.last_heartbeat))

        self.executor.write(write)

    def heartbeat(self, server_id: str, *, now: datetime) -> bool:
        """See `Storage.heartbeat`."""
        s = self.servers
        stmt = s.update().where(s.c.id == server_id).values(last_heartbeat=now)
        return bool(self.executor.write(lambda conn: conn.execute(stmt).rowcount))

    def deregister_server(self, server_id: str) -> None:
        """See `Storage.deregister_server`."""
        s = self.servers
        self.executor.write(lambda conn: conn.execute(s.delete().where(s.c.id == server_id)))

    def list_servers(self) -> list[ServerInfo]:
        """See `Storage.list_servers`."""
        s = self.servers

        def read() -> list[ServerInfo]:
            with self.executor.read() as conn:
                rows = conn.execute(sa.select(s.c.info, s.c.last_heartbeat)).all()
            infos = [
                ServerInfo.model_validate_json(info).model_copy(update={"last_heartbeat": beat})
                for info, beat in rows
            ]
            return sorted(infos, key=lambda i: i.started_at)

        return self.executor.retry(read)
