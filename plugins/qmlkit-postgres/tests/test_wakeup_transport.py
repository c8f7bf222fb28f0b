"""The ``pgnotify`` kombu transport (LISTEN/NOTIFY) against the real PostgreSQL."""

from __future__ import annotations

import subprocess
import sys
import time
import uuid
from collections.abc import Iterator

import psycopg
import pytest
from kombu import Connection, Consumer, Exchange, Producer, Queue
from kombu.exceptions import ChannelError
from qmlkit_postgres.wakeup import DEAD_AFTER_S, LinkDead, channel_name

from qmlkit.testing import require_service, wait_until
from qmlkit.testing.proxy import TcpProxy
from tests.conftest import RUN_ID

pytestmark = pytest.mark.postgres

URL = "pgnotify+postgresql://127.0.0.1:5432/test"


@pytest.fixture(autouse=True)
def _postgres() -> None:
    require_service("PostgreSQL", "127.0.0.1", 5432)


@pytest.fixture
def name() -> str:
    """A name of this test's own: notification channels are per database, shared."""
    return f"qmlkit.t.{RUN_ID}.{uuid.uuid4().hex[:8]}"


@pytest.fixture
def conn() -> Iterator[Connection]:
    with Connection(URL, connect_timeout=5) as connection:
        connection.ensure_connection(max_retries=1)
        yield connection


def consume(connection: Connection, queue: Queue) -> tuple[Consumer, list[object]]:
    bodies: list[object] = []
    consumer = Consumer(connection.default_channel, [queue], accept=["json"], no_ack=True,
                        callbacks=[lambda body, message: bodies.append(body)])
    consumer.consume()
    return consumer, bodies


def drain_until(connection: Connection, done: object, timeout: float = 10.0) -> None:
    deadline = time.monotonic() + timeout
    while not done():  # type: ignore[operator]
        assert time.monotonic() < deadline, "nothing arrived in time"
        try:
            connection.drain_events(timeout=0.2)
        except TimeoutError:
            pass


def test_fanout_round_trip_reaches_every_bound_queue(conn: Connection, name: str) -> None:
    exchange = Exchange(name, type="fanout", durable=False)
    with Connection(URL) as other:
        queues = [Queue(f"{name}.a", exchange), Queue(f"{name}.b", exchange)]
        _, first = consume(conn, queues[0])
        _, second = consume(other, queues[1])
        with Connection(URL) as publisher:
            Producer(publisher.default_channel, serializer="json").publish(
                {"queues": ["default"]}, exchange=exchange, declare=[exchange])
        drain_until(conn, lambda: first)
        drain_until(other, lambda: second)
    assert first == [{"queues": ["default"]}] and second == [{"queues": ["default"]}]


def test_a_queue_gets_messages_sent_to_it_directly(conn: Connection, name: str) -> None:
    queue = Queue(f"{name}.direct")
    _, bodies = consume(conn, queue)
    with Connection("pgnotify://127.0.0.1:5432/test") as publisher:  # the bare form too
        producer = Producer(publisher.default_channel, serializer="json")
        for n in range(3):
            producer.publish({"n": n}, routing_key=queue.name)
    drain_until(conn, lambda: len(bodies) == 3)
    assert bodies == [{"n": 0}, {"n": 1}, {"n": 2}]  # in order, each once


def test_names_longer_than_postgres_allows_still_meet(conn: Connection, name: str) -> None:
    long = name + ".x" * 60
    assert len(channel_name("x", long).encode()) <= 63
    assert channel_name("x", long) != channel_name("x", long + "y")
    exchange = Exchange(long, type="fanout", durable=False)
    _, bodies = consume(conn, Queue(long + ".q", exchange))
    with Connection(URL) as publisher:
        Producer(publisher.default_channel).publish({"ok": 1}, exchange=exchange,
                                                    declare=[exchange])
    drain_until(conn, lambda: bodies)
    assert bodies == [{"ok": 1}]


def test_a_message_too_large_for_a_notification_is_refused_naming_the_limit(
        conn: Connection, name: str) -> None:
    exchange = Exchange(name, type="fanout", durable=False)
    with pytest.raises(ChannelError, match="7999"):
        Producer(conn.default_channel).publish({"x": "a" * 9000}, exchange=exchange,
                                               declare=[exchange])


def test_drain_events_times_out_and_costs_no_round_trip_while_idle(
        conn: Connection, name: str) -> None:
    consume(conn, Queue(f"{name}.idle", Exchange(name, type="fanout", durable=False)))
    started = time.monotonic()
    with pytest.raises(TimeoutError):
        conn.drain_events(timeout=0.3)
    assert time.monotonic() - started >= 0.3


def test_a_terminated_backend_is_a_connection_error_not_a_hang(
        conn: Connection, name: str) -> None:
    consume(conn, Queue(f"{name}.kill", Exchange(name, type="fanout", durable=False)))
    with psycopg.connect("postgresql://127.0.0.1:5432/test", autocommit=True) as admin:
        killed = admin.execute(
            "SELECT pg_terminate_backend(pid) FROM pg_stat_activity WHERE query LIKE %s",
            (f'LISTEN "x:{name}"%',)).fetchall()
    assert killed == [(True,)]
    started = time.monotonic()
    with pytest.raises(conn.connection_errors):
        drain_until(conn, lambda: False, timeout=10)
    assert time.monotonic() - started < 10


def test_a_half_open_connection_is_given_up_within_the_dead_bound(name: str) -> None:
    with TcpProxy("127.0.0.1", 5432) as proxy:
        url = f"pgnotify+postgresql://127.0.0.1:{proxy.port}/test"
        with Connection(url, connect_timeout=5) as conn:
            conn.ensure_connection(max_retries=1)
            consume(conn, Queue(f"{name}.half", Exchange(name, type="fanout", durable=False)))
            proxy.pause()
            started = time.monotonic()
            with pytest.raises(LinkDead):
                drain_until(conn, lambda: False, timeout=30)
            elapsed = time.monotonic() - started
        proxy.resume()
    assert elapsed < DEAD_AFTER_S + 5  # a ping after 1 s of silence, given up 4 s later


def test_qmlkit_finds_the_transport_through_its_entry_point_without_an_import() -> None:
    # A fresh interpreter that never imports qmlkit_postgres: qmlkit.wakeup reads the
    # kombu.transports entry points and kombu loads the transport itself.
    code = ("import sys; from qmlkit.wakeup import connection_for; "
            f"c = connection_for({URL!r}); print(c.transport.driver_type); "
            "print('qmlkit_postgres.plugin' in sys.modules)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         timeout=60, check=True).stdout.split()
    assert out == ["postgresql", "False"]


def test_the_listener_and_publisher_of_qmlkit_meet_over_it(name: str) -> None:
    from qmlkit.wakeup import WakeupListener, WakeupPublisher

    heard: list[str | None] = []
    listener = WakeupListener(URL, heard.append, name, name="t")
    listener.start()
    publisher = WakeupPublisher(URL, name)
    try:
        wait_until(listener.connected.is_set, timeout=15)
        publisher.publish(["mail"])
        wait_until(lambda: "mail" in heard, timeout=10)
        assert listener.state == "consuming"
    finally:
        publisher.close()
        listener.stop()
    assert listener.state == "stopped"
