"""Bulk inserts on PostgreSQL (`qmlkit_postgres.inserts`): each size takes its statement
(VALUES, unnest, binary COPY), a hand-changed column type falls back to a text COPY, and
a bulk whose first try committed before its reply was lost counts as stored."""

from __future__ import annotations

from collections.abc import Iterator

import pytest
import sqlalchemy as sa
from qmlkit_postgres import PostgresStorage
from qmlkit_postgres.inserts import COPY_MIN_ROWS

from qmlkit.errors import DuplicateJob
from qmlkit.job import utcnow
from qmlkit.testing import make_job

pytestmark = pytest.mark.postgres


@pytest.fixture
def store(postgres_url: str) -> Iterator[PostgresStorage]:
    storage = PostgresStorage(postgres_url)
    storage.open()
    yield storage
    storage.close()


@pytest.mark.parametrize("n", [1, 2, COPY_MIN_ROWS - 1, COPY_MIN_ROWS, 2500])
def test_every_size_of_bulk_is_stored_whole(store: PostgresStorage, n: int) -> None:
    jobs = [make_job(args=[i, "tab\\t \"q\" ü"], kwargs={"n": None}, metadata={"m": i},
                     expires_at=utcnow() if i % 2 else None) for i in range(n)]
    assert store.enqueue_many(jobs) == jobs
    # The binary COPY read the column types: only the COPY needs them.
    assert (store.dialect.inserter._copy_types is not None) == (n >= COPY_MIN_ROWS)
    assert store.count_jobs() == {("default", "Enqueued"): n}
    stored = store.get_many([j.id for j in jobs])
    assert [stored[j.id] for j in jobs] == jobs
    claimed = store.claim(worker_id="w", server_name="s", queues=(), limit=50, now=utcnow())
    assert [j.id for j in claimed] == [j.id for j in jobs[:50]]


def test_a_column_of_another_type_makes_the_copy_a_text_one(
        store: PostgresStorage, postgres_url: str) -> None:
    schema = sa.engine.make_url(postgres_url).query["schema"]
    engine = sa.create_engine("postgresql+psycopg://127.0.0.1:5432/test")
    try:
        with engine.begin() as conn:  # "name": a type the binary COPY does not write
            conn.execute(sa.text(
                f'ALTER TABLE "{schema}".qmlkit_jobs ALTER COLUMN server_name TYPE name'))
    finally:
        engine.dispose()
    jobs = [make_job(args=[i]) for i in range(COPY_MIN_ROWS)]
    store.enqueue_many(jobs)
    assert store.dialect.inserter._binary is False  # the types were read, and refused
    assert store.get(jobs[-1].id) == jobs[-1]
    claimed = store.claim(worker_id="w", server_name="srv", queues=(), limit=3, now=utcnow())
    assert [j.state.server_name for j in claimed] == ["srv"] * 3


def test_a_bulk_retried_after_its_commit_counts_as_stored(
        store: PostgresStorage, monkeypatch: pytest.MonkeyPatch) -> None:
    write_one = store.executor.write_one

    def committed_then_retried(fn):  # the first try commits; its reply is lost
        write_one(fn)
        return write_one(fn)

    monkeypatch.setattr(store.executor, "write_one", committed_then_retried)
    jobs = [make_job(args=[i]) for i in range(6000)]
    assert store.enqueue_many(jobs) == jobs
    assert store.count_jobs() == {("default", "Enqueued"): 6000}
    # A real duplicate is still one, retried or not; nothing of that bulk is stored.
    with pytest.raises(DuplicateJob):
        store.enqueue_many([make_job(), make_job(id=jobs[0].id), *[make_job() for _ in range(200)]])
    assert store.count_jobs() == {("default", "Enqueued"): 6000}
