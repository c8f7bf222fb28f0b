"""Orphan reclaim (issue #17, item 6): a Processing job whose owner has no live server
row is reclaimed by a running peer, whichever came first, the pruning or the pass."""

from __future__ import annotations

from datetime import timedelta

from qmlkit.job import Job, utcnow
from qmlkit.storage.base import ServerInfo, Storage
from qmlkit.testing import make_job

DEAD_AFTER = timedelta(seconds=60)


def register(storage: Storage, server_id: str, at=None) -> None:
    at = at or utcnow()
    storage.register_server(ServerInfo(id=server_id, name=server_id.split("#")[0],
                                       worker_count=1, queues=[], started_at=at,
                                       last_heartbeat=at))


def claim_one(storage: Storage, server: str) -> Job:
    (job,) = storage.claim(worker_id="w", server_name=server, queues=(), limit=1, now=utcnow())
    return job


def test_job_of_a_pruned_row_is_reclaimed_by_a_live_peer(storage: Storage) -> None:
    storage.enqueue_many([make_job() for _ in range(3)])
    register(storage, "gone#1")
    register(storage, "peer#1")
    orphan = claim_one(storage, "gone#1")
    plain = claim_one(storage, "plain")  # a server without heartbeats: never registered
    mine = claim_one(storage, "peer#1")
    storage.deregister_server("gone#1")  # pruned / half-finished stop
    now = utcnow()
    # a claim younger than the dead-server timeout is not taken (its owner may be registering)
    assert storage.reclaim_dead_servers(heartbeat_before=now - DEAD_AFTER, now=now) == []
    later = now + 2 * DEAD_AFTER
    assert storage.heartbeat("peer#1", now=later)
    changes = storage.reclaim_dead_servers(heartbeat_before=later - DEAD_AFTER, now=later)
    assert [c.job.id for c in changes] == [orphan.id]
    assert changes[0].job.state.reason == "reclaimed"
    assert storage.get(orphan.id).state.name == "Enqueued"
    assert storage.get(plain.id).state.name == "Processing"
    assert storage.get(mine.id).state.name == "Processing"
    assert [s.id for s in storage.list_servers()] == ["peer#1"]
    (again,) = storage.claim(worker_id="w2", server_name="peer#1", queues=(), limit=1, now=later)
    assert again.id == orphan.id and again.attempts == orphan.attempts + 1


def test_job_claimed_after_its_row_was_reclaimed_is_reclaimed_by_the_next_pass(
    storage: Storage,
) -> None:
    storage.enqueue_many([make_job() for _ in range(2)])
    start = utcnow()
    register(storage, "zombie#1", at=start - 3 * DEAD_AFTER)
    register(storage, "peer#1")
    assert storage.reclaim_dead_servers(heartbeat_before=start - DEAD_AFTER, now=start) == []
    assert [s.id for s in storage.list_servers()] == ["peer#1"]
    orphan = claim_one(storage, "zombie#1")  # the zombie wakes and claims without a row
    later = start + 2 * DEAD_AFTER
    assert storage.heartbeat("peer#1", now=later)
    changes = storage.reclaim_dead_servers(heartbeat_before=later - DEAD_AFTER, now=later)
    assert [c.job.id for c in changes] == [orphan.id]
    assert storage.get(orphan.id).state.name == "Enqueued"
