"""`WakeupListener`: a server's consumer of wake-ups, with half-open detection (see
`qmlkit.wakeup`)."""

from __future__ import annotations

import json
import logging
import threading
import time
import uuid
from collections.abc import Callable
from datetime import datetime, timedelta, timezone
from typing import TYPE_CHECKING, Any, Literal, cast

from qmlkit.backoff import Backoff
from qmlkit.config import mask_url
from qmlkit.wakeup.filesystem import UPKEEP_S, upkeep
from qmlkit.wakeup.transports import (
    DEAD_AFTER_S,
    DEFAULT_EXCHANGE,
    HEARTBEAT_S,
    MAX_BACKOFF_S,
    MIN_BACKOFF_S,
    POLL_S,
    connection_for,
    exchange_for,
    forget_connection,
)

if TYPE_CHECKING:  # kombu itself loads when a listener is made (a wake-up URL is set)
    from kombu.connection import Connection
    from kombu.transport import redis as kombu_redis

log = logging.getLogger("qmlkit.wakeup")

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
        # A redis:// connection's channel: its listen state is not on kombu's base type.
        self._channel = cast("kombu_redis.Channel", conn.default_channel)
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
        from kombu.entity import Queue

        self.url = url
        self._conn = connection_for(url)
        self._on_wakeup = on_wakeup
        self._exchange = exchange_for(exchange)
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
        self._upkept = time.monotonic()  # the last filesystem upkeep

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
        self._upkeep()
        self._thread.start()

    def _upkeep(self) -> None:
        """On a filesystem folder: prune what crashed listeners left, and keep this
        listener's binding (`qmlkit.wakeup.filesystem.upkeep`); elsewhere nothing."""
        options = self._conn.transport_options or {}
        if "control_folder" in options:
            upkeep(options, self._exchange.name, self._queue.name)
            self._upkept = time.monotonic()

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
                forget_connection(conn)  # no goodbye to a broker that may be half-open
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
                    forget_connection(conn)
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
            if now - self._upkept > UPKEEP_S:
                self._upkept = now
                self._upkeep()
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
