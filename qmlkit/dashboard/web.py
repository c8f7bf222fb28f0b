"""The dashboard's ASGI application: `create_app` composes its rooms, `serve` runs it.

* `qmlkit.dashboard.pages`: the HTML pages (``/``, ``/jobs``, ``/jobs/{id}``,
  ``/recurring``, ``/servers``, the throughput chart).
* `qmlkit.dashboard.api`: the REST API under ``/api/`` (described at
  ``/api/openapi.json``) that the pages' scripts call for actions, and the WebSocket at
  ``/api/live`` (`qmlkit.dashboard.live`).
* `qmlkit.dashboard.security`: the guard middleware (host, credentials, security
  headers), the action guard (read-only, CSRF, origin), ``/login`` and ``/logout``;
  `qmlkit.dashboard.auth` checks tokens, sessions and CSRF tokens.

Each room's routes find what they need (service, hub, auth, config, templates) in the
application's ``state``, which `create_app` fills.
"""

from __future__ import annotations

import contextlib
from collections.abc import AsyncIterator
from datetime import timedelta
from typing import Any

from fastapi import FastAPI
from fastapi.staticfiles import StaticFiles

import qmlkit.dashboard.api as api
import qmlkit.dashboard.pages as pages
import qmlkit.dashboard.security as security
from qmlkit.app import App
from qmlkit.dashboard.auth import Auth
from qmlkit.dashboard.config import DashboardConfig
from qmlkit.dashboard.live import LiveHub, StateObserver
from qmlkit.dashboard.pages import HERE
from qmlkit.dashboard.security import PUBLIC_PREFIXES, content_security_policy
from qmlkit.dashboard.service import DashboardService

__all__ = ["HERE", "PUBLIC_PREFIXES", "content_security_policy", "create_app", "serve",
           "websocket_protocol"]

#: What the OpenAPI description says of the API as a whole.
API_DESCRIPTION = (
    "Jobs, counts, recurring templates and servers of one qmlkit storage. "
    "Authenticate with `Authorization: Bearer <token>` when a token is set. "
    "Mutations are POSTs; unless Bearer-authenticated they need the "
    "`X-CSRF-Token` header (see the pages' `<meta name=csrf-token>`). "
    "In read-only mode they answer 403.")


def create_app(app: App, config: DashboardConfig) -> FastAPI:
    """Build the dashboard for ``app``.

    Registers a state-change observer in ``app.plugin_manager`` at once, so servers
    built from ``app`` afterwards report transitions to the live view.

    Args:
        app: The application whose storage (and registry, wake-up URL) is shown.
        config: Settings; ``check_bind`` is the caller's business (`serve` calls it).

    Returns:
        A FastAPI application (ASGI), with ``.state.hub`` (`LiveHub`), ``.state.service``
        (`DashboardService`), ``.state.auth`` (`Auth`), ``.state.config`` and
        ``.state.templates``.
    """
    service = DashboardService(app, dead_server_after=timedelta(seconds=config.dead_server_after_s))
    hub = LiveHub(service, poll_interval_s=config.poll_interval_s,
                  wakeup_url=config.wakeup_url or app.wakeup_url,
                  wakeup_exchange=app.wakeup_exchange)
    observer = StateObserver(hub)
    app.plugin_manager.register(observer, name=f"qmlkit-dashboard-{id(hub)}")

    @contextlib.asynccontextmanager
    async def lifespan(_: FastAPI) -> AsyncIterator[None]:
        await hub.start()
        try:
            yield
        finally:
            await hub.stop()
            with contextlib.suppress(ValueError):
                app.plugin_manager.unregister(observer)

    asgi = FastAPI(title="qmlkit dashboard API", version="1", description=API_DESCRIPTION,
                   openapi_url="/api/openapi.json", docs_url=None, redoc_url=None,
                   lifespan=lifespan)
    asgi.state.hub = hub
    asgi.state.service = service
    asgi.state.auth = Auth(config.token_value, session_ttl_s=config.session_ttl_s)
    asgi.state.config = config
    asgi.state.templates = pages.make_templates()
    asgi.mount("/static", StaticFiles(directory=str(HERE / "static")), name="static")
    security.install_guard(asgi)
    for router in (api.router, pages.router, security.router):
        asgi.include_router(router)
    return asgi


def websocket_protocol() -> str:
    """Return the uvicorn WebSocket implementation to use: websockets' sans-I/O one when
    this uvicorn has it (its older one uses the deprecated ``websockets.legacy``)."""
    from uvicorn.config import WS_PROTOCOLS

    return "websockets-sansio" if "websockets-sansio" in WS_PROTOCOLS else "auto"


def serve(app: App, config: DashboardConfig, **uvicorn_options: Any) -> None:
    """Serve the dashboard with uvicorn on ``config.host:config.port`` until interrupted.

    Args:
        app: The application.
        config: Settings.
        **uvicorn_options: Passed to ``uvicorn.run`` (e.g. ``log_level="warning"``).

    Raises:
        ConfigurationError: A non-loopback host without a token (`DashboardConfig.check_bind`).
    """
    import uvicorn

    config.check_bind()
    uvicorn_options.setdefault("log_level", "info")
    uvicorn_options.setdefault("ws", websocket_protocol())
    uvicorn.run(create_app(app, config), host=config.host, port=config.port,
                **uvicorn_options)
