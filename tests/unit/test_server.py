"""Server and App behaviour on each built-in backend (the seed's server tests, and more).

What a running server does with jobs (results, progress, retries, timeouts, scheduling,
stop, release, restart, the C18 batches) is the processing contract,
tests/contract/test_processing.py, which runs it on every pool, the process pool too.
Here: start and stop, argument checks, middleware given to ``Server.from_plugins``,
observers (a deletion included), configuration errors.
"""

from __future__ import annotations

import asyncio
import logging
import re
import threading
from datetime import datetime, timedelta

import pytest

from qmlkit import (
    App,
    ConfigurationError,
    JobContext,
    RetryPolicy,
    ServerConfig,
    UnknownStorageScheme,
    current_context,
    hookimpl,
)
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


def test_each_attempt_is_logged_once_with_its_outcome(
        app: App, caplog: pytest.LogCaptureFixture) -> None:
    from qmlkit.processing.middleware import LoggingMiddleware
    from qmlkit.processing.server import Server

    calls: list[str] = []

    class Counting(LoggingMiddleware):  # a subclass runs as a layer of its own
        def __call__(self, job, context, call_next):
            calls.append(job.method)
            return super().__call__(job, context, call_next)

    def inner(job, context, call_next):
        calls.append("inner")
        return call_next()

    @app.job(name="ok")
    def ok() -> int:
        return 1

    @app.job(name="boom", retry=RetryPolicy(max_retries=0))
    def boom() -> None:
        raise ValueError("no")

    @app.job(name="unstorable", retry=RetryPolicy(max_retries=0))
    async def unstorable() -> object:
        return object()

    server = Server.from_plugins(app=app, storage=app.storage, autoload=False,
                                 middleware=[Counting(), inner],
                                 config={"worker_count": 1, "pool": POOL["name"],
                                         "polling_interval": timedelta(milliseconds=20)})
    ids = {ok.enqueue(): "ok", boom.enqueue(): "ValueError",
           unstorable.enqueue(): "PayloadError"}
    with caplog.at_level(logging.INFO, logger="qmlkit.attempt"):
        server.start()
        try:
            wait_until(lambda: all(state_of(app, i) in {"Succeeded", "Failed"} for i in ids))
        finally:
            server.stop()
    lines = [(r.job_id, r.outcome, r.levelname) for r in caplog.records
             if r.name == "qmlkit.attempt"]
    # The built-in middleware's line and the subclass's line, for each attempt.
    expected = [(i, out, "INFO" if out == "ok" else "WARNING") for i, out in ids.items()]
    assert sorted(lines) == sorted(expected * 2)
    assert calls == ["ok", "inner", "boom", "inner", "unstorable", "inner"]


def test_an_attempt_past_its_timeout_is_logged_with_what_happens_to_it(
        app: App, caplog: pytest.LogCaptureFixture) -> None:
    from qmlkit import current_context

    @app.job(name="slow_def", timeout=0.3, retry=RetryPolicy(max_retries=0))
    def slow_def() -> None:
        current_context().cancelled.wait(30)  # returns once told

    @app.job(name="slow_async", timeout=0.3, retry=RetryPolicy(max_retries=0))
    async def slow_async() -> None:
        await asyncio.Event().wait()  # never returns on its own: only its timeout ends it

    ids = [slow_def.enqueue(), slow_async.enqueue()]
    server = fast(app)
    with caplog.at_level(logging.WARNING, logger="qmlkit.processing.server"):
        server.start()
        try:
            wait_until(lambda: all(state_of(app, i) == "Failed" for i in ids), timeout=30)
        finally:
            server.stop()
    lines = [r.getMessage() for r in caplog.records if "past its timeout" in r.getMessage()]
    told = [m for m in lines if f"job {ids[0]} (slow_def)" in m]
    assert told and "context.cancelled" in told[0] and "0.3 s" in told[0], lines
    if POOL["name"] == "asyncio":  # the watchdog cancels the async job's task
        assert any(f"job {ids[1]} (slow_async)" in m and "cancelling it" in m for m in lines)


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


class _BrokenHandler(logging.Handler):
    """A log handler whose every emit raises (as logging's own error handler does once a
    job has closed sys.stderr)."""

    def emit(self, record: logging.LogRecord) -> None:
        raise ValueError("I/O operation on closed file.")


def test_a_log_handler_that_raises_fails_no_attempt(app: App) -> None:
    # The attempt's log line is written after the job returned; an error there must not
    # become the job's outcome (nor the worker's end).
    @app.job(name="fine")
    def fine(i: int) -> int:
        return i

    @app.job(name="stops", max_retries=0)
    def stops() -> None:
        raise StopIteration("own")

    attempt_log = logging.getLogger("qmlkit.attempt")
    broken = _BrokenHandler()
    attempt_log.addHandler(broken)
    level = attempt_log.level
    attempt_log.setLevel(logging.INFO)
    try:
        ids = [fine.enqueue(i) for i in range(3)]
        stopper = stops.enqueue()
        server = fast(app, log_attempts=True)
        server.start()
        try:
            wait_until(lambda: {state_of(app, i) for i in [*ids, stopper]}
                       <= {"Succeeded", "Failed"}, timeout=20)
        finally:
            server.stop()
    finally:
        attempt_log.removeHandler(broken)
        attempt_log.setLevel(level)
    assert [app.storage.get(i).state.result for i in ids] == [0, 1, 2]
    assert app.storage.get(stopper).state.exception_type == "StopIteration"


def test_stop_fails_an_attempt_past_its_timeout_and_releases_the_others(app: App) -> None:
    # A def job cannot be interrupted: released at stop, one past its timeout would come
    # back at every stop and never use its retries (a new user's finding). Past its
    # timeout it ends JobTimeout by its policy; a job within its time is released.
    go = threading.Event()
    contexts: list[JobContext] = []

    @app.job(name="overruns", timeout=0.2, max_retries=0)
    def overruns() -> str:
        contexts.append(current_context())
        go.wait(60)
        return "late"

    @app.job(name="patient")
    def patient() -> str:
        go.wait(60)
        return "late"

    late, within = overruns.enqueue(), patient.enqueue()
    server = fast(app, shutdown_timeout=timedelta(seconds=1))
    server.start()
    try:
        wait_until(lambda: {state_of(app, late), state_of(app, within)} == {"Processing"},
                   timeout=20)
        wait_until(lambda: contexts and contexts[0].timed_out, timeout=20)
    finally:
        server.stop()
        go.set()
    assert server.aborted
    failed = app.storage.get(late).state
    assert failed.name == "Failed" and failed.exception_type == "qmlkit.errors.JobTimeout"
    assert state_of(app, within) == "Enqueued"  # released: its attempt had time left
    assert app.storage.get(within).attempts == 1


def test_an_abort_that_finds_nothing_to_release_is_not_reported_as_one(app: App) -> None:
    # `qmlkit worker` exits 1 only when jobs had to be released: a second Ctrl-C to an
    # idle worker releases nothing, so its stop is a clean one (exit 0).
    server = fast(app)
    server.start()
    server.abort()
    server.stop()
    assert not server.aborted
