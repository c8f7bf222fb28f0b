"""Requeued jobs keep their place in the queue (issue #17, item 1): a job taken back from
a dead server (heartbeat reclaim), from an orphaned claim (no server row) or by the
stranded sweep is claimed again before the jobs enqueued after it, on every backend."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any
from datetime import datetime, timedelta

import pytest

from qmlkit.job import Job, utcnow
from qmlkit.storage.base import ServerInfo, StateChange, Storage
from qmlkit.testing import make_job

DEAD_AFTER = timedelta(seconds=60)


def register(storage: Storage, server_id: str, at: datetime) -> None:
    storage.register_server(ServerInfo(id=server_id, name=server_id.split("#")[0],
                                       worker_count=1, queues=[], started_at=at,
                                       last_heartbeat=at))


def dead_server(storage: Storage, start: datetime) -> tuple[str, Callable[[], list[StateChange]]]:
    """A registered server whose heartbeat is long stale; a peer's reclaim pass."""
    register(storage, "dead#1", start - 3 * DEAD_AFTER)
    return "dead#1", lambda: storage.reclaim_dead_servers(
        heartbeat_before=start - DEAD_AFTER, now=start)


def orphan(storage: Storage, start: datetime) -> tuple[str, Callable[[], list[StateChange]]]:
    """A claim stamped with a registered id whose row is gone (pruned)."""
    register(storage, "gone#1", start - 3 * DEAD_AFTER)
    storage.deregister_server("gone#1")
    return "gone#1", lambda: storage.reclaim_dead_servers(
        heartbeat_before=start - DEAD_AFTER, now=start)


def stranded(storage: Storage, start: datetime) -> tuple[str, Callable[[], list[StateChange]]]:
    """A claim of a server without heartbeats, older than the stranded threshold."""
    return "plain", lambda: storage.requeue_stranded(
        started_before=start - DEAD_AFTER, now=start)


@pytest.mark.parametrize("owner", [dead_server, orphan, stranded])
def test_a_requeued_job_is_claimed_before_the_jobs_enqueued_after_it(
    storage: Storage, owner: Callable[[Storage, datetime], tuple[str, Callable[[], Any]]]
) -> None:
    # Given A, B, C enqueued in that order, and A claimed long ago by a server that died
    start = utcnow()
    first = start - 5 * DEAD_AFTER
    a, b, c = (make_job(enqueued_at=first + timedelta(seconds=n)) for n in range(3))
    for job in (a, b, c):
        storage.enqueue(job)
    server, requeue = owner(storage, start)
    (claimed,) = storage.claim(worker_id="w", server_name=server, queues=(), limit=1,
                               now=start - 3 * DEAD_AFTER)
    assert claimed.id == a.id
    # When its job is requeued
    changes = requeue()
    assert [change.job.id for change in changes] == [a.id]
    # Then A is back at its place, claimed before B and C
    back = storage.get(a.id)
    assert back.state.name == "Enqueued"
    assert back.state.enqueued_at == a.state.enqueued_at
    again: list[Job] = storage.claim(worker_id="w2", server_name="peer", queues=(), limit=3,
                                     now=start)
    assert [job.id for job in again] == [a.id, b.id, c.id]
    assert again[0].attempts == claimed.attempts + 1  # the old claim is stale
