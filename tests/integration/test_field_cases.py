"""Field cases C07, C08, C10, C11, C12, C13, C18 and C19 (``shared/cases/field-cases.md``).

Each scenario runs against a real server (in-process, or ``qmlkit worker`` in a
subprocess where signals or host time zones matter) on both built-in backends where the
case is not specific to one. Tests wait on conditions with deadlines; the only sleeps
are inside job bodies, as the simulated work.
"""

from __future__ import annotations

import hashlib
import json
import os
import signal
import subprocess
import sys
import threading
import time
import uuid
from collections import Counter
from collections.abc import Iterator
from contextlib import contextmanager
from datetime import datetime, timedelta, timezone
from pathlib import Path
from typing import Any
from zoneinfo import ZoneInfo

import pytest

from qmlkit import (
    App,
    ConfigurationError,
    Job,
    PayloadError,
    Retry,
    RetryPolicy,
    Server,
    hookimpl,
)
from qmlkit.testing import wait_for_count, wait_until
from tests.conftest import backend_plugins

#: The repository root, put on child processes' PYTHONPATH so they import this qmlkit.
REPO_ROOT = Path(__file__).resolve().parents[2]

#: Server settings that keep the tests quick: short polls, no cleanup, quiet attempts.
FAST: dict[str, Any] = {
    "polling_interval": timedelta(milliseconds=50),
    "scheduler_poll_interval": timedelta(milliseconds=200),
    "enable_cleanup": False,
    "log_attempts": False,
    "shutdown_timeout": timedelta(seconds=10),
}


@contextmanager
def running(app: App, **fields: Any) -> Iterator[Server]:
    """Start a server for ``app`` with ``FAST`` settings (overridden by ``fields``)."""
    server = app.server(**{**FAST, **fields})
    server.start()
    try:
        yield server
    finally:
        server.stop()


def wait_for_state(app: App, job_id: str, *names: str, timeout: float = 10.0) -> Job:
    """Wait until the stored job is in one of ``names``; return it."""

    def check() -> Job | None:
        job = app.storage.get(job_id)
        return job if job is not None and job.state.name in names else None

    return wait_until(check, timeout=timeout, message=f"job {job_id} to reach {names}")


def state_counts(app: App) -> Counter[str]:
    """Count stored jobs by state name, over every queue."""
    counts: Counter[str] = Counter()
    for (_, state), n in app.storage.count_jobs().items():
        counts[state] += n
    return counts


def child_env(*extra_paths: Path, **overrides: str) -> dict[str, str]:
    """Environment for a child Python: this repository (and ``extra_paths``) importable."""
    env = dict(os.environ)
    paths = [str(p) for p in (*extra_paths, REPO_ROOT)]
    if env.get("PYTHONPATH"):
        paths.append(env["PYTHONPATH"])
    env["PYTHONPATH"] = os.pathsep.join(paths)
    env["QMLKIT_DISABLE_PLUGIN_AUTOLOAD"] = "1"
    env.update(overrides)
    return env


def datetimes_of(job: Job) -> dict[str, datetime]:
    """Every datetime stored on ``job``: its own fields and its state's."""
    found = {"created_at": job.created_at}
    if job.expires_at is not None:
        found["expires_at"] = job.expires_at
    for name, value in job.state:
        if isinstance(value, datetime):
            found[f"state.{name}"] = value
    return found


def assert_all_utc(job: Job) -> None:
    for name, value in datetimes_of(job).items():
        assert value.tzinfo is not None, f"{name} is naive: {value!r}"
        assert value.utcoffset() == timedelta(0), f"{name} is not UTC: {value!r}"


class StateLog:
    """A ``qmlkit_job_state_changed`` observer that keeps every committed state."""

    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.changes: list[tuple[str, str | None, Any]] = []
        self.seen_at: dict[tuple[str, str], float] = {}  # (id, state) -> first time.time()

    @hookimpl
    def qmlkit_job_state_changed(self, job: Job, previous: Any, current: Any) -> None:
        with self.lock:
            self.changes.append((job.id, previous.name if previous else None, current))
            self.seen_at.setdefault((job.id, current.name), time.time())

    def states(self, name: str) -> dict[str, Any]:
        with self.lock:
            return {job_id: state for job_id, _, state in self.changes if state.name == name}


# --- C07: delays and retry backoff do not depend on the host's time zone ---------------

C07_CHILD = """
import json, sys, time
from datetime import datetime, timedelta
from pathlib import Path

time.tzset()

from qmlkit import App, ConfigurationError
from qmlkit.testing import wait_until

db, out_dir, label = sys.argv[1], Path(sys.argv[2]), sys.argv[3]
app = App(label, storage=f"sqlite:///{db}", autoload=False)


@app.job(name="c07.record")
def record(who):
    Path(out_dir, who + ".start").write_text(repr(time.time()))


def utc_flags(job):
    found = {"created_at": job.created_at}
    for name, value in job.state:
        if isinstance(value, datetime):
            found["state." + name] = value
    return {k: v.tzinfo is not None and v.utcoffset() == timedelta(0) for k, v in found.items()}


try:
    record.schedule(label, at=datetime.now() + timedelta(seconds=2))
    naive = None
except ConfigurationError as exc:
    naive = str(exc)

server = app.server(worker_count=2, polling_interval=timedelta(milliseconds=100),
                    scheduler_poll_interval=timedelta(milliseconds=200),
                    enable_cleanup=False, log_attempts=False, server_name=label)
server.start()
t0 = time.time()
job_id = record.schedule(label, delay=2)
scheduled = app.storage.get(job_id)
done = wait_until(
    lambda: (j := app.storage.get(job_id)) is not None and j.state.name == "Succeeded" and j,
    timeout=30,
)
server.stop()
app.close()
print(json.dumps({
    "label": label,
    "gmtoff": time.localtime().tm_gmtoff,
    "t0": t0,
    "start": float(Path(out_dir, label + ".start").read_text()),
    "recorded_delay": (scheduled.state.enqueue_at - scheduled.created_at).total_seconds(),
    "scheduled_state": scheduled.state.name,
    "utc_scheduled": utc_flags(scheduled),
    "utc_done": utc_flags(done),
    "naive_error": naive,
}))
"""


def test_delayed_job_starts_after_its_delay_when_hosts_are_in_different_time_zones(
    tmp_path: Path,
) -> None:
    # Given three processes on one SQLite file, each host in another time zone
    script = tmp_path / "c07_child.py"
    script.write_text(C07_CHILD)
    db = tmp_path / "shared.db"
    zones = {"london": "Europe/London", "la": "America/Los_Angeles", "tokyo": "Asia/Tokyo"}
    init = App("init", storage=f"sqlite:///{db}", autoload=False)
    init.storage  # noqa: B018 - create the tables before the children start
    init.close()
    # When each schedules a job with a 2 s delay and runs a server (any server may run any job)
    procs = {
        label: subprocess.Popen(
            [sys.executable, str(script), str(db), str(tmp_path), label],
            env=child_env(TZ=zone), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
        )
        for label, zone in zones.items()
    }
    results = {}
    try:
        for label, proc in procs.items():
            out, err = proc.communicate(timeout=60)
            assert proc.returncode == 0, f"{label} child failed:\n{err}"
            results[label] = json.loads(out.strip().splitlines()[-1])
    finally:
        for proc in procs.values():
            if proc.poll() is None:
                proc.kill()
                proc.wait()
    # Then the zones really differed
    offsets = {label: r["gmtoff"] for label, r in results.items()}
    assert offsets["tokyo"] == 9 * 3600 and offsets["la"] in (-8 * 3600, -7 * 3600), offsets
    for label, r in results.items():
        # each job started no sooner than 2 s after it was scheduled, and not much later
        waited = r["start"] - r["t0"]
        assert 2.0 <= waited <= 2.0 + 4.0, f"{label}: started {waited:.3f} s after scheduling"
        assert r["scheduled_state"] == "Scheduled"
        assert r["recorded_delay"] == pytest.approx(2.0, abs=1e-6)
        # every stored time is aware UTC, before and after the run
        assert r["utc_scheduled"] and all(r["utc_scheduled"].values()), r["utc_scheduled"]
        assert r["utc_done"] and all(r["utc_done"].values()), r["utc_done"]
        # and a naive at= was refused, not read as local time
        assert r["naive_error"] is not None and "aware" in r["naive_error"], label


def test_schedule_refuses_a_naive_datetime_and_stores_nothing(app: App) -> None:
    @app.job(name="c07.noop")
    def noop() -> None:
        return None

    with pytest.raises(ConfigurationError, match="aware"):
        noop.schedule(at=datetime.now() + timedelta(minutes=5))
    naive_utc = datetime.now(timezone.utc).replace(tzinfo=None)
    with pytest.raises(ConfigurationError, match="aware"):
        app.enqueue("c07.noop", at=naive_utc + timedelta(minutes=5))
    assert app.storage.count_jobs() == {}


def test_scheduled_times_are_stored_as_aware_utc_when_given_in_another_zone(app: App) -> None:
    @app.job(name="c07.noop")
    def noop() -> None:
        return None

    tokyo_time = datetime.now(ZoneInfo("Asia/Tokyo")) + timedelta(hours=1)
    job = app.storage.get(noop.schedule(at=tokyo_time))
    assert job is not None and job.state.name == "Scheduled"
    assert job.state.enqueue_at == tokyo_time  # the same instant ...
    assert_all_utc(job)  # ... stored in UTC


@pytest.fixture(params=["Europe/London", "America/Los_Angeles", "Asia/Tokyo"])
def host_tz(request: pytest.FixtureRequest, monkeypatch: pytest.MonkeyPatch) -> Iterator[str]:
    """Run the test with this process's local time zone set to each zone in turn."""
    monkeypatch.setenv("TZ", request.param)
    time.tzset()
    yield request.param
    monkeypatch.undo()
    time.tzset()


def test_retry_delay_counts_from_the_failure_in_any_host_time_zone(app: App, host_tz: str) -> None:
    # Given a job that asks for a retry in 2 s on its first attempt
    starts: list[float] = []

    @app.job(name="c07.retry_once", max_retries=2)
    def retry_once() -> str:
        starts.append(time.time())
        if len(starts) == 1:
            raise Retry(delay=2)
        return "ok"

    job_id = retry_once.enqueue()
    with running(app, worker_count=1):
        # When it fails
        waiting = wait_for_state(app, job_id, "AwaitingRetry")
        observed = time.time()
        # Then retry_at is the failure time plus 2 s, in UTC
        assert_all_utc(waiting)
        retry_at = waiting.state.retry_at.timestamp()
        assert starts[0] + 2.0 <= retry_at <= observed + 2.0
        # and the retry starts at retry_at, not at once and not hours off
        done = wait_for_state(app, job_id, "Succeeded", timeout=15)
    assert retry_at <= starts[1] <= retry_at + 3.0
    assert (done.attempts, done.retry_count) == (2, 1)
    assert_all_utc(done)


def test_policy_backoff_counts_from_the_failure_in_any_host_time_zone(
    app: App, host_tz: str
) -> None:
    failed_at: list[float] = []
    policy = RetryPolicy(base_delay=timedelta(seconds=30), jitter=0.0, max_retries=1)

    @app.job(name="c07.fails", retry=policy)
    def fails() -> None:
        failed_at.append(time.time())
        raise RuntimeError("boom")

    job_id = fails.enqueue()
    with running(app, worker_count=1):
        waiting = wait_for_state(app, job_id, "AwaitingRetry")
        observed = time.time()
    assert_all_utc(waiting)
    retry_at = waiting.state.retry_at.timestamp()
    assert failed_at[0] + 30.0 <= retry_at <= observed + 30.0
    assert waiting.state.retry_count == 1 and "RuntimeError: boom" in waiting.state.last_exception


@pytest.mark.parametrize(
    "delay", [time.time() * 1000, float("nan")],
    ids=["millisecond-timestamp", "nan"],
)
def test_retry_with_an_unusable_delay_does_not_kill_the_worker(app: App, delay: float) -> None:
    # Given a job that asks for a retry with a delay no datetime can hold
    @app.job(name="c07.bad_delay", max_retries=2)
    def bad_delay() -> None:
        raise Retry(delay=delay)

    @app.job(name="c07.after")
    def after() -> str:
        return "ran"

    bad_id = bad_delay.enqueue()
    after_id = after.enqueue()
    # When the only worker thread runs it
    with running(app, worker_count=1):
        # Then the job's outcome is recorded (it does not stay Processing) ...
        bad = wait_for_state(app, bad_id, "Failed", "AwaitingRetry", "Succeeded", timeout=5)
        # ... and the same worker goes on to the next job
        assert wait_for_state(app, after_id, "Succeeded", timeout=5).state.result == "ran"
    assert bad.state.name in ("Failed", "AwaitingRetry")
    assert_all_utc(bad)


# --- C08: retries of jobs that fail together are spread out ----------------------------


def test_backoff_spreads_simultaneous_failures_between_delay_and_delay_plus_jitter() -> None:
    # Given the field case's policy: base 10 s, doubling, jitter 0.5, 5 retries
    policy = RetryPolicy(base_delay=timedelta(seconds=10), multiplier=2, jitter=0.5,
                         max_retries=5)
    for retry_number in range(1, 6):
        computed = 10.0 * 2 ** (retry_number - 1)
        # When 200 jobs that failed at once ask for their backoff
        delays = [policy.backoff(retry_number).total_seconds() for _ in range(200)]
        # Then no delay is below the computed one or above it plus 50 %
        assert min(delays) >= computed, (retry_number, min(delays))
        assert max(delays) <= computed * 1.5, (retry_number, max(delays))
        # and they are spread over the window, not synchronised
        assert len(set(delays)) >= 190  # microsecond resolution allows a rare tie
        assert max(delays) - min(delays) >= computed * 0.25  # 2.5 s for the first retry


def test_backoff_stays_between_cap_and_cap_plus_jitter_for_huge_retry_numbers() -> None:
    policy = RetryPolicy(base_delay=timedelta(seconds=10), multiplier=2, jitter=0.5,
                         max_delay=timedelta(minutes=10))
    cap = 600.0
    for retry_number in (7, 8, 60, 1_100, 10**6, 10**18):
        delays = [policy.backoff(retry_number).total_seconds() for _ in range(50)]
        assert all(cap <= d <= cap * 1.5 for d in delays), (retry_number, delays[:3])
    steep = RetryPolicy(base_delay=timedelta(seconds=1), multiplier=100, jitter=1.0)
    assert 3600.0 <= steep.backoff(10**6).total_seconds() <= 7200.0
    # below the cap, every retry waits at least the exponential delay
    for retry_number in range(1, 7):
        assert policy.backoff(retry_number).total_seconds() >= 10.0 * 2 ** (retry_number - 1)


def test_retries_of_jobs_failing_together_are_spread(backend_url: str) -> None:
    # Given 50 jobs that each fail once, with a 1 s backoff and 100 % jitter
    observer = StateLog()
    app = App("c08", storage=backend_url, autoload=False,
              plugins=[observer, *backend_plugins(backend_url)])
    failed_at: dict[int, float] = {}
    ran: Counter[int] = Counter()
    lock = threading.Lock()

    @app.job(name="c08.fails_once",
             retry=RetryPolicy(base_delay=timedelta(seconds=1), jitter=1.0, max_retries=3))
    def fails_once(i: int) -> int:
        with lock:
            ran[i] += 1
            if i not in failed_at:
                failed_at[i] = time.time()
                raise RuntimeError("database overloaded")
        return i

    try:
        ids = fails_once.enqueue_many([(i,) for i in range(50)])
        # When a server runs them all at once
        with running(app, worker_count=4):
            wait_until(lambda: state_counts(app)["Succeeded"] == 50, timeout=20)
        # Then every job waits between 1 s and 2 s after its failure. The backoff starts
        # when the server handles the failure, some time after the raise (longer on a
        # loaded machine) and before the observer sees the AwaitingRetry state: so
        # raised + 1 s <= retry_at <= observed + 2 s, whatever the load.
        retry_states = observer.states("AwaitingRetry")
        assert set(retry_states) == set(ids)
        arg_of = {job_id: app.storage.get(job_id).args[0] for job_id in retry_states}
        by_arg = {arg_of[job_id]: s for job_id, s in retry_states.items()}
        observed = {arg_of[job_id]: observer.seen_at[(job_id, "AwaitingRetry")]
                    for job_id in retry_states}
        delays = [by_arg[i].retry_at.timestamp() - failed_at[i] for i in range(50)]
        assert min(delays) >= 1.0, min(delays)
        late = [by_arg[i].retry_at.timestamp() - observed[i] for i in range(50)]
        assert max(late) <= 2.0, max(late)
        # ... and the delays are spread, not all equal
        assert len({s.retry_at for s in retry_states.values()}) >= 45
        assert max(delays) - min(delays) >= 0.3
        # Each ran twice: one failure, one retry. (``attempts`` counts claims, and a loaded
        # machine may add claims that run nothing: a batch released unstarted from
        # behind a job the straggler duty saw as slow is claimed again.)
        assert ran == dict.fromkeys(range(50), 2)
        assert all(app.storage.get(j).retry_count == 1 for j in ids)
    finally:
        app.close()


# --- C10: stopping drains running jobs; a second signal releases them ------------------

C10_MODULE = """
import time
from pathlib import Path

from qmlkit import App

app = App("c10", storage={url!r}, autoload=False)


@app.job(name="c10.work", max_retries=0)
def work(marker, seconds):
    time.sleep(seconds)
    Path(marker).write_text("done")
"""


def start_worker(tmp_path: Path, module: str, *extra: str) -> subprocess.Popen[str]:
    """Start ``qmlkit worker module:app`` in ``tmp_path``, logging to files there."""
    out = (tmp_path / "worker.out").open("w")
    err = (tmp_path / "worker.err").open("w")
    try:
        return subprocess.Popen(
            [sys.executable, "-m", "qmlkit.cli", "worker", f"{module}:app", *extra],
            cwd=tmp_path, env=child_env(tmp_path), stdout=out, stderr=err, text=True,
        )
    finally:
        out.close()
        err.close()


def stop_process(proc: subprocess.Popen[str]) -> None:
    if proc.poll() is None:
        proc.kill()
        proc.wait()


@pytest.fixture
def c10_app(tmp_path: Path) -> Iterator[tuple[App, str]]:
    """A worker module in ``tmp_path`` and an App on the same SQLite file, for the test."""
    module = f"c10_app_{uuid.uuid4().hex[:8]}"
    url = f"sqlite:///{tmp_path / 'c10.db'}"
    (tmp_path / f"{module}.py").write_text(C10_MODULE.format(url=url))
    app = App("c10-test", storage=url, autoload=False)
    yield app, module
    app.close()


WORKER_FLAGS = ("--threads", "4", "--shutdown-timeout", "30", "--polling-interval", "0.1")


def test_worker_drains_running_jobs_on_sigterm_and_exits_0(
    tmp_path: Path, c10_app: tuple[App, str]
) -> None:
    app, module = c10_app
    # Given 4 jobs of 4 s on a worker with 4 threads, and a fifth job waiting behind them
    markers = [tmp_path / f"marker{i}" for i in range(5)]
    ids = [app.enqueue("c10.work", args=[str(m), 4.0]) for m in markers]
    proc = start_worker(tmp_path, module, *WORKER_FLAGS)
    try:
        wait_until(lambda: state_counts(app)["Processing"] == 4, timeout=20)
        assert not any(m.exists() for m in markers)
        # When the worker gets SIGTERM while they run
        proc.send_signal(signal.SIGTERM)
        code = proc.wait(timeout=20)
    finally:
        stop_process(proc)
    log = (tmp_path / "worker.err").read_text()
    # Then it waited for them, exited 0, and claimed nothing new
    assert code == 0, log
    running_ids = [i for i, m in zip(ids, markers, strict=True) if m.exists()]
    assert len(running_ids) == 4, log
    for job_id in running_ids:
        job = app.storage.get(job_id)
        assert (job.state.name, job.attempts) == ("Succeeded", 1)
    (left,) = set(ids) - set(running_ids)
    job = app.storage.get(left)
    assert (job.state.name, job.attempts) == ("Enqueued", 0)


@pytest.mark.parametrize("pool", ["threads", "asyncio"])
def test_worker_releases_running_jobs_on_second_sigterm_and_exits_1_promptly(
    tmp_path: Path, c10_app: tuple[App, str], pool: str
) -> None:
    app, module = c10_app
    # Given 4 `def` jobs of 60 s running on a worker with a 30 s grace period (the asyncio
    # pool runs them on its executor's threads, which would hold the exit)
    ids = [app.enqueue("c10.work", args=[str(tmp_path / f"m{i}"), 60.0]) for i in range(4)]
    proc = start_worker(tmp_path, module, *WORKER_FLAGS, "--pool", pool)
    err = tmp_path / "worker.err"
    try:
        wait_until(lambda: state_counts(app)["Processing"] == 4, timeout=20)
        # When it gets SIGTERM, starts draining, then gets a second SIGTERM
        proc.send_signal(signal.SIGTERM)
        wait_until(lambda: "draining" in err.read_text(), timeout=10)
        proc.send_signal(signal.SIGTERM)
        signalled = time.monotonic()
        try:
            code: int | None = proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            code = None
        took = time.monotonic() - signalled
    finally:
        stop_process(proc)
    # Then every job is back in its queue at once, with no retry used
    for job_id in ids:
        job = app.storage.get(job_id)
        assert job.state.name == "Enqueued", job.state
        assert "released" in (job.state.reason or "")
        assert (job.retry_count, job.attempts) == (0, 1)
    # and the process exits 1 promptly, not after the 30 s grace period
    assert code == 1, f"still running {took:.1f} s after the second SIGTERM: {err.read_text()}"


@pytest.mark.parametrize("pool", ["threads", "asyncio"])
def test_worker_releases_running_jobs_when_the_grace_period_runs_out(
    tmp_path: Path, c10_app: tuple[App, str], pool: str
) -> None:
    app, module = c10_app
    ids = [app.enqueue("c10.work", args=[str(tmp_path / f"m{i}"), 60.0]) for i in range(4)]
    flags = ("--threads", "4", "--shutdown-timeout", "1", "--polling-interval", "0.1",
             "--pool", pool)
    proc = start_worker(tmp_path, module, *flags)
    try:
        wait_until(lambda: state_counts(app)["Processing"] == 4, timeout=20)
        proc.send_signal(signal.SIGTERM)
        code = proc.wait(timeout=15)
    finally:
        stop_process(proc)
    assert code == 1, (tmp_path / "worker.err").read_text()
    for job_id in ids:
        job = app.storage.get(job_id)
        assert (job.state.name, job.retry_count, job.attempts) == ("Enqueued", 0, 1)


def test_stop_releases_claimed_but_unstarted_jobs(backend_url: str) -> None:
    # Given one worker that claims up to 10 jobs at a time (a large prefetch window)
    app = App("c10", storage=backend_url, autoload=False,
              plugins=backend_plugins(backend_url))
    ran: list[int] = []

    @app.job(name="c10.quick")
    def quick(i: int) -> None:
        time.sleep(0.05)
        ran.append(i)

    try:
        ids = quick.enqueue_many([(i,) for i in range(60)])
        server = app.server(**{**FAST, "worker_count": 1, "fetch_batch_size": 10,
                                "prefetch_window": timedelta(hours=1)})
        server.start()
        try:
            # When it is stopped in the middle of a batch
            wait_until(lambda: len(ran) >= 5, timeout=10)
        finally:
            server.stop()
        # Then nothing stays Processing; every job ran or is Enqueued again, unused
        jobs = [app.storage.get(j) for j in ids]
        counts = Counter(j.state.name for j in jobs)
        assert set(counts) <= {"Succeeded", "Enqueued"}, counts
        assert counts["Succeeded"] == len(ran) < 60
        released = [j for j in jobs if j.state.name == "Enqueued" and j.attempts == 1]
        assert released, "no claimed-but-unstarted job was released"
        for job in released:
            assert job.retry_count == 0 and job.args[0] not in ran
            assert "unstarted" in (job.state.reason or "")
        # and a new server runs the released jobs
        with running(app, worker_count=2):
            wait_until(lambda: state_counts(app)["Succeeded"] == 60, timeout=20)
        assert sorted(ran) == list(range(60))
    finally:
        app.close()


def test_stop_releases_jobs_prefetched_behind_a_job_that_outlives_the_grace_period(
    backend_url: str,
) -> None:
    # Given one worker holding a batch of 10 jobs whose first blocks and ignores cancellation
    app = App("c10", storage=backend_url, autoload=False,
              plugins=backend_plugins(backend_url))
    unblock = threading.Event()
    ran: list[int] = []

    @app.job(name="c10.step")
    def step(i: int) -> None:
        ran.append(i)
        if i == 1:
            unblock.wait(30)  # a blocking call that never looks at context.cancelled

    ids = step.enqueue_many([(i,) for i in range(12)])
    server = app.server(**{**FAST, "worker_count": 1, "fetch_batch_size": 10,
                            "prefetch_window": timedelta(hours=1)})
    server.start()
    try:
        wait_until(lambda: 1 in ran, timeout=10)
        # (job 0 ran alone, the batch size unknown yet; its outcome is stored at once,
        # the pool idle at its batch's end)
        wait_until(lambda: app.storage.get(ids[0]).state.name == "Succeeded", timeout=10)
        held = [j for j in ids if app.storage.get(j).state.name == "Processing"]
        assert len(held) > 1, "precondition: jobs were prefetched behind the blocked one"
        # When the server stops and the grace period runs out
        server.stop(timeout=0.5)
        # Then no job is left Processing: the running one and those behind it are released
        after = {j: app.storage.get(j) for j in held}
        assert Counter(j.state.name for j in after.values()) == Counter({"Enqueued": len(held)})
        assert all(j.retry_count == 0 and j.attempts == 1 for j in after.values())
    finally:
        unblock.set()
        wait_until(lambda: state_counts(app)["Processing"] == 0, timeout=10)
        app.close()


# --- C11: a job naming an unknown function ---------------------------------------------


def test_unknown_job_name_fails_once_and_does_not_block_others(app: App) -> None:
    @app.job(name="c11.known")
    def known() -> str:
        return "ran"

    unknown_id = app.enqueue("does.not.exist", args=[1], kwargs={"k": "v"})
    known_id = known.enqueue()
    with running(app, worker_count=1):
        # Then the registered job succeeds and the unknown one fails for good
        assert wait_for_state(app, known_id, "Succeeded").state.result == "ran"
        failed = wait_for_state(app, unknown_id, "Failed", "AwaitingRetry")
        assert failed.state.name == "Failed"
        # with a message naming the method and what is registered
        assert failed.state.exception_type.endswith("UnknownJobName")
        assert "does.not.exist" in failed.state.message
        assert "c11.known" in failed.state.message
        # its payload kept, and tried once: no hot loop
        assert (failed.args, failed.kwargs) == ([1], {"k": "v"})
        assert failed.attempts == 1
        # and it is not picked up again while the worker goes on with later jobs
        for _ in range(3):
            wait_for_state(app, known.enqueue(), "Succeeded")
        again = app.storage.get(unknown_id)
        assert (again.state.name, again.attempts) == ("Failed", 1)

        # When code registering the name is deployed and the job is retried
        @app.job(name="does.not.exist")
        def now_exists(x: int, k: str) -> str:
            return f"{x}{k}"

        app.retry(unknown_id)
        # Then it runs
        done = wait_for_state(app, unknown_id, "Succeeded")
    assert done.state.result == "1v" and done.attempts == 2


# --- C12: argument size and type checks at enqueue -------------------------------------


def text_of_bytes(size: int) -> str:
    """A string of exactly ``size`` UTF-8 bytes mixing ASCII, escapes and multi-byte text."""
    unit = 'ünïcødé ✓ 中文 "quoted" \\ back\tslash\n\x00\x1f 🙂 '
    encoded = unit.encode("utf-8")
    whole, rest = divmod(size, len(encoded))
    return unit * whole + "x" * rest


@pytest.mark.parametrize("size", [7 * 1024, 1024 * 1024], ids=["7KB", "1MB"])
def test_large_argument_round_trips_byte_for_byte(app: App, size: int) -> None:
    text = text_of_bytes(size)
    assert len(text.encode("utf-8")) == size
    received: list[str] = []

    @app.job(name="c12.digest")
    def digest(value: str) -> dict[str, Any]:
        received.append(value)
        return {"bytes": len(value.encode("utf-8")),
                "sha256": hashlib.sha256(value.encode("utf-8")).hexdigest()}

    job_id = digest.enqueue(text)
    assert app.storage.get(job_id).args == [text]
    with running(app, worker_count=1):
        done = wait_for_state(app, job_id, "Succeeded", "Failed")
    assert done.state.name == "Succeeded"
    assert received == [text]
    assert done.state.result == {"bytes": size,
                                 "sha256": hashlib.sha256(text.encode("utf-8")).hexdigest()}


def test_oversized_argument_is_refused_at_enqueue_and_nothing_is_stored(app: App) -> None:
    @app.job(name="c12.big")
    def big(value: str) -> None:
        return None

    huge = "x" * (50 * 1024 * 1024)
    with pytest.raises(PayloadError, match="limit") as caught:
        big.enqueue(huge)
    assert caught.value.where == "payload"
    with pytest.raises(PayloadError):
        big.enqueue_many([("small",), (huge,)])
    assert app.storage.count_jobs() == {}
    assert app.storage.list_jobs() == []


def test_unserialisable_argument_is_refused_naming_it(app: App, tmp_path: Path) -> None:
    @app.job(name="c12.any")
    def anything(*args: Any, **kwargs: Any) -> None:
        return None

    with (tmp_path / "f.txt").open("w") as handle:
        with pytest.raises(PayloadError, match=r"args\[0\]") as caught:
            anything.enqueue(handle)
    assert caught.value.where == "args[0]"
    with pytest.raises(PayloadError, match=r"kwargs\['when'\]") as caught:
        anything.enqueue(1, when=datetime.now(timezone.utc))
    assert caught.value.where == "kwargs['when']"
    with pytest.raises(PayloadError, match=r"args\[1\]"):
        app.enqueue("c12.any", args=[1, {"nested": {1, 2}}])
    assert app.storage.count_jobs() == {}


def test_enqueue_many_with_one_bad_item_stores_none(app: App) -> None:
    @app.job(name="c12.item")
    def item(x: Any) -> None:
        return None

    calls = [(i,) for i in range(20)]
    calls.insert(13, (datetime.now(timezone.utc),))
    with pytest.raises(PayloadError, match=r"args\[0\]"):
        item.enqueue_many(calls)
    assert app.storage.count_jobs() == {}
    assert len(item.enqueue_many([(i,) for i in range(20)])) == 20


# --- C13: unstorable exceptions and results --------------------------------------------

UNICODE = "ünïcødé ✓ 中文"


class LockHoldingError(Exception):
    """An exception with a non-serialisable member whose ``str()`` itself fails."""

    def __init__(self) -> None:
        super().__init__("holding a lock")
        self.lock = threading.Lock()

    def __str__(self) -> str:
        raise RuntimeError("this exception cannot be printed")


def test_unstorable_exception_and_result_fail_the_job_with_the_original_error(app: App) -> None:
    @app.job(name="c13.raises_locked", max_retries=0)
    def raises_locked() -> None:
        raise LockHoldingError()

    @app.job(name="c13.returns_object", max_retries=0)
    def returns_object() -> object:
        return object()

    @app.job(name="c13.unicode_error", max_retries=0)
    def unicode_error(text: str) -> None:
        raise ValueError(f"bad input: {text}")

    @app.job(name="c13.ok")
    def ok(text: str) -> str:
        return text

    a = raises_locked.enqueue()
    b = returns_object.enqueue()
    c = unicode_error.enqueue(UNICODE)
    d = ok.enqueue(UNICODE)
    with running(app, worker_count=1):  # one thread: it must survive A, B and C to run D
        done = wait_for_state(app, d, "Succeeded", "Failed", timeout=15)
        failed_a = wait_for_state(app, a, "Failed", "AwaitingRetry")
        failed_b = wait_for_state(app, b, "Failed", "AwaitingRetry")
        failed_c = wait_for_state(app, c, "Failed", "AwaitingRetry")
    # A: the original type and traceback are kept, with a note on what could not be rendered
    assert failed_a.state.name == "Failed"
    assert failed_a.state.exception_type.endswith("LockHoldingError")
    assert "LockHoldingError" in failed_a.state.stack_trace
    assert "raises_locked" in failed_a.state.stack_trace
    assert failed_a.state.note and "str()" in failed_a.state.note
    # B: the result that cannot be stored fails the job, saying so
    assert failed_b.state.name == "Failed"
    assert failed_b.state.exception_type.endswith("PayloadError")
    assert "result" in failed_b.state.message
    # C: unicode in the error and in the arguments comes back unchanged
    assert failed_c.state.name == "Failed"
    assert failed_c.state.message == f"bad input: {UNICODE}"
    assert failed_c.args == [UNICODE]
    # D: the same worker thread went on to the next job
    assert done.state.name == "Succeeded" and done.state.result == UNICODE
    assert done.args == [UNICODE]


def test_job_calling_sys_exit_fails_and_the_worker_thread_survives(app: App) -> None:
    @app.job(name="c13.exits", max_retries=0)
    def exits() -> None:
        sys.exit(3)

    @app.job(name="c13.next")
    def next_job() -> str:
        return "ran"

    exit_id = exits.enqueue()
    next_id = next_job.enqueue()
    with running(app, worker_count=1):
        failed = wait_for_state(app, exit_id, "Failed", "AwaitingRetry", "Succeeded", timeout=5)
        assert wait_for_state(app, next_id, "Succeeded", timeout=5).state.result == "ran"
    assert failed.state.name == "Failed"
    assert failed.state.exception_type == "SystemExit"


# --- C18: priorities -------------------------------------------------------------------


def test_high_priority_job_starts_after_at_most_the_running_job(app: App) -> None:
    # Given one worker thread busy with 20 low-priority jobs of 0.3 s each
    started: list[str] = []
    lock = threading.Lock()

    @app.job(name="c18.low")
    def low(i: int) -> None:
        with lock:
            started.append(f"low{i}")
        time.sleep(0.3)

    @app.job(name="c18.high", priority=10)
    def high() -> None:
        with lock:
            started.append("high")

    low.enqueue_many([(i,) for i in range(20)])
    with running(app, worker_count=1):
        wait_until(lambda: len(started) >= 2, timeout=10)
        # When a high-priority job is enqueued
        with lock:
            before = len(started)
            high_id = high.enqueue()
        wait_for_state(app, high_id, "Succeeded", timeout=10)
    # Then at most one low job (the next one, if it was being claimed) starts before it
    position = started.index("high")
    assert position - before <= 1, started
    assert started.count("high") == 1


def test_priority_is_strict_low_jobs_wait_while_high_jobs_keep_coming(app: App) -> None:
    # Given 5 low-priority jobs and a high-priority job that enqueues the next one
    started: list[str] = []

    @app.job(name="c18.low")
    def low(i: int) -> None:
        started.append(f"low{i}")
        time.sleep(0.1)

    @app.job(name="c18.chain", priority=10)
    def chain(n: int) -> None:
        started.append(f"high{n}")
        if n < 8:
            chain.enqueue(n + 1)  # high-priority work keeps arriving
        time.sleep(0.1)

    low.enqueue_many([(i,) for i in range(5)])
    chain.enqueue(1)
    # When one worker thread runs them
    with running(app, worker_count=1):
        wait_until(lambda: state_counts(app)["Succeeded"] == 13, timeout=15)
    # Then (strict priority) no low job ran while a high job was waiting
    assert started == [f"high{n}" for n in range(1, 9)] + [f"low{i}" for i in range(5)]


# --- C19: SQLite under concurrent workers, producer and readers ------------------------


def test_sqlite_runs_each_job_once_with_8_workers_a_producer_and_a_reader(
    sqlite_url: str,
) -> None:
    app = App("c19", storage=sqlite_url, autoload=False)
    executions: Counter[int] = Counter()
    lock = threading.Lock()
    errors: list[BaseException] = []
    done = threading.Event()

    @app.job(name="c19.touch")
    def touch(i: int) -> None:
        with lock:
            executions[i] += 1

    def produce() -> None:
        try:
            for start in range(0, 5000, 250):
                touch.enqueue_many([(i,) for i in range(start, start + 250)])
        except BaseException as exc:
            errors.append(exc)

    def read() -> None:
        try:
            while not done.is_set():
                app.storage.list_jobs(limit=100)
                app.storage.list_jobs(state="Succeeded", limit=50, offset=100)
                app.storage.count_jobs()
        except BaseException as exc:
            errors.append(exc)

    try:
        with running(app, worker_count=8):
            producer = threading.Thread(target=produce)
            reader = threading.Thread(target=read)
            reader.start()
            producer.start()
            try:
                producer.join(30)
                wait_until(lambda: state_counts(app)["Succeeded"] == 5000 or errors, timeout=60)
            finally:
                done.set()
                reader.join(10)
        assert errors == []
        assert state_counts(app) == Counter({"Succeeded": 5000})
        assert len(executions) == 5000 and set(executions.values()) == {1}
    finally:
        app.close()


C19_CHILD = """
import json, sys, threading
from datetime import timedelta
from pathlib import Path

from qmlkit import App
from qmlkit.testing import wait_until

db, folder, label = sys.argv[1], Path(sys.argv[2]), sys.argv[3]
app = App(label, storage=f"sqlite:///{db}", autoload=False)
ran = []
lock = threading.Lock()


@app.job(name="c19.touch")
def touch(i):
    with lock:
        ran.append(i)


server = app.server(worker_count=4, polling_interval=timedelta(milliseconds=20),
                    enable_cleanup=False, log_attempts=False, server_name=label)
server.start()
Path(folder, label + ".ready").write_text("ready")
wait_until(Path(folder, "stop").exists, timeout=600, interval=0.05)
server.stop()
app.close()
print(json.dumps(ran))
"""


def test_sqlite_two_processes_claim_each_job_exactly_once(tmp_path: Path) -> None:
    # Given two worker processes on one SQLite file, both ready
    script = tmp_path / "c19_child.py"
    script.write_text(C19_CHILD)
    db = tmp_path / "shared.db"
    app = App("c19", storage=f"sqlite:///{db}", autoload=False)
    app.storage  # noqa: B018 - create the tables before the children start
    procs = [
        subprocess.Popen([sys.executable, str(script), str(db), str(tmp_path), f"p{n}"],
                         env=child_env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                         text=True)
        for n in range(2)
    ]
    try:
        wait_until(lambda: all((tmp_path / f"p{n}.ready").exists() for n in range(2))
                   or any(p.poll() is not None for p in procs), timeout=30)
        assert all(p.poll() is None for p in procs), "a worker process died on start"
        # When 2,000 jobs are enqueued while both claim
        ids = []
        for start in range(0, 2000, 200):
            ids += app.enqueue_jobs(
                [app.make_job("c19.touch", args=[i]) for i in range(start, start + 200)])
        wait_for_count(lambda: state_counts(app)["Succeeded"], 2000, stall=60)
        (tmp_path / "stop").write_text("stop")
        outputs = []
        for proc in procs:
            out, err = proc.communicate(timeout=30)
            assert proc.returncode == 0, err
            outputs.append(json.loads(out.strip().splitlines()[-1]))
    finally:
        for proc in procs:
            stop_process(proc)
    # Then every job ran exactly once, on one process or the other
    both = Counter(outputs[0]) + Counter(outputs[1])
    assert set(both) == set(range(2000)) and set(both.values()) == {1}
    assert all(outputs), "one process claimed nothing: no contention was exercised"
    # and every claim past the first followed a release of a claim not yet started (the
    # straggler duty hands a job waiting behind a slow one to a free worker, which a
    # loaded machine makes likely): never two live claims of one job.
    for job_id in ids:
        released = [st for st in app.storage.job_history(job_id)
                    if st.name == "Enqueued" and (st.reason or "").startswith("released")]
        assert app.storage.get(job_id).attempts == 1 + len(released), job_id
    app.close()


def test_an_outcome_with_undecodable_text_fails_its_job_and_holds_back_no_other(
    backend_url: str,
) -> None:
    # Given 20 threads draining 200 jobs, two of which end with text made of undecodable
    # bytes (os.fsdecode gives lone surrogates, which no storage can encode as UTF-8)
    app = App("undecodable", storage=backend_url, autoload=False,
              plugins=backend_plugins(backend_url))
    name = os.fsdecode(b"caf\xe9.txt")

    @app.job(name="undecodable.step", retry=RetryPolicy(max_retries=0))
    def step(i: int) -> str:
        if i == 0:
            return f"read {name}"
        if i == 1:
            raise ValueError(f"cannot parse {name}")
        return "ok"

    try:
        ids = step.enqueue_many([(i,) for i in range(200)])
        with running(app, worker_count=20):
            # Then every job ends, the two failed with a reason, the rest succeeded
            wait_until(lambda: state_counts(app)["Succeeded"] == 198
                       and state_counts(app)["Failed"] == 2, timeout=60)
        returned, raised = app.storage.get(ids[0]), app.storage.get(ids[1])
        assert returned.state.exception_type == "qmlkit.errors.PayloadError"
        assert "not valid UTF-8" in returned.state.message
        assert raised.state.exception_type == "ValueError"
        assert raised.state.message == "cannot parse caf\\udce9.txt"
    finally:
        app.close()
