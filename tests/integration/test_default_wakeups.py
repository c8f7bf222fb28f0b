"""Wake-ups on by default (issue #16 item 5), on every backend against the real services.

A worker left at its defaults hears the storage's own channel: a job enqueued while it
is idle starts long before its 30 s poll. ``wakeup_url=None`` turns that off, and a
channel that breaks costs no job: workers poll until it is back. Behaviour tests with
generous deadlines, not speed tests (bench/wakeups.py measures).
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from datetime import timedelta
from pathlib import Path

import pytest

from qmlkit import App
from qmlkit.testing import RedisProcess, skip_or_fail, wait_until
from tests.conftest import backend_plugins

REPO_ROOT = Path(__file__).resolve().parents[2]

APP_SOURCE = '''
import os
from qmlkit import App

app = App("defaults", storage=os.environ["DEFAULT_WAKEUP_STORAGE"])  # wakeup_url left at "auto"


@app.job(name="echo")
def echo(n):
    return n
'''

#: Far below the 30 s polling interval, far above a wake-up's milliseconds.
PICKUP_DEADLINE_S = 5.0


@pytest.fixture(params=[
    pytest.param("sqlite"),
    pytest.param("redis", marks=pytest.mark.redis),
    pytest.param("postgres", marks=pytest.mark.postgres),
])
def storage_url(request: pytest.FixtureRequest) -> str:
    return str(request.getfixturevalue(f"{request.param}_url"))


def client_for(url: str, **options: object) -> App:
    return App("client", storage=url, autoload=False, plugins=backend_plugins(url),
               **options)  # type: ignore[arg-type]


@pytest.fixture
def worker_process(tmp_path: Path, storage_url: str) -> Iterator[tuple[subprocess.Popen[str], Path]]:
    """``qmlkit worker`` at its defaults but a 30 s poll, in a process of its own,
    once its wake-up listener consumes."""
    (tmp_path / "defaults_app.py").write_text(APP_SOURCE)
    env = dict(os.environ, DEFAULT_WAKEUP_STORAGE=storage_url)
    env.pop("QMLKIT_WAKEUP_URL", None)
    env["PYTHONPATH"] = os.pathsep.join(
        [str(tmp_path), str(REPO_ROOT), *filter(None, [env.get("PYTHONPATH")])])
    log = tmp_path / "worker.log"
    with log.open("w") as err:
        proc = subprocess.Popen(
            [sys.executable, "-m", "qmlkit.cli", "worker", "defaults_app:app", "--threads", "2",
             "--polling-interval", "30"],
            cwd=tmp_path, env=env, stdout=subprocess.DEVNULL, stderr=err, text=True)
    try:
        wait_until(lambda: "consuming from" in log.read_text() or proc.poll() is not None,
                   timeout=60)
        assert proc.poll() is None, log.read_text()
        yield proc, log
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=60) == 0, log.read_text()
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()


def test_a_default_worker_starts_a_job_enqueued_while_idle_long_before_its_poll(
        storage_url: str, worker_process: tuple[subprocess.Popen[str], Path]) -> None:
    client = client_for(storage_url)
    try:
        for n in range(3):  # three in a row: none can be a poll that happened to fall due
            began = time.monotonic()
            handle = client.enqueue("echo", args=[n])
            assert handle.result(timeout=PICKUP_DEADLINE_S) == n
            assert time.monotonic() - began < PICKUP_DEADLINE_S
    finally:
        client.close()
    _, log = worker_process
    assert "wake-up listener consuming from" in log.read_text()


def test_wakeup_url_none_turns_them_off_on_both_sides(storage_url: str) -> None:
    app = client_for(storage_url, wakeup_url=None)
    server = app.server(polling_interval=timedelta(seconds=30), log_attempts=False)
    server.start()
    try:
        assert app.wakeup_url is None and server.config.wakeup_url is None
        assert server._listener is None
        app.enqueue("x.job")
        assert app._publisher is None
    finally:
        server.stop()
        app.close()


def run_while_broken(storage_url: str, break_channel: object, mend_channel: object,
                     **server_options: object) -> None:
    """A default worker and client; with the channel broken, every job enqueued still
    runs (by polling), enqueues never fail; mended, the listener consumes again."""
    worker = client_for(storage_url)
    done: list[int] = []

    @worker.job(name="note")
    def note(n: int) -> None:
        done.append(n)

    server = worker.server(polling_interval=timedelta(seconds=0.5), log_attempts=False,
                           worker_count=2, **server_options)  # type: ignore[arg-type]
    client = client_for(storage_url)
    server.start()
    try:
        listener = server._listener
        assert listener is not None
        wait_until(listener.connected.is_set, timeout=30)
        client.enqueue("note", args=[-1])  # the client's publisher is up before the break
        wait_until(lambda: -1 in done, timeout=30)
        break_channel()  # type: ignore[operator]
        for n in range(10):
            client.enqueue("note", args=[n])
        wait_until(lambda: sorted(done) == list(range(-1, 10)), timeout=30)
        mend_channel()  # type: ignore[operator]
        wait_until(lambda: listener.state == "consuming", timeout=30)
        client.enqueue("note", args=[10])
        wait_until(lambda: 10 in done, timeout=30)
    finally:
        server.stop()
        client.close()
        worker.close()


def test_sqlite_folder_gone_unusable_costs_no_job_and_comes_back(sqlite_url: str) -> None:
    folder = Path(sqlite_url.removeprefix("sqlite:///") + "-wakeup")

    def break_channel() -> None:  # the folder replaced by a file: it cannot be re-made
        blocker = folder.with_name("blocker")
        blocker.write_text("not a folder")
        for n in range(100):  # a listener reconnecting may re-make it meanwhile: again
            if folder.is_dir():
                folder.rename(folder.with_name(f"gone-{n}"))  # whatever is written in it
            try:
                os.rename(blocker, folder)
                return
            except OSError:
                continue
        raise AssertionError("the wake-up folder kept coming back")

    def mend_channel() -> None:  # the listener re-makes the folder when it reconnects
        folder.unlink()

    run_while_broken(sqlite_url, break_channel, mend_channel)
    assert (folder / "data").is_dir()
    assert not list((folder / "data").iterdir())  # every message consumed


@pytest.fixture
def own_redis(tmp_path: Path) -> Iterator[RedisProcess]:
    if not RedisProcess.available():
        skip_or_fail("no redis-server binary on PATH", "a missing service fails the run")
    (tmp_path / "redis").mkdir()
    server = RedisProcess(tmp_path / "redis")
    server.start()
    yield server
    server.stop()


@pytest.mark.redis
def test_redis_channel_refused_while_the_storage_works_costs_no_job(
        own_redis: RedisProcess) -> None:
    import redis

    admin = redis.Redis.from_url(own_redis.url)

    def break_channel() -> None:  # pub/sub denied, keys and scripts still allowed
        admin.execute_command("ACL", "SETUSER", "default", "resetchannels")
        admin.execute_command("CLIENT", "KILL", "TYPE", "pubsub")

    def mend_channel() -> None:
        admin.execute_command("ACL", "SETUSER", "default", "allchannels")

    try:
        run_while_broken(f"{own_redis.url}?prefix=broken:", break_channel, mend_channel)
    finally:
        admin.close()


@pytest.mark.postgres
def test_postgres_listener_killed_over_and_over_costs_no_job(postgres_url: str) -> None:
    import psycopg

    schema = postgres_url.rpartition("schema=")[2]
    stop = threading.Event()

    def kill_listeners() -> None:  # this test's listener only: its LISTEN names the schema
        with psycopg.connect("postgresql://127.0.0.1:5432/test", autocommit=True) as admin:
            while not stop.wait(0.05):
                admin.execute("SELECT pg_terminate_backend(pid) FROM pg_stat_activity "
                              "WHERE query LIKE %s", (f'%LISTEN "x:qmlkit.wakeup.{schema}"%',))

    killer = threading.Thread(target=kill_listeners, daemon=True)
    try:
        run_while_broken(postgres_url, killer.start, stop.set)
    finally:
        stop.set()
        if killer.is_alive():
            killer.join(5)
