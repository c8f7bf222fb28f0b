"""The processing contract: what a running server does with jobs is the same on every
pool (issue #14, "Tests") and every backend.

Each test runs on ``threads``, ``asyncio`` and ``processes`` (one child of two thread
slots: every child is a server of its own, so one child shows what each does) on
memory (not for the process pool: it lives in one process), SQLite, Redis and
PostgreSQL: claiming, running ``def``, ``async def`` and class-based jobs, storing
results, progress, retries with backoff, the ``Retry`` signal, exhausted retries,
scheduled jobs, timeouts, middleware, observers, stop (drain, ``context.stopping``,
release at the grace period's end), a restart, and the batches of field case C18.

The app is a module written to the test's ``tmp_path`` (children import it by its
``module:attribute`` path), so nothing here can rely on sharing memory with the job:
job bodies and the app's middleware and observer append lines to files under
``effects/`` and wait for files the test creates, and the test reads those.

tests/unit/test_server.py keeps, on the thread and asyncio pools, what is no processing
behaviour of a pool: argument checks made before anything is stored (``schedule()``'s,
a bad progress fraction, an unknown storage scheme, a bad config field, a duplicate job
name) and ``Server.from_plugins(middleware=...)``. What only the process pool does (hard
timeouts, crashes, recycling, the supervisor's signals) is in
tests/integration/test_process_pool.py; faults of every pool in test_pool_faults.py.
"""

from __future__ import annotations

import importlib
import sys
import time
import uuid
from collections.abc import Iterator
from datetime import datetime, timedelta, timezone
from pathlib import Path
from types import ModuleType
from typing import Any

import pytest

from qmlkit import App
from qmlkit.testing import wait_until
from tests.conftest import backend_plugins

APP_MODULE = '''
import asyncio
import os
import time
from datetime import timedelta
from pathlib import Path

from qmlkit import App, Retry, RetryPolicy, current_context, hookimpl
{imports}

EFFECTS = Path({effects!r})


def note(name, *fields):
    """One line in effects/<name>.log, appended (every process may write)."""
    fd = os.open(EFFECTS / f"{{name}}.log", os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
    try:
        os.write(fd, (" ".join(str(f) for f in fields) + "\\n").encode())
    finally:
        os.close(fd)


def gate(name, timeout_s=30.0):
    """Wait until the test creates effects/<name> (True), or ``timeout_s`` passes."""
    deadline = time.monotonic() + timeout_s
    while not (EFFECTS / name).exists():
        if time.monotonic() > deadline:
            return False
        time.sleep(0.01)
    return True


def outer(job, context, call_next):
    if job.method != "echo":
        return call_next()
    note("mw", "outer-before")
    result = call_next()
    note("mw", "outer-after")
    return result


def inner(job, context, call_next):
    if job.method != "echo":
        return call_next()
    note("mw", "inner")
    return "short-circuited" if job.args == ["skip"] else call_next()


class Plugin:
    @hookimpl
    def qmlkit_middleware(self, config):
        return [outer, inner]

    @hookimpl
    def qmlkit_job_state_changed(self, job, previous, current):
        note("observed", job.id, previous.name if previous else None, current.name)
        raise RuntimeError("observers are isolated")


app = App("contract", storage={url!r}, autoload=False, plugins=[Plugin(), {plugins}])


@app.job(name="add")
def add(a, b):
    return a + b


@app.job(name="async_add")
async def async_add(a, b):
    await asyncio.sleep(0)
    return {{"sum": a + b}}


class Greeter:
    method_name = "greet"

    def execute(self, job, context):
        return f"hello {{job.args[0]}} (attempt {{context.attempt}})"


app.register_worker(Greeter())


@app.job(name="crunch")
def crunch():
    current_context().report_progress(0.5, "half way\\x00")  # NUL: not storable as is
    note("halfway", "yes")
    gate("release-crunch", 10)
    current_context().report_progress(1.0)


@app.job(name="quick")
def quick(i):
    note("quick", i)


@app.job(name="slow")
def slow(tag):
    gate(tag)


@app.job(name="sleeper")
def sleeper():
    note("started", "sleeper")
    time.sleep(0.5)  # the simulated work
    return "done"


@app.job(name="cooperative")
def cooperative():
    ctx = current_context()
    note("started", "cooperative")
    return "saw stop" if ctx.stopping.wait(10) else "no stop"


@app.job(name="stuck")
def stuck():
    note("started", "stuck")
    gate("release-stuck")


@app.job(name="ping")
def ping():
    return "pong"


@app.job(name="sleepy", timeout=0.2, max_retries=0)
def sleepy():
    current_context().cancelled.wait(10)
    return "finished late"


@app.job(name="forever", timeout=0.1,
         retry=RetryPolicy(max_retries=1, base_delay=timedelta(0), jitter=0))
async def forever():
    note("forever", current_context().attempt)
    await asyncio.sleep(30)


@app.job(name="flaky",
         retry=RetryPolicy(max_retries=3, base_delay=timedelta(milliseconds=50), jitter=0))
def flaky():
    attempt = current_context().attempt
    note("flaky", attempt)
    if attempt < 3:
        raise ValueError(f"boom {{attempt}}")
    return attempt


@app.job(name="later", max_retries=2)
def later():
    raise Retry(delay=3600, message="not yet")


@app.job(name="broken", max_retries=0)
def broken():
    raise KeyError("missing \\u00fcn\\u00efc\\u00f8d\\u00e9")


@app.job(name="tick")
def tick():
    note("tick", time.time())


@app.job(name="echo")
def echo(x):
    note("mw", "job")
    return x
'''

BACKENDS = {"memory": [], "sqlite": [], "redis": [pytest.mark.redis],
            "postgres": [pytest.mark.postgres]}
CASES = [pytest.param((pool, backend), marks=marks, id=f"{pool}-{backend}")
         for pool in ("threads", "asyncio", "processes")
         for backend, marks in BACKENDS.items()
         if not (pool == "processes" and backend == "memory")]


class Contract:
    """One pool on one backend: the app module, its effects, and the servers started."""

    def __init__(self, pool: str, url: str, folder: Path, module: ModuleType) -> None:
        self.pool = pool
        self.url = url
        self.effects = folder / "effects"
        self.module = module
        self.app: App = module.app
        self.servers: list[Any] = []

    def server(self, **fields: Any) -> Any:
        """A started server (or process pool) of this pool, fast-polling."""
        defaults: dict[str, Any] = {
            "worker_count": 2, "polling_interval": timedelta(milliseconds=20),
            "scheduler_poll_interval": timedelta(milliseconds=20),
            "shutdown_timeout": timedelta(seconds=10), "log_attempts": False, "pool": self.pool}
        if self.pool == "processes":
            defaults["processes"] = 1
        server = self.app.server(**{**defaults, **fields})
        server.start()
        self.servers.append(server)
        if self.pool == "processes":
            wait_until(lambda: server.strength() == server.size, timeout=60,
                       message="the child ready")
        return server

    def state(self, job_id: str) -> str:
        return self.app.storage.get(job_id).state.name

    def lines(self, name: str) -> list[list[str]]:
        """The lines of effects/<name>.log, each split in fields."""
        path = self.effects / f"{name}.log"
        if not path.exists():
            return []
        return [line.split() for line in path.read_text().split("\n")[:-1]]

    def release(self, name: str) -> None:
        (self.effects / name).touch()

    def close(self) -> None:
        for name in ("release-crunch", "release-stuck"):
            self.release(name)
        for server in self.servers:
            server.stop()
        self.app.close()


@pytest.fixture(params=CASES)
def contract(request: pytest.FixtureRequest, tmp_path: Path,
             monkeypatch: pytest.MonkeyPatch) -> Iterator[Contract]:
    """Each pool on each backend it can run on."""
    pool, backend = request.param
    url = request.getfixturevalue(f"{backend}_url")
    name = f"qk_contract_{uuid.uuid4().hex[:8]}"
    plugins = [module.__name__ for module in backend_plugins(url)]
    (tmp_path / "effects").mkdir()
    (tmp_path / f"{name}.py").write_text(APP_MODULE.format(
        url=url, effects=str(tmp_path / "effects"),
        imports="\n".join(f"import {name}" for name in plugins), plugins=", ".join(plugins)))
    monkeypatch.syspath_prepend(str(tmp_path))
    monkeypatch.chdir(tmp_path)
    made = Contract(pool, url, tmp_path, importlib.import_module(name))
    yield made
    made.close()
    sys.modules.pop(name, None)


# --- running jobs and storing outcomes ----------------------------------------------------


def test_sync_async_and_class_based_jobs_run_and_store_results(contract: Contract) -> None:
    app = contract.app
    assert contract.module.add(1, 2) == 3  # a direct call runs here
    ids = [app.enqueue("add", args=[1, 2]), app.enqueue("async_add", args=[3, 4]),
           app.enqueue("greet", args=["ada"])]
    contract.server()
    wait_until(lambda: all(contract.state(i) == "Succeeded" for i in ids), timeout=30)
    assert [app.storage.get(i).state.result for i in ids] == [
        3, {"sum": 7}, "hello ada (attempt 1)"]


def test_progress_reported_by_a_running_job_is_visible_while_it_runs(contract: Contract) -> None:
    app = contract.app
    job_id = app.enqueue("crunch")
    contract.server(worker_count=1)
    wait_until(lambda: contract.lines("halfway"), timeout=30)
    running = app.storage.get(job_id)
    assert running.state.name == "Processing"
    assert running.metadata["progress"]["fraction"] == 0.5
    assert running.metadata["progress"]["message"] == "half way\ufffd"
    contract.release("release-crunch")
    wait_until(lambda: contract.state(job_id) == "Succeeded", timeout=30)
    assert app.storage.get(job_id).metadata["progress"]["fraction"] == 1.0


def test_observers_see_every_committed_transition(contract: Contract) -> None:
    job_id = contract.app.enqueue("ping")
    contract.server()
    wait_until(lambda: contract.state(job_id) == "Succeeded", timeout=30)
    # The enqueue's change is observed here; the claim's and the outcome's where they
    # were committed (the server's process: a child of the process pool)
    wait_until(lambda: len([f for f in contract.lines("observed") if f[0] == job_id]) == 3,
               timeout=30)
    mine = [tuple(f[1:]) for f in contract.lines("observed") if f[0] == job_id]
    assert mine == [("None", "Enqueued"), ("Enqueued", "Processing"),
                    ("Processing", "Succeeded")]


def test_middleware_wraps_in_order_and_can_short_circuit(contract: Contract) -> None:
    app = contract.app
    a = app.enqueue("echo", args=["run"])
    contract.server(worker_count=1)
    wait_until(lambda: contract.state(a) == "Succeeded", timeout=30)
    b = app.enqueue("echo", args=["skip"])
    wait_until(lambda: contract.state(b) == "Succeeded", timeout=30)
    assert [f[0] for f in contract.lines("mw")] == [
        "outer-before", "inner", "job", "outer-after", "outer-before", "inner", "outer-after"]
    assert app.storage.get(a).state.result == "run"
    assert app.storage.get(b).state.result == "short-circuited"


# --- retries, timeouts, scheduling --------------------------------------------------------


def test_failed_attempts_retry_with_backoff_then_succeed(contract: Contract) -> None:
    job_id = contract.app.enqueue("flaky")
    contract.server()
    wait_until(lambda: contract.state(job_id) == "Succeeded", timeout=30)
    job = contract.app.storage.get(job_id)
    assert [f[0] for f in contract.lines("flaky")] == ["1", "2", "3"]
    assert job.retry_count == 2 and job.state.result == 3


def test_retry_signal_uses_its_delay(contract: Contract) -> None:
    job_id = contract.app.enqueue("later")
    contract.server()
    wait_until(lambda: contract.state(job_id) == "AwaitingRetry", timeout=30)
    state = contract.app.storage.get(job_id).state
    wait = (state.retry_at - datetime.now(timezone.utc)).total_seconds()
    assert 3500 < wait <= 3600 and "not yet" in state.last_exception


def test_exhausted_retries_fail_with_the_traceback_kept(contract: Contract) -> None:
    job_id = contract.app.enqueue("broken")
    contract.server()
    wait_until(lambda: contract.state(job_id) == "Failed", timeout=30)
    job = contract.app.storage.get(job_id)
    assert job.state.exception_type == "KeyError"
    assert "missing ünïcødé" in job.state.message
    assert "in broken" in job.state.stack_trace
    assert job.expires_at is not None and job.expires_at > job.state.failed_at


def test_sync_job_timeout_sets_cancelled_and_fails_the_attempt(contract: Contract) -> None:
    job_id = contract.app.enqueue("sleepy")
    contract.server()
    wait_until(lambda: contract.state(job_id) == "Failed", timeout=30)
    state = contract.app.storage.get(job_id).state
    assert state.exception_type == "qmlkit.errors.JobTimeout"
    assert "timeout of 0.2 s" in state.message


def test_async_job_timeout_cancels_and_follows_retry_policy(contract: Contract) -> None:
    job_id = contract.app.enqueue("forever")
    contract.server()
    wait_until(lambda: contract.state(job_id) == "Failed", timeout=30)
    job = contract.app.storage.get(job_id)
    assert job.attempts == 2 and job.state.retry_count == 1
    assert job.state.exception_type == "qmlkit.errors.JobTimeout"
    assert [f[0] for f in contract.lines("forever")] == ["1", "2"]


def test_scheduled_job_waits_for_its_time(contract: Contract) -> None:
    at = datetime.now(timezone.utc) + timedelta(seconds=0.5)
    job_id = contract.app.registry["tick"].schedule(at=at)
    assert contract.state(job_id) == "Scheduled"
    contract.server()
    wait_until(lambda: contract.state(job_id) == "Succeeded", timeout=30)
    (ran,) = contract.lines("tick")
    assert float(ran[0]) >= at.timestamp()


# --- field case C18: a slow job in a batch ------------------------------------------------


def warm_up(contract: Contract) -> None:
    """200 quick jobs, so that the batches grow to many jobs each."""
    contract.app.registry["quick"].enqueue_many([(i,) for i in range(200)])
    wait_until(lambda: len(contract.lines("quick")) == 200, timeout=60)


def test_jobs_claimed_behind_a_slow_job_go_to_idle_workers(contract: Contract) -> None:
    app = contract.app
    contract.server(worker_count=2, fetch_batch_size=50,
                    prefetch_window=timedelta(milliseconds=100))
    warm_up(contract)
    jobs = ([app.make_job("slow", args=["release-c18"], priority=10)]
            + [app.make_job("quick", args=[1000 + i]) for i in range(20)])
    app.enqueue_jobs(jobs)
    # all 20 finish while the slow job is still running
    wait_until(lambda: len(contract.lines("quick")) == 220, timeout=30)
    assert contract.state(jobs[0].id) == "Processing"
    contract.release("release-c18")
    wait_until(lambda: contract.state(jobs[0].id) == "Succeeded", timeout=30)
    assert sorted(int(f[0]) for f in contract.lines("quick")[200:]) == list(range(1000, 1020))


def test_outcomes_finished_before_a_slow_job_are_stored_while_it_runs(contract: Contract) -> None:
    app = contract.app
    contract.server(worker_count=1, fetch_batch_size=50,
                    prefetch_window=timedelta(milliseconds=100))
    warm_up(contract)
    jobs = ([app.make_job("quick", args=[1000 + i], priority=10) for i in range(5)]
            + [app.make_job("slow", args=["release-c18"])])
    app.enqueue_jobs(jobs)
    # one batch: five quick jobs, then the slow one; the five show as done meanwhile
    wait_until(lambda: all(contract.state(j.id) == "Succeeded" for j in jobs[:5]), timeout=30)
    # The slow job cannot end before its release: it is Processing, or (a pool whose
    # one slot claims one job at a time: asyncio) about to be claimed, never Succeeded.
    wait_until(lambda: contract.state(jobs[5].id) == "Processing", timeout=30)
    contract.release("release-c18")
    wait_until(lambda: contract.state(jobs[5].id) == "Succeeded", timeout=30)


# --- stop and restart ---------------------------------------------------------------------


def test_stop_waits_for_inflight_job_to_complete(contract: Contract) -> None:
    job_id = contract.app.enqueue("sleeper")
    server = contract.server(worker_count=1)
    wait_until(lambda: contract.lines("started"), timeout=30)
    server.stop()
    assert contract.state(job_id) == "Succeeded" and not server.aborted


def test_context_stopping_fires_on_stop_and_job_may_finish(contract: Contract) -> None:
    job_id = contract.app.enqueue("cooperative")
    server = contract.server(worker_count=1)
    wait_until(lambda: contract.lines("started"), timeout=30)
    server.stop()
    assert contract.app.storage.get(job_id).state.result == "saw stop"


def test_grace_period_expiry_releases_the_job_without_using_a_retry(contract: Contract) -> None:
    job_id = contract.app.enqueue("stuck")
    server = contract.server(worker_count=1)
    wait_until(lambda: contract.lines("started"), timeout=30)
    began = time.monotonic()
    server.stop(timeout=0.2)
    assert time.monotonic() - began < 10  # the stuck job gets 30 s: it was not waited for
    job = contract.app.storage.get(job_id)
    assert job.state.name == "Enqueued" and job.retry_count == 0
    assert "released" in job.state.reason
    assert server.aborted


def test_restart_after_stop_processes_new_jobs(contract: Contract) -> None:
    server = contract.server()
    server.stop()
    job_id = contract.app.enqueue("ping")
    server.start()
    wait_until(lambda: contract.state(job_id) == "Succeeded", timeout=30)
    assert contract.app.storage.get(job_id).state.result == "pong"
