"""Fixtures of the dashboard tests: an app on a SQLite file, the dashboard in-process
(FastAPI's test client) or served by uvicorn on a free loopback port, and a worker."""

from __future__ import annotations

import threading
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

pytest.importorskip("fastapi", reason="the dashboard extra is not installed")

import uvicorn
from fastapi.testclient import TestClient

from qmlkit import App
from qmlkit.dashboard import DashboardConfig, create_app
from qmlkit.dashboard.web import websocket_protocol
from qmlkit.testing import free_port, wait_until
from tests.integration.test_field_cases import FAST, running  # noqa: F401

#: The Host header of a request to the dashboard on loopback.
LOCAL = "http://127.0.0.1"


@pytest.fixture
def app(tmp_path: Path) -> Iterator[App]:
    """An app on a fresh SQLite file, no entry-point plugins."""
    application = App("dash-test", storage=f"sqlite:///{tmp_path / 'dash.db'}", autoload=False)
    yield application
    application.close()


ClientFactory = Callable[..., TestClient]


@pytest.fixture
def client_for(app: App) -> Iterator[ClientFactory]:
    """Make a test client of a dashboard for ``app``: ``client_for(token=..., read_only=...)``."""
    clients: list[TestClient] = []

    def make(base_url: str = LOCAL, **config: Any) -> TestClient:
        client = TestClient(create_app(app, DashboardConfig(**config)), base_url=base_url)
        client.__enter__()
        clients.append(client)
        return client

    yield make
    for client in clients:
        client.__exit__(None, None, None)


class LiveDashboard:
    """The dashboard served by uvicorn in a thread on a free loopback port.

    Attributes:
        url: ``http://127.0.0.1:<port>``.
        asgi: The FastAPI application (``asgi.state.hub`` is its `LiveHub`).
    """

    def __init__(self, app: App, **config: Any) -> None:
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.asgi = create_app(app, DashboardConfig(port=self.port, **config))
        self.server = uvicorn.Server(uvicorn.Config(
            self.asgi, host="127.0.0.1", port=self.port, log_level="warning", lifespan="on",
            ws=websocket_protocol()))
        self.thread = threading.Thread(target=self.server.run, name="dashboard", daemon=True)

    def start(self) -> None:
        """Start serving and wait until uvicorn accepts connections."""
        self.thread.start()
        wait_until(lambda: self.server.started or not self.thread.is_alive(), timeout=15,
                   message="uvicorn start")
        assert self.server.started, "uvicorn did not start (see the thread's exception)"

    def stop(self) -> None:
        """Ask uvicorn to exit and join its thread."""
        self.server.should_exit = True
        self.thread.join(15)


@pytest.fixture
def serve_dashboard(app: App) -> Iterator[Callable[..., LiveDashboard]]:
    """Serve a dashboard for ``app`` with uvicorn: ``serve_dashboard(token=...)``."""
    started: list[LiveDashboard] = []

    def start(**config: Any) -> LiveDashboard:
        dash = LiveDashboard(app, **config)
        dash.start()
        started.append(dash)
        return dash

    yield start
    for dash in started:
        dash.stop()
