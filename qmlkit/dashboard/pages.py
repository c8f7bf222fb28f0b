"""The dashboard's HTML pages: server-rendered Jinja2, then kept live by
``static/dashboard.js`` over the WebSocket.

``/`` overview, ``/jobs`` list, ``/jobs/{id}`` detail, ``/recurring``, ``/servers`` and
the throughput chart ``/charts/throughput.svg``; the login page is `qmlkit.dashboard.security`'s.
Jinja2 autoescaping is on for every template, and the script builds DOM nodes with
``textContent``, never ``innerHTML`` (field case C14).
"""

from __future__ import annotations

import json
from datetime import datetime
from pathlib import Path
from typing import Any
from urllib.parse import quote

from fastapi import APIRouter, HTTPException, Query, Request
from fastapi.responses import HTMLResponse, Response
from jinja2 import Environment, FileSystemLoader, select_autoescape
from starlette.templating import Jinja2Templates

from qmlkit.dashboard.auth import Auth
from qmlkit.dashboard.config import DashboardConfig
from qmlkit.dashboard.service import DashboardService, Throughput
from qmlkit.errors import JobNotFound
from qmlkit.job import STATE_NAMES

#: The folder of the templates and static files.
HERE = Path(__file__).parent

router = APIRouter(include_in_schema=False)


def make_templates() -> Jinja2Templates:
    """The page templates: autoescaped, with the ``dt``, ``pretty`` and ``urlq`` filters."""
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


def render(request: Request, name: str, *, status_code: int = 200,
           **context: Any) -> HTMLResponse:
    """Render template ``name`` with what every page needs (CSRF token, modes).

    The dashboard's ``templates``, ``auth`` and ``config`` come from ``request.app.state``.
    """
    state = request.app.state
    auth: Auth = state.auth
    config: DashboardConfig = state.config
    templates: Jinja2Templates = state.templates
    return templates.TemplateResponse(request, name, {
        "csrf": auth.csrf_token(request.cookies), "read_only": config.read_only,
        "auth_required": auth.required, "page_size": config.page_size,
        "logged_in": getattr(request.state, "auth_method", None) == "cookie", **context},
        status_code=status_code)


def _service(request: Request) -> DashboardService:
    service: DashboardService = request.app.state.service
    return service


def _config(request: Request) -> DashboardConfig:
    config: DashboardConfig = request.app.state.config
    return config


@router.get("/", response_class=HTMLResponse)
def overview(request: Request) -> HTMLResponse:
    """The overview: counts by state and queue, throughput chart, live servers."""
    service, config = _service(request), _config(request)
    return render(request, "overview.html", nav="overview", stats=service.stats(),
                  servers=[s for s in service.servers() if s.alive],
                  throughput=service.throughput(minutes=config.throughput_minutes),
                  minutes=config.throughput_minutes)


@router.get("/charts/throughput.svg")
def throughput_chart(request: Request, minutes: int = Query(60, ge=1, le=1440)) -> Response:
    """The throughput chart, an SVG drawn here (no script, no external resource)."""
    data = _service(request).throughput(minutes=minutes)
    templates: Jinja2Templates = request.app.state.templates
    body = templates.get_template("throughput.svg").render(chart=chart(data))
    return Response(body, media_type="image/svg+xml", headers={"Cache-Control": "no-store"})


@router.get("/jobs", response_class=HTMLResponse)
def jobs_page(request: Request, state: str | None = None, queue: str | None = None,
              method: str | None = None,
              page_no: int = Query(1, alias="page", ge=1, le=1_000_000)) -> HTMLResponse:
    """The jobs list: filters, pagination, live rows with progress bars."""
    service, size = _service(request), _config(request).page_size
    try:
        found = service.jobs(state=state or None, queue=queue or None,
                             method=method or None, limit=size, offset=(page_no - 1) * size)
    except ValueError as exc:
        raise HTTPException(400, str(exc)) from exc
    _, queues = service.counts()
    pages = None if found.total is None else max(1, -(-found.total // size))
    return render(request, "jobs.html", nav="jobs", found=found, state=state or "",
                  queue=queue or "", method=method or "", page_no=page_no, pages=pages,
                  queues=sorted(queues))


@router.get("/jobs/{job_id:path}", response_class=HTMLResponse)
def job_page(request: Request, job_id: str) -> HTMLResponse:
    """One job in full (the missing page, 404, for an unknown id)."""
    try:
        job = _service(request).job(job_id)
    except JobNotFound:
        return render(request, "missing.html", status_code=404, nav="jobs",
                      what=f"job {job_id}")
    return render(request, "job.html", nav="jobs", job=job)


@router.get("/recurring", response_class=HTMLResponse)
def recurring_page(request: Request) -> HTMLResponse:
    """Recurring templates with trigger and remove actions."""
    return render(request, "recurring.html", nav="recurring",
                  templates=_service(request).recurring())


@router.get("/servers", response_class=HTMLResponse)
def servers_page(request: Request) -> HTMLResponse:
    """Registered servers."""
    return render(request, "servers.html", nav="servers", servers=_service(request).servers(),
                  dead_after=_config(request).dead_server_after_s)


def chart(data: Throughput) -> dict[str, Any]:
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
