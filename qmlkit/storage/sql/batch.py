"""Batched reads of `SQLStorage` (`qmlkit.storage.capabilities.BatchRead`): many jobs,
or only their state names, in one ``SELECT ... WHERE id IN (...)``."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import TYPE_CHECKING, Any

import sqlalchemy as sa

from qmlkit.job import Job
from qmlkit.limits import storable_id

if TYPE_CHECKING:
    from qmlkit.storage.sql.executor import Executor

__all__ = ["SQLBatchRead"]


class SQLBatchRead:
    """The batched-read half of `SQLStorage` (a mixin); uses its ``jobs`` table,
    ``executor`` and ``decode``."""

    jobs: sa.Table
    executor: Executor

    def decode(self, row: sa.Row[Any] | Mapping[str, Any]) -> tuple[Job, str | None]:
        """A job row -> ``(job, None)`` or a stand-in (implemented by `SQLStorage`)."""
        raise NotImplementedError

    def _select_in(self, columns: Sequence[Any], job_ids: Sequence[str]) -> list[sa.Row[Any]]:
        ids = sorted({i for i in job_ids if storable_id(i)})
        if not ids:
            return []

        def read() -> list[sa.Row[Any]]:
            with self.executor.read() as conn:
                query = sa.select(*columns).where(self.jobs.c.id.in_(ids))
                return list(conn.execute(query))

        return self.executor.retry(read)

    def get_many(self, job_ids: Sequence[str]) -> dict[str, Job]:
        """See `qmlkit.storage.capabilities.BatchRead.get_many`."""
        jobs = (self.decode(row)[0] for row in self._select_in([self.jobs], job_ids))
        return {job.id: job for job in jobs}

    def job_states(self, job_ids: Sequence[str]) -> dict[str, str]:
        """See `qmlkit.storage.capabilities.BatchRead.job_states`: the ``state`` column
        only, nothing decoded."""
        rows = self._select_in([self.jobs.c.id, self.jobs.c.state], job_ids)
        return {row.id: row.state for row in rows}
