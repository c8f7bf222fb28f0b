"""The dashboard's ASGI application: FastAPI routes, Jinja2 pages, security headers.

Pages (HTML, server-rendered, then kept live by ``static/dashboard.js`` over the
WebSocket): ``/`` overview, ``/jobs`` list, ``/jobs/{id}`` detail, ``/recurring``,
``/servers``, ``/login``. The REST API under ``/api/`` (described at
``/api/openapi.json``) is what the pages' scripts call for actions; `qmlkit.dashboard.live`
documents the WebSocket at ``/api/live``.

Every response carries a Content-Security-Policy that allows scripts, styles and images
from the dashboard itself only (no inline script or style), plus ``nosniff``,
``X-Frame-Options: DENY`` and ``Referrer-Policy: same-origin`` (with ``no-referrer``
browsers send ``Origin: null`` on same-origin form posts) (field case C14). Jinja2
autoescaping is on for every template, and the script builds DOM nodes with
``textContent``, never ``innerHTML``.
"""

from __future__ import annotations

import contextlib
import json
import logging
import re
from collections.abc import AsyncIterator, Awaitable, Callable
from datetime import datetime, timedelta
from pathlib import Path
from typing import Any
from urllib.parse import parse_qs, quote

from fastapi import APIRouter, Depends, FastAPI, HTTPException, Query, Request, WebSocket
from fastapi.responses import HTMLResponse, JSONResponse, RedirectResponse, Response
from fastapi.staticfiles import StaticFiles
from jinja2 import Environment, FileSystemLoader, select_autoescape
from starlette.templating import Jinja2Templates

from qmlkit.app import App
from qmlkit.dashboard.auth import (
    CSRF_FIELD,
    CSRF_HEADER,
    SESSION_COOKIE,
    Auth,
    host_allowed,
    same_origin,
)
from qmlkit.dashboard.config import DashboardConfig
from qmlkit.dashboard.live import LiveHub, StateObserver
from qmlkit.dashboard.service import (
    ActionResult,
    DashboardService,
    JobDetail,
    JobPage,
    RecurringRow,
    ServerRow,
    Stats,
    Throughput,
)
from qmlkit.errors import InvalidTransition, JobNotFound, MiddlewareError, StorageError
from qmlkit.job import STATE_NAMES

log = logging.getLogger(__name__)

HERE = Path(__file__).parent

#: Paths served without authentication (the login page and static files).
PUBLIC_PREFIXES = ("/static/", "/login")


#: A Host header fit to be written into the CSP: a name or an address, optional port.
_HOST = re.compile(r"([A-Za-z0-9.\-]+|\[[0-9a-fA-F:.]+\])(:[0-9]{1,5})?")


def content_security_policy(host: str | None) -> str:
    """Return the CSP sent with every response: this origin only, nothing inline.

    Args:
        host: The request's ``Host`` header, for the WebSocket source (``ws://host``);
            ``None`` or anything but a host name or address with an optional port
            leaves WebSockets to ``'self'``.
    """
    safe = host is not None and _HOST.fullmatch(host)
    connect = "'self'" + (f" ws://{host} wss://{host}" if safe else "")
    return ("default-src 'none'; script-src 'self'; style-src 'self'; img-src 'self'; "
            f"connect-src {connect}; font-src 'self'; form-action 'self'; base-uri 'none'; "
            "frame-ancestors 'none'")


def _templates() -> Jinja2Templates:
    env = Environment(loader=FileSystemLoader(str(HERE / "templates")),
                      autoescape=select_autoescape(["html", "svg", "xml"], default=True),
                      trim_blocks=True, lstrip_blocks=True)

    def dt(value: datetime | None) -> str:
        return "\N{EN DASH}" if value is None else value.strftime("%Y-%m-%d %H:%M:%S")

    def pretty(value: Any) -> str:
        return json.dumps(value, indent=2, ensure_ascii=False, sort_keys=True, default=str)

    env.filters["dt"] = dt
    env.filters["pretty"] = pretty
    env.filters["urlq"] = lambda v: quote(str(v), safe="")
    env.globals["STATE_NAMES"] = STATE_NAMES
    return Jinja2Templates(env=env)


def create_app(app: App, config: DashboardConfig) -> FastAPI:
    """Build the dashboard for ``app``.

    Registers a state-change observer in ``app.plugin_manager`` at once, so servers
    built from ``app`` afterwards report transitions to the live view.

    Args:
        app: The application whose storage (and registry, wake-up URL) is shown.
        config: Settings; ``check_bind`` is the caller's business (`serve` calls it).

    Returns:
        A FastAPI application (ASGI), with ``.state.hub`` (`LiveHub`), ``.state.service``
        (`DashboardService`) and ``.state.auth`` (`Auth`).
    """
    service = DashboardService(app, dead_server_after=timedelta(seconds=config.dead_server_after_s))
    hub = LiveHub(service, poll_interval_s=config.poll_interval_s,
                  wakeup_url=config.wakeup_url or app.wakeup_url,
                  wakeup_exchange=app.wakeup_exchange)
    observer = StateObserver(hub)
    app.plugin_manager.register(observer, name=f"qmlkit-dashboard-{id(hub)}")
    auth = Auth(config.token_value)
    templates = _templates()

    @contextlib.asynccontextmanager
    async def lifespan(_: FastAPI) -> AsyncIterator[None]:
        await hub.start()
        try:
            yield
        finally:
            await hub.stop()
            with contextlib.suppress(ValueError):
                app.plugin_manager.unregister(observer)

    api = FastAPI(
        title="qmlkit dashboard API",
        version="1",
        description="Jobs, counts, recurring templates and servers of one qmlkit storage. "
                    "Authenticate with `Authorization: Bearer <token>` when a token is set. "
                    "Mutations are POSTs; unless Bearer-authenticated they need the "
                    "`X-CSRF-Token` header (see the pages' `<meta name=csrf-token>`). "
                    "In read-only mode they answer 403.",
        openapi_url="/api/openapi.json", docs_url=None, redoc_url=None, lifespan=lifespan,
    )
    api.state.hub = hub
    api.state.service = service
    api.state.auth = auth
    api.state.config = config
    api.mount("/static", StaticFiles(directory=str(HERE / "static")), name="static")

    @api.middleware("http")
    async def guard(request: Request, call_next: Callable[[Request], Awaitable[Response]]
                    ) -> Response:
        """Check the Host header and the credentials; add the security headers."""
        host = request.headers.get("host")
        if not host_allowed(host, auth_required=auth.required):
            response: Response = JSONResponse({"detail": "host not allowed"}, status_code=400)
        else:
            method = auth.method(request.headers, request.cookies)
            request.state.auth_method = method
            path = request.url.path
            if method is None and not path.startswith(PUBLIC_PREFIXES):
                response = _unauthorized(request, templates)
            else:
                try:
                    response = await call_next(request)
                except StorageError as exc:  # storage down or refusing: say so, quickly
                    log.warning("dashboard request %s failed: %s: %s", path,
                                type(exc).__name__, exc)
                    response = JSONResponse(
                        {"detail": f"the storage is unavailable: {type(exc).__name__}"},
                        status_code=503, headers={"Retry-After": "5"})
                except Exception:  # noqa: BLE001 - answered, with the security headers
                    log.exception("dashboard request %s failed", path)
                    response = JSONResponse({"detail": "internal error"}, status_code=500)
        for name, value in _security_headers(host).items():
            response.headers.setdefault(name, value)
        return response

    def page(request: Request, name: str, **context: Any) -> HTMLResponse:
        """Render template ``name`` with what every page needs (CSRF token, modes)."""
        return templates.TemplateResponse(request, name, {
            "csrf": auth.csrf_token(request.cookies), "read_only": config.read_only,
            "auth_required": auth.required, "page_size": config.page_size,
            "logged_in": getattr(request.state, "auth_method", None) == "cookie", **context})

    def guard_action(request: Request) -> None:
        """Refuse an action in read-only mode (403), or without CSRF proof (403)."""
        if config.read_only:
            raise HTTPException(403, "the dashboard is read-only")
        if request.state.auth_method == "bearer":
            return
        if not same_origin(request.headers.get("origin"), request.headers.get("host")):
            raise HTTPException(403, "cross-origin request refused")
        if not auth.csrf_ok(request.headers.get(CSRF_HEADER), request.cookies):
            raise HTTPException(403, "missing or wrong CSRF token (X-CSRF-Token header)")

    router = APIRouter(prefix="/api", tags=["api"])
    action = Depends(guard_action)

    @router.get("/stats", response_model=Stats)
    def api_stats() -> Stats:
        """Job counts by state and by queue, and live/dead server counts."""
        return service.stats()

    @router.get("/throughput", response_model=Throughput)
    def api_throughput(minutes: int = Query(60, ge=1, le=1440)) -> Throughput:
        """Jobs that succeeded and failed per UTC minute, the last ``minutes`` minutes."""
        return service.throughput(minutes=minutes)

    @router.get("/jobs", response_model=JobPage)
    def api_jobs(state: str | None = None, queue: str | None = None,
                 method: str | None = None, limit: int = Query(50, ge=1, le=500),
                 offset: int = Query(0, ge=0, le=100_000_000)) -> JobPage:
        """One page of jobs, newest first, filtered by state, queue and method (400 on a
        bad state name)."""
        try:
            return service.jobs(state=state or None, queue=queue or None,
                                method=method or None, limit=limit, offset=offset)
        except ValueError as exc:
            raise HTTPException(400, str(exc)) from exc

    @router.get("/jobs/{job_id}", response_model=JobDetail)
    def api_job(job_id: str) -> JobDetail:
        """One job: arguments, metadata, state, error with traceback, progress, history
        (404 if unknown)."""
        try:
            return service.job(job_id)
        except JobNotFound as exc:
            raise HTTPException(404, f"no job {job_id!r}") from exc

    def act(fn: Callable[[str], ActionResult], target: str) -> ActionResult:
        """Run an action; map its errors to 404 and 409, and refresh live pages."""
        try:
            result = fn(target)
        except JobNotFound as exc:
            raise HTTPException(404, f"no such job or template: {target!r}") from exc
        except (InvalidTransition, MiddlewareError) as exc:
            raise HTTPException(409, str(exc)) from exc
        hub.notify()
        return result

    @router.post("/jobs/{job_id}/retry", response_model=ActionResult, dependencies=[action])
    def api_retry(job_id: str) -> ActionResult:
        """Enqueue a Failed, Succeeded or Deleted job again (409 in another state)."""
        return act(service.retry, job_id)

    @router.post("/jobs/{job_id}/requeue", response_model=ActionResult, dependencies=[action])
    def api_requeue(job_id: str) -> ActionResult:
        """Run a Scheduled or AwaitingRetry job now (409 in another state)."""
        return act(service.requeue, job_id)

    @router.post("/jobs/{job_id}/delete", response_model=ActionResult, dependencies=[action])
    def api_delete(job_id: str) -> ActionResult:
        """Move a job to Deleted; a Processing job's outcome is then discarded (409 if
        Deleted already)."""
        return act(service.delete, job_id)

    @router.get("/recurring", response_model=list[RecurringRow])
    def api_recurring() -> list[RecurringRow]:
        """Every recurring template with its next and last run."""
        return service.recurring()

    @router.post("/recurring/{template_id}/trigger", response_model=ActionResult,
                 dependencies=[action])
    def api_trigger(template_id: str) -> ActionResult:
        """Enqueue one job from the template now; its schedule is unchanged."""
        return act(service.trigger, template_id)

    @router.post("/recurring/{template_id}/remove", response_model=ActionResult,
                 dependencies=[action])
    def api_remove(template_id: str) -> ActionResult:
        """Remove the template; jobs it made are kept."""
        return act(service.remove_recurring, template_id)

    @router.get("/servers", response_model=list[ServerRow])
    def api_servers() -> list[ServerRow]:
        """Registered servers with heartbeat age, worker count and queues."""
        return service.servers()

    @router.websocket("/live")
    async def api_live(ws: WebSocket) -> None:
        """Live updates (see `qmlkit.dashboard.live`); same auth as HTTP, same origin."""
        if (not host_allowed(ws.headers.get("host"), auth_required=auth.required)
                or auth.method(ws.headers, ws.cookies) is None
                or not same_origin(ws.headers.get("origin"), ws.headers.get("host"))):
            await ws.close(code=1008)
            return
        await ws.accept()
        await hub.serve(ws)

    api.include_router(router)

    # --- pages ----------------------------------------------------------------------------

    @api.get("/", response_class=HTMLResponse, include_in_schema=False)
    def overview(request: Request) -> HTMLResponse:
        """The overview: counts by state and queue, throughput chart, live servers."""
        stats = service.stats()
        return page(request, "overview.html", nav="overview", stats=stats,
                    servers=[s for s in service.servers() if s.alive],
                    throughput=service.throughput(minutes=config.throughput_minutes),
                    minutes=config.throughput_minutes)

    @api.get("/charts/throughput.svg", include_in_schema=False)
    def throughput_chart(request: Request, minutes: int = Query(60, ge=1, le=1440)) -> Response:
        """The throughput chart, an SVG drawn here (no script, no external resource)."""
        data = service.throughput(minutes=minutes)
        body = templates.get_template("throughput.svg").render(chart=_chart(data))
        return Response(body, media_type="image/svg+xml",
                        headers={"Cache-Control": "no-store"})

    @api.get("/jobs", response_class=HTMLResponse, include_in_schema=False)
    def jobs_page(request: Request, state: str | None = None, queue: str | None = None,
                  method: str | None = None,
                  page_no: int = Query(1, alias="page", ge=1, le=1_000_000)
                  ) -> HTMLResponse:
        """The jobs list: filters, pagination, live rows with progress bars."""
        size = config.page_size
        try:
            found = service.jobs(state=state or None, queue=queue or None,
                                 method=method or None, limit=size, offset=(page_no - 1) * size)
        except ValueError as exc:
            raise HTTPException(400, str(exc)) from exc
        _, queues = service.counts()
        pages = None if found.total is None else max(1, -(-found.total // size))
        return page(request, "jobs.html", nav="jobs", found=found, state=state or "",
                    queue=queue or "", method=method or "", page_no=page_no, pages=pages,
                    queues=sorted(queues))

    @api.get("/jobs/{job_id}", response_class=HTMLResponse, include_in_schema=False)
    def job_page(request: Request, job_id: str) -> HTMLResponse:
        """One job in full."""
        try:
            job = service.job(job_id)
        except JobNotFound:
            missing = page(request, "missing.html", nav="jobs", what=f"job {job_id}")
            missing.status_code = 404
            return missing
        return page(request, "job.html", nav="jobs", job=job)

    @api.get("/recurring", response_class=HTMLResponse, include_in_schema=False)
    def recurring_page(request: Request) -> HTMLResponse:
        """Recurring templates with trigger and remove actions."""
        return page(request, "recurring.html", nav="recurring", templates=service.recurring())

    @api.get("/servers", response_class=HTMLResponse, include_in_schema=False)
    def servers_page(request: Request) -> HTMLResponse:
        """Registered servers."""
        return page(request, "servers.html", nav="servers", servers=service.servers(),
                    dead_after=config.dead_server_after_s)

    @api.get("/login", response_class=HTMLResponse, include_in_schema=False)
    def login_page(request: Request, next: str = "/") -> HTMLResponse:
        """The login form (asks for the token)."""
        return page(request, "login.html", nav="", next=_safe_next(next), error=None)

    @api.post("/login", include_in_schema=False)
    async def login(request: Request) -> Response:
        """Check the token; on success set the session cookie and go to ``next``."""
        if not same_origin(request.headers.get("origin"), request.headers.get("host")):
            raise HTTPException(403, "cross-origin request refused")
        form = parse_qs((await request.body()).decode("utf-8", "replace"))
        token = (form.get("token") or [""])[0]
        target = _safe_next((form.get("next") or ["/"])[0])
        if not auth.required:
            return RedirectResponse(target, status_code=303)
        if not auth.token_matches(token):
            refused = page(request, "login.html", nav="", next=target,
                           error="That token is not right.")
            refused.status_code = 401  # the form again, as an authentication failure
            return refused
        response = RedirectResponse(target, status_code=303)
        response.set_cookie(SESSION_COOKIE, auth.session_value(), httponly=True,
                            samesite="strict", secure=request.url.scheme == "https", path="/")
        return response

    @api.post("/logout", include_in_schema=False)
    async def logout(request: Request) -> Response:
        """Forget the session cookie (CSRF-checked like every POST)."""
        form = parse_qs((await request.body()).decode("utf-8", "replace"))
        given = request.headers.get(CSRF_HEADER) or (form.get(CSRF_FIELD) or [""])[0]
        if not auth.csrf_ok(given, request.cookies):
            raise HTTPException(403, "missing or wrong CSRF token")
        response = RedirectResponse("/login", status_code=303)
        response.delete_cookie(SESSION_COOKIE, path="/")
        return response

    return api


def _safe_next(target: str) -> str:
    """Only same-site paths may follow a login (no open redirect)."""
    if not target.startswith("/") or target.startswith("//") or "\\" in target:
        return "/"
    return target


def _security_headers(host: str | None) -> dict[str, str]:
    return {
        "Content-Security-Policy": content_security_policy(host),
        "X-Content-Type-Options": "nosniff",
        "X-Frame-Options": "DENY",
        "Referrer-Policy": "same-origin",
        "Cross-Origin-Opener-Policy": "same-origin",
    }


def _unauthorized(request: Request, templates: Jinja2Templates) -> Response:
    """401: JSON with ``WWW-Authenticate`` for the API, the login page for people."""
    if request.url.path.startswith("/api/") or "text/html" not in request.headers.get(
            "accept", ""):
        return JSONResponse({"detail": "authentication required: Authorization: Bearer "
                                       "<token>, or basic auth with the token as password"},
                            status_code=401,
                            headers={"WWW-Authenticate": 'Bearer realm="qmlkit", Basic '
                                                         'realm="qmlkit"'})
    target = request.url.path + (f"?{request.url.query}" if request.url.query else "")
    return templates.TemplateResponse(request, "login.html", {
        "csrf": "", "read_only": False, "auth_required": True, "nav": "", "logged_in": False,
        "next": _safe_next(target), "error": None}, status_code=401)


def _chart(data: Throughput) -> dict[str, Any]:
    """Geometry of the throughput SVG: per minute, a green bar (succeeded) and a red one
    (failed) side by side, on a y axis from 0 to the busiest minute.

    Returns:
        ``{"width", "height", "left", "top", "plot_w", "plot_h", "available", "ymax",
        "bars": [(x, y, w, h, "ok" | "bad", tooltip)], "ticks": [(y, label)],
        "xlabels": [(x, "HH:MM")], "total_s", "total_f"}``, lengths in SVG pixels.
    """
    width, height, left, right, top, bottom = 960, 220, 44, 10, 12, 26
    points = data.points
    ymax = max([1] + [max(p.succeeded, p.failed) for p in points])
    plot_w, plot_h = width - left - right, height - top - bottom
    slot = plot_w / max(1, len(points))
    bars = []
    for i, p in enumerate(points):
        for offset, value, kind in ((0.1, p.succeeded, "ok"), (0.5, p.failed, "bad")):
            label = "succeeded" if kind == "ok" else "failed"
            if value:
                h = value / ymax * plot_h
                bars.append((round(left + i * slot + offset * slot, 1), round(top + plot_h - h, 1),
                             round(slot * 0.4, 1), round(h, 1), kind,
                             f"{p.minute:%H:%M} {label} {value}"))
    every = max(1, len(points) // 8)
    return {
        "width": width, "height": height, "left": left, "top": top, "plot_w": plot_w,
        "plot_h": plot_h, "available": data.available, "ymax": ymax, "bars": bars,
        "ticks": [(round(top + plot_h - f * plot_h, 1), round(ymax * f)) for f in (0, 0.5, 1)],
        "xlabels": [(round(left + (i + 0.5) * slot, 1), p.minute.strftime("%H:%M"))
                    for i, p in enumerate(points) if i % every == 0],
        "total_s": sum(p.succeeded for p in points),
        "total_f": sum(p.failed for p in points),
    }


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
