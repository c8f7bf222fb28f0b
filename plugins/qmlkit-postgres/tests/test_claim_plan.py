"""The PostgreSQL claim's plan does not depend on the table's statistics (issue #16, 3).

A jobs table analyzed while empty and then filled by a burst of enqueues tells the
planner that ``state = 'Enqueued'`` matches about one row; left to its estimates it then
reads every Enqueued row through another index and sorts them all, on every claim,
until autovacuum analyzes the table again. The claim runs on connections whose sorting
is disabled (`CLAIM_SETTINGS`, given at connection start), so its plan is an ordered scan
of a claim index on an empty, a fresh and an analyzed large table alike, and so is the
generic plan of the prepared statement that psycopg makes of it once it repeats. These
tests read both plans (``EXPLAIN (FORMAT JSON)``, node types only: no timing is
asserted), on a connection of the pool the claim uses.
"""

from __future__ import annotations

import re
from collections.abc import Iterator
from typing import Any

import psycopg
import pytest
from qmlkit_postgres import PostgresStorage

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


#: The SQL types of the claim statement's parameters, for ``PREPARE``.
PARAM_TYPES = {"limit": "int", "data": "text", "now": "timestamptz", "server": "text",
               "queue": "text", "queues": "text[]"}


def claim_plan(store: PostgresStorage, queues: list[str], *,
               generic: bool = False) -> list[dict[str, Any]]:
    """Every node of the claim statement's plan, on a connection of the pool it runs on:
    its custom plan (the parameters' values known), or with ``generic`` the plan a
    prepared statement reuses (``plan_cache_mode = force_generic_plan``)."""
    processing = Processing(started_at=utcnow(), worker_id="w", server_name="plan")
    claim_sql, _, params = store.dialect.claim_statements(queues, 50, processing)
    engine = store.executor.autocommit_engine
    assert engine is not None
    raw = engine.raw_connection()
    try:
        cursor = raw.cursor()
        # PREPARE with typed $n placeholders, then EXPLAIN EXECUTE with the values
        names = list(dict.fromkeys(re.findall(r"%\((\w+)\)s", claim_sql)))
        text = re.sub(r"%\((\w+)\)s", lambda m: f"${names.index(m[1]) + 1}", claim_sql)
        types = ", ".join(PARAM_TYPES[name] for name in names)
        # the simple protocol: an extended one would take the $n as its own parameters
        result = raw.driver_connection.pgconn.exec_(
            f"PREPARE plan_probe ({types}) AS {text}".encode())
        assert result.status == psycopg.pq.ExecStatus.COMMAND_OK, result.error_message
        mode = "force_generic_plan" if generic else "force_custom_plan"
        cursor.execute(f"SET plan_cache_mode = {mode}")
        marks = ", ".join(f"%s::{PARAM_TYPES[name]}" for name in names)
        cursor = psycopg.ClientCursor(raw.driver_connection)  # the values as literals
        cursor.execute(f"EXPLAIN (FORMAT JSON) EXECUTE plan_probe({marks})",
                       [params[name] for name in names])
        (document,) = cursor.fetchone()
    finally:
        raw.invalidate()  # the probe's prepared statement and setting leave with it
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
    assert_ordered_index_claim(claim_plan(store, queues, generic=True), filled=False)


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
    assert_ordered_index_claim(claim_plan(store, queues, generic=True))
    # And once analyzed (the large-table case) it still does
    sql(store, f"ANALYZE {store.jobs_sql}")
    assert_ordered_index_claim(claim_plan(store, queues))
    assert_ordered_index_claim(claim_plan(store, queues, generic=True))


@pytest.mark.slow
def test_claim_after_a_burst_takes_the_oldest_jobs_first(store: PostgresStorage) -> None:
    sql(store, f"ANALYZE {store.jobs_sql}")
    burst(store, BURST)
    claimed = store.claim(worker_id="w", server_name="plan", queues=["default"], limit=50,
                          now=utcnow())
    assert [job.id for job in claimed] == [f"burst-{i:07d}" for i in range(1, 51)]
    left = sql(store, f"SELECT count(*) FROM {store.jobs_sql} WHERE state = 'Enqueued'")
    assert left == [(BURST - 50,)]



def test_sorting_is_off_only_on_the_claim_pool_and_the_users_options_still_apply(
        postgres_url: str) -> None:
    # Given a URL with libpq options of the user's own
    storage = PostgresStorage(f"{postgres_url}&options=-c%20statement_timeout%3D12345")
    storage.open()
    try:
        def settings(engine: Any) -> list[str]:
            with engine.connect() as conn:
                return [conn.exec_driver_sql(f"SHOW {name}").scalar() for name in
                        ("enable_sort", "enable_incremental_sort", "statement_timeout")]

        # Then the claim's pool has sorting off and the user's setting; the other pool,
        # which serves reads such as the dashboard's listings, only the user's setting
        assert settings(storage.executor.autocommit_engine) == ["off", "off", "12345ms"]
        assert settings(storage.executor.engine) == ["on", "on", "12345ms"]
    finally:
        storage.close()
