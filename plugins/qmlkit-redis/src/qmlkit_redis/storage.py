"""``RedisStorage``: every job, queue, schedule, claim and server row in one Redis.

Layout (all keys under a configurable prefix, ``qmlkit:`` by default; see the package
README for the full table): a hash per job (``job:<id>``), a sorted set per queue
(``queue:<name>``, priority then FIFO), sorted sets of due times for Scheduled and
AwaitingRetry jobs (``scheduled``, ``retries``), a set per server of the jobs it holds in
Processing (``processing:<server>``), a sorted set per state and one of every job by
creation time (list and count), an expiry sorted set (cleanup), the recurring templates
and the server registry.

Every operation that must be atomic is one Lua script (`qmlkit_redis.lua`), called by
SHA (``EVALSHA``, with ``SCRIPT LOAD`` and a repeat after ``NOSCRIPT``, as after a Redis
restart), over a connection of the calling thread's own. Claims and acknowledgements
are batched: one script call claims up to ``limit`` jobs, one stores every outcome of a
batch. Reads go through redis-py's connection pool.

Connection errors (Redis restarting, a network blip) are retried inside the storage with
capped exponential backoff and jitter for ``retry_timeout_s`` seconds before
``StorageUnavailable`` is raised. Calls whose reply may have been lost are safe to repeat:

* an enqueue retried finds its own jobs already stored and counts them as stored;
* a fenced transition retried finds the job already in the target state by the same
  fencing token (the ``acked`` field) and reports it applied, not stale;
* a claim whose outcome is unknown is presented again, with the same claim state, on the
  worker's next claim: the jobs it took are handed back instead of being stranded;
* a recurring tick retried finds its own compare-and-set already done.

A stored job that cannot be decoded comes back from ``get``/``list_jobs`` as a Failed
stand-in and is moved to Failed with the reason when a worker claims it (as
``SQLStorage`` does). A key of the wrong type under the prefix (another application's
data) raises `ForeignKeyType` naming the key, at ``open()`` for the fixed keys.
"""

from __future__ import annotations

import json
import logging
import random
import threading
import time
from collections.abc import Callable, Mapping, Sequence
from datetime import datetime, timedelta, timezone
from hashlib import sha1
from typing import Any, TypeVar
from urllib.parse import parse_qsl, urlencode, urlsplit

import redis
from pydantic import TypeAdapter, ValidationError
from redis.backoff import NoBackoff
from redis.retry import Retry

from qmlkit.config import mask_url
from qmlkit.errors import (
    ConfigurationError,
    DuplicateJob,
    InvalidTransition,
    JobNotFound,
    StaleClaim,
    StorageError,
    StorageUnavailable,
)
from qmlkit.job import (
    AwaitingRetry,
    Enqueued,
    Failed,
    Job,
    JobState,
    Processing,
    Scheduled,
    Succeeded,
    check_transition,
    encode_metadata,
    encode_payload,
    trusted,
)
from qmlkit.limits import storable_id
from qmlkit.recurring import RecurringJob
from qmlkit.storage.base import (
    MAX_CLAIM,
    STATS_RETENTION,
    ServerInfo,
    StateChange,
    Storage,
    Transition,
    minute_of,
)
from qmlkit_redis import lua

log = logging.getLogger(__name__)
T = TypeVar("T")

_STATE = TypeAdapter(JobState)
_EPOCH = datetime(1970, 1, 1, tzinfo=timezone.utc)
_US = timedelta(microseconds=1)

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

_OPTIONS = frozenset({
    "prefix", "max_payload_bytes", "socket_timeout_s", "connect_timeout_s",
    "retry_timeout_s", "max_connections", "health_check_interval_s",
})


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


def _pad(value: datetime) -> str:
    """The 16-digit sortable form of an instant, used in queue entries (FIFO order)."""
    return f"{max(to_us(value), 0):016d}"


def _state_time(state: JobState) -> str:
    """The index time of a state: padded enqueue µs, due µs, start µs, or ''."""
    if isinstance(state, Enqueued):
        return _pad(state.enqueued_at)
    if isinstance(state, Scheduled):
        return str(to_us(state.enqueue_at))
    if isinstance(state, AwaitingRetry):
        return str(to_us(state.retry_at))
    if isinstance(state, Processing):
        return str(to_us(state.started_at))
    if isinstance(state, (Succeeded, Failed)):  # the throughput counter's minute (seconds)
        at = state.succeeded_at if isinstance(state, Succeeded) else state.failed_at
        return str(int(minute_of(at).timestamp()))
    return ""


def _opt_us(value: datetime | None) -> str:
    return "" if value is None else str(to_us(value))


class RedisStorage(Storage):
    """Storage in Redis (``redis://``, ``rediss://`` or ``unix://``). See the module docstring.

    Several processes and servers may share one Redis and one prefix; several apps share
    one Redis under different prefixes. Not for Redis Cluster (scripts touch keys they do
    not declare).

    Args:
        url: A redis-py URL, e.g. ``"redis://:secret@host:6379/0"`` or
            ``"unix:///run/redis.sock?db=0"``; a ``prefix`` query parameter sets the key
            prefix and is removed before the URL reaches redis-py.
        prefix: Key prefix (overrides the URL's); default ``"qmlkit:"``.
        max_payload_bytes: Largest encoded arguments accepted, in bytes.
        socket_timeout_s: Longest wait for one command's reply, in seconds.
        connect_timeout_s: Longest wait for a TCP connection, in seconds.
        retry_timeout_s: How long one operation keeps retrying connection errors (with
            capped exponential backoff) before raising ``StorageUnavailable``, in seconds.
        max_connections: Size of the connection pool; a thread waits for a free
            connection up to ``socket_timeout_s``.
        health_check_interval_s: Ping a pooled connection idle this long before reuse,
            in seconds (0: never).

    Raises:
        ConfigurationError: The URL cannot be parsed or a value is out of range.
    """

    def __init__(
        self,
        url: str,
        *,
        prefix: str | None = None,
        max_payload_bytes: int | None = None,
        socket_timeout_s: float = 10.0,
        connect_timeout_s: float = 2.0,
        retry_timeout_s: float = 10.0,
        max_connections: int = 32,
        health_check_interval_s: float = 0.0,
    ) -> None:
        self.url = url
        if max_payload_bytes is not None:
            self.max_payload_bytes = max_payload_bytes
        try:
            parts = urlsplit(url)
            query = parse_qsl(parts.query, keep_blank_values=True)
        except ValueError as exc:
            raise ConfigurationError(f"cannot parse Redis URL {mask_url(url)!r}: {exc}") from exc
        url_prefix = [v for k, v in query if k == "prefix"]
        rest = urlencode([(k, v) for k, v in query if k != "prefix"])
        # Rebuilt by hand: urlunsplit turns "unix:///path" into "unix:/path".
        self._redis_url = (f"{parts.scheme}://{parts.netloc}{parts.path}"
                           + (f"?{rest}" if rest else "")
                           + (f"#{parts.fragment}" if parts.fragment else ""))
        self.prefix = prefix if prefix is not None else (url_prefix[-1] if url_prefix
                                                         else DEFAULT_PREFIX)
        if not self.prefix:
            raise ConfigurationError("Redis storage: the key prefix must not be empty")
        for name, value in (("socket_timeout_s", socket_timeout_s),
                            ("connect_timeout_s", connect_timeout_s),
                            ("retry_timeout_s", retry_timeout_s),
                            ("max_connections", max_connections)):
            if value <= 0:
                raise ConfigurationError(f"Redis storage option {name} must be positive")
        self.socket_timeout_s = socket_timeout_s
        self.connect_timeout_s = connect_timeout_s
        self.retry_timeout_s = retry_timeout_s
        self.max_connections = max_connections
        self.health_check_interval_s = health_check_interval_s
        self._client: redis.Redis | None = None
        self._pool: redis.ConnectionPool | None = None
        self._shas: dict[str, str] = {}
        self._open_lock = threading.Lock()
        self._local = threading.local()
        self._conns: list[tuple[threading.Thread, redis.Connection]] = []
        self._conns_lock = threading.Lock()
        self._generation = 0
        # Claims whose reply was lost, per (server, worker): presented again next time.
        self._pending_claims: dict[tuple[str, str], list[Any]] = {}
        self._where = "?"

    @classmethod
    def from_url(cls, url: str, options: Mapping[str, Any]) -> RedisStorage:
        """Build from a URL and the storage options (the constructor's keyword arguments).

        Raises:
            ConfigurationError: An unknown option (named), or a bad URL or value.
        """
        unknown = set(options) - _OPTIONS
        if unknown:
            raise ConfigurationError(
                f"Redis storage: unknown option(s) {sorted(unknown)}; known: {sorted(_OPTIONS)}")
        return cls(url, **options)

    # --- lifecycle -------------------------------------------------------------------

    @property
    def client(self) -> redis.Redis:
        """The redis-py client (opening the storage on first use)."""
        if self._client is None:
            self.open()
        assert self._client is not None
        return self._client

    def open(self) -> None:
        """Connect, check the server answers and the fixed keys' types. Idempotent.

        Raises:
            ConfigurationError: The URL is unusable, the credentials are refused (the
                message names host and port, never the password), or a fixed key holds
                a foreign type (`ForeignKeyType`).
            StorageUnavailable: Redis does not answer at the URL's host and port.
        """
        with self._open_lock:
            if self._client is not None:
                return
            try:
                pool = redis.BlockingConnectionPool.from_url(
                    self._redis_url,
                    decode_responses=True,
                    socket_timeout=self.socket_timeout_s,
                    socket_connect_timeout=self.connect_timeout_s,
                    max_connections=self.max_connections,
                    timeout=self.socket_timeout_s,
                    health_check_interval=self.health_check_interval_s,
                    retry=Retry(NoBackoff(), 0),  # retries are ours, with idempotent replays
                )
            except (ValueError, TypeError) as exc:
                raise ConfigurationError(
                    f"unusable Redis URL {mask_url(self.url)!r}: {exc}") from exc
            kw = pool.connection_kwargs
            self._where = (f"unix socket {kw['path']}" if "path" in kw
                           else f"{kw.get('host', 'localhost')}:{kw.get('port', 6379)}")
            client = redis.Redis(connection_pool=pool)
            try:
                client.ping()
                self._check_fixed_keys(client)
            except redis.AuthenticationError as exc:
                pool.disconnect()
                raise ConfigurationError(
                    f"Redis at {self._where} refused the credentials of {mask_url(self.url)!r}: "
                    f"{exc}. Check the user name and password in the URL") from exc
            except (redis.ConnectionError, redis.TimeoutError) as exc:
                pool.disconnect()
                hint = ("; for rediss:// the server must speak TLS"
                        if self.url.lower().startswith("rediss:") else "")
                raise StorageUnavailable(
                    f"Redis at {self._where} is unreachable ({type(exc).__name__}: {exc}); "
                    f"check the host and port, and that Redis is running{hint}") from exc
            except redis.exceptions.InvalidResponse as exc:
                pool.disconnect()
                raise ConfigurationError(
                    f"{self._where} does not answer as a Redis server ({exc}); "
                    "check the port in the storage URL") from exc
            except redis.ResponseError as exc:
                pool.disconnect()
                text = str(exc)
                if "AUTH" in text or "NOAUTH" in text or "WRONGPASS" in text:
                    raise ConfigurationError(
                        f"Redis at {self._where} refused the credentials of "
                        f"{mask_url(self.url)!r}: {text}") from exc
                raise StorageError(f"Redis at {self._where}: {text}") from exc
            except ConfigurationError:
                pool.disconnect()
                raise
            self._shas = {name: sha1(getattr(lua, name).encode()).hexdigest()
                          for name in lua.SCRIPTS}
            self._generation += 1
            self._pool, self._client = pool, client

    def close(self) -> None:
        """Close every pooled connection. Idempotent; the storage may be opened again."""
        with self._open_lock:
            if self._pool is not None:
                self._pool.disconnect()
            with self._conns_lock:
                for _, conn in self._conns:
                    conn.disconnect()
                self._conns = []
            self._pool = self._client = None

    def _check_fixed_keys(self, client: redis.Redis) -> None:
        pipe = client.pipeline(transaction=False)
        names = list(FIXED_KEYS)
        for name in names:
            pipe.type(self.prefix + name)
        for name, found in zip(names, pipe.execute(), strict=True):
            if found not in ("none", FIXED_KEYS[name]):
                raise ForeignKeyType(self.prefix + name, found, FIXED_KEYS[name])

    def _foreign_key(self, keys: Sequence[str]) -> ForeignKeyType | None:
        """Find which key made a command fail with WRONGTYPE."""
        client = self.client
        expected = {self.prefix + k: t for k, t in FIXED_KEYS.items()}
        for key in keys:
            found = client.type(key)
            want = expected.get(key) or ("hash" if key.startswith(self.prefix + "job:") else
                                         "zset" if key.startswith(self.prefix + "queue:") else
                                         "set")
            if found not in ("none", want):
                return ForeignKeyType(key, found, want)
        for key, want in expected.items():
            found = client.type(key)
            if found not in ("none", want):
                return ForeignKeyType(key, found, want)
        return None

    # --- calls with retry ----------------------------------------------------------------

    def _call(self, fn: Callable[[int], T], keys: Sequence[str] = ()) -> T:
        """Run ``fn(attempt)``, retrying connection errors with capped backoff.

        ``attempt`` is 0 on the first try; a retry (``attempt > 0``) may have followed a
        try that ran on the server but whose reply was lost, so ``fn`` must then ask for
        an idempotent replay.

        Raises:
            StorageUnavailable: Redis stayed unreachable for ``retry_timeout_s``.
            ForeignKeyType: A key has a foreign type (``keys`` are checked first).
            StorageError: Any other error reply.
        """
        try:
            return fn(0)  # the usual case: no clock read, no loop
        except (redis.ConnectionError, redis.TimeoutError, redis.ResponseError) as exc:
            error: Exception = exc
        deadline = time.monotonic() + self.retry_timeout_s
        delay = 0.02
        attempt = 0
        while True:
            if isinstance(error, (redis.ConnectionError, redis.TimeoutError)):
                # BusyLoadingError (Redis reading its append-only file after a restart)
                # is a ConnectionError too: wait for it like for a refused connection.
                if time.monotonic() + delay > deadline:
                    raise StorageUnavailable(
                        f"Redis at {self._where} unreachable for {self.retry_timeout_s:g} s "
                        f"({type(error).__name__}: {error})") from error
                log.info("Redis at %s: %s: %s; retrying in %.2f s", self._where,
                         type(error).__name__, error, delay)
            else:
                text = str(error)
                if "WRONGTYPE" in text:
                    found = self._foreign_key(keys)
                    if found is not None:
                        raise found from error
                    raise StorageError(
                        f"Redis at {self._where}: a key under prefix {self.prefix!r} holds a "
                        f"foreign type ({text}); give qmlkit a prefix of its own") from error
                if ("BUSY" in text or "MASTERDOWN" in text or "READONLY" in text
                        or "TRYAGAIN" in text) and time.monotonic() + delay <= deadline:
                    log.info("Redis at %s busy (%s); retrying in %.2f s", self._where, text, delay)
                else:
                    raise StorageError(f"Redis at {self._where}: {text}") from error
            time.sleep(delay * (0.5 + random.random()))  # jitter, not crypto
            delay = min(delay * 2, 1.0)
            attempt += 1
            try:
                return fn(attempt)
            except (redis.ConnectionError, redis.TimeoutError, redis.ResponseError) as exc:
                error = exc

    def _script(self, name: str, args: Sequence[Any], keys: Sequence[str] = (),
                replay: Callable[[list[Any]], list[Any]] | None = None) -> Any:
        """Run a Lua script by SHA with ``ARGV = [prefix, *args]``, retried as ``_call``.

        Scripts go over a connection of the calling thread's own (see `_connection`),
        which saves redis-py's pool checkout on every call: about half the client-side
        cost of a round trip. After ``NOSCRIPT`` (Redis restarted) the script is loaded
        again and the call repeated.

        Args:
            replay: Turns the arguments into their idempotent-replay form for retries.
        """
        if self._client is None:
            self.open()
        sha, source = self._shas[name], getattr(lua, name)
        argv = [self.prefix, *args]

        def run(attempt: int) -> Any:
            values = replay(argv) if attempt and replay else argv
            conn = self._connection()
            try:
                try:
                    conn.send_command("EVALSHA", sha, 0, *values)
                    return conn.read_response()
                except redis.exceptions.NoScriptError:
                    conn.send_command("SCRIPT", "LOAD", source)
                    conn.read_response()
                    conn.send_command("EVALSHA", sha, 0, *values)
                    return conn.read_response()
            except (redis.ConnectionError, redis.TimeoutError):
                conn.disconnect()  # reconnects on the next send
                raise

        return self._call(run, keys)

    def _connection(self) -> redis.Connection:
        """This thread's own connection for script calls, made on first use.

        Connections of threads that have ended are closed when another one is made, and
        all of them by `close`.
        """
        mine = getattr(self._local, "conn", None)
        if mine is not None and mine[0] == self._generation:
            return mine[1]
        pool = self._pool
        assert pool is not None
        conn = pool.connection_class(**pool.connection_kwargs)
        with self._conns_lock:
            alive = []
            for thread, other in self._conns:
                if thread.is_alive():
                    alive.append((thread, other))
                else:
                    other.disconnect()
            self._conns = [*alive, (threading.current_thread(), conn)]
        self._local.conn = (self._generation, conn)
        return conn

    def _k(self, name: str) -> str:
        return self.prefix + name

    # --- job encoding -----------------------------------------------------------------

    def _new_values(self, jobs: Sequence[Job]) -> list[Any]:
        """Encode new jobs as the scripts' 15 values each, checking each.

        Raises:
            PayloadError: A job's arguments or metadata are not JSON or too large.
            InvalidTransition: A job is not Enqueued or Scheduled.
        """
        limit = self.max_payload_bytes
        states: dict[int, tuple[str, str, str]] = {}  # jobs of one bulk enqueue share one
        values: list[Any] = []
        for job in jobs:
            state = job.state
            encoded = states.get(id(state))
            if encoded is None:
                check_transition(job.id, None, state.name)
                encoded = states[id(state)] = (state.name, state.model_dump_json(),
                                               _state_time(state))
            values += (
                job.id, encode_payload(job.args, job.kwargs, limit),
                encode_metadata(job.metadata, limit),
                job.method, job.queue, job.priority, job.max_retries,
                "" if job.timeout_s is None else repr(job.timeout_s),
                to_us(job.created_at), job.attempts, job.retry_count, _opt_us(job.expires_at),
                *encoded,
            )
        return values

    def _decode(self, job_id: str, v: Sequence[Any]) -> tuple[Job, str | None]:
        """JOB_FIELDS values -> (job, None), or (a Failed stand-in, reason) if undecodable."""
        try:
            payload = json.loads(v[0])
            job = Job(
                id=job_id, method=v[2], args=payload["args"], kwargs=payload["kwargs"],
                queue=v[3], priority=int(v[4]), max_retries=int(v[5]),
                timeout_s=float(v[6]) if v[6] else None, metadata=_metadata(v),
                created_at=from_us(v[7]), attempts=int(v[8]), retry_count=int(v[9]),
                expires_at=from_us(v[10]) if v[10] else None,
                state=_STATE.validate_json(v[12]),
            )
            if job.state.name != v[11]:
                raise ValueError(f"state field {v[11]!r} disagrees with the state data")
        except (ValueError, TypeError, KeyError, ValidationError) as exc:
            reason = f"stored job cannot be decoded: {type(exc).__name__}: {exc}"[:2000]
            try:
                created = from_us(v[7])
            except (ValueError, TypeError, OverflowError):
                created = datetime.now(timezone.utc)
            stand_in = Job(
                id=job_id, method=str(v[2] or "?"), queue=str(v[3] or "?"), created_at=created,
                state=Failed(failed_at=datetime.now(timezone.utc),
                             exception_type="qmlkit.errors.PayloadError", message=reason),
            )
            return stand_in, reason
        return job, None

    def _decode_changes(self, flat: list[Any]) -> list[StateChange]:
        """Per job ``previous state JSON, id, JOB_FIELDS`` (PROMOTE, REQUEUE) -> changes."""
        n = 2 + len(lua.JOB_FIELDS)
        changes = []
        for i in range(0, len(flat), n):
            job, reason = self._decode(flat[i + 1], flat[i + 2:i + n])
            if reason is not None:
                log.error("job %s: %s", flat[i + 1], reason)
                continue
            changes.append(StateChange(job, _STATE.validate_json(flat[i])))
        return changes

    # --- enqueue and read ------------------------------------------------------------------

    def enqueue_many(self, jobs: Sequence[Job]) -> list[Job]:
        """See `Storage.enqueue_many`. One script call; retried calls are idempotent."""
        if not jobs:
            return []
        values = self._new_values(jobs)
        out = self._script("ENQUEUE", ["0", len(jobs), *values],
                           replay=lambda argv: [argv[0], "1", *argv[2:]])
        if out[0] == "DUP":
            raise DuplicateJob(out[1])
        return list(jobs)

    def get(self, job_id: str) -> Job | None:
        """See `Storage.get`."""
        if not storable_id(job_id):  # a NUL or a lone surrogate: no job can have it
            return None
        key = self._k("job:" + job_id)
        v = self._call(lambda _: self.client.hmget(key, lua.JOB_FIELDS), [key])
        if v[11] is None:
            return None
        return self._decode(job_id, v)[0]

    def _fetch(self, ids: Sequence[str]) -> list[Job]:
        def read(_: int) -> list[Any]:
            pipe = self.client.pipeline(transaction=False)
            for job_id in ids:
                pipe.hmget(self._k("job:" + job_id), lua.JOB_FIELDS)
            return pipe.execute()

        rows = self._call(read)
        return [self._decode(job_id, v)[0]
                for job_id, v in zip(ids, rows, strict=True) if v[11] is not None]

    def list_jobs(
        self,
        *,
        state: str | None = None,
        queue: str | None = None,
        method: str | None = None,
        limit: int = 100,
        offset: int = 0,
    ) -> list[Job]:
        """See `Storage.list_jobs`.

        Pages through the state index (or the index of every job) newest first; with a
        queue or method filter, candidates are checked by their two hash fields before
        whole jobs are read.
        """
        index = self._k(f"state:{state}" if state else "jobs")
        client = self.client
        if queue is None and method is None:
            ids = self._call(lambda _: client.zrevrange(index, offset, offset + limit - 1))
            return self._fetch(ids)
        wanted: list[str] = []
        start, chunk = 0, 500
        while len(wanted) < offset + limit:
            ids = self._call(lambda _, s=start: client.zrevrange(index, s, s + chunk - 1))
            if not ids:
                break

            def read(_: int, batch: list[str] = ids) -> list[Any]:
                pipe = client.pipeline(transaction=False)
                for job_id in batch:
                    pipe.hmget(self._k("job:" + job_id), "queue", "method")
                return pipe.execute()

            for job_id, (q, m) in zip(ids, self._call(read), strict=True):
                if (queue is None or q == queue) and (method is None or m == method):
                    wanted.append(job_id)
            start += chunk
        return self._fetch(wanted[offset:offset + limit])

    def count_jobs(self) -> dict[tuple[str, str], int]:
        """See `Storage.count_jobs`. Reads the ``counts`` hash the scripts keep exact."""
        raw = self._call(lambda _: self.client.hgetall(self._k("counts")), [self._k("counts")])
        counts = {}
        for field, n in raw.items():
            queue, _, state = field.rpartition("|")
            if int(n) > 0:
                counts[(queue, state)] = int(n)
        return counts

    def change_state(
        self,
        job_id: str,
        state: JobState,
        *,
        expected: Sequence[str] = (),
        expires_at: datetime | None = None,
    ) -> StateChange:
        """See `Storage.change_state`: read, check, then a compare-and-set script."""
        key = self._k("job:" + job_id)
        while True:
            v = self._call(lambda _: self.client.hmget(key, lua.JOB_FIELDS), [key])
            if v[11] is None:
                raise JobNotFound(job_id)
            job, corrupt = self._decode(job_id, v)
            if corrupt and state.name != "Deleted":
                raise InvalidTransition(job_id, "corrupt", state.name)
            if expected and job.state.name not in expected:
                raise InvalidTransition(job_id, job.state.name, state.name)
            changed = (job if corrupt else job.with_state(state, expires_at=expires_at))
            server = state.server_name if isinstance(state, Processing) else ""
            done = self._script("CHANGE_STATE", [
                job_id, v[12] or "", v[8] or "", state.name, state.model_dump_json(),
                _state_time(state), server, _opt_us(expires_at)], keys=[key])
            if done == -1:
                raise JobNotFound(job_id)
            if done == 1:
                if corrupt:
                    changed = changed._replace(state=state, expires_at=expires_at)
                return StateChange(changed, job.state)
            # the job changed between the read and the write: read it again

    # --- claim and fenced transitions ----------------------------------------------------

    def claim(
        self,
        *,
        worker_id: str,
        server_name: str,
        queues: Sequence[str],
        limit: int,
        now: datetime,
    ) -> list[Job]:
        """See `Storage.claim`; the previous states are not decoded."""
        return [job for job, _ in self._claim(worker_id, server_name, queues, limit, now, False)]

    def claim_changes(
        self,
        *,
        worker_id: str,
        server_name: str,
        queues: Sequence[str],
        limit: int,
        now: datetime,
    ) -> list[StateChange]:
        """See `Storage.claim_changes`."""
        return [StateChange(job, previous) for job, previous
                in self._claim(worker_id, server_name, queues, limit, now, True)]

    def _claim(
        self,
        worker_id: str,
        server_name: str,
        queues: Sequence[str],
        limit: int,
        now: datetime,
        with_previous: bool,
    ) -> list[tuple[Job, JobState | None]]:
        """One CLAIM script call; a claim whose reply was lost is replayed next time.

        If the call fails with the outcome unknown (Redis went away mid-call), its
        arguments are kept; the same worker's next claim presents them again with the
        replay flag, and gets back the jobs that claim took, if it ran.
        """
        who = (server_name, worker_id)
        argv = self._pending_claims.pop(who, None)
        if argv is None:
            processing = Processing(started_at=now, worker_id=worker_id, server_name=server_name)
            argv = [max(1, min(limit, MAX_CLAIM)), str(to_us(now)), server_name,
                    processing.model_dump_json(), "0", *queues]
        else:
            argv = [*argv[:4], "1", *argv[5:]]
        try:
            out = self._script("CLAIM", argv, keys=[self._k("processing:" + server_name),
                                                    *(self._k("queue:" + q) for q in queues)],
                               replay=lambda a: [*a[:5], "1", *a[6:]])
        except (StorageUnavailable, OSError):
            self._pending_claims[who] = argv
            raise
        replayed, n_foreign = out[0], out[1]
        for key in out[2:2 + n_foreign]:
            log.error("queue entry points at Redis key %r, which is not a qmlkit job hash: "
                      "entry dropped (another application writes under prefix %r?)",
                      key, self.prefix)
        if replayed:
            log.warning("a claim whose reply was lost is handed back: %d job(s) for %s",
                        (len(out) - 2 - n_foreign) // (2 + len(lua.JOB_FIELDS)), worker_id)
        processing = _STATE.validate_json(argv[3])
        return self._claimed(out[2 + n_foreign:], processing, bool(replayed), with_previous)

    def _claimed(self, flat: list[Any], processing: Processing, replayed: bool,
                 with_previous: bool) -> list[tuple[Job, JobState | None]]:
        """Build claimed jobs from the CLAIM reply: per job id, attempts, JOB_FIELDS."""
        n = 2 + len(lua.JOB_FIELDS)
        claimed: list[tuple[Job, JobState | None]] = []
        corrupt: list[Transition] = []
        for i in range(0, len(flat), n):
            job_id, attempts, v = flat[i], int(flat[i + 1]), flat[i + 2:i + n]
            try:  # fast path: every value was written by qmlkit with the right type
                payload = json.loads(v[0])
                metadata = _metadata(v)
                if not (isinstance(payload["args"], list) and isinstance(payload["kwargs"], dict)
                        and isinstance(metadata, dict)):
                    raise TypeError("args, kwargs or metadata of the wrong JSON type")
                job = trusted(Job, {
                    "id": job_id, "method": v[2], "args": payload["args"],
                    "kwargs": payload["kwargs"], "queue": v[3], "priority": int(v[4]),
                    "attempts": attempts, "retry_count": int(v[9]), "max_retries": int(v[5]),
                    "timeout_s": float(v[6]) if v[6] else None, "metadata": metadata,
                    "created_at": from_us(v[7]),
                    "expires_at": from_us(v[10]) if v[10] else None, "state": processing,
                })
                previous: JobState | None = None
                if with_previous:
                    previous = (Enqueued(enqueued_at=processing.started_at, queue=job.queue,
                                         reason="claim replayed after a lost reply")
                                if replayed else _STATE.validate_json(v[12]))
            except (ValueError, TypeError, KeyError, ValidationError) as exc:
                stand_in, reason = self._decode(job_id, v)
                reason = reason or f"stored job cannot be decoded: {type(exc).__name__}: {exc}"
                log.error("job %s quarantined: %s", job_id, reason)
                held = stand_in._replace(attempts=attempts, state=processing)
                corrupt.append(Transition(held, stand_in.state))
                continue
            claimed.append((job, previous))
        if corrupt:
            self.transition_many(corrupt)
        return claimed

    def transition_many(self, items: Sequence[Transition]) -> list[Job | StaleClaim]:
        """See `Storage.transition_many`. One script call for the whole batch.

        A retried call (its first reply lost) reports an item applied when the job is
        already in the target state by the same fencing token, so an acknowledgement is
        never reported stale because of an outage alone.
        """
        if not items:
            return []
        applied = [item.applied() for item in items]
        values: list[Any] = []
        for item, job in zip(items, applied, strict=True):
            state = job.state
            values += (
                item.job.id, item.token, state.name, state.model_dump_json(),
                _state_time(state), _opt_us(job.expires_at),
                "" if item.retry_count is None else item.retry_count,
            )
        codes = self._script("TRANSITION", [len(items), *values],
                             keys=[self._k("job:" + i.job.id) for i in items])
        if 2 in codes:
            log.info("%d outcome(s) were stored already by the same fencing token (a retried "
                     "call whose reply was lost)", codes.count(2))
        return [job if code else StaleClaim(item.job.id, item.token)
                for item, job, code in zip(items, applied, codes, strict=True)]

    # --- background duties -------------------------------------------------------------------

    @staticmethod
    def _enqueued_json(now: datetime, reason: str | None) -> tuple[str, str]:
        """Head and tail of an Enqueued state's JSON, for a script to put the queue between."""
        marker = "\x00queue\x00"
        text = Enqueued(enqueued_at=now, queue=marker, reason=reason).model_dump_json()
        head, _, tail = text.partition(json.dumps(marker))
        return head, tail

    def promote_due(self, *, now: datetime, limit: int = 1000) -> list[StateChange]:
        """See `Storage.promote_due`: one script promotes the earliest due jobs."""
        head, tail = self._enqueued_json(now, None)
        flat = self._script("PROMOTE", [to_us(now), _pad(now), max(1, limit), head, tail])
        return self._decode_changes(flat)

    def next_due_at(self) -> datetime | None:
        """See `Storage.next_due_at`: the heads of the ``scheduled`` and ``retries`` sets."""
        def read(_: int) -> list[Any]:
            pipe = self.client.pipeline(transaction=False)
            pipe.zrange(self._k("scheduled"), 0, 0, withscores=True)
            pipe.zrange(self._k("retries"), 0, 0, withscores=True)
            return pipe.execute()

        heads = [int(score) for found in self._call(read) for _, score in found]
        return from_us(min(heads)) if heads else None

    def requeue_stranded(
        self,
        *,
        started_before: datetime,
        now: datetime,
        exclude_servers: Sequence[str] = (),
    ) -> list[StateChange]:
        """See `Storage.requeue_stranded`: one script over the per-server processing sets."""
        head, tail = self._enqueued_json(now, "stranded")
        flat = self._script("REQUEUE", ["stranded", to_us(started_before), _pad(now), head, tail,
                                        *exclude_servers])
        return self._decode_changes(flat)

    def delete_expired(self, *, now: datetime, limit: int = 1000) -> int:
        """See `Storage.delete_expired`: the job hashes and all their index entries (C17),
        and throughput counters older than `STATS_RETENTION`."""
        deleted = int(self._script("DELETE_EXPIRED", [to_us(now), max(1, limit)]))
        horizon = int(minute_of(now - STATS_RETENTION).timestamp())
        minutes_key = self._k("stats-minutes")

        def prune(_: int) -> None:
            old = self.client.zrangebyscore(minutes_key, "-inf", f"({horizon}")
            if old:
                pipe = self.client.pipeline(transaction=False)
                pipe.delete(*(self._k(f"stats:{_text(m)}") for m in old))
                pipe.zremrangebyscore(minutes_key, "-inf", f"({horizon}")
                pipe.execute()

        self._call(prune, [minutes_key])
        return deleted

    # --- history, throughput and progress ---------------------------------------------

    def job_history(self, job_id: str) -> list[JobState]:
        """See `Storage.job_history`: the job hash's ``history`` field (one JSON state per
        line, appended by every script that changes the state) and its current state."""
        key = self._k("job:" + job_id)
        v = self._call(lambda _: self.client.hmget(key, "history", "state_data"), [key])
        if v[1] is None:
            return []
        states: list[JobState] = []
        for raw in [*_text(v[0] or "").splitlines(), _text(v[1])]:
            try:
                states.append(_STATE.validate_json(raw))
            except ValidationError:
                log.warning("job %s: a history entry cannot be decoded; skipped", job_id)
        return states

    def throughput(self, *, since: datetime, until: datetime) -> list[tuple[datetime, int, int]]:
        """See `Storage.throughput`: ``stats:<minute>`` hashes (``Succeeded``, ``Failed``)
        listed by the ``stats-minutes`` sorted set, both written by the scripts."""
        low, high = int(minute_of(since).timestamp()), until.timestamp()
        minutes_key = self._k("stats-minutes")

        def read(_: int) -> list[tuple[datetime, int, int]]:
            minutes = [int(_text(m)) for m in self.client.zrangebyscore(minutes_key, low, high)]
            pipe = self.client.pipeline(transaction=False)
            for m in minutes:
                pipe.hmget(self._k(f"stats:{m}"), "Succeeded", "Failed")
            counts = pipe.execute() if minutes else []
            return [(datetime.fromtimestamp(m, timezone.utc), int(ok or 0), int(bad or 0))
                    for m, (ok, bad) in zip(minutes, counts)]

        return self._call(read, [minutes_key])

    def report_progress(self, job_id: str, *, token: int, progress: Mapping[str, Any]) -> bool:
        """See `Storage.report_progress`: one fenced script writes the job hash's
        ``progress`` field, which reads merge into ``metadata["progress"]``."""
        entry = json.dumps(dict(progress), separators=(",", ":"))
        return bool(self._script("PROGRESS", [job_id, token, entry]))

    # --- recurring templates ----------------------------------------------------------------

    def upsert_recurring(self, template: RecurringJob, *, keep_schedule: bool = False) -> None:
        """See `Storage.upsert_recurring`: one script, so ``keep_schedule`` is atomic."""
        self._script("UPSERT_RECURRING", [
            template.id, template.model_dump_json(), _opt_us(template.next_run_at),
            _opt_us(template.last_run_at), "1" if keep_schedule else "0"])

    def _template(self, definition: str, next_us: str | None, last_us: str | None) -> RecurringJob:
        template = RecurringJob.model_validate_json(definition)
        return template.model_copy(update={
            "next_run_at": from_us(next_us) if next_us else None,
            "last_run_at": from_us(last_us) if last_us else None,
        })

    def get_recurring(self, template_id: str) -> RecurringJob | None:
        """See `Storage.get_recurring`."""
        def read(_: int) -> list[Any]:
            pipe = self.client.pipeline(transaction=False)
            for name in ("recurring", "recurring-next", "recurring-last"):
                pipe.hget(self._k(name), template_id)
            return pipe.execute()

        definition, next_us, last_us = self._call(read)
        return None if definition is None else self._template(definition, next_us, last_us)

    def list_recurring(self) -> list[RecurringJob]:
        """See `Storage.list_recurring`."""
        def read(_: int) -> list[Any]:
            pipe = self.client.pipeline(transaction=True)
            for name in ("recurring", "recurring-next", "recurring-last"):
                pipe.hgetall(self._k(name))
            return pipe.execute()

        defs, nexts, lasts = self._call(read)
        return [self._template(defs[i], nexts.get(i), lasts.get(i)) for i in sorted(defs)]

    def remove_recurring(self, template_id: str) -> bool:
        """See `Storage.remove_recurring`."""
        def write(_: int) -> list[Any]:
            pipe = self.client.pipeline(transaction=True)
            for name in ("recurring", "recurring-next", "recurring-last"):
                pipe.hdel(self._k(name), template_id)
            return pipe.execute()

        return bool(self._call(write)[0])

    def fire_recurring(
        self,
        template_id: str,
        *,
        expected_next_run_at: datetime,
        next_run_at: datetime,
        job: Job | None,
    ) -> bool:
        """See `Storage.fire_recurring`: a compare-and-set script storing the tick's job."""
        values = self._new_values([job]) if job is not None else []
        out = self._script("FIRE_RECURRING", [
            template_id, to_us(expected_next_run_at), to_us(next_run_at),
            to_us(expected_next_run_at) if job is not None else "", "0",
            "1" if job is not None else "0", *values,
        ], replay=lambda a: [*a[:5], "1", *a[6:]])
        if out[0] == "DUP":
            raise DuplicateJob(out[1])
        return out[0] == 1

    # --- server registry ----------------------------------------------------------------------

    def register_server(self, info: ServerInfo) -> None:
        """See `Storage.register_server`: the row and its heartbeat in one MULTI/EXEC."""
        def write(_: int) -> None:
            pipe = self.client.pipeline(transaction=True)
            pipe.hset(self._k("servers"), info.id, info.model_dump_json())
            pipe.zadd(self._k("heartbeats"), {info.id: to_us(info.last_heartbeat)})
            pipe.execute()

        self._call(write)

    def heartbeat(self, server_id: str, *, now: datetime) -> bool:
        """See `Storage.heartbeat`."""
        return bool(self._script("HEARTBEAT", [server_id, to_us(now)]))

    def deregister_server(self, server_id: str) -> None:
        """See `Storage.deregister_server`."""
        def write(_: int) -> None:
            pipe = self.client.pipeline(transaction=True)
            pipe.hdel(self._k("servers"), server_id)
            pipe.zrem(self._k("heartbeats"), server_id)
            pipe.execute()

        self._call(write)

    def list_servers(self) -> list[ServerInfo]:
        """See `Storage.list_servers`."""
        def read(_: int) -> list[Any]:
            pipe = self.client.pipeline(transaction=True)
            pipe.hgetall(self._k("servers"))
            pipe.zrange(self._k("heartbeats"), 0, -1, withscores=True)
            return pipe.execute()

        rows, beats = self._call(read)
        last = {server_id: from_us(int(score)) for server_id, score in beats}
        infos = []
        for server_id, text in rows.items():
            info = ServerInfo.model_validate_json(text)
            if server_id in last:
                info = info.model_copy(update={"last_heartbeat": last[server_id]})
            infos.append(info)
        return sorted(infos, key=lambda i: i.started_at)

    def reclaim_dead_servers(
        self, *, heartbeat_before: datetime, now: datetime
    ) -> list[StateChange]:
        """See `Storage.reclaim_dead_servers`: one script removes the rows and requeues."""
        head, tail = self._enqueued_json(now, "reclaimed")
        flat = self._script("REQUEUE", ["reclaim", to_us(heartbeat_before), _pad(now), head, tail])
        return self._decode_changes(flat)


def _metadata(v: Sequence[Any]) -> dict[str, Any]:
    """A job's metadata from its hash values, with the ``progress`` field merged in.

    Raises:
        ValueError, TypeError: The stored JSON is not an object.
    """
    metadata = json.loads(v[1])
    if not isinstance(metadata, dict):
        raise TypeError("metadata is not a JSON object")
    if len(v) > 13 and v[13]:
        metadata["progress"] = json.loads(v[13])
    return metadata


def _text(value: Any) -> str:
    return value.decode() if isinstance(value, bytes) else str(value)
