"""Inline mode (``with app.inline():``, ``App(inline=True)``) on every backend: the
job runs in the caller, through the worker's own code, against the real storage."""

from __future__ import annotations

import asyncio
from collections.abc import Iterator
from datetime import timedelta
from typing import Any

import pytest

from qmlkit import App, hookimpl
from qmlkit.errors import PayloadError
from qmlkit.processing.retry import RetryPolicy
from qmlkit.testing import wait_until
from tests.conftest import backend_plugins

SLOW = RetryPolicy(max_retries=3, base_delay=timedelta(hours=1), jitter=0)


class Recorder:
    """Observer and middleware plugin: every committed transition, every attempt."""

    def __init__(self) -> None:
        self.changes: list[tuple[str, str | None, str]] = []
        self.attempts: list[str] = []

    @hookimpl
    def qmlkit_job_state_changed(self, job: Any, previous: Any, current: Any) -> None:
        self.changes.append((job.id, previous.name if previous else None, current.name))

    @hookimpl
    def qmlkit_middleware(self, config: Any) -> list[Any]:
        def around(job: Any, context: Any, call_next: Any) -> Any:
            self.attempts.append(job.method)
            return call_next()
        return [around]


@pytest.fixture
def recorder() -> Recorder:
    return Recorder()


@pytest.fixture
def app(backend_url: str, recorder: Recorder) -> Iterator[App]:
    application = App("inline", storage=backend_url, autoload=False,
                      plugins=[*backend_plugins(backend_url), recorder])
    yield application
    application.close()


def test_inline_enqueue_stores_succeeded_with_result(app: App, recorder: Recorder) -> None:
    @app.job
    def add(a: int, b: int) -> dict[str, int]:
        return {"sum": a + b}

    with app.inline():
        job_id = add.enqueue(2, 3)
    job = app.storage.get(job_id)
    assert job is not None and job.state.name == "Succeeded"
    assert job.state.result == {"sum": 5} and job.attempts == 1
    assert recorder.attempts == [add.name]  # through the server's middleware chain
    assert [c[1:] for c in recorder.changes] == [
        (None, "Enqueued"), ("Enqueued", "Processing"), ("Processing", "Succeeded")]


def test_inline_retries_skip_backoff_and_count_attempts(app: App, recorder: Recorder) -> None:
    calls: list[int] = []

    @app.job(retry=SLOW)
    def flaky() -> str:
        calls.append(1)
        if len(calls) < 3:
            raise ConnectionError(f"try {len(calls)}")
        return "done"

    with app.inline():
        job_id = flaky.enqueue()
    job = app.storage.get(job_id)
    assert job is not None and job.state.name == "Succeeded" and job.state.result == "done"
    assert job.attempts == 3 and job.retry_count == 2
    assert [c[2] for c in recorder.changes] == [
        "Enqueued", "Processing", "AwaitingRetry", "Enqueued", "Processing", "AwaitingRetry",
        "Enqueued", "Processing", "Succeeded"]


def test_inline_failure_is_stored_not_raised_by_default(app: App) -> None:
    @app.job(retry=RetryPolicy(max_retries=1, base_delay=timedelta(hours=1)))
    def broken(x: int) -> None:
        raise ValueError(f"bad {x}")

    with app.inline():
        job_id = broken.enqueue(7)  # no raise
    job = app.storage.get(job_id)
    assert job is not None and job.state.name == "Failed"
    assert job.state.exception_type == "ValueError" and job.state.message == "bad 7"
    assert job.attempts == 2 and "raise ValueError" in (job.state.stack_trace or "")


def test_inline_raise_errors_reraises_the_jobs_exception(app: App) -> None:
    @app.job(max_retries=0)
    def broken() -> None:
        raise KeyError("missing")

    with app.inline(raise_errors=True), pytest.raises(KeyError, match="missing"):
        broken.enqueue()
    (job,) = app.storage.list_jobs(state="Failed")
    assert job.state.exception_type == "KeyError"


def test_inline_result_that_is_not_json_fails_the_job(app: App) -> None:
    @app.job
    def unstorable() -> object:
        return {1, 2}

    with app.inline():
        job_id = unstorable.enqueue()
    job = app.storage.get(job_id)
    assert job is not None and job.state.name == "Failed"
    assert job.state.exception_type.endswith("PayloadError") and "result" in job.state.message


def test_inline_payload_that_is_not_json_is_refused_and_nothing_stored(app: App) -> None:
    @app.job
    def takes(x: object) -> None: ...

    with app.inline(), pytest.raises(PayloadError, match=r"args\[0\]"):
        takes.enqueue(object())
    assert app.storage.list_jobs() == []


def test_inline_schedule_runs_at_once_through_scheduled(app: App, recorder: Recorder) -> None:
    @app.job
    def later() -> int:
        return 1

    with app.inline():
        job_id = later.schedule(delay=3600)
    job = app.storage.get(job_id)
    assert job is not None and job.state.name == "Succeeded"
    assert [c[1:] for c in recorder.changes][:2] == [(None, "Scheduled"), ("Scheduled", "Enqueued")]


def test_inline_nested_enqueues_run_after_their_parent(app: App) -> None:
    order: list[str] = []

    @app.job
    def child(n: int) -> int:
        order.append(f"child {n}")
        return n

    @app.job
    def parent() -> str:
        child.enqueue(1)
        child.enqueue_many([(2,), (3,)])
        order.append("parent end")
        return "ok"

    with app.inline():
        parent.enqueue()
    assert order == ["parent end", "child 1", "child 2", "child 3"]
    assert sorted(j.state.name for j in app.storage.list_jobs()) == ["Succeeded"] * 4


def test_inline_self_enqueueing_chain_does_not_recurse(app: App) -> None:
    @app.job
    def countdown(n: int) -> int:
        if n:
            countdown.enqueue(n - 1)
        return n

    with app.inline():
        countdown.enqueue(300)  # deeper than any stack would allow if run recursively x10
    assert len(app.storage.list_jobs(state="Succeeded", limit=1000)) == 301


def test_inline_async_job_from_inside_a_running_event_loop(app: App) -> None:
    @app.job
    async def double(x: int) -> int:
        await asyncio.sleep(0)
        return 2 * x

    async def test_body() -> str:
        with app.inline():
            return double.enqueue(21)

    job = app.storage.get(asyncio.run(test_body()))
    assert job is not None and job.state.name == "Succeeded" and job.state.result == 42


def test_inline_ends_with_the_block(app: App) -> None:
    @app.job
    def noop() -> None: ...

    with app.inline():
        inside = noop.enqueue()
    outside = noop.enqueue()
    assert app.storage.get(inside).state.name == "Succeeded"  # type: ignore[union-attr]
    assert app.storage.get(outside).state.name == "Enqueued"  # type: ignore[union-attr]


def test_inline_sees_a_worker_store_the_same_states(memory_url: str) -> None:
    def transitions(inline: bool) -> list[tuple[str | None, str]]:
        recorder = Recorder()
        application = App("cmp", storage=memory_url, autoload=False, plugins=[recorder],
                          inline=inline)

        @application.job(retry=RetryPolicy(max_retries=1, base_delay=timedelta(0), jitter=0))
        def fails_once(state: dict[str, int]) -> int:
            if not recorder.attempts[1:]:
                raise RuntimeError("first")
            return state["n"]

        job_id = fails_once.enqueue({"n": 4})
        if not inline:
            server = application.server(worker_count=1, polling_interval=0.05)
            server.start()
            try:
                wait_until(lambda: application.storage.get(job_id).state.name == "Succeeded")
            finally:
                server.stop()
        stored = application.storage.get(job_id)
        assert stored is not None and stored.state.result == 4 and stored.attempts == 2
        return [c[1:] for c in recorder.changes if c[0] == job_id]

    assert transitions(inline=True) == transitions(inline=False)


def test_app_inline_true_runs_every_enqueue(memory_url: str) -> None:
    application = App("session", storage=memory_url, autoload=False, inline=True)

    @application.job
    def hello(name: str) -> str:
        return f"hello {name}"

    job_id = application.enqueue(hello.name, args=["you"])
    assert application.storage.get(job_id).state.result == "hello you"  # type: ignore[union-attr]
    application.close()


def test_inline_handle_result_needs_no_wait(app: App) -> None:
    @app.job
    def square(x: int) -> int:
        return x * x

    with app.inline():
        handle = square.enqueue(9)
    assert handle.result(timeout=0) == 81


def test_inline_raise_errors_for_qmlkits_own_failures(app: App) -> None:
    from qmlkit.errors import JobTimeout, UnknownJobName

    @app.job(timeout=0.05, max_retries=0)
    async def slow() -> None:
        await asyncio.sleep(5)

    with app.inline(raise_errors=True):
        with pytest.raises(UnknownJobName):
            app.enqueue("nobody.registered.this", max_retries=0)
        with pytest.raises(JobTimeout):
            slow.enqueue()
    assert sorted(j.state.exception_type.rpartition(".")[2]  # type: ignore[union-attr]
                  for j in app.storage.list_jobs(state="Failed")) == ["JobTimeout",
                                                                      "UnknownJobName"]


def test_inline_from_many_threads_returns_finished_jobs(app: App) -> None:
    from concurrent.futures import ThreadPoolExecutor

    @app.job
    def work(i: int) -> int:
        return i

    def one(i: int) -> str:
        with app.inline():
            handle = work.enqueue(i)
        return app.storage.get(handle).state.name  # type: ignore[union-attr]

    with ThreadPoolExecutor(4) as pool:
        states = list(pool.map(one, range(40)))
    assert states == ["Succeeded"] * 40


def test_inline_chain_stops_at_the_step_limit(memory_url: str, monkeypatch: pytest.MonkeyPatch,
                                              caplog: pytest.LogCaptureFixture) -> None:
    import qmlkit.processing.inline as inline

    monkeypatch.setattr(inline, "MAX_INLINE_STEPS", 5)
    application = App("chain", storage=memory_url, autoload=False)

    @application.job
    def forever(n: int) -> int:
        forever.enqueue(n + 1)
        return n

    with application.inline():
        forever.enqueue(0)
    assert len(application.storage.list_jobs(state="Succeeded")) == 5
    assert len(application.storage.list_jobs(state="Enqueued")) == 1
    assert "1 job(s) left as stored" in caplog.text
    application.close()


def test_inline_async_enqueue_returns_a_finished_job(app: App) -> None:
    @app.job
    def triple(x: int) -> int:
        return 3 * x

    async def body() -> int:
        with app.inline():
            handle = await triple.enqueue_async(5)
        assert handle.state == "Succeeded"
        return await handle.result_async(timeout=5)

    assert asyncio.run(body()) == 15


def test_inline_raise_errors_from_a_nested_job_after_its_parent(app: App) -> None:
    @app.job(max_retries=0)
    def child() -> None:
        raise LookupError("child broke")

    @app.job
    def parent() -> str:
        child.enqueue()
        return "parent done"

    with app.inline(raise_errors=True), pytest.raises(LookupError, match="child broke"):
        parent.enqueue()
    (done,) = app.storage.list_jobs(method=parent.name)
    assert done.state.name == "Succeeded"  # the parent ended first, and was stored


def test_inline_config_applies_and_one_runner_serves_equal_configs(memory_url: str) -> None:
    application = App("cfg", storage=memory_url, autoload=False)

    @application.job(max_retries=0)
    def sleepy() -> None:
        import time

        time.sleep(0.3)  # past the 0.05 s limit (a sync job stops cooperatively)

    for _ in range(3):  # a new but equal dict each time
        with application.inline(config={"job_timeout": 0.05, "log_attempts": False}):
            job_id = sleepy.enqueue()
        job = application.storage.get(job_id)
        assert job is not None and job.state.exception_type.endswith("JobTimeout")
    assert len(application._inline._runners) == 1
    application.close()


def test_inline_enqueue_many_runs_every_job_in_order(app: App) -> None:
    ran: list[int] = []

    @app.job
    def record(i: int) -> int:
        ran.append(i)
        return i

    with app.inline():
        handles = record.enqueue_many([(i,) for i in range(5)])
    assert ran == [0, 1, 2, 3, 4]
    assert [h.result(timeout=0) for h in handles] == [0, 1, 2, 3, 4]
