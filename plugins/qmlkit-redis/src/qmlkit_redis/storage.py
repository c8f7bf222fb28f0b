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
from collections.abc import Mapping, Sequence
from datetime import datetime, timezone
from typing import Any, cast

import qmlkit_redis.lua as lua
from qmlkit.errors import (
    DuplicateJob,
    InvalidTransition,
    JobNotFound,
    StaleClaim,
    StorageUnavailable,
)
from qmlkit.job import (
    Enqueued,
    Job,
    JobState,
    Processing,
)
from qmlkit.limits import storable_id
from qmlkit.storage.base import (
    MAX_CLAIM,
    STATS_RETENTION,
    StateChange,
    Storage,
    Transition,
    minute_of,
)
from qmlkit.storage.codec import (
    DECODE_ERRORS,
    check_utf8,
    claimed_job,
    decode_history,
    decode_state,
    held_stand_in,
    undecodable_reason,
)
from qmlkit_redis.connection import RedisConnection
from qmlkit_redis.encoding import (
    DEFAULT_PREFIX,
    FIXED_KEYS,
    ForeignKeyType,
    RedisOptions,
    from_us,
    metadata_of,
    opt_us,
    pad,
    state_time,
    text,
    to_us,
)
from qmlkit_redis.registry import RedisRegistry

__all__ = ["DEFAULT_PREFIX", "FIXED_KEYS", "ForeignKeyType", "RedisOptions", "RedisStorage",
           "from_us", "to_us"]

log = logging.getLogger(__name__)


class RedisStorage(RedisRegistry, RedisConnection, Storage):
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
        push_wakeups: Push wake-ups (`qmlkit_redis.push`): an idle server hears of a job
            from the script that stores it. Also ``?push_wakeups=1`` in the URL.

    Raises:
        ConfigurationError: The URL cannot be parsed or a value is out of range.
    """


    @classmethod
    def from_url(cls, url: str, options: Mapping[str, Any]) -> RedisStorage:
        """Build from a URL and the storage options (the constructor's keyword arguments).

        Raises:
            ConfigurationError: An unknown option (named), or a bad URL or value.
        """
        return cls(url, **RedisOptions.parse(options).given())


    # --- enqueue and read ------------------------------------------------------------------

    def enqueue_many(self, jobs: Sequence[Job]) -> list[Job]:
        """See `Storage.enqueue_many`. One script call (a leaner one for a single job);
        retried calls are idempotent."""
        if not jobs:
            return []
        values = self._new_values(jobs)
        out = self._script("ENQUEUE_ONE" if len(jobs) == 1 else "ENQUEUE", ["0", *values],
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

    def get_many(self, job_ids: Sequence[str]) -> dict[str, Job]:
        """See `Storage.get_many`: one pipeline of ``HMGET`` s, one round trip."""
        ids = sorted({i for i in job_ids if storable_id(i)})
        return {job.id: job for job in self._fetch(ids)} if ids else {}

    def job_states(self, job_ids: Sequence[str]) -> dict[str, str]:
        """See `BatchRead.job_states`: one pipeline of ``HGET state``, nothing decoded."""
        ids = sorted({i for i in job_ids if storable_id(i)})

        def read(_: int) -> list[Any]:
            pipe = self.client.pipeline(transaction=False)
            for job_id in ids:
                pipe.hget(self._k("job:" + job_id), "state")
            return pipe.execute()

        names = self._call(read) if ids else []
        return {i: (n.decode() if isinstance(n, bytes) else n)
                for i, n in zip(ids, names, strict=True) if n is not None}

    def _fetch(self, ids: Sequence[str], state: str | None = None) -> list[Job]:
        """The jobs of ``ids`` still stored (and, given ``state``, still in it), in order."""
        def read(_: int) -> list[Any]:
            pipe = self.client.pipeline(transaction=False)
            for job_id in ids:
                pipe.hmget(self._k("job:" + job_id), lua.JOB_FIELDS)
            return pipe.execute()

        rows = self._call(read)
        return [self._decode(job_id, v)[0] for job_id, v in zip(ids, rows, strict=True)
                if v[11] is not None and (state is None or v[11] == state)]

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
        whole jobs are read. The index and the jobs are two reads: a job that left
        ``state`` between them is left out, so every job answered is in ``state``.
        """
        index = self._k(f"state:{state}" if state else "jobs")
        client = self.client

        def page(start: int, count: int) -> list[str]:
            reply = self._call(lambda _: client.zrevrange(index, start, start + count - 1))
            return cast("list[str]", reply)  # without scores, and decoded: the ids

        if queue is None and method is None:
            return self._fetch(page(offset, limit), state)
        wanted: list[str] = []
        start, chunk = 0, 500
        while len(wanted) < offset + limit:
            ids = page(start, chunk)
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
        return self._fetch(wanted[offset:offset + limit], state)

    def count_jobs(self) -> dict[tuple[str, str], int]:
        """See `Storage.count_jobs`. Reads the ``counts`` hash the scripts keep exact."""
        reply = self._call(lambda _: self.client.hgetall(self._k("counts")), [self._k("counts")])
        raw = cast("dict[str, str]", reply)  # decoded: "queue|state" -> count
        counts: dict[tuple[str, str], int] = {}
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
                state_time(state), server, opt_us(expires_at)], keys=[key])
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
                    processing.model_dump_json(), "0", "1" if self.push_wakeups else "0",
                    *queues]
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
        processing = Processing.model_validate_json(argv[3])  # the state this claim stamped
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
                check_utf8({"payload": v[0], "metadata": v[1], "method": v[2], "queue": v[3]})
                job = claimed_job({
                    "id": job_id, "method": v[2], "payload": v[0], "job_metadata": metadata_of(v),
                    "queue": v[3], "priority": int(v[4]), "retry_count": int(v[9]),
                    "max_retries": int(v[5]), "timeout_s": float(v[6]) if v[6] else None,
                    "created_at": from_us(v[7]),
                    "expires_at": from_us(v[10]) if v[10] else None,
                }, attempts, processing)
                previous: JobState | None = None
                if with_previous:
                    previous = (Enqueued(enqueued_at=processing.started_at, queue=job.queue,
                                         reason="claim replayed after a lost reply")
                                if replayed else decode_state(v[12]))
            except DECODE_ERRORS as exc:
                stand_in, reason = self._decode(job_id, v)
                reason = reason or undecodable_reason(exc, "job")
                log.error("job %s quarantined: %s", job_id, reason)
                held = held_stand_in(stand_in, attempts, processing)
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
                state_time(state), opt_us(job.expires_at),
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
        flat = self._script("PROMOTE", [to_us(now), pad(now), max(1, limit), head, tail])
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
        flat = self._script("REQUEUE", ["stranded", to_us(started_before), pad(now), head, tail,
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
                pipe.delete(*(self._k(f"stats:{text(m)}") for m in old))
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
        return decode_history(text(v[0] or ""), text(v[1]), job_id=job_id, logger=log)

    def throughput(self, *, since: datetime, until: datetime) -> list[tuple[datetime, int, int]]:
        """See `Storage.throughput`: ``stats:<minute>`` hashes (``Succeeded``, ``Failed``)
        listed by the ``stats-minutes`` sorted set, both written by the scripts."""
        low, high = int(minute_of(since).timestamp()), until.timestamp()
        minutes_key = self._k("stats-minutes")

        def read(_: int) -> list[tuple[datetime, int, int]]:
            minutes = [int(text(m)) for m in self.client.zrangebyscore(minutes_key, low, high)]
            pipe = self.client.pipeline(transaction=False)
            for m in minutes:
                pipe.hmget(self._k(f"stats:{m}"), "Succeeded", "Failed")
            counts = pipe.execute() if minutes else []
            return [(datetime.fromtimestamp(m, timezone.utc), int(ok or 0), int(bad or 0))
                    for m, (ok, bad) in zip(minutes, counts, strict=False)]

        return self._call(read, [minutes_key])

    def report_progress(self, job_id: str, *, token: int, progress: Mapping[str, Any]) -> bool:
        """See `Storage.report_progress`: one fenced script writes the job hash's
        ``progress`` field, which reads merge into ``metadata["progress"]``."""
        entry = json.dumps(dict(progress), separators=(",", ":"))
        return bool(self._script("PROGRESS", [job_id, token, entry]))

