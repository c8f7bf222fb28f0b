"""Job handles with a real in-process server on every backend: result, failure details,
timeouts, deleted and unknown jobs, handles rebuilt from ids, and ``result_async``."""

from __future__ import annotations

import asyncio
from collections.abc import Iterator
from contextlib import contextmanager
from datetime import timedelta
from typing import Any

import pytest

from qmlkit import App, JobDeleted, JobFailed, JobHandle, JobNotFound, Server
from qmlkit.errors import ConfigurationError

FAST: dict[str, Any] = {
    "polling_interval": timedelta(milliseconds=50),
    "scheduler_poll_interval": timedelta(milliseconds=200),
    "enable_cleanup": False,
    "log_attempts": False,
    "worker_count": 2,
}


@contextmanager
def running(app: App) -> Iterator[Server]:
    server = app.server(**FAST)
    server.start()
    try:
        yield server
    finally:
        server.stop()


def register(app: App) -> dict[str, Any]:
    @app.job(name="t.add")
    def add(a: int, b: int) -> int:
        return a + b

    @app.job(name="t.shape")
    def shape() -> Any:
        return {"tuple": (1, 2), "float": 1.5, "none": None, "nested": {"k": [True]}}

    @app.job(name="t.boom", max_retries=0)
    def boom(text: str) -> None:
        raise ValueError(f"bad {text}")

    @app.job(name="t.unjson", max_retries=0)
    def unjson() -> object:
        return object()

    @app.job(name="t.aio")
    async def aio(x: int) -> int:
        await asyncio.sleep(0)
        return x * 2

    return {"add": add, "shape": shape, "boom": boom, "unjson": unjson, "aio": aio}


def test_result_of_a_succeeded_job_is_its_return_value_with_json_types(app: App) -> None:
    jobs = register(app)
    with running(app):
        handle = jobs["add"].enqueue(2, 3)
        shaped = jobs["shape"].enqueue()
        assert handle.result(timeout=30) == 5
        assert shaped.result(timeout=30) == {"tuple": [1, 2], "float": 1.5, "none": None,
                                             "nested": {"k": [True]}}
        assert handle.state == "Succeeded"
        assert handle.refresh().state.result == 5


def test_result_of_a_failed_job_raises_job_failed_with_the_stored_details(app: App) -> None:
    jobs = register(app)
    with running(app):
        handle = jobs["boom"].enqueue("input")
        with pytest.raises(JobFailed) as info:
            handle.result(timeout=30)
    err = info.value
    assert err.job_id == handle
    assert err.exception_type == "ValueError"
    assert err.message == "bad input"
    assert err.stack_trace is not None and 'raise ValueError(f"bad {text}")' in err.stack_trace
    assert "ValueError: bad input" in str(err)


def test_result_of_a_job_whose_result_was_not_json_says_so(app: App) -> None:
    jobs = register(app)
    with running(app):
        with pytest.raises(JobFailed) as info:
            jobs["unjson"].enqueue().result(timeout=30)
    assert info.value.exception_type.endswith("PayloadError")
    assert "result" in info.value.message and "JSON" in info.value.message


def test_result_raises_the_builtin_timeout_error_when_the_deadline_passes(app: App) -> None:
    jobs = register(app)
    handle = jobs["add"].schedule(1, 1, delay=3600)  # never runnable during the test
    with pytest.raises(TimeoutError, match=handle.id):
        handle.result(timeout=0.2)
    with pytest.raises(TimeoutError):
        handle.result(timeout=0)
    with pytest.raises(TimeoutError):
        asyncio.run(handle.result_async(timeout=timedelta(0)))
    assert app.result_waiter.waiting == 0  # the timed-out wait was withdrawn


def test_result_of_a_deleted_job_raises_job_deleted_even_while_waiting(app: App) -> None:
    jobs = register(app)
    handle = jobs["add"].schedule(1, 1, delay=3600)

    async def wait_then_delete() -> None:
        waiting = asyncio.ensure_future(handle.result_async(timeout=30))
        await asyncio.sleep(0.05)
        app.delete(handle, reason="not needed")
        with pytest.raises(JobDeleted, match="not needed"):
            await waiting

    asyncio.run(wait_then_delete())
    with pytest.raises(JobDeleted):
        handle.result(timeout=1)


def test_a_handle_of_an_unknown_id_raises_job_not_found(app: App) -> None:
    handle = app.job_handle("no-such-job")
    for read in (lambda: handle.state, handle.refresh, lambda: handle.result(timeout=1)):
        with pytest.raises(JobNotFound):
            read()
    with pytest.raises(JobNotFound):
        asyncio.run(handle.result_async(timeout=1))
    with pytest.raises(ConfigurationError, match="job_id"):
        app.job_handle("")


def test_job_handle_rebuilds_a_handle_from_a_stored_id(app: App) -> None:
    jobs = register(app)
    job_id = str(jobs["add"].enqueue(20, 22))  # what a web app would store
    with running(app):
        rebuilt = app.job_handle(job_id)
        assert rebuilt == job_id
        assert rebuilt.result(timeout=30) == 42


def test_result_async_awaits_many_handles_without_blocking(app: App) -> None:
    jobs = register(app)

    async def main() -> list[int]:
        handles = [await jobs["aio"].enqueue_async(i) for i in range(10)]
        handles += await jobs["add"].enqueue_many_async([(i, 100) for i in range(10)])
        return list(await asyncio.gather(*(h.result_async(timeout=30) for h in handles)))

    with running(app):
        results = asyncio.run(main())
    assert results == [i * 2 for i in range(10)] + [i + 100 for i in range(10)]


def test_enqueue_schedule_and_enqueue_many_return_handles_equal_to_the_ids(app: App) -> None:
    jobs = register(app)
    handles = [jobs["add"].enqueue(1, 2), jobs["add"].schedule(1, 2, delay=60),
               app.enqueue("t.add", args=[1, 2]), *jobs["add"].enqueue_many([(1, 2), (3, 4)])]
    for handle in handles:
        assert isinstance(handle, JobHandle) and isinstance(handle, str)
        stored = app.storage.get(handle)
        assert stored is not None and stored.id == handle and hash(handle) == hash(stored.id)
    assert {h.state for h in handles} == {"Enqueued", "Scheduled"}
