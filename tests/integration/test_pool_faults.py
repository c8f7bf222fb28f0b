"""Every pool survives the faults of issue #14 ("Tests") on SQLite, Redis and PostgreSQL.

Each test runs real ``qmlkit worker APP --pool P`` processes (short heartbeat and
dead-server timeouts, else the CLI's defaults), drains a few hundred short jobs and
causes one fault mid-drain:

- **kill -9 of a worker.** Thread and asyncio pools: the worker process; a peer worker
  presumes it dead by its stale heartbeat and reclaims its jobs. Process pool: one
  child (its parent fails its running attempts as ``WorkerLost``, retried, releases the
  rest and starts a replacement), and, in a test of its own, the parent (its children
  read end-of-file on their control pipe, drain and exit; a peer worker runs the rest).
- **SIGSTOP past the dead-server timeout, then SIGCONT.** Thread and asyncio pools: the
  worker process, while it runs jobs; a peer started after the stop reclaims and runs
  them. Process pool: one child, while it runs jobs; its sibling child (a server of its
  own) reclaims them. The stop is made at a moment when the stopped process holds no
  lock a reclaim needs (a SQLite write lock or a PostgreSQL row lock mid-transaction:
  then it is continued and stopped again, as in test_zombie.py), so it is meaningful on
  every backend; on Redis a client holds no lock. Once every job has Succeeded, the
  process is continued: the attempts it was running finish, and their outcomes must be
  discarded by fencing.
- **Storage restart mid-drain.** Redis: a ``redis-server`` of the test's own with an
  append-only file, restarted twice in quick succession (field case C09). PostgreSQL:
  the workers reach the shared server through a `qmlkit.testing.proxy.TcpProxy` of the
  test's own, which drops every connection, twice, as a restart terminates every
  session (as test_process_pool.py's storage restart). SQLite has no server to restart:
  the test holds the database's write lock (``BEGIN IMMEDIATE``) until every worker's
  last heartbeat is older than the dead-server timeout, so every claim, outcome and
  heartbeat waits, and once it is released the workers find each other's heartbeats
  stale and reclaim each other's jobs.

What every test asserts, from the storage and from what the job bodies recorded (each
execution appends ``<pid> <n> <token> start|end`` to a file with ``O_APPEND``):

- **0 lost jobs:** every job ends Succeeded;
- **0 double completions:** exactly one Succeeded in each job's history, and the stored
  result (the pid and fencing token the body returned) is that of an execution that
  ran to its end holding the job's final token: an outcome accepted from a stale claim
  would carry an older token. Re-executions of a job killed or stopped mid-run are
  allowed (delivery is at-least-once); they are counted and printed (``-s``).

The process pool runs its default child pool (threads), and as ``processes-asyncio``
its asyncio child pool; the asyncio pools run ``async
def`` jobs, the others ``def`` jobs.
"""

from __future__ import annotations

import contextlib
import os
import signal
import sqlite3
import subprocess
import sys
from collections import Counter
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, NamedTuple

import pytest

from qmlkit import App
from qmlkit.testing import RedisProcess, skip_or_fail, wait_for_count, wait_until
from tests.conftest import backend_plugins
from tests.integration.faultkit import descendants, gone, lock_free_probe, stopped

pytestmark = [pytest.mark.slow, pytest.mark.timeout(300)]

REPO_ROOT = Path(__file__).resolve().parents[2]

APP_SOURCE = '''
import asyncio
import os
import time
from datetime import timedelta

from qmlkit import App, RetryPolicy, current_context

app = App("faults", storage=os.environ["FAULTS_STORAGE"])
RECORDS = os.environ["FAULTS_RECORDS"]
#: A killed child's attempt fails as WorkerLost and uses a retry: allow many, at once.
RETRY = RetryPolicy(max_retries=50, base_delay=timedelta(0), jitter=0)


def record(event, n):
    line = f"{os.getpid()} {n} {current_context().attempt} {event}\\n"
    fd = os.open(RECORDS, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
    try:
        os.write(fd, line.encode())
    finally:
        os.close(fd)


@app.job(name="faults.work", retry=RETRY)
def work(n, pause):
    record("start", n)
    time.sleep(pause)
    record("end", n)
    return {"pid": os.getpid(), "token": current_context().attempt}


@app.job(name="faults.awork", retry=RETRY)
async def awork(n, pause):
    record("start", n)
    await asyncio.sleep(pause)
    record("end", n)
    return {"pid": os.getpid(), "token": current_context().attempt}
'''

#: Seconds: every worker's heartbeat interval and dead-server timeout.
HEARTBEAT_S, DEAD_AFTER_S = 0.25, 2.0
#: Jobs per drain, and how long each one sleeps (seconds).
JOBS, PAUSE_S = 240, 0.05
#: Seconds the drain may make no progress before a test gives up (a loaded machine).
STALL_S = 90.0

#: ``processes-asyncio``: the process pool with ``--child-pool asyncio`` (async jobs).
POOLS = ["threads", "asyncio", "processes", "processes-asyncio"]
BACKENDS = [pytest.param("sqlite"), pytest.param("redis", marks=pytest.mark.redis),
            pytest.param("postgres", marks=pytest.mark.postgres)]


class Record(NamedTuple):
    """One line a job body wrote: which process, which job, which attempt, which end."""

    pid: int
    n: int
    token: int
    event: str


@dataclass
class Fleet:
    """The ``qmlkit worker`` processes of one test, continued and ended afterwards."""

    folder: Path
    url: str
    pool: str

    def __post_init__(self) -> None:
        (self.folder / "faultapp.py").write_text(APP_SOURCE)
        self.records_path = self.folder / "records.txt"
        self.records_path.touch()
        self.procs: dict[str, subprocess.Popen[bytes]] = {}
        self.family: set[int] = set()  # every process seen below a worker

    @property
    def per_worker(self) -> int:
        """Registered servers per worker process (each child of a process pool is one)."""
        return 2 if self.pool.startswith("processes") else 1

    def start(self, name: str) -> subprocess.Popen[bytes]:
        env = {**os.environ, "FAULTS_STORAGE": self.url, "FAULTS_RECORDS": str(self.records_path),
               "PYTHONPATH": os.pathsep.join(filter(None, [str(self.folder), str(REPO_ROOT),
                                                           os.environ.get("PYTHONPATH")]))}
        size = (["--processes", "2", "-c", "2"] if self.pool.startswith("processes")
                else ["-c", "4"])
        pool = ["--pool", "processes", "--child-pool", "asyncio"] if (
            self.pool == "processes-asyncio") else ["--pool", self.pool]
        with (self.folder / f"{name}.log").open("ab") as log:
            proc = subprocess.Popen(
                [sys.executable, "-m", "qmlkit.cli", "worker", "faultapp:app", "--name", name,
                 *pool, *size, "--polling-interval", "0.1",
                 "--heartbeat-interval", str(HEARTBEAT_S),
                 "--dead-server-timeout", str(DEAD_AFTER_S), "--shutdown-timeout", "20"],
                cwd=self.folder, env=env, stdout=subprocess.DEVNULL, stderr=log)
        self.procs[name] = proc
        return proc

    def launch(self, client: App, *names: str) -> None:
        """Start the named workers and wait until each has registered."""
        for name in names:
            self.start(name)
        self.wait_registered(client, *names)

    def wait_registered(self, client: App, *names: str) -> None:
        """Wait until each named worker has all its servers registered (and is alive)."""
        def ready() -> bool:
            for name in names:
                assert self.procs[name].poll() is None, self.logs()
            servers = [s.name for s in client.storage.list_servers()]
            return all(sum(1 for s in servers if owned_by(name, s)) == self.per_worker
                       for name in names)

        wait_until(ready, timeout=120, interval=0.05, message=f"{names} registered")
        for name in names:
            self.family |= descendants(self.procs[name].pid)

    def job_method(self) -> str:
        return "faults.awork" if self.pool.endswith("asyncio") else "faults.work"

    def records(self) -> list[Record]:
        text = self.records_path.read_text()
        lines = text.split("\n")[:-1]  # the last piece is empty, or a line being written
        return [Record(int(pid), int(n), int(token), event)
                for pid, n, token, event in (line.split() for line in lines)]

    def running_in(self, pid: int) -> set[tuple[int, int]]:
        """``(n, token)`` of every execution in ``pid`` that started and has not ended."""
        records = self.records()
        started = {(r.n, r.token) for r in records if r.pid == pid and r.event == "start"}
        return started - {(r.n, r.token) for r in records if r.pid == pid and r.event == "end"}

    def log(self, name: str) -> str:
        return (self.folder / f"{name}.log").read_text(errors="replace")

    def logs(self) -> str:
        return "\n".join(f"--- {name}:\n{self.log(name)[-3000:]}" for name in self.procs)

    def stop(self) -> dict[str, int]:
        """SIGCONT and SIGTERM every live worker; wait for each to exit; their codes."""
        for proc in self.procs.values():
            if proc.poll() is None:
                proc.send_signal(signal.SIGCONT)
                proc.send_signal(signal.SIGTERM)
        codes = {}
        for name, proc in self.procs.items():
            try:
                codes[name] = proc.wait(60)
            except subprocess.TimeoutExpired:
                pytest.fail(f"worker {name} did not stop within 60 s:\n{self.logs()}")
        return codes

    def close(self) -> None:
        """Kill whatever is left, children of the process pool included."""
        for pid in self.family:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGCONT)
                os.kill(pid, signal.SIGKILL)
        for proc in self.procs.values():
            if proc.poll() is None:
                proc.kill()
                proc.wait(10)


def owned_by(name: str, server: str) -> bool:
    """Whether a server name or id is worker ``name``'s (``a#…``, or a child ``a:proc…``)."""
    return server == name or server.startswith((f"{name}#", f"{name}:"))


@pytest.fixture
def make_fleet(tmp_path: Path) -> Iterator[Callable[[str, str], Fleet]]:
    fleets: list[Fleet] = []

    def make(url: str, pool: str) -> Fleet:
        fleet = Fleet(tmp_path, url, pool)
        fleets.append(fleet)
        return fleet

    yield make
    for fleet in fleets:
        fleet.close()


@pytest.fixture(params=BACKENDS)
def backend_url(request: pytest.FixtureRequest) -> str:
    """Each backend worker processes can share."""
    return request.getfixturevalue(f"{request.param}_url")


def client_for(url: str) -> App:
    return App("faults-client", storage=url, autoload=False, plugins=backend_plugins(url))


@pytest.fixture
def client(backend_url: str) -> Iterator[App]:
    app = client_for(backend_url)
    app.storage.open()  # creates the schema before the workers race to
    yield app
    app.close()


def enqueue(client: App, fleet: Fleet) -> dict[str, int]:
    """Enqueue the drain's jobs; their ids, each with its job number."""
    method = fleet.job_method()
    ids = client.enqueue_jobs([client.make_job(method, args=[n, PAUSE_S]) for n in range(JOBS)])
    return {job_id: n for n, job_id in enumerate(ids)}


def succeeded_count(client: App) -> Callable[[], int]:
    """How many jobs are Succeeded; the last answer while the storage is unreachable."""
    last = [0]

    def count() -> int:
        try:
            counts = client.storage.count_jobs()
        except Exception:  # the storage is restarting: ask again
            return last[0]
        last[0] = sum(n for (_, state), n in counts.items() if state == "Succeeded")
        return last[0]

    return count


def processing_under(client: App, name: str) -> list[Any]:
    """The jobs Processing now under one of worker ``name``'s servers."""
    return [job for job in client.storage.list_jobs(state="Processing", limit=1000)
            if owned_by(name, job.state.server_name or "")]


def drain(client: App, fleet: Fleet) -> None:
    """Wait until every job is Succeeded, for as long as the drain makes progress."""
    try:
        wait_for_count(succeeded_count(client), JOBS, stall=STALL_S, interval=0.1)
    except TimeoutError as exc:
        pytest.fail(f"{exc}\n{client.storage.count_jobs()}\n{fleet.logs()}")


def check_outcomes(client: App, ids: dict[str, int], fleet: Fleet, label: str) -> None:
    """0 lost jobs and 0 double completions (see the module docstring); print reruns."""
    records = fleet.records()
    ends = {(r.n, r.token, r.pid) for r in records if r.event == "end"}
    problems = []
    for job_id, n in ids.items():
        job = client.storage.get(job_id)
        completions = sum(1 for s in client.storage.job_history(job_id) if s.name == "Succeeded")
        result = job.state.result if job.state.name == "Succeeded" else None
        if job.state.name != "Succeeded" or completions != 1:
            problems.append(f"job {n}: {job.state.name}, {completions} completion(s)")
        elif result["token"] != job.attempts or (n, result["token"], result["pid"]) not in ends:
            problems.append(f"job {n}: result {result} is not of its final attempt "
                            f"{job.attempts} (a stale claim's outcome was accepted)")
    assert not problems, "\n".join(problems[:20]) + "\n" + fleet.logs()
    runs = Counter(r.n for r in records if r.event == "start")
    assert set(runs) == set(ids.values())
    reruns = sum(runs.values()) - JOBS
    print(f"\n[{label}] {JOBS} jobs Succeeded once each; {reruns} re-execution(s) over "
          f"{sum(1 for c in runs.values() if c > 1)} job(s)")


def running_child(fleet: Fleet, client: App, name: str) -> int:
    """The pid of a child of worker ``name`` (a process pool) running a job now."""
    children = descendants(fleet.procs[name].pid)
    fleet.family |= children

    def find() -> int | None:
        held = {job.args[0] for job in processing_under(client, name)}
        for record in reversed(fleet.records()):
            if record.pid in children and record.n in held and record.event == "start":
                return record.pid
        return None

    return wait_until(find, timeout=60, message=f"a child of {name} running a job")


# --- kill -9 ------------------------------------------------------------------------------


@pytest.mark.parametrize("pool", POOLS)
def test_kill_9_of_a_worker_mid_drain_loses_no_job_and_completes_none_twice(
        make_fleet: Callable[[str, str], Fleet], client: App, backend_url: str,
        pool: str) -> None:
    fleet = make_fleet(backend_url, pool)
    fleet.launch(client, "a", "b")
    ids = enqueue(client, fleet)
    # Given both workers running jobs, a fifth of the drain done
    wait_until(lambda: len(fleet.records()) >= JOBS // 5 * 2
               and processing_under(client, "a"), timeout=120, interval=0.02)
    # When worker a (the process pool: one of its children) is killed with SIGKILL
    victim = (running_child(fleet, client, "a") if pool.startswith("processes")
              else fleet.procs["a"].pid)
    assert succeeded_count(client)() < JOBS, "the kill must land mid-drain"
    os.kill(victim, signal.SIGKILL)
    # Then every job Succeeds exactly once
    drain(client, fleet)
    if pool.startswith("processes"):  # and the parent replaced its child and runs on
        assert fleet.procs["a"].poll() is None, fleet.log("a")
        wait_until(lambda: gone(victim), timeout=30)
        fleet.wait_registered(client, "a")
    codes = fleet.stop()
    check_outcomes(client, ids, fleet, f"kill -9 {pool} {backend_url.partition(':')[0]}")
    assert codes == ({"a": 0, "b": 0} if pool.startswith("processes")
                     else {"a": -9, "b": 0}), codes


def test_kill_9_of_a_process_pool_parent_its_children_drain_and_exit(
        make_fleet: Callable[[str, str], Fleet], client: App, backend_url: str) -> None:
    fleet = make_fleet(backend_url, "processes")
    fleet.launch(client, "a", "b")
    parent = fleet.procs["a"]
    ids = enqueue(client, fleet)
    children = descendants(parent.pid)
    wait_until(lambda: len(fleet.records()) >= JOBS // 5 * 2
               and processing_under(client, "a"), timeout=120, interval=0.02)
    # When the supervisor of worker a is killed with SIGKILL (it has no say)
    assert succeeded_count(client)() < JOBS, "the kill must land mid-drain"
    parent.kill()
    parent.wait(30)
    # Then its children (and its forkserver) notice, drain and exit, deregistered
    wait_until(lambda: all(gone(pid) for pid in children), timeout=60,
               message=f"the children of a killed parent exit: {children}")
    wait_until(lambda: not [s for s in client.storage.list_servers() if owned_by("a", s.name)],
               timeout=30, message="the children of a deregistered")
    # And the peer runs the rest: every job Succeeds exactly once
    drain(client, fleet)
    codes = fleet.stop()
    check_outcomes(client, ids, fleet, f"kill -9 parent {backend_url.partition(':')[0]}")
    assert codes == {"a": -9, "b": 0}, codes


# --- SIGSTOP past the dead-server timeout -------------------------------------------------


def stop_while_running(fleet: Fleet, pid: int, probe: Callable[[], bool]) -> set[tuple[int, int]]:
    """SIGSTOP ``pid`` at a moment it runs a job and holds no lock a reclaim needs.

    Returns:
        ``(n, token)`` of the executions it was running when stopped.
    """
    for _ in range(100):
        os.kill(pid, signal.SIGSTOP)
        wait_until(lambda: stopped(pid), timeout=10)  # the signal is asynchronous
        running = fleet.running_in(pid)
        if running and probe():
            return running
        before = len(fleet.records())
        os.kill(pid, signal.SIGCONT)  # far shorter than the trust window: harmless
        wait_until(lambda before=before: len(fleet.records()) > before, timeout=30,
                   message="the continued process to move on")
    pytest.fail(f"{pid} never ran a job while holding no lock when stopped")


@pytest.mark.parametrize("pool", POOLS)
def test_sigstop_past_the_dead_timeout_then_sigcont_completes_no_job_twice(
        make_fleet: Callable[[str, str], Fleet], client: App, backend_url: str,
        pool: str) -> None:
    fleet = make_fleet(backend_url, pool)
    fleet.launch(client, "a")
    ids = enqueue(client, fleet)
    wait_until(lambda: len(fleet.records()) >= JOBS // 10 and processing_under(client, "a"),
               timeout=120, interval=0.02)
    # Given worker a (the process pool: one of its children) stopped while running jobs
    victim = (running_child(fleet, client, "a") if pool.startswith("processes")
              else fleet.procs["a"].pid)
    running = stop_while_running(fleet, victim, lock_free_probe(backend_url))
    try:
        # When a peer (the process pool: the sibling child) presumes it dead, reclaims
        # its jobs and runs every job
        if not pool.startswith("processes"):
            fleet.start("b")
        drain(client, fleet)
        assert stopped(victim)
    finally:
        os.kill(victim, signal.SIGCONT)
    # And it is continued: the attempts it was running finish with their old tokens
    wait_until(lambda: not fleet.running_in(victim) & running, timeout=60,
               message="the continued attempts to end")
    codes = fleet.stop()  # every outcome a worker holds is stored (or refused) by then
    # Then none of their outcomes was accepted: each job completed once, by its last claim
    check_outcomes(client, ids, fleet, f"SIGSTOP {pool} {backend_url.partition(':')[0]}")
    by_number = {n: job_id for job_id, n in ids.items()}
    for n, token in running:
        assert client.storage.get(by_number[n]).attempts > token
        assert f"outcome of job {by_number[n]} (attempt {token}) discarded" in fleet.log("a")
    assert set(codes.values()) == {0}, (codes, fleet.logs())


# --- storage restart mid-drain ------------------------------------------------------------


@dataclass
class Outage:
    """A storage the workers reach at ``worker_url`` and the test can make restart."""

    worker_url: str
    client_url: str
    restart: Callable[[App], None]


def sqlite_outage(url: str) -> Outage:
    path = url.removeprefix("sqlite:///")

    def hold_the_write_lock(client: App) -> None:
        def all_look_dead() -> bool:
            now = datetime.now(timezone.utc)
            return all((now - s.last_heartbeat).total_seconds() > DEAD_AFTER_S
                       for s in client.storage.list_servers())  # WAL: reads go on

        conn = sqlite3.connect(path, timeout=30)
        try:
            conn.execute("BEGIN IMMEDIATE")
            wait_until(all_look_dead, timeout=60, interval=0.05,
                       message="every heartbeat older than the dead-server timeout")
            conn.rollback()
        finally:
            conn.close()

    return Outage(url, url, hold_the_write_lock)


@pytest.fixture(params=BACKENDS)
def outage(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[Outage]:
    """Each backend, with a way to restart it under the workers."""
    if request.param == "sqlite":
        yield sqlite_outage(request.getfixturevalue("sqlite_url"))
    elif request.param == "redis":
        request.getfixturevalue("redis_url")  # the plugin is installed, Redis is usable
        if not RedisProcess.available():
            skip_or_fail("redis-server is not on PATH", "install redis-server")
        (tmp_path / "redis").mkdir()
        own = RedisProcess(tmp_path / "redis", appendonly=True)
        own.start()
        url = f"{own.url}?prefix=faults:"

        def restart_twice(client: App) -> None:  # back to back, as C09
            own.restart()
            own.restart()

        try:
            yield Outage(url, url, restart_twice)
        finally:
            own.stop()
    else:
        from qmlkit.testing.proxy import TcpProxy

        url = request.getfixturevalue("postgres_url")
        with TcpProxy("127.0.0.1", 5432) as proxy:

            def drop_twice(client: App) -> None:
                proxy.drop_connections()
                before = proxy.accepted
                wait_until(lambda: proxy.accepted > before, timeout=30,
                           message="a worker to reconnect")
                proxy.drop_connections()

            yield Outage(url.replace("127.0.0.1:5432", f"127.0.0.1:{proxy.port}"), url,
                         drop_twice)


@pytest.mark.parametrize("pool", POOLS)
def test_storage_restart_mid_drain_loses_no_job_and_completes_none_twice(
        make_fleet: Callable[[str, str], Fleet], outage: Outage, pool: str) -> None:
    client = client_for(outage.client_url)
    client.storage.open()
    fleet = make_fleet(outage.worker_url, pool)
    fleet.launch(client, "a", "b")
    ids = enqueue(client, fleet)
    wait_until(lambda: len(fleet.records()) >= JOBS // 4 * 2, timeout=120, interval=0.02)
    assert succeeded_count(client)() < JOBS, "the restart must happen mid-drain"
    # When the storage restarts mid-drain
    outage.restart(client)
    # Then every job still Succeeds exactly once
    drain(client, fleet)
    codes = fleet.stop()
    check_outcomes(client, ids, fleet, f"restart {pool} {outage.client_url.partition(':')[0]}")
    assert set(codes.values()) == {0}, (codes, fleet.logs())
    client.close()
