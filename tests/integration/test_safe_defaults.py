"""Issue #17: heartbeats on by default, a periodic stranded sweep, TTL zero, capped times."""

from __future__ import annotations

import threading
from datetime import timedelta

from qmlkit import App, ServerConfig
from qmlkit.cli.worker import FLAGS
from qmlkit.errors import Retry
from qmlkit.job import utcnow
from qmlkit.limits import MAX_TIMESTAMP
from qmlkit.processing import outcome
from qmlkit.processing.retry import RetryPolicy
from qmlkit.testing import make_job, wait_until

FAST = {"polling_interval": timedelta(milliseconds=50), "log_attempts": False,
        "scheduler_poll_interval": timedelta(milliseconds=100)}


def test_heartbeats_are_on_by_default_with_a_dead_timeout_within_a_minute() -> None:
    cfg = ServerConfig()
    assert cfg.enable_heartbeat is True
    assert cfg.heartbeat_interval == timedelta(seconds=5)
    assert cfg.dead_server_timeout == timedelta(seconds=30)
    app = App("defaults", storage="memory://", autoload=False)
    assert app.server().config.enable_heartbeat is True
    flag = next(row for row in FLAGS if row.field == "enable_heartbeat")
    assert flag.flag == "--heartbeat/--no-heartbeat"  # the opt-out is still there
    app.close()


def test_ttl_zero_expires_at_once_and_none_keeps() -> None:
    job = make_job()
    before = utcnow()
    done = outcome.succeeded(job, None, 1.0, ttl=timedelta(0))
    assert done.expires_at is not None and before <= done.expires_at <= utcnow()
    assert outcome.succeeded(job, None, 1.0, ttl=None).expires_at is None
    last = make_job(max_retries=0)
    gone = outcome.failed(last, ValueError("x"), RetryPolicy(), ttl=timedelta(0))
    assert gone.state.name == "Failed"
    assert gone.expires_at is not None and before <= gone.expires_at <= utcnow()


def test_huge_ttl_and_retry_delay_are_capped_to_the_storable_range() -> None:
    job = make_job(max_retries=3)
    assert outcome.succeeded(job, None, 1.0, ttl=timedelta.max).expires_at == MAX_TIMESTAMP
    for delay in (1e12, float("inf"), 1e300):
        later = outcome.failed(job, Retry(delay=delay), RetryPolicy(), ttl=None)
        assert later.state.name == "AwaitingRetry"
        assert later.state.retry_at == MAX_TIMESTAMP


def test_ttl_zero_job_is_deleted_by_the_next_cleanup(tmp_path) -> None:
    app = App("ttl0", storage=f"sqlite:///{tmp_path}/q.db", autoload=False)

    @app.job(name="quick")
    def quick() -> None:
        return None

    job_id = app.enqueue("quick")
    server = app.server(**FAST, enable_heartbeat=False, succeeded_ttl=timedelta(0),
                        cleanup_interval=timedelta(milliseconds=100))
    server.start()
    try:
        wait_until(lambda: app.storage.get(job_id) is None, timeout=10)
    finally:
        server.stop()
    app.close()


def test_a_server_without_heartbeats_sweeps_stranded_jobs_while_it_runs(tmp_path) -> None:
    app = App("sweep", storage=f"sqlite:///{tmp_path}/q.db", autoload=False)
    ran: list[str] = []

    @app.job(name="work")
    def work() -> None:
        ran.append("x")

    job_id = app.enqueue("work")
    app.storage.open()
    # A worker that was killed right after claiming: its job is Processing, no row.
    claimed = app.storage.claim(worker_id="gone:worker:0", server_name="gone",
                                queues=["default"], limit=1, now=utcnow())
    assert [j.id for j in claimed] == [job_id]
    server = app.server(**FAST, enable_heartbeat=False, server_name="sweeper",
                        stale_processing_after=timedelta(seconds=1),
                        stale_sweep_interval=timedelta(milliseconds=200))
    server.start()  # the job is too young for the sweep at start
    try:
        wait_until(lambda: app.storage.get(job_id).state.name == "Succeeded", timeout=15)
    finally:
        server.stop()
    assert ran == ["x"]
    app.close()


def test_a_job_finishing_in_a_grace_longer_than_the_dead_timeout_runs_once(tmp_path) -> None:
    # Issue #17 item 6: the heartbeat beats through the grace period, so no peer reruns it.
    url = f"sqlite:///{tmp_path}/q.db"
    beat = {**FAST, "enable_heartbeat": True, "heartbeat_interval": timedelta(seconds=0.2),
            "dead_server_timeout": timedelta(seconds=1.0),
            "shutdown_timeout": timedelta(seconds=10)}
    runs: list[str] = []
    release = threading.Event()

    def make(name: str) -> App:
        app = App("grace", storage=url, autoload=False)

        @app.job(name="long")
        def long() -> None:
            runs.append(name)
            release.wait(20)

        return app

    first, second = make("first"), make("second")
    job_id = first.enqueue("long")
    owner = first.server(**beat, server_name="owner", worker_count=1)
    owner.start()
    peer = None
    stopper = threading.Thread(target=owner.stop)
    try:
        wait_until(lambda: runs == ["first"])
        peer = second.server(**beat, server_name="peer", worker_count=1)
        peer.start()
        stopper.start()
        wait_until(lambda: owner.stopping.is_set())
        # Time passing is what is under test: the owner drains for longer than the
        # dead-server timeout while its peer scans for dead servers.
        threading.Event().wait(2.5)
        release.set()
        stopper.join(15)
        wait_until(lambda: first.storage.get(job_id).state.name == "Succeeded")
    finally:
        release.set()
        if stopper.is_alive() or not stopper.ident:
            owner.stop()
        if peer is not None:
            peer.stop()
    assert runs == ["first"]
    assert first.storage.get(job_id).attempts == 1
    first.close()
    second.close()
