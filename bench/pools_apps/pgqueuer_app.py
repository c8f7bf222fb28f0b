"""pgqueuer for bench/pools.py: ``pgq run pgqueuer_app:create --max-concurrent-tasks N``.

PostgreSQL at ``BENCH_PG_DSN``; every pgqueuer object lives in the schema named by
``PGQUEUER_SCHEMA`` (pgqueuer's own setting, which ``pgq --schema`` also sets) and NOTIFYs
go on ``PGQUEUER_CHANNEL`` (channels are database-wide, so each run has its own). One
asyncpg connection per process (pgqueuer's ``AsyncpgDriver``, as its README sets it up);
the worker is a ``QueueManager`` (the queue alone, without the ``PgQueuer`` app's
scheduler, which would poll a schedules table this bench never fills).

``python pgqueuer_app.py N`` installs pgqueuer's tables into the schema (``Queries.install``,
what ``pgq install`` runs) and enqueues N jobs in batches of 1,000 (``Queries.enqueue``
with lists: one INSERT per batch).
"""

from __future__ import annotations

import asyncio
import os
import sys
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

import asyncpg
import stamp
from pgqueuer import Job, Queries, QueueManager

DSN = os.environ.get("BENCH_PG_DSN", "postgresql://127.0.0.1:5432/test")
ENTRYPOINT = "bench.wait"


@asynccontextmanager
async def create() -> AsyncIterator[QueueManager]:
    """The worker's factory for ``pgq run``: a QueueManager with the one entrypoint."""
    connection = await asyncpg.connect(DSN)
    try:
        manager = QueueManager(Queries.from_asyncpg_connection(connection))

        @manager.entrypoint(ENTRYPOINT)
        async def wait(job: Job) -> None:
            await stamp.wait_and_stamp_async()

        yield manager
    finally:
        await connection.close()


async def enqueue(n: int) -> None:
    connection = await asyncpg.connect(DSN)
    try:
        queries = Queries.from_asyncpg_connection(connection)
        await queries.install(create_schema=False)
        for start in range(0, n, 1000):
            size = min(1000, n - start)
            await queries.enqueue([ENTRYPOINT] * size, [None] * size, [0] * size)
    finally:
        await connection.close()


if __name__ == "__main__":
    asyncio.run(enqueue(int(sys.argv[1])))
