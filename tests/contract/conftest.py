"""The storage contract suite's fixture: one ``storage`` per backend, resolved by URL.

A new backend adds one ``pytest.param`` here and one ``<name>_url`` fixture, and is done
when the whole suite passes against the real service.
"""

from __future__ import annotations

from collections.abc import Iterator

import pytest

from qmlkit.plugins import make_plugin_manager, resolve_storage
from qmlkit.storage.base import Storage

BACKENDS = [pytest.param("memory"), pytest.param("sqlite")]


@pytest.fixture(params=BACKENDS)
def storage_url(request: pytest.FixtureRequest) -> str:
    """The URL of each backend in turn."""
    return request.getfixturevalue(f"{request.param}_url")


@pytest.fixture
def storage(storage_url: str) -> Iterator[Storage]:
    """An opened storage for each backend, resolved the way a server resolves it."""
    store = resolve_storage(make_plugin_manager(autoload=False), storage_url, {})
    store.open()
    yield store
    store.close()
