"""CPU-bound drain: 2,000 jobs of ~5 ms pure-Python work, one worker command per system.

Issue #14's CPU-bound scenario. Every system runs the same job: ``burn()`` (a pure-Python
loop sized to about 5 ms on an idle core of this machine), then one pipelined round trip
to Redis stamping the job's start (``SET first NX``, ``SET last``, ``INCR done``). The
jobs are enqueued first; then the worker starts with the system's own CLI. Rate =
(done - 1) / (last start - first start), so interpreter start-up and boot are left out.
The ceiling is cores / 5 ms (about 400 jobs/s on 2 cores).

Systems (``--system``, repeatable):

* ``qmlkit-threads``: ``qmlkit worker APP --pool threads --threads 2`` (one process).
* ``qmlkit-processes``: ``qmlkit worker APP --pool processes --processes 2 --threads 1``.
* ``dramatiq``: ``dramatiq MODULE --processes 2 --threads 1`` (needs the peers' venv).
* ``celery``: ``celery -A MODULE worker --pool prefork -c 2`` (needs the peers' venv).

qmlkit runs on qmlkit-redis (Redis 127.0.0.1:6379, its own key prefix). Usage::

    .venv/bin/python bench/cpu_pool.py --system qmlkit-threads --system qmlkit-processes
    .venv/bin/python bench/cpu_pool.py --peers-python /work/main/.venv-peers/bin/python \\
        --system dramatiq --system celery

Not a test: it prints one line per run (jobs/s, % of the ceiling, load average).
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import tempfile
import time
import uuid
from pathlib import Path

import redis
from drainkit import rate, stop_worker, wait_for_done

REDIS = "redis://127.0.0.1:6379/0"
#: Iterations of the burn loop: about 5 ms on an idle core here (calibrated once).
BURN_N = int(os.environ.get("BENCH_BURN_N", "110000"))

JOB_BODY = '''
import time, redis
_r = redis.Redis.from_url("{redis}")
def burn():
    x = 0
    for i in range({n}):
        x += i * i
    return x
def record(key):
    now = time.time()
    p = _r.pipeline(transaction=False)
    p.set(key + ":first", now, nx=True)
    p.set(key + ":last", now)
    p.incr(key + ":done")
    p.execute()
'''

QMLKIT_APP = JOB_BODY + '''
from qmlkit import App
app = App("cpu-bench", storage="{redis}?prefix={key}:q:")
@app.job(name="cpu")
def cpu():
    record("{key}")
    burn()
'''

DRAMATIQ_APP = JOB_BODY + '''
import dramatiq
from dramatiq.brokers.redis import RedisBroker
dramatiq.set_broker(RedisBroker(url="{redis}", namespace="{key}-dq"))
@dramatiq.actor(actor_name="cpu", queue_name="cpu")
def cpu():
    record("{key}")
    burn()
'''

CELERY_APP = JOB_BODY + '''
from celery import Celery
app = Celery("cpu", broker="{redis}")
app.conf.task_default_queue = "{key}-cq"
app.conf.worker_prefetch_multiplier = 4
@app.task(name="cpu")
def cpu():
    record("{key}")
    burn()
'''


def calibrate() -> float:
    """Seconds one burn takes here now (median of 20)."""
    samples = []
    for _ in range(20):
        start = time.perf_counter()
        x = 0
        for i in range(BURN_N):
            x += i * i
        samples.append(time.perf_counter() - start)
    return sorted(samples)[len(samples) // 2]


def _write(folder: Path, name: str, text: str, key: str) -> None:
    (folder / f"{name}.py").write_text(text.format(redis=REDIS, n=BURN_N, key=key))


def _enqueue(system: str, python: str, folder: Path, module: str, jobs: int) -> None:
    if system.startswith("qmlkit"):
        code = (f"import {module} as m\nm.app.enqueue_jobs([m.app.make_job('cpu') "
                f"for _ in range({jobs})])\nm.app.close()")
    elif system == "dramatiq":
        code = f"import {module} as m\nfor _ in range({jobs}): m.cpu.send()"
    else:
        code = f"import {module} as m\nfor _ in range({jobs}): m.cpu.delay()"
    subprocess.run([python, "-c", code], cwd=folder, check=True,
                   env={**os.environ, "PYTHONPATH": str(folder)})


def _worker_cmd(system: str, python: str, module: str) -> list[str]:
    bindir = Path(python).parent
    if system == "qmlkit-threads":
        return [python, "-m", "qmlkit.cli", "--log-level", "WARNING", "worker", f"{module}:app",
                "--pool", "threads", "--threads", "2"]
    if system == "qmlkit-processes":
        return [python, "-m", "qmlkit.cli", "--log-level", "WARNING", "worker", f"{module}:app",
                "--pool", "processes", "--processes", "2", "--threads", "1"]
    if system == "dramatiq":
        return [str(bindir / "dramatiq"), module, "--processes", "2", "--threads", "1",
                "--queues", "cpu"]
    return [str(bindir / "celery"), "-A", module, "worker", "--pool", "prefork", "-c", "2",
            "--loglevel", "WARNING"]


def run(system: str, python: str, jobs: int) -> float:
    """One drain of ``jobs`` jobs by ``system``; returns jobs/s."""
    key = f"cpubench:{uuid.uuid4().hex[:8]}"
    module = f"cpu_{system.replace('-', '_')}_{key.rpartition(':')[2]}"
    client = redis.Redis.from_url(REDIS)
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp)
        text = {"dramatiq": DRAMATIQ_APP, "celery": CELERY_APP}.get(system, QMLKIT_APP)
        _write(folder, module, text, key)
        _enqueue(system, python, folder, module, jobs)
        proc = subprocess.Popen(_worker_cmd(system, python, module), cwd=folder,
                                env={**os.environ, "PYTHONPATH": str(folder)},
                                stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        try:
            wait_for_done(client, key, jobs, proc, system, poll_s=0.2)
        finally:
            stop_worker(proc)
        jobs_per_s = rate(client, key)
        for k in client.scan_iter(match=f"{key}*", count=1000):
            client.delete(k)
    return jobs_per_s


def main() -> None:
    """Parse the flags, run each system ``--repeat`` times interleaved, print lines."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--system", action="append", required=True,
                        choices=["qmlkit-threads", "qmlkit-processes", "dramatiq", "celery"])
    parser.add_argument("--jobs", type=int, default=2000)
    parser.add_argument("--repeat", type=int, default=1)
    parser.add_argument("--peers-python", default=sys.executable)
    args = parser.parse_args()
    per_job = calibrate()
    cores = os.cpu_count() or 1
    ceiling = cores / per_job
    print(f"burn: {per_job * 1000:.2f} ms per job now (BURN_N={BURN_N}); ceiling "
          f"{ceiling:.0f} jobs/s on {cores} cores; load {os.getloadavg()}")
    for rep in range(args.repeat):
        for system in args.system:
            python = sys.executable if system.startswith("qmlkit") else args.peers_python
            load = os.getloadavg()[0]
            rate = run(system, python, args.jobs)
            print(f"run {rep + 1} {system:17s} {rate:7.1f} jobs/s  {100 * rate / ceiling:5.1f} % "
                  f"of ceiling  load(1m) before {load:.2f}", flush=True)


if __name__ == "__main__":
    main()
