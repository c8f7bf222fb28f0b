"""The storage contract suite's fixture: one ``storage`` per backend, resolved by URL.

A new backend adds one ``pytest.param`` here and one ``<name>_url`` fixture (in
``tests/conftest.py``), and is done
when the whole suite passes against the real service.
"""

from __future__ import annotations

from collections.abc import Iterator

import pytest

from qmlkit import App, Server
from qmlkit.storage.base import Storage

BACKENDS = [
    pytest.param("memory"),
    pytest.param("sqlite"),
    pytest.param("redis", marks=pytest.mark.redis),
    pytest.param("redis_push", marks=pytest.mark.redis),
    pytest.param("postgres", marks=pytest.mark.postgres),
]


@pytest.fixture(params=BACKENDS)
def storage_url(request: pytest.FixtureRequest) -> str:
    """The URL of each backend in turn."""
    return request.getfixturevalue(f"{request.param}_url")


@pytest.fixture
def storage(storage_url: str) -> Iterator[Storage]:
    """An opened storage for each backend, obtained through ``Server.from_plugins``.

    Entry-point plugins load too, so a backend shipped as a plugin package is found the
    way users find it.
    """
    server = Server.from_plugins(app=App("contract", autoload=False), storage=storage_url)
    store = server.storage
    store.open()
    yield store
    store.close()
