"""The server's background duties end to end: recurring ticks, cleanup, heartbeats.

Field cases C01, C02, C03, C04 and C17, on the real SQLite file (shared by several
servers or processes) and, where one process suffices, on memory storage too.
"""

from __future__ import annotations

import importlib.util
import itertools
import json
import os
import signal
import subprocess
import sys
import textwrap
import threading
from collections import Counter
from datetime import datetime, timedelta
from pathlib import Path

import pytest

from qmlkit import App, Server, Succeeded
from qmlkit.errors import StaleClaim
from qmlkit.job import utcnow
from qmlkit.storage.base import Transition
from qmlkit.testing import wait_for_count, wait_until
from tests.conftest import backend_plugins

FAST = {"polling_interval": timedelta(milliseconds=50), "log_attempts": False,
        "scheduler_poll_interval": timedelta(milliseconds=100)}


def beat(**extra: object) -> dict[str, object]:
    """Settings for servers with quick heartbeats (0.2 s) and a 1.5 s dead timeout."""
    return {**FAST, "enable_heartbeat": True, "heartbeat_interval": timedelta(seconds=0.2),
            "dead_server_timeout": timedelta(seconds=1.5), **extra}


# --- recurring: exactly once per tick across servers (C04) -------------------------------------


def test_three_servers_materialise_each_tick_exactly_once(tmp_path: Path) -> None:
    url = f"sqlite:///{tmp_path / 'q.db'}"
    apps = [App(f"s{i}", storage=url, autoload=False) for i in range(3)]
    for app in apps:
        app.job(name="tick")(lambda: None)
    apps[0].schedule_recurring("every-second", "* * * * * *", "tick")
    servers = [app.server(**FAST, server_name=f"s{i}", worker_count=1,
                          recurring_poll_interval=timedelta(milliseconds=100))
               for i, app in enumerate(apps)]
    for server in servers:
        server.start()
    try:
        wait_until(lambda: len(apps[0].storage.list_jobs(limit=1000)) >= 5, timeout=20)
    finally:
        for server in servers:
            server.stop()
    jobs = apps[0].storage.list_jobs(limit=1000)
    ticks = sorted(datetime.fromisoformat(j.metadata["tick"]) for j in jobs)
    # No tick twice, and none skipped between the first and the last.
    assert len(ticks) == len(set(ticks)) >= 5
    assert all(b - a == timedelta(seconds=1) for a, b in itertools.pairwise(ticks))
    assert {j.state.name for j in jobs} <= {"Succeeded", "Enqueued", "Processing"}
    for app in apps:
        app.close()


def test_missed_ticks_after_downtime_fire_once(backend_url: str) -> None:
    app = App("down", storage=backend_url, autoload=False,
              plugins=backend_plugins(backend_url))
    app.job(name="tick")(lambda: None)
    template = app.schedule_recurring("minutely", "* * * * *", "tick")
    # The servers were down for ten minutes: the stored schedule is ten ticks behind.
    began = utcnow()
    behind = template.model_copy(update={"next_run_at": began - timedelta(minutes=10)})
    app.storage.upsert_recurring(behind)
    server = app.server(**FAST, recurring_poll_interval=timedelta(milliseconds=100))
    server.start()
    try:
        wait_until(lambda: app.storage.get_recurring("minutely").next_run_at > utcnow())
    finally:
        server.stop()
    # The ticks late beyond misfire_grace (60 s) fire one job between them; the one
    # tick still within the grace fires on its own (issue #17: grace before merging).
    ticks = sorted(datetime.fromisoformat(j.metadata["tick"]) for j in app.storage.list_jobs())
    grace = timedelta(seconds=60)
    assert [t for t in ticks if began - t > grace] == [behind.next_run_at]
    assert 1 <= len([t for t in ticks if began - t <= grace]) <= 2
    assert len(ticks) == len(set(ticks))
    app.close()


def test_trigger_enqueues_now_and_keeps_the_schedule(backend_url: str) -> None:
    app = App("trig", storage=backend_url, autoload=False,
              plugins=backend_plugins(backend_url))
    app.job(name="tick")(lambda: "ran")
    template = app.schedule_recurring("nightly", "0 3 * * *", "tick", args=[])
    job_id = app.trigger_recurring("nightly")
    assert app.storage.get(job_id).metadata == {"recurring_id": "nightly", "triggered": True}
    assert app.storage.get_recurring("nightly").next_run_at == template.next_run_at
    app.close()


# --- cleanup (C17) ---------------------------------------------------------------------------


def test_cleanup_removes_exactly_the_expired_rows(backend_url: str) -> None:
    app = App("ttl", storage=backend_url, autoload=False,
              plugins=backend_plugins(backend_url))

    @app.job(name="ok")
    def ok() -> None: ...

    @app.job(name="bad", max_retries=0)
    def bad() -> None:
        raise RuntimeError("x" * 100_000)

    ok.enqueue_many([()] * 1000)
    bad.enqueue_many([()] * 1000)
    server = app.server(**FAST, worker_count=2, enable_cleanup=False,
                        succeeded_ttl=timedelta(seconds=60), failed_ttl=timedelta(seconds=300))
    server.start()
    try:
        # 2,000 attempts take what the machine needs: wait as long as they progress
        wait_for_count(lambda: sum(n for (_, state), n in app.storage.count_jobs().items()
                                   if state in ("Succeeded", "Failed")), 2000)
    finally:
        server.stop()
    assert app.storage.count_jobs() == {("default", "Succeeded"): 1000,
                                        ("default", "Failed"): 1000}
    failed = app.storage.list_jobs(state="Failed", limit=1)[0]
    assert len(failed.state.message) < 70_000  # error text is capped
    # Jobs that must survive: queued, scheduled, running, and a recent success.
    app.job(name="later")(lambda: None)
    waiting = app.enqueue("later")
    scheduled = app.enqueue("later", delay=3600)
    running = app.enqueue("later")
    (claimed,) = app.storage.claim(worker_id="w", server_name="s", queues=(), limit=1,
                                   now=utcnow())
    assert claimed.id == waiting or claimed.id == running
    now = utcnow()
    # Two minutes on: the successes have expired, the failures not yet.
    while app.storage.delete_expired(now=now + timedelta(minutes=2), limit=300) == 300:
        pass
    assert app.storage.count_jobs().get(("default", "Succeeded"), 0) == 0
    assert app.storage.count_jobs()[("default", "Failed")] == 1000
    # Ten minutes on: the failures too; nothing else.
    while app.storage.delete_expired(now=now + timedelta(minutes=10), limit=300) == 300:
        pass
    assert sorted(app.storage.count_jobs().items()) == [
        (("default", "Enqueued"), 1), (("default", "Processing"), 1),
        (("default", "Scheduled"), 1)]
    assert app.storage.get(scheduled) is not None
    app.close()


def test_deleted_jobs_expire_by_their_ttl(backend_url: str) -> None:
    app = App("del", storage=backend_url, autoload=False,
              plugins=backend_plugins(backend_url))
    app.job(name="x")(lambda: None)
    gone, kept = app.enqueue("x"), app.enqueue("x")
    app.delete(gone, ttl=timedelta(seconds=30))
    app.delete(kept, ttl=None)
    assert app.storage.delete_expired(now=utcnow() + timedelta(minutes=1)) == 1
    assert app.storage.get(gone) is None and app.storage.get(kept).state.name == "Deleted"
    app.close()


# --- heartbeats and reclaim ----------------------------------------------------------------------


def write_app(tmp_path: Path, body: str) -> None:
    (tmp_path / "dutyapp.py").write_text(textwrap.dedent(f"""
        import time
        from pathlib import Path
        from qmlkit import App
        app = App("dutyapp", storage="sqlite:///{tmp_path / 'q.db'}")
        MARKS = Path({str(tmp_path)!r})
    """) + textwrap.dedent(body))


def load_app(tmp_path: Path) -> App:
    """Import the test's app module from its file, under a name of its own."""
    spec = importlib.util.spec_from_file_location(f"dutyapp_{tmp_path.name}",
                                                  tmp_path / "dutyapp.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.app


def start_worker(tmp_path: Path, *flags: str) -> subprocess.Popen[bytes]:
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(tmp_path), os.environ.get(
        "PYTHONPATH", "")])}
    return subprocess.Popen(
        [sys.executable, "-m", "qmlkit.cli", "worker", "dutyapp:app", "--heartbeat",
         "--heartbeat-interval", "0.2", "--dead-server-timeout", "1.5",
         "--polling-interval", "0.05", *flags],
        cwd=tmp_path, env=env, stderr=open(tmp_path / "worker.err", "ab"))


POOLS = pytest.mark.parametrize("pool", ["threads", "asyncio"])


@POOLS
def test_killed_worker_job_is_reclaimed_and_its_zombie_write_rejected(tmp_path: Path,
                                                                      pool: str) -> None:
    write_app(tmp_path, """
        @app.job(name="slow")
        def slow(tag):
            (MARKS / f"start-{tag}-{time.time_ns()}").touch()
            time.sleep(2)
            return tag
    """)
    app = load_app(tmp_path)
    job_id = app.enqueue("slow", args=["a"])
    victim = start_worker(tmp_path, "--pool", pool)
    try:
        wait_until(lambda: app.storage.get(job_id).state.name == "Processing", timeout=20)
        claimed = app.storage.get(job_id)
        victim.send_signal(signal.SIGKILL)
        victim.wait(10)
        (dead,) = app.storage.list_servers()  # its last heartbeat, stored before the kill
    finally:
        if victim.poll() is None:
            victim.kill()
    rescuer = app.server(**beat(), worker_count=1, pool=pool)
    rescuer.start()
    rescuer_id = rescuer.server_id
    try:
        wait_until(lambda: app.storage.get(job_id).state.name == "Succeeded", timeout=20)
    finally:
        rescuer.stop()
    done = app.storage.get(job_id)
    # Reclaimed by the rescuer's dead-server scan (not by a start-time sweep: the job is
    # younger than stale_processing_after), only once the dead server's last heartbeat
    # was 1.5 s old, and run again by the rescuer. (How much later depends on the load.)
    rerun = [s for s in app.storage.job_history(job_id) if s.name == "Processing"][-1]
    assert rerun.server_name == rescuer_id != dead.id
    assert rerun.started_at - dead.last_heartbeat >= timedelta(seconds=1.5)
    assert done.attempts == 2 and done.retry_count == 0
    # The killed server's late result, replayed with its old fencing token, is rejected.
    with pytest.raises(StaleClaim):
        app.storage.transition(Transition(claimed, Succeeded(succeeded_at=utcnow(),
                                                             duration_ms=1, result="zombie")))
    assert app.storage.get(job_id).state.result == "a"
    assert app.storage.list_servers() == []  # the dead one was removed, the rescuer left
    app.close()


@POOLS
def test_killed_worker_running_and_prefetched_jobs_all_complete(tmp_path: Path, pool: str) -> None:
    # C01: 2 threads, 6 slow jobs, kill -9 while the first ones run; a fresh worker finishes all
    write_app(tmp_path, """
        @app.job(name="slow")
        def slow(tag):
            time.sleep(1)
            (MARKS / f"done-{tag}-{time.time_ns()}").touch()
    """)
    app = load_app(tmp_path)
    ids = [app.enqueue("slow", args=[str(i)]) for i in range(6)]
    victim = start_worker(tmp_path, "--threads", "2", "--pool", pool)
    try:
        wait_until(lambda: app.storage.count_jobs().get(("default", "Processing"), 0) == 2,
                   timeout=20)
        victim.send_signal(signal.SIGKILL)
        victim.wait(10)
    finally:
        if victim.poll() is None:
            victim.kill()
    assert len(app.storage.list_jobs(limit=100)) == 6  # nothing lost with the process
    fresh = start_worker(tmp_path, "-c", "2", "--pool", pool)
    try:
        wait_until(lambda: all(app.storage.get(i).state.name == "Succeeded" for i in ids),
                   timeout=40)
    finally:
        fresh.send_signal(signal.SIGTERM)
        assert fresh.wait(30) == 0
    jobs = [app.storage.get(i) for i in ids]
    assert all(j.retry_count == 0 and j.attempts <= 2 for j in jobs)  # interrupted != failed
    done = Counter(p.name.split("-")[1] for p in tmp_path.glob("done-*"))
    assert set(done) == {str(i) for i in range(6)}
    app.close()


@POOLS
def test_long_job_of_a_live_server_runs_once(tmp_path: Path, pool: str) -> None:
    # C03: a job longer than the dead-server timeout and the stranded threshold, on a
    # server that keeps heartbeating, is never taken by a peer or a newly started server.
    url = f"sqlite:///{tmp_path / 'q.db'}"
    runs: list[str] = []
    release = threading.Event()

    def make(name: str) -> App:
        app = App(name, storage=url, autoload=False)

        @app.job(name="long")
        def long() -> None:
            runs.append(name)
            release.wait(6)

        return app

    first = make("first")
    job_id = first.enqueue("long")
    owner = first.server(**beat(stale_processing_after=timedelta(seconds=0.5)),
                         server_name="owner", worker_count=1, pool=pool)
    owner.start()
    peers: list[Server] = []
    try:
        wait_until(lambda: runs == ["first"])
        # A peer runs alongside, and another one starts long after the job began.
        for name in ("peer", "late"):
            app = make(name)
            peer = app.server(**beat(stale_processing_after=timedelta(seconds=0.5)),
                              server_name=name, worker_count=1, pool=pool)
            peer.start()
            peers.append(peer)
            # Time passing is what is under test: longer than the dead-server timeout.
            threading.Event().wait(2.0)
        release.set()
        wait_until(lambda: first.storage.get(job_id).state.name == "Succeeded")
    finally:
        release.set()
        for server in (*peers, owner):
            server.stop()
    assert runs == ["first"]
    assert first.storage.get(job_id).attempts == 1
    first.close()


def test_not_yet_due_job_runs_once_with_two_servers(backend_url: str) -> None:
    # C02: a delayed job is not held under any lease before it is due
    ran: list[str] = []
    app = App("c02", storage=backend_url, autoload=False,
              plugins=backend_plugins(backend_url))

    @app.job(name="later")
    def later() -> None:
        ran.append("x")

    job_id = app.enqueue("later", delay=1.5)
    servers = [app.server(**beat(), server_name=f"s{i}", worker_count=2) for i in range(2)]
    for server in servers:
        server.start()
    try:
        wait_until(lambda: app.storage.get(job_id).state.name == "Succeeded", timeout=15)
        # Time passing is what is under test: past a dead-server timeout, no second run.
        threading.Event().wait(2.0)
    finally:
        for server in servers:
            server.stop()
    assert ran == ["x"] and app.storage.get(job_id).attempts == 1
    app.close()


def test_servers_command_lists_live_and_dead_servers(tmp_path: Path) -> None:
    from click.testing import CliRunner

    from qmlkit.cli import main
    from qmlkit.storage.base import ServerInfo

    url = f"sqlite:///{tmp_path / 'q.db'}"
    app = App("srv", storage=url, autoload=False)
    now = utcnow()
    for sid, age in (("alive#1", 1), ("dead#2", 600)):
        beat_at = now - timedelta(seconds=age)
        app.storage.register_server(ServerInfo(id=sid, name=sid.split("#")[0], worker_count=3,
                                               queues=["default"], started_at=beat_at,
                                               last_heartbeat=beat_at))
    result = CliRunner().invoke(main, ["servers", "--storage", url, "--json"])
    assert result.exit_code == 0, result.output
    rows = {r["id"]: r for r in map(json.loads, result.output.splitlines())}
    assert rows["alive#1"]["status"] == "live" and rows["dead#2"]["status"] == "dead"
    assert rows["alive#1"]["worker_count"] == 3
    app.close()


def test_servers_command_shows_a_workers_pool_concurrency_and_busy_slots(tmp_path: Path) -> None:
    from click.testing import CliRunner

    from qmlkit.cli import main

    write_app(tmp_path, """
        import asyncio
        @app.job(name="hold")
        async def hold():
            while not (MARKS / "go").exists():
                await asyncio.sleep(0.02)
    """)
    app = load_app(tmp_path)
    ids = [app.enqueue("hold") for _ in range(3)]
    url = f"sqlite:///{tmp_path / 'q.db'}"
    worker = start_worker(tmp_path, "--pool", "asyncio", "-c", "7")

    def rows() -> list[dict[str, object]]:
        result = CliRunner().invoke(main, ["servers", "--storage", url, "--json"])
        assert result.exit_code == 0, result.output
        return [json.loads(line) for line in result.output.splitlines()]

    try:
        (row,) = wait_until(lambda: [r for r in rows() if r["busy"] == 3], timeout=30)
        assert row["pool"] == "asyncio" and row["worker_count"] == 7
        table = CliRunner().invoke(main, ["servers", "--storage", url]).output
        assert "asyncio" in table and "busy" in table
        (tmp_path / "go").touch()
        wait_until(lambda: all(app.storage.get(i).state.name == "Succeeded" for i in ids),
                   timeout=30)
    finally:
        (tmp_path / "go").touch()
        worker.send_signal(signal.SIGTERM)
        assert worker.wait(30) == 0
    app.close()


def test_reregistering_while_servers_fire_never_freezes_the_schedule(tmp_path: Path) -> None:
    url = f"sqlite:///{tmp_path / 'q.db'}"
    apps = [App(f"r{i}", storage=url, autoload=False) for i in range(3)]
    for app in apps:
        app.job(name="tick")(lambda: None)
    apps[0].schedule_recurring("every", "* * * * * *", "tick")
    servers = [apps[i].server(**FAST, server_name=f"r{i}", worker_count=1,
                              recurring_poll_interval=timedelta(milliseconds=50))
               for i in range(2)]
    for server in servers:
        server.start()
    stop = threading.Event()

    def churn() -> None:  # the same schedule, registered again and again meanwhile
        while not stop.is_set():
            apps[2].schedule_recurring("every", "* * * * * *", "tick")

    churner = threading.Thread(target=churn)
    churner.start()
    try:
        wait_until(lambda: len(apps[0].storage.list_jobs(limit=1000)) >= 4, timeout=20)
    finally:
        stop.set()
        churner.join(10)
    try:
        # The schedule keeps moving once the churn stops: no tick is stuck.
        later = utcnow() + timedelta(seconds=2)
        wait_until(lambda: apps[0].storage.get_recurring("every").next_run_at > later, timeout=10)
    finally:
        for server in servers:
            server.stop()
    ticks = sorted(j.metadata["tick"] for j in apps[0].storage.list_jobs(limit=1000))
    assert len(ticks) == len(set(ticks))
    for app in apps:
        app.close()


def test_a_broken_template_does_not_hold_up_the_others(backend_url: str) -> None:
    from qmlkit import hookimpl

    class Gate:
        """Refuses jobs of method 'bad'; stamps the others, recurring ticks included."""

        @hookimpl
        def qmlkit_enqueue_middleware(self, config: dict[str, object]) -> list[object]:
            def gate(jobs, call_next):
                if any(j.method == "bad" for j in jobs):
                    raise RuntimeError("refused")
                return call_next([j.model_copy(update={"metadata": {**j.metadata, "gate": 1}})
                                  for j in jobs])

            return [gate]

    app = App("iso", storage=backend_url, autoload=False,
              plugins=[Gate(), *backend_plugins(backend_url)])
    app.job(name="bad")(lambda: None)
    app.job(name="good")(lambda: None)
    app.schedule_recurring("aaa-bad", "* * * * * *", "bad")
    app.schedule_recurring("zzz-good", "* * * * * *", "good")
    server = app.server(**FAST, recurring_poll_interval=timedelta(milliseconds=100))
    server.start()
    try:
        wait_until(lambda: len(app.storage.list_jobs(method="good")) >= 2, timeout=10)
    finally:
        server.stop()
    assert app.storage.list_jobs(method="bad") == []
    assert all(j.metadata.get("gate") == 1 for j in app.storage.list_jobs(method="good"))
    app.close()
