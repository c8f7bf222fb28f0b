"""Wake-ups over kombu: tiny messages that start idle workers at once.

Storage stays the only source of truth; a wake-up only says "queue Q has runnable jobs,
look now". A lost or duplicated wake-up costs latency, never a job: a worker that hears
nothing still finds the job at its next poll. This is what lets the polling interval be
long (little storage load while idle) without making jobs wait.

* `WakeupPublisher` publishes, after the commit that made jobs runnable (enqueue, bulk
  enqueue, promotion of due jobs, manual retry, reclaim), one small message naming the
  queues to a kombu **fanout** exchange. Bursts are coalesced: the first message after
  a quiet spell goes out at once, later ones at most every ``COALESCE_S`` (5 ms), each
  naming every queue gathered meanwhile; a loop of thousands of enqueues sends a few
  hundred messages a second at most.
* `WakeupListener` runs in each server: its own auto-deleted queue bound to the
  exchange, a consumer thread that wakes the idle workers of the named queues (a
  server serving other queues ignores the message), and reconnection with capped
  backoff (`qmlkit.backoff.Backoff`) when the broker goes away, logging each change.
  Meanwhile workers poll. A broker that goes silent without closing the connection (a
  proxy, a NAT, a failed-over host: a *half-open* connection) is noticed within
  ``DEAD_AFTER_S`` seconds: on Redis the listener sends a PING on its pub/sub
  connection every ``HEARTBEAT_S / 2`` seconds and gives the connection up when none is
  answered for ``DEAD_AFTER_S``; on AMQP the connection negotiates ``HEARTBEAT_S``
  heartbeats and the listener checks them twice a heartbeat. Its `WakeupListener.state`
  tells where it is.

Any kombu URL works: ``redis://``, ``amqp://`` (RabbitMQ), ``memory://`` (one
process), or ``filesystem:///path/to/folder`` (processes on one machine, no server to
install; the folder is created).
"""

from __future__ import annotations

import functools
import json
import logging
import threading
import time
import uuid
from collections.abc import Callable, Iterable
from datetime import datetime, timedelta, timezone
from pathlib import Path
from typing import Any, Literal
from urllib.parse import urlsplit

from kombu import Connection, Exchange, Queue

from qmlkit.backoff import Backoff
from qmlkit.config import mask_url
from qmlkit.errors import ConfigurationError

log = logging.getLogger(__name__)

#: Reserved wake-up names: not queues, but "a job was scheduled" and "a recurring
#: template changed"; they nudge a server's scheduler and recurring poller.
SCHEDULED = "qmlkit:scheduled"
RECURRING = "qmlkit:recurring"

#: Default exchange name; several apps on one broker use their own ``exchange``.
DEFAULT_EXCHANGE = "qmlkit.wakeup"
#: First delay of the reconnect and resend backoff, in seconds.
MIN_BACKOFF_S = 0.2
#: Cap of the reconnect and resend backoff, in seconds.
MAX_BACKOFF_S = 5.0
#: Heartbeat period of a broker connection, in seconds: the AMQP heartbeat negotiated
#: with the broker (whole seconds), and twice the period of a Redis listener's PINGs.
HEARTBEAT_S = 2
#: A listener whose broker has answered nothing (no message, no PONG, no heartbeat) for
#: this long, in seconds, takes its connection for dead and reconnects. AMQP fails a
#: connection after two missed heartbeats; the Redis listener uses the same bound.
DEAD_AFTER_S = 2.0 * HEARTBEAT_S
#: How long a listener waits for broker events before checking its connection, seconds.
POLL_S = 0.25
#: Longest wait for a broker's answer on an open connection, in seconds (a send, a TLS
#: handshake, deleting a queue on stop).
SOCKET_TIMEOUT_S = 5.0
#: Least time between two wake-up messages of one publisher, in seconds. The first
#: message after a quiet spell goes out at once; a burst is gathered into at most
#: 1 / COALESCE_S messages a second.
COALESCE_S = 0.005


@functools.cache
def _redis_transport() -> type:
    """kombu's Redis transport, publishing through one client per channel.

    kombu 5.7's Redis channel builds a new ``redis.Redis`` client for every published
    message (about 110 µs of the 180 µs a fanout publish costs here, most of it
    filling the client's response-callback table). A wake-up publisher sends one
    message after every quiet spell, so it reuses one client per connection pool
    instead; everything else, consuming included, is kombu's own.
    """
    from contextlib import contextmanager

    from kombu.transport import redis as kombu_redis

    class Channel(kombu_redis.Channel):
        _publish_client: Any = None

        @contextmanager
        def conn_or_acquire(self, client: Any = None) -> Any:
            if client is not None:
                yield client
                return
            cached = self._publish_client
            if cached is None or cached.connection_pool is not self.pool:
                cached = self._publish_client = self._create_client()
            yield cached

    class Transport(kombu_redis.Transport):
        pass

    Transport.Channel = Channel
    return Transport


@functools.cache
def _filesystem_transport() -> type:
    """kombu's filesystem transport, writing each message file atomically.

    kombu 5.7 creates the message file under its final name and then writes it, so a
    listener that lists the folder in between reads an empty file, and the wake-up
    becomes an unreadable message. Here the file is written under a name listeners
    skip (``….msg.tmp``) and renamed into place, which POSIX makes atomic.
    """
    import os

    from kombu.exceptions import ChannelError
    from kombu.transport import filesystem as kombu_fs
    from kombu.utils.encoding import str_to_bytes
    from kombu.utils.json import dumps

    class Channel(kombu_fs.Channel):
        def _put(self, queue: str, payload: Any, **kwargs: Any) -> None:
            name = f"{int(round(time.monotonic() * 1000))}_{uuid.uuid4()}.{queue}.msg"
            final = os.path.join(self.data_folder_out, name)
            try:
                with open(final + ".tmp", "wb") as f:
                    f.write(str_to_bytes(dumps(payload)))
                os.replace(final + ".tmp", final)
            except OSError as exc:
                raise ChannelError(f"Cannot add file {final!r} to directory") from exc

    class Transport(kombu_fs.Transport):
        pass

    Transport.Channel = Channel
    return Transport


def connection_for(url: str) -> Connection:
    """Return a kombu connection for a wake-up URL, checking it first.

    ``filesystem:///folder`` becomes kombu's filesystem transport with its data and
    control folders inside ``folder`` (default ``./qmlkit-wakeup``).

    Raises:
        ConfigurationError: The URL is not ``scheme://…`` (a typo such as
            ``redis:/host`` would otherwise reach kombu as an AMQP host name), its
            transport is unknown to kombu, its port is not a number, a Redis URL's
            database is not a number, or a ``filesystem`` folder cannot be created.
            The message names the URL (password masked) and the bad part.
    """
    shown = repr(mask_url(url))
    scheme, sep, _ = url.partition("://")
    scheme = scheme.lower()
    if not sep or not scheme:
        raise ConfigurationError(
            f"wake-up URL {shown} is not a URL: give scheme://…, e.g. "
            "'redis://127.0.0.1:6379/0', 'amqp://guest:guest@127.0.0.1:5672//' or "
            "'filesystem:///var/run/myapp/wakeups'")
    if scheme in ("rabbitmq", "rabbit"):
        raise ConfigurationError(f"wake-up URL {shown}: RabbitMQ URLs start with amqp://, "
                                 "e.g. 'amqp://guest:guest@127.0.0.1:5672//'")
    if scheme != "filesystem":
        try:
            urlsplit(url).port
        except ValueError as exc:
            raise ConfigurationError(f"wake-up URL {shown}: the port is not a number "
                                     f"({exc})") from exc
    if scheme in ("redis", "rediss"):
        db = urlsplit(url).path.strip("/")
        if db and not db.isdigit():
            raise ConfigurationError(f"wake-up URL {shown}: the database {db!r} is not a "
                                     "number (e.g. redis://127.0.0.1:6379/0)")
    options: dict[str, Any] = {}
    if scheme == "filesystem":
        parts = urlsplit(url)
        if parts.netloc or parts.path == "/":
            raise ConfigurationError(
                f"wake-up URL {shown}: give the folder as an absolute path after three "
                "slashes, e.g. 'filesystem:///var/run/myapp/wakeups' (or 'filesystem://' "
                "for ./qmlkit-wakeup)")
        folder = Path(parts.path or "qmlkit-wakeup").expanduser()
        try:
            for sub in ("data", "control"):
                (folder / sub).mkdir(parents=True, exist_ok=True)
        except OSError as exc:
            raise ConfigurationError(f"wake-up URL {shown}: cannot use folder {folder}: "
                                     f"{exc}") from exc
        # The filesystem transport finds messages by listing its folder: every 2 ms
        # (kombu's default is 1 s, which would make wake-ups slower than polling).
        options = {"data_folder_in": str(folder / "data"), "data_folder_out": str(folder / "data"),
                   "control_folder": str(folder / "control"), "polling_interval": 0.002}  # noqa: E501
    if scheme in ("redis", "rediss"):
        # Without a read timeout, a broker that accepts and then never answers (paused,
        # or plain Redis behind rediss://) would hang a send, a TLS handshake or stop().
        options = {"socket_timeout": SOCKET_TIMEOUT_S, "socket_connect_timeout": 2.0}
    heartbeat = 0
    if scheme in ("amqp", "pyamqp", "amqps"):
        options = {"read_timeout": SOCKET_TIMEOUT_S, "write_timeout": SOCKET_TIMEOUT_S}
        # A silent broker is noticed by missed heartbeats (`heartbeat_check`).
        heartbeat = HEARTBEAT_S
    try:
        if scheme == "filesystem":  # a host name too, or kombu warns that none was given
            conn = Connection(hostname="localhost", transport=_filesystem_transport(),
                              transport_options=options, connect_timeout=2)
        else:
            conn = Connection(url, transport_options=options, connect_timeout=2,
                              heartbeat=heartbeat)
        if scheme in ("redis", "rediss"):
            # The same connection on the leaner publishing channel; ``ssl`` is what
            # kombu made of the URL (for a bare ``rediss://``, TLS without checks).
            conn = Connection(url, transport=_redis_transport(), ssl=conn.ssl,
                              transport_options=options, connect_timeout=2)
        conn.transport_cls  # noqa: B018 - resolves the transport: unknown ones fail here
        _ = conn.transport
    except (KeyError, ImportError, ValueError, TypeError) as exc:
        raise ConfigurationError(f"wake-up URL {shown} names no usable kombu transport: "
                                 f"{exc}") from exc
    return conn


#: Wake-up files older than this are useless (a poll has found their jobs since).
STALE_S = 60.0


def prune_filesystem(data: Path, control: Path) -> int:
    """Remove what crashed listeners left in a filesystem wake-up folder.

    kombu's filesystem transport keeps a binding per listener queue and writes every
    message once per binding; a listener that died without deleting its queue leaves a
    binding that collects files forever. Messages older than ``STALE_S`` are deleted,
    and the bindings of queues that had such stale messages (no one consumes them) are
    dropped.

    Returns:
        How many stale message files were removed.
    """
    cutoff = time.time() - STALE_S
    dead: set[str] = set()
    removed = 0
    for path in [*data.glob("*.msg"), *data.glob("*.msg.tmp")]:
        try:
            if path.stat().st_mtime < cutoff:
                if path.suffix == ".msg":  # not a half-written file of a crashed writer
                    dead.add(path.name.partition(".")[2].removesuffix(".msg"))
                path.unlink()
                removed += 1
        except OSError:
            continue  # consumed meanwhile
    for table in control.glob("*.exchange"):
        try:
            bindings = json.loads(table.read_text() or "[]")
            kept = [b for b in bindings if not (isinstance(b, list) and b and b[-1] in dead)]
            if len(kept) != len(bindings):
                table.write_text(json.dumps(kept))
        except (OSError, ValueError):
            continue
    if removed:
        log.info("removed %d stale wake-up file(s) from %s", removed, data)
    return removed


def _exchange(name: str) -> Exchange:
    return Exchange(name, type="fanout", durable=False, auto_delete=False)


class WakeupPublisher:
    """Publishes coalesced wake-up messages; never raises into the caller.

    A send that fails (broker down, or a half-open connection: a Redis send times out
    after ``SOCKET_TIMEOUT_S``, an AMQP connection fails its heartbeats within
    ``DEAD_AFTER_S``) drops the connection, logs a warning and is tried again, with the
    queues gathered meanwhile, after a capped backoff (`qmlkit.backoff.Backoff`). A
    wake-up lost on the way costs latency, never a job: servers poll.

    Args:
        url: A kombu URL.
        exchange: The fanout exchange's name.

    Raises:
        ConfigurationError: The URL is unusable (see `connection_for`).
    """

    def __init__(self, url: str, exchange: str = DEFAULT_EXCHANGE) -> None:
        self.url = url
        self._conn = connection_for(url)
        self._exchange = _exchange(exchange)
        self._pending: set[str] = set()
        self._cond = threading.Condition()
        self._closed = False
        self._producer: Any = None
        self.sent = 0  #: messages published so far (for tests and benchmarks)
        self._thread = threading.Thread(target=self._run, name="qmlkit-wakeup-pub", daemon=True)
        self._thread.start()

    def publish(self, queues: Iterable[str]) -> None:
        """Ask for a wake-up of ``queues``; returns at once (the send is asynchronous)."""
        queues = list(queues)
        pending = self._pending
        if all(queue in pending for queue in queues):
            # Already due to go out, in a message sent after this caller's commit: the
            # common case in a burst, kept free of the lock and the thread switch.
            return
        with self._cond:
            before = len(self._pending)
            self._pending.update(queues)
            if len(self._pending) != before:
                self._cond.notify()

    def _run(self) -> None:
        backoff = Backoff(MIN_BACKOFF_S, MAX_BACKOFF_S)
        last = 0.0
        while True:
            with self._cond:
                while not self._pending and not self._closed:
                    # An open AMQP connection heartbeats while idle, so a dead one is
                    # found (and dropped) before the next wake-up has to go through it.
                    keepalive = self._producer is not None and bool(self._conn.heartbeat)
                    if not self._cond.wait(HEARTBEAT_S / 4 if keepalive else None):
                        self._keepalive()
                if self._closed and not self._pending:
                    return
                pause = last + COALESCE_S - time.monotonic()
                while pause > 0 and not self._closed:  # gather the rest of a burst
                    self._cond.wait(pause)  # a new queue's notify ends it early
                    pause = last + COALESCE_S - time.monotonic()
                queues, self._pending = sorted(self._pending), set()
            last = time.monotonic()
            try:
                self._send(queues)
                if backoff.delay_s:
                    log.info("wake-ups reach %s again", mask_url(self.url))
                backoff.reset()
            except Exception as exc:  # the broker is optional: log, retry later
                self._drop_connection()
                first = not backoff.delay_s
                delay = backoff.next()
                with self._cond:
                    if not self._closed:  # tried again with what comes meanwhile
                        self._pending.update(queues)
                # one warning per outage; the retries of the same outage at debug level
                log.log(logging.WARNING if first else logging.DEBUG,
                        "wake-up for %s not sent (%s: %s); trying again in %.1f s, workers "
                        "poll meanwhile", queues, type(exc).__name__, exc, delay)
                with self._cond:
                    if not self._closed:
                        self._cond.wait(backoff.jittered(delay))

    def _keepalive(self) -> None:
        """Send and check AMQP heartbeats on the idle connection; drop it if dead."""
        try:
            self._conn.heartbeat_check(rate=2)
        except Exception as exc:  # a dead connection: the next send opens a new one
            log.warning("wake-up publisher lost its broker (%s: %s); reconnecting at the "
                        "next wake-up", type(exc).__name__, exc)
            self._drop_connection()

    def _drop_connection(self) -> None:
        """Forget the connection without talking to the broker (it may be half-open)."""
        self._producer = None
        old = self._conn
        self._conn = old.clone()
        _forget(old)

    def _send(self, queues: list[str]) -> None:
        if self._producer is None:
            self._conn.ensure_connection(max_retries=1)
            self._producer = self._conn.Producer(serializer="json")
        self._producer.publish({"queues": queues}, exchange=self._exchange, declare=[self._exchange],
                               retry=False)
        self.sent += 1

    def close(self) -> None:
        """Send what is pending (best effort, 1 s at most), then release the connection.

        A wake-up still on its way after that second (a slow or unreachable broker) is
        given up with a warning; servers find its jobs at their next poll.
        """
        with self._cond:
            self._closed = True
            self._cond.notify()
        self._thread.join(1.0)
        if self._thread.is_alive():
            log.warning("closing before a wake-up reached %s (broker slow or unreachable); "
                        "servers will find the jobs at their next poll", mask_url(self.url))
        self._conn.release()


#: A listener's states: before its first connection, consuming wake-ups, between a lost
#: (or refused) connection and the next, and after `WakeupListener.stop`.
ListenerState = Literal["connecting", "consuming", "reconnecting", "stopped"]


class _BrokerDead(ConnectionError):
    """The broker answered nothing for ``DEAD_AFTER_S``: the connection is half-open."""


class _Probe:
    """Checks an open listener connection (filesystem, memory: nothing to check).

    ``check(now)`` is called at least every ``POLL_S`` seconds with ``time.monotonic()``;
    it returns whether the subscription is known to be in place, and raises
    `_BrokerDead` (or a transport error) when the connection is dead. ``last_beat`` is
    the monotonic time of the broker's last sign of life, or ``None``.
    """

    def __init__(self, conn: Connection) -> None:
        self.conn = conn
        self.last_beat: float | None = None

    def check(self, now: float) -> bool:
        return True


class _RedisProbe(_Probe):
    """PINGs on the pub/sub connection itself, every ``HEARTBEAT_S / 2`` seconds.

    kombu checks a pub/sub connection's health only inside its event loop, never under
    ``drain_events``, and a half-open socket never becomes readable, so nothing else
    would notice. The PONG comes back on the same connection after the PSUBSCRIBE, so
    the first one answered also proves the subscription is in place (kombu sends it
    lazily, at the first ``drain_events``). redis-py counts the PINGs sent with its
    health-check message in ``health_check_response_counter`` and takes their PONGs off
    the stream (kombu never sees them).
    """

    def __init__(self, conn: Connection) -> None:
        super().__init__(conn)
        self._channel = conn.default_channel
        self._waiting_since: float | None = None  # oldest unanswered PING
        self._next_ping = 0.0
        self._ready = False

    def check(self, now: float) -> bool:
        if not self._channel._in_listen:  # PSUBSCRIBE not sent yet
            return False
        pubsub = self._channel.subclient
        if pubsub.health_check_response_counter <= 0:
            if self._waiting_since is not None:
                self._ready = True
                self.last_beat = now
            self._waiting_since = None
        elif self._waiting_since is not None and now - self._waiting_since > DEAD_AFTER_S:
            raise _BrokerDead(f"no answer to PING for {now - self._waiting_since:.1f} s")
        if now >= self._next_ping:
            pubsub.connection.send_command("PING", pubsub.HEALTH_CHECK_MESSAGE,
                                           check_health=False)
            pubsub.health_check_response_counter += 1
            if self._waiting_since is None:
                self._waiting_since = now
            self._next_ping = now + HEARTBEAT_S / 2
        return self._ready


class _AmqpProbe(_Probe):
    """AMQP heartbeats: sent and checked twice a heartbeat; py-amqp raises
    ``ConnectionForced`` after two heartbeats with nothing received."""

    def check(self, now: float) -> bool:
        self.conn.heartbeat_check(rate=2)
        received = getattr(self.conn.connection, "last_heartbeat_received", 0)
        self.last_beat = received or None
        return True


def _forget(conn: Connection) -> None:
    """Drop a kombu connection without waiting on the broker (it may be half-open)."""
    try:
        conn.collect(socket_timeout=0.5)
    except Exception as exc:  # best effort: the socket is gone either way
        log.debug("could not release a wake-up connection: %s", exc)


def _probe_for(conn: Connection) -> _Probe:
    driver = conn.transport.driver_type
    if driver == "redis":
        return _RedisProbe(conn)
    if driver == "amqp" and conn.heartbeat:
        return _AmqpProbe(conn)
    return _Probe(conn)


class WakeupListener:
    """A server's consumer of wake-ups: calls ``on_wakeup(queue)`` for each named queue.

    The listener's thread connects, subscribes, wakes everything once the subscription
    is in place (wake-ups sent while it was away were lost), then consumes. It checks
    its connection at least every ``POLL_S`` seconds (see the module's docs), so a
    broker that goes silent is given up within about ``DEAD_AFTER_S`` seconds; it then
    reconnects with a capped backoff (`qmlkit.backoff.Backoff`). Each change of
    `state` is logged.

    Args:
        url: A kombu URL.
        on_wakeup: Called on the listener thread with each queue name, or ``None`` for
            "wake everything" (on each (re)connect, when the broker is lost, and for a
            message that could not be read); must be quick.
        exchange: The fanout exchange's name.
        name: A label for the queue and the logs (e.g. the server's id).

    Raises:
        ConfigurationError: The URL is unusable (see `connection_for`).
    """

    def __init__(self, url: str, on_wakeup: Callable[[str | None], None],
                 exchange: str = DEFAULT_EXCHANGE, name: str = "server") -> None:
        self.url = url
        self._conn = connection_for(url)
        self._on_wakeup = on_wakeup
        self._exchange = _exchange(exchange)
        self._queue = Queue(f"{exchange}.{name}.{uuid.uuid4().hex[:8]}", exchange=self._exchange,
                            durable=False, auto_delete=True, exclusive=False)
        self._stop = threading.Event()
        #: Set while consuming, with the subscription in place (tests, liveness checks).
        self.connected = threading.Event()
        self.received = 0  #: messages handled so far, unreadable ones included
        self._state: ListenerState = "connecting"
        self._state_since = datetime.now(timezone.utc)
        self._last_seen: datetime | None = None
        self._thread = threading.Thread(target=self._run, name="qmlkit-wakeup-listen", daemon=True)

    @property
    def state(self) -> ListenerState:
        """Where the listener is: ``"connecting"`` (before its first subscription),
        ``"consuming"``, ``"reconnecting"`` (the broker was lost or refused, a retry
        is due) or ``"stopped"``."""
        return self._state

    @property
    def state_since(self) -> datetime:
        """When `state` last changed (aware UTC)."""
        return self._state_since

    @property
    def last_seen(self) -> datetime | None:
        """When the broker last gave a sign of life on the consuming connection (a
        message, a PONG, an AMQP heartbeat), as aware UTC; ``None`` before any."""
        return self._last_seen

    def _set_state(self, state: ListenerState) -> None:
        if state != self._state:
            self._state = state
            self._state_since = datetime.now(timezone.utc)

    def start(self) -> None:
        """Start the consumer thread (pruning a filesystem folder's stale leftovers)."""
        options = self._conn.transport_options or {}
        if "control_folder" in options:
            prune_filesystem(Path(options["data_folder_in"]), Path(options["control_folder"]))
        self._thread.start()

    def _handle(self, body: Any, message: Any) -> None:
        self._last_seen = datetime.now(timezone.utc)
        try:
            try:
                payload = json.loads(body) if isinstance(body, (str, bytes)) else body
            except ValueError:  # e.g. an AMQP body with no content type: raw bytes
                payload = None
            queues = payload.get("queues") if isinstance(payload, dict) else None
            if isinstance(queues, list):
                for queue in queues:
                    if isinstance(queue, str):
                        self._on_wakeup(queue)
            else:
                log.warning("wake-up message of an unknown shape dropped (%.80r); waking all",
                            body)
                self._on_wakeup(None)
            self.received += 1
        except Exception:  # never let one message tear the consumer down
            log.exception("wake-up message could not be handled")

    def _undecodable(self, message: Any, exc: Exception) -> None:
        """A message kombu cannot decode: drop it (once) and wake everything."""
        log.warning("undecodable wake-up message dropped (%s: %s)", type(exc).__name__, exc)
        self._on_wakeup(None)
        self.received += 1

    def _run(self) -> None:
        backoff = Backoff(MIN_BACKOFF_S, MAX_BACKOFF_S)
        log.info("wake-up listener connecting to %s (state connecting)", mask_url(self.url))
        while not self._stop.is_set():
            conn = self._conn.clone()
            try:
                conn.ensure_connection(max_retries=1)
                # no_ack: a wake-up is worth nothing once delivered, and on Redis
                # kombu's acks cost two round trips per message before the callback.
                consumer = conn.Consumer([self._queue], callbacks=[self._handle],
                                         accept=["json"], no_ack=True,
                                         on_decode_error=self._undecodable)
                consumer.consume()
                self._consume(conn, _probe_for(conn), backoff)
            except Exception as exc:  # reconnect with backoff; workers poll meanwhile
                was_connected = self.connected.is_set()
                if not self._stop.is_set():
                    self._set_state("reconnecting")  # before `connected` clears
                self.connected.clear()
                _forget(conn)  # no goodbye to a broker that may be half-open
                if self._stop.is_set():
                    break
                if was_connected:
                    # Idle workers waiting for wake-ups must poll on their own now.
                    self._on_wakeup(None)
                delay = backoff.next()
                log.warning("wake-up listener %s (%s: %s); state reconnecting, next try in "
                            "%.1f s, workers poll meanwhile",
                            "lost its broker" if was_connected else "cannot connect",
                            type(exc).__name__, exc, delay)
                self._stop.wait(backoff.jittered(delay))
            else:  # stopped: the broker drops the auto-delete queue with the connection
                self.connected.clear()
                try:
                    conn.release()
                except Exception:  # the broker went meanwhile: drop the socket
                    _forget(conn)
        self.connected.clear()
        self._set_state("stopped")
        log.info("wake-up listener stopped (state stopped)")

    def _consume(self, conn: Connection, probe: _Probe, backoff: Backoff) -> None:
        """Drain events until stopped; raises when the connection fails or goes silent."""
        while not self._stop.is_set():
            now = time.monotonic()
            ready = probe.check(now)
            if probe.last_beat is not None:
                ago = timedelta(seconds=max(0.0, now - probe.last_beat))
                seen = datetime.now(timezone.utc) - ago
                if self._last_seen is None or seen > self._last_seen:
                    self._last_seen = seen
            if ready and not self.connected.is_set():
                # Wake-ups sent while this listener was away were lost: look now. Only
                # then announce the subscription, so whoever waits on `connected` sees
                # this wake-up behind it, never after it.
                self._on_wakeup(None)
                self._set_state("consuming")
                self.connected.set()
                backoff.reset()
                log.info("wake-up listener consuming from %s (state consuming)",
                         mask_url(self.url))
            try:
                conn.drain_events(timeout=POLL_S if ready else 0.02)
            except TimeoutError:
                pass
            except (ValueError, KeyError, TypeError, AttributeError) as exc:
                # A message that is not a kombu envelope (JSON of another shape
                # published on the channel, a half-written file) fails inside kombu,
                # after it was read whole: the connection is sound. Drop it, and wake
                # everything rather than lose what may have been a wake-up.
                log.warning("unreadable wake-up message dropped (%s: %s); waking all",
                            type(exc).__name__, exc)
                self._on_wakeup(None)
                self.received += 1

    def stop(self) -> None:
        """Stop consuming, join the thread (3 s at most), and remove this listener's queue.

        Brokers delete an auto-delete queue themselves when its consumer goes, so only
        kombu's filesystem transport, which does not, has the queue (its binding and
        messages too) deleted here: stopping never waits on a broker.
        """
        self._stop.set()
        self._thread.join(3.0)
        if "control_folder" not in (self._conn.transport_options or {}):
            return
        try:
            with self._conn.clone() as conn:
                self._queue.bind(conn.default_channel).delete()
        except Exception as exc:  # best effort: the broker may be gone
            log.debug("could not delete wake-up queue %s: %s", self._queue.name, exc)
