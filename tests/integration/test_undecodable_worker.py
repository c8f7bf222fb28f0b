"""Issue #17 item 6 with real processes: one undecodable row does not stop its queue.

For each backend a worker process shares, every kind of damage gets a queue of its own
whose oldest job is overwritten, with the raw client, by a payload that will not decode
(as a user's damaged data would be); valid jobs wait behind it. Then a real
``qmlkit worker`` serving every queue runs every valid job, stores each damaged row as
Failed (quarantined, its raw bytes kept) and stays up, while ``qmlkit jobs list`` (a
CLI subprocess) and the job list API of a ``qmlkit dashboard`` subprocess keep answering
with every row, the damaged ones included.

PostgreSQL's ``text`` refuses invalid UTF-8 bytes in a UTF8 database, so that damage
cannot be written there; a JSON escape of a lone surrogate (valid text that decodes to
a string no UTF-8 encoder takes) is written on every backend instead.
"""

from __future__ import annotations

import json
import os
import signal
import sqlite3
import subprocess
import sys
import urllib.error
import urllib.request
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from qmlkit import App
from qmlkit.storage.codec import QUARANTINE_EXCEPTION
from qmlkit.testing import free_port, wait_until
from tests.conftest import backend_plugins

REPO_ROOT = Path(__file__).resolve().parents[2]

#: Damage name -> the payload bytes written in place of a valid one.
DAMAGE = {
    "invalid-utf8": b'{"args": ["\xff\xfe"], "kwargs": {}}',
    "truncated": b'{"args": [1, 2',
    "wrong-types": b'{"args": {"a": 1}, "kwargs": []}',
    "lone-surrogate": b'{"args": ["\\ud800", 1], "kwargs": {}}',
}

#: Valid jobs behind each damaged row.
GOOD_PER_QUEUE = 5

APP_SOURCE = '''
from qmlkit import App

app = App("undecodable")


@app.job(name="add")
def add(a, b):
    return a + b
'''

Writer = Callable[[str, bytes], None]


def sqlite_writer(url: str) -> Writer:
    path = url.removeprefix("sqlite:///")

    def write(job_id: str, payload: bytes) -> None:
        with sqlite3.connect(path) as raw:
            raw.execute("UPDATE qmlkit_jobs SET payload = CAST(? AS TEXT) WHERE id = ?",
                        (payload, job_id))
        raw.close()

    return write


def sqlite_reader(url: str) -> Callable[[str], bytes]:
    path = url.removeprefix("sqlite:///")

    def read(job_id: str) -> bytes:
        with sqlite3.connect(path) as raw:
            (kept,) = raw.execute("SELECT CAST(payload AS BLOB) FROM qmlkit_jobs WHERE id = ?",
                                  (job_id,)).fetchone()
        raw.close()
        return bytes(kept)

    return read


def redis_key(url: str, job_id: str) -> str:
    return f"{url.split('prefix=', 1)[1]}job:{job_id}"


def redis_writer(url: str) -> Writer:
    import redis

    def write(job_id: str, payload: bytes) -> None:
        with redis.Redis(host="127.0.0.1", port=6379, db=0) as raw:
            raw.hset(redis_key(url, job_id), "payload", payload)

    return write


def redis_reader(url: str) -> Callable[[str], bytes]:
    import redis

    def read(job_id: str) -> bytes:
        with redis.Redis(host="127.0.0.1", port=6379, db=0) as raw:
            return raw.hget(redis_key(url, job_id), "payload")

    return read


def postgres_table(url: str) -> tuple[str, str]:
    return "postgresql+psycopg://127.0.0.1:5432/test", f'"{url.split("schema=", 1)[1]}".qmlkit_jobs'


def postgres_writer(url: str) -> Writer:
    import sqlalchemy as sa

    def write(job_id: str, payload: bytes) -> None:
        base, table = postgres_table(url)
        engine = sa.create_engine(base)
        try:
            with engine.begin() as conn:
                conn.execute(sa.text(f"UPDATE {table} SET payload = :p WHERE id = :id"),
                             {"p": payload.decode("utf-8"), "id": job_id})
        finally:
            engine.dispose()

    return write


def postgres_reader(url: str) -> Callable[[str], bytes]:
    import sqlalchemy as sa

    def read(job_id: str) -> bytes:
        base, table = postgres_table(url)
        engine = sa.create_engine(base)
        try:
            with engine.connect() as conn:
                return conn.execute(sa.text(f"SELECT payload FROM {table} WHERE id = :id"),
                                    {"id": job_id}).scalar_one().encode("utf-8")
        finally:
            engine.dispose()

    return read


BACKENDS = {
    "sqlite": (sqlite_writer, sqlite_reader, tuple(DAMAGE)),
    "redis": (redis_writer, redis_reader, tuple(DAMAGE)),
    "postgres": (postgres_writer, postgres_reader,
                 tuple(d for d in DAMAGE if d != "invalid-utf8")),
}


@pytest.fixture(params=[
    pytest.param("sqlite"),
    pytest.param("redis", marks=pytest.mark.redis),
    pytest.param("postgres", marks=pytest.mark.postgres),
])
def backend(request: pytest.FixtureRequest) -> tuple[str, str]:
    """``(name, url)`` of each backend worker processes can share."""
    return request.param, request.getfixturevalue(f"{request.param}_url")


class Processes:
    """Child processes of one test, all stopped at the end."""

    def __init__(self, folder: Path) -> None:
        self.folder = folder
        (folder / "undecodable_app.py").write_text(APP_SOURCE)
        self.env = dict(os.environ)
        self.env["PYTHONPATH"] = os.pathsep.join(
            [str(folder), str(REPO_ROOT), *filter(None, [self.env.get("PYTHONPATH")])])
        self.procs: list[subprocess.Popen[bytes]] = []

    def qmlkit(self, *argv: str, timeout: float = 60) -> subprocess.CompletedProcess[str]:
        return subprocess.run([sys.executable, "-m", "qmlkit.cli", *argv], cwd=self.folder,
                              env=self.env, capture_output=True, text=True, timeout=timeout)

    def spawn(self, name: str, *argv: str) -> subprocess.Popen[bytes]:
        with (self.folder / f"{name}.log").open("wb") as err:
            proc = subprocess.Popen([sys.executable, "-m", "qmlkit.cli", *argv],
                                    cwd=self.folder, env=self.env,
                                    stdout=subprocess.DEVNULL, stderr=err)
        self.procs.append(proc)
        return proc

    def log(self, name: str) -> str:
        return (self.folder / f"{name}.log").read_text(errors="replace")

    def stop(self) -> list[int]:
        for proc in self.procs:
            if proc.poll() is None:
                proc.send_signal(signal.SIGTERM)
        codes = []
        for proc in self.procs:
            try:
                codes.append(proc.wait(timeout=30))
            except subprocess.TimeoutExpired:
                proc.kill()
                codes.append(proc.wait())
        return codes


@pytest.fixture
def processes(tmp_path: Path) -> Iterator[Processes]:
    children = Processes(tmp_path)
    yield children
    children.stop()


def get(url: str) -> tuple[int, str]:
    try:
        with urllib.request.urlopen(url, timeout=10) as response:
            return response.status, response.read().decode()
    except urllib.error.HTTPError as exc:
        return exc.code, exc.read().decode()
    except OSError:
        return 0, ""


def listed_by_cli(processes: Processes, url: str) -> dict[str, dict]:
    result = processes.qmlkit("jobs", "list", "--storage", url, "--json", "--limit", "1000")
    assert result.returncode == 0, result.stdout + result.stderr
    rows = [json.loads(line) for line in result.stdout.splitlines() if line.strip()]
    return {row["id"]: row for row in rows}


def listed_by_dashboard(base: str) -> dict[str, dict]:
    status, body = get(f"{base}/api/jobs?limit=500")
    assert status == 200, body
    return {row["id"]: row for row in json.loads(body)["jobs"]}


@pytest.mark.slow
def test_valid_jobs_behind_an_undecodable_row_run_under_a_real_worker(
    processes: Processes, backend: tuple[str, str]
) -> None:
    name, url = backend
    make_writer, make_reader, damages = BACKENDS[name]
    client = App("undecodable", storage=url, autoload=False, plugins=backend_plugins(url))
    # Given, in one queue per damage, a damaged oldest job and valid jobs behind it
    bad: dict[str, str] = {}
    good: dict[str, int] = {}
    for damage in damages:
        queue = f"q-{damage}"
        bad[damage] = client.enqueue("add", args=[0, 0], queue=queue)
        for i in range(GOOD_PER_QUEUE):
            good[client.enqueue("add", args=[i, 100], queue=queue)] = i + 100
    write = make_writer(url)
    for damage, job_id in bad.items():
        write(job_id, DAMAGE[damage])
    everything = {*bad.values(), *good}

    # Then the CLI's list and the dashboard's list show every row before any worker runs
    assert set(listed_by_cli(processes, url)) == everything
    port = free_port()
    base = f"http://127.0.0.1:{port}"
    dash = processes.spawn("dashboard", "dashboard", "--storage", url, "--port", str(port))
    wait_until(lambda: get(f"{base}/api/stats")[0] == 200 or dash.poll() is not None,
               timeout=60, message="dashboard up")
    assert dash.poll() is None, processes.log("dashboard")
    assert set(listed_by_dashboard(base)) == everything

    # When a real worker serves every queue
    worker = processes.spawn("worker", "worker", "undecodable_app:app", "--storage", url,
                             "--queues", "*", "--polling-interval", "0.1")

    # Then every valid job runs, and every damaged row is stored as Failed, quarantined
    def settled() -> bool:
        return worker.poll() is not None or all(
            client.storage.get(j).state.name in ("Succeeded", "Failed")
            for j in everything)

    wait_until(settled, timeout=60, interval=0.1, message="every job settled")
    assert worker.poll() is None, processes.log("worker")
    results = {j: client.storage.get(j) for j in good}
    assert {j: job.state.name for j, job in results.items()} == dict.fromkeys(good, "Succeeded")
    assert {j: job.state.result for j, job in results.items()} == good
    for damage, job_id in bad.items():
        stored = client.storage.get(job_id)
        assert stored.state.name == "Failed", (damage, stored.state)
        assert stored.state.exception_type == QUARANTINE_EXCEPTION, (damage, stored.state)
        assert stored.state.message, damage
    read = make_reader(url)
    assert {d: read(j) for d, j in bad.items()} == {d: DAMAGE[d] for d in bad}

    # And both lists still answer with every row, the damaged ones as Failed
    by_cli = listed_by_cli(processes, url)
    by_dashboard = listed_by_dashboard(base)
    assert set(by_cli) == set(by_dashboard) == everything
    assert {by_cli[j]["state"]["name"] for j in bad.values()} == {"Failed"}
    assert {by_dashboard[j]["state"] for j in bad.values()} == {"Failed"}
    for job_id in bad.values():  # each damaged job's own page too
        status, body = get(f"{base}/api/jobs/{job_id}")
        assert status == 200, body
    assert processes.stop()[-1] == 0, processes.log("worker")  # the worker drains cleanly
    client.close()
