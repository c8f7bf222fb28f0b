"""qmlkit-redis against RQ, Dramatiq and Celery, on one Redis, in one run.

Starts a ``redis-server`` of its own on a free loopback port (no persistence; emptied
between measurements), then for each system measures:

* enqueue jobs/s, one call per job, from this process (5,000 jobs, after one warm-up
  enqueue that opens the connections); for qmlkit also with wake-ups on (a kombu
  publisher thread in the client, as in the latency test);
* drain jobs/s of 10,000 pre-enqueued no-op jobs by one worker *process* (a subprocess),
  timed inside the worker from the first job's start to the last job's end, so
  interpreter and library start-up are excluded;
* enqueue-to-start latency p50/p99 of an idle worker: 200 jobs 20 ms apart, each stamped
  with ``time.time()`` just before the enqueue call and compared with the job's start;
* peak RSS of the worker process tree (``VmHWM`` from ``/proc/<pid>/status``, summed over
  the worker and its children), read at the end of the drain.

Workers: qmlkit with 1 and 8 threads (wake-ups over the same Redis); RQ ``SimpleWorker``
(one process, no fork per job: RQ's fastest mode); Dramatiq with 1 process of 8 threads;
Celery with the ``solo`` pool (one process). Peers need ``pip install -e '.[bench]'``.

    python bench/redis_peers.py [--repeat 1] [--jobs 10000]

The module doubles as the worker program (``python bench/redis_peers.py worker ...``)
and as the task module the peers' own worker commands import.
"""

from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import uuid
from collections.abc import Callable
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
QUEUE = "bench"
SYSTEM = os.environ.get("BENCH_SYSTEM", "")
REDIS_URL = os.environ.get("BENCH_REDIS_URL", "")
N_JOBS = int(os.environ.get("BENCH_JOBS", "0") or 0)

# --- what every job does: count (drain) or report its start latency ------------------------

_lock = threading.Lock()
_count = [0]
_first = [0.0]
_report: Any = None  # a redis client in the worker process


def _reporter() -> Any:
    global _report
    if _report is None:
        import redis

        _report = redis.Redis.from_url(REDIS_URL)
    return _report


def noop(i: int) -> None:
    """The drain job: counts itself; the last one reports the drain time."""
    with _lock:
        if _count[0] == 0:
            _first[0] = time.perf_counter()
        _count[0] += 1
        last = _count[0] == N_JOBS
    if last:
        _reporter().set("bench:drain", repr(time.perf_counter() - _first[0]))


def stamp(sent_at: float) -> None:
    """The latency job: reports how long after its enqueue it started, in ms."""
    started = time.time()
    _reporter().rpush("bench:latency", repr((started - sent_at) * 1000))


# --- the peers' task modules (built at import in their worker processes) ---------------------


def _dramatiq_actors() -> tuple[Any, Any]:
    import dramatiq
    from dramatiq.brokers.redis import RedisBroker

    broker = RedisBroker(url=REDIS_URL)
    dramatiq.set_broker(broker)
    return (dramatiq.actor(noop, actor_name="noop", queue_name=QUEUE, max_retries=0),
            dramatiq.actor(stamp, actor_name="stamp", queue_name=QUEUE, max_retries=0))


def _celery_app() -> Any:
    from celery import Celery

    app = Celery("bench", broker=REDIS_URL)
    app.conf.update(task_ignore_result=True, task_default_queue=QUEUE,
                    worker_hijack_root_logger=False, broker_connection_retry_on_startup=True)
    app.task(name="noop")(noop)
    app.task(name="stamp")(stamp)
    return app


if SYSTEM == "dramatiq":
    dramatiq_noop, dramatiq_stamp = _dramatiq_actors()
elif SYSTEM == "celery":
    celery_app = _celery_app()


# --- enqueue side (this process) ------------------------------------------------------------


class Client:
    """One system's client: enqueue one job, enqueue many, start a worker command."""

    def __init__(self, system: str, url: str, prefix: str, wakeups: bool = True) -> None:
        self.system, self.url, self.prefix = system, url, prefix
        os.environ["BENCH_REDIS_URL"] = url
        global REDIS_URL
        REDIS_URL = url
        if system.startswith("qmlkit"):
            from qmlkit import App

            self.app = App("bench", storage=f"{url}?prefix={prefix}",
                           wakeup_url=url if wakeups else None,
                           wakeup_exchange=f"{prefix}wakeup")
            self.app.job(name="noop")(noop)
            self.app.job(name="stamp")(stamp)
            self.send = self.app.registry["noop"].enqueue
            self.send_stamp = self.app.registry["stamp"].enqueue
            self.bulk = lambda n: self.app.registry["noop"].enqueue_many(
                [(i,) for i in range(n)])
        elif system == "rq":
            import redis
            from redis_peers import noop as rq_noop  # importable by name in RQ's worker
            from redis_peers import stamp as rq_stamp
            from rq import Queue

            self.q = Queue(QUEUE, connection=redis.Redis.from_url(url))
            self.send = lambda i: self.q.enqueue(rq_noop, i)
            self.send_stamp = lambda t: self.q.enqueue(rq_stamp, t)

            def bulk(n: int) -> None:
                for k in range(0, n, 1000):
                    self.q.enqueue_many([Queue.prepare_data(rq_noop, (i,))
                                         for i in range(k, min(n, k + 1000))])
            self.bulk = bulk
        elif system == "dramatiq":
            actor, stamp_actor = _dramatiq_actors()
            self.send = actor.send
            self.send_stamp = stamp_actor.send
            self.bulk = lambda n: [actor.send(i) for i in range(n)]
        elif system == "celery":
            app = _celery_app()
            task, stamp_task = app.tasks["noop"], app.tasks["stamp"]
            self.send = task.delay
            self.send_stamp = stamp_task.delay
            self.bulk = lambda n: [task.delay(i) for i in range(n)]
        else:
            raise ValueError(system)

    def worker_command(self) -> list[str]:
        py = sys.executable
        if self.system.startswith("qmlkit"):
            threads = self.system.partition("-")[2] or "1"
            return [py, str(HERE / "redis_peers.py"), "worker", self.system, self.prefix, threads]
        if self.system == "rq":
            return [py, str(HERE / "redis_peers.py"), "worker", "rq", self.prefix, "1"]
        if self.system == "dramatiq":
            return [py, "-m", "dramatiq", "redis_peers", "--processes", "1", "--threads", "8",
                    "--queues", QUEUE]
        return [py, "-m", "celery", "-A", "redis_peers:celery_app", "worker", "--pool", "solo",
                "--loglevel", "WARNING", "--without-gossip", "--without-mingle",
                "--without-heartbeat", "-Q", QUEUE]


def run_worker(system: str, prefix: str, threads: int) -> None:
    """The worker process of qmlkit or RQ (``python bench/redis_peers.py worker ...``)."""
    if system.startswith("qmlkit"):
        from qmlkit import App

        app = App("bench", storage=f"{REDIS_URL}?prefix={prefix}", wakeup_url=REDIS_URL,
                  wakeup_exchange=f"{prefix}wakeup")
        app.job(name="noop")(noop)
        app.job(name="stamp")(stamp)
        server = app.server(worker_count=threads, log_attempts=False, enable_cleanup=False,
                            queues=("default",), polling_interval=1.0)
        server.start()
        threading.Event().wait()
    else:
        import redis
        from rq import Queue, SimpleWorker

        connection = redis.Redis.from_url(REDIS_URL)
        SimpleWorker([Queue(QUEUE, connection=connection)], connection=connection).work(
            logging_level="WARNING")


# --- measurements ----------------------------------------------------------------------------


def vm_hwm_kib(pid: int) -> int:
    """Peak RSS of ``pid`` and its descendants, in KiB (sum of ``VmHWM``)."""
    total = 0
    todo = [pid]
    while todo:
        p = todo.pop()
        try:
            for line in Path(f"/proc/{p}/status").read_text().splitlines():
                if line.startswith("VmHWM:"):
                    total += int(line.split()[1])
            children = Path(f"/proc/{p}/task/{p}/children").read_text().split()
        except OSError:
            continue
        todo += [int(c) for c in children]
    return total


def wait_for(predicate: Callable[[], Any], timeout: float, what: str) -> Any:
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if value:
            return value
        if time.monotonic() > deadline:
            raise RuntimeError(f"timed out waiting for {what}")
        time.sleep(0.01)


def start_worker(client: Client, env: dict[str, str]) -> subprocess.Popen[bytes]:
    return subprocess.Popen(client.worker_command(), cwd=HERE, env=env,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)


def stop_worker(proc: subprocess.Popen[bytes]) -> None:
    proc.terminate()
    try:
        proc.wait(15)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait(5)


def measure(system: str, url: str, n: int, admin: Any) -> dict[str, float]:
    """One system's figures: enqueue /s, drain /s, latency p50/p99 ms, worker RSS MiB."""
    prefix = f"bench:{uuid.uuid4().hex[:8]}:"
    env = {**os.environ, "BENCH_SYSTEM": system, "BENCH_REDIS_URL": url, "BENCH_JOBS": str(n),
           "PYTHONPATH": os.pathsep.join([str(HERE), str(ROOT)])}
    def enqueue_rate(client: Client) -> float:
        admin.flushall()
        client.send(-1)  # warm-up: connections, plugins and scripts are ready after this one
        single = 5000
        start = time.perf_counter()
        for i in range(single):
            client.send(i)
        return single / (time.perf_counter() - start)

    # Like the peers, which have no notification channel besides the queue itself: the
    # qmlkit client without wake-ups; and, for qmlkit, with them (as in the latency test).
    enqueue = enqueue_rate(Client(system, url, prefix, wakeups=False))
    enqueue_wake = (enqueue_rate(Client(system, url, prefix)) if system.startswith("qmlkit")
                    else float("nan"))

    admin.flushall()
    client = Client(system, url, prefix)
    client.bulk(n)
    proc = start_worker(client, env)
    try:
        elapsed = float(wait_for(lambda: admin.get("bench:drain"), 900, f"{system} drain"))
        rss = vm_hwm_kib(proc.pid) / 1024
    finally:
        stop_worker(proc)

    admin.flushall()
    client = Client(system, url, prefix)
    proc = start_worker(client, env)
    try:
        client.send_stamp(time.time())  # warm-up: the worker is up and idle after this one
        wait_for(lambda: admin.llen("bench:latency") >= 1, 120, f"{system} start")
        time.sleep(0.5)
        admin.delete("bench:latency")
        for _ in range(200):
            client.send_stamp(time.time())
            time.sleep(0.02)  # an idle gap between jobs, as in the peer figures
        wait_for(lambda: admin.llen("bench:latency") >= 200, 120, f"{system} latency")
        lat = sorted(float(x) for x in admin.lrange("bench:latency", 0, -1))
    finally:
        stop_worker(proc)
    return {"enqueue": enqueue, "enqueue_wake": enqueue_wake, "drain": n / elapsed,
            "p50": lat[len(lat) // 2],
            "p99": lat[int(len(lat) * 0.99) - 1], "rss": rss}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeat", type=int, default=1)
    parser.add_argument("--jobs", type=int, default=10_000)
    parser.add_argument("--systems", default="qmlkit-1,qmlkit-8,rq,dramatiq,celery")
    args = parser.parse_args()
    import redis

    from qmlkit.testing import RedisProcess

    systems = args.systems.split(",")
    results: dict[str, list[dict[str, float]]] = {s: [] for s in systems}
    skipped: dict[str, str] = {}
    with tempfile.TemporaryDirectory() as tmp:
        server = RedisProcess(Path(tmp))
        server.start()
        admin = redis.Redis.from_url(server.url)
        try:
            for _ in range(args.repeat):
                for system in systems:
                    if system in skipped:
                        continue
                    try:
                        results[system].append(measure(system, server.url, args.jobs, admin))
                    except ImportError as exc:
                        skipped[system] = f"not installed ({exc})"
        finally:
            admin.close()
            server.stop()
    med = statistics.median
    now = datetime.now(timezone.utc)
    print(f"qmlkit-redis vs peers, {now:%Y-%m-%d %H:%M} UTC, {args.jobs} no-op "
          f"jobs, median of {args.repeat}, redis-server of its own on 127.0.0.1")
    print(f"{'system':<12}{'enqueue/s':>11}{'+wake-ups':>11}{'drain/s':>10}{'p50 ms':>9}"
          f"{'p99 ms':>9}{'RSS MiB':>9}")
    rows = {s: {k: med(r[k] for r in rs) for k in rs[0]} for s, rs in results.items() if rs}
    for system, row in rows.items():
        wake = "-" if row["enqueue_wake"] != row["enqueue_wake"] else f"{row['enqueue_wake']:,.0f}"
        print(f"{system:<12}{row['enqueue']:>11,.0f}{wake:>11}{row['drain']:>10,.0f}"
              f"{row['p50']:>9.1f}"
              f"{row['p99']:>9.1f}{row['rss']:>9.0f}")
    for system, why in skipped.items():
        print(f"{system:<12} skipped: {why}")
    peers = {s: r for s, r in rows.items() if not s.startswith("qmlkit")}
    if peers:
        best_drain = max(peers.items(), key=lambda kv: kv[1]["drain"])
        best_enq = max(peers.items(), key=lambda kv: kv[1]["enqueue"])
        for system, row in rows.items():
            if system.startswith("qmlkit"):
                drain = row["drain"] / best_drain[1]["drain"]
                enqueue = row["enqueue"] / best_enq[1]["enqueue"]
                print(f"{system}: drain {drain:.1f}x the best peer ({best_drain[0]}), "
                      f"enqueue {enqueue:.1f}x the fastest peer ({best_enq[0]})")


if __name__ == "__main__":
    if len(sys.argv) > 1 and sys.argv[1] == "worker":
        run_worker(sys.argv[2], sys.argv[3], int(sys.argv[4]))
    else:
        main()
