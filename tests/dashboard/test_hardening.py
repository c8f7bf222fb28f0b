"""Dashboard login hardening (issue 17, item 5): failed-login limits, token length on a
public bind, server-side sessions, ids with any character, a bounded WebSocket offset."""

from __future__ import annotations

import base64
import json
import re
import subprocess
import sys
from collections.abc import Callable, Iterator
from pathlib import Path
from urllib.parse import quote

import pytest
from fastapi.testclient import TestClient

from qmlkit import App
from qmlkit.dashboard import DashboardConfig, create_app
from qmlkit.dashboard.config import MIN_TOKEN_LENGTH
from qmlkit.dashboard.ratelimit import FREE_FAILURES, GLOBAL_FAILURES, GLOBAL_WINDOW_S
from qmlkit.errors import ConfigurationError
from tests.dashboard.conftest import LOCAL, LiveDashboard

TOKEN = "operator-token-0123456789"
BEARER = {"Authorization": f"Bearer {TOKEN}"}
REPO_ROOT = Path(__file__).resolve().parents[2]


class Clock:
    """A monotonic clock the test moves by hand."""

    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


@pytest.fixture
def dashboard(app: App) -> Iterator[tuple[object, Clock, Callable[[str], TestClient]]]:
    """A token-protected dashboard on a hand-moved clock, and clients by address."""
    asgi = create_app(app, DashboardConfig(token=TOKEN))
    clock = Clock()
    asgi.state.auth.clock = clock
    asgi.state.auth.limiter.clock = clock
    clients: list[TestClient] = []

    def client(address: str) -> TestClient:
        made = TestClient(asgi, base_url=LOCAL, client=(address, 40000))
        clients.append(made)
        return made

    yield asgi, clock, client
    for made in clients:
        made.close()


def login(client: TestClient, token: str) -> int:
    return client.post("/login", data={"token": token, "next": "/"},
                       follow_redirects=False).status_code


# --- failed-login limits ---------------------------------------------------------------------


def test_wrong_tokens_lock_that_client_out_while_the_operator_still_gets_in(dashboard) -> None:
    _, clock, client = dashboard
    attacker, operator = client("203.0.113.9"), client("198.51.100.7")
    # Given a client that guessed wrong more often than it may
    for _ in range(FREE_FAILURES + 1):
        assert login(attacker, "wrong-guess") == 401
    # Then even the right token from it is refused, 429 with Retry-After, unchecked
    refused = attacker.post("/login", data={"token": TOKEN})
    assert refused.status_code == 429 and int(refused.headers["retry-after"]) >= 1
    assert "Too many wrong tokens" in refused.text
    assert attacker.get("/api/stats", headers=BEARER).status_code == 429
    # And the operator, from another address, logs in and uses the API at once
    assert login(operator, TOKEN) == 303
    assert operator.get("/api/stats").status_code == 200
    assert operator.get("/api/stats", headers=BEARER).status_code == 200
    # The lockout ends, and then each wrong guess doubles it
    clock.now += 1.5
    assert login(attacker, "wrong-again") == 401
    assert attacker.get("/api/stats", headers=BEARER).status_code == 429
    clock.now += 2.5
    assert attacker.get("/api/stats", headers=BEARER).status_code == 200


def test_wrong_bearer_and_basic_tokens_count_as_failed_logins(dashboard) -> None:
    _, _, client = dashboard
    guesser = client("203.0.113.10")
    for n in range(FREE_FAILURES + 1):
        header = (f"Bearer guess-{n}" if n % 2 else
                  "Basic " + base64.b64encode(f"admin:guess-{n}".encode()).decode())
        assert guesser.get("/api/stats", headers={"Authorization": header}).status_code == 401
    assert guesser.get("/api/stats", headers=BEARER).status_code == 429
    assert client("198.51.100.8").get("/api/stats", headers=BEARER).status_code == 200


def test_the_global_limit_stops_many_addresses_but_not_a_fresh_client(dashboard) -> None:
    _, clock, client = dashboard
    # Given more failures than the global limit, each from its own address (one guess each)
    guessers = [client(f"10.1.{n // 250}.{n % 250}") for n in range(GLOBAL_FAILURES + 1)]
    for guesser in guessers:
        assert guesser.get("/api/stats", headers={"Authorization": "Bearer x"}).status_code == 401
    # Then an address that failed waits for the window, whatever it sends
    assert guessers[0].get("/api/stats", headers=BEARER).status_code == 429
    assert login(guessers[1], TOKEN) == 429
    # While a client that never failed still gets in with the right token
    assert login(client("198.51.100.9"), TOKEN) == 303
    # And after the window the failed addresses may try again
    clock.now += GLOBAL_WINDOW_S + 1
    assert guessers[0].get("/api/stats", headers=BEARER).status_code == 200


# --- token length on a public bind -------------------------------------------------------------


def test_a_public_bind_needs_a_token_of_at_least_16_characters() -> None:
    assert MIN_TOKEN_LENGTH == 16
    with pytest.raises(ConfigurationError, match="at least 16"):
        DashboardConfig(host="0.0.0.0", token="t").check_bind()
    with pytest.raises(ConfigurationError, match="at least 16"):
        DashboardConfig(host="10.0.0.5", token="x" * 15).check_bind()
    DashboardConfig(host="0.0.0.0", token="x" * 16).check_bind()
    DashboardConfig(host="127.0.0.1", token="t").check_bind()  # loopback: any token


def test_the_dashboard_command_refuses_a_short_token_on_a_public_bind(tmp_path: Path) -> None:
    proc = subprocess.run(
        [sys.executable, "-m", "qmlkit.cli", "dashboard", "--host", "0.0.0.0", "--port", "0",
         "--token", "short", "--storage", f"sqlite:///{tmp_path}/q.db"],
        capture_output=True, text=True, timeout=60,
        env={"PATH": "", "PYTHONPATH": str(REPO_ROOT), "QMLKIT_DISABLE_PLUGIN_AUTOLOAD": "1"})
    assert proc.returncode == 1, proc.stdout + proc.stderr
    assert "at least 16" in proc.stderr and "short" not in proc.stderr


# --- sessions ----------------------------------------------------------------------------------


def session_cookie(response) -> str:
    match = re.search(r"qmlkit_dashboard=([^;]+)", response.headers["set-cookie"])
    assert match
    return match.group(1)


def test_sessions_are_random_expire_and_logout_revokes_them(app: App) -> None:
    asgi = create_app(app, DashboardConfig(token=TOKEN, session_ttl_s=600))
    clock = Clock()
    asgi.state.auth.clock = clock
    with TestClient(asgi, base_url=LOCAL) as first:
        second = TestClient(asgi, base_url=LOCAL)  # the same application: no second lifespan
        one = first.post("/login", data={"token": TOKEN}, follow_redirects=False)
        two = second.post("/login", data={"token": TOKEN}, follow_redirects=False)
        # Each login gets its own random session, which says nothing of the token
        assert session_cookie(one) != session_cookie(two)
        assert len(session_cookie(one)) >= 40 and TOKEN not in session_cookie(one)
        assert "max-age=600" in one.headers["set-cookie"].lower()
        assert first.get("/api/stats").status_code == 200
        # Logging out ends the session on the server: its cookie no longer works anywhere
        stolen = session_cookie(one)
        csrf = re.search(r'name="csrf-token" content="([0-9a-f]+)"', first.get("/").text)
        assert first.post("/logout", data={"csrf_token": csrf.group(1)},
                          follow_redirects=False).status_code == 303
        replay = TestClient(asgi, base_url=LOCAL, cookies={"qmlkit_dashboard": stolen})
        assert replay.get("/api/stats").status_code == 401
        # The other session lives until its time is up
        clock.now += 599
        assert second.get("/api/stats").status_code == 200
        clock.now += 2
        assert second.get("/api/stats").status_code == 401


def test_the_default_session_lifetime_is_12_hours(app: App) -> None:
    assert DashboardConfig().session_ttl_s == 12 * 3600
    assert create_app(app, DashboardConfig(token=TOKEN)).state.auth.session_ttl_s == 12 * 3600


# --- ids with any character --------------------------------------------------------------------


# (TestClient decodes a path twice, so an id holding "%xx" is tried through uvicorn below)
@pytest.mark.parametrize("job_id", ["a/b", "tenant/7/../x", "sp ace?q=1#frag/é", "/lead"])
def test_job_ids_with_slashes_work_on_every_route(app: App, client_for, job_id: str) -> None:
    client = client_for()
    csrf = re.search(r'name="csrf-token" content="([0-9a-f]+)"', client.get("/").text).group(1)
    headers = {"X-CSRF-Token": csrf}
    app.enqueue("x.job", job_id=job_id)
    path = quote(job_id, safe="")
    # The list links to the job with its id encoded, and the page and the API show it
    assert f'href="/jobs/{path}"' in client.get("/jobs").text
    page = client.get(f"/jobs/{path}")
    assert page.status_code == 200 and f"/api/jobs/{path}/delete" in page.text
    assert client.get(f"/api/jobs/{path}").json()["id"] == job_id
    # Every action reaches it
    assert client.post(f"/api/jobs/{path}/delete", headers=headers).status_code == 200
    assert app.storage.get(job_id).state.name == "Deleted"
    assert client.post(f"/api/jobs/{path}/retry", headers=headers).status_code == 200
    assert app.storage.get(job_id).state.name == "Enqueued"
    scheduled = f"{job_id}/later"
    app.enqueue("x.job", job_id=scheduled, delay=600)
    assert client.post(f"/api/jobs/{quote(scheduled, safe='')}/requeue",
                       headers=headers).status_code == 200
    assert app.storage.get(scheduled).state.name == "Enqueued"


def test_recurring_ids_with_slashes_can_be_triggered_and_removed(app: App, client_for) -> None:
    client = client_for()
    csrf = re.search(r'name="csrf-token" content="([0-9a-f]+)"', client.get("/").text).group(1)
    app.schedule_recurring("reports/daily", "0 * * * *", "x.report")
    path = quote("reports/daily", safe="")
    assert f"/api/recurring/{path}/trigger" in client.get("/recurring").text
    triggered = client.post(f"/api/recurring/{path}/trigger", headers={"X-CSRF-Token": csrf})
    assert triggered.status_code == 200
    assert app.storage.get(triggered.json()["job_id"]).method == "x.report"
    assert client.post(f"/api/recurring/{path}/remove",
                       headers={"X-CSRF-Token": csrf}).status_code == 200
    assert app.list_recurring() == []


def test_an_id_holding_percent_escapes_works_through_a_real_server(
        app: App, serve_dashboard: Callable[..., LiveDashboard]) -> None:
    import urllib.request

    job_id = "50%2F50/%zz%"
    app.enqueue("x.job", job_id=job_id)
    dash = serve_dashboard()
    with urllib.request.urlopen(f"{dash.url}/api/jobs/{quote(job_id, safe='')}",
                                timeout=10) as response:
        assert json.loads(response.read())["id"] == job_id
    with urllib.request.urlopen(f"{dash.url}/jobs/{quote(job_id, safe='')}",
                                timeout=10) as response:
        assert response.status == 200


# --- the WebSocket's offset ----------------------------------------------------------------------


@pytest.mark.parametrize("view", [
    {"view": "jobs", "offset": 10**30},
    {"view": "jobs", "offset": 100_000_001},
    {"view": "jobs", "limit": float("inf")},
    {"view": "jobs", "offset": [1]},
])
def test_a_websocket_view_out_of_bounds_ends_that_connection_cleanly(
        app: App, serve_dashboard: Callable[..., LiveDashboard], view: dict) -> None:
    from websockets.exceptions import ConnectionClosed
    from websockets.sync.client import connect

    dash = serve_dashboard(poll_interval_s=0.2)
    with connect(f"ws://127.0.0.1:{dash.port}/api/live", origin=dash.url,  # type: ignore[arg-type]
                 open_timeout=10) as ws:
        ws.send(json.dumps(view))
        with pytest.raises(ConnectionClosed) as closed:
            while True:
                ws.recv(timeout=10)
    assert closed.value.rcvd is not None and closed.value.rcvd.code == 1008
