"""How `RedisStorage` writes values into Redis: times, index scores, fixed keys, options.

Times are integer microseconds since the Unix epoch, stored as decimal strings (exact);
queue entries start with a 16-digit padded enqueue time so that they sort FIFO.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from datetime import datetime, timedelta, timezone
from typing import Any, ClassVar

from qmlkit.config import mask_url
from qmlkit.errors import ConfigurationError, StorageError
from qmlkit.job import Enqueued, JobState, Processing
from qmlkit.storage.base import minute_of
from qmlkit.storage.codec import due_at, load_json, outcome_at
from qmlkit.storage.options import StorageOptions

_EPOCH = datetime(1970, 1, 1, tzinfo=timezone.utc)
_US = timedelta(microseconds=1)

#: First and largest wait between retries of an unreachable or busy Redis, in seconds.
RETRY_INITIAL_S, RETRY_CAP_S = 0.02, 1.0

#: Default key prefix.
DEFAULT_PREFIX = "qmlkit:"

#: Fixed keys (after the prefix) and the Redis type qmlkit keeps in each.
FIXED_KEYS: dict[str, str] = {
    "jobs": "zset", "scheduled": "zset", "retries": "zset",
    "expires": "zset", "counts": "hash", "processing-servers": "set",
    "servers": "hash", "heartbeats": "zset",
    "recurring": "hash", "recurring-next": "hash", "recurring-last": "hash",
    **{f"state:{name}": "zset" for name in (
        "Enqueued", "Scheduled", "Processing", "Succeeded", "Failed", "AwaitingRetry", "Deleted")},
}


class RedisOptions(StorageOptions):
    """Options of `RedisStorage` (the keyword arguments of its constructor)."""

    backend: ClassVar[str] = "Redis storage"
    prefix: str | None = None
    max_payload_bytes: int | None = None
    socket_timeout_s: float = 10.0
    connect_timeout_s: float = 2.0
    retry_timeout_s: float = 10.0
    max_connections: int = 32
    health_check_interval_s: float = 0.0
    push_wakeups: bool = False


class ForeignKeyType(ConfigurationError, StorageError):
    """A key under qmlkit's prefix holds a Redis type qmlkit does not keep there.

    Another application writes under the same prefix (or a key was changed by hand).
    Nothing was changed by the operation that found it.

    Attributes:
        key: The full key name.
        found: Its Redis type, e.g. ``"string"``.
        expected: The type qmlkit keeps there, e.g. ``"zset"``.
    """

    def __init__(self, key: str, found: str, expected: str) -> None:
        self.key = key
        self.found = found
        self.expected = expected
        super().__init__(
            f"Redis key {key!r} holds a {found}, but qmlkit keeps a {expected} there: another "
            "application writes under this key prefix. Give qmlkit a prefix of its own "
            "(storage URL '?prefix=myapp:' or the 'prefix' option), or remove that key."
        )


def to_us(value: datetime) -> int:
    """An aware datetime as integer microseconds since the Unix epoch (exact)."""
    return (value - _EPOCH) // _US


def from_us(value: str | int) -> datetime:
    """Integer microseconds since the epoch (as stored) back to an aware UTC datetime."""
    return _EPOCH + timedelta(microseconds=int(value))


def pad(value: datetime) -> str:
    """The 16-digit sortable form of an instant, used in queue entries (FIFO order)."""
    return f"{max(to_us(value), 0):016d}"


def state_time(state: JobState) -> str:
    """The index time of a state: padded enqueue µs, due µs, start µs, or ''."""
    if isinstance(state, Enqueued):
        return pad(state.enqueued_at)
    if isinstance(state, Processing):
        return str(to_us(state.started_at))
    due = due_at(state)
    if due is not None:
        return str(to_us(due))
    at = outcome_at(state)  # the throughput counter's minute (seconds)
    return "" if at is None else str(int(minute_of(at).timestamp()))


def opt_us(value: datetime | None) -> str:
    return "" if value is None else str(to_us(value))



def check_database(scheme: str, path: str, url: str) -> None:
    """Refuse a ``redis://`` or ``rediss://`` URL whose path is not a database number.

    Raises:
        ConfigurationError: e.g. ``redis://host/abc`` (the URL named, password masked).
    """
    database = path.strip("/")
    if scheme.lower() in ("redis", "rediss") and database and not database.isdigit():
        raise ConfigurationError(
            f"Redis URL {mask_url(url)!r}: the database {database!r} in the path is not a "
            "number; use e.g. 'redis://host:6379/0'")


def check_query(scheme: str, names: Sequence[str], url: str) -> None:
    """Refuse a Redis URL whose query names an option no Redis connection takes.

    redis-py hands every query option it does not parse itself to its connection class,
    which fails with a bare ``TypeError`` only when the first connection is made; a typo
    such as ``?prefx=`` must fail at configuration time, naming the option instead.

    Args:
        scheme: The URL's scheme (``redis``, ``rediss`` or ``unix``).
        names: The query's option names, ``prefix`` (qmlkit's own) left out.
        url: The whole URL, for the message (its password masked).

    Raises:
        ConfigurationError: An unknown option, named with the closest known one.
    """
    import difflib
    import inspect

    import redis

    kind = {"rediss": redis.SSLConnection, "unix": redis.UnixDomainSocketConnection}.get(
        scheme.lower(), redis.Connection)
    known = {"prefix"}
    # each class's own keyword arguments (the rest go up), the pool's (``from_url``
    # gives it the query too: ``max_connections``, ``timeout``) and the connection's
    for cls in (*redis.BlockingConnectionPool.__mro__, *kind.__mro__):
        init = cls.__dict__.get("__init__")
        if init is not None:
            known.update(p.name for p in inspect.signature(init).parameters.values()
                         if p.kind in (p.POSITIONAL_OR_KEYWORD, p.KEYWORD_ONLY))
    for name in names:
        if name not in known:
            close = difflib.get_close_matches(name, sorted(known), n=1)
            hint = f"; did you mean {close[0]!r}?" if close else ""
            raise ConfigurationError(
                f"Redis URL {mask_url(url)!r}: unknown option {name!r} in its query{hint} "
                "(qmlkit's own is 'prefix'; the others are redis-py's connection options, "
                "e.g. 'socket_keepalive', 'client_name')")


def metadata_of(v: Sequence[Any]) -> dict[str, Any]:
    """A job's metadata from its hash values, with the ``progress`` field merged in.

    Raises:
        ValueError, TypeError: The stored JSON is not an object.
    """
    metadata = load_json(v[1], "metadata")
    if not isinstance(metadata, dict):
        raise TypeError("metadata is not a JSON object")
    if len(v) > 13 and v[13]:
        metadata["progress"] = json.loads(v[13])
    return metadata


def text(value: Any) -> str:
    return value.decode() if isinstance(value, bytes) else str(value)
