"""Shared fixtures: service checks, per-run isolation, apps on every built-in backend."""

from __future__ import annotations

import importlib.util
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest

from qmlkit import App
from qmlkit.testing import require_service, skip_or_fail

__all__ = ["RUN_ID", "backend_plugins", "require_service"]

#: One id per test session: prefixes, schemas and database names derive from it.
RUN_ID = uuid.uuid4().hex[:8]


@pytest.fixture
def run_id() -> str:
    """The test session's id."""
    return RUN_ID


@pytest.fixture
def sqlite_url(tmp_path: Path) -> str:
    """A fresh SQLite file for this test."""
    return f"sqlite:///{tmp_path / 'qmlkit.db'}"


@pytest.fixture
def memory_url() -> str:
    """In-process storage."""
    return "memory://"


def backend_plugins(url: str) -> list[object]:
    """The plugin modules an app with ``autoload=False`` needs for ``url``'s backend."""
    if url.startswith("postgres"):
        import qmlkit_postgres.plugin

        return [qmlkit_postgres.plugin]
    if url.startswith(("redis", "rediss", "unix")):
        import qmlkit_redis.plugin

        return [qmlkit_redis.plugin]
    return []


def require_plugin(module: str, distribution: str) -> None:
    """Skip unless the plugin package is installed (the README's test command installs
    it); under ``CI=true`` a missing plugin fails the test instead."""
    if importlib.util.find_spec(module) is None:
        skip_or_fail(f"{distribution} is not installed: pip install -e plugins/{distribution}",
                     "the README's test command installs it")


@pytest.fixture
def redis_url() -> Iterator[str]:
    """The shared Redis on loopback under a key prefix of this test's own, emptied afterwards."""
    require_plugin("qmlkit_redis", "qmlkit-redis")
    require_service("Redis", "127.0.0.1", 6379)
    prefix = f"qmlkit-test:{RUN_ID}:{uuid.uuid4().hex[:6]}:"
    yield f"redis://127.0.0.1:6379/0?prefix={prefix}"
    import redis

    client = redis.Redis(host="127.0.0.1", port=6379, db=0)
    try:
        keys = list(client.scan_iter(match=f"{prefix}*", count=1000))
        for start in range(0, len(keys), 500):
            client.delete(*keys[start:start + 500])
    finally:
        client.close()


@pytest.fixture
def redis_push_url(redis_url: str) -> str:
    """``redis_url`` with push wake-ups on (qmlkit_redis.push): claims mark idle queues."""
    return redis_url + "&push_wakeups=1"


@pytest.fixture
def postgres_url() -> Iterator[str]:
    """The shared PostgreSQL database ``test`` in a schema of this test's own, dropped
    afterwards."""
    require_plugin("qmlkit_postgres", "qmlkit-postgres")
    require_service("PostgreSQL", "127.0.0.1", 5432)
    schema = f"qmlkit_test_{RUN_ID}_{uuid.uuid4().hex[:6]}"
    yield f"postgresql+psycopg://127.0.0.1:5432/test?schema={schema}"
    import sqlalchemy as sa

    engine = sa.create_engine("postgresql+psycopg://127.0.0.1:5432/test")
    try:
        with engine.begin() as conn:
            conn.execute(sa.text(f'DROP SCHEMA IF EXISTS "{schema}" CASCADE'))
    finally:
        engine.dispose()


@pytest.fixture(params=[
    pytest.param("memory"),
    pytest.param("sqlite"),
    pytest.param("postgres", marks=pytest.mark.postgres),
    pytest.param("redis", marks=pytest.mark.redis),
])
def backend_url(request: pytest.FixtureRequest) -> str:
    """The URL of each backend in turn (contract-style tests of whole apps)."""
    return request.getfixturevalue(f"{request.param}_url")


@pytest.fixture
def app(backend_url: str) -> Iterator[App]:
    """An empty app on each built-in backend, closed afterwards."""
    application = App("test", storage=backend_url, autoload=False,
                      plugins=backend_plugins(backend_url))
    yield application
    application.close()
