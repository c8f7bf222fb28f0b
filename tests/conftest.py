"""Shared fixtures: service checks, per-run isolation, apps on every built-in backend."""

from __future__ import annotations

import os
import socket
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest

from qmlkit import App

#: One id per test session: prefixes, schemas and database names derive from it.
RUN_ID = uuid.uuid4().hex[:8]


def require_service(name: str, host: str, port: int) -> None:
    """Skip the test if ``host:port`` does not accept a connection; fail instead under CI=true."""
    try:
        with socket.create_connection((host, port), timeout=1.0):
            return
    except OSError as exc:
        message = f"{name} is not reachable on {host}:{port}: {exc}"
        if os.environ.get("CI", "").lower() == "true":
            pytest.fail(message + " (CI=true: a missing service fails the run)")
        pytest.skip(message)


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


@pytest.fixture(params=["memory", "sqlite"])
def backend_url(request: pytest.FixtureRequest) -> str:
    """The URL of each built-in backend in turn (contract-style tests of whole apps)."""
    return request.getfixturevalue(f"{request.param}_url")


@pytest.fixture
def app(backend_url: str) -> Iterator[App]:
    """An empty app on each built-in backend, closed afterwards."""
    application = App("test", storage=backend_url, autoload=False)
    yield application
    application.close()
