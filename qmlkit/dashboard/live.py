"""Live updates: what feeds the dashboard's WebSocket, and how fast.

One `LiveHub` per dashboard runs a refresh loop on the event loop. Each pass reads the
counts (one ``count_jobs``) and, for each connected page, the data of the view it
subscribed to (one page of ``list_jobs``, one ``get``, or ``list_servers``), and sends a
message only where something changed. A pass happens:

* at once (after a 20 ms gathering pause) when a **state-change observer** fires: the
  hub registers a ``qmlkit_job_state_changed`` implementation in the app's plugin
  manager, so servers built from the same `App` in this process report every
  transition;
* at once when a **wake-up** arrives over kombu (``--wakeup URL``): enqueues, retries and
  promotions made by any process on that broker; and, from servers whose app registers
  the `qmlkit.dashboard.events` plugin, every state change (outcomes included) on the
  companion events exchange;
* otherwise every ``poll_interval_s`` (0.5 s by default), which also catches what neither
  signal reports: outcomes written by servers in other processes, and progress reports.

Passes are at least ``MIN_GAP_S`` apart, so a busy server cannot make the dashboard
hammer its storage. With nobody connected, nothing is read.

Messages (JSON objects, server to browser): ``{"type": "stats", "stats": Stats}``;
``{"type": "jobs", "page": JobPage}``; ``{"type": "job", "job": JobDetail}``;
``{"type": "servers", "servers": [ServerRow]}``; ``{"type": "gone", "id": ...}`` when the
watched job no longer exists. The browser sends one kind: ``{"view": "overview" | "jobs"
| "job" | "servers", ...}`` with the view's filters (``state``, ``queue``, ``method``,
``limit``, ``offset``) or ``id``.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import time
from typing import Any

from starlette.concurrency import run_in_threadpool
from starlette.websockets import WebSocket, WebSocketDisconnect

from qmlkit.dashboard.service import DashboardService
from qmlkit.errors import JobNotFound
from qmlkit.hookspecs import hookimpl

log = logging.getLogger(__name__)

#: Least time between two refresh passes, in seconds.
MIN_GAP_S = 0.1
#: Pause after a nudge to gather a burst of transitions into one pass, in seconds.
GATHER_S = 0.02


class StateObserver:
    """A ``qmlkit_job_state_changed`` plugin that nudges a hub; registered per dashboard."""

    def __init__(self, hub: LiveHub) -> None:
        self.hub = hub

    @hookimpl
    def qmlkit_job_state_changed(self) -> None:
        """Nudge the hub; it reads the storage itself (takes microseconds, never raises)."""
        self.hub.notify()


class _Client:
    def __init__(self, ws: WebSocket) -> None:
        self.ws = ws
        self.view: dict[str, Any] = {"view": "overview"}
        self.last: Any = None
        self.last_stats: Any = None


class LiveHub:
    """Pushes changes to every connected page.

    Args:
        service: Where data comes from.
        poll_interval_s: Seconds between passes when nothing nudges (see module doc).
        wakeup_url: kombu URL to listen for wake-ups on, or ``None``.
        wakeup_exchange: The wake-up exchange's name.
    """

    def __init__(self, service: DashboardService, *, poll_interval_s: float = 0.5,
                 wakeup_url: str | None = None, wakeup_exchange: str = "qmlkit.wakeup") -> None:
        self.service = service
        self.poll_interval_s = poll_interval_s
        self.wakeup_url = wakeup_url
        self.wakeup_exchange = wakeup_exchange
        self._clients: set[_Client] = set()
        self._loop: asyncio.AbstractEventLoop | None = None
        self._nudge: asyncio.Event | None = None
        self._task: asyncio.Task[None] | None = None
        self._listeners: list[Any] = []
        self.passes = 0  #: refresh passes made so far (for tests)
        self.nudges = 0  #: nudges received so far, from observers and wake-ups

    # --- lifecycle -------------------------------------------------------------------------

    async def start(self) -> None:
        """Start the refresh loop (and the wake-up listener) on the running event loop."""
        self._loop = asyncio.get_running_loop()
        self._nudge = asyncio.Event()
        self._task = asyncio.create_task(self._run(), name="qmlkit-dashboard-live")
        if self.wakeup_url:
            from qmlkit.dashboard.events import events_exchange
            from qmlkit.wakeup import WakeupListener

            for exchange in (self.wakeup_exchange, events_exchange(self.wakeup_exchange)):
                listener = WakeupListener(self.wakeup_url, lambda _queue: self.notify(),
                                          exchange=exchange, name="dashboard")
                listener.start()
                self._listeners.append(listener)

    async def stop(self) -> None:
        """Stop the loop and the listener, and close every WebSocket."""
        for listener in self._listeners:
            await run_in_threadpool(listener.stop)
        self._listeners.clear()
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
            self._task = None
        for client in list(self._clients):
            with contextlib.suppress(Exception):
                await client.ws.close()
        self._clients.clear()

    def notify(self) -> None:
        """Ask for a refresh pass soon. Thread-safe and cheap; callable from any thread."""
        loop, nudge = self._loop, self._nudge
        self.nudges += 1
        self.service.invalidate()
        if loop is None or nudge is None or loop.is_closed():
            return
        with contextlib.suppress(RuntimeError):  # the loop is shutting down
            loop.call_soon_threadsafe(nudge.set)

    @property
    def listening(self) -> bool:
        """Whether every wake-up and event listener is connected (``False`` without any)."""
        return bool(self._listeners) and all(x.connected.is_set() for x in self._listeners)

    @property
    def clients(self) -> int:
        """How many pages are connected."""
        return len(self._clients)

    # --- the refresh loop ------------------------------------------------------------------

    async def _run(self) -> None:
        assert self._nudge is not None
        last = 0.0
        while True:
            try:
                await asyncio.wait_for(self._nudge.wait(), timeout=self.poll_interval_s)
                await asyncio.sleep(GATHER_S)
            except asyncio.TimeoutError:
                pass
            gap = last + MIN_GAP_S - time.monotonic()
            if gap > 0:
                await asyncio.sleep(gap)
            self._nudge.clear()
            last = time.monotonic()
            if not self._clients:
                continue
            try:
                await self.refresh()
            except Exception:  # a storage hiccup must not end live updates
                log.exception("dashboard refresh failed; retrying at the next pass")

    async def refresh(self) -> None:
        """Read the storage once and send each page what changed for it."""
        self.passes += 1
        stats = (await run_in_threadpool(self.service.stats)).model_dump(mode="json")
        views: dict[str, Any] = {}  # pages showing the same view share one read
        for client in list(self._clients):
            await self._send_updates(client, stats, views)

    async def _send_updates(self, client: _Client, stats: dict[str, Any],
                            views: dict[str, Any] | None = None) -> None:
        try:
            if stats != client.last_stats:
                client.last_stats = stats
                await client.ws.send_json({"type": "stats", "stats": stats})
            key = json.dumps(client.view, sort_keys=True, default=str)
            if views is not None and key in views:
                message = views[key]
            else:
                message = await run_in_threadpool(self._view_message, client.view)
                if views is not None:
                    views[key] = message
            if message is not None and message != client.last:
                client.last = message
                await client.ws.send_json(message)
        except (WebSocketDisconnect, RuntimeError, OSError):
            self._clients.discard(client)
        except ValueError:  # a view that cannot be shown (a bad filter): end this page only
            self._clients.discard(client)
            with contextlib.suppress(Exception):
                await client.ws.close(code=1008)

    def _view_message(self, view: dict[str, Any]) -> dict[str, Any] | None:
        kind = view.get("view")
        if kind == "jobs":
            page = self.service.jobs(state=view.get("state") or None,
                                     queue=view.get("queue") or None,
                                     method=view.get("method") or None,
                                     limit=_int_of(view.get("limit"), 50),
                                     offset=_int_of(view.get("offset"), 0))
            return {"type": "jobs", "page": page.model_dump(mode="json")}
        if kind == "job":
            try:
                job = self.service.job(str(view.get("id")))
            except JobNotFound:
                return {"type": "gone", "id": view.get("id")}
            return {"type": "job", "job": job.model_dump(mode="json")}
        if kind == "servers":
            rows = self.service.servers()
            return {"type": "servers",
                    "servers": [{**s.model_dump(mode="json"), "heartbeat_age_s": round(
                        s.heartbeat_age_s)} for s in rows]}
        return None

    # --- one connection ------------------------------------------------------------------

    async def serve(self, ws: WebSocket) -> None:
        """Run one accepted WebSocket until it closes: read view changes, push updates.

        The first updates (stats and the view's data) are sent as soon as the page says
        which view it shows; later ones when a pass finds a change.
        """
        client = _Client(ws)
        self._clients.add(client)
        try:
            while True:
                message = await ws.receive_json()
                if isinstance(message, dict) and message.get("view") in (
                        "overview", "jobs", "job", "servers"):
                    client.view = {k: message[k] for k in
                                   ("view", "state", "queue", "method", "limit", "offset", "id")
                                   if k in message}
                    client.last = None
                    client.last_stats = None
                    stats = (await run_in_threadpool(self.service.stats)).model_dump(mode="json")
                    await self._send_updates(client, stats)
        except (WebSocketDisconnect, RuntimeError, ValueError):
            pass
        finally:
            self._clients.discard(client)


def _int_of(value: Any, default: int) -> int:
    """A view's ``limit`` or ``offset`` as an int (``default`` when absent or 0).

    Raises:
        ValueError: Not a number an int can be made of (``[1]``, ``1e400``, ``"x"``); the
            service bounds the result (`DashboardService.jobs`).
    """
    try:
        return int(value or default)
    except (TypeError, OverflowError) as exc:
        raise ValueError(f"not a usable number: {value!r}") from exc
