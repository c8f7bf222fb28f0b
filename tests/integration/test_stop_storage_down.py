"""A worker stops in bounded time while its storage does not answer.

``qmlkit worker`` reaches PostgreSQL or Redis through a `qmlkit.testing.proxy.TcpProxy`
of the test's own, runs a long job, and the proxy is paused (every connection stays
open and goes silent, as a partitioned or failed-over host). The worker then gets one,
two or three SIGTERMs. Releasing the job needs the storage, so the worker must give up
waiting: `COLD_STOP_S` after the abort began (the end of the grace period, or the
second signal), or at once on a third signal, exiting 1 and saying that the job stays
Processing until dead-server reclaim. Before this, such a stop took minutes (the abort's
store failed after about two, deregistering retried for a third).

The thread pool is stopped with each count of signals, the process pool (one child)
with two and three; no process below the worker may stay behind, waiting on the
storage. A second worker, on the real service with a short dead-server timeout, then reclaims
and runs the job: nothing held by the worker that gave up is lost.
"""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from qmlkit import App
from qmlkit.cli.worker import COLD_STOP_S
from qmlkit.processing.pools.processes import ABORT_WAIT_S, CHILD_EXIT_MARGIN_S
from qmlkit.testing import wait_until
from qmlkit.testing.proxy import TcpProxy
from tests.integration.faultkit import descendants, gone

pytestmark = [pytest.mark.slow, pytest.mark.timeout(240)]

REPO_ROOT = Path(__file__).resolve().parents[2]

APP_SOURCE = '''
import os
import time

from qmlkit import App

app = App("stopdown", storage=os.environ["STOPDOWN_STORAGE"])


@app.job(name="stopdown.work", max_retries=3)
def work():
    if os.environ.get("STOPDOWN_SLOW"):
        time.sleep(120)  # far longer than the test: only a stop ends it
    return os.getpid()
'''

#: The first worker's grace period, seconds (``--shutdown-timeout``).
GRACE_S = 1.0


@pytest.fixture(params=["postgres", "redis"])
def proxied(request: pytest.FixtureRequest) -> Iterator[tuple[str, TcpProxy]]:
    """``(real storage URL, proxy)``: the URL through the proxy is made by `through`."""
    url = request.getfixturevalue(f"{request.param}_url")
    port = 5432 if request.param == "postgres" else 6379
    with TcpProxy("127.0.0.1", port) as proxy:
        yield url, proxy


def through(url: str, proxy: TcpProxy) -> str:
    """``url`` with its loopback port replaced by the proxy's."""
    for port in (":5432/", ":6379/"):
        url = url.replace(f"127.0.0.1{port}", f"127.0.0.1:{proxy.port}/")
    return url


def state_of(client: App, job_id: str) -> str:
    """The job's current state's name, read from the real service."""
    job = client.storage.get(job_id)
    assert job is not None, job_id
    return job.state.name


def start_worker(folder: Path, url: str, name: str, *extra: str,
                 slow: bool = False) -> subprocess.Popen[bytes]:
    env = {**os.environ, "STOPDOWN_STORAGE": url,
           "PYTHONPATH": os.pathsep.join(filter(None, [str(folder), str(REPO_ROOT),
                                                       os.environ.get("PYTHONPATH")]))}
    env.pop("STOPDOWN_SLOW", None)
    if slow:
        env["STOPDOWN_SLOW"] = "1"
    with (folder / f"{name}.log").open("ab") as log:
        return subprocess.Popen(
            [sys.executable, "-m", "qmlkit.cli", "worker", "stopdownapp:app", "--name", name,
             "-c", "2", "--polling-interval", "0.1", "--heartbeat-interval", "0.5",
             "--dead-server-timeout", "3", *extra],
            cwd=folder, env=env, stdout=subprocess.DEVNULL, stderr=log)


@pytest.mark.parametrize(("pool", "signals"), [("threads", 1), ("threads", 2),
                                               ("threads", 3), ("processes", 2),
                                               ("processes", 3)])
def test_stop_ends_in_bounded_time_and_loses_nothing(
        tmp_path: Path, proxied: tuple[str, TcpProxy], pool: str, signals: int) -> None:
    url, proxy = proxied
    (tmp_path / "stopdownapp.py").write_text(APP_SOURCE)
    client = App("stopdown", storage=url)
    pool_args = ["--pool", pool] + (["--processes", "1"] if pool == "processes" else [])
    worker = start_worker(tmp_path, through(url, proxy), "cut", "--shutdown-timeout",
                          str(GRACE_S), *pool_args, slow=True)
    family: set[int] = set()
    rescuer: subprocess.Popen[bytes] | None = None
    log = tmp_path / "cut.log"
    try:
        job_id = client.enqueue("stopdown.work").id
        wait_until(lambda: state_of(client, job_id) == "Processing",
                   timeout=60, interval=0.05, message=f"the job Processing; log:\n"
                   f"{log.read_text(errors='replace')}")
        family = descendants(worker.pid)  # a process pool's child and forkserver
        proxy.pause()
        worker.send_signal(signal.SIGTERM)
        wait_until(lambda: "draining" in log.read_text(errors="replace"), timeout=20,
                   interval=0.05, message="the first signal handled")
        for _ in range(signals - 1):
            time.sleep(0.3)  # (a pause between keystrokes, not a wait for a condition)
            worker.send_signal(signal.SIGTERM)
        began = time.monotonic()
        # Its own bound: COLD_STOP_S after the abort; generous slack for a loaded machine.
        bound = (0 if signals == 3 else COLD_STOP_S + (GRACE_S if signals == 1 else 0)) + 20
        if pool == "processes" and signals < 3:
            bound += CHILD_EXIT_MARGIN_S + ABORT_WAIT_S
        try:
            code = worker.wait(bound)
        except subprocess.TimeoutExpired:
            pytest.fail(f"the worker did not exit within {bound:.0f} s of its last "
                        f"signal:\n{log.read_text(errors='replace')[-4000:]}")
        took = time.monotonic() - began
        text = log.read_text(errors="replace")
        print(f"{pool}, {signals} signal(s): exited {code} after {took:.1f} s")
        assert code == 1, text[-4000:]
        assert "dead-server reclaim" in text, text[-4000:]
        if signals == 3:
            assert "a third signal" in text, text[-4000:]
        # A process pool's child does not stay behind waiting on the storage.
        wait_until(lambda: all(gone(pid) for pid in family), timeout=20, interval=0.05,
                   message=f"every process below the worker gone: {family}")
        # Nothing lost: the job, still Processing under the worker that gave up, is
        # reclaimed once that worker's heartbeat is stale and runs to Succeeded.
        assert state_of(client, job_id) == "Processing"
        rescuer = start_worker(tmp_path, url, "rescue")
        wait_until(lambda: state_of(client, job_id) == "Succeeded",
                   timeout=90, interval=0.1, message="the job reclaimed and run; log:\n"
                   + (tmp_path / "rescue.log").read_text(errors="replace")[-3000:])
    finally:
        proxy.resume()
        for pid in family:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
        for proc in (worker, rescuer):
            if proc is not None and proc.poll() is None:
                proc.kill()
                proc.wait(10)
        client.close()
