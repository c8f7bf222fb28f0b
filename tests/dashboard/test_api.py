"""The dashboard's REST API and pages through FastAPI's test client, on real SQLite.

Covers the data (counts, filters, pagination, detail with error and progress), the
actions, field cases C11 (unknown method visible and retryable), C14 (escaping and CSP)
and C15 (auth, CSRF, same origin, read-only, loopback).
"""

from __future__ import annotations

import base64
import re
from datetime import timedelta
from pathlib import Path

import pytest

from qmlkit import App
from qmlkit.job import Job
from qmlkit.processing.context import current_context
from qmlkit.testing import wait_until
from tests.dashboard.conftest import LOCAL, ClientFactory, running

XSS = "<script>alert(1)</script><img src=x onerror=alert(2)>"


def wait_for_state(app: App, job_id: str, *names: str, timeout: float = 15.0) -> Job:
    def check() -> Job | None:
        job = app.storage.get(job_id)
        return job if job is not None and job.state.name in names else None

    return wait_until(check, timeout=timeout, message=f"{job_id} in {names}")


# --- reads ------------------------------------------------------------------------------


def test_stats_count_jobs_by_state_and_queue(app: App, client_for: ClientFactory) -> None:
    # Given jobs in two queues, one of them scheduled
    app.enqueue("a.job", queue="mail")
    app.enqueue("a.job", queue="mail")
    app.enqueue("b.job", queue="reports", delay=3600)
    client = client_for()
    # When the stats are read
    stats = client.get("/api/stats").json()
    # Then every state is counted, overall and per queue
    assert stats["states"]["Enqueued"] == 2 and stats["states"]["Scheduled"] == 1
    assert stats["states"]["Failed"] == 0
    assert stats["total"] == 3
    assert stats["queues"]["mail"]["Enqueued"] == 2
    assert stats["queues"]["reports"]["Scheduled"] == 1
    # and the overview page shows the same numbers
    page = client.get("/").text
    assert re.search(r'data-count-state="Enqueued">2<', page)
    assert re.search(r'data-count-queue="reports" data-state="Scheduled">1<', page)


def test_jobs_list_filters_by_state_queue_and_method_newest_first(
        app: App, client_for: ClientFactory) -> None:
    ids = [app.enqueue("m.one" if i % 2 else "m.two", queue="q1" if i < 6 else "q2", args=[i])
           for i in range(10)]
    scheduled = app.enqueue("m.one", queue="q1", delay=600)
    client = client_for()
    everything = client.get("/api/jobs").json()
    assert [j["id"] for j in everything["jobs"]] == [scheduled, *reversed(ids)]
    assert everything["total"] == 11 and not everything["has_next"]
    assert {j["id"] for j in client.get("/api/jobs?state=Scheduled").json()["jobs"]} == {scheduled}
    q2 = client.get("/api/jobs?queue=q2").json()
    assert q2["total"] == 4 and {j["queue"] for j in q2["jobs"]} == {"q2"}
    two = client.get("/api/jobs?method=m.two").json()
    assert {j["method"] for j in two["jobs"]} == {"m.two"} and len(two["jobs"]) == 5
    assert two["total"] is None  # not known cheaply with a method filter
    combined = client.get("/api/jobs?state=Enqueued&queue=q1&method=m.one").json()
    assert {j["id"] for j in combined["jobs"]} == {ids[1], ids[3], ids[5]}
    # A bad state name is a 400 that names the states
    bad = client.get("/api/jobs?state=Nope")
    assert bad.status_code == 400 and "Enqueued" in bad.json()["detail"]


def test_jobs_pagination_walks_every_job_once(app: App, client_for: ClientFactory) -> None:
    ids = set(app.enqueue_jobs([app.make_job("p.job", args=[i]) for i in range(23)]))
    client = client_for(page_size=10)
    seen: list[str] = []
    offset = 0
    while True:
        page = client.get(f"/api/jobs?limit=10&offset={offset}").json()
        seen += [j["id"] for j in page["jobs"]]
        if not page["has_next"]:
            break
        offset += 10
    assert len(seen) == 23 and set(seen) == ids
    # The HTML pager links pages and says how many there are
    html = client.get("/jobs?page=2").text
    assert "page 2 of" in html and 'id="next"' in html and 'id="prev"' in html
    assert "page 3 of" in client.get("/jobs?page=3").text
    assert 'id="next"' not in client.get("/jobs?page=3").text


def test_job_detail_shows_arguments_error_traceback_and_progress(
        app: App, client_for: ClientFactory) -> None:
    # Given a job that reports progress and then fails for good
    @app.job(name="reports.build", max_retries=0)
    def build(rows: int, *, title: str) -> None:
        current_context().report_progress(0.4, f"row 40/{rows}")
        raise ValueError(f"row 41 of {title} is broken")

    job_id = build.enqueue(100, title="Q3")
    with running(app, worker_count=1):
        wait_for_state(app, job_id, "Failed")
    client = client_for()
    # When its detail is read
    detail = client.get(f"/api/jobs/{job_id}").json()
    # Then arguments, error with traceback, progress and the actions that apply are there
    assert detail["args"] == [100] and detail["kwargs"] == {"title": "Q3"}
    assert detail["state"] == "Failed"
    assert detail["error"]["type"].endswith("ValueError")
    assert detail["error"]["message"] == "row 41 of Q3 is broken"
    assert "Traceback" in detail["error"]["stack_trace"]
    assert detail["progress"]["fraction"] == pytest.approx(0.4)
    assert detail["progress"]["message"] == "row 40/100"
    assert detail["actions"] == ["retry", "delete"]
    # and the page shows them, with a progress bar
    html = client.get(f"/jobs/{job_id}").text
    assert 'id="traceback"' in html and "row 41 of Q3 is broken" in html
    assert '<progress class="bar" max="1" value="0.4"' in html and "row 40/100" in html
    # the list shows the progress bar too
    listing = client.get("/jobs").text
    assert '<progress class="bar" max="1" value="0.4"' in listing
    # An unknown job is a 404 in the API and a "not found" page
    assert client.get("/api/jobs/nope").status_code == 404
    assert "There is no job nope" in client.get("/jobs/nope").text


def test_servers_and_recurring_are_listed(app: App, client_for: ClientFactory) -> None:
    app.schedule_recurring("nightly", "0 3 * * *", "reports.nightly", args=[1])
    with running(app, worker_count=2, enable_heartbeat=True, queues=("default", "mail"),
                 server_name="web-1"):
        client = client_for()
        servers = client.get("/api/servers").json()
        assert len(servers) == 1
        assert servers[0]["name"] == "web-1" and servers[0]["worker_count"] == 2
        assert servers[0]["queues"] == ["default", "mail"] and servers[0]["alive"]
        assert servers[0]["heartbeat_age_s"] < 60
        assert client.get("/api/stats").json()["servers_live"] == 1
        assert "web-1#" in client.get("/servers").text
        assert "web-1#" in client.get("/").text
    recurring = client.get("/api/recurring").json()
    assert [(t["id"], t["cron"], t["method"]) for t in recurring] == [
        ("nightly", "0 3 * * *", "reports.nightly")]
    assert recurring[0]["next_run_at"] is not None
    html = client.get("/recurring").text
    assert "nightly" in html and 'data-action="trigger"' in html and 'data-action="remove"' in html


def test_throughput_counts_outcomes_per_minute_and_draws_them(
        app: App, client_for: ClientFactory) -> None:
    # Given two jobs that succeed and one that fails
    @app.job(name="t.job", max_retries=0)
    def t(ok: bool) -> None:
        if not ok:
            raise ValueError("no")

    ids = [t.enqueue(True), t.enqueue(True), t.enqueue(False)]
    with running(app, worker_count=1):
        for job_id in ids:
            wait_for_state(app, job_id, "Succeeded", "Failed")
    client = client_for()
    # When the throughput of the last 30 minutes is read
    data = client.get("/api/throughput?minutes=30").json()
    # Then there is one point per minute, oldest first, and the outcomes are counted
    assert data["available"] and len(data["points"]) == 30
    minutes = [p["minute"] for p in data["points"]]
    assert minutes == sorted(minutes)
    assert sum(p["succeeded"] for p in data["points"]) == 2
    assert sum(p["failed"] for p in data["points"]) == 1
    # and the chart is an SVG drawn from them
    chart = client.get("/charts/throughput.svg?minutes=30")
    assert chart.status_code == 200
    assert chart.headers["content-type"].startswith("image/svg+xml")
    assert chart.text.startswith("<svg")
    assert chart.text.count('<rect class="ok"') == 1 and chart.text.count('<rect class="bad"') == 1
    assert "<title>Succeeded 2, failed 1</title>" in chart.text
    assert 'id="throughput"' in client.get("/").text


def test_openapi_describes_every_api_route(client_for: ClientFactory) -> None:
    spec = client_for().get("/api/openapi.json").json()
    paths = spec["paths"]
    for path in ("/api/stats", "/api/throughput", "/api/jobs", "/api/jobs/{job_id}",
                 "/api/jobs/{job_id}/retry", "/api/jobs/{job_id}/requeue",
                 "/api/jobs/{job_id}/delete", "/api/recurring",
                 "/api/recurring/{template_id}/trigger", "/api/recurring/{template_id}/remove",
                 "/api/servers"):
        assert path in paths, path
    assert set(paths["/api/jobs/{job_id}/retry"]) == {"post"}
    assert "JobDetail" in spec["components"]["schemas"]
    assert not any(p.startswith(("/jobs", "/login")) for p in paths)  # pages stay out


# --- actions -------------------------------------------------------------------------------


def csrf_of(client) -> str:
    match = re.search(r'<meta name="csrf-token" content="([0-9a-f]+)">', client.get("/").text)
    assert match, "no CSRF token on the page"
    return match.group(1)


def test_actions_retry_requeue_delete_and_recurring(app: App, client_for: ClientFactory) -> None:
    client = client_for()
    headers = {"X-CSRF-Token": csrf_of(client)}
    # Requeue: a scheduled job runs now
    scheduled = app.enqueue("x.job", delay=3600)
    answer = client.post(f"/api/jobs/{scheduled}/requeue", headers=headers)
    assert answer.status_code == 200, answer.text
    assert answer.json()["job"]["state"] == "Enqueued"
    assert app.storage.get(scheduled).state.name == "Enqueued"
    # Delete, then retry the deleted job
    assert client.post(f"/api/jobs/{scheduled}/delete", headers=headers).json()["job"][
        "state"] == "Deleted"
    assert app.storage.get(scheduled).state.name == "Deleted"
    assert client.post(f"/api/jobs/{scheduled}/retry", headers=headers).status_code == 200
    assert app.storage.get(scheduled).state.name == "Enqueued"
    # Actions that the state machine forbids are 409, unknown jobs 404
    conflict = client.post(f"/api/jobs/{scheduled}/retry", headers=headers)
    assert conflict.status_code == 409
    assert client.post("/api/jobs/nope/retry", headers=headers).status_code == 404
    # Actions are POST only
    assert client.get(f"/api/jobs/{scheduled}/delete").status_code == 405
    # Recurring: trigger makes a job now, remove deletes the template
    app.schedule_recurring("hourly", "0 * * * *", "x.hourly", args=[7])
    triggered = client.post("/api/recurring/hourly/trigger", headers=headers).json()
    job = app.storage.get(triggered["job_id"])
    assert job.method == "x.hourly" and job.args == [7] and job.state.name == "Enqueued"
    assert client.post("/api/recurring/hourly/remove", headers=headers).status_code == 200
    assert app.list_recurring() == []
    assert client.post("/api/recurring/hourly/remove", headers=headers).status_code == 404
    assert client.post("/api/recurring/hourly/trigger", headers=headers).status_code == 404


def test_unknown_method_job_is_visible_and_retryable_c11(
        app: App, client_for: ClientFactory) -> None:
    # Given a job naming a function no worker registers, run until it fails
    @app.job(name="c11.known")
    def known() -> str:
        return "ran"

    unknown_id = app.enqueue("does.not.exist", args=[1], kwargs={"k": "v"})
    client = client_for()
    with running(app, worker_count=1):
        wait_for_state(app, unknown_id, "Failed")
        # Then the dashboard lists it among the failed jobs, payload and reason shown
        failed = client.get("/api/jobs?state=Failed").json()["jobs"]
        assert [j["id"] for j in failed] == [unknown_id]
        assert "does.not.exist" in failed[0]["detail"]
        detail = client.get(f"/api/jobs/{unknown_id}").json()
        assert detail["error"]["type"].endswith("UnknownJobName")
        assert (detail["args"], detail["kwargs"]) == ([1], {"k": "v"})
        assert "retry" in detail["actions"]
        html = client.get(f"/jobs/{unknown_id}").text
        assert "does.not.exist" in html and 'data-action="retry"' in html

        # When code registering the name is deployed and the job is retried from the dashboard
        @app.job(name="does.not.exist")
        def now_exists(x: int, k: str) -> str:
            return f"{x}{k}"

        answer = client.post(f"/api/jobs/{unknown_id}/retry",
                             headers={"X-CSRF-Token": csrf_of(client)})
        assert answer.status_code == 200
        # Then it runs
        done = wait_for_state(app, unknown_id, "Succeeded")
    assert done.state.result == "1v"
    assert client.get(f"/api/jobs/{unknown_id}").json()["state"] == "Succeeded"


# --- C14: escaping and CSP ----------------------------------------------------------------


def test_job_text_is_escaped_everywhere_with_a_csp_c14(app: App, client_for: ClientFactory) -> None:
    # Given a job whose name, arguments, metadata and error all carry markup
    @app.job(name="c14.boom", max_retries=0)
    def boom(text: str, k: str) -> None:
        current_context().report_progress(0.5, XSS)
        raise RuntimeError(XSS)

    job_id = app.enqueue("c14.boom", args=[XSS], kwargs={"k": XSS}, metadata={"m": XSS})
    with running(app, worker_count=1):
        wait_for_state(app, job_id, "Failed")
    app.schedule_recurring(XSS[:40], "0 * * * *", "c14.boom", args=[XSS])
    client = client_for()
    for path in ("/", "/jobs", "/jobs?state=Failed", f"/jobs/{job_id}", "/recurring",
                 f"/jobs?method={XSS}"):
        response = client.get(path)
        assert response.status_code == 200, path
        # Then no markup from the job reaches the page as markup
        assert "<script>alert" not in response.text, path
        assert "<img src=x" not in response.text, path
        # and every page forbids inline scripts
        csp = response.headers["content-security-policy"]
        assert "script-src 'self'" in csp and "unsafe-inline" not in csp
        assert "default-src 'none'" in csp and "frame-ancestors 'none'" in csp
        assert response.headers["x-content-type-options"] == "nosniff"
    detail_page = client.get(f"/jobs/{job_id}").text
    assert "&lt;script&gt;alert(1)&lt;/script&gt;&lt;img src=x onerror=alert(2)&gt;" in detail_page
    # The page holds no inline script at all: only the static file
    assert re.findall(r"<script[^>]*>", detail_page) == [
        '<script src="/static/dashboard.js" defer>']
    # The API returns the text as data
    assert client.get(f"/api/jobs/{job_id}").json()["error"]["message"] == XSS
    assert "content-security-policy" in client.get("/api/stats").headers


def test_the_script_never_parses_text_as_html() -> None:
    from pathlib import Path

    import qmlkit.dashboard

    script = (Path(qmlkit.dashboard.__file__).parent / "static" / "dashboard.js").read_text()
    for sink in ("innerHTML", "outerHTML", "insertAdjacentHTML", "document.write", "eval("):
        assert sink not in script, sink


# --- C15: authentication, CSRF, same origin, read-only, loopback --------------------------


def test_without_the_token_every_route_is_refused_c15(app: App, client_for: ClientFactory) -> None:
    job_id = app.enqueue("x.job")
    client = client_for(token="s3cret-token")
    # Without credentials: 401 everywhere, the login page for browsers
    for path in ("/api/stats", "/api/jobs", f"/api/jobs/{job_id}", "/api/servers",
                 "/api/openapi.json", "/charts/throughput.svg"):
        response = client.get(path)
        assert response.status_code == 401, path
        assert "Bearer" in response.headers["www-authenticate"]
    page = client.get("/jobs", headers={"Accept": "text/html"})
    assert page.status_code == 401 and 'name="token"' in page.text
    for action in ("retry", "delete", "requeue"):
        assert client.post(f"/api/jobs/{job_id}/{action}").status_code == 401
    assert app.storage.get(job_id).state.name == "Enqueued"
    # A wrong token is refused too, as Bearer or basic auth
    assert client.get("/api/stats", headers={"Authorization": "Bearer nope"}).status_code == 401
    wrong = base64.b64encode(b"admin:nope").decode()
    assert client.get("/api/stats", headers={"Authorization": f"Basic {wrong}"}).status_code == 401
    # The right token works as Bearer and as the basic-auth password
    assert client.get("/api/stats", headers={
        "Authorization": "Bearer s3cret-token"}).status_code == 200
    right = base64.b64encode(b"anyone:s3cret-token").decode()
    assert client.get("/api/stats", headers={"Authorization": f"Basic {right}"}).status_code == 200
    # Static files stay public (they hold no data)
    assert client.get("/static/dashboard.js").status_code == 200


def test_login_sets_a_session_and_actions_need_the_csrf_token_c15(
        app: App, client_for: ClientFactory) -> None:
    job_id = app.enqueue("x.job", delay=600)
    client = client_for(token="s3cret-token")
    # A wrong token is told so; the right one sets an HttpOnly, SameSite=Strict cookie
    wrong = client.post("/login", data={"token": "nope", "next": "/jobs"})
    assert wrong.status_code == 401 and "not right" in wrong.text
    login = client.post("/login", data={"token": "s3cret-token", "next": "/jobs"},
                        follow_redirects=False)
    assert login.status_code == 303 and login.headers["location"] == "/jobs"
    cookie = login.headers["set-cookie"].lower()
    assert "httponly" in cookie and "samesite=strict" in cookie
    assert client.get("/api/stats").status_code == 200  # the session cookie works
    # An action with the session but without the CSRF token is refused
    refused = client.post(f"/api/jobs/{job_id}/requeue")
    assert refused.status_code == 403 and "CSRF" in refused.json()["detail"]
    assert client.post(f"/api/jobs/{job_id}/requeue",
                       headers={"X-CSRF-Token": "0" * 64}).status_code == 403
    token = csrf_of(client)
    # from another origin, even with the token
    assert client.post(f"/api/jobs/{job_id}/requeue", headers={
        "X-CSRF-Token": token, "Origin": "http://evil.example"}).status_code == 403
    assert app.storage.get(job_id).state.name == "Scheduled"
    # and accepted from the same origin with the token
    ok = client.post(f"/api/jobs/{job_id}/requeue",
                     headers={"X-CSRF-Token": token, "Origin": LOCAL})
    assert ok.status_code == 200
    assert app.storage.get(job_id).state.name == "Enqueued"
    # A Bearer-authenticated script needs no CSRF token (browsers never add that header)
    other = client_for(token="s3cret-token")
    assert other.post(f"/api/jobs/{job_id}/delete",
                      headers={"Authorization": "Bearer s3cret-token"}).status_code == 200
    # A login may not redirect off-site
    away = client.post("/login", data={"token": "s3cret-token", "next": "//evil.example/"},
                       follow_redirects=False)
    assert away.headers["location"] == "/"
    # Logging out needs the CSRF token too, then the session is gone
    assert client.post("/logout", data={}).status_code == 403
    out = client.post("/logout", data={"csrf_token": csrf_of(client)}, follow_redirects=False)
    assert out.status_code == 303
    client.cookies.clear()
    assert client.get("/api/stats").status_code == 401


def test_without_a_token_actions_still_need_the_csrf_token(
        app: App, client_for: ClientFactory) -> None:
    # On loopback without a token, any page on the web could POST to 127.0.0.1
    job_id = app.enqueue("x.job")
    client = client_for()
    assert client.post(f"/api/jobs/{job_id}/delete").status_code == 403
    assert client.post(f"/api/jobs/{job_id}/delete", headers={
        "X-CSRF-Token": csrf_of(client), "Origin": "http://evil.example"}).status_code == 403
    assert app.storage.get(job_id).state.name == "Enqueued"


def test_without_a_token_only_loopback_host_names_are_served(
        app: App, client_for: ClientFactory) -> None:
    # A DNS-rebinding page reaches 127.0.0.1 under its own host name: refused
    rebound = client_for(base_url="http://attacker.example:8080")
    assert rebound.get("/api/stats").status_code == 400
    assert client_for(base_url="http://localhost:8080").get("/api/stats").status_code == 200
    assert client_for(base_url="http://[::1]:8080").get("/api/stats").status_code == 200
    # With a token every host name is fine (the token is the gate)
    named = client_for(base_url="http://jobs.internal", token="t")
    assert named.get("/api/stats", headers={"Authorization": "Bearer t"}).status_code == 200


def test_read_only_hides_actions_and_refuses_them(app: App, client_for: ClientFactory) -> None:
    @app.job(name="ro.fail", max_retries=0)
    def fail() -> None:
        raise ValueError("no")

    job_id = fail.enqueue()
    with running(app, worker_count=1):
        wait_for_state(app, job_id, "Failed")
    app.schedule_recurring("ro", "0 * * * *", "ro.fail")
    client = client_for(read_only=True)
    headers = {"X-CSRF-Token": csrf_of(client)}
    for path in (f"/api/jobs/{job_id}/retry", f"/api/jobs/{job_id}/delete",
                 f"/api/jobs/{job_id}/requeue", "/api/recurring/ro/trigger",
                 "/api/recurring/ro/remove"):
        response = client.post(path, headers=headers)
        assert response.status_code == 403, path
        assert "read-only" in response.json()["detail"]
    assert app.storage.get(job_id).state.name == "Failed"
    assert len(app.list_recurring()) == 1
    assert "data-action" not in client.get(f"/jobs/{job_id}").text
    assert "data-action" not in client.get("/recurring").text
    assert "read-only" in client.get("/").text
    # Bearer does not get around read-only
    bearer = client_for(read_only=True, token="t")
    assert bearer.post(f"/api/jobs/{job_id}/retry",
                       headers={"Authorization": "Bearer t"}).status_code == 403


def test_a_non_loopback_bind_without_a_token_is_refused() -> None:
    from qmlkit.dashboard import DashboardConfig, is_loopback
    from qmlkit.errors import ConfigurationError

    assert is_loopback("127.0.0.1") and is_loopback("::1") and is_loopback("localhost")
    assert is_loopback("127.1.2.3") and is_loopback("[::1]")
    assert not is_loopback("0.0.0.0") and not is_loopback("::") and not is_loopback("10.0.0.5")
    assert not is_loopback("example.com")
    DashboardConfig(host="127.0.0.1").check_bind()
    with pytest.raises(ConfigurationError, match="QMLKIT_DASHBOARD_TOKEN"):
        DashboardConfig(host="0.0.0.0").check_bind()
    with pytest.raises(ConfigurationError):
        DashboardConfig(host="0.0.0.0", token="").check_bind()
    # issue 17: a public bind needs a token of at least 16 characters (was: "t" accepted)
    DashboardConfig(host="0.0.0.0", token="t" * 16).check_bind()
    assert "hunter2" not in repr(DashboardConfig(token="hunter2"))


def test_delete_of_a_processing_job_discards_its_outcome(
        app: App, client_for: ClientFactory) -> None:
    import threading

    release = threading.Event()

    @app.job(name="slow.job")
    def slow() -> str:
        release.wait(10)
        return "late"

    job_id = slow.enqueue()
    client = client_for()
    with running(app, worker_count=1):
        wait_for_state(app, job_id, "Processing")
        answer = client.post(f"/api/jobs/{job_id}/delete", headers={
            "X-CSRF-Token": csrf_of(client)})
        assert answer.status_code == 200
        release.set()
        wait_until(lambda: client.get("/api/jobs?state=Processing").json()["total"] == 0,
                   timeout=10)
    assert app.storage.get(job_id).state.name == "Deleted"


def test_state_history_is_listed_oldest_first(app: App, client_for: ClientFactory) -> None:
    runs: list[int] = []

    @app.job(name="h.job", max_retries=0)
    def h() -> int:
        runs.append(1)
        if len(runs) == 1:
            raise ValueError("first run fails")
        return 1

    job_id = h.enqueue()
    with running(app, worker_count=1):
        wait_for_state(app, job_id, "Failed")
        client = client_for()
        client.post(f"/api/jobs/{job_id}/retry", headers={"X-CSRF-Token": csrf_of(client)})
        wait_for_state(app, job_id, "Succeeded")
    detail = client.get(f"/api/jobs/{job_id}").json()
    names = [s["name"] for s in detail["history"]]
    assert names == ["Enqueued", "Processing", "Failed", "Enqueued", "Processing", "Succeeded"]
    assert detail["history"][3]["reason"] == "retried by hand"
    html = client.get(f"/jobs/{job_id}").text
    assert 'id="history"' in html
    assert html.count('class="badge state-Processing"') == 2
    assert "retried by hand" in html


@pytest.mark.parametrize("minutes", [1, 60, 1440])
def test_throughput_api_bounds(client_for: ClientFactory, minutes: int) -> None:
    client = client_for()
    assert client.get(f"/api/throughput?minutes={minutes}").status_code == 200
    assert client.get("/api/throughput?minutes=0").status_code == 422
    assert client.get("/api/throughput?minutes=1441").status_code == 422


def test_retry_delay_is_not_waited_for_after_a_requeue(app: App, client_for: ClientFactory) -> None:
    # A job awaiting its retry far in the future can be run now from the dashboard
    from qmlkit.processing.retry import RetryPolicy

    calls: list[int] = []

    @app.job(name="r.flaky", retry=RetryPolicy(max_retries=2, base_delay=timedelta(hours=1),
                                               max_delay=timedelta(hours=1)))
    def flaky() -> str:
        calls.append(1)
        if len(calls) == 1:
            raise ValueError("first attempt fails")
        return "second"

    job_id = flaky.enqueue()
    client = client_for()
    with running(app, worker_count=1):
        waiting = wait_for_state(app, job_id, "AwaitingRetry")
        assert "requeue" in client.get(f"/api/jobs/{job_id}").json()["actions"]
        assert client.get(f"/api/jobs/{job_id}").json()["error"]["message"] == \
            waiting.state.last_exception
        answer = client.post(f"/api/jobs/{job_id}/requeue",
                             headers={"X-CSRF-Token": csrf_of(client)})
        assert answer.status_code == 200
        done = wait_for_state(app, job_id, "Succeeded")
    assert done.state.result == "second"


@pytest.mark.postgres
def test_the_dashboard_works_on_postgresql(postgres_url: str) -> None:
    # The same reads and actions on the PostgreSQL plugin's storage
    from fastapi.testclient import TestClient

    from qmlkit.dashboard import DashboardConfig, create_app
    from tests.conftest import backend_plugins

    pg = App("dash-pg", storage=postgres_url, autoload=False,
             plugins=backend_plugins(postgres_url))
    try:
        @pg.job(name="pg.job", max_retries=0)
        def pg_job(fail: bool) -> str:
            current_context().report_progress(0.5, "half")
            if fail:
                raise ValueError("<b>bold</b> failure")
            return "ok"

        good, bad = pg_job.enqueue(False), pg_job.enqueue(True)
        with running(pg, worker_count=1):
            wait_for_state(pg, good, "Succeeded")
            wait_for_state(pg, bad, "Failed")
        with TestClient(create_app(pg, DashboardConfig()), base_url=LOCAL) as client:
            stats = client.get("/api/stats").json()
            assert (stats["states"]["Succeeded"], stats["states"]["Failed"]) == (1, 1)
            failed = client.get("/api/jobs?state=Failed").json()
            assert [j["id"] for j in failed["jobs"]] == [bad] and failed["total"] == 1
            detail = client.get(f"/api/jobs/{bad}").json()
            assert detail["error"]["message"] == "<b>bold</b> failure"
            assert detail["progress"]["fraction"] == 0.5
            assert [s["name"] for s in detail["history"]] == ["Enqueued", "Processing", "Failed"]
            assert "&lt;b&gt;bold&lt;/b&gt; failure" in client.get(f"/jobs/{bad}").text
            points = client.get("/api/throughput?minutes=5").json()["points"]
            assert sum(p["succeeded"] for p in points) == 1
            assert sum(p["failed"] for p in points) == 1
            retried = client.post(f"/api/jobs/{bad}/retry",
                                  headers={"X-CSRF-Token": csrf_of(client)})
            assert retried.json()["job"]["state"] == "Enqueued"
    finally:
        pg.close()


def test_a_forged_host_header_cannot_loosen_the_csp(client_for: ClientFactory) -> None:
    client = client_for(token="t")
    response = client.get("/api/stats", headers={"Authorization": "Bearer t",
                                                 "Host": "x; script-src *"})
    csp = response.headers["content-security-policy"]
    assert "script-src *" not in csp and "connect-src 'self';" in csp
    normal = client.get("/api/stats", headers={"Authorization": "Bearer t"})
    assert "connect-src 'self' ws://127.0.0.1 wss://127.0.0.1;" in normal.headers[
        "content-security-policy"]


@pytest.mark.redis
def test_with_the_storage_down_pages_answer_503_quickly_with_the_security_headers(
    tmp_path: Path,
) -> None:
    # A Redis of the test's own is stopped under a running dashboard; requests must get
    # a clear 503 (never a bare 500 without the CSP), and work again once it is back.
    from fastapi.testclient import TestClient

    from qmlkit.dashboard import DashboardConfig, create_app
    from qmlkit.testing import RedisProcess, require_service
    from tests.conftest import backend_plugins

    if not RedisProcess.available():
        require_service("redis-server binary", "127.0.0.1", 1)
    server = RedisProcess(tmp_path)
    server.start()
    url = f"{server.url}?prefix=dash-down:"
    app = App("dash-down", storage=url, autoload=False, plugins=backend_plugins(url),
              storage_options={"retry_timeout_s": 0.5, "connect_timeout_s": 0.5})
    try:
        job_id = app.enqueue("x.y")
        with TestClient(create_app(app, DashboardConfig()), base_url=LOCAL) as client:
            assert client.get("/api/stats").status_code == 200
            server.stop()
            for path in ("/api/stats", "/api/jobs", "/", f"/jobs/{job_id}"):
                answer = client.get(path)
                assert answer.status_code == 503, (path, answer.status_code)
                assert "unavailable" in answer.json()["detail"]
                assert "default-src 'none'" in answer.headers["content-security-policy"]
            server.start()
            assert client.get("/api/stats").status_code == 200
            assert client.get("/jobs/no-such-job").status_code == 404
            assert client.get("/api/jobs?offset=99999999999999999999").status_code == 422
    finally:
        server.stop()
        app.close()


def test_progress_of_an_earlier_attempt_is_not_shown_for_a_retry() -> None:
    from qmlkit.dashboard.service import progress_of
    from qmlkit.testing import make_job

    report = {"fraction": 0.9, "message": "almost", "at": "2026-11-29T10:00:00Z", "attempt": 1}
    first = make_job(metadata={"progress": report}, attempts=1)
    retry = make_job(metadata={"progress": report}, attempts=2)
    assert progress_of(first).fraction == 0.9
    assert progress_of(retry) is None
