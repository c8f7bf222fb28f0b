"""Push wake-ups (``push_wakeups``, qmlkit_redis.push) on the shared Redis: an idle server
polling every 30 s, with kombu wake-ups off, starts each job at once; only the first job
after a short claim publishes; a restarted Redis is subscribed to again."""

from __future__ import annotations

import time
from datetime import UTC, datetime, timedelta

import pytest
import redis

from qmlkit import App
from qmlkit.errors import ConfigurationError
from qmlkit.testing import RedisProcess, wait_until
from qmlkit_redis.storage import RedisStorage

QUIET = {"log_attempts": False, "scheduler_poll_interval": timedelta(seconds=30),
         "polling_interval": timedelta(seconds=30)}


def ping_app(url: str, started: list[float]) -> App:
    app = App("push-worker", storage=RedisStorage(url), autoload=False, wakeup_url=None)

    @app.job(name="ping")
    def ping() -> None:
        started.append(time.monotonic())

    return app


@pytest.fixture
def push_url(redis_url: str) -> str:
    return redis_url + "&push_wakeups=1"


def test_an_idle_server_polling_every_30_s_starts_each_job_at_once(push_url: str) -> None:
    started: list[float] = []
    worker = ping_app(push_url, started)
    server = worker.server(**QUIET)
    # The client has no option of its own: the storage's scripts publish for it.
    client = App("push-client", storage=RedisStorage(push_url.replace("&push_wakeups=1", "")),
                 autoload=False, wakeup_url=None)
    server.start()
    try:
        wait_until(lambda: server._push is not None and server._push.connected.is_set(),
                   timeout=15)
        # the workers' first claims came back empty: their queue is marked idle
        storage = server.storage
        assert isinstance(storage, RedisStorage)
        wait_until(lambda: storage.client.exists(storage._k("idle:default")) == 1, timeout=5)

        def pickup() -> float:
            """Seconds from one enqueue to its job's start."""
            count, sent = len(started), time.monotonic()
            client.enqueue("ping")
            wait_until(lambda: len(started) > count, timeout=10)
            return started[-1] - sent

        latencies = [pickup() for _ in range(5)]
    finally:
        server.stop()
        client.close()
        worker.close()
    # With 30 s polls, only a push can start a job within 10 s; each did.
    assert len(latencies) == 5 and max(latencies) < 10, latencies


def test_only_the_first_job_after_a_short_claim_publishes(redis_url: str,
                                                          redis_prefix: str) -> None:
    storage = RedisStorage(redis_url, push_wakeups=True)
    raw = redis.Redis.from_url("redis://127.0.0.1:6379/0")
    pubsub = raw.pubsub(ignore_subscribe_messages=True)
    pubsub.subscribe(f"{redis_prefix}wakeup")
    app = App("push-count", storage=storage, autoload=False, wakeup_url=None)
    app.job(name="noop")(lambda: None)

    def claim(on: RedisStorage, limit: int, who: str = "w") -> list[object]:
        return list(on.claim(worker_id=who, server_name=f"srv-{who}", queues=["default"],
                             limit=limit, now=datetime.now(UTC)))

    try:
        wait_until(lambda: pubsub.get_message(timeout=0.1) is None, timeout=5)
        for _ in range(3):  # no claim yet: nothing is idle, nothing is published
            app.enqueue("noop")
        assert pubsub.get_message(timeout=0.2) is None
        claimed = claim(storage, 10)
        assert len(claimed) == 3  # short of 10: the queue is marked idle
        assert raw.exists(f"{redis_prefix}idle:default") == 1
        app.enqueue("noop")
        app.enqueue("noop")  # the mark is gone: no second message
        message = pubsub.get_message(timeout=5)
        assert message is not None and message["data"] == b"default"
        assert pubsub.get_message(timeout=0.2) is None
        assert raw.exists(f"{redis_prefix}idle:default") == 0
        # a full claim leaves the queue unmarked
        assert len(claim(storage, 2)) == 2
        assert raw.exists(f"{redis_prefix}idle:default") == 0
        # a storage without the option never marks its queues
        plain = RedisStorage(redis_url)
        app.enqueue("noop")
        assert claim(plain, 10, "w2")
        assert raw.exists(f"{redis_prefix}idle:default") == 0
        plain.close()
    finally:
        pubsub.close()
        raw.close()
        app.close()


def test_a_restarted_redis_is_subscribed_to_again(own_redis: RedisProcess) -> None:
    started: list[float] = []
    url = own_redis.url + "?prefix=push:&push_wakeups=true"
    worker = ping_app(url, started)
    server = worker.server(**QUIET)
    client = App("push-client", storage=RedisStorage(url), autoload=False, wakeup_url=None)
    server.start()
    try:
        assert server._push is not None
        push = server._push
        wait_until(push.connected.is_set, timeout=15)
        own_redis.restart()
        wait_until(lambda: not push.connected.is_set(), timeout=15)
        wait_until(push.connected.is_set, timeout=30)
        # the queue is marked again by the claims the re-subscription's wake-up made
        wait_until(lambda: server.storage.client.exists("push:idle:default") == 1, timeout=10)
        client.enqueue("ping")
        wait_until(lambda: len(started) == 1, timeout=10)
    finally:
        server.stop()
        client.close()
        worker.close()


@pytest.mark.parametrize("value", ["maybe", "2"])
def test_a_bad_push_wakeups_value_is_refused_by_name(redis_url: str, value: str) -> None:
    with pytest.raises(ConfigurationError, match="push_wakeups"):
        RedisStorage(redis_url + f"&push_wakeups={value}")


def test_the_url_option_never_reaches_redis_py(redis_url: str) -> None:
    storage = RedisStorage(redis_url + "&push_wakeups=0")
    try:
        assert storage.push_wakeups is False
        assert "push_wakeups" not in storage._redis_url
        assert storage.client.ping()
    finally:
        storage.close()
