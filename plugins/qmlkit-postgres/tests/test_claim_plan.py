"""The PostgreSQL claim's plan does not depend on the table's statistics (issue #16, 3).

A jobs table analyzed while empty and then filled by a burst of enqueues tells the
planner that ``state = 'Enqueued'`` matches about one row; left to its estimates it then
reads every Enqueued row through another index and sorts them all, on every claim,
until autovacuum analyzes the table again. The claim runs with sorting disabled for its
one statement, so its plan is an ordered scan of a claim index on an empty, a fresh and
an analyzed large table alike. These tests read the plan (``EXPLAIN (FORMAT JSON)``,
node types only: no timing is asserted).
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import psycopg
import pytest
from qmlkit_postgres import PostgresStorage
from qmlkit_postgres.dialect import CLAIM_SETTINGS

from qmlkit.job import Enqueued, Processing, utcnow

pytestmark = pytest.mark.postgres

#: Enqueued rows of the burst.
BURST = 100_000
CLAIM_INDEXES = {"qmlkit_jobs_claim", "qmlkit_jobs_claim_any"}


@pytest.fixture
def store(postgres_url: str) -> Iterator[PostgresStorage]:
    """A migrated schema whose jobs table autovacuum leaves alone (statistics stay as
    the test makes them)."""
    storage = PostgresStorage(postgres_url)
    storage.open()
    with storage.engine.begin() as conn:
        conn.exec_driver_sql(
            f"ALTER TABLE {storage.jobs_sql} SET (autovacuum_enabled = false)")
    yield storage
    storage.close()


def sql(store: PostgresStorage, statement: str, params: dict[str, Any] | None = None) -> Any:
    with store.engine.begin() as conn:
        result = conn.exec_driver_sql(statement, params or {})
        return result.all() if result.returns_rows else None


def burst(store: PostgresStorage, n: int) -> None:
    """Enqueue ``n`` jobs on queue ``default`` in one statement (no ANALYZE after)."""
    now = utcnow()
    sql(store, f"INSERT INTO {store.jobs_sql} (id, method, queue, priority, state, attempts, "
               "retry_count, max_retries, created_at, enqueued_at, payload, job_metadata, "
               "state_data) SELECT 'burst-' || lpad(g::text, 7, '0'), 'noop', 'default', 0, "
               "'Enqueued', 0, 0, 3, %(now)s, %(now)s + g * interval '1 microsecond', "
               "'{\"args\":[],\"kwargs\":{}}', '{}', %(state)s "
               "FROM generate_series(1, %(n)s) AS g",
        {"n": n, "now": now,
         "state": Enqueued(enqueued_at=now, queue="default").model_dump_json()})


def nodes(plan: dict[str, Any]) -> Iterator[dict[str, Any]]:
    yield plan
    for child in plan.get("Plans", ()):
        yield from nodes(child)


def claim_plan(store: PostgresStorage, queues: list[str]) -> list[dict[str, Any]]:
    """Every node of the plan of the claim statement, under the settings it runs with."""
    processing = Processing(started_at=utcnow(), worker_id="w", server_name="plan")
    claim_sql, _, params = store.dialect.claim_statements(queues, 50, processing)
    raw = store.engine.raw_connection()
    try:
        cursor = psycopg.ClientCursor(raw.driver_connection)
        cursor.execute(CLAIM_SETTINGS + "EXPLAIN (FORMAT JSON) " + claim_sql, params)
        while cursor.nextset():
            pass
        (document,) = cursor.fetchone()
        raw.rollback()
    finally:
        raw.close()
    return list(nodes(document[0]["Plan"]))


def assert_ordered_index_claim(plan: list[dict[str, Any]], *, filled: bool = True) -> None:
    """No sort anywhere; the rows are picked by an ordered scan of a claim index; and in
    a filled table the UPDATE finds each picked row by its key (an empty table's one
    page may be read whole)."""
    kinds = [node["Node Type"] for node in plan]
    assert "Sort" not in kinds and "Incremental Sort" not in kinds, kinds
    scans = [node for node in plan if node.get("Relation Name") == "qmlkit_jobs"
             and node["Node Type"].endswith("Scan")]
    picked = [node for node in scans if node.get("Index Name") in CLAIM_INDEXES]
    assert len(picked) == 1 and picked[0]["Node Type"] == "Index Scan", scans
    if filled:
        others = [node for node in scans if node is not picked[0]]
        assert [(n["Node Type"], n.get("Index Name")) for n in others] == [
            ("Index Scan", "qmlkit_jobs_pkey")], others


QUEUES = [pytest.param([], id="any-queue"), pytest.param(["default"], id="one-queue"),
          pytest.param(["default", "other"], id="two-queues")]


@pytest.mark.parametrize("queues", QUEUES)
def test_claim_on_an_empty_analyzed_table_scans_a_claim_index(
        store: PostgresStorage, queues: list[str]) -> None:
    sql(store, f"ANALYZE {store.jobs_sql}")
    assert_ordered_index_claim(claim_plan(store, queues), filled=False)


@pytest.mark.slow
@pytest.mark.parametrize("queues", QUEUES)
def test_claim_after_a_burst_into_a_table_analyzed_empty_sorts_nothing(
        store: PostgresStorage, queues: list[str]) -> None:
    # Given a table analyzed while empty, then 100,000 enqueued jobs without an ANALYZE
    sql(store, f"ANALYZE {store.jobs_sql}")
    burst(store, BURST)
    (reltuples,), = sql(store, "SELECT reltuples FROM pg_class WHERE oid = %(t)s::regclass",
                        {"t": store.jobs_sql})
    assert reltuples == 0  # the statistics still say "empty"
    # Then the claim reads the claim index in order: no Sort over the Enqueued rows
    assert_ordered_index_claim(claim_plan(store, queues))
    # And once analyzed (the large-table case) it still does
    sql(store, f"ANALYZE {store.jobs_sql}")
    assert_ordered_index_claim(claim_plan(store, queues))


@pytest.mark.slow
def test_claim_after_a_burst_takes_the_oldest_jobs_first(store: PostgresStorage) -> None:
    sql(store, f"ANALYZE {store.jobs_sql}")
    burst(store, BURST)
    claimed = store.claim(worker_id="w", server_name="plan", queues=["default"], limit=50,
                          now=utcnow())
    assert [job.id for job in claimed] == [f"burst-{i:07d}" for i in range(1, 51)]
    left = sql(store, f"SELECT count(*) FROM {store.jobs_sql} WHERE state = 'Enqueued'")
    assert left == [(BURST - 50,)]

