"""The wake-up transports: kombu connections for each URL scheme, the fanout exchange,
and the settings publisher and listener share (see `qmlkit.wakeup`).

kombu is imported by the functions that make a connection or an exchange, not by this
module: a process that configures no wake-up URL never loads it."""

from __future__ import annotations

import functools
import json
import logging
import time
import uuid
from pathlib import Path
from typing import TYPE_CHECKING, Any
from urllib.parse import urlsplit

from qmlkit.config import mask_url
from qmlkit.errors import ConfigurationError

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


@functools.cache
def filesystem_transport() -> type:
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
        # As kombu's filesystem Channel, which already renames its base's ``message``
        # (kombu passes both positionally): no signature can match both.
        def _put(self, queue: str, payload: Any, **kwargs: Any) -> None:  # type: ignore[override]
            name = f"{round(time.monotonic() * 1000)}_{uuid.uuid4()}.{queue}.msg"
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


def filesystem_options(url: str, shown: str) -> dict[str, Any]:
    """kombu transport options for a ``filesystem://`` URL, creating its folders.

    Raises:
        ConfigurationError: The folder is not an absolute path, or cannot be created.
    """
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
    data = str(folder / "data")
    return {"data_folder_in": data, "data_folder_out": data,
            "control_folder": str(folder / "control"), "polling_interval": 0.002}


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
    from kombu.connection import Connection

    shown = repr(mask_url(url))
    scheme = check_url(url, shown)
    options: dict[str, Any] = filesystem_options(url, shown) if scheme == "filesystem" else {}
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
