"""Server and App behaviour on each built-in backend (the seed's server tests, and more)."""

from __future__ import annotations

import asyncio
import re
import threading
import time
from datetime import datetime, timedelta, timezone

import pytest

from qmlkit import (
    App,
    ConfigurationError,
    JobContext,
    Retry,
    RetryPolicy,
    ServerConfig,
    UnknownStorageScheme,
    current_context,
    hookimpl,
)
from qmlkit.job import Job
from qmlkit.testing import make_job, wait_until
from tests.conftest import backend_plugins


#: The pool `fast` builds servers with: every test here runs on each pool in turn.
POOL = {"name": "threads"}


@pytest.fixture(autouse=True, params=["threads", "asyncio"])
def pool(request: pytest.FixtureRequest, monkeypatch: pytest.MonkeyPatch) -> str:
    monkeypatch.setitem(POOL, "name", request.param)
    return request.param


def fast(app: App, **fields: object):
    defaults = {"worker_count": 2, "polling_interval": timedelta(milliseconds=20),
                "shutdown_timeout": timedelta(seconds=10), "log_attempts": False,
                "pool": POOL["name"]}
    return app.server(**{**defaults, **fields})


def state_of(app: App, job_id: str) -> str:
    return app.storage.get(job_id).state.name


def test_server_start_stop(app: App) -> None:
    server = fast(app)
    server.start()
    assert server.is_running
    with pytest.raises(ConfigurationError, match="already running"):
        server.start()
    server.stop()
    assert not server.is_running
    server.stop()  # idempotent


def test_sync_and_async_jobs_run_and_store_results(app: App) -> None:
    @app.job
    def add(a: int, b: int) -> int:
        return a + b

    @app.job
    async def async_add(a: int, b: int) -> dict[str, int]:
        await asyncio.sleep(0)
        return {"sum": a + b}

    assert add(1, 2) == 3  # a direct call runs here
    ids = [add.enqueue(1, 2), async_add.enqueue(3, 4)]
    server = fast(app)
    server.start()
    try:
        wait_until(lambda: all(state_of(app, i) == "Succeeded" for i in ids))
    finally:
        server.stop()
    assert app.storage.get(ids[0]).state.result == 3
    assert app.storage.get(ids[1]).state.result == {"sum": 7}


def test_class_based_worker_gets_job_and_context(app: App) -> None:
    class Greeter:
        method_name = "greet"

        def execute(self, job: Job, context: JobContext) -> str:
            return f"hello {job.args[0]} (attempt {context.attempt})"

    app.register_worker(Greeter())
    job_id = app.enqueue("greet", args=["ada"])
    server = fast(app)
    server.start()
    try:
        wait_until(lambda: state_of(app, job_id) == "Succeeded")
    finally:
        server.stop()
    assert app.storage.get(job_id).state.result == "hello ada (attempt 1)"


def test_progress_reported_by_a_running_job_is_visible_while_it_runs(app: App) -> None:
    halfway = threading.Event()
    release = threading.Event()

    @app.job
    def crunch() -> None:
        current_context().report_progress(0.5, "half way\x00")  # NUL: not storable as is
        halfway.set()
        release.wait(10)
        current_context().report_progress(1.0)

    job_id = crunch.enqueue()
    server = fast(app, worker_count=1)
    server.start()
    try:
        assert halfway.wait(10)
        running = app.storage.get(job_id)
        assert running.state.name == "Processing"
        assert running.metadata["progress"]["fraction"] == 0.5
        assert running.metadata["progress"]["message"] == "half way\ufffd"
        release.set()
        wait_until(lambda: state_of(app, job_id) == "Succeeded")
    finally:
        release.set()
        server.stop()
    assert app.storage.get(job_id).metadata["progress"]["fraction"] == 1.0


@pytest.mark.parametrize("bad", [1.5, -0.1, float("nan"), "half", True])
def test_report_progress_refuses_a_bad_fraction_naming_it(bad: object) -> None:
    ctx = JobContext(make_job(), worker_id="w", server_name="s")
    with pytest.raises(ValueError, match=re.escape(repr(bad))):
        ctx.report_progress(bad)  # type: ignore[arg-type]


def test_report_progress_async_writes_off_the_event_loop() -> None:
    writes: list[tuple[str, int, dict[str, object], bool]] = []

    def sink(job_id: str, *, token: int, progress: dict[str, object]) -> bool:
        on_loop = _running_loop_here()
        writes.append((job_id, token, progress, on_loop))
        return True

    job = make_job()
    ctx = JobContext(job, worker_id="w", server_name="s", progress_sink=sink)

    async def attempt() -> bool:
        return await ctx.report_progress_async(0.25, "a quarter")

    assert asyncio.run(attempt()) is True
    ((job_id, token, progress, on_loop),) = writes
    assert (job_id, token, progress["fraction"], progress["message"]) == (
        job.id, job.attempts, 0.25, "a quarter")
    assert on_loop is False  # the write ran on an executor thread, not the loop's
    with pytest.raises(ValueError, match="1.5"):  # refused before any write
        asyncio.run(ctx.report_progress_async(1.5))
    assert len(writes) == 1


def _running_loop_here() -> bool:
    try:
        asyncio.get_running_loop()
    except RuntimeError:
        return False
    return True


def test_jobs_claimed_behind_a_slow_job_go_to_idle_workers(app: App) -> None:
    # A worker claims a batch sized to its estimate of fast jobs; when the first job of
    # the batch turns out slow, the rest must not wait behind it while a thread idles.
    release = threading.Event()
    done: list[int] = []

    @app.job(name="quick")
    def quick(i: int) -> None:
        done.append(i)

    @app.job(name="slow", priority=10)
    def slow() -> None:
        release.wait(30)

    server = fast(app, worker_count=2, fetch_batch_size=50,
                  prefetch_window=timedelta(milliseconds=100))
    server.start()
    try:
        quick.enqueue_many([(i,) for i in range(200)])  # warm-up: batches grow
        wait_until(lambda: len(done) == 200, timeout=30)
        done.clear()
        jobs = [app.make_job("slow")] + [app.make_job("quick", args=[i]) for i in range(20)]
        app.enqueue_jobs(jobs)
        # all 20 finish while the slow job is still running
        wait_until(lambda: len(done) == 20, timeout=15)
        assert not release.is_set()
        assert state_of(app, jobs[0].id) == "Processing"
    finally:
        release.set()
        server.stop()
    assert sorted(done) == list(range(20))
    assert state_of(app, jobs[0].id) == "Succeeded"


def test_outcomes_finished_before_a_slow_job_are_stored_while_it_runs(app: App) -> None:
    release = threading.Event()
    done: list[int] = []

    @app.job(name="quick", priority=10)
    def quick(i: int) -> None:
        done.append(i)

    @app.job(name="slow")
    def slow() -> None:
        release.wait(30)

    server = fast(app, worker_count=1, fetch_batch_size=50,
                  prefetch_window=timedelta(milliseconds=100))
    server.start()
    try:
        quick.enqueue_many([(i,) for i in range(200)])  # warm-up: batches grow
        wait_until(lambda: len(done) == 200, timeout=30)
        jobs = [app.make_job("quick", args=[i]) for i in range(5)] + [app.make_job("slow")]
        app.enqueue_jobs(jobs)
        # one batch: five quick jobs, then the slow one; the five show as done meanwhile
        wait_until(lambda: all(state_of(app, j.id) == "Succeeded" for j in jobs[:5]),
                   timeout=15)
        assert state_of(app, jobs[5].id) == "Processing" and not release.is_set()
    finally:
        release.set()
        server.stop()


def test_stop_waits_for_inflight_job_to_complete(app: App) -> None:
    started = threading.Event()

    @app.job
    def slow() -> str:
        started.set()
        time.sleep(0.5)  # the simulated work
        return "done"

    job_id = slow.enqueue()
    server = fast(app, worker_count=1)
    server.start()
    assert started.wait(10)
    server.stop()
    assert state_of(app, job_id) == "Succeeded"


def test_context_stopping_fires_on_stop_and_job_may_finish(app: App) -> None:
    started = threading.Event()

    @app.job
    def cooperative() -> str:
        ctx = current_context()
        started.set()
        return "saw stop" if ctx.stopping.wait(10) else "no stop"

    job_id = cooperative.enqueue()
    server = fast(app, worker_count=1)
    server.start()
    assert started.wait(10)
    server.stop()
    assert app.storage.get(job_id).state.result == "saw stop"


def test_grace_period_expiry_releases_the_job_without_using_a_retry(app: App) -> None:
    started = threading.Event()
    release = threading.Event()

    @app.job
    def stuck() -> None:
        started.set()
        release.wait(30)

    job_id = stuck.enqueue()
    server = fast(app, worker_count=1)
    server.start()
    assert started.wait(10)
    server.stop(timeout=0.2)
    job = app.storage.get(job_id)
    assert job.state.name == "Enqueued" and job.retry_count == 0
    assert "released" in job.state.reason
    release.set()


def test_restart_after_stop_processes_new_jobs(app: App) -> None:
    @app.job
    def ping() -> str:
        return "pong"

    server = fast(app)
    server.start()
    server.stop()
    job_id = ping.enqueue()
    server.start()
    try:
        wait_until(lambda: state_of(app, job_id) == "Succeeded")
    finally:
        server.stop()


def test_sync_job_timeout_sets_cancelled_and_fails_the_attempt(app: App) -> None:
    @app.job(timeout=0.2, max_retries=0)
    def sleepy() -> str:
        current_context().cancelled.wait(10)
        return "finished late"

    job_id = sleepy.enqueue()
    server = fast(app)
    server.start()
    try:
        wait_until(lambda: state_of(app, job_id) == "Failed")
    finally:
        server.stop()
    state = app.storage.get(job_id).state
    assert state.exception_type == "qmlkit.errors.JobTimeout"
    assert "timeout of 0.2 s" in state.message


def test_async_job_timeout_cancels_and_follows_retry_policy(app: App) -> None:
    @app.job(timeout=0.1, retry=RetryPolicy(max_retries=1, base_delay=timedelta(0), jitter=0))
    async def forever() -> None:
        await asyncio.sleep(30)

    job_id = forever.enqueue()
    server = fast(app)
    server.start()
    try:
        wait_until(lambda: state_of(app, job_id) == "Failed")
    finally:
        server.stop()
    job = app.storage.get(job_id)
    assert job.attempts == 2 and job.state.retry_count == 1
    assert job.state.exception_type == "qmlkit.errors.JobTimeout"


def test_failed_attempts_retry_with_backoff_then_succeed(app: App) -> None:
    calls: list[int] = []

    @app.job(retry=RetryPolicy(max_retries=3, base_delay=timedelta(milliseconds=50), jitter=0))
    def flaky() -> int:
        calls.append(current_context().attempt)
        if len(calls) < 3:
            raise ValueError(f"boom {len(calls)}")
        return len(calls)

    job_id = flaky.enqueue()
    server = fast(app, scheduler_poll_interval=timedelta(milliseconds=20))
    server.start()
    try:
        wait_until(lambda: state_of(app, job_id) == "Succeeded")
    finally:
        server.stop()
    job = app.storage.get(job_id)
    assert calls == [1, 2, 3] and job.retry_count == 2 and job.state.result == 3


def test_retry_signal_uses_its_delay(app: App) -> None:
    @app.job(max_retries=2)
    def later() -> None:
        raise Retry(delay=3600, message="not yet")

    job_id = later.enqueue()
    server = fast(app)
    server.start()
    try:
        wait_until(lambda: state_of(app, job_id) == "AwaitingRetry")
    finally:
        server.stop()
    state = app.storage.get(job_id).state
    wait = (state.retry_at - datetime.now(timezone.utc)).total_seconds()
    assert 3500 < wait <= 3600 and "not yet" in state.last_exception


def test_exhausted_retries_fail_with_the_traceback_kept(app: App) -> None:
    @app.job(max_retries=0)
    def broken() -> None:
        raise KeyError("missing ünïcødé")

    job_id = broken.enqueue()
    server = fast(app)
    server.start()
    try:
        wait_until(lambda: state_of(app, job_id) == "Failed")
    finally:
        server.stop()
    job = app.storage.get(job_id)
    assert job.state.exception_type == "KeyError"
    assert "missing ünïcødé" in job.state.message
    assert "in broken" in job.state.stack_trace
    assert job.expires_at is not None and job.expires_at > job.state.failed_at


def test_scheduled_job_waits_for_its_time(app: App) -> None:
    ran: list[datetime] = []

    @app.job
    def tick() -> None:
        ran.append(datetime.now(timezone.utc))

    at = datetime.now(timezone.utc) + timedelta(seconds=0.5)
    job_id = tick.schedule(at=at)
    assert state_of(app, job_id) == "Scheduled"
    server = fast(app)
    server.start()
    try:
        wait_until(lambda: state_of(app, job_id) == "Succeeded")
    finally:
        server.stop()
    assert ran[0] >= at


def test_schedule_arguments_are_checked(app: App) -> None:
    @app.job
    def f() -> None: ...

    with pytest.raises(ConfigurationError, match="exactly one"):
        f.schedule()
    with pytest.raises(ConfigurationError, match="aware datetime"):
        f.schedule(at=datetime(2030, 1, 1))
    with pytest.raises(ConfigurationError, match="negative"):
        f.schedule(delay=-1)
    assert app.storage.count_jobs() == {}


def test_middleware_wraps_in_order_and_can_short_circuit(app: App) -> None:
    seen: list[str] = []

    def outer(job, context, call_next):
        seen.append("outer-before")
        result = call_next()
        seen.append("outer-after")
        return result

    def inner(job, context, call_next):
        seen.append("inner")
        return "short-circuited" if job.args == ["skip"] else call_next()

    @app.job
    def echo(x: str) -> str:
        seen.append("job")
        return x

    from qmlkit.processing.server import Server

    server = Server.from_plugins(app=app, storage=app.storage, autoload=False,
                                 middleware=[outer, inner],
                                 config={"worker_count": 1, "log_attempts": False,
                                         "pool": POOL["name"],
                                         "polling_interval": timedelta(milliseconds=20)})
    a, b = echo.enqueue("run"), echo.enqueue("skip")
    server.start()
    try:
        wait_until(lambda: state_of(app, a) == state_of(app, b) == "Succeeded")
    finally:
        server.stop()
    assert seen == ["outer-before", "inner", "job", "outer-after",
                    "outer-before", "inner", "outer-after"]
    assert app.storage.get(b).state.result == "short-circuited"


def test_observers_see_every_committed_transition(backend_url: str) -> None:
    seen: list[tuple[str, str | None, str]] = []
    lock = threading.Lock()

    class Observer:
        @hookimpl
        def qmlkit_job_state_changed(self, job, previous, current):
            with lock:
                seen.append((job.id, previous.name if previous else None, current.name))
            raise RuntimeError("observers are isolated")

    app = App("obs", storage=backend_url, autoload=False,
              plugins=[Observer(), *backend_plugins(backend_url)])

    @app.job(max_retries=0)
    def ok() -> None: ...

    job_id = ok.enqueue()
    server = fast(app)
    server.start()
    try:
        wait_until(lambda: state_of(app, job_id) == "Succeeded")
    finally:
        server.stop()
    mine = [(p, c) for i, p, c in seen if i == job_id]
    assert mine == [(None, "Enqueued"), ("Enqueued", "Processing"), ("Processing", "Succeeded")]
    app.delete(job_id)
    assert seen[-1] == (job_id, "Succeeded", "Deleted")
    app.close()


def test_unknown_scheme_lists_known_schemes() -> None:
    app = App("x", storage="mongodb://localhost/x", autoload=False)
    with pytest.raises(UnknownStorageScheme) as info:
        _ = app.storage
    assert info.value.scheme == "mongodb"
    assert {"memory", "sqlite"} <= set(info.value.known)
    # No package name is guessed for a scheme no plugin of qmlkit's serves
    assert "qmlkit-mongodb" not in str(info.value)
    assert "`qmlkit.storage` entry point" in str(info.value)


@pytest.mark.parametrize(("url", "folder"), [
    ("postgresql+psycopg://localhost/x", "qmlkit-postgres"),
    ("rediss://localhost:6380/0", "qmlkit-redis"),
])
def test_unknown_scheme_of_a_bundled_plugin_says_where_it_ships(url: str, folder: str) -> None:
    app = App("x", storage=url, autoload=False)
    with pytest.raises(UnknownStorageScheme, match=f"pip install -e plugins/{folder}`"):
        _ = app.storage


@pytest.mark.parametrize("url", ["sqlite:/x.db", "sqlite:x.db"])
def test_a_scheme_without_its_slashes_is_named_not_called_missing(url: str) -> None:
    app = App("x", storage=url, autoload=False)
    with pytest.raises(ConfigurationError, match="lacks '//' after its scheme 'sqlite'"):
        _ = app.storage


def test_missing_sqlite_directory_names_the_path(tmp_path) -> None:
    missing = tmp_path / "nope" / "deeper"
    app = App("x", storage=f"sqlite:///{missing}/q.db", autoload=False)
    with pytest.raises(ConfigurationError, match=str(missing)):
        _ = app.storage


def test_server_config_names_the_bad_field() -> None:
    with pytest.raises(ValueError, match="worker_count"):
        ServerConfig(worker_count=0)
    with pytest.raises(ValueError, match=r"extra|bogus"):
        ServerConfig(bogus=1)
    with pytest.raises(ConfigurationError, match="nosuchtransport"):
        App("x", storage="memory://", autoload=False, wakeup_url="nosuchtransport://x")
    assert "***" in repr(ServerConfig(storage_url="sqlite:///x.db").model_copy(
        update={"storage_url": "postgresql://u:secret@h/db"}))


def test_duplicate_job_name_is_refused(app: App) -> None:
    @app.job(name="same")
    def one() -> None: ...

    with pytest.raises(ConfigurationError, match="registered already"):
        @app.job(name="same")
        def two() -> None: ...


def test_enqueue_many_accepts_args_and_args_kwargs_pairs(app: App) -> None:
    @app.job
    def f(a: int, b: int = 0) -> int:
        return a + b

    ids = f.enqueue_many([(1,), [2], ((3,), {"b": 4})])
    jobs = [app.storage.get(i) for i in ids]
    assert [(j.args, j.kwargs) for j in jobs] == [([1], {}), ([2], {}), ([3], {"b": 4})]
    assert len(set(ids)) == 3
