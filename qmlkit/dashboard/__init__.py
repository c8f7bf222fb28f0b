"""The live web dashboard: pages, a REST API under ``/api/``, WebSocket updates, auth.

Run it with ``qmlkit dashboard --storage URL`` (needs ``pip install 'qmlkit-core[dashboard]'``)
or build the ASGI application yourself::

    from qmlkit.dashboard import DashboardConfig, create_app
    asgi = create_app(app, DashboardConfig(token="s3cret"))

Importing this package loads neither FastAPI nor uvicorn; `create_app` and `serve` do.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from qmlkit.dashboard.config import DashboardConfig, is_loopback

if TYPE_CHECKING:
    from fastapi import FastAPI

    from qmlkit.app import App

__all__ = ["DashboardConfig", "MISSING_DEPENDENCIES", "create_app", "is_loopback", "serve"]

#: What to tell a user whose environment lacks the dashboard's libraries.
MISSING_DEPENDENCIES = ("the dashboard needs FastAPI, uvicorn and Jinja2: "
                        "pip install 'qmlkit-core[dashboard]'")


def create_app(app: App, config: DashboardConfig | None = None) -> FastAPI:
    """Build the dashboard's ASGI application for ``app``; see `qmlkit.dashboard.web`.

    Raises:
        ImportError: FastAPI, uvicorn or Jinja2 is missing (message: `MISSING_DEPENDENCIES`).
    """
    from qmlkit.dashboard.web import create_app as build

    return build(app, config or DashboardConfig())


def serve(app: App, config: DashboardConfig, **uvicorn_options: Any) -> None:
    """Serve the dashboard with uvicorn until interrupted; see `qmlkit.dashboard.web.serve`."""
    from qmlkit.dashboard.web import serve as run

    run(app, config, **uvicorn_options)
