"""The server registry carries each server's pool, concurrency and busy slots (issue #14,
item 3) on every backend, with no schema change: the fields live in the stored entry."""

from __future__ import annotations

from datetime import timedelta

from qmlkit.job import utcnow
from qmlkit.storage.base import ServerInfo, Storage


def test_pool_concurrency_and_busy_slots_round_trip_and_refresh(storage: Storage) -> None:
    now = utcnow()
    info = ServerInfo(id="io#1", name="io", worker_count=500, queues=["default"],
                      started_at=now, last_heartbeat=now, pool="asyncio", busy=0)
    storage.register_server(info)
    (listed,) = storage.list_servers()
    assert (listed.pool, listed.worker_count, listed.busy) == ("asyncio", 500, 0)
    # The heartbeat refreshes the entry when the busy slots changed: registering again
    # replaces it, keeps the start time, and the server stays one live entry.
    later = now + timedelta(seconds=5)
    storage.register_server(info.model_copy(update={"busy": 312, "last_heartbeat": later}))
    assert storage.heartbeat("io#1", now=later + timedelta(seconds=1))
    (listed,) = storage.list_servers()
    assert (listed.pool, listed.busy, listed.started_at) == ("asyncio", 312, now)
    assert listed.last_heartbeat == later + timedelta(seconds=1)


def test_an_entry_without_pool_fields_reads_as_a_thread_pool(storage: Storage) -> None:
    now = utcnow()
    # What a server of an earlier release wrote: no pool, no busy.
    old = ServerInfo.model_validate({"id": "old#1", "name": "old", "worker_count": 5,
                                     "queues": [], "started_at": now, "last_heartbeat": now})
    storage.register_server(old)
    (listed,) = storage.list_servers()
    assert (listed.pool, listed.busy) == ("threads", 0)
