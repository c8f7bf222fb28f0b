"""Redis going away and coming back under a running worker (field case C09).

Each test runs a ``redis-server`` of its own with an append-only file (so a restart keeps
the data, as a production Redis would), drives a real qmlkit ``Server`` against it, and
restarts that Redis while jobs are being claimed and acknowledged. Every job must end
Succeeded, and must have run exactly once: an acknowledgement whose reply was lost is
replayed idempotently, a claim whose reply was lost is handed back on the next claim.
"""

from __future__ import annotations

import logging
import threading
from collections import Counter
from collections.abc import Iterator

import pytest

from qmlkit import App
from qmlkit.testing import RedisProcess, wait_until

pytestmark = [pytest.mark.slow]

JOBS = 5000


class Runs:
    """Counts executions per argument, thread-safely."""

    def __init__(self) -> None:
        self.counts: Counter[int] = Counter()
        self.lock = threading.Lock()

    def add(self, i: int) -> None:
        with self.lock:
            self.counts[i] += 1

    def total(self) -> int:
        with self.lock:
            return sum(self.counts.values())


class OutageLog(logging.Handler):
    """Counts the warnings a server logs when a storage call fails."""

    def __init__(self) -> None:
        super().__init__(logging.WARNING)
        self.failures = 0

    def emit(self, record: logging.LogRecord) -> None:
        if "failed" in record.getMessage():
            self.failures += 1


@pytest.fixture
def outage_log() -> Iterator[OutageLog]:
    handler = OutageLog()
    logger = logging.getLogger("qmlkit.processing.server")
    logger.addHandler(handler)
    yield handler
    logger.removeHandler(handler)


def make_app(url: str, runs: Runs, retry_timeout_s: float) -> App:
    app = App("outage", storage=url, storage_options={"retry_timeout_s": retry_timeout_s})

    @app.job(name="count")
    def count(i: int) -> None:
        runs.add(i)

    return app


def succeeded(app: App) -> int:
    return app.storage.count_jobs().get(("default", "Succeeded"), 0)


def drain_with_restarts(own_redis: RedisProcess, restarts: int) -> None:
    runs = Runs()
    url = f"{own_redis.url}?prefix=outage:"
    app = make_app(url, runs, retry_timeout_s=2.0)
    app.registry["count"].enqueue_many([(i,) for i in range(JOBS)])
    server = app.server(worker_count=4, polling_interval=0.05, enable_cleanup=False,
                        log_attempts=False)
    server.start()
    try:
        wait_until(lambda: runs.total() >= 1000, timeout=120, message="first 1,000 jobs")
        at_restart = runs.total()
        for _ in range(restarts):  # back to back: the second within a second of the first
            own_redis.restart()
        assert at_restart < JOBS, "the restart must happen mid-drain"
        wait_until(lambda: succeeded(app) == JOBS, timeout=180,
                   message=f"all {JOBS} jobs Succeeded after {restarts} restart(s)")
    finally:
        server.stop()
    assert len(runs.counts) == JOBS
    assert set(runs.counts.values()) == {1}, {i: n for i, n in runs.counts.items() if n != 1}
    assert app.storage.count_jobs() == {("default", "Succeeded"): JOBS}
    app.close()


def test_drain_of_5000_jobs_survives_a_redis_restart_exactly_once(own_redis):
    drain_with_restarts(own_redis, restarts=1)


def test_drain_survives_two_redis_restarts_in_quick_succession_c09(own_redis):
    drain_with_restarts(own_redis, restarts=2)


def test_worker_keeps_consuming_after_each_restart_c09(own_redis, outage_log):
    # C09: complete 1 job; stop Redis until the worker has noticed; start it; enqueue 10
    # more; three times, the last two restarts back to back.
    runs = Runs()
    url = f"{own_redis.url}?prefix=c09:"
    app = make_app(url, runs, retry_timeout_s=0.5)
    count = app.registry["count"]
    server = app.server(worker_count=2, polling_interval=0.05, enable_cleanup=False)
    server.start()
    try:
        count.enqueue(0)
        wait_until(lambda: succeeded(app) == 1, timeout=30)
        expected = 1
        for round_no in range(3):
            seen = outage_log.failures
            own_redis.stop()
            wait_until(lambda s=seen: outage_log.failures > s, timeout=60,
                       message="the worker notices Redis is gone")
            own_redis.start()
            if round_no == 2:
                own_redis.restart()  # a second restart right after the first
            count.enqueue_many([(expected + k,) for k in range(10)])
            expected += 10
            wait_until(lambda e=expected: succeeded(app) == e, timeout=60,
                       message=f"{expected} jobs done after restart {round_no + 1}")
    finally:
        server.stop()
    assert set(runs.counts.values()) == {1} and len(runs.counts) == 31
    app.close()
