"""The portable SQL algorithms behind `SQLDialect`'s default operations.

Written with SQLAlchemy Core and the dialect's primitives only, so any database with
transactions runs them; SQLite does. A dialect may replace any of them with a faster
statement of its own (the PostgreSQL plugin claims, acknowledges and requeues in one
statement each). Each function takes the `SQLStorage` and uses the public members of
`qmlkit.storage.sql.seam.SQLStore` and the dialect's `Primitives`.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from datetime import datetime
from typing import TYPE_CHECKING, Any

import sqlalchemy as sa
from sqlalchemy.engine import Connection

from qmlkit.errors import StaleClaim
from qmlkit.job import Enqueued, Job, JobState, Processing
from qmlkit.storage.base import MAX_CLAIM, StateChange, Transition, minute_of
from qmlkit.storage.codec import (
    DECODE_ERRORS,
    claimed_job,
    decode_state,
    outcome_at,
    state_columns,
)
from qmlkit.storage.sql.executor import log
from qmlkit.storage.sql.schema import state_is

if TYPE_CHECKING:
    from qmlkit.storage.sql.seam import Primitives, SQLStore

__all__ = ["acknowledge", "claim", "count_outcomes", "move", "promote_due",
           "reclaim_dead_servers", "requeue_stranded"]

ClaimResult = list[tuple[Job, JobState | None]]


def count_outcomes(dialect: Primitives, storage: SQLStore, cursor: Any,
                   states: Sequence[JobState]) -> None:
    """Add Succeeded/Failed outcomes to the per-minute counters (one upsert)."""
    counts: dict[tuple[Any, str], int] = {}
    for state in states:
        at = outcome_at(state)
        if at is None:
            continue
        key = (dialect.bind_ts(minute_of(at)), state.name)
        counts[key] = counts.get(key, 0) + 1
    if not counts:
        return
    st = storage.stats

    def build() -> Any:
        insert = dialect.insert(st).values(
            minute=sa.bindparam("m", type_=dialect.timestamp_bind_type),
            state=sa.bindparam("s"), count=sa.bindparam("n"))
        return insert.on_conflict_do_update(
            index_elements=[st.c.minute, st.c.state],
            set_={"count": st.c.count + insert.excluded.count})

    storage.executor.run(cursor, ("stats-upsert",), build,
                         [{"m": m, "s": name, "n": n} for (m, name), n in counts.items()],
                         many=True)


def _claim_rows(dialect: Primitives, storage: SQLStore, cursor: Any, queues: Sequence[str],
                limit: int) -> list[dict[str, Any]]:
    jobs = storage.jobs
    c = jobs.c
    names = [f"q{i}" for i in range(len(queues))]
    claimed_columns = [col for col in jobs.columns if col.key != "history"]

    def build() -> Any:
        query = (
            sa.select(*claimed_columns)
            .where(state_is(c.state, "Enqueued"))
            .order_by(c.priority.desc(), c.enqueued_at, c.id)  # id: FIFO within a batch
            .limit(sa.bindparam("limit", type_=sa.Integer, literal_execute=False))
        )
        if names:
            query = query.where(sa.or_(*(c.queue == sa.bindparam(n) for n in names)))
        return dialect.lock_rows(query)

    params = dict(zip(names, queues, strict=False), limit=limit)
    result = storage.executor.run(cursor, ("claim", len(names)), build, params)
    keys = [col.key for col in claimed_columns]
    rows = []
    for raw in result.fetchall():
        row = dict(zip(keys, raw, strict=False))
        for k in ("created_at", "expires_at"):
            row[k] = dialect.result_ts(row[k])
        rows.append(row)
    return rows


def claim(dialect: Primitives, storage: SQLStore, *, worker_id: str, server_name: str,
          queues: Sequence[str], limit: int, now: datetime,
          with_previous: bool) -> ClaimResult:
    """Select up to ``limit`` Enqueued rows (locked where the dialect can), then update
    them to Processing in the same write transaction; undecodable rows are quarantined."""
    limit = max(1, min(limit, MAX_CLAIM))
    jobs = storage.jobs
    c = jobs.c
    processing = Processing(started_at=now, worker_id=worker_id, server_name=server_name)
    columns = state_columns(processing)
    queues = list(queues)

    def build_update() -> Any:
        return (
            jobs.update()
            .where(c.id == sa.bindparam("b_id"))
            .values(state=sa.bindparam("state"), state_data=sa.bindparam("state_data"),
                    due_at=None,  # enqueued_at kept: a requeue restores the place
                    started_at=sa.bindparam("started_at", type_=sa.Float),
                    server_name=sa.bindparam("server_name"),
                    attempts=c.attempts + 1, history=dialect.history_append())
        )

    def write(cursor: Any) -> ClaimResult:
        rows = _claim_rows(dialect, storage, cursor, queues, limit)
        if not rows:
            return []
        claimed, updates = [], []
        started = dialect.bind_ts(now)
        for row in rows:
            if row["state_data"].startswith('{"name":"Enqueued"'):
                try:  # fast path: the new state is known, only the payload needs decoding
                    job = claimed_job(row, row["attempts"] + 1, processing)
                    previous = decode_state(row["state_data"]) if with_previous else None
                except DECODE_ERRORS:
                    pass  # decoded again below, for the reason
                else:
                    claimed.append((job, previous))
                    updates.append({**columns, "started_at": started, "b_id": job.id})
                    continue
            stand_in, reason = storage.decode(row)
            if reason is None:  # valid after all (an unusual encoding of the state)
                claimed.append((stand_in.with_state(processing, attempts=stand_in.attempts + 1),
                                stand_in.state))
                updates.append({**columns, "started_at": started, "b_id": stand_in.id})
                continue
            log.error("job %s quarantined: %s", stand_in.id, reason)
            updates.append({**state_columns(stand_in.state), "b_id": stand_in.id})
        storage.executor.run(cursor, ("claim-update",), build_update, updates, many=True)
        return claimed

    return storage.executor.write_raw(write)


def acknowledge(dialect: Primitives, storage: SQLStore,
                items: Sequence[Transition]) -> list[Job | StaleClaim]:
    """Check which items still hold their claim, update those (one ``executemany``) and
    count their outcomes, in one write transaction."""
    if not items:
        return []
    jobs, executor = storage.jobs, storage.executor
    c = jobs.c
    applied = [item.applied() for item in items]
    params = []
    cache: dict[int, dict[str, Any]] = {}
    for item, job in zip(items, applied, strict=True):
        columns = cache.get(id(job.state))
        if columns is None:
            columns = cache[id(job.state)] = state_columns(job.state)
        params.append({
            **columns, "b_id": item.job.id, "b_token": item.token,
            "retry_count": job.retry_count,
        })
        for key in ("enqueued_at", "due_at", "started_at"):
            params[-1][key] = dialect.bind_ts(columns[key])
        params[-1]["expires_at"] = dialect.bind_ts(job.expires_at)
    # The check's IN list has a bind per id: padded to a power of two (repeating the last
    # id), so the statement is compiled for about 16 shapes, not once per batch size.
    n = 1 << (len(items) - 1).bit_length()

    def build_check() -> Any:
        return sa.select(c.id, c.attempts).where(state_is(c.state, "Processing")).where(
            c.id.in_([sa.bindparam(f"i{k}") for k in range(n)]))

    def build_update() -> Any:
        fields = ("state", "state_data", "enqueued_at", "due_at", "started_at",
                  "server_name", "retry_count", "expires_at")
        return (
            jobs.update()
            .where(c.id == sa.bindparam("b_id"))
            .values({**{f: sa.bindparam(f) for f in fields},
                     "history": dialect.history_append()})
        )

    def write(cursor: Any) -> set[str]:
        ids = {f"i{k}": item.job.id for k, item in enumerate(items)}
        last = items[-1].job.id
        ids.update({f"i{k}": last for k in range(len(items), n)})
        live = set(map(tuple, executor.run(cursor, ("ack-check", n), build_check, ids).fetchall()))
        ok = [p for p in params if (p["b_id"], p["b_token"]) in live]
        if ok:
            executor.run(cursor, ("ack-update",), build_update, ok, many=True)
            done_ids = {p["b_id"] for p in ok}
            count_outcomes(dialect, storage, cursor,
                           [job.state for item, job in zip(items, applied, strict=True)
                            if item.job.id in done_ids])
        return {p["b_id"] for p in ok}

    done = executor.write_raw(write)
    return [
        job if item.job.id in done else StaleClaim(item.job.id, item.token)
        for item, job in zip(items, applied, strict=True)
    ]


def move(dialect: Primitives, storage: SQLStore, conn: Connection, where: sa.ColumnElement[bool],
         make_state: Callable[[Job], JobState], limit: int | None = None, *,
         keep_place: bool = False) -> list[StateChange]:
    """Move every job matching ``where`` to ``make_state(job)`` in this transaction;
    rows that will not decode are left where they are. With ``keep_place``, a job moved
    to Enqueued keeps the ``enqueued_at`` its row still holds (claims keep the column),
    so a requeued job goes back to its place in the queue."""
    jobs = storage.jobs
    c = jobs.c
    query = jobs.select().where(where).order_by(c.id)
    if limit is not None:
        query = query.limit(limit)
    query = dialect.lock_rows(query)
    changes = []
    for row in conn.execute(query).all():
        job, corrupt = storage.decode(row)
        if corrupt:
            continue
        state = make_state(job)
        if keep_place and isinstance(state, Enqueued) and row.enqueued_at is not None:
            state = state.model_copy(update={"enqueued_at": row.enqueued_at})
        moved = job.with_state(state)
        conn.execute(jobs.update().where(c.id == job.id).values(
            {**state_columns(state), "history": dialect.history_append()}))
        changes.append(StateChange(moved, job.state))
    return changes


def promote_due(dialect: Primitives, storage: SQLStore, *, now: datetime,
                limit: int) -> list[StateChange]:
    """Move due Scheduled and AwaitingRetry jobs to Enqueued."""
    c = storage.jobs.c
    where = state_is(c.state, "Scheduled", "AwaitingRetry") & (c.due_at <= now)
    return storage.executor.write(lambda conn: move(
        dialect, storage, conn, where, lambda j: Enqueued(enqueued_at=now, queue=j.queue), limit))


def requeue_stranded(dialect: Primitives, storage: SQLStore, *, started_before: datetime,
                     now: datetime, exclude_servers: Sequence[str]) -> list[StateChange]:
    """Move Processing jobs started before ``started_before`` back to Enqueued."""
    c = storage.jobs.c
    where = state_is(c.state, "Processing") & (c.started_at < started_before)
    if exclude_servers:
        where = where & c.server_name.not_in(list(exclude_servers))
    return storage.executor.write(lambda conn: move(
        dialect, storage, conn, where,
        lambda j: Enqueued(enqueued_at=now, queue=j.queue, reason="stranded"), keep_place=True))


def reclaim_dead_servers(dialect: Primitives, storage: SQLStore, *, heartbeat_before: datetime,
                         now: datetime) -> list[StateChange]:
    """Deregister servers with a stale heartbeat and requeue their Processing jobs."""
    s, c = storage.servers, storage.jobs.c

    def write(conn: Connection) -> list[StateChange]:
        dead = list(conn.execute(
            sa.select(s.c.id).where(s.c.last_heartbeat < heartbeat_before)
        ).scalars())
        if dead:
            conn.execute(s.delete().where(s.c.id.in_(dead)))
        # Orphans: stamped with a registered id ("name#uuid") that has no row, claimed
        # before the bound (a server registering right now is not robbed).
        orphaned = (c.server_name.contains("#", autoescape=True) & (c.started_at < heartbeat_before)
                    & c.server_name.not_in(sa.select(s.c.id)))
        owner_dead = c.server_name.in_(dead) | orphaned if dead else orphaned
        where = state_is(c.state, "Processing") & owner_dead
        return move(dialect, storage, conn, where,
                    lambda j: Enqueued(enqueued_at=now, queue=j.queue, reason="reclaimed"),
                    keep_place=True)

    return storage.executor.write(write)
