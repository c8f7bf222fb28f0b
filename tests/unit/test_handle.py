"""Job handles without a server: str semantics, storage cost of ``result()``, the shared
waiter's batching, the local servers' poke, and async enqueue."""

from __future__ import annotations

import asyncio
import json
import pickle
import threading
import time
from collections import Counter
from collections.abc import Callable, Iterator
from datetime import timedelta
from pathlib import Path
from typing import Any

import pytest

from qmlkit import App, JobHandle, PayloadError, hookimpl
from qmlkit.job import Succeeded, utcnow
from qmlkit.storage.base import Storage, Transition
from qmlkit.testing import wait_until
from qmlkit.waiting import MAX_POLL_S


@pytest.fixture(params=["memory", "sqlite"])
def local_app(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[App]:
    url = "memory://" if request.param == "memory" else f"sqlite:///{tmp_path / 'h.db'}"
    app = App("h", storage=url, autoload=False)
    yield app
    app.close()


def count_calls(monkeypatch: pytest.MonkeyPatch, storage: Storage) -> Counter[str]:
    """Count every call of ``storage``'s contract and batch-read methods (and the ids
    the batch reads read)."""
    calls: Counter[str] = Counter()

    def counted(name: str, method: Callable[..., Any]) -> Callable[..., Any]:
        def call(*args: Any, **kwargs: Any) -> Any:
            calls[name] += 1
            if name in ("get_many", "job_states"):
                for job_id in args[0]:
                    calls[f"read:{job_id}"] += 1
            return method(*args, **kwargs)
        return call

    for name in [*dir(Storage), "get_many", "job_states"]:
        method = getattr(storage, name)
        if not name.startswith("_") and callable(method):
            monkeypatch.setattr(storage, name, counted(name, method))
    return calls


def finish(storage: Storage, job_id: str, result: object) -> None:
    """Claim ``job_id`` and store it Succeeded with ``result`` (what a worker does)."""
    [claimed] = storage.claim(worker_id="w", server_name="s", queues=(), limit=1, now=utcnow())
    assert claimed.id == job_id
    storage.transition(Transition(claimed, Succeeded(succeeded_at=utcnow(), duration_ms=1.0,
                                                     result=result)))


def test_a_handle_is_its_job_id_string(local_app: App) -> None:
    handle = local_app.enqueue("m.f", args=[1])
    job_id = handle.id
    assert type(job_id) is str and handle == job_id and hash(handle) == hash(job_id)
    assert {job_id: 1}[handle] == 1 and str(handle) == job_id and f"{handle}" == job_id
    assert json.dumps({"id": handle}) == json.dumps({"id": job_id})
    assert pickle.loads(pickle.dumps(handle)) == job_id
    assert repr(handle) == f"JobHandle({job_id!r})"
    # passed as a job argument, it is stored as the id string
    follow_up = local_app.enqueue("m.g", args=[handle])
    assert local_app.storage.get(follow_up).args == [job_id]


def test_result_of_a_finished_job_costs_one_storage_read(
        local_app: App, monkeypatch: pytest.MonkeyPatch) -> None:
    handle = local_app.enqueue("m.f")
    finish(local_app.storage, handle, {"n": 1})
    calls = count_calls(monkeypatch, local_app.storage)
    assert handle.result(timeout=5) == {"n": 1}
    assert calls == Counter({"get": 1})
    assert asyncio.run(handle.result_async(timeout=0)) == {"n": 1}  # looks once too
    assert calls == Counter({"get": 2})


def test_waiting_on_1000_handles_costs_at_most_one_read_per_handle_per_poll(
        local_app: App, monkeypatch: pytest.MonkeyPatch) -> None:
    # Given 1,000 jobs that will not run during the test
    fn = local_app.job(name="m.later")(lambda i: i)
    later = [fn.schedule(i, delay=3600) for i in range(1000)]
    calls = count_calls(monkeypatch, local_app.storage)
    wait_s = 1.0

    # When they are all awaited at once until their timeout
    async def main() -> list[BaseException | Any]:
        return await asyncio.gather(*(h.result_async(timeout=wait_s) for h in later),
                                    return_exceptions=True)

    outcomes = asyncio.run(main())

    # Then each timed out, no job was read more often than its poll intervals allow
    # (10, 20, 40 ... ms: at most 8 reads in 1 s, fewer on a slow machine), the reads
    # were batched (never one query per handle) and of state names only (no job is
    # decoded before it is final)
    assert all(isinstance(o, TimeoutError) for o in outcomes)
    reads = [calls[f"read:{h}"] for h in later]
    assert 1 <= max(reads) <= 8
    assert calls["get"] == calls["get_many"] == 0
    assert calls["job_states"] < 100, calls["job_states"]  # not 8,000 gets
    assert local_app.result_waiter.waiting == 0


def test_a_local_server_pokes_waiters_when_it_stores_outcomes(local_app: App) -> None:
    seen: list[str] = []
    local_app.notifier.watch_settled(seen.extend)
    fn = local_app.job(name="m.quick")(lambda: 7)
    server = local_app.server(worker_count=1, polling_interval=timedelta(milliseconds=50),
                              enable_cleanup=False, log_attempts=False)
    server.start()
    try:
        handle = fn.enqueue()
        wait_until(lambda: handle in seen, timeout=10, message="the server's settled call")
        assert handle.result(timeout=5) == 7
    finally:
        server.stop()


def test_a_poke_reads_a_waited_job_again_at_once(local_app: App) -> None:
    handle = local_app.enqueue("m.f", delay=3600)
    waiter = local_app.result_waiter
    got: list[Any] = []
    entry = waiter.add(handle, got.append)
    wait_until(lambda: entry.interval >= MAX_POLL_S, timeout=30,
               message="the poll interval to reach its cap")
    local_app.delete(handle)  # App.delete goes through Notifier.observe: a poke
    job = wait_until(lambda: got[0] if got else None, timeout=MAX_POLL_S * 0.9,
                     message="the poked read")
    assert job.state.name == "Deleted"


class Stamp:
    """An enqueue middleware stamping the thread it ran on."""

    @hookimpl
    def qmlkit_enqueue_middleware(self, config: dict[str, object]) -> list[object]:
        def stamp(jobs: list[Any], call_next: Callable[[list[Any]], Any]) -> Any:
            name = threading.current_thread().name
            return call_next([j.model_copy(update={"metadata": {"thread": name}}) for j in jobs])
        return [stamp]


def test_async_enqueues_go_through_middleware_and_validation_off_the_loop(tmp_path: Path) -> None:
    app = App("a", storage=f"sqlite:///{tmp_path / 'a.db'}", autoload=False, plugins=[Stamp()])
    fn = app.job(name="m.f")(lambda x: x)

    async def main() -> list[JobHandle[Any]]:
        handles = [await fn.enqueue_async(1), await fn.schedule_async(2, delay=60),
                   await app.enqueue_async("m.f", args=[3], priority=5),
                   *await fn.enqueue_many_async([(4,), (5,)])]
        with pytest.raises(PayloadError, match="args"):
            await fn.enqueue_async(object())
        return handles

    try:
        handles = asyncio.run(main())
        stored = [app.storage.get(h) for h in handles]
        assert [j.args for j in stored] == [[1], [2], [3], [4], [5]]
        assert [j.state.name for j in stored] == ["Enqueued", "Scheduled", "Enqueued",
                                                  "Enqueued", "Enqueued"]
        assert stored[2].priority == 5
        assert all(j.metadata["thread"].startswith("qmlkit-enqueue") for j in stored)
        assert len(app.storage.list_jobs(limit=100)) == 5  # the bad one stored nothing
    finally:
        app.close()


def test_async_enqueue_never_blocks_the_event_loop_for_long(tmp_path: Path) -> None:
    """Loop lag measured by a 1 ms ticker during 200 async enqueues on SQLite.

    The enqueue runs on the app's enqueue threads; the loop only hands it over. What
    the ticker still sees is the GIL: while an enqueue thread runs Python code the loop
    thread waits for its turn, up to ``sys.getswitchinterval()`` (5 ms) at a time, and
    longer when the two cores are shared with other work. A sync enqueue in the loop
    would block it for the whole commit (milliseconds each, 200 in a row). 50 ms is
    generous for a loaded machine yet fails at once if enqueue ran on the loop thread
    in one blocking burst, or held the loop across a commit. The loop thread's own CPU
    time per enqueue (hand-over, future, wake-up; about 0.1 ms here under load, a sync
    SQLite enqueue about 0.15 ms on the same thread) must stay under the 1 ms the issue
    allows.
    """
    app = App("lag", storage=f"sqlite:///{tmp_path / 'lag.db'}", autoload=False)
    fn = app.job(name="m.f")(lambda x: x)
    assert app.storage.list_jobs() == []  # opened (and the schema made) before measuring

    async def loop_cpu_per_enqueue() -> float:
        await fn.enqueue_async(-1)  # the enqueue threads started
        start = time.thread_time()
        for i in range(200):
            await fn.enqueue_async(i)
        return (time.thread_time() - start) / 200

    async def main() -> float:
        lags: list[float] = []
        done = asyncio.Event()

        async def ticker() -> None:
            while not done.is_set():
                before = time.perf_counter()
                await asyncio.sleep(0.001)
                lags.append(time.perf_counter() - before - 0.001)

        tick = asyncio.ensure_future(ticker())
        await asyncio.sleep(0.01)
        for i in range(200):
            await fn.enqueue_async(i)
        done.set()
        await tick
        return max(lags)

    try:
        worst = asyncio.run(main())
        assert len(app.storage.list_jobs(limit=500)) == 200
        assert worst < 0.05, f"the event loop was blocked for {worst * 1000:.1f} ms"
        cpu = asyncio.run(loop_cpu_per_enqueue())
        assert cpu < 0.001, f"the loop thread spent {cpu * 1000:.2f} ms per enqueue"
    finally:
        app.close()
