"""qmlkit's own CPU per job in a ``qmlkit worker`` process, and the job alone (issue #16, item 1).

The shared harness's drain (``../shared/bench/peers/``) gives jobs/s with its job, one
pipelined Redis round trip. That figure holds both qmlkit's cost and the job's, and the
job's own client work (redis-py building, sending and parsing a pipeline) is not small.
This benchmark separates the two, on each storage and thread count:

- ``bare job loop``: the harness's job called in a plain loop by T threads of one Python
  process, no framework at all: the most jobs/s one process can run this job here, and
  its CPU per job;
- ``qmlkit, harness job``: ``--jobs`` jobs enqueued in bulk, then ONE worker started by
  its CLI (``qmlkit --log-level WARNING worker own_cost_app:app --threads T``) drains
  them; jobs/s between the first and the latest start, and the worker process's CPU per
  job from its first count after the first job to the end (`own_cost_app`), so
  start-up is left out;
- ``qmlkit, no-op job``: the same with a job that does nothing: qmlkit's own CPU per job
  (claim, context, attempt, outcome, acknowledgement), all threads of the worker;
- ``own, with the job``: the harness job's CPU per job in qmlkit minus the bare loop's
  at the same T, what the framework adds around a job that does I/O.

Storage: Redis 127.0.0.1:6379 under a fresh key prefix (deleted afterwards); SQLite in a
temporary folder; PostgreSQL 127.0.0.1:5432, database ``test``, a fresh schema per run
(dropped afterwards). The job's keys and the counts go to Redis under the run's prefix.
Rounds alternate the three measurements. Prints figures, never asserts a speed.

    .venv/bin/python bench/own_cost.py [--backends redis,sqlite,postgres] [--threads 1,5]
        [--processes 2] [--jobs 20000] [--rounds 2]

``--processes P`` adds the same drains with ``--pool processes --processes P`` (T threads
in each child; the children's counts and CPU summed), and P bare loops at once.
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
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import redis

HERE = Path(__file__).resolve().parent
REDIS_URL = "redis://127.0.0.1:6379/0"
PG = "postgresql://127.0.0.1:5432/test"
QMLKIT = str(Path(sys.executable).with_name("qmlkit"))


def load() -> str:
    return " ".join(f"{x:.2f}" for x in os.getloadavg())


def bare_loop(threads: int, jobs: int, keys: str) -> tuple[float, float]:
    """The harness job in ``threads`` threads of this process: (jobs/s, CPU µs per job)."""
    from own_cost_app import harness_round_trip

    client = redis.Redis.from_url(REDIS_URL)
    each = jobs // threads

    def work() -> None:
        for _ in range(each):
            harness_round_trip(client, keys)

    harness_round_trip(client, keys)  # connect first
    pool = [threading.Thread(target=work) for _ in range(threads)]
    cpu, wall = time.process_time(), time.perf_counter()
    for thread in pool:
        thread.start()
    for thread in pool:
        thread.join()
    wall, cpu = time.perf_counter() - wall, time.process_time() - cpu
    return each * threads / wall, cpu / (each * threads) * 1e6


@contextmanager
def storage(backend: str) -> Iterator[str]:
    """A fresh storage URL for one run, removed afterwards."""
    if backend == "redis":
        prefix = f"bench-own:{uuid.uuid4().hex[:8]}:"
        try:
            yield f"{REDIS_URL}?prefix={prefix}"
        finally:
            client = redis.Redis.from_url(REDIS_URL)
            for key in client.scan_iter(match=prefix + "*", count=1000):
                client.delete(key)
    elif backend == "sqlite":
        with tempfile.TemporaryDirectory() as tmp:
            yield f"sqlite:///{tmp}/own.db"
    elif backend == "postgres":
        import psycopg

        schema = f"bench_own_{uuid.uuid4().hex[:8]}"
        with psycopg.connect(PG, autocommit=True) as conn:
            conn.execute(f'CREATE SCHEMA "{schema}"')
        try:
            yield f"postgresql+psycopg://127.0.0.1:5432/test?schema={schema}"
        finally:
            with psycopg.connect(PG, autocommit=True) as conn:
                conn.execute(f'DROP SCHEMA IF EXISTS "{schema}" CASCADE')
    else:
        raise SystemExit(f"unknown backend {backend!r} (redis, sqlite or postgres)")


def drain(backend: str, job: str, threads: int, jobs: int, processes: int = 0
          ) -> tuple[float, float]:
    """One worker drains ``jobs`` pre-enqueued jobs: (jobs/s, CPU µs per job).

    Args:
        threads: Worker threads (per child with ``processes``).
        processes: 0 for the thread pool in one process; else ``--pool processes`` with
            that many children, whose counts and CPU are summed (the supervising parent
            runs no job: its CPU is not counted).
    """
    keys = f"bench-own-keys:{uuid.uuid4().hex[:8]}:"
    client = redis.Redis.from_url(REDIS_URL)
    with storage(backend) as url:
        env = {**os.environ, "BENCH_OWN_STORAGE": url, "BENCH_OWN_JOB": job,
               "BENCH_OWN_REDIS": REDIS_URL, "BENCH_OWN_KEYS": keys}
        subprocess.run([sys.executable, "-c", ENQUEUE, str(jobs)], env=env, cwd=HERE,
                       check=True)
        pool = ["--pool", "processes", "--processes", str(processes)] if processes else []
        worker = subprocess.Popen([QMLKIT, "--log-level", "WARNING", "worker",
                                   "own_cost_app:app", "--threads", str(threads),
                                   "--wakeup", "none", *pool], env=env, cwd=HERE)

        def counts() -> list[dict[str, float]]:
            return [{k.decode(): float(v) for k, v in client.hgetall(key).items()}
                    for key in client.smembers(keys + "procs")]

        try:
            deadline = time.monotonic() + 600
            while sum(c.get("done", 0) for c in counts()) < jobs:
                if worker.poll() is not None or time.monotonic() > deadline:
                    raise RuntimeError(f"{backend} {job} x{threads}: the drain did not finish")
                time.sleep(0.05)
            procs = counts()
        finally:
            worker.terminate()
            worker.wait(60)
            client.delete(keys + "first", keys + "last", keys + "done", keys + "procs",
                          *client.smembers(keys + "procs"))
    done = sum(c["done"] for c in procs)
    cpu = sum(c["cpu"] - c["cpu_first"] for c in procs) / sum(
        c["done"] - c["done_first"] for c in procs)
    span = max(c["t_last"] for c in procs) - min(c["t_first"] for c in procs)
    return (done - 1) / span, cpu * 1e6


ENQUEUE = """
import sys
from own_cost_app import app, own
n = int(sys.argv[1])
for start in range(0, n, 1000):
    own.enqueue_many([()] * min(1000, n - start))
app.close()
"""


def bare_processes(processes: int, threads: int, jobs: int) -> tuple[float, float]:
    """The bare loop in ``processes`` processes at once: (summed jobs/s, mean CPU µs/job)."""
    procs = [subprocess.Popen([sys.executable, __file__, "--bare", str(threads),
                               str(jobs // processes)], stdout=subprocess.PIPE, text=True)
             for _ in range(processes)]
    outs = [proc.communicate()[0].split() for proc in procs]
    return (sum(float(o[0]) for o in outs),
            statistics.mean(float(o[1]) for o in outs))


Key = tuple[str, int, int, str]  # backend or "bare", threads, processes (0: one), job


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--backends", default="redis,sqlite,postgres")
    parser.add_argument("--threads", default="1,5")
    parser.add_argument("--processes", type=int, default=0,
                        help="also drain with --pool processes --processes P (threads each)")
    parser.add_argument("--jobs", type=int, default=20000)
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--bare", nargs=2, type=int, help=argparse.SUPPRESS)
    args = parser.parse_args()
    sys.path.insert(0, str(HERE))
    if args.bare:
        rate, cpu = bare_loop(args.bare[0], args.bare[1], f"bench-own-bare:{os.getpid()}:")
        print(f"{rate} {cpu}")
        return
    backends = args.backends.split(",")
    shapes = [(int(t), 0) for t in args.threads.split(",")]
    if args.processes:
        shapes += [(threads, args.processes) for threads, _ in shapes]
    print(f"qmlkit own cost, {time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}, "
          f"{args.jobs} jobs per drain, {args.rounds} round(s); load {load()}")
    rows: dict[Key, list[tuple[float, float]]] = {}
    for rnd in range(args.rounds):
        for threads, processes in shapes:
            rows.setdefault(("bare", threads, processes, "harness"), []).append(
                bare_processes(max(1, processes), threads, args.jobs // 2))
            for backend in backends:
                for job in ("harness", "noop"):
                    rows.setdefault((backend, threads, processes, job), []).append(
                        drain(backend, job, threads, args.jobs, processes))
        print(f"  round {rnd + 1} done; load {load()}", flush=True)

    def med(key: Key, i: int) -> float:
        return statistics.median(r[i] for r in rows[key])

    print("\nT = threads (per process); P = processes (1: the thread pool, else --pool "
          "processes; bare: that many loops at once)")
    print(f"{'backend':<9} {'T':>2} {'P':>2}  {'bare job loop':>22}  {'qmlkit, harness job':>22}  "
          f"{'qmlkit, no-op job':>22}  {'own, with the job':>17}")
    print(f"{'':<9} {'':>2} {'':>2}  {'jobs/s    CPU µs/job':>22}  {'jobs/s    CPU µs/job':>22}  "
          f"{'jobs/s    CPU µs/job':>22}  {'µs/job   x bare/s':>17}")
    for backend in backends:
        for threads, processes in shapes:
            bare = ("bare", threads, processes, "harness")
            job, noop = (backend, threads, processes, "harness"), (backend, threads, processes,
                                                                   "noop")
            print(f"{backend:<9} {threads:>2} {max(1, processes):>2}  "
                  f"{med(bare, 0):>10,.0f} {med(bare, 1):>10.0f}  "
                  f"{med(job, 0):>10,.0f} {med(job, 1):>10.0f}  "
                  f"{med(noop, 0):>10,.0f} {med(noop, 1):>10.0f}  "
                  f"{med(job, 1) - med(bare, 1):>7.0f} {med(job, 0) / med(bare, 0):>8.2f}")
    print("\nevery run (jobs/s, CPU µs/job):")
    for key, runs in rows.items():
        print(f"  {key[0]:<9} T={key[1]:<2} P={max(1, key[2]):<2} {key[3]:<8} "
              + " / ".join(f"{rate:,.0f} ({cpu:.0f})" for rate, cpu in runs))
    print(f"load at the end {load()}")


if __name__ == "__main__":
    main()
