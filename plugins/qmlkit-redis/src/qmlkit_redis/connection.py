"""The connection half of `RedisStorage`: open, close, calls with retry, scripts.

Connection errors (Redis restarting, a network blip) are retried with
`qmlkit.backoff.Backoff` for ``retry_timeout_s`` seconds before ``StorageUnavailable``;
a retried call is told so (``attempt > 0``) and must ask for an idempotent replay.
Scripts are called by SHA over a connection of the calling thread's own.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable, Sequence
from datetime import datetime
from hashlib import sha1
from typing import Any, TypeVar
from urllib.parse import parse_qsl, urlencode, urlsplit

import redis
from hiredis import pack_command
from redis.backoff import NoBackoff
from redis.retry import Retry

import qmlkit_redis.lua as lua
from qmlkit.backoff import Backoff
from qmlkit.config import mask_url
from qmlkit.errors import (
    ConfigurationError,
    StorageError,
    StorageUnavailable,
)
from qmlkit.job import Job
from qmlkit.storage.base import (
    StateChange,
)
from qmlkit.storage.capabilities import DefaultWakeup
from qmlkit.storage.codec import (
    check_utf8,
    decode_job,
    decode_state,
    group_new_jobs,
    load_json,
    quarantine_stand_in,
)
from qmlkit_redis.encoding import (
    DEFAULT_PREFIX,
    FIXED_KEYS,
    RETRY_CAP_S,
    RETRY_INITIAL_S,
    ForeignKeyType,
    check_database,
    check_query,
    from_us,
    metadata_of,
    opt_us,
    state_time,
    to_us,
)
from qmlkit_redis.push import PushListener, url_flag

log = logging.getLogger("qmlkit_redis.storage")
T = TypeVar("T")


class RedisConnection:
    """Connection state and retrying calls of one `RedisStorage` (its base class).

    See `RedisStorage` for the arguments.
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
        push_wakeups: bool = False,
    ) -> None:
        self.url = url
        if max_payload_bytes is not None:
            self.max_payload_bytes = max_payload_bytes
        try:
            parts = urlsplit(url)
            query = parse_qsl(parts.query, keep_blank_values=True)
        except ValueError as exc:
            raise ConfigurationError(f"cannot parse Redis URL {mask_url(url)!r}: {exc}") from exc
        check_database(parts.scheme, parts.path, url)
        ours = ("prefix", "push_wakeups")  # qmlkit's own query options, not redis-py's
        check_query(parts.scheme, [k for k, _ in query if k not in ours], url)
        url_prefix = [v for k, v in query if k == "prefix"]
        for flag in [v for k, v in query if k == "push_wakeups"][-1:]:
            push_wakeups = push_wakeups or url_flag(flag, "push_wakeups", url)
        rest = urlencode([(k, v) for k, v in query if k not in ours])
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
        self.push_wakeups = push_wakeups
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


    def default_wakeup(self) -> DefaultWakeup:
        """Wake-ups over this storage's own Redis (kombu's Redis transport: publish/
        subscribe, no keys), on an exchange of this prefix's own (see
        `qmlkit.storage.capabilities.WakeupProvider`).

        Returns:
            The URL (``redis://`` or ``rediss://`` with the same host, port, database,
            credentials and ``ssl_*`` parameters; ``redis+socket:///path`` for a unix
            socket) and the key prefix as the scope.
        """
        parts = urlsplit(self._redis_url)
        if parts.scheme == "unix":
            return DefaultWakeup(f"redis+socket://{parts.path}", scope=self.prefix)
        ssl = [(k, v) for k, v in parse_qsl(parts.query, keep_blank_values=True)
               if k.startswith("ssl_")]  # kombu reads these; other redis-py ones it refuses
        query = f"?{urlencode(ssl)}" if ssl else ""
        return DefaultWakeup(f"{parts.scheme}://{parts.netloc}{parts.path}{query}",
                             scope=self.prefix)

    def open_push_listener(self, on_wakeup: Callable[[str | None], None],
                           name: str) -> PushListener | None:
        """A started listener for this prefix's push wake-ups, if ``push_wakeups`` is on
        (see `qmlkit.storage.capabilities.PushWakeups` and `qmlkit_redis.push`).

        Args:
            on_wakeup: Called from the listener's thread with a queue name, or ``None``
                (every queue) after each (re)subscription.
            name: The server's name, for the thread's name and the log.

        Returns:
            The started `PushListener`, or ``None`` when ``push_wakeups`` is off.
        """
        if not self.push_wakeups:
            return None
        listener = PushListener(lambda: self.client, self._k("wakeup"), on_wakeup, name)
        listener.start()
        return listener

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
                    # one hash with invalid UTF-8 must not fail a whole reply: it comes
                    # back as lone surrogates and is quarantined (codec.check_utf8)
                    encoding_errors="surrogateescape",
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
            self._check_server(pool, client)
            self._shas = {name: sha1(getattr(lua, name).encode()).hexdigest()
                          for name in lua.SCRIPTS}
            _load_scripts(client)
            self._generation += 1
            self._pool, self._client = pool, client

    def _check_server(self, pool: redis.ConnectionPool, client: redis.Redis) -> None:
        """Ping and check the fixed keys' types; on failure disconnect and raise the
        error `open` documents."""
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
            found = _key_type(client, key)
            want = expected.get(key) or ("hash" if key.startswith(self.prefix + "job:") else
                                         "zset" if key.startswith(self.prefix + "queue:") else
                                         "set")
            if found not in ("none", want):
                return ForeignKeyType(key, found, want)
        for key, want in expected.items():
            found = _key_type(client, key)
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
        backoff = Backoff(RETRY_INITIAL_S, RETRY_CAP_S)
        attempt = 0
        while True:
            delay = backoff.next()
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
            time.sleep(backoff.jittered(delay))
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
                    # Packed here: redis-py's packer walks every argument once more first.
                    conn.send_packed_command([pack_command(("EVALSHA", sha, 0, *values))])
                    return conn.read_response()
                except redis.exceptions.NoScriptError:
                    conn.send_command("SCRIPT", "LOAD", source)
                    conn.read_response()
                    conn.send_packed_command([pack_command(("EVALSHA", sha, 0, *values))])
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
        mine: tuple[int, redis.Connection] | None = getattr(self._local, "conn", None)
        if mine is not None and mine[0] == self._generation:
            return mine[1]
        pool = self._pool
        assert pool is not None
        conn: redis.Connection = pool.connection_class(**pool.connection_kwargs)
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
        """Encode new jobs as the scripts' groups of values (``newjob.lua``), checking each.

        A run of jobs that share every value but id, arguments and metadata (the jobs of
        one ``enqueue_many``, `group_new_jobs`) makes one group: the shared values are
        encoded and sent once.

        Raises:
            PayloadError: A job's arguments or metadata are not JSON or too large.
            InvalidTransition: A job is not Enqueued or Scheduled.
        """
        values: list[Any] = []
        for job, members in group_new_jobs(jobs, self.max_payload_bytes):
            state = job.state
            values += (
                job.method, job.queue, job.priority, job.max_retries,
                "" if job.timeout_s is None else repr(job.timeout_s),
                to_us(job.created_at), job.attempts, job.retry_count, opt_us(job.expires_at),
                state.name, state.model_dump_json(), state_time(state), len(members) // 3,
            )
            values += members
        return values

    def _decode(self, job_id: str, v: Sequence[Any]) -> tuple[Job, str | None]:
        """JOB_FIELDS values -> (job, None), or (a Failed stand-in, reason) if undecodable."""

        def build() -> Job:
            check_utf8(dict(zip(lua.JOB_FIELDS, v, strict=False)))
            payload = load_json(v[0], "payload")
            return Job(
                id=job_id, method=v[2], args=payload["args"], kwargs=payload["kwargs"],
                queue=v[3], priority=int(v[4]), max_retries=int(v[5]),
                timeout_s=float(v[6]) if v[6] else None, metadata=metadata_of(v),
                created_at=from_us(v[7]), attempts=int(v[8]), retry_count=int(v[9]),
                expires_at=from_us(v[10]) if v[10] else None,
                state=decode_state(v[12]),
            )

        def stand_in(reason: str) -> Job:
            try:
                created: datetime | None = from_us(v[7])
            except (ValueError, TypeError, OverflowError):
                created = None
            return quarantine_stand_in(job_id=job_id, method=v[2], queue=v[3],
                                       created_at=created, reason=reason)

        return decode_job(build, stand_in, stored_state=v[11], subject="job",
                          disagreement=f"state field {v[11]!r} disagrees with the state data")

    def _decode_changes(self, flat: list[Any]) -> list[StateChange]:
        """Per job ``previous state JSON, id, JOB_FIELDS`` (PROMOTE, REQUEUE) -> changes."""
        n = 2 + len(lua.JOB_FIELDS)
        changes = []
        for i in range(0, len(flat), n):
            job, reason = self._decode(flat[i + 1], flat[i + 2:i + n])
            if reason is not None:
                log.error("job %s: %s", flat[i + 1], reason)
                continue
            changes.append(StateChange(job, decode_state(flat[i])))
        return changes


def _load_scripts(client: redis.Redis) -> None:
    """Load every script now, in one pipelined round trip, so that no first call is sent
    twice (``EVALSHA``, ``NOSCRIPT``, ``SCRIPT LOAD``, the same ``EVALSHA`` again): a
    first bulk enqueue of 10,000 jobs is a megabyte. Best effort: on an error (a user
    not allowed ``SCRIPT``, say) each script is loaded by its first call, as after a
    restart."""
    try:
        pipe = client.pipeline(transaction=False)
        for name in lua.SCRIPTS:
            pipe.script_load(getattr(lua, name))
        pipe.execute()
    except redis.RedisError as exc:
        log.debug("scripts not loaded at open (%s): each loads on its first call", exc)


def _key_type(client: redis.Redis, key: str) -> str:
    """``TYPE key``; a str, as the client decodes replies (typed ``bytes | str``)."""
    found = client.type(key)
    return found.decode() if isinstance(found, bytes) else found
