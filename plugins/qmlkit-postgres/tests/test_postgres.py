"""qmlkit-postgres against the real PostgreSQL on 127.0.0.1:5432 (database ``test``).

The storage contract itself runs in ``tests/contract``; here is what is particular to
PostgreSQL: migrations, transactional enqueue, bad configuration, hand-edited rows and
connections dropped in the middle of a drain (field case C09).
"""

from __future__ import annotations

import logging
import threading
import time
import uuid
from collections import Counter
from datetime import timedelta

import pytest
import qmlkit_postgres.plugin
import sqlalchemy as sa
from qmlkit_postgres import LATEST, PostgresStorage, SchemaVersionError
from sqlalchemy.orm import Session

from qmlkit import App, Job
from qmlkit.errors import ConfigurationError, StorageUnavailable
from qmlkit.job import utcnow
from qmlkit.testing import free_port, make_job, wait_until

pytestmark = pytest.mark.postgres

FAST = {"polling_interval": timedelta(milliseconds=50), "log_attempts": False,
        "scheduler_poll_interval": timedelta(milliseconds=200)}


def make_app(url: str, name: str = "pg", **options: object) -> App:
    return App(name, storage=url, autoload=False, plugins=[qmlkit_postgres.plugin], **options)


def schema_of(url: str) -> str:
    return sa.engine.make_url(url).query["schema"]


@pytest.fixture
def engine() -> sa.Engine:
    """A plain engine on the test database (the caller's own, for transactional enqueue)."""
    eng = sa.create_engine("postgresql+psycopg://127.0.0.1:5432/test")
    yield eng
    eng.dispose()


# --- migrations ------------------------------------------------------------------------


def test_first_open_migrates_and_records_the_version(postgres_url: str, engine: sa.Engine) -> None:
    store = PostgresStorage(postgres_url)
    store.open()
    store.close()
    with engine.connect() as conn:
        versions = conn.execute(sa.text(
            f'SELECT version FROM "{schema_of(postgres_url)}".qmlkit_migrations')).scalars().all()
    assert versions == list(range(1, LATEST + 1))
    assert PostgresStorage(postgres_url).migrate() == []  # idempotent


def test_concurrent_first_opens_migrate_once(postgres_url: str, engine: sa.Engine) -> None:
    errors: list[BaseException] = []

    def open_one() -> None:
        try:
            store = PostgresStorage(postgres_url)
            store.open()
            store.close()
        except BaseException as exc:
            errors.append(exc)

    threads = [threading.Thread(target=open_one) for _ in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    assert errors == []
    with engine.connect() as conn:
        count = conn.execute(sa.text(
            f'SELECT count(*) FROM "{schema_of(postgres_url)}".qmlkit_migrations')).scalar()
    assert count == LATEST


def test_with_auto_migrate_off_open_names_qmlkit_migrate(postgres_url: str) -> None:
    with pytest.raises(SchemaVersionError, match="qmlkit migrate"):
        PostgresStorage(postgres_url + "&migrate=false").open()
    assert PostgresStorage(postgres_url).migrate() == [
        f"{m.version}: {m.name}"
        for m in __import__("qmlkit_postgres.migrations").migrations.MIGRATIONS]
    store = PostgresStorage(postgres_url + "&migrate=false")
    store.open()  # current now
    store.close()


def test_qmlkit_migrate_command(postgres_url: str) -> None:
    from click.testing import CliRunner

    from qmlkit.cli import main

    first = CliRunner().invoke(main, ["migrate", "--storage", postgres_url])
    assert first.exit_code == 0, first.output
    assert "applied migration 1:" in first.output
    again = CliRunner().invoke(main, ["migrate", "--storage", postgres_url])
    assert again.exit_code == 0 and "nothing to apply" in again.output


def test_a_schema_from_a_newer_version_is_refused_naming_both(
    postgres_url: str, engine: sa.Engine
) -> None:
    PostgresStorage(postgres_url).migrate()
    with engine.begin() as conn:
        conn.execute(sa.text(
            f'INSERT INTO "{schema_of(postgres_url)}".qmlkit_migrations (version, name) '
            f"VALUES ({LATEST + 7}, 'from the future')"))
    with pytest.raises(SchemaVersionError) as info:
        PostgresStorage(postgres_url).open()
    message = str(info.value)
    assert f"version {LATEST + 7}" in message and f"up to {LATEST}" in message


# --- bad configuration -----------------------------------------------------------------


def test_unknown_role_fails_at_start_naming_host_port_database_not_password() -> None:
    url = "postgresql://nobody_qmlkit:s3cret-pw@127.0.0.1:5432/test"
    with pytest.raises(ConfigurationError) as info:
        PostgresStorage(url, connect_timeout_s=5).open()
    message = str(info.value)
    assert "127.0.0.1:5432/test" in message and "nobody_qmlkit" in message
    assert "s3cret-pw" not in message and "s3cret-pw" not in repr(info.value.__cause__)


def test_missing_database_fails_at_start_naming_it() -> None:
    with pytest.raises(ConfigurationError, match=r"127\.0\.0\.1:5432/no_such_db_qmlkit"):
        PostgresStorage("postgresql://127.0.0.1:5432/no_such_db_qmlkit").open()


def test_unreachable_server_fails_at_start_naming_host_and_port() -> None:
    port = free_port()
    started = time.monotonic()
    with pytest.raises(StorageUnavailable, match=f"127.0.0.1:{port}/test"):
        PostgresStorage(f"postgresql://u:pw-x@127.0.0.1:{port}/test", connect_timeout_s=1).open()
    assert time.monotonic() - started < 30  # gave up after connect_timeout_s, did not hang


def test_unknown_option_is_named() -> None:
    with pytest.raises(ConfigurationError, match="colour"):
        PostgresStorage.from_url("postgresql://127.0.0.1/test", {"colour": "red"})


# --- transactional enqueue -------------------------------------------------------------


class Seen:
    """A state-change observer recording job ids."""

    def __init__(self) -> None:
        self.ids: list[str] = []

    @qmlkit_postgres.plugin.hookimpl
    def qmlkit_job_state_changed(self, job: Job, previous: object, current: object) -> None:
        if previous is None:
            self.ids.append(job.id)


@pytest.mark.parametrize("kind", ["session", "connection"])
def test_transactional_enqueue_commit_makes_the_job_visible_and_runnable(
    postgres_url: str, engine: sa.Engine, kind: str
) -> None:
    seen = Seen()
    app = App("tx", storage=postgres_url, autoload=False,
              plugins=[qmlkit_postgres.plugin, seen])
    ran: list[int] = []

    @app.job(name="receipt")
    def receipt(order: int) -> None:
        ran.append(order)

    with engine.begin() as conn:
        conn.execute(sa.text("CREATE TABLE IF NOT EXISTS public.qmlkit_test_orders (id int)"))
    try:
        if kind == "session":
            with Session(engine) as session, session.begin():
                session.execute(sa.text("INSERT INTO public.qmlkit_test_orders VALUES (1)"))
                with app.transaction(session):
                    job_id = receipt.enqueue(1)
                assert app.storage.get(job_id) is None  # not visible before the commit
                assert seen.ids == []  # nor announced
        else:
            with engine.connect() as conn, conn.begin():
                conn.execute(sa.text("INSERT INTO public.qmlkit_test_orders VALUES (1)"))
                with app.transaction(conn):
                    job_id = receipt.enqueue(1)
                assert app.storage.get(job_id) is None
        stored = app.storage.get(job_id)
        assert stored is not None and stored.state.name == "Enqueued"
        # A Session announces at its commit; a Connection as soon as the commit shows.
        wait_until(lambda: seen.ids == [job_id], timeout=10)
        server = app.server(**FAST, worker_count=1)
        server.start()
        try:
            wait_until(lambda: app.storage.get(job_id).state.name == "Succeeded", timeout=15)
        finally:
            server.stop()
        assert ran == [1]
    finally:
        with engine.begin() as conn:
            conn.execute(sa.text("DROP TABLE IF EXISTS public.qmlkit_test_orders"))
        app.close()


@pytest.mark.parametrize("kind", ["session", "connection"])
def test_transactional_enqueue_rollback_leaves_no_trace(
    postgres_url: str, engine: sa.Engine, kind: str
) -> None:
    seen = Seen()
    app = App("tx", storage=postgres_url, autoload=False,
              plugins=[qmlkit_postgres.plugin, seen])

    @app.job(name="receipt")
    def receipt(order: int) -> None: ...

    class Boom(Exception):
        pass

    with pytest.raises(Boom):
        if kind == "session":
            with Session(engine) as session, session.begin():
                with app.transaction(session):
                    receipt.enqueue(1)
                    receipt.enqueue_many([(2,), (3,)])
                raise Boom
        else:
            with engine.connect() as conn, conn.begin():
                with app.transaction(conn):
                    receipt.enqueue(1)
                raise Boom
    assert app.storage.count_jobs() == {}
    assert seen.ids == []
    # Outside the block, enqueue uses the storage's own transaction again.
    job_id = receipt.enqueue(4)
    assert app.storage.get(job_id) is not None and seen.ids == [job_id]
    app.close()


@pytest.mark.parametrize("kind", ["session", "connection"])
def test_a_rolled_back_savepoint_takes_its_jobs_and_their_announcements(
    postgres_url: str, engine: sa.Engine, kind: str
) -> None:
    seen = Seen()
    app = App("tx", storage=postgres_url, autoload=False,
              plugins=[qmlkit_postgres.plugin, seen])

    @app.job(name="receipt")
    def receipt(order: int) -> None: ...

    if kind == "session":
        with Session(engine) as session, session.begin():
            with app.transaction(session):
                kept = receipt.enqueue(1)
                nested = session.begin_nested()
                dropped = receipt.enqueue(2)
                nested.rollback()
    else:
        with engine.connect() as conn, conn.begin():
            with app.transaction(conn):
                kept = receipt.enqueue(1)
                nested = conn.begin_nested()
                dropped = receipt.enqueue(2)
                nested.rollback()
    assert app.storage.get(kept) is not None and app.storage.get(dropped) is None
    wait_until(lambda: seen.ids == [kept], timeout=10)
    later = receipt.enqueue(3)  # announced at once, after the transaction's
    assert seen.ids == [kept, later]
    app.close()


def test_each_connection_from_one_pooled_dbapi_connection_announces_its_own_jobs(
    postgres_url: str
) -> None:
    seen = Seen()
    app = App("tx", storage=postgres_url, autoload=False,
              plugins=[qmlkit_postgres.plugin, seen])

    @app.job(name="receipt")
    def receipt(order: int) -> None: ...

    single = sa.create_engine("postgresql+psycopg://127.0.0.1:5432/test", pool_size=1,
                              max_overflow=0)
    ids = []
    for i in range(3):  # the same DBAPI connection each time, a new Connection object
        with single.begin() as conn, app.transaction(conn):
            ids.append(receipt.enqueue(i))
    wait_until(lambda: sorted(seen.ids) == sorted(ids), timeout=10)
    single.dispose()
    app.close()


def test_transactional_enqueue_needs_a_storage_that_can(tmp_path: object) -> None:
    app = App("tx", storage="memory://", autoload=False)
    with pytest.raises(ConfigurationError, match="qmlkit-postgres"):
        with app.transaction(object()):
            pass


# --- rows edited by hand -----------------------------------------------------------------


def test_a_row_edited_into_an_invalid_state_fails_that_job_not_the_worker(
    postgres_url: str, engine: sa.Engine
) -> None:
    app = make_app(postgres_url)
    done: list[int] = []

    @app.job(name="work")
    def work(i: int) -> None:
        done.append(i)

    ids = work.enqueue_many([(i,) for i in range(5)])
    table = f'"{schema_of(postgres_url)}".qmlkit_jobs'
    with engine.begin() as conn:
        conn.execute(sa.text(f"UPDATE {table} SET payload = 'not json{{' WHERE id = :id"),
                     {"id": ids[1]})
        conn.execute(sa.text(f"UPDATE {table} SET state_data = '{{\"name\": \"Bogus\"}}' "
                             "WHERE id = :id"), {"id": ids[3]})
    server = app.server(**FAST, worker_count=2)
    server.start()
    try:
        wait_until(lambda: sorted(done) == [0, 2, 4], timeout=20)
        wait_until(lambda: app.storage.get(ids[1]).state.name == "Failed", timeout=10)
    finally:
        server.stop()
    broken = app.storage.get(ids[1])
    assert "cannot be decoded" in broken.state.message
    assert "cannot be decoded" in app.storage.get(ids[3]).state.message
    assert [j.id for j in app.storage.list_jobs(limit=10)]  # listing still works
    app.close()


# --- dropped connections mid-drain (C09) ---------------------------------------------------


def test_connections_killed_mid_drain_cost_no_job_and_run_none_twice(
    postgres_url: str, engine: sa.Engine, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, logger="qmlkit.storage.sql")
    name = f"qmlkit-outage-{uuid.uuid4().hex[:8]}"
    url = f"{postgres_url}&application_name={name}"
    app = make_app(url, storage_options={"busy_timeout_s": 120.0})
    runs: Counter[int] = Counter()
    lock = threading.Lock()

    @app.job(name="count")
    def count(i: int) -> None:
        with lock:
            runs[i] += 1

    total = 5000
    count.enqueue_many([(i,) for i in range(total)])
    server = app.server(**FAST, worker_count=4)

    def kill_all() -> int:
        with engine.connect() as conn:
            return conn.execute(sa.text(
                "SELECT count(pg_terminate_backend(pid)) FROM pg_stat_activity "
                "WHERE application_name = :name"), {"name": name}).scalar()

    server.start()
    try:
        # Terminate every connection of the app three times mid-drain, the last two
        # within a second of each other.
        for threshold in (1000, 2500):
            wait_until(lambda t=threshold: sum(runs.values()) >= t, timeout=60)
            assert kill_all() >= 1
        wait_until(kill_all, timeout=10)  # again, as soon as the app has reconnected
        wait_until(lambda: app.storage.count_jobs().get(("default", "Succeeded")) == total,
                   timeout=120, interval=0.2)
    finally:
        server.stop()
    assert len(runs) == total and set(runs.values()) == {1}
    assert app.storage.count_jobs() == {("default", "Succeeded"): total}
    app.close()
    messages = [r.getMessage() for r in caplog.records]
    assert sum("connection lost" in m for m in messages) >= 2  # each outage is logged
    assert sum("connection restored" in m for m in messages) >= 2


@pytest.mark.slow
def test_worker_keeps_going_across_postgres_restarts(
    own_postgres: object, caplog: pytest.LogCaptureFixture
) -> None:
    # C09 on PostgreSQL: the server restarts three times, twice within 3 s, while a
    # worker drains; every job completes exactly once with no process restart, and each
    # loss and recovery of the connection is logged.
    caplog.set_level(logging.INFO, logger="qmlkit.storage.sql")
    pg = own_postgres
    app = make_app(f"{pg.url}?schema=c09", storage_options={"busy_timeout_s": 120.0})
    runs: Counter[int] = Counter()
    lock = threading.Lock()

    @app.job(name="work")
    def work(i: int) -> None:
        time.sleep(0.002)  # the simulated work
        with lock:
            runs[i] += 1

    total = 3000
    work.enqueue_many([(i,) for i in range(total)])
    server = app.server(**FAST, worker_count=4)
    server.start()
    try:
        wait_until(lambda: sum(runs.values()) >= 300, timeout=60)
        pg.stop()
        time.sleep(5)  # the outage itself is what is under test: down for 5 s
        pg.start()
        wait_until(lambda: sum(runs.values()) >= 1200, timeout=120)
        for _ in range(2):  # two restarts within 3 s of each other
            pg.stop()
            time.sleep(0.5)  # down briefly
            pg.start()
        wait_until(lambda: app.storage.count_jobs().get(("default", "Succeeded")) == total,
                   timeout=180, interval=0.2)
        # Still consuming after the restarts: a new job runs without a process restart.
        late = work.enqueue(total)
        wait_until(lambda: app.storage.get(late).state.name == "Succeeded", timeout=30)
    finally:
        server.stop()
        app.close()
    assert len(runs) == total + 1 and set(runs.values()) == {1}
    messages = [r.getMessage() for r in caplog.records]
    assert sum("connection lost" in m for m in messages) >= 2
    assert sum("connection restored" in m for m in messages) >= 2


def test_unparsable_url_is_refused_without_echoing_the_password() -> None:
    with pytest.raises(ConfigurationError) as info:
        PostgresStorage("postgresql://user:pw-secret@host:notaport/db")
    assert "pw-secret" not in str(info.value) and "postgresql://user" in str(info.value)


def test_a_claim_cut_off_while_still_running_on_the_server_strands_no_job(
    postgres_url: str, proxy: object, engine: sa.Engine, caplog: pytest.LogCaptureFixture
) -> None:
    # The connection drops while the claim statement is still running on the server
    # (made slow by a trigger). The retry must not pass the job by (SKIP LOCKED) while
    # the lost attempt later commits it to Processing for nobody.
    caplog.set_level(logging.DEBUG, logger="qmlkit")  # the claim's retries, on failure
    schema = schema_of(postgres_url)
    url = postgres_url.replace("127.0.0.1:5432", f"127.0.0.1:{proxy.port}")
    store = PostgresStorage(url)
    store.open()
    job = make_job(args=["slow-one"])
    store.enqueue(job)
    with engine.begin() as conn:
        conn.execute(sa.text(
            f'CREATE FUNCTION "{schema}".slow() RETURNS trigger LANGUAGE plpgsql AS $$ '
            "BEGIN PERFORM pg_sleep(1.5); RETURN NEW; END $$"))
        conn.execute(sa.text(
            f'CREATE TRIGGER slow BEFORE UPDATE ON "{schema}".qmlkit_jobs FOR EACH ROW '
            "WHEN (OLD.state = 'Enqueued' AND NEW.state = 'Processing') "
            f'EXECUTE FUNCTION "{schema}".slow()'))
    result: dict[str, object] = {}

    def claimer() -> None:
        began = time.monotonic()
        try:
            result["claimed"] = store.claim(worker_id="w", server_name="srv", queues=[],
                                            limit=1, now=utcnow())
        except BaseException as exc:  # reported by the assertion below
            result["error"] = exc
        result["took_s"] = time.monotonic() - began

    thread = threading.Thread(target=claimer, daemon=True)
    thread.start()

    def claim_running() -> bool:
        with engine.connect() as conn:
            return bool(conn.execute(sa.text(
                "SELECT count(*) FROM pg_stat_activity WHERE query LIKE '%picked%' "
                "AND state = 'active' AND wait_event = 'PgSleep'")).scalar())

    wait_until(claim_running, timeout=10)
    assert proxy.cut() >= 1
    thread.join(90)  # the claim's retries may take up to busy_timeout_s (60 s)
    if "claimed" not in result:  # say what the server was doing, for the next reader
        import sys
        import traceback

        with engine.connect() as conn:
            activity = conn.execute(sa.text(
                "SELECT pid, state, wait_event_type, wait_event, left(query, 200) "
                "FROM pg_stat_activity WHERE datname = current_database()")).all()
        frame = sys._current_frames().get(thread.ident or 0)
        stack = "".join(traceback.format_stack(frame)[-8:]) if frame is not None else "-"
        raise AssertionError(
            "the retried claim did not return: alive=" + str(thread.is_alive())
            + f", result={result!r}\npg_stat_activity:\n"
            + "\n".join(repr(row) for row in activity)
            + f"\nproxied pairs open: {len(proxy._pairs)}"  # type: ignore[attr-defined]
            + "\nclaimer thread at:\n" + stack)
    first = result["claimed"]
    assert isinstance(first, list)
    claimed = first + store.claim(worker_id="w2", server_name="srv", queues=[], limit=1,
                                  now=utcnow())
    assert [j.id for j in claimed] == [job.id]  # handed out, exactly once
    store.close()


def test_connections_notice_a_vanished_server_through_tcp_keepalives(postgres_url: str) -> None:
    # A server that vanishes mid-call (a partition) would hold the caller's thread until
    # the kernel gives up; every pooled connection asks for keepalives and a TCP user
    # timeout, and a value the URL gives wins.
    from qmlkit_postgres.dialect import KEEPALIVE_OPTIONS

    store = PostgresStorage(postgres_url + "&keepalives_idle=42")
    store.open()
    try:
        for engine in (store.executor.engine, store.executor.autocommit_engine):
            assert engine is not None
            with engine.connect() as conn:
                params = conn.connection.dbapi_connection.info.get_parameters()
            expected = {**{k: str(v) for k, v in KEEPALIVE_OPTIONS.items()},
                        "keepalives_idle": "42"}
            assert {k: params.get(k) for k in expected} == expected
    finally:
        store.close()


def test_inspection_commands_never_create_a_schema(postgres_url: str, engine: sa.Engine) -> None:
    from click.testing import CliRunner

    from qmlkit.cli import main

    for args in (["stats"], ["jobs", "list"]):
        result = CliRunner().invoke(main, [*args, "--storage", postgres_url])
        assert result.exit_code == 1 and "qmlkit migrate" in result.output, result.output
    with engine.connect() as conn:
        assert conn.execute(sa.text("SELECT to_regnamespace(:s)"),
                            {"s": schema_of(postgres_url)}).scalar() is None
    assert CliRunner().invoke(main, ["migrate", "--storage", postgres_url]).exit_code == 0
    result = CliRunner().invoke(main, ["stats", "--storage", postgres_url])
    assert result.exit_code == 0, result.output


@pytest.mark.parametrize(("url", "options", "named"), [
    ("postgresql://127.0.0.1/test?migrate=flase", {}, "migrate='flase'"),
    ("postgresql://u:s3cr@tpw@127.0.0.1/test", {}, "percent-encode"),
    ("postgresql://127.0.0.1/test?schema=a%25b", {}, "schema name"),
    ("postgresql://127.0.0.1/test?schema=" + "x" * 64, {}, "63 bytes"),
    ("postgresql://127.0.0.1/test", {"pool_size": 0}, "pool_size=0"),
    ("postgresql://127.0.0.1/test", {"busy_timeout_s": -1}, "busy_timeout_s=-1"),
])
def test_bad_configuration_is_refused_naming_the_part(
    url: str, options: dict, named: str
) -> None:
    with pytest.raises(ConfigurationError) as info:
        PostgresStorage.from_url(url, options)
    assert named in str(info.value) and "tpw" not in str(info.value)


def test_an_unknown_connection_option_fails_at_start_as_configuration() -> None:
    with pytest.raises(ConfigurationError, match="bogusparam"):
        PostgresStorage("postgresql://127.0.0.1/test?bogusparam=1", connect_timeout_s=2).open()


def test_an_acknowledgement_stored_twice_counts_and_records_once(postgres_url: str) -> None:
    # the server retries storing outcomes after a storage error; the second store must
    # be recognised as applied, and add no second history entry or throughput count
    from qmlkit.job import Succeeded
    from qmlkit.storage.base import Transition

    store = PostgresStorage(postgres_url)
    store.open()
    store.enqueue(make_job())
    (job,) = store.claim(worker_id="w", server_name="s", queues=[], limit=1, now=utcnow())
    outcome = Transition(job, Succeeded(succeeded_at=utcnow(), duration_ms=1.0, result=1))
    first, again = store.transition_many([outcome]), store.transition_many([outcome])
    assert first[0].state.name == again[0].state.name == "Succeeded"
    assert [s.name for s in store.job_history(job.id)] == ["Enqueued", "Processing", "Succeeded"]
    buckets = store.throughput(since=utcnow() - timedelta(minutes=2), until=utcnow())
    assert sum(ok for _, ok, _ in buckets) == 1
    store.close()


def test_transactional_enqueue_refuses_a_connection_to_another_database(
    postgres_url: str
) -> None:
    app = make_app(postgres_url)

    @app.job(name="receipt")
    def receipt(order: int) -> None: ...

    other = sa.create_engine("postgresql+psycopg://127.0.0.1:5432/postgres")
    try:
        with pytest.raises(ConfigurationError, match=r"'postgres'.*'test'"):
            with other.begin() as conn, app.transaction(conn):
                receipt.enqueue(1)
    finally:
        other.dispose()
    assert app.storage.count_jobs() == {}
    app.close()
