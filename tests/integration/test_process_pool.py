"""The process pool with real child processes, on SQLite, Redis and PostgreSQL.

Each test writes an app module into its own ``tmp_path`` (unique module name; the
children import it by its ``module:attribute`` path) and runs a pool of real processes
(``App.server(pool="processes")``, or ``qmlkit worker --pool processes`` as a
subprocess). Every wait is a condition with a generous deadline; the checks are on
what is stored: no job lost (every one ends Succeeded or as the test expects), none
completed twice (at most one Succeeded in any job's history).

The faults common to every pool (kill -9 of a child and of the parent, SIGSTOP of a
child past the dead-server timeout, a storage restart mid-drain) are in
test_pool_faults.py, on every backend.
"""

from __future__ import annotations

import logging
import os
import re
import signal
import subprocess
import sys
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from types import ModuleType
from typing import Any

import pytest

from qmlkit.testing import wait_until

REPO_ROOT = Path(__file__).resolve().parents[2]

APP_MODULE = '''
import os, signal, threading, time
from qmlkit import App
{imports}
app = App("pp-test", storage={url!r}, autoload=False, plugins=[{plugins}])

@app.job(name="add")
def add(a, b):
    return a + b

@app.job(name="pid")
def pid(pause=0.0):
    time.sleep(pause)
    return os.getpid()

@app.job(name="slow", timeout=None)
def slow(seconds):
    time.sleep(seconds)
    return os.getpid()

@app.job(name="spin", timeout=1, max_retries=0)
def spin():
    while True:
        pass

@app.job(name="segv", max_retries=0)
def segv():
    # As a crash in C code: the signal lands on the job's own thread, at once
    signal.pthread_kill(threading.get_ident(), signal.SIGSEGV)

@app.job(name="segv_process", max_retries=0)
def segv_process():
    os.kill(os.getpid(), signal.SIGSEGV)  # may land on another thread of the child first

@app.job(name="exit3", max_retries=0)
def exit3():
    os._exit(3)

@app.job(name="sigkill", max_retries=0)
def sigkill():
    os.kill(os.getpid(), signal.SIGKILL)
'''

BACKENDS = [
    pytest.param("sqlite"),
    pytest.param("redis", marks=pytest.mark.redis),
    pytest.param("postgres", marks=pytest.mark.postgres),
]


def _plugin_lines(url: str) -> tuple[str, str]:
    if url.startswith("postgres"):
        return "import qmlkit_postgres.plugin", "qmlkit_postgres.plugin"
    if url.startswith("redis"):
        return "import qmlkit_redis.plugin", "qmlkit_redis.plugin"
    return "", ""


@dataclass
class PoolApp:
    """An app module on disk, imported here as the children will import it."""

    spec: str
    url: str
    folder: Path
    module: ModuleType

    @property
    def app(self) -> Any:
        return self.module.app

    def job(self, job_id: str) -> Any:
        job = self.app.storage.get(job_id)
        assert job is not None
        return job

    def state(self, job_id: str) -> str:
        return self.job(job_id).state.name

    def succeeded_once(self, job_id: str) -> bool:
        """Succeeded now, and only one Succeeded in its history (no double completion)."""
        history = self.app.storage.job_history(job_id)
        return (self.state(job_id) == "Succeeded"
                and sum(1 for s in history if s.name == "Succeeded") == 1)


def _make_app(url: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[PoolApp]:
    import importlib

    name = f"qk_pp_app_{uuid.uuid4().hex[:8]}"
    imports, plugins = _plugin_lines(url)
    (tmp_path / f"{name}.py").write_text(APP_MODULE.format(url=url, imports=imports,
                                                           plugins=plugins))
    monkeypatch.syspath_prepend(str(tmp_path))
    monkeypatch.chdir(tmp_path)
    module = importlib.import_module(name)
    made = PoolApp(f"{name}:app", url, tmp_path, module)
    yield made
    made.app.close()
    sys.modules.pop(name, None)


@pytest.fixture(params=BACKENDS)
def pool_app(request: pytest.FixtureRequest, tmp_path: Path,
             monkeypatch: pytest.MonkeyPatch) -> Iterator[PoolApp]:
    """An app module on each backend in turn."""
    url = request.getfixturevalue(f"{request.param}_url")
    yield from _make_app(url, tmp_path, monkeypatch)


@pytest.fixture
def sqlite_app(sqlite_url: str, tmp_path: Path,
               monkeypatch: pytest.MonkeyPatch) -> Iterator[PoolApp]:
    """An app module on SQLite."""
    yield from _make_app(sqlite_url, tmp_path, monkeypatch)


FAST = {"polling_interval": 0.1, "heartbeat_interval": 0.5, "scheduler_poll_interval": 0.2,
        "shutdown_timeout": 20}


@pytest.fixture
def make_pool(request: pytest.FixtureRequest) -> Iterator[Any]:
    """Builds and starts pools, stopping each at the end of the test."""
    pools: list[Any] = []

    def make(made: PoolApp, **fields: Any) -> Any:
        pool = made.app.server(pool="processes", **{**FAST, **fields})
        pool.start()
        pools.append(pool)
        wait_until(lambda: pool.strength() == pool.size, timeout=60,
                   message="children ready")
        return pool

    yield make
    for pool in pools:
        pool.stop(timeout=5)


def _pids(pool: Any) -> set[int]:
    return {c["pid"] for c in pool.children() if c["server_id"] and not c["retiring"]}


# --- hard timeout ---------------------------------------------------------------------


@pytest.mark.parametrize("pool_app", BACKENDS, indirect=True)
def test_hard_timeout_ends_runaway_def_job_and_refills_pool(pool_app: PoolApp,
                                                            make_pool: Any) -> None:
    # Given a pool of two children of two threads
    pool = make_pool(pool_app, processes=2, worker_count=2)
    before = _pids(pool)
    # When a def job in an infinite loop with timeout=1 runs
    job_id = pool_app.app.enqueue("spin")
    # Then it ends Failed as JobTimeout (max_retries=0), soon after its start
    wait_until(lambda: pool_app.state(job_id) == "Failed", timeout=30)
    history = pool_app.app.storage.job_history(job_id)
    started = next(s for s in history if s.name == "Processing").started_at
    failed = pool_app.job(job_id).state
    assert failed.exception_type.endswith("JobTimeout")
    assert "hard timeout: its child process was killed" in failed.message  # not just cancelled
    assert (failed.failed_at - started).total_seconds() < 10  # generous: 2 s when idle
    # And the pool is back to full strength with a new child
    wait_until(lambda: pool.strength() == 2 and _pids(pool) != before, timeout=30)
    assert pool.stats["timed_out"] == 1 and pool.stats["replaced"] >= 1
    # And it still runs jobs
    ids = [pool_app.app.enqueue("add", args=(i, 1)) for i in range(10)]
    wait_until(lambda: all(pool_app.succeeded_once(i) for i in ids), timeout=30)


def test_hard_timeout_releases_the_childs_other_attempts(
        sqlite_app: PoolApp, make_pool: Any, caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.INFO, logger="qmlkit.processing.pools")
    # Given one child of two threads running a 3 s job
    pool = make_pool(sqlite_app, processes=1, worker_count=2)
    slow = sqlite_app.app.enqueue("slow", args=(3,))
    wait_until(lambda: sqlite_app.state(slow) == "Processing", timeout=30)
    # When a runaway job beside it overruns its timeout
    spin = sqlite_app.app.enqueue("spin")
    wait_until(lambda: sqlite_app.state(spin) == "Failed", timeout=30)
    # Then the other attempt was released to its queue (no retry used), counted, logged
    wait_until(lambda: pool.stats["released"] >= 1, timeout=30)
    assert any("1 job(s) released to their queues" in r.getMessage() for r in caplog.records)
    history = sqlite_app.app.storage.job_history(slow)
    assert any(s.name == "Enqueued" and "released" in (s.reason or "") for s in history)
    # And it runs again and succeeds once, without using a retry
    wait_until(lambda: sqlite_app.succeeded_once(slow), timeout=30)
    assert sqlite_app.job(slow).retry_count == 0


# --- child death ----------------------------------------------------------------------


@pytest.mark.parametrize("pool_app", BACKENDS, indirect=True)
def test_segfault_fails_running_attempt_naming_signal(pool_app: PoolApp,
                                                      make_pool: Any) -> None:
    pool = make_pool(pool_app, processes=2, worker_count=2)
    job_id = pool_app.app.enqueue("segv")
    wait_until(lambda: pool_app.state(job_id) == "Failed", timeout=30)
    failed = pool_app.job(job_id).state
    assert failed.exception_type.endswith("WorkerLost")
    assert "SIGSEGV" in failed.message and "-11" in failed.message
    wait_until(lambda: pool.strength() == 2, timeout=30)
    assert pool.stats["lost"] == 1
    ids = [pool_app.app.enqueue("add", args=(i, 2)) for i in range(6)]
    wait_until(lambda: all(pool_app.succeeded_once(i) for i in ids), timeout=30)


def test_segfault_sent_to_the_process_ends_the_job_not_a_release_loop(
        sqlite_app: PoolApp, make_pool: Any) -> None:
    # os.kill(getpid(), SIGSEGV) may kill the child a moment after the job reported its
    # end: the attempt still counts as the crash's suspect, so it is not released for ever
    make_pool(sqlite_app, processes=2, worker_count=2)
    job_id = sqlite_app.app.enqueue("segv_process")
    wait_until(lambda: sqlite_app.state(job_id) in ("Failed", "Succeeded"), timeout=60)
    job = sqlite_app.job(job_id)
    if job.state.name == "Failed":
        assert job.state.exception_type.endswith("WorkerLost")
        assert "SIGSEGV" in job.state.message


@pytest.mark.parametrize(("method", "named"), [("exit3", "exit code 3"),
                                               ("sigkill", "SIGKILL")])
def test_child_exit_or_kill_fails_running_attempt(sqlite_app: PoolApp, make_pool: Any,
                                                  method: str, named: str) -> None:
    pool = make_pool(sqlite_app, processes=2, worker_count=2)
    job_id = sqlite_app.app.enqueue(method)
    wait_until(lambda: sqlite_app.state(job_id) == "Failed", timeout=30)
    failed = sqlite_app.job(job_id).state
    assert failed.exception_type.endswith("WorkerLost") and named in failed.message
    wait_until(lambda: pool.strength() == 2, timeout=30)


# --- recycling ------------------------------------------------------------------------


@pytest.mark.parametrize("pool_app", [BACKENDS[0], BACKENDS[1]], indirect=True)
def test_max_jobs_per_child_recycles_without_losing_jobs(pool_app: PoolApp,
                                                         make_pool: Any) -> None:
    pool = make_pool(pool_app, processes=2, worker_count=2, max_jobs_per_child=5)
    ids = [pool_app.app.enqueue("pid", args=(0.01,)) for _ in range(40)]
    wait_until(lambda: all(pool_app.succeeded_once(i) for i in ids), timeout=90)
    assert pool.stats["started"] >= 4  # 40 jobs at about 5 per child
    assert pool.stats["lost"] == 0 and pool.stats["timed_out"] == 0
    pids = {pool_app.job(i).state.result for i in ids}
    assert len(pids) >= 4


def test_max_memory_per_child_recycles(sqlite_app: PoolApp, make_pool: Any) -> None:
    # Any Python process is over 1 MiB: each child recycles after its first attempt
    pool = make_pool(sqlite_app, processes=2, worker_count=1, max_memory_per_child=1)
    ids = [sqlite_app.app.enqueue("pid") for _ in range(6)]
    wait_until(lambda: all(sqlite_app.succeeded_once(i) for i in ids), timeout=90)
    assert len({sqlite_app.job(i).state.result for i in ids}) >= 3
    assert pool.stats["started"] >= 4


# --- stopping -------------------------------------------------------------------------


def test_stop_drains_every_child(sqlite_app: PoolApp, make_pool: Any) -> None:
    pool = make_pool(sqlite_app, processes=2, worker_count=2)
    ids = [sqlite_app.app.enqueue("slow", args=(1.0,)) for _ in range(4)]
    wait_until(lambda: sum(c["running"] for c in pool.children()) >= 2, timeout=30)
    pool.stop()
    assert not pool.aborted and pool.children() == []
    for job_id in ids:  # running ones finished; unstarted ones were released
        assert sqlite_app.state(job_id) in ("Succeeded", "Enqueued")
    assert sqlite_app.app.storage.list_servers() == []


def test_abort_releases_running_and_unstarted(sqlite_app: PoolApp, make_pool: Any) -> None:
    pool = make_pool(sqlite_app, processes=2, worker_count=1)
    ids = [sqlite_app.app.enqueue("slow", args=(60,)) for _ in range(4)]
    wait_until(lambda: sum(c["running"] for c in pool.children()) == 2, timeout=30)
    pool.abort()
    pool.stop()
    assert pool.aborted
    assert [sqlite_app.state(i) for i in ids] == ["Enqueued"] * 4


def _worker(made: PoolApp, *extra: str) -> subprocess.Popen[bytes]:
    """``qmlkit worker --pool processes`` for the app; its output goes to worker.log."""
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(made.folder), str(REPO_ROOT)])}
    with (made.folder / "worker.log").open("wb") as log:
        return subprocess.Popen(
            [sys.executable, "-m", "qmlkit.cli", "worker", made.spec, "--pool", "processes",
             "--processes", "2", "--threads", "2", "--polling-interval", "0.1",
             "--heartbeat-interval", "0.5", *extra],
            cwd=made.folder, env=env, stdout=log, stderr=subprocess.STDOUT)


def _output(made: PoolApp) -> str:
    return (made.folder / "worker.log").read_text(errors="replace")


def _finish(made: PoolApp, proc: subprocess.Popen[bytes],
            timeout: float = 60) -> tuple[int, str]:
    try:
        proc.wait(timeout=timeout)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()
        raise
    return proc.returncode, _output(made)


def test_cli_sigterm_drains_then_exits_0(sqlite_app: PoolApp) -> None:
    proc = _worker(sqlite_app)
    try:
        wait_until(lambda: len(sqlite_app.app.storage.list_servers()) == 2, timeout=60)
        ids = [sqlite_app.app.enqueue("slow", args=(1.5,)) for _ in range(3)]
        wait_until(lambda: all(sqlite_app.state(i) == "Processing" for i in ids), timeout=30)
        proc.send_signal(signal.SIGTERM)
        code, out = _finish(sqlite_app, proc)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert code == 0, out
    assert all(sqlite_app.succeeded_once(i) for i in ids)
    assert sqlite_app.app.storage.list_servers() == []


def test_cli_parent_and_child_log_lines_share_one_format(sqlite_app: PoolApp) -> None:
    proc = _worker(sqlite_app)
    try:
        wait_until(lambda: len(sqlite_app.app.storage.list_servers()) == 2, timeout=60)
        proc.send_signal(signal.SIGTERM)
        code, out = _finish(sqlite_app, proc)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert code == 0, out
    stamped = [line for line in out.splitlines() if re.match(r"\d{4}-\d\d-\d\d ", line)]
    shape = re.compile(r"\d{4}-\d\d-\d\d \d\d:\d\d:\d\d,\d{3} (DEBUG|INFO|WARNING|ERROR) "
                       r"(child-\d+ )?[\w.]+: ")
    assert stamped and all(shape.match(line) for line in stamped), out
    assert any(" child-" in line for line in stamped), out  # a child's line, its slot named
    assert any(" child-" not in line for line in stamped), out  # and the parent's


def test_cli_second_sigterm_releases_and_exits_1(sqlite_app: PoolApp) -> None:
    proc = _worker(sqlite_app)
    try:
        wait_until(lambda: len(sqlite_app.app.storage.list_servers()) == 2, timeout=60)
        ids = [sqlite_app.app.enqueue("slow", args=(60,)) for _ in range(3)]
        wait_until(lambda: all(sqlite_app.state(i) == "Processing" for i in ids), timeout=30)
        proc.send_signal(signal.SIGTERM)
        # Two SIGTERMs sent before the first is delivered are one pending signal (the
        # kernel does not queue standard signals): send the second once it is handled
        wait_until(lambda: "draining" in _output(sqlite_app), timeout=30)
        proc.send_signal(signal.SIGTERM)
        code, out = _finish(sqlite_app, proc)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert code == 1, out
    assert [sqlite_app.state(i) for i in ids] == ["Enqueued"] * 3


# --- configuration --------------------------------------------------------------------


def test_memory_storage_is_refused(tmp_path: Path) -> None:
    from qmlkit import App, ConfigurationError

    app = App("mem", storage="memory://", autoload=False)
    with pytest.raises(ConfigurationError, match="storage_url"):
        app.server(pool="processes", app_spec="x:app")


@pytest.mark.parametrize(("field", "value"), [("processes", 0), ("max_jobs_per_child", 0),
                                              ("max_memory_per_child", -1),
                                              ("child_pool", "processes"),
                                              ("start_method", "fork")])
def test_bad_process_pool_fields_name_the_field(field: str, value: Any) -> None:
    from qmlkit import App, ConfigurationError

    app = App("bad", storage="sqlite:///unused.db", autoload=False)
    with pytest.raises(ConfigurationError, match=field):
        app.server(pool="processes", **{field: value})
