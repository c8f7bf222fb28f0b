"""Fixtures of the qmlkit-redis tests: the shared Redis under a prefix of each test's own,
and a ``redis-server`` of a test's own for restarts."""

from __future__ import annotations

import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest

from qmlkit.testing import RedisProcess, require_service, skip_or_fail

#: One id per test session, in every prefix this session uses.
RUN_ID = uuid.uuid4().hex[:8]


def delete_prefix(url: str, prefix: str) -> None:
    """Delete every key under ``prefix`` in the Redis at ``url``."""
    import redis

    client = redis.Redis.from_url(url)
    try:
        keys = list(client.scan_iter(match=f"{prefix}*", count=1000))
        for start in range(0, len(keys), 500):
            client.delete(*keys[start:start + 500])
    finally:
        client.close()


@pytest.fixture
def redis_prefix() -> str:
    """A key prefix of this test's own."""
    return f"qmlkit-test:{RUN_ID}:{uuid.uuid4().hex[:6]}:"


@pytest.fixture
def redis_url(redis_prefix: str) -> Iterator[str]:
    """The shared Redis on 127.0.0.1:6379 under this test's prefix, emptied afterwards."""
    require_service("Redis", "127.0.0.1", 6379)
    yield f"redis://127.0.0.1:6379/0?prefix={redis_prefix}"
    delete_prefix("redis://127.0.0.1:6379/0", redis_prefix)


@pytest.fixture
def own_redis(tmp_path: Path) -> Iterator[RedisProcess]:
    """A ``redis-server`` of this test's own with an append-only file, stopped afterwards."""
    if not RedisProcess.available():
        skip_or_fail("no redis-server binary on PATH", "a missing service fails the run")
    server = RedisProcess(tmp_path, appendonly=True)
    server.start()
    yield server
    server.stop()
