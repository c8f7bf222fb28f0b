"""The dashboard's REST API under ``/api/`` (described at ``/api/openapi.json``) and its
WebSocket at ``/api/live`` (documented in `qmlkit.dashboard.live`).

Reads are GETs; actions are POSTs guarded by `qmlkit.dashboard.security.guard_action`
(read-only mode, CSRF, origin). Each route takes the dashboard's `DashboardService` and
`LiveHub` from ``request.app.state``.
"""

from __future__ import annotations

from collections.abc import Callable

from fastapi import APIRouter, Depends, HTTPException, Query, Request, WebSocket

from qmlkit.dashboard.live import LiveHub
from qmlkit.dashboard.security import guard_action, websocket_admitted
from qmlkit.dashboard.service import (
    MAX_OFFSET,
    ActionResult,
    DashboardService,
    JobDetail,
    JobPage,
    RecurringRow,
    ServerRow,
    Stats,
    Throughput,
)
from qmlkit.errors import InvalidTransition, JobNotFound, MiddlewareError

#: The actions a job's path may end with (``POST /api/jobs/{id}/<action>``).
JOB_ACTIONS = ("retry", "requeue", "delete")

router = APIRouter(prefix="/api", tags=["api"])
action = Depends(guard_action)


def service_of(request: Request) -> DashboardService:
    """The dashboard's view model (``app.state.service``)."""
    service: DashboardService = request.app.state.service
    return service


Service = Depends(service_of)


@router.get("/stats", response_model=Stats)
def api_stats(service: DashboardService = Service) -> Stats:
    """Job counts by state and by queue, and live/dead server counts."""
    return service.stats()


@router.get("/throughput", response_model=Throughput)
def api_throughput(minutes: int = Query(60, ge=1, le=1440),
                   service: DashboardService = Service) -> Throughput:
    """Jobs that succeeded and failed per UTC minute, the last ``minutes`` minutes."""
    return service.throughput(minutes=minutes)


@router.get("/jobs", response_model=JobPage)
def api_jobs(state: str | None = None, queue: str | None = None,
             method: str | None = None, limit: int = Query(50, ge=1, le=500),
             offset: int = Query(0, ge=0, le=MAX_OFFSET),
             service: DashboardService = Service) -> JobPage:
    """One page of jobs, newest first, filtered by state, queue and method (400 on a
    bad state name)."""
    try:
        return service.jobs(state=state or None, queue=queue or None,
                            method=method or None, limit=limit, offset=offset)
    except ValueError as exc:
        raise HTTPException(400, str(exc)) from exc


@router.get("/jobs/{job_id:path}", response_model=JobDetail)
def api_job(job_id: str, service: DashboardService = Service) -> JobDetail:
    """One job: arguments, metadata, state, error with traceback, progress, history
    (404 if unknown)."""
    try:
        return service.job(job_id)
    except JobNotFound as exc:
        # the id takes the rest of the path: "<id>/retry" read with GET is an action path
        head, _, tail = job_id.rpartition("/")
        if head and tail in JOB_ACTIONS:
            raise HTTPException(405, "actions are POST only", headers={"Allow": "POST"}) from exc
        raise HTTPException(404, f"no job {job_id!r}") from exc


def act(request: Request, fn: Callable[[str], ActionResult], target: str) -> ActionResult:
    """Run an action; map its errors to 404 and 409, and refresh live pages."""
    try:
        result = fn(target)
    except JobNotFound as exc:
        raise HTTPException(404, f"no such job or template: {target!r}") from exc
    except (InvalidTransition, MiddlewareError) as exc:
        raise HTTPException(409, str(exc)) from exc
    hub: LiveHub = request.app.state.hub
    hub.notify()
    return result


@router.post("/jobs/{job_id:path}/retry", response_model=ActionResult,
             dependencies=[action])
def api_retry(request: Request, job_id: str, service: DashboardService = Service
              ) -> ActionResult:
    """Enqueue a Failed, Succeeded or Deleted job again (409 in another state)."""
    return act(request, service.retry, job_id)


@router.post("/jobs/{job_id:path}/requeue", response_model=ActionResult,
             dependencies=[action])
def api_requeue(request: Request, job_id: str, service: DashboardService = Service
                ) -> ActionResult:
    """Run a Scheduled or AwaitingRetry job now (409 in another state)."""
    return act(request, service.requeue, job_id)


@router.post("/jobs/{job_id:path}/delete", response_model=ActionResult,
             dependencies=[action])
def api_delete(request: Request, job_id: str, service: DashboardService = Service
               ) -> ActionResult:
    """Move a job to Deleted; a Processing job's outcome is then discarded (409 if
    Deleted already)."""
    return act(request, service.delete, job_id)


@router.get("/recurring", response_model=list[RecurringRow])
def api_recurring(service: DashboardService = Service) -> list[RecurringRow]:
    """Every recurring template with its next and last run."""
    return service.recurring()


@router.post("/recurring/{template_id:path}/trigger", response_model=ActionResult,
             dependencies=[action])
def api_trigger(request: Request, template_id: str, service: DashboardService = Service
                ) -> ActionResult:
    """Enqueue one job from the template now; its schedule is unchanged."""
    return act(request, service.trigger, template_id)


@router.post("/recurring/{template_id:path}/remove", response_model=ActionResult,
             dependencies=[action])
def api_remove(request: Request, template_id: str, service: DashboardService = Service
               ) -> ActionResult:
    """Remove the template; jobs it made are kept."""
    return act(request, service.remove_recurring, template_id)


@router.get("/servers", response_model=list[ServerRow])
def api_servers(service: DashboardService = Service) -> list[ServerRow]:
    """Registered servers with heartbeat age, worker count and queues."""
    return service.servers()


@router.websocket("/live")
async def api_live(ws: WebSocket) -> None:
    """Live updates (see `qmlkit.dashboard.live`); same auth as HTTP, same origin."""
    if not websocket_admitted(ws):
        await ws.close(code=1008)
        return
    await ws.accept()
    hub: LiveHub = ws.app.state.hub
    await hub.serve(ws)
