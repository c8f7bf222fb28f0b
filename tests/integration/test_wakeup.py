"""Wake-ups over kombu against real brokers on loopback (field cases C09, C16)."""

from __future__ import annotations

import logging
import re
import socket
import threading
import time
import uuid
from collections import Counter
from collections.abc import Iterator
from datetime import timedelta
from pathlib import Path

import pytest

from qmlkit import App
from qmlkit.testing import RedisProcess, free_port, require_service, skip_or_fail, wait_until
from qmlkit.wakeup import WakeupListener, WakeupPublisher
from tests.conftest import RUN_ID

QUIET = {"log_attempts": False, "scheduler_poll_interval": timedelta(seconds=30)}


@pytest.fixture
def exchange() -> Iterator[str]:
    """A fanout exchange of this test's own on the shared broker, deleted afterwards
    (RabbitMQ keeps exchanges that are not auto-delete; Redis keeps nothing)."""
    name = f"qmlkit.test.{RUN_ID}.{uuid.uuid4().hex[:6]}"
    yield name
    try:
        socket.create_connection(("127.0.0.1", 5672), timeout=0.5).close()
    except OSError:
        return
    from kombu import Connection, Exchange

    with Connection("amqp://guest:guest@127.0.0.1:5672//", connect_timeout=2) as conn:
        try:
            Exchange(name, type="fanout").bind(conn.default_channel).delete()
        except Exception:
            pass


@pytest.fixture(params=[
    pytest.param("filesystem"),
    pytest.param("redis", marks=pytest.mark.redis),
    pytest.param("amqp", marks=pytest.mark.rabbitmq),
])
def wakeup_url(request: pytest.FixtureRequest, tmp_path: Path) -> str:
    if request.param == "redis":
        require_service("Redis", "127.0.0.1", 6379)
        return "redis://127.0.0.1:6379/0"
    if request.param == "amqp":
        require_service("RabbitMQ", "127.0.0.1", 5672)
        return "amqp://guest:guest@127.0.0.1:5672//"
    return f"filesystem://{tmp_path / 'wakeups'}"


def start_times(app: App) -> list[float]:
    started: list[float] = []

    @app.job(name="ping")
    def ping() -> None:
        started.append(time.monotonic())

    return started


def test_idle_worker_polling_every_30_s_starts_a_job_within_a_second(
    wakeup_url: str, exchange: str, sqlite_url: str
) -> None:
    worker_app = App("worker", storage=sqlite_url, autoload=False, wakeup_url=wakeup_url,
                     wakeup_exchange=exchange)
    started = start_times(worker_app)
    server = worker_app.server(**QUIET, polling_interval=timedelta(seconds=30))
    # A client in another App (as another process would be): no in-process shortcut.
    client = App("client", storage=sqlite_url, autoload=False, wakeup_url=wakeup_url,
                 wakeup_exchange=exchange)
    server.start()
    try:
        wait_until(lambda: server._listener.connected.is_set(), timeout=15)
        wait_until(lambda: not started, timeout=1)  # the first poll has passed
        latencies = []
        for _ in range(5):
            before = len(started)
            sent = time.monotonic()
            client.enqueue("ping")
            wait_until(lambda before=before: len(started) > before, timeout=1.0)
            latencies.append(started[-1] - sent)
    finally:
        server.stop()
        client.close()
        worker_app.close()
    assert max(latencies) < 1.0, latencies


def test_wakeup_for_a_queue_the_server_does_not_serve_wakes_nobody(
    wakeup_url: str, exchange: str, sqlite_url: str
) -> None:
    app = App("only-a", storage=sqlite_url, autoload=False, wakeup_url=wakeup_url,
              wakeup_exchange=exchange)
    server = app.server(**QUIET, queues=("a",), polling_interval=timedelta(seconds=30))
    server.start()
    publisher = WakeupPublisher(wakeup_url, exchange)
    try:
        wait_until(lambda: server._listener.connected.is_set(), timeout=15)
        seen = server._idle.seq
        received = server._listener.received
        publisher.publish(["b"])
        wait_until(lambda: server._listener.received > received, timeout=5)
        assert server._idle.seq == seen  # heard, and ignored
        publisher.publish(["a"])
        wait_until(lambda: server._idle.seq > seen, timeout=5)
    finally:
        publisher.close()
        server.stop()
        app.close()


def settled(server: object, workers: int) -> bool:
    """Whether all ``workers`` wait for a wake-up and none has been woken yet.

    ``idle_workers`` alone is not that: a worker that was notified still counts as idle
    until it gets the CPU back and leaves its wait, so under load the test saw "8 idle"
    with a whole wake-up's claims still to come. ``waiting_workers`` counts only the
    ones not yet woken.
    """
    return server.idle_workers == workers and server.waiting_workers == workers  # type: ignore[attr-defined]


def test_one_job_wakes_one_worker_and_a_burst_fans_out_over_all(
    wakeup_url: str, exchange: str, sqlite_url: str
) -> None:
    # Waking every idle thread for one job costs each of them a claim; a worker whose
    # claim came back full passes the wake-up on, so a burst still reaches them all.
    worker_app = App("herd", storage=sqlite_url, autoload=False, wakeup_url=wakeup_url,
                     wakeup_exchange=exchange)
    release = threading.Event()
    running: set[int] = set()
    lock = threading.Lock()

    @worker_app.job(name="hold")
    def hold(i: int) -> None:
        with lock:
            running.add(i)
        release.wait(30)

    worker_app.job(name="ping")(lambda: None)
    server = worker_app.server(**QUIET, worker_count=8, polling_interval=timedelta(seconds=30))
    claims = [0]
    claim = server.storage.claim

    def counted(**kwargs: object) -> object:
        claims[0] += 1
        return claim(**kwargs)

    server.storage.claim = counted  # type: ignore[method-assign]
    client = App("client", storage=sqlite_url, autoload=False, wakeup_url=wakeup_url,
                 wakeup_exchange=exchange)
    server.start()
    try:
        # connected: the listener's connect-time "look now" has been sent; settled: it
        # and every claim it caused are over, so none of them is counted below
        wait_until(lambda: server._listener.connected.is_set(), timeout=15)
        wait_until(lambda: settled(server, 8), timeout=10)
        for _ in range(3):
            before = claims[0]
            job_id = client.enqueue("ping")
            wait_until(lambda job_id=job_id: client.storage.get(job_id).state.name
                       == "Succeeded", timeout=5)
            wait_until(lambda: settled(server, 8), timeout=10)
            # the woken worker's claim, the one it passed the wake-up to, and its own
            # next (empty) claim after the job: never one per worker
            assert claims[0] - before <= 3, claims[0] - before
        for i in range(8):
            client.enqueue("hold", args=[i])
        wait_until(lambda: len(running) == 8, timeout=10)  # all eight at once
    finally:
        release.set()
        server.stop()
        client.close()
        worker_app.close()


def test_a_burst_of_enqueues_sends_few_messages(tmp_path: Path, sqlite_url: str) -> None:
    app = App("burst", storage=sqlite_url, autoload=False,
              wakeup_url=f"filesystem://{tmp_path / 'wk'}")
    from qmlkit.wakeup import COALESCE_S

    app.job(name="noop")(lambda: None)
    began = time.monotonic()
    for i in range(2000):
        app.enqueue("noop", queue=f"q{i % 3}")  # new names notify the sender mid-pause
    publisher = app._publisher
    assert publisher is not None
    wait_until(lambda: not publisher._pending, timeout=10)
    elapsed = time.monotonic() - began
    app.close()
    # One message per COALESCE_S at most, however long the loop took: the loop's speed
    # (a loaded machine enqueues slower) sets how many that is, not the coalescing.
    assert 1 <= publisher.sent <= elapsed / COALESCE_S + 1, (publisher.sent, elapsed)


def test_bad_wakeup_url_fails_at_configuration_naming_it() -> None:
    from qmlkit.errors import ConfigurationError

    with pytest.raises(ConfigurationError, match="gopher://x"):
        App("bad", storage="memory://", autoload=False, wakeup_url="gopher://x")


@pytest.mark.parametrize(("url", "names"), [
    # a typo that drops a slash or the scheme would reach kombu as an AMQP host name
    ("redis:/127.0.0.1:6379/0", "is not a URL: give scheme://"),
    ("127.0.0.1:6379", "is not a URL"),
    ("redis://127.0.0.1:6379/abc", "the database 'abc' is not a number"),
    ("redis://127.0.0.1:63x9/0", "the port is not a number"),
    ("rabbitmq://guest:guest@127.0.0.1:5672//", "RabbitMQ URLs start with amqp://"),
])
def test_mistyped_wakeup_urls_fail_at_configuration_naming_the_bad_part(
    url: str, names: str
) -> None:
    from qmlkit.errors import ConfigurationError

    with pytest.raises(ConfigurationError, match=re.escape(names)):
        App("bad", storage="memory://", autoload=False, wakeup_url=url)


def test_wakeup_url_errors_mask_the_password() -> None:
    from qmlkit.errors import ConfigurationError

    for url in ("ampq://app:S3cret@127.0.0.1:5672//", "redis://:S3cret@127.0.0.1:6379/x"):
        with pytest.raises(ConfigurationError) as info:
            App("bad", storage="memory://", autoload=False, wakeup_url=url)
        assert "S3cret" not in str(info.value) and "***" in str(info.value)


def test_closing_before_an_unreachable_broker_answers_says_so(
    caplog: pytest.LogCaptureFixture
) -> None:
    # a one-shot `qmlkit enqueue` must not drop its wake-up silently
    caplog.set_level(logging.WARNING, logger="qmlkit.wakeup")
    with socket.socket() as silent:  # accepts connections, never answers
        silent.bind(("127.0.0.1", 0))
        silent.listen(8)
        port = silent.getsockname()[1]
        publisher = WakeupPublisher(f"redis://:S3cret@127.0.0.1:{port}/0", "qmlkit.test.mute")
        publisher.publish(["default"])
        publisher.close()
    messages = [r.getMessage() for r in caplog.records if r.name == "qmlkit.wakeup"]
    assert any("closing before a wake-up reached" in m for m in messages), messages
    assert not any("S3cret" in m for m in messages)


def test_filesystem_messages_are_never_read_half_written(tmp_path: Path) -> None:
    # kombu writes a message file in place; a listener listing the folder meanwhile read
    # it empty and took the wake-up for garbage. Files are now renamed into place.
    url = f"filesystem://{tmp_path / 'wk'}"
    heard: list[str | None] = []
    listener = WakeupListener(url, heard.append, "fs.atomic", name="reader")
    listener.start()
    publisher = WakeupPublisher(url, "fs.atomic")
    try:
        wait_until(lambda: listener.connected.is_set(), timeout=10)
        heard.clear()  # the connect's "look now"
        for i in range(300):
            publisher._send([f"q{i}"])
        wait_until(lambda: len(heard) >= 300, timeout=20)
        assert None not in heard  # nothing was read as unreadable
        assert sorted(heard) == sorted(f"q{i}" for i in range(300))  # each once
    finally:
        publisher.close()
        listener.stop()


# --- a broker the test owns: stopped and restarted mid-run (C09, C16) ------------------------


@pytest.fixture
def own_redis(tmp_path: Path) -> Iterator[RedisProcess]:
    if not RedisProcess.available():
        skip_or_fail("no redis-server binary on PATH", "a missing service fails the run")
    broker = RedisProcess(tmp_path)
    broker.start()
    yield broker
    broker.stop()


@pytest.mark.redis
def test_broker_restarts_cost_no_job_and_the_listener_comes_back(
    own_redis: RedisProcess, sqlite_url: str, exchange: str, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, logger="qmlkit.wakeup")
    url = f"redis://127.0.0.1:{own_redis.port}/0"
    app = App("restarts", storage=sqlite_url, autoload=False, wakeup_url=url,
              wakeup_exchange=exchange)
    runs: Counter[int] = Counter()

    @app.job(name="count")
    def count(i: int) -> None:
        runs[i] += 1

    server = app.server(**QUIET, polling_interval=timedelta(seconds=2))
    client = App("client", storage=sqlite_url, autoload=False, wakeup_url=url,
                 wakeup_exchange=exchange)
    server.start()
    n = 0
    try:
        wait_until(lambda: server._listener.connected.is_set(), timeout=15)
        for gap in (5.0, 0.5, 2.0):  # three restarts, two of them close together
            for _ in range(5):
                client.enqueue("count", args=[n])
                n += 1
            own_redis.stop()
            wait_until(lambda: not server._listener.connected.is_set(), timeout=10)
            for _ in range(5):  # enqueued while the broker is down: found by polling
                client.enqueue("count", args=[n])
                n += 1
            # Time passing with the broker down is what is under test.
            time.sleep(gap)
            own_redis.start()
            wait_until(lambda: server._listener.connected.is_set(), timeout=15)
        wait_until(lambda: sum(runs.values()) == n, timeout=20)
        # With the broker back, a wake-up starts a job well before the 2 s poll.
        wait_until(lambda: len(client._publisher._pending) == 0, timeout=5)
        before = sum(runs.values())
        sent = time.monotonic()
        client.enqueue("count", args=[n])
        wait_until(lambda: sum(runs.values()) > before, timeout=5)
        assert time.monotonic() - sent < 1.9
    finally:
        server.stop()
        client.close()
        app.close()
    assert sorted(runs) == list(range(n + 1)) and set(runs.values()) == {1}
    messages = [r.getMessage() for r in caplog.records if r.name == "qmlkit.wakeup"]
    assert sum("lost its broker" in m for m in messages) >= 3
    assert sum("consuming from" in m for m in messages) >= 4


def test_publisher_memory_stays_bounded_while_the_broker_is_down(tmp_path: Path) -> None:
    # C16: nothing accumulates per enqueue while wake-ups cannot be sent
    port = free_port()  # nothing listens there
    publisher = WakeupPublisher(f"redis://127.0.0.1:{port}/0", "qmlkit.test.down")
    try:
        for i in range(20_000):
            publisher.publish([f"q{i % 3}"])
        assert len(publisher._pending) <= 3
        assert publisher.sent == 0
    finally:
        publisher.close()
    listener = WakeupListener(f"redis://127.0.0.1:{port}/0", lambda q: None, "qmlkit.test.down")
    listener.start()
    try:
        wait_until(lambda: not listener.connected.is_set(), timeout=2)
        assert listener._thread.is_alive()  # retrying with backoff, not dead
    finally:
        listener.stop()
    assert not listener._thread.is_alive()


def test_malformed_messages_are_dropped_without_losing_the_broker(
    wakeup_url: str, exchange: str, sqlite_url: str, caplog: pytest.LogCaptureFixture
) -> None:
    from kombu import Exchange

    from qmlkit.wakeup import connection_for

    caplog.set_level(logging.INFO, logger="qmlkit.wakeup")
    app = App("mal", storage=sqlite_url, autoload=False, wakeup_url=wakeup_url,
              wakeup_exchange=exchange)
    server = app.server(**QUIET, polling_interval=timedelta(seconds=30))
    server.start()
    try:
        wait_until(lambda: server._listener.connected.is_set(), timeout=15)
        seen = server._idle.seq  # read before publishing: the wakes may come at once
        with connection_for(wakeup_url) as conn:
            producer = conn.Producer()
            fanout = Exchange(exchange, type="fanout", durable=False)
            for body, kind in (("plain text", "text/plain"), ("{not json", "application/json"),
                               ('{"queues": null}', "application/json"),
                               ('{"queues": 5}', "application/json")):
                producer.publish(body, exchange=fanout, declare=[fanout],
                                 content_type=kind, content_encoding="utf-8")
            # raw bytes with no serializer (an AMQP body without a JSON content type)
            producer.publish(b"\x00notjson", exchange=fanout, declare=[fanout],
                             content_type="application/data", content_encoding="binary")
        if wakeup_url.startswith("redis://"):
            # JSON that is not a kombu envelope, straight on the pub/sub channel
            import redis

            client = redis.Redis(host="127.0.0.1", port=6379)
            for channel in (f"/0.{exchange}", f"/0.{exchange}/"):
                for junk in ("{}", '"hello"', "[1,2]", "null", "42", '{"body": "x"}',
                             '{"properties": {}, "body": "e30="}'):
                    client.publish(channel, junk)
            client.close()
        wait_until(lambda: server._idle.seq > seen, timeout=5)  # each "wakes all"
        # Still connected, and a real wake-up still works.
        publisher = WakeupPublisher(wakeup_url, exchange)
        before = server._idle.seq
        publisher.publish(["default"])
        wait_until(lambda: server._idle.seq > before, timeout=5)
        publisher.close()
        assert server._listener.connected.is_set()
    finally:
        server.stop()
        app.close()
    messages = [r.getMessage() for r in caplog.records if r.name == "qmlkit.wakeup"]
    assert not any("lost its broker" in m for m in messages), messages
    assert sum("consuming from" in m for m in messages) == 1


def test_servers_use_the_apps_exchange_whatever_gives_the_url(sqlite_url: str,
                                                             tmp_path: Path) -> None:
    app = App("ex", storage=sqlite_url, autoload=False, wakeup_exchange="ex.wakeup")
    server = app.server(wakeup_url=f"filesystem://{tmp_path / 'wk'}")
    assert server.config.wakeup_exchange == "ex.wakeup"
    app.close()


@pytest.mark.parametrize("url", ["filesystem:///", "filesystem://wk", "filesystem://tmp/x"])
def test_filesystem_urls_must_name_an_absolute_folder(url: str) -> None:
    from qmlkit.errors import ConfigurationError

    with pytest.raises(ConfigurationError, match="three"):
        App("fs", storage="memory://", autoload=False, wakeup_url=url)


def test_filesystem_listener_cleans_up_its_queue_and_stale_leftovers(tmp_path: Path) -> None:
    import json as _json
    import os

    url = f"filesystem://{tmp_path / 'wk'}"
    first = WakeupListener(url, lambda q: None, "fs.x", name="first")
    first.start()
    wait_until(lambda: first.connected.is_set(), timeout=10)
    first.stop()  # a clean stop removes its binding
    table = tmp_path / "wk" / "control" / "fs.x.exchange"
    assert all("first" not in b[-1] for b in _json.loads(table.read_text() or "[]"))
    # A crashed listener's binding collects files; the next listener prunes stale ones.
    table.write_text(_json.dumps([["", "", "fs.x.dead.1234"]]))
    stale = tmp_path / "wk" / "data" / "1_abc.fs.x.dead.1234.msg"
    stale.write_text("{}")
    old = time.time() - 3600
    os.utime(stale, (old, old))
    second = WakeupListener(url, lambda q: None, "fs.x", name="second")
    second.start()
    try:
        assert not stale.exists()
        wait_until(lambda: second.connected.is_set(), timeout=10)
        assert all(b[-1] != "fs.x.dead.1234" for b in _json.loads(table.read_text()))
    finally:
        second.stop()


def test_bare_rediss_url_keeps_tls() -> None:
    # qmlkit swaps in its own Redis channel: the URL's TLS must survive the swap
    from qmlkit.wakeup import connection_for

    assert connection_for("rediss://127.0.0.1:6380/0").ssl
    assert connection_for("rediss://127.0.0.1:6380/0?ssl_cert_reqs=required").ssl
    assert not connection_for("redis://127.0.0.1:6379/0").ssl


@pytest.mark.redis
def test_redis_wakeups_are_published_through_one_client(
    exchange: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    # kombu's Redis channel builds a client per message; the wake-up channel keeps one
    require_service("Redis", "127.0.0.1", 6379)
    from qmlkit.wakeup import redis_transport

    channel_cls = redis_transport().Channel
    made: list[object] = []
    original = channel_cls._create_client

    def counted(self: object, asynchronous: bool = False) -> object:
        client = original(self, asynchronous=asynchronous)
        if not asynchronous:
            made.append(client)
        return client

    monkeypatch.setattr(channel_cls, "_create_client", counted)
    url = "redis://127.0.0.1:6379/0"
    heard: list[str | None] = []
    listener = WakeupListener(url, heard.append, exchange, name="one-client")
    publisher = WakeupPublisher(url, exchange)
    listener.start()
    try:
        wait_until(lambda: listener.connected.is_set(), timeout=15)
        for i in range(20):
            publisher._send([f"q{i}"])
        wait_until(lambda: {f"q{i}" for i in range(20)} <= set(heard), timeout=5)
        assert publisher.sent == 20
        assert len(made) <= 2  # one per channel (listener, publisher), not one per message
    finally:
        publisher.close()
        listener.stop()


def test_a_poller_that_leaves_with_a_job_hands_its_place_on(
    exchange: str, sqlite_url: str, tmp_path: Path
) -> None:
    # While wake-ups arrive one idle worker polls and the others wait 10 polling
    # intervals. A job that comes with no wake-up (a client without wakeup_url) must
    # still start within about one polling interval after the poller leaves with a job.
    url = f"filesystem://{tmp_path / 'wk'}"
    worker_app = App("poller", storage=sqlite_url, autoload=False, wakeup_url=url,
                     wakeup_exchange=exchange)
    release = threading.Event()
    held: list[int] = []
    started: dict[str, float] = {}

    @worker_app.job(name="hold")
    def hold() -> None:
        held.append(1)
        release.wait(60)

    @worker_app.job(name="quick")
    def quick(tag: str) -> None:
        started[tag] = time.monotonic()

    server = worker_app.server(**QUIET, worker_count=3, polling_interval=timedelta(seconds=1))
    with_wakeups = App("client", storage=sqlite_url, autoload=False, wakeup_url=url,
                       wakeup_exchange=exchange)
    silent = App("silent", storage=sqlite_url, autoload=False)  # sends no wake-ups
    server.start()
    try:
        wait_until(lambda: server._listener.connected.is_set(), timeout=15)
        for i in range(90):  # warm up: claims of more than one job, so most are not full
            with_wakeups.enqueue("quick", args=[f"warm{i}"])
        wait_until(lambda: len(started) == 90, timeout=30)
        wait_until(lambda: server.idle_workers == 3 and server._idle.poller, timeout=10)
        silent.enqueue("hold")  # found by the poller's next poll
        wait_until(lambda: held, timeout=5)
        # another idle worker has taken the poller's place
        wait_until(lambda: server.idle_workers == 2 and server._idle.poller, timeout=5)
        sent = time.monotonic()
        silent.enqueue("quick", args=["late"])
        wait_until(lambda: "late" in started, timeout=5)  # not 10 polling intervals
        assert started["late"] - sent < 5
    finally:
        release.set()
        server.stop()
        with_wakeups.close()
        silent.close()
        worker_app.close()


def test_losing_the_broker_sets_every_idle_worker_polling(own_redis: RedisProcess,
                                                          sqlite_url: str, exchange: str) -> None:
    app = App("lost", storage=sqlite_url, autoload=False,
              wakeup_url=f"redis://127.0.0.1:{own_redis.port}/0", wakeup_exchange=exchange)
    server = app.server(**QUIET, worker_count=3, polling_interval=timedelta(seconds=1))
    server.start()
    try:
        wait_until(lambda: server._listener.connected.is_set(), timeout=15)
        wait_until(lambda: server.idle_workers == 3, timeout=10)
        seen = server._idle.seq
        own_redis.stop()
        wait_until(lambda: not server._listener.connected.is_set(), timeout=10)
        wait_until(lambda: server._idle.seq > seen, timeout=5)  # everyone woken to poll
    finally:
        server.stop()
        app.close()


def test_stop_returns_while_the_broker_is_paused(own_redis: RedisProcess, sqlite_url: str,
                                                 exchange: str) -> None:
    # A broker that keeps its connections open and never answers (SIGSTOP, a network
    # partition) must not hang stop(): sends time out, and no queue is deleted remotely.
    import os
    import signal

    app = App("paused", storage=sqlite_url, autoload=False,
              wakeup_url=f"redis://127.0.0.1:{own_redis.port}/0", wakeup_exchange=exchange)
    app.job(name="noop")(lambda: None)
    server = app.server(**QUIET, polling_interval=timedelta(seconds=1))
    server.start()
    assert own_redis.proc is not None
    pid = own_redis.proc.pid
    try:
        wait_until(lambda: server._listener.connected.is_set(), timeout=15)
        os.kill(pid, signal.SIGSTOP)
        app.enqueue("noop")  # its wake-up send hangs on the paused broker
        stopper = threading.Thread(target=server.stop, args=(2,), daemon=True)
        stopper.start()
        stopper.join(30)
        assert not stopper.is_alive(), "stop() hung on a paused broker"
        app.close()
    finally:
        os.kill(pid, signal.SIGCONT)


def test_a_forked_process_sends_its_own_wakeups(exchange: str, tmp_path: Path) -> None:
    # gunicorn --preload and multiprocessing fork after the app has sent a wake-up
    import os

    url = f"filesystem://{tmp_path / 'wk'}"
    heard: list[str | None] = []
    listener = WakeupListener(url, heard.append, exchange, name="fork")
    listener.start()
    app = App("forked", storage=f"sqlite:///{tmp_path / 'fork.db'}", autoload=False,
              wakeup_url=url, wakeup_exchange=exchange)
    app.job(name="noop")(lambda: None)
    try:
        wait_until(lambda: listener.connected.is_set(), timeout=10)
        app.enqueue("noop", queue="parent")
        wait_until(lambda: "parent" in heard, timeout=10)
        pid = os.fork()
        if pid == 0:  # the child: enqueue, let the wake-up go, leave at once
            code = 1
            try:
                app.enqueue("noop", queue="child")
                app.close()
                code = 0
            finally:
                os._exit(code)
        _, status = os.waitpid(pid, 0)
        assert os.waitstatus_to_exitcode(status) == 0
        wait_until(lambda: "child" in heard, timeout=10)
    finally:
        app.close()
        listener.stop()


# --- a half-open broker connection: a proxy of the test's own stops forwarding -------------


@pytest.fixture(params=[
    pytest.param(("redis", 6379), marks=pytest.mark.redis),
    pytest.param(("amqp", 5672), marks=pytest.mark.rabbitmq),
], ids=["redis", "amqp"])
def broker(request: pytest.FixtureRequest) -> tuple[str, int]:
    kind, port = request.param
    require_service("Redis" if kind == "redis" else "RabbitMQ", "127.0.0.1", port)
    return kind, port


def broker_url(kind: str, port: int) -> str:
    if kind == "redis":
        return f"redis://127.0.0.1:{port}/0"
    return f"amqp://guest:guest@127.0.0.1:{port}//"


def test_a_half_open_broker_connection_is_noticed_and_replaced(
    broker: tuple[str, int], exchange: str, sqlite_url: str, caplog: pytest.LogCaptureFixture
) -> None:
    # A broker that goes silent without a reset (NAT, failover, partition): the listener
    # must notice within seconds and reconnect, or jobs wait for the 60 s poll.
    from qmlkit.testing.proxy import TcpProxy

    caplog.set_level(logging.INFO, logger="qmlkit.wakeup")
    kind, port = broker
    with TcpProxy("127.0.0.1", port) as proxy:
        app = App("half-open", storage=sqlite_url, autoload=False,
                  wakeup_url=broker_url(kind, proxy.port), wakeup_exchange=exchange)
        started = start_times(app)
        server = app.server(**QUIET, polling_interval=timedelta(seconds=60))
        # the client reaches the broker directly: only the listener's path goes silent
        client = App("client", storage=sqlite_url, autoload=False,
                     wakeup_url=broker_url(kind, port), wakeup_exchange=exchange)
        server.start()
        try:
            listener = server._listener
            assert listener is not None
            wait_until(lambda: listener.connected.is_set(), timeout=15)
            wait_until(lambda: server.idle_workers == server.config.worker_count, timeout=10)
            client.enqueue("ping")  # wake-ups work through the proxy
            wait_until(lambda: len(started) == 1, timeout=10)
            accepted = proxy.accepted
            proxy.pause()
            paused_at = time.monotonic()
            wait_until(lambda: not listener.connected.is_set(), timeout=10,
                       message="half-open connection not noticed")
            noticed = time.monotonic() - paused_at
            assert listener.state == "reconnecting"
            proxy.resume()
            wait_until(lambda: listener.connected.is_set(), timeout=15)
            assert proxy.accepted > accepted  # through a fresh connection
            assert listener.state == "consuming"
            assert listener.last_seen is not None
            # idle again after the reconnect's "look now", then a job comes by wake-up
            wait_until(lambda: server.idle_workers == server.config.worker_count, timeout=10)
            sent = time.monotonic()
            client.enqueue("ping")
            wait_until(lambda: len(started) == 2, timeout=10, message="no wake-up after resume")
            assert started[-1] - sent < 10  # not the 60 s poll
        finally:
            server.stop()
            client.close()
            app.close()
    assert noticed < 10, noticed
    print(f"{kind}: half-open connection noticed after {noticed:.2f} s")
    messages = [r.getMessage() for r in caplog.records if r.name == "qmlkit.wakeup"]
    assert any("lost its broker" in m for m in messages), messages


@pytest.mark.redis
def test_a_publisher_on_a_half_open_connection_does_not_hang_and_sends_later(
    exchange: str
) -> None:
    from qmlkit.testing.proxy import TcpProxy

    require_service("Redis", "127.0.0.1", 6379)
    heard: list[str | None] = []
    listener = WakeupListener("redis://127.0.0.1:6379/0", heard.append, exchange, name="direct")
    listener.start()
    with TcpProxy("127.0.0.1", 6379) as proxy:
        publisher = WakeupPublisher(f"redis://127.0.0.1:{proxy.port}/0", exchange)
        try:
            wait_until(lambda: listener.connected.is_set(), timeout=15)
            publisher.publish(["before"])
            wait_until(lambda: "before" in heard, timeout=10)
            proxy.pause()
            called = time.monotonic()
            publisher.publish(["during"])
            assert time.monotonic() - called < 0.5  # the caller never waits on the broker
            accepted = proxy.accepted
            # the send times out (SOCKET_TIMEOUT_S), the connection is dropped
            wait_until(lambda: publisher._producer is None and proxy.accepted == accepted,
                       timeout=15)
            proxy.drop_connections()  # what the old connection buffered is gone with it
            proxy.resume()
            # ... and the wake-up goes out again once the broker answers
            wait_until(lambda: "during" in heard, timeout=20, message="wake-up never resent")
        finally:
            publisher.close()
            listener.stop()


def test_the_publisher_declares_its_exchange_once_per_connection(
        wakeup_url: str, exchange: str) -> None:
    # Declaring at each send cost as long as the publish itself on Redis (kombu's cached
    # lookup); a new connection declares again (test_broker_restarts_cost_no_job...).
    heard: list[str | None] = []
    listener = WakeupListener(wakeup_url, heard.append, exchange, name="declare")
    listener.start()
    publisher = WakeupPublisher(wakeup_url, exchange)
    declared: list[str] = []
    try:
        wait_until(lambda: listener.connected.is_set(), timeout=15)
        for i in range(4):  # one message each: wait for it before the next
            publisher.publish([f"q{i}"])
            wait_until(lambda i=i: f"q{i}" in heard, timeout=10)
            if i == 0:  # the producer exists now: count what it declares from here on
                producer = publisher._producer
                real = producer.maybe_declare

                def counting(entity: object, *args: object, _real: object = real,
                             **kwargs: object) -> object:
                    declared.append(str(entity))
                    return _real(entity, *args, **kwargs)  # type: ignore[operator]

                producer.maybe_declare = counting
        assert publisher.sent == 4
        assert declared == []  # after the first send's
    finally:
        publisher.close()
        listener.stop()
