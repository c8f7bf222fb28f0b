"""A worker started before its storage waits for it (issue #17 item 3).

Real ``qmlkit worker`` processes against a private ``redis-server`` (never the shared
one) that starts only after the worker does.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from qmlkit import App
from qmlkit.testing import RedisProcess, skip_or_fail, wait_until

REPO_ROOT = Path(__file__).resolve().parents[2]

APP_SOURCE = '''
import os
from qmlkit import App

app = App(storage=os.environ["CONNECT_TEST_STORAGE"])


@app.job(name="add")
def add(a, b):
    return a + b
'''


@pytest.fixture
def later_redis(tmp_path: Path) -> Iterator[RedisProcess]:
    if not RedisProcess.available():
        skip_or_fail("no redis-server binary on PATH", "a missing service fails the run")
    broker = RedisProcess(tmp_path / "redis")
    (tmp_path / "redis").mkdir()
    yield broker  # not started: the test starts it
    broker.stop()


def start_worker(tmp_path: Path, url: str, *extra: str) -> tuple[subprocess.Popen[str], Path]:
    (tmp_path / "connect_app.py").write_text(APP_SOURCE)
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(
        [str(tmp_path), str(REPO_ROOT), *filter(None, [env.get("PYTHONPATH")])])
    env["CONNECT_TEST_STORAGE"] = url
    log = tmp_path / "worker.log"
    with log.open("w") as err:
        proc = subprocess.Popen(
            [sys.executable, "-m", "qmlkit.cli", "worker", "connect_app:app", "--threads", "1",
             "--polling-interval", "0.1", *extra],
            cwd=tmp_path, env=env, stdout=subprocess.DEVNULL, stderr=err, text=True)
    return proc, log


@pytest.mark.redis
def test_worker_started_before_its_storage_waits_then_runs_jobs(
    tmp_path: Path, later_redis: RedisProcess
) -> None:
    # Given a worker started while nothing listens on its storage's port
    proc, log = start_worker(tmp_path, later_redis.url, "--connect-timeout", "60")
    try:
        # Then it keeps retrying, logging each attempt, instead of exiting
        wait_until(lambda: "attempt 2" in log.read_text() or proc.poll() is not None,
                   timeout=20)
        assert proc.poll() is None, log.read_text()
        # When the storage comes up and a job is enqueued
        later_redis.start()
        client = App(storage=later_redis.url)
        job_id = client.enqueue("add", args=[2, 3])
        # Then the worker connects and runs it
        wait_until(lambda: client.storage.get(job_id).state.name == "Succeeded"
                   or proc.poll() is not None, timeout=30)
        assert client.storage.get(job_id).state.result == 5, log.read_text()
        assert "connected after" in log.read_text()
        client.close()
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=30) == 0, log.read_text()
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()


@pytest.mark.redis
def test_worker_gives_up_after_connect_timeout_naming_the_storage(
    tmp_path: Path, later_redis: RedisProcess
) -> None:
    # Given no storage at all and --connect-timeout 2
    began = time.monotonic()
    proc, log = start_worker(tmp_path, later_redis.url, "--connect-timeout", "2")
    try:
        # Then the worker exits 1 within a bounded time, naming the storage
        code = proc.wait(timeout=30)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    elapsed = time.monotonic() - began
    text = log.read_text()
    assert code == 1, text
    assert elapsed < 25, elapsed
    assert f"127.0.0.1:{later_redis.port}" in text and "connect_timeout" in text, text


@pytest.mark.redis
@pytest.mark.parametrize(("signum", "pool"), [
    (signal.SIGINT, ("--pool", "threads")), (signal.SIGTERM, ("--pool", "asyncio")),
    (signal.SIGTERM, ("--pool", "processes", "--processes", "2"))])
def test_a_signal_stops_a_worker_still_waiting_for_its_storage(
    tmp_path: Path, later_redis: RedisProcess, signum: signal.Signals, pool: tuple[str, ...]
) -> None:
    # Given a worker (or each child of a process pool) retrying an unreachable storage
    # for up to 120 s
    proc, log = start_worker(tmp_path, later_redis.url, "--connect-timeout", "120", *pool)
    try:
        wait_until(lambda: "attempt 2" in log.read_text() or proc.poll() is not None,
                   timeout=20)
        assert proc.poll() is None, log.read_text()
        # When it is told to stop (Ctrl-C, or a container's SIGTERM)
        proc.send_signal(signum)
        # Then it stops retrying and exits at once, saying why, not after connect_timeout
        code = proc.wait(timeout=15)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    text = log.read_text()
    assert code == 1, text
    assert "stopped before it could be reached" in text, text
    assert "Traceback" not in text, text
