"""One undecodable row does not stop its queue (issue #17, item 6): it is quarantined
alone, its raw bytes kept, and every read, list and claim still works. SQLite part;
the corrupt rows are written with the raw client, as a user's damaged data would be."""

from __future__ import annotations

import sqlite3

import pytest

from qmlkit.job import utcnow
from qmlkit.storage.codec import QUARANTINE_EXCEPTION
from qmlkit.storage.sql import SQLStorage
from qmlkit.testing import make_job

CORRUPT = {
    "invalid-utf8": b'{"args": ["\xff\xfe"], "kwargs": {}}',
    "truncated": b'{"args": [1, 2',
    "wrong-types": b'{"args": {"a": 1}, "kwargs": []}',
}


@pytest.mark.parametrize("damage", sorted(CORRUPT))
def test_sqlite_undecodable_row_is_quarantined_alone(sqlite_url: str, damage: str) -> None:
    storage = SQLStorage(sqlite_url)
    storage.open()
    try:
        bad, *good = [make_job(args=[i]) for i in range(4)]
        storage.enqueue_many([bad, *good])
        path = sqlite_url.removeprefix("sqlite:///")
        with sqlite3.connect(path) as raw:
            table = next(n for (n,) in raw.execute(
                "SELECT name FROM sqlite_master WHERE type='table' AND name LIKE '%jobs'"))
            raw.execute(f"UPDATE {table} SET payload = CAST(? AS TEXT) WHERE id = ?",
                        (CORRUPT[damage], bad.id))
        assert {j.id for j in storage.list_jobs()} >= {bad.id, *(j.id for j in good)}
        assert storage.get(bad.id).state.exception_type == QUARANTINE_EXCEPTION
        claimed = storage.claim(worker_id="w", server_name="s", queues=(), limit=10,
                                now=utcnow())
        assert sorted(j.id for j in claimed) == sorted(j.id for j in good)
        stored = storage.get(bad.id)
        assert stored.state.name == "Failed"
        assert stored.state.exception_type == QUARANTINE_EXCEPTION and stored.state.message
        with sqlite3.connect(path) as raw:
            (kept,) = raw.execute(f"SELECT CAST(payload AS BLOB) FROM {table} WHERE id = ?",
                                  (bad.id,)).fetchone()
        assert bytes(kept) == CORRUPT[damage]
    finally:
        storage.close()


@pytest.mark.redis
def test_redis_undecodable_hash_is_quarantined_alone(redis_url: str) -> None:
    import redis

    from qmlkit_redis.storage import RedisStorage

    storage = RedisStorage(redis_url)
    storage.open()
    try:
        bad, *good = [make_job(args=[i]) for i in range(4)]
        storage.enqueue_many([bad, *good])
        prefix = redis_url.split("prefix=", 1)[1]
        raw = redis.Redis(host="127.0.0.1", port=6379, db=0)
        raw.hset(f"{prefix}job:{bad.id}", "payload", CORRUPT["invalid-utf8"])
        assert {j.id for j in storage.list_jobs()} >= {bad.id, *(j.id for j in good)}
        assert storage.get(bad.id).state.exception_type == QUARANTINE_EXCEPTION
        claimed = storage.claim(worker_id="w", server_name="s", queues=(), limit=10,
                                now=utcnow())
        assert sorted(j.id for j in claimed) == sorted(j.id for j in good)
        stored = storage.get(bad.id)
        assert stored.state.name == "Failed"
        assert stored.state.exception_type == QUARANTINE_EXCEPTION
        assert raw.hget(f"{prefix}job:{bad.id}", "payload") == CORRUPT["invalid-utf8"]
    finally:
        storage.close()


def test_sqlite_stand_in_of_an_id_older_versions_accepted_still_reads(sqlite_url: str) -> None:
    storage = SQLStorage(sqlite_url)
    storage.open()
    try:
        job = make_job()
        storage.enqueue(job)
        long_id = "x" * 70 + "\x00"
        with sqlite3.connect(sqlite_url.removeprefix("sqlite:///")) as raw:
            table = next(n for (n,) in raw.execute(
                "SELECT name FROM sqlite_master WHERE type='table' AND name LIKE '%jobs'"))
            raw.execute(f"UPDATE {table} SET id = ?, payload = ? WHERE id = ?",
                        (long_id, '{"args": [1', job.id))
        (stand_in,) = [j for j in storage.list_jobs() if j.id == long_id]
        assert stand_in.state.exception_type == QUARANTINE_EXCEPTION
    finally:
        storage.close()
