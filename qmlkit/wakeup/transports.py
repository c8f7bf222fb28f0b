"""The wake-up transports: kombu connections for each URL scheme, the fanout exchange,
and the settings publisher and listener share (see `qmlkit.wakeup`).

kombu is imported by the functions that make a connection or an exchange, not by this
module: a process that configures no wake-up URL never loads it."""

from __future__ import annotations

import functools
import importlib.metadata
import logging
from typing import TYPE_CHECKING, Any
from urllib.parse import urlsplit

from qmlkit.config import mask_url
from qmlkit.errors import ConfigurationError
from qmlkit.wakeup.filesystem import filesystem_options, filesystem_transport

if TYPE_CHECKING:
    from kombu.connection import Connection
    from kombu.entity import Exchange

log = logging.getLogger("qmlkit.wakeup")

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
def redis_transport() -> type:
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
                # kombu leaves _create_client unannotated (a redis.Redis)
                made = self._create_client()  # type: ignore[no-untyped-call]
                cached = self._publish_client = made
            yield cached

    class Transport(kombu_redis.Transport):
        pass

    Transport.Channel = Channel
    return Transport


def check_url(url: str, shown: str) -> str:
    """Check a wake-up URL's form; return its scheme, lower-cased.

    Raises:
        ConfigurationError: As `connection_for`; ``shown`` is the masked URL to name.
    """
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
            _ = urlsplit(url).port  # raises ValueError for a port that is not a number
        except ValueError as exc:
            raise ConfigurationError(f"wake-up URL {shown}: the port is not a number "
                                     f"({exc})") from exc
    if scheme in ("redis", "rediss"):
        db = urlsplit(url).path.strip("/")
        if db and not db.isdigit():
            raise ConfigurationError(f"wake-up URL {shown}: the database {db!r} is not a "
                                     "number (e.g. redis://127.0.0.1:6379/0)")
    return scheme


@functools.cache
def register_transports() -> dict[str, str]:
    """Add the kombu transports that installed packages declare under the entry-point
    group ``kombu.transports`` (``name = "module:Transport"``) to kombu's
    ``TRANSPORT_ALIASES``, without importing them (kombu has no such group of its own).
    qmlkit-postgres declares ``pgnotify`` there. Names kombu knows already are kept.

    Returns:
        The aliases added, ``{name: "module:Class"}``.
    """
    from kombu.transport import TRANSPORT_ALIASES

    added = {}
    for entry in importlib.metadata.entry_points(group="kombu.transports"):
        if entry.name not in TRANSPORT_ALIASES:
            TRANSPORT_ALIASES[entry.name] = added[entry.name] = entry.value
    return added


def connection_for(url: str) -> Connection:
    """Return a kombu connection for a wake-up URL, checking it first.

    ``filesystem:///folder`` becomes qmlkit's filesystem transport
    (`qmlkit.wakeup.filesystem`) with its folders inside ``folder`` (default
    ``./qmlkit-wakeup``). Transports declared under the ``kombu.transports`` entry
    points are known too (`register_transports`), e.g. ``pgnotify+postgresql://``.

    Raises:
        ConfigurationError: The URL is not ``scheme://…`` (a typo such as
            ``redis:/host`` would otherwise reach kombu as an AMQP host name), its
            transport is unknown to kombu, its port is not a number, a Redis URL's
            database is not a number, or a ``filesystem`` folder cannot be created.
            The message names the URL (password masked) and the bad part.
    """
    from kombu.connection import Connection

    shown = repr(mask_url(url))
    scheme = check_url(url, shown)
    register_transports()
    options: dict[str, Any] = filesystem_options(url, shown) if scheme == "filesystem" else {}
    if scheme in ("redis", "rediss", "redis+socket"):
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
            conn = Connection(hostname="localhost", transport=filesystem_transport(),
                              transport_options=options, connect_timeout=2)
        else:
            conn = Connection(url, transport_options=options, connect_timeout=2,
                              heartbeat=heartbeat)
        if scheme in ("redis", "rediss"):
            # The same connection on the leaner publishing channel; ``ssl`` is what
            # kombu made of the URL (for a bare ``rediss://``, TLS without checks).
            conn = Connection(url, transport=redis_transport(), ssl=conn.ssl,
                              transport_options=options, connect_timeout=2)
        conn.transport_cls  # noqa: B018 - resolves the transport: unknown ones fail here
        _ = conn.transport
    except (KeyError, ImportError, ValueError, TypeError) as exc:
        raise ConfigurationError(f"wake-up URL {shown} names no usable kombu transport: "
                                 f"{exc}") from exc
    return conn


def exchange_for(name: str) -> Exchange:
    """The non-durable fanout exchange named ``name``."""
    from kombu.entity import Exchange

    return Exchange(name, type="fanout", durable=False, auto_delete=False)


def forget_connection(conn: Connection) -> None:
    """Drop a kombu connection without waiting on the broker (it may be half-open)."""
    try:
        conn.collect(socket_timeout=0.5)
    except Exception as exc:  # best effort: the socket is gone either way
        log.debug("could not release a wake-up connection: %s", exc)
