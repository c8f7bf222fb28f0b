"""The asyncio pool (issue #14, item 1) on every backend: many async attempts on one loop,
def jobs beside it, timeouts, middleware, stop, busy slots and wake-ups.

The pool-agnostic server tests (tests/unit/test_server.py) run on this pool too; these
are the behaviours particular to it. Deadlines are generous bounds derived from the
structure (e.g. 200 jobs of 0.2 s run one at a time take 40 s), never speed figures.
"""

from __future__ import annotations

import asyncio
import functools
import logging
import threading
import time
from datetime import timedelta

import pytest

from qmlkit import App, ConfigurationError, RetryPolicy, Server, current_context
from qmlkit.errors import JobTimeout
from qmlkit.processing.middleware import LoggingMiddleware
from qmlkit.testing import wait_until


def asyncio_server(app: App, **fields: object) -> Server:
    defaults = {"pool": "asyncio", "worker_count": 20, "log_attempts": False,
                "polling_interval": timedelta(milliseconds=50),
                "shutdown_timeout": timedelta(seconds=10)}
    return app.server(**{**defaults, **fields})


def states(app: App, ids: list[str]) -> set[str]:
    return {app.storage.get(i).state.name for i in ids}


async def swallow_cancellations(until: threading.Event | None = None) -> None:
    """A coroutine that takes every CancelledError, until ``until`` is set (or forever)."""
    while until is None or not until.is_set():
        try:
            await asyncio.sleep(0.05)
        except asyncio.CancelledError:
            pass


class Peak:
    """How many attempts ran at once, at most."""

    def __init__(self) -> None:
        self.now = self.most = 0
        self.lock = threading.Lock()

    def enter(self) -> None:
        with self.lock:
            self.now += 1
            self.most = max(self.most, self.now)

    def leave(self) -> None:
        with self.lock:
            self.now -= 1


def test_200_async_jobs_run_at_once_on_one_loop(app: App) -> None:
    peak = Peak()
    threads_seen: set[str] = set()

    @app.job(name="nap")
    async def nap(i: int) -> int:
        peak.enter()
        threads_seen.add(threading.current_thread().name)
        try:
            await asyncio.sleep(0.2)
        finally:
            peak.leave()
        return i

    ids = [nap.enqueue(i) for i in range(200)]
    server = asyncio_server(app, worker_count=200)
    threads_before = threading.active_count()
    started = time.monotonic()
    server.start()
    try:
        wait_until(lambda: states(app, ids) == {"Succeeded"}, timeout=60)
        elapsed = time.monotonic() - started
        threads_during = threading.active_count()
    finally:
        server.stop()
    # One at a time would take 200 x 0.2 s = 40 s; on one loop it is a few rounds.
    assert elapsed < 20, elapsed
    assert peak.most >= 50  # at least one whole claim (fetch_batch_size) at once
    assert threads_seen == {"qmlkit-asyncio-loop"}  # every attempt on the one loop
    # 200 in flight did not take 200 threads (nor 200 storage connections): the pool
    # adds a loop, a claimer, a storer and the def executor's threads (none used here).
    assert threads_during - threads_before < 40
    assert [app.storage.get(i).state.result for i in ids] == list(range(200))


def test_mixed_def_and_async_jobs_each_run_where_they_belong(app: App) -> None:
    where: dict[str, set[str]] = {"def": set(), "async": set()}

    @app.job(name="blocking")
    def blocking(i: int) -> str:
        where["def"].add(threading.current_thread().name)
        time.sleep(0.05)  # a blocking call: it must not stall the loop
        return current_context().job.id

    @app.job(name="awaiting")
    async def awaiting(i: int) -> str:
        where["async"].add(threading.current_thread().name)
        await asyncio.sleep(0.05)
        return current_context().job.id

    ids = [blocking.enqueue(i) for i in range(10)] + [awaiting.enqueue(i) for i in range(10)]
    server = asyncio_server(app)
    server.start()
    try:
        wait_until(lambda: states(app, ids) == {"Succeeded"}, timeout=30)
    finally:
        server.stop()
    assert where["async"] == {"qmlkit-asyncio-loop"}
    assert where["def"] and all(name.startswith("qmlkit-sync") for name in where["def"])
    assert len(where["def"]) <= min(32, 20)  # the executor is bounded
    # current_context() is the attempt's own, on the loop and on executor threads alike
    assert [app.storage.get(i).state.result for i in ids] == ids


def test_async_job_past_its_timeout_is_cancelled_then_retried(app: App) -> None:
    cancelled: list[int] = []

    @app.job(name="stuck", timeout=0.2,
             retry=RetryPolicy(max_retries=1, base_delay=timedelta(0), jitter=0))
    async def stuck() -> None:
        try:
            await asyncio.sleep(30)
        except asyncio.CancelledError:
            cancelled.append(current_context().attempt)
            raise

    job_id = stuck.enqueue()
    server = asyncio_server(app)
    server.start()
    try:
        wait_until(lambda: app.storage.get(job_id).state.name == "Failed", timeout=30)
    finally:
        server.stop()
    job = app.storage.get(job_id)
    assert job.attempts == 2 and job.state.retry_count == 1  # the policy's one retry
    assert job.state.exception_type == "qmlkit.errors.JobTimeout"
    assert cancelled == [1, 2]  # the task itself was cancelled, each attempt


def test_a_timeout_reaches_middleware_as_job_timeout_and_each_attempt_is_logged(
        app: App, caplog: pytest.LogCaptureFixture) -> None:
    seen: list[tuple[str, int]] = []

    async def watch(job, context, call_next):
        try:
            return await call_next()
        except JobTimeout:  # the watchdog cancelled the task; the chain sees JobTimeout
            task = asyncio.current_task()
            assert task is not None
            seen.append(("timeout", task.cancelling()))  # the cancel was taken back
            # and the task can still await: one yield to the loop, the await itself is
            # what is checked (not a wait for time to pass)
            await asyncio.sleep(0)
            raise

    @app.job(name="slow", timeout=0.2, retry=RetryPolicy(max_retries=0))
    async def slow() -> None:
        await asyncio.Event().wait()  # never returns on its own

    @app.job(name="quick")
    async def quick() -> int:
        return 1

    server = Server.from_plugins(app=app, storage=app.storage, autoload=False,
                                 middleware=[watch],
                                 config={"pool": "asyncio", "worker_count": 4,
                                         "polling_interval": timedelta(milliseconds=20)})
    slow_id, quick_id = slow.enqueue(), quick.enqueue()
    with caplog.at_level(logging.INFO, logger="qmlkit.attempt"):
        server.start()
        try:
            wait_until(lambda: states(app, [slow_id, quick_id]) == {"Failed", "Succeeded"}
                       and app.storage.get(quick_id).state.name == "Succeeded", timeout=30)
        finally:
            server.stop()
    assert app.storage.get(slow_id).state.exception_type == "qmlkit.errors.JobTimeout"
    assert seen == [("timeout", 0)]
    lines = {(r.job_id, r.outcome) for r in caplog.records if r.name == "qmlkit.attempt"}
    assert lines == {(slow_id, "JobTimeout"), (quick_id, "ok")}  # one line per attempt


def test_a_timeout_passed_in_middleware_after_the_job_is_logged_as_job_timeout(
        app: App, caplog: pytest.LogCaptureFixture) -> None:
    # The timeout covers the job, as a timer around it did: a middleware awaiting after
    # ``call_next`` (the job has returned) is not cancelled, but the attempt has run past
    # its timeout, so it is stored as JobTimeout, and its log lines (the inline built-in
    # one and a subclass's in the chain) say so too.
    finished: list[tuple[str, bool]] = []

    class Subclassed(LoggingMiddleware):
        pass

    async def slow_after(job, context, call_next):
        result = await call_next()
        # Past the 0.2 s timeout: until the watchdog has marked the attempt (30 s at most)
        told = await asyncio.to_thread(context.cancelled.wait, 30)
        finished.append((job.id, told))
        return result

    @app.job(name="quick_then_slow_middleware", timeout=0.2, retry=RetryPolicy(max_retries=0))
    async def quick() -> int:
        return 1

    server = Server.from_plugins(app=app, storage=app.storage, autoload=False,
                                 middleware=[Subclassed(), slow_after],
                                 config={"pool": "asyncio", "worker_count": 4,
                                         "polling_interval": timedelta(milliseconds=20)})
    job_id = quick.enqueue()
    with caplog.at_level(logging.INFO, logger="qmlkit.attempt"):
        server.start()
        try:
            wait_until(lambda: states(app, [job_id]) == {"Failed"}, timeout=30)
        finally:
            server.stop()
    assert app.storage.get(job_id).state.exception_type == "qmlkit.errors.JobTimeout"
    assert finished == [(job_id, True)]  # its code after the job was not cut off
    lines = [r.outcome for r in caplog.records if r.name == "qmlkit.attempt"]
    assert lines == ["JobTimeout", "JobTimeout"]  # the subclass's, the built-in's


def test_a_job_that_swallows_its_cancellation_gives_its_slot_back_and_runs_once(
        app: App, caplog: pytest.LogCaptureFixture) -> None:
    # One slot. The stubborn job ignores its timeout's cancellation; after the grace its
    # slot is given back (the quick jobs run), but its job stays claimed until it ends,
    # so it is never run twice at once, then it fails with JobTimeout.
    release = threading.Event()
    runs: list[int] = []
    cancels: list[int] = []

    @app.job(name="stubborn", timeout=0.2, retry=RetryPolicy(max_retries=0))
    async def stubborn() -> str:
        runs.append(current_context().attempt)
        while not release.is_set():
            try:
                await asyncio.sleep(0.05)
            except asyncio.CancelledError:
                cancels.append(1)  # swallowed
        return "finished anyway"

    @app.job(name="quick")
    async def quick(i: int) -> int:
        return i

    stubborn_id = stubborn.enqueue()
    server = asyncio_server(app, worker_count=1)
    with caplog.at_level(logging.WARNING, logger="qmlkit.processing.server"):
        server.start()
        try:
            wait_until(lambda: runs == [1], timeout=30)
            quick_ids = [quick.enqueue(i) for i in range(5)]
            wait_until(lambda: states(app, quick_ids) == {"Succeeded"}, timeout=30)
            assert app.storage.get(stubborn_id).state.name == "Processing"  # still ours
            assert server.pool.detached() == 1 and server.pool.busy() == 0
            release.set()
            wait_until(lambda: app.storage.get(stubborn_id).state.name == "Failed", timeout=30)
            wait_until(lambda: server.pool.detached() == 0, timeout=10)
        finally:
            server.stop()
    state = app.storage.get(stubborn_id).state
    assert state.exception_type == "qmlkit.errors.JobTimeout"
    assert runs == [1] and len(cancels) == 2  # the timeout's cancel, and the detach's
    messages = [r.getMessage() for r in caplog.records]
    assert any(stubborn_id in m and "slot is given back" in m for m in messages), messages
    assert any(stubborn_id in m and "detached job" in m for m in messages), messages


def test_stop_does_not_wait_forever_for_a_job_that_swallows_every_cancellation(
        app: App) -> None:
    # The stubborn job never ends; stop still returns, stores the other job's outcome
    # and ends the stubborn one with JobTimeout (past its timeout: not released, or it
    # would come back at every stop), not left Processing.
    forever = app.job(name="forever", timeout=0.2, retry=RetryPolicy(max_retries=0))(
        swallow_cancellations)

    @app.job(name="quick")
    async def quick() -> int:
        return 7

    forever_id = forever.enqueue()
    server = asyncio_server(app, worker_count=2, shutdown_timeout=timedelta(seconds=1))
    server.start()
    try:
        wait_until(lambda: server.pool.detached() == 1, timeout=30)
        quick_id = quick.enqueue()
        wait_until(lambda: app.storage.get(quick_id).state.name == "Succeeded", timeout=30)
    finally:
        began = time.monotonic()
        server.stop()
    assert time.monotonic() - began < 30  # bounded: shutdown_timeout and LEFTOVER_S
    assert app.storage.get(quick_id).state.result == 7
    state = app.storage.get(forever_id).state
    assert state.name == "Failed" and state.exception_type == "qmlkit.errors.JobTimeout"


def test_stop_fails_a_detached_job_that_outlives_the_shutdown_timeout(app: App) -> None:
    # A detached attempt keeps the loop running through stop's grace period; once that
    # is spent the server aborts and fails its job with JobTimeout (it is past its
    # timeout; it was not left Processing).
    forever = app.job(name="forever", timeout=0.2, retry=RetryPolicy(max_retries=0))(
        swallow_cancellations)

    forever_id = forever.enqueue()
    server = asyncio_server(app, worker_count=2, shutdown_timeout=timedelta(seconds=3))
    server.start()
    try:
        wait_until(lambda: server.pool.detached() == 1, timeout=30)
    finally:
        server.stop()
    assert server.aborted
    state = app.storage.get(forever_id).state
    assert state.name == "Failed" and state.exception_type == "qmlkit.errors.JobTimeout"
    wait_until(lambda: not server.pool.alive(), timeout=30)  # its loop closed without it


def test_a_detached_job_ending_during_stop_stores_its_timeout(
        app: App, caplog: pytest.LogCaptureFixture) -> None:
    # Stop waits for a detached attempt as for any other; when it ends within the grace
    # period its JobTimeout is stored and the loop ends cleanly (no "Event loop stopped
    # before Future completed").
    release = threading.Event()

    stubborn = app.job(name="stubborn", timeout=0.2, retry=RetryPolicy(max_retries=0))(
        functools.partial(swallow_cancellations, release))

    stubborn_id = stubborn.enqueue()
    server = asyncio_server(app, worker_count=1, shutdown_timeout=timedelta(seconds=20))
    with caplog.at_level(logging.WARNING):
        server.start()
        wait_until(lambda: server.pool.detached() == 1, timeout=30)
        stopper = threading.Thread(target=server.stop)
        stopper.start()
        wait_until(lambda: server.stopping.is_set(), timeout=10)
        release.set()
        stopper.join(60)
    assert not stopper.is_alive() and not server.aborted
    state = app.storage.get(stubborn_id).state
    assert state.name == "Failed" and state.exception_type == "qmlkit.errors.JobTimeout"
    assert not server.pool.alive()
    problems = [r.getMessage() for r in caplog.records if r.exc_info or "RuntimeError" in
                r.getMessage()]
    assert problems == []


def test_a_def_job_that_ignores_its_timeout_keeps_its_slot_and_runs_once(app: App) -> None:
    # A def job holds an executor thread until it returns, so giving its slot back would
    # only queue more def jobs behind it. It keeps its slot: nothing else starts on a
    # one-slot pool until it returns, it is run once and fails with JobTimeout, and the
    # jobs queued behind it get their whole timeout once they have a thread.
    order: list[str] = []

    @app.job(name="deaf", timeout=0.2, retry=RetryPolicy(max_retries=0))
    def deaf() -> None:
        order.append("deaf")
        context = current_context()
        while not context.timed_out:  # the watchdog marks it; this job never stops for it
            time.sleep(0.01)
        seen = time.monotonic()
        while time.monotonic() - seen < 2.5:  # well past the 1 s detach grace
            time.sleep(0.01)
        order.append("deaf ended")

    @app.job(name="quick", timeout=0.5, retry=RetryPolicy(max_retries=0))
    def quick(i: int) -> int:
        order.append(f"quick {i}")
        return i

    deaf_id = deaf.enqueue()
    server = asyncio_server(app, worker_count=1)
    server.start()
    try:
        wait_until(lambda: order == ["deaf"], timeout=30)
        quick_ids = [quick.enqueue(i) for i in range(3)]
        wait_until(lambda: app.storage.get(deaf_id).state.name == "Failed", timeout=30)
        wait_until(lambda: states(app, quick_ids) == {"Succeeded"}, timeout=30)
        assert server.pool.detached() == 0
    finally:
        server.stop()
    assert order[:2] == ["deaf", "deaf ended"]  # nothing started beside it
    assert sorted(order[2:]) == ["quick 0", "quick 1", "quick 2"]
    assert app.storage.get(deaf_id).state.exception_type == "qmlkit.errors.JobTimeout"


def test_sync_and_async_middleware_wrap_an_async_job(app: App) -> None:
    seen: list[str] = []

    def sync_outer(job, context, call_next):
        seen.append(f"sync-before:{current_context().job.id == job.id}")
        try:
            return call_next()
        finally:
            seen.append(f"sync-after:{threading.current_thread().name}")

    async def async_inner(job, context, call_next):
        seen.append("async-before")
        if job.args == ["skip"]:
            return "short-circuited"
        try:
            return await call_next()
        except ValueError as exc:
            return f"translated {exc}"

    @app.job(name="work")
    async def work(mode: str) -> str:
        await asyncio.sleep(0.01)
        seen.append("job")
        if mode == "fail":
            raise ValueError("boom")
        return mode

    server = Server.from_plugins(app=app, storage=app.storage, autoload=False,
                                 middleware=[sync_outer, async_inner],
                                 config={"pool": "asyncio", "worker_count": 1,
                                         "log_attempts": False,
                                         "polling_interval": timedelta(milliseconds=20)})
    ids = [work.enqueue(mode) for mode in ("run", "skip", "fail")]
    server.start()
    try:
        for job_id in ids:  # one slot: in order
            wait_until(lambda job_id=job_id: app.storage.get(job_id).state.name == "Succeeded",
                       timeout=20)
    finally:
        server.stop()
    after = "sync-after:qmlkit-asyncio-loop"  # sync middleware ran on the loop's thread
    assert seen == ["sync-before:True", "async-before", "job", after,
                    "sync-before:True", "async-before", after,
                    "sync-before:True", "async-before", "job", after]
    assert [app.storage.get(i).state.result for i in ids] == [
        "run", "short-circuited", "translated boom"]


def test_stop_lets_quick_attempts_finish_and_releases_the_rest(app: App) -> None:
    started: list[str] = []

    @app.job(name="quick")
    async def quick() -> str:
        started.append("quick")
        await asyncio.sleep(0.3)
        return "done"

    @app.job(name="stubborn")
    async def stubborn() -> str:
        started.append("stubborn")
        await asyncio.sleep(60)  # ignores context.stopping
        return "never"

    quick_ids = [quick.enqueue() for _ in range(5)]
    stubborn_ids = [stubborn.enqueue() for _ in range(5)]
    server = asyncio_server(app)
    server.start()
    wait_until(lambda: len(started) == 10, timeout=20)  # every one has started
    server.stop(timeout=3.0)  # 0.3 s jobs finish within it; 60 s ones do not
    assert server.aborted
    assert states(app, quick_ids) == {"Succeeded"}
    for job_id in stubborn_ids:
        job = app.storage.get(job_id)
        assert job.state.name == "Enqueued" and job.retry_count == 0  # no retry used
    assert server.claims.is_empty() and not server.pool.alive()


def test_stop_releases_claims_it_never_started(app: App) -> None:
    release = threading.Event()
    started: list[str] = []

    @app.job(name="gate")
    async def gate() -> None:
        started.append(current_context().job.id)
        while not release.is_set():
            await asyncio.sleep(0.01)

    ids = [gate.enqueue() for _ in range(6)]
    server = asyncio_server(app, worker_count=2, shutdown_timeout=timedelta(seconds=20))
    server.start()
    wait_until(lambda: len(started) == 2 and server.busy_slots == 2, timeout=20)
    stopper = threading.Thread(target=server.stop)
    stopper.start()
    wait_until(lambda: server.stopping.is_set(), timeout=10)
    release.set()  # the two running ones finish within the grace period
    stopper.join(30)
    assert not server.aborted
    names = [app.storage.get(i).state.name for i in ids]
    assert names.count("Succeeded") == 2 and names.count("Enqueued") == 4  # never claimed


def test_busy_slots_and_pool_show_in_the_server_registry(app: App) -> None:
    go = threading.Event()

    @app.job(name="hold")
    async def hold() -> None:
        while not go.is_set():
            await asyncio.sleep(0.01)

    ids = [hold.enqueue() for _ in range(3)]
    server = asyncio_server(app, worker_count=7, enable_heartbeat=True,
                            heartbeat_interval=timedelta(seconds=0.2))
    server.start()
    try:
        wait_until(lambda: server.busy_slots == 3, timeout=20)
        info = wait_until(lambda: next((s for s in app.storage.list_servers()
                                        if s.busy == 3), None), timeout=20)
        assert info.pool == "asyncio" and info.worker_count == 7
        go.set()
        wait_until(lambda: states(app, ids) == {"Succeeded"}, timeout=20)
        wait_until(lambda: [s.busy for s in app.storage.list_servers()] == [0], timeout=20)
    finally:
        go.set()
        server.stop()


def test_an_idle_pool_is_woken_by_an_enqueue(app: App) -> None:
    @app.job(name="ping")
    async def ping() -> str:
        return "pong"

    # Polls every 60 s: only the wake-up (the app's local notifier) can start the job.
    server = asyncio_server(app, polling_interval=timedelta(seconds=60))
    server.start()
    try:
        wait_until(lambda: server.idle_workers == 1, timeout=20)  # the claimer waits
        job_id = ping.enqueue()
        wait_until(lambda: app.storage.get(job_id).state.name == "Succeeded", timeout=20)
    finally:
        server.stop()


def test_progress_from_an_async_job_is_stored(app: App) -> None:
    go = threading.Event()

    @app.job(name="steps")
    async def steps() -> None:
        current_context().report_progress(0.5, "half")
        while not go.is_set():
            await asyncio.sleep(0.01)

    job_id = steps.enqueue()
    server = asyncio_server(app)
    server.start()
    try:
        progress = wait_until(lambda: app.storage.get(job_id).metadata.get("progress"),
                              timeout=20)
        assert progress["fraction"] == 0.5 and progress["message"] == "half"
        go.set()
        wait_until(lambda: app.storage.get(job_id).state.name == "Succeeded", timeout=20)
    finally:
        go.set()
        server.stop()


def test_progress_awaited_from_an_async_job_is_stored(app: App) -> None:
    go = threading.Event()

    @app.job(name="steps")
    async def steps() -> None:
        assert await current_context().report_progress_async(0.75, "three quarters")
        while not go.is_set():
            await asyncio.sleep(0.01)

    job_id = steps.enqueue()
    server = asyncio_server(app)
    server.start()
    try:
        progress = wait_until(lambda: app.storage.get(job_id).metadata.get("progress"),
                              timeout=20)
        assert progress["fraction"] == 0.75 and progress["message"] == "three quarters"
        go.set()
        wait_until(lambda: app.storage.get(job_id).state.name == "Succeeded", timeout=20)
    finally:
        go.set()
        server.stop()


def test_a_job_raising_cancelled_error_itself_fails_and_the_pool_runs_on(app: App) -> None:
    # Only a cancellation of the attempt's task by the pool means "released, store
    # nothing"; a job that raises CancelledError of its own (a library's, or a bare
    # raise) fails like any other error and follows the retry policy, not left Processing.
    @app.job(name="raises_cancelled", retry=RetryPolicy(max_retries=1, base_delay=timedelta(0),
                                                        jitter=0))
    async def raises_cancelled() -> None:
        raise asyncio.CancelledError("from the job")

    @app.job(name="def_raises_generator_exit", retry=RetryPolicy(max_retries=0))
    def def_raises_generator_exit() -> None:
        raise GeneratorExit("from a def job")

    @app.job(name="quick")
    async def quick() -> int:
        return 5

    ids = [raises_cancelled.enqueue(), def_raises_generator_exit.enqueue()]
    server = asyncio_server(app, worker_count=2)
    server.start()
    try:
        wait_until(lambda: states(app, ids) == {"Failed"}, timeout=30)
        quick_id = quick.enqueue()
        wait_until(lambda: app.storage.get(quick_id).state.name == "Succeeded", timeout=30)
        assert server.pool.busy() == 0
    finally:
        server.stop()
    cancelled, generator_exit = (app.storage.get(i) for i in ids)
    assert cancelled.attempts == 2 and cancelled.state.retry_count == 1  # the retry ran
    assert cancelled.state.exception_type.endswith("CancelledError")
    assert "from the job" in cancelled.state.message
    assert generator_exit.state.exception_type == "GeneratorExit"
    assert "from a def job" in generator_exit.state.message


def test_a_task_cancelled_by_job_code_fails_its_attempt_and_is_retried(
        app: App, caplog: pytest.LogCaptureFixture) -> None:
    # Only the pool's own abort (the server released the job) makes a cancelled task
    # store nothing; a job that cancels its own task, or another job's, fails those
    # attempts with CancelledError and their retry policy runs, nothing left Processing.
    retry_once = RetryPolicy(max_retries=1, base_delay=timedelta(0), jitter=0)
    attempts: dict[str, list[int]] = {"victim": [], "self": []}
    victims_started = threading.Event()

    @app.job(name="cancels_itself", retry=retry_once)
    async def cancels_itself() -> str:
        attempts["self"].append(current_context().attempt)
        if current_context().attempt == 1:
            asyncio.current_task().cancel()
        await asyncio.sleep(0)  # the next suspension is where the cancellation lands
        return "second time lucky"

    @app.job(name="victim", retry=retry_once)
    async def victim() -> str:
        attempts["victim"].append(current_context().attempt)
        if len(attempts["victim"]) >= 3:
            victims_started.set()
        if current_context().attempt == 1:
            await asyncio.sleep(30)  # until cancelled_others cancels it (no race on time)
        return "survived"

    @app.job(name="cancels_others", retry=RetryPolicy(max_retries=0))
    async def cancels_others() -> int:
        me = asyncio.current_task()
        victims = [t for t in asyncio.all_tasks()
                   if t is not me and "_attempt" in repr(t.get_coro())]
        for task in victims:
            task.cancel()
        return len(victims)

    own = cancels_itself.enqueue()
    victims = [victim.enqueue() for _ in range(3)]
    server = asyncio_server(app, worker_count=10, log_attempts=True)
    with caplog.at_level(logging.INFO, logger="qmlkit.attempt"):
        server.start()
        try:
            wait_until(victims_started.is_set, timeout=30)
            killer = cancels_others.enqueue()
            wait_until(lambda: states(app, [own, *victims, killer]) == {"Succeeded"},
                       timeout=30)
        finally:
            server.stop()
    assert attempts["self"] == [1, 2]
    assert app.storage.get(own).state.result == "second time lucky"
    assert app.storage.get(killer).state.result == 3  # the three victims' first attempts
    for job_id in victims:
        job = app.storage.get(job_id)
        assert job.attempts == 2  # failed once (CancelledError), then retried
    cancelled = [r for r in caplog.records if "outcome=CancelledError" in r.getMessage()]
    assert len(cancelled) == 4, [r.getMessage() for r in caplog.records]


def test_a_def_job_whose_task_job_code_cancels_runs_to_its_end_and_only_once(
        app: App) -> None:
    # A def job cannot be interrupted; ending its attempt when job code cancels its task
    # would let its retry run beside the thread still running it (a breaker's finding).
    running = threading.Event()
    go = threading.Event()
    spans: list[tuple[int, str]] = []

    @app.job(name="def_victim", retry=RetryPolicy(max_retries=1, base_delay=timedelta(0),
                                                  jitter=0))
    def def_victim() -> str:
        attempt = current_context().attempt
        spans.append((attempt, "start"))
        running.set()
        go.wait(30)
        spans.append((attempt, "end"))
        return "finished"

    @app.job(name="cancel_everything")
    async def cancel_everything() -> int:
        me = asyncio.current_task()
        others = [t for t in asyncio.all_tasks() if t is not me
                  and "_attempt" in repr(t.get_coro())]
        for task in others:
            task.cancel()
        return len(others)

    victim = def_victim.enqueue()
    server = asyncio_server(app, worker_count=5)
    server.start()
    try:
        wait_until(running.is_set, timeout=30)
        killer = cancel_everything.enqueue()
        wait_until(lambda: app.storage.get(killer).state.name == "Succeeded", timeout=30)
        assert app.storage.get(killer).state.result == 1
        assert app.storage.get(victim).state.name == "Processing"  # its thread still runs
        go.set()
        wait_until(lambda: app.storage.get(victim).state.name == "Succeeded", timeout=30)
    finally:
        go.set()
        server.stop()
    assert spans == [(1, "start"), (1, "end")]  # one attempt, never two at once
    assert app.storage.get(victim).state.result == "finished"


def test_a_job_blocking_the_loop_is_named_in_the_log(
        app: App, caplog: pytest.LogCaptureFixture) -> None:
    release = threading.Event()

    @app.job(name="sleeps_on_the_loop")
    async def sleeps_on_the_loop() -> str:
        release.wait(30)  # blocking code in an async def job: the whole loop waits
        return "done"

    @app.job(name="nap")
    async def nap() -> int:
        await asyncio.sleep(0.01)
        return 1

    server = asyncio_server(app, worker_count=5)
    with caplog.at_level(logging.WARNING, logger="qmlkit.processing.server"):
        server.start()
        try:
            blocker = sleeps_on_the_loop.enqueue()
            wait_until(lambda: server.pool.loop_watch.blocks >= 1, timeout=30)
            release.set()
            later = nap.enqueue()
            wait_until(lambda: states(app, [blocker, later]) == {"Succeeded"}, timeout=30)
            wait_until(lambda: any("runs again" in r.getMessage() for r in caplog.records),
                       timeout=30)
        finally:
            release.set()
            server.stop()
    messages = [r.getMessage() for r in caplog.records]
    named = [m for m in messages if f"job {blocker} (sleeps_on_the_loop)" in m]
    assert len(named) == 2, messages  # one block reported once, and its end
    assert "has been blocked" in named[0] and "runs again" in named[1], messages


def test_a_job_that_stops_the_event_loop_does_not_stop_the_pool(
        app: App, caplog: pytest.LogCaptureFixture) -> None:
    # loop.stop() from a job would end run_forever under every other attempt and leave a
    # process that heartbeats but runs nothing; the pool runs its loop on, and says so.
    @app.job(name="stops_loop")
    async def stops_loop() -> str:
        asyncio.get_running_loop().stop()
        await asyncio.sleep(0.05)
        return "still here"

    @app.job(name="nap")
    async def nap(i: int) -> int:
        await asyncio.sleep(0.1)
        return i

    napping = [nap.enqueue(i) for i in range(5)]
    stopper = stops_loop.enqueue()
    server = asyncio_server(app, worker_count=10)
    with caplog.at_level(logging.WARNING, logger="qmlkit.processing.server"):
        server.start()
        try:
            wait_until(lambda: states(app, [*napping, stopper]) == {"Succeeded"}, timeout=30)
            later = [nap.enqueue(i) for i in range(5)]
            wait_until(lambda: states(app, later) == {"Succeeded"}, timeout=30)
        finally:
            server.stop()
    assert app.storage.get(stopper).state.result == "still here"
    assert not server.pool.alive()  # the real stop still ends the loop
    messages = [r.getMessage() for r in caplog.records]
    assert any("stopped the pool's event loop" in m for m in messages), messages


@pytest.mark.parametrize("backend_url", ["memory"], indirect=True)
def test_a_server_refuses_the_process_pool_naming_the_worker_command(app: App) -> None:
    # App.server(pool="processes") returns the supervisor; a Server itself refuses it.
    from qmlkit.processing.config import ServerConfig

    with pytest.raises(ConfigurationError, match="qmlkit worker APP --pool processes"):
        Server(app, app.storage, ServerConfig(storage_url="memory://", pool="processes"),
               plugin_manager=app.plugin_manager)
