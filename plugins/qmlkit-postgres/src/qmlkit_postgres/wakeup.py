"""A kombu transport over PostgreSQL ``LISTEN/NOTIFY``: ``pgnotify+postgresql://…``.

qmlkit-postgres's default wake-up channel (`PostgresStorage.default_wakeup`), usable by
any kombu program once this module is imported (it adds ``pgnotify`` to kombu's
``TRANSPORT_ALIASES``; the package also declares it under the ``kombu.transports`` entry
points, which `qmlkit.wakeup` reads). Wake-ups stay kombu messages on a connection of
their own: they never touch a table, and job state stays in the storage.

``pgnotify+postgresql://user:password@host:5432/database?sslmode=require`` (or
``pgnotify://…``) takes the rest of the URL as psycopg's connection string. Each kombu
channel holds one psycopg connection in autocommit mode, driven at the libpq level so
that nothing waits without a deadline:

* **publishing** is ``SELECT pg_notify(channel, message)``: a fanout exchange ``E`` is the
  notification channel ``x:E``, a queue ``Q`` (the default exchange) ``q:Q``. Names
  longer than PostgreSQL's 63 bytes are shortened with a hash, the same way on every
  side. A message must fit in a notification (under 8,000 bytes; wake-ups are ~300).
* **consuming** a queue ``LISTEN`` s on its own channel and on those of the fanout
  exchanges it is bound to; notifications are buffered per queue (at most
  ``MAX_BUFFERED``, the oldest dropped) and delivered through kombu's virtual transport.
  ``drain_events`` waits on the connection's socket, so a message is delivered as soon
  as PostgreSQL sends it, and an idle consumer costs no CPU.
* **liveness**: a consuming connection silent for ``PING_AFTER_S`` sends ``SELECT 1``
  without waiting; no answer within ``DEAD_AFTER_S`` (a half-open connection: a paused
  host, a proxy that stopped forwarding) raises `LinkDead`, a connection error. Every
  command waits ``COMMAND_TIMEOUT_S`` at most. Transport options ``ping_after_s``,
  ``dead_after_s`` and ``command_timeout_s`` change them.

Semantics are PostgreSQL's: delivery at most once, to the consumers listening at the
time (like Redis publish/subscribe); nothing is kept for a consumer that is away, and
notifications are delivered when the publishing transaction commits.
"""

from __future__ import annotations

import hashlib
import select
import time
from collections import deque
from collections.abc import Iterable, Sequence
from math import ceil
from queue import Empty
from typing import Any

import psycopg
from kombu.exceptions import ChannelError
from kombu.transport import TRANSPORT_ALIASES, virtual
from kombu.utils.json import dumps, loads
from psycopg import pq

__all__ = ["COMMAND_TIMEOUT_S", "DEAD_AFTER_S", "MAX_BUFFERED", "MAX_PAYLOAD_BYTES",
           "PING_AFTER_S", "Channel", "LinkDead", "NotifyLink", "Transport", "channel_name",
           "conninfo_of"]

#: Longest wait for one command's answer (LISTEN, a publish), in seconds.
COMMAND_TIMEOUT_S = 5.0
#: A consuming connection this long silent, in seconds, is pinged.
PING_AFTER_S = 1.0
#: A ping unanswered this long, in seconds, means the connection is dead.
DEAD_AFTER_S = 4.0
#: Largest message accepted, in bytes of JSON (PostgreSQL's limit is 8,000 bytes).
MAX_PAYLOAD_BYTES = 7999
#: Notifications kept per queue until consumed; beyond, the oldest are dropped.
MAX_BUFFERED = 10_000
_NAME_BYTES = 63  # PostgreSQL's NAMEDATALEN - 1


class LinkDead(ConnectionError):
    """The PostgreSQL connection did not answer in time: it is dead or half-open."""


def channel_name(kind: str, name: str) -> str:
    """The notification channel of a fanout exchange (``kind="x"``) or queue (``"q"``).

    ``kind:name`` if it fits in PostgreSQL's 63 bytes, else its first 46 bytes, ``~``
    and 16 hex digits of its SHA-1: the same on every side, so publisher and listener
    meet (PostgreSQL would truncate a long ``LISTEN`` name but refuse a long
    ``pg_notify`` one).
    """
    full = f"{kind}:{name}"
    raw = full.encode()
    if len(raw) <= _NAME_BYTES:
        return full
    head = raw[:46].decode("utf-8", "ignore")
    return f"{head}~{hashlib.sha1(raw).hexdigest()[:16]}"


def conninfo_of(url: str) -> str:
    """psycopg's connection string for a transport URL: ``pgnotify+postgresql://…`` and
    ``pgnotify://…`` become ``postgresql://…``; kombu hands the part after ``+`` alone."""
    for prefix in ("pgnotify+", "pgnotify://"):
        if url.startswith(prefix):
            url = url[len(prefix):] if prefix.endswith("+") else "postgresql://" + url[11:]
    return url


def _quote(name: str) -> bytes:
    return ('"' + name.replace('"', '""') + '"').encode()


def wait_for(fds: Sequence[int], timeout_s: float, *, write: bool = False) -> list[int]:
    """The descriptors of ``fds`` readable (or writable) within ``timeout_s`` seconds."""
    if not fds:
        time.sleep(max(0.0, timeout_s))
        return []
    if hasattr(select, "poll"):  # no FD_SETSIZE limit
        poller = select.poll()
        for fd in fds:
            poller.register(fd, select.POLLOUT if write else select.POLLIN)
        return [fd for fd, _ in poller.poll(max(0.0, timeout_s) * 1000.0)]
    ready = select.select([] if write else fds, fds if write else [], [], max(0.0, timeout_s))
    return list(ready[1] if write else ready[0])


class NotifyLink:
    """One PostgreSQL session for notifications, each wait bounded (see the module).

    Args:
        conninfo: A psycopg connection string or URL.
        connect_timeout_s: Longest wait for the connection, in seconds.
        command_timeout_s: Longest wait for one command's answer, in seconds.
        ping_after_s: Silence before a ping, in seconds.
        dead_after_s: Longest wait for a ping's answer, in seconds.

    Raises:
        psycopg.OperationalError: The server cannot be reached or refuses the login.
    """

    def __init__(self, conninfo: str, *, connect_timeout_s: float = 5.0,
                 command_timeout_s: float = COMMAND_TIMEOUT_S,
                 ping_after_s: float = PING_AFTER_S, dead_after_s: float = DEAD_AFTER_S) -> None:
        self.conn = psycopg.Connection.connect(
            conninfo, autocommit=True, client_encoding="utf8",
            connect_timeout=max(2, ceil(connect_timeout_s)))
        self.pgconn = self.conn.pgconn
        self.command_timeout_s = command_timeout_s
        self.ping_after_s = ping_after_s
        self.dead_after_s = dead_after_s
        self.last_seen = time.monotonic()  #: when the server last sent anything
        self._ping_since: float | None = None
        self._error: str | None = None

    def fileno(self) -> int:
        """The connection's socket."""
        return int(self.pgconn.socket)

    def run(self, command: bytes, params: Sequence[bytes] | None = None) -> list[tuple[str, str]]:
        """Send one command and wait for its answer.

        Returns:
            The notifications ``(channel, payload)`` that arrived meanwhile.

        Raises:
            LinkDead: No answer within ``command_timeout_s``.
            psycopg.OperationalError: The connection broke.
            psycopg.DatabaseError: The server refused the command (its message).
        """
        deadline = time.monotonic() + self.command_timeout_s
        notes = self._wait_done(deadline) if self._ping_since is not None else []
        self._ping_since = self._error = None  # a ping's answer is no concern of this command
        if params is None:
            self.pgconn.send_query(command)
        else:
            self.pgconn.send_query_params(command, list(params))
        while self.pgconn.flush() != 0:
            if not wait_for([self.fileno()], deadline - time.monotonic(), write=True):
                raise LinkDead(f"PostgreSQL took no data for {self.command_timeout_s:g} s")
        notes += self._wait_done(deadline)
        if self._error is not None:
            error, self._error = self._error, None
            raise psycopg.DatabaseError(error)
        return notes

    def check(self, now: float) -> None:
        """Ping a silent connection (without waiting); raise `LinkDead` if a ping went
        unanswered for ``dead_after_s``."""
        if self._ping_since is None:
            if now - self.last_seen >= self.ping_after_s:
                self.pgconn.send_query(b"SELECT 1")
                self.pgconn.flush()
                self._ping_since = now
        elif now - self._ping_since > self.dead_after_s:
            raise LinkDead(f"no answer to a ping for {now - self._ping_since:.1f} s")

    def read(self) -> list[tuple[str, str]]:
        """Read what the server sent (the socket is readable); return the notifications.

        Raises:
            psycopg.OperationalError: The connection broke (the server went away).
        """
        self._consume()
        if self._ping_since is not None and self._results():
            self._ping_since = None
            self._error = None  # a ping's error says nothing about the channel
        return self._notifies()

    def close(self) -> None:
        """Close the connection without waiting on the server."""
        self.conn.close()

    def _consume(self) -> None:
        self.pgconn.consume_input()
        self.last_seen = time.monotonic()

    def _results(self) -> bool:
        """Collect the answer of the command in flight; ``True`` once it is complete."""
        while not self.pgconn.is_busy():
            result = self.pgconn.get_result()
            if result is None:
                return True
            if result.status == pq.ExecStatus.FATAL_ERROR:
                self._error = result.error_message.decode("utf-8", "replace").strip()
        return False

    def _notifies(self) -> list[tuple[str, str]]:
        notes = []
        while (note := self.pgconn.notifies()) is not None:
            notes.append((note.relname.decode(), note.extra.decode()))
        return notes

    def _wait_done(self, deadline: float) -> list[tuple[str, str]]:
        notes: list[tuple[str, str]] = []
        while True:
            done = self._results()
            notes += self._notifies()
            if done:
                return notes
            if not wait_for([self.fileno()], deadline - time.monotonic()):
                raise LinkDead(f"no answer from PostgreSQL for {self.command_timeout_s:g} s")
            self._consume()


class Channel(virtual.Channel):
    """A kombu channel over one `NotifyLink` (see the module)."""

    supports_fanout = True
    do_restore = False  # nothing to restore to: a notification is gone once delivered
    #: Transport options read here (seconds), as the module describes.
    from_transport_options = (*virtual.Channel.from_transport_options,  # type: ignore[assignment]
                              "command_timeout_s", "ping_after_s", "dead_after_s")
    command_timeout_s = COMMAND_TIMEOUT_S
    ping_after_s = PING_AFTER_S
    dead_after_s = DEAD_AFTER_S

    def __init__(self, connection: Any, **kwargs: Any) -> None:
        super().__init__(connection, **kwargs)  # type: ignore[no-untyped-call]
        client = self.connection.client
        self.link = NotifyLink(conninfo_of(client.hostname),
                               connect_timeout_s=float(client.connect_timeout or 5.0),
                               command_timeout_s=self.command_timeout_s,
                               ping_after_s=self.ping_after_s, dead_after_s=self.dead_after_s)
        self._buffers: dict[str, deque[str]] = {}
        self._fanout: dict[str, set[str]] = {}  # exchange -> queues bound on this channel
        self._routes: dict[str, set[str]] = {}  # channel LISTENed -> consumed queues
        self._closing = False

    @property
    def listening(self) -> bool:
        """Whether this channel ``LISTEN`` s on anything (has a consumer)."""
        return bool(self._routes)

    # --- publishing -------------------------------------------------------------------

    def _put(self, queue: str, message: Any, **kwargs: Any) -> None:
        self._notify(channel_name("q", queue), message)

    def _put_fanout(self, exchange: str, message: Any, routing_key: str, **kwargs: Any) -> None:
        self._notify(channel_name("x", exchange), message)

    def _notify(self, channel: str, message: Any) -> None:
        payload = dumps(message).encode()
        if len(payload) > MAX_PAYLOAD_BYTES:
            raise ChannelError(f"message of {len(payload)} bytes: a PostgreSQL notification "
                               f"holds {MAX_PAYLOAD_BYTES} at most")
        self.dispatch(self.link.run(b"SELECT pg_notify($1, $2)", [channel.encode(), payload]))

    # --- consuming --------------------------------------------------------------------

    def _queue_bind(self, exchange: str, routing_key: str, pattern: str, queue: str) -> None:
        if self.typeof(exchange).type == "fanout":  # type: ignore[no-untyped-call]
            self._fanout.setdefault(exchange, set()).add(queue)
            self._sync_listen()

    def basic_consume(self, queue: str, no_ack: bool, callback: Any, consumer_tag: str,
                      **kwargs: Any) -> None:
        """As kombu's virtual channel, then ``LISTEN`` (the subscription is in place
        when this returns)."""
        super().basic_consume(queue, no_ack, callback, consumer_tag,  # type: ignore[no-untyped-call]
                              **kwargs)
        self._sync_listen()

    def basic_cancel(self, consumer_tag: str) -> None:
        """As kombu's virtual channel, then ``UNLISTEN`` what no consumer needs."""
        super().basic_cancel(consumer_tag)  # type: ignore[no-untyped-call]
        self._sync_listen()

    def _sync_listen(self) -> None:
        if self._closing:
            return
        active = set(self._active_queues)
        routes: dict[str, set[str]] = {channel_name("q", q): {q} for q in active}
        for exchange, queues in self._fanout.items():
            if queues & active:
                routes.setdefault(channel_name("x", exchange), set()).update(queues & active)
        for channel in sorted(routes.keys() - self._routes.keys()):
            self.dispatch(self.link.run(b"LISTEN " + _quote(channel)))
        for channel in sorted(self._routes.keys() - routes.keys()):
            self.dispatch(self.link.run(b"UNLISTEN " + _quote(channel)))
        self._routes = routes

    def dispatch(self, notes: Iterable[tuple[str, str]]) -> None:
        """Buffer received notifications for the queues consuming their channels."""
        for channel, payload in notes:
            for queue in self._routes.get(channel, ()):
                buffer = self._buffers.get(queue)
                if buffer is None:
                    buffer = self._buffers[queue] = deque(maxlen=MAX_BUFFERED)
                buffer.append(payload)

    def _get(self, queue: str, timeout: float | None = None) -> Any:
        buffer = self._buffers.get(queue)
        if not buffer:
            raise Empty()
        return loads(buffer.popleft())

    def _size(self, queue: str) -> int:
        return len(self._buffers.get(queue, ()))

    def _purge(self, queue: str) -> int:
        return len(self._buffers.pop(queue, ()))

    def _delete(self, queue: str, *args: Any, **kwargs: Any) -> None:
        self._purge(queue)
        for queues in self._fanout.values():
            queues.discard(queue)
        self._sync_listen()

    def close(self) -> None:
        """Close the channel and its connection, telling the server nothing (a closed
        session's ``LISTEN`` s end with it)."""
        self._closing = True
        try:
            super().close()  # type: ignore[no-untyped-call]
        finally:
            self.link.close()


class Transport(virtual.Transport):
    """kombu's transport for ``pgnotify+postgresql://`` URLs (see the module)."""

    Channel = Channel
    can_parse_url = True  # the URL goes to psycopg whole
    default_port = 5432  # type: ignore[assignment]  # kombu's base declares None
    driver_type = "postgresql"
    driver_name = "psycopg"
    implements = virtual.Transport.implements.extend(
        asynchronous=False, exchange_type=frozenset(["direct", "fanout"]), heartbeats=False)
    connection_errors = (*virtual.Transport.connection_errors,  # type: ignore[assignment]
                         LinkDead, psycopg.OperationalError, psycopg.InterfaceError)
    channel_errors = (*virtual.Transport.channel_errors,  # type: ignore[assignment]
                      psycopg.DatabaseError)

    def driver_version(self) -> str:
        """psycopg's version."""
        return str(psycopg.__version__)

    def drain_events(self, connection: Any, timeout: Any = None, **kwargs: Any) -> None:
        """Deliver one message, waiting on the connections' sockets (not a timer) up to
        ``timeout`` seconds; pings silent connections on the way.

        Raises:
            TimeoutError: Nothing arrived in time.
            LinkDead, psycopg.OperationalError: A connection is dead.
        """
        deadline = None if timeout is None else time.monotonic() + timeout
        while True:
            try:
                self.cycle.get(self._deliver, timeout=timeout)  # type: ignore[union-attr]
                return
            except Empty:
                pass
            channels = [c for c in self.channels if isinstance(c, Channel) and c.listening]
            now = time.monotonic()
            for channel in channels:
                channel.link.check(now)
            remaining = PING_AFTER_S if deadline is None else deadline - now
            if remaining <= 0:
                raise TimeoutError()
            ready = set(wait_for([c.link.fileno() for c in channels],
                                 min(remaining, PING_AFTER_S / 2)))
            for channel in channels:
                if channel.link.fileno() in ready:
                    channel.dispatch(channel.link.read())


TRANSPORT_ALIASES.setdefault("pgnotify", "qmlkit_postgres.wakeup:Transport")
