"""The WebSocket at ``/api/live`` against the dashboard served by uvicorn on loopback.

Each feed is tested on its own by making the other ones too slow to matter: the
state-change observer (same process, same app), the kombu wake-up listener, and the
storage poll (a second app on the same SQLite file, as another process would be).
"""

from __future__ import annotations

import json
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any

import pytest
from websockets.exceptions import InvalidStatus
from websockets.sync.client import ClientConnection, connect

from qmlkit import App
from qmlkit.dashboard import events
from qmlkit.processing.context import current_context
from qmlkit.testing import require_service, wait_until
from tests.dashboard.conftest import LiveDashboard, running

Message = dict[str, Any]


@contextmanager
def open_live(dash: LiveDashboard, view: Message, **headers: str) -> Iterator[ClientConnection]:
    """Connect to the dashboard's WebSocket as its page would, and subscribe to ``view``."""
    with connect(f"ws://127.0.0.1:{dash.port}/api/live", origin=dash.url,  # type: ignore[arg-type]
                 additional_headers=headers, open_timeout=10) as ws:
        ws.send(json.dumps(view))
        yield ws


def receive_until(ws: ClientConnection, predicate: Callable[[Message], bool],
                  timeout: float = 5.0) -> Message:
    """Return the first message matching ``predicate``; fail after ``timeout`` seconds."""
    deadline = time.monotonic() + timeout
    seen: list[str] = []
    while True:
        remaining = deadline - time.monotonic()
        if remaining <= 0:
            raise TimeoutError(f"no matching message within {timeout} s; got types {seen}")
        try:
            message = json.loads(ws.recv(timeout=remaining))
        except TimeoutError:
            continue
        seen.append(message.get("type"))
        if predicate(message):
            return message


@pytest.fixture(params=[
    pytest.param("memory://", id="memory"),
    pytest.param("redis://127.0.0.1:6379/0", id="redis", marks=pytest.mark.redis),
])
def transport(request: pytest.FixtureRequest) -> str:
    """A kombu URL for wake-ups and events: in-process, or the shared Redis."""
    if request.param.startswith("redis"):
        require_service("Redis", "127.0.0.1", 6379)
    return str(request.param)


def enqueued_is(n: int) -> Callable[[Message], bool]:
    return lambda m: m["type"] == "stats" and m["stats"]["states"]["Enqueued"] == n


def test_observer_pushes_counts_at_once_in_the_same_process(
        app: App, serve_dashboard: Callable[..., LiveDashboard]) -> None:
    # Given a dashboard that polls only every 10 s, for an app in this process
    dash = serve_dashboard(poll_interval_s=10.0)
    with open_live(dash, {"view": "overview"}) as ws:
        receive_until(ws, enqueued_is(0))
        # When a job is enqueued through the same app
        start = time.monotonic()
        app.enqueue("live.job")
        # Then the counts arrive well before the next poll: the observer nudged the hub
        receive_until(ws, enqueued_is(1), timeout=5.0)
        latency = time.monotonic() - start
    assert latency < 5.0
    print(f"observer push latency: {latency * 1000:.0f} ms")


def test_poll_pushes_changes_made_by_another_process(
        app: App, serve_dashboard: Callable[..., LiveDashboard]) -> None:
    # Given a dashboard polling every 0.5 s, and another app on the same file (no observer
    # of the dashboard's in it, as in another process)
    dash = serve_dashboard(poll_interval_s=0.5)
    other = App("other", storage=app._storage_spec, autoload=False)
    try:
        with open_live(dash, {"view": "jobs", "limit": 10}) as ws:
            receive_until(ws, enqueued_is(0))
            start = time.monotonic()
            job_id = other.enqueue("remote.job", args=["hello"])
            # Then the poll finds the new count and the new row
            receive_until(ws, enqueued_is(1), timeout=5.0)
            latency = time.monotonic() - start
            rows = receive_until(ws, lambda m: m["type"] == "jobs" and any(
                j["id"] == job_id for j in m["page"]["jobs"]))
            assert rows["page"]["jobs"][0]["method"] == "remote.job"
        print(f"poll push latency: {latency * 1000:.0f} ms")
    finally:
        other.close()


def test_wakeups_push_changes_from_another_app(
        app: App, serve_dashboard: Callable[..., LiveDashboard], transport: str) -> None:
    # Given a dashboard listening to wake-ups on a kombu transport, polling every 10 s
    dash = serve_dashboard(poll_interval_s=10.0, wakeup_url=transport)
    hub = dash.asgi.state.hub
    wait_until(lambda: hub.listening, timeout=10, message="wake-up listeners connected")
    other = App("other", storage=app._storage_spec, autoload=False, wakeup_url=transport)
    try:
        with open_live(dash, {"view": "overview"}) as ws:
            receive_until(ws, enqueued_is(0))
            # When another app (another process, on a real broker) enqueues
            start = time.monotonic()
            other.enqueue("woken.job")
            # Then its wake-up makes the dashboard look at once
            receive_until(ws, enqueued_is(1), timeout=5.0)
            latency = time.monotonic() - start
        print(f"wake-up push latency over {transport}: {latency * 1000:.0f} ms")
    finally:
        other.close()


def test_events_plugin_pushes_outcomes_from_another_app(
        app: App, serve_dashboard: Callable[..., LiveDashboard], transport: str) -> None:
    # Given a dashboard listening on a broker, polling every 10 s, and workers of another
    # app (another process, in production) that register the events plugin
    dash = serve_dashboard(poll_interval_s=10.0, wakeup_url=transport)
    hub = dash.asgi.state.hub
    wait_until(lambda: hub.listening, timeout=10, message="listeners connected")
    other = App("workers", storage=app._storage_spec, autoload=False, wakeup_url=transport,
                plugins=[events])
    release = threading.Event()

    @other.job(name="evented.job")
    def evented() -> str:
        release.wait(10)
        return "ok"

    try:
        with open_live(dash, {"view": "overview"}) as ws, running(other, worker_count=1) as server:
            # (the plugin publishes from the moment the server has started)
            wait_until(lambda: id(server) in events._publishers, timeout=10)
            job_id = evented.enqueue()
            receive_until(ws, lambda m: m["type"] == "stats"
                          and m["stats"]["states"]["Processing"] == 1, timeout=5.0)
            # When the job finishes there
            start = time.monotonic()
            release.set()
            # Then its outcome reaches the dashboard at once, not at the next poll
            receive_until(ws, lambda m: m["type"] == "stats"
                          and m["stats"]["states"]["Succeeded"] == 1, timeout=5.0)
            latency = time.monotonic() - start
        assert app.storage.get(job_id).state.name == "Succeeded"
        print(f"outcome event latency over {transport}: {latency * 1000:.0f} ms")
    finally:
        release.set()
        other.close()


def test_events_plugin_is_quiet_without_a_wakeup_url(app: App) -> None:
    # A server with wake-ups off opens no publisher, and its jobs still run
    other = App("workers", storage=app._storage_spec, autoload=False, plugins=[events],
                wakeup_url=None)

    @other.job(name="quiet.job")
    def quiet() -> int:
        return 1

    job_id = quiet.enqueue()
    with running(other, worker_count=1) as server:
        wait_until(lambda: app.storage.get(job_id).state.name == "Succeeded", timeout=10)
        assert id(server) not in events._publishers
    other.close()


def test_progress_and_state_of_a_watched_job_are_pushed(
        app: App, serve_dashboard: Callable[..., LiveDashboard]) -> None:
    step = threading.Event()
    finish = threading.Event()

    @app.job(name="live.progress")
    def work() -> str:
        current_context().report_progress(0.25, "a quarter")
        step.wait(10)
        current_context().report_progress(0.75, "three quarters")
        finish.wait(10)
        return "done"

    job_id = work.enqueue()
    dash = serve_dashboard(poll_interval_s=0.2)
    with running(app, worker_count=1), open_live(dash, {"view": "job", "id": job_id}) as ws:
        first = receive_until(ws, lambda m: m["type"] == "job" and m["job"]["progress"] is not None
                              and m["job"]["progress"]["fraction"] == 0.25)
        assert first["job"]["state"] == "Processing"
        step.set()
        second = receive_until(ws, lambda m: m["type"] == "job"
                               and m["job"]["progress"]["fraction"] == 0.75)
        assert second["job"]["progress"]["message"] == "three quarters"
        finish.set()
        receive_until(ws, lambda m: m["type"] == "job" and m["job"]["state"] == "Succeeded")


def test_servers_view_is_pushed(app: App, serve_dashboard: Callable[..., LiveDashboard]) -> None:
    dash = serve_dashboard(poll_interval_s=0.2)
    with open_live(dash, {"view": "servers"}) as ws:
        receive_until(ws, lambda m: m["type"] == "servers" and m["servers"] == [])
        with running(app, worker_count=3, enable_heartbeat=True, server_name="pushed"):
            found = receive_until(ws, lambda m: m["type"] == "servers" and len(m["servers"]) == 1)
    assert found["servers"][0]["name"] == "pushed" and found["servers"][0]["worker_count"] == 3


def test_websocket_needs_the_token_and_the_same_origin_c15(
        app: App, serve_dashboard: Callable[..., LiveDashboard]) -> None:
    dash = serve_dashboard(token="s3cret")
    url = f"ws://127.0.0.1:{dash.port}/api/live"
    # Without the token: refused at the handshake
    with pytest.raises(InvalidStatus) as refused, \
            connect(url, origin=dash.url, open_timeout=10):  # type: ignore[arg-type]
        pass
    assert refused.value.response.status_code == 403
    # From another origin, even with the token (cross-site WebSocket hijacking)
    with pytest.raises(InvalidStatus), connect(
            url, origin="http://evil.example",  # type: ignore[arg-type]
            additional_headers={"Authorization": "Bearer s3cret"}, open_timeout=10):
        pass
    # With the token and from the dashboard's own origin: served
    with open_live(dash, {"view": "overview"}, Authorization="Bearer s3cret") as ws:
        receive_until(ws, lambda m: m["type"] == "stats")


def test_a_bad_view_ends_that_connection_only(
        app: App, serve_dashboard: Callable[..., LiveDashboard]) -> None:
    from websockets.exceptions import ConnectionClosed

    dash = serve_dashboard(poll_interval_s=0.2)
    with open_live(dash, {"view": "overview"}) as good:
        receive_until(good, enqueued_is(0))
        with open_live(dash, {"view": "jobs", "state": "Nope"}) as bad, \
                pytest.raises(ConnectionClosed):
            receive_until(bad, lambda m: False, timeout=5.0)
        app.enqueue("still.live")
        receive_until(good, enqueued_is(1))
