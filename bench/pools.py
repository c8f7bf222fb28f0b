"""I/O-bound drain through qmlkit's pools and peers (issue #14): jobs that wait 100 ms.

For each system and each number in flight: ``--jobs`` jobs are enqueued, then ONE
worker process is started with the system's own CLI (``qmlkit worker qmlkit_app:app
--pool asyncio -c 500``, ``taskiq worker``, ``saq``, ``dramatiq``, ``pgq run``) and drains
them. Every system runs the same job (`bench/pools_apps/stamp.py`): wait 100 ms (``await
asyncio.sleep`` or ``time.sleep``, the system's natural form) and count it in the
worker process's memory, which a thread of that process writes to Redis every 20 ms.
Reported:

- ``jobs/s``: done / (last end - first start), so the worker's start-up is left out;
- ``% of ceiling``: of ``in_flight / 0.1 s``, the rate with every slot always busy;
- ``peak running``: the most jobs between their start and their end at once in the worker
  (summed over its processes): whether the system's knob let ``in flight`` jobs run;
- ``VmHWM MiB``: peak RSS of the worker process and its children, summed, from the
  kernel's ``/proc/PID/status``;
- ``CPU ms/job``: the CPU time (``time.process_time()``: utime + stime of every thread)
  of each worker process that ran jobs, from its first job's start to its last job's
  end, summed, per job: the drain's cost without the start-up's imports;
- ``left in db`` (PostgreSQL systems, in the jobs column): jobs still unfinished in the
  storage once the worker has stopped (pgqueuer: rows left in its queue table; qmlkit:
  rows not ``Succeeded``), counted before the run's schema is dropped;
- the 1-minute load average (``/proc/loadavg``) before and after each run.

Storage: Redis on 127.0.0.1:6379 (qmlkit through qmlkit-redis, taskiq, saq, Dramatiq), or
PostgreSQL on 127.0.0.1:5432, database ``test``, in a schema of its own per run, created
before the enqueue and dropped after the run however it ends (``pgqueuer``, and qmlkit's
asyncio pool on qmlkit-postgres: ``qmlkit-asyncio-pg``). The stamps go to Redis for every
system. qmlkit runs from this checkout's ``.venv``; the peers from ``.venv-bench``
(``python3 -m venv .venv-bench && .venv-bench/bin/pip install taskiq taskiq-redis saq
'dramatiq[redis]' pgqueuer asyncpg 'psycopg[binary]' 'typer<0.29'``: pgqueuer 1.6's ``pgq
run`` fails at start under typer 0.29, ``AttributeError: 'str' object has no attribute
'name'`` for its ``--log-level``); a peer whose venv is missing is skipped.

pgqueuer: ``pgq run pgqueuer_app:create --max-concurrent-tasks N --batch-size B``.
``--max-concurrent-tasks`` caps the jobs this worker holds picked (in its dequeue query);
without it, one worker picks the whole backlog. ``--batch-size`` (``--pgq-batch-size``
here, default pgqueuer's 10, lowered to N/2 which pgqueuer requires) is how many jobs one
dequeue claims and how many finished jobs one acknowledgement flush carries, so it decides
how fast N are reached: at 500 in flight and B = 10 the worker may never hold 500 at once
(see the ``peak running`` column).

``--job mixed`` (issue #16 item 6) replaces the 100 ms wait by one PostgreSQL ``INSERT``
and one Redis ``INCR`` (`stamp.py`; every run then gets a PostgreSQL schema of its own with
the table, whatever its storage): the question there is whether more threads or slots
ever make a system slower, so ``% of ceiling`` is left out and the rate and CPU per job
are what to compare across ``--in-flight``.

    .venv/bin/python bench/pools.py                                  # all, 500 and 2,000
    .venv/bin/python bench/pools.py --job mixed --in-flight 10,40 \
        --systems qmlkit-threads,qmlkit-threads-pg,qmlkit-threads-sqlite,pgqueuer,dramatiq
    .venv/bin/python bench/pools.py --systems qmlkit-asyncio,qmlkit-threads --in-flight 10,100
    .venv/bin/python bench/pools.py --systems pgqueuer,qmlkit-asyncio-pg --in-flight 500
"""

from __future__ import annotations

import argparse
import os
import shutil
import signal
import sqlite3
import subprocess
import sys
import tempfile
import time
import uuid
from collections.abc import Callable, Iterator
from contextlib import AbstractContextManager, contextmanager, nullcontext
from dataclasses import dataclass, field
from pathlib import Path

import psycopg
import redis

HERE = Path(__file__).resolve().parent
APPS = HERE / "pools_apps"
ROOT = HERE.parent
QMLKIT_PY = ROOT / ".venv" / "bin" / "python"
PEERS_BIN = ROOT / ".venv-bench" / "bin"
REDIS_URL = "redis://127.0.0.1:6379/0"
PG_DSN = "postgresql://127.0.0.1:5432/test"
WAIT_S = 0.1
PGQ_BATCH = [10]  # pgqueuer's --batch-size (its default 10); set from --pgq-batch-size
JOB = ["wait"]  # the job: "wait" (100 ms) or "mixed" (INSERT + INCR); set from --job


@dataclass(frozen=True)
class Store:
    """A run's storage outside Redis: the variables naming it, and its unfinished jobs."""

    env: dict[str, str]
    left: Callable[[], int]  # jobs left unfinished in it; -1 when not counted


@contextmanager
def redis_only(run: str) -> Iterator[Store]:
    """Nothing to set up: the run's Redis keys are emptied by `run_one`."""
    yield Store({}, lambda: -1)


def pg_schema(unfinished_sql: str) -> Callable[[str], AbstractContextManager[Store]]:
    """A fresh PostgreSQL schema per run, dropped on exit whatever happened;
    ``unfinished_sql`` counts the jobs left in it (``{schema}`` is its quoted name)."""

    @contextmanager
    def scope(run: str) -> Iterator[Store]:
        name = f"bench_pools_{run}"
        with psycopg.connect(PG_DSN, autocommit=True) as conn:
            conn.execute(f'CREATE SCHEMA "{name}"')

        def left() -> int:
            with psycopg.connect(PG_DSN, autocommit=True) as conn:
                row = conn.execute(unfinished_sql.format(schema=f'"{name}"')).fetchone()
            return int(row[0]) if row else -1

        try:
            yield Store({"BENCH_PG_DSN": PG_DSN, "PGQUEUER_SCHEMA": name,
                         "PGQUEUER_CHANNEL": f"{name}_ch",
                         "BENCH_QMLKIT_STORAGE": "postgresql+psycopg://127.0.0.1:5432/test"
                                                 f"?schema={name}"}, left)
        finally:
            with psycopg.connect(PG_DSN, autocommit=True) as conn:
                conn.execute("SET lock_timeout = '30s'")
                conn.execute(f'DROP SCHEMA IF EXISTS "{name}" CASCADE')

    return scope


@contextmanager
def sqlite_file(run: str) -> Iterator[Store]:
    """qmlkit's embedded SQLite storage in a new file of a temporary folder, removed on exit."""
    folder = tempfile.mkdtemp(prefix=f"bench-pools-{run}-")
    path = os.path.join(folder, "jobs.db")

    def left() -> int:
        with sqlite3.connect(path) as conn:
            row = conn.execute("SELECT count(*) FROM qmlkit_jobs "
                               "WHERE state <> 'Succeeded'").fetchone()
        return int(row[0])

    try:
        yield Store({"BENCH_QMLKIT_STORAGE": f"sqlite:///{path}"}, left)
    finally:
        shutil.rmtree(folder, ignore_errors=True)


@contextmanager
def mixed_table(run: str) -> Iterator[dict[str, str]]:
    """For ``--job mixed``: a schema of the run's own holding the table the job inserts
    into, dropped on exit; yields the variables naming it."""
    name = f"bench_mixed_{run}"
    with psycopg.connect(PG_DSN, autocommit=True) as conn:
        conn.execute(f'CREATE SCHEMA "{name}"')
        conn.execute(f'CREATE TABLE "{name}".bench_mixed '
                     "(id bigserial PRIMARY KEY, at double precision NOT NULL)")
    try:
        yield {"BENCH_JOB": "mixed", "BENCH_PG_DSN": PG_DSN,
               "BENCH_MIXED_TABLE": f'"{name}".bench_mixed'}
    finally:
        with psycopg.connect(PG_DSN, autocommit=True) as conn:
            conn.execute("SET lock_timeout = '30s'")
            conn.execute(f'DROP SCHEMA IF EXISTS "{name}" CASCADE')


@dataclass(frozen=True)
class System:
    """How to enqueue for, and start the worker of, one system at ``c`` in flight."""

    name: str
    python: Path
    enqueue: Callable[[int], list[str]]  # argv after the python, for n jobs
    worker: Callable[[int], list[str]]  # argv, for c in flight
    how: str  # what "in flight" means for it
    store: Callable[[str], AbstractContextManager[Store]] = field(default=redis_only)


def pgq_batch(in_flight: int) -> int:
    """``--pgq-batch-size``, lowered to ``in_flight // 2``: pgqueuer refuses a
    ``--max-concurrent-tasks`` under twice its ``--batch-size``."""
    return max(1, min(PGQ_BATCH[0], in_flight // 2))


def _qmlkit(pool: str, form: str, storage: str = "redis") -> System:
    store, storage_name, suffix = {
        "redis": (redis_only, "qmlkit-redis", ""),
        "pg": (pg_schema("SELECT count(*) FROM {schema}.qmlkit_jobs WHERE state <> 'Succeeded'"),
               "qmlkit-postgres (psycopg)", "-pg"),
        "sqlite": (sqlite_file, "embedded SQLite", "-sqlite"),
    }[storage]
    return System(
        f"qmlkit-{pool}{suffix}", QMLKIT_PY,
        lambda n: [str(APPS / "qmlkit_app.py"), str(n), form],
        lambda c: [str(QMLKIT_PY), "-m", "qmlkit.cli", "--log-level", "WARNING", "worker",
                   "qmlkit_app:app", "--pool", pool, "-c", str(c), "--shutdown-timeout", "30"],
        f"`qmlkit worker --pool {pool} -c N`, `{form} def` job, {storage_name} storage", store)


def _qmlkit_processes(processes: int = 2) -> System:
    """The process pool, each child an asyncio pool with ``N / processes`` slots."""
    base = _qmlkit("asyncio", "async")
    return System(
        "qmlkit-processes-asyncio", QMLKIT_PY, base.enqueue,
        lambda c: [str(QMLKIT_PY), "-m", "qmlkit.cli", "--log-level", "WARNING", "worker",
                   "qmlkit_app:app", "--pool", "processes", "--processes", str(processes),
                   "--child-pool", "asyncio", "-c", str(max(1, c // processes)),
                   "--shutdown-timeout", "30"],
        f"`qmlkit worker --pool processes --processes {processes} --child-pool asyncio "
        f"-c N/{processes}`, `async def` job, qmlkit-redis storage", base.store)


SYSTEMS = {
    "qmlkit-asyncio": _qmlkit("asyncio", "async"),
    "qmlkit-processes-asyncio": _qmlkit_processes(),
    "qmlkit-threads": _qmlkit("threads", "sync"),
    "qmlkit-asyncio-pg": _qmlkit("asyncio", "async", "pg"),
    "qmlkit-threads-pg": _qmlkit("threads", "sync", "pg"),
    "qmlkit-threads-sqlite": _qmlkit("threads", "sync", "sqlite"),
    "taskiq": System(
        "taskiq", PEERS_BIN / "python",
        lambda n: [str(APPS / "taskiq_app.py"), str(n)],
        lambda c: [str(PEERS_BIN / "taskiq"), "worker", "taskiq_app:broker", "--workers", "1",
                   "--max-async-tasks", str(c), "--log-level", "WARNING"],
        "`taskiq worker --workers 1 --max-async-tasks N`, taskiq-redis `ListQueueBroker`"),
    "saq": System(
        "saq", PEERS_BIN / "python",
        lambda n: [str(APPS / "saq_app.py"), str(n)],
        lambda c: [str(PEERS_BIN / "saq"), "saq_app.settings", "--workers", "1"],
        "`saq saq_app.settings --workers 1`, `concurrency` = N"),
    "dramatiq": System(
        "dramatiq", PEERS_BIN / "python",
        lambda n: [str(APPS / "dramatiq_app.py"), str(n)],
        lambda c: [str(PEERS_BIN / "dramatiq"), "dramatiq_app", "--processes", "1",
                   "--threads", str(c)],
        "`dramatiq --processes 1 --threads N`, `def` actor, Redis broker"),
    "pgqueuer": System(
        "pgqueuer", PEERS_BIN / "python",
        lambda n: [str(APPS / "pgqueuer_app.py"), str(n)],
        lambda c: [str(PEERS_BIN / "pgq"), "run", "pgqueuer_app:create", "--log-level", "WARNING",
                   "--max-concurrent-tasks", str(c), "--batch-size", str(pgq_batch(c))],
        "`pgq run --max-concurrent-tasks N --batch-size B` (B jobs per dequeue and per "
        "acknowledgement flush, `--pgq-batch-size`, at most N/2), `QueueManager` on one "
        "asyncpg connection",
        pg_schema("SELECT count(*) FROM {schema}.pgqueuer")),
}


@dataclass
class Result:
    system: str
    in_flight: int
    jobs: int
    done: int
    rate: float
    hwm_mib: float
    cpu_ms_per_job: float
    load_before: str
    load_after: str
    peak: int
    left: int = -1

    def row(self) -> str:
        ceiling = self.in_flight / WAIT_S
        share = f"{100 * self.rate / ceiling:.0f} %" if JOB[0] == "wait" else "-"
        lost = "" if self.done == self.jobs else f" ({self.jobs - self.done} missing)"
        if self.left >= 0:
            lost += f" ({self.left} left in db)"
        return (f"| {self.system} | {self.in_flight:,} | {self.peak:,} | {self.jobs:,}{lost} "
                f"| {self.rate:,.0f} "
                f"| {share} | {self.hwm_mib:.0f} "
                f"| {self.cpu_ms_per_job:.2f} | {self.load_before} → {self.load_after} |")


HEADER = ("| system | in flight | peak running | jobs | jobs/s | % of ceiling | worker VmHWM MiB "
          "| worker CPU ms/job | load avg before → after |\n|---|---|---|---|---|---|---|---|---|")


def loadavg() -> str:
    return Path("/proc/loadavg").read_text().split()[0]


def family(pid: int) -> list[int]:
    """``pid`` and every descendant of it now."""
    children: dict[int, list[int]] = {}
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rpartition(")")[2].split()
        except OSError:
            continue
        children.setdefault(int(fields[1]), []).append(int(stat.parent.name))
    found, todo = [], [pid]
    while todo:
        current = todo.pop()
        found.append(current)
        todo.extend(children.get(current, []))
    return found


def hwm_mib(pids: list[int]) -> float:
    total = 0
    for pid in pids:
        try:
            lines = Path(f"/proc/{pid}/status").read_text().splitlines()
        except OSError:
            continue
        total += sum(int(line.split()[1]) for line in lines if line.startswith("VmHWM:"))
    return total / 1024


def empty(client: redis.Redis, prefix: str) -> None:
    keys = list(client.scan_iter(match=f"{prefix}*", count=1000))
    for i in range(0, len(keys), 500):
        client.delete(*keys[i:i + 500])


def stamps(client: redis.Redis, keys: str) -> tuple[float, float, int, float, int]:
    """(first start, last end, jobs done, CPU seconds between, peak jobs running at once
    summed over processes), over every worker process's hash."""
    rows = [client.hgetall(key) for key in client.scan_iter(match=f"{keys}proc:*")]
    if not rows:
        return 0.0, 0.0, 0, 0.0, 0
    return (min(float(r[b"first"]) for r in rows), max(float(r[b"last"]) for r in rows),
            sum(int(r[b"done"]) for r in rows),
            sum(float(r[b"cpu_last"]) - float(r[b"cpu_first"]) for r in rows),
            sum(int(r[b"peak"]) for r in rows))


def drain(system: System, env: dict[str, str], in_flight: int, jobs: int, timeout_s: float,
          client: redis.Redis, keys: str) -> tuple[float, str, str]:
    """Start the worker, wait until ``jobs`` are stamped (or ``timeout_s``), stop it and
    wait for its exit: (peak VmHWM MiB, load before, load after)."""
    err = open(f"/tmp/bench-pools-{system.name}.err", "w")  # noqa: SIM115
    load_before = loadavg()
    worker = subprocess.Popen(system.worker(in_flight), env=env, cwd=APPS,
                              stdout=subprocess.DEVNULL, stderr=err)
    hwm = 0.0
    try:
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline and worker.poll() is None:
            hwm = max(hwm, hwm_mib(family(worker.pid)))
            if stamps(client, keys)[2] >= jobs:
                break
            time.sleep(0.05)
        hwm, load_after = max(hwm, hwm_mib(family(worker.pid))), loadavg()
    finally:
        worker.send_signal(signal.SIGTERM)
        try:
            worker.wait(60)
        except subprocess.TimeoutExpired:
            for pid in family(worker.pid):
                os.kill(pid, signal.SIGKILL)
            worker.wait()
        err.close()
    if worker.returncode not in (0, -signal.SIGTERM):
        print(f"{system.name}: worker exited {worker.returncode}, see {err.name}",
              file=sys.stderr)
    return hwm, load_before, load_after


def run_one(system: System, in_flight: int, jobs: int, timeout_s: float) -> Result:
    """Enqueue every job, then start the worker and wait for the drain."""
    client = redis.Redis.from_url(REDIS_URL)
    run = uuid.uuid4().hex[:8]
    prefix, keys = f"bench-pools:{run}:", f"bench-pools:{run}:stamps:"
    try:
        job_scope = mixed_table(run) if JOB[0] == "mixed" else nullcontext({})
        with system.store(run) as store, job_scope as job_env:
            env = {**os.environ, "PYTHONPATH": str(APPS), "BENCH_REDIS": REDIS_URL,
                   "BENCH_KEYS": keys, "BENCH_PREFIX": prefix,
                   "BENCH_CONCURRENCY": str(in_flight),
                   "BENCH_QMLKIT_STORAGE": f"{REDIS_URL}?prefix={prefix}q:", **store.env,
                   **job_env}
            subprocess.run([str(system.python), *system.enqueue(jobs)], env=env, cwd=APPS,
                           check=True)
            hwm, load_before, load_after = drain(system, env, in_flight, jobs, timeout_s,
                                                 client, keys)
            left = store.left()
        first, last, done, cpu, peak = stamps(client, keys)
    finally:
        empty(client, prefix)
        client.close()
    rate = done / (last - first) if last > first else 0.0
    return Result(system.name, in_flight, jobs, done, rate, hwm, 1000 * cpu / max(done, 1),
                  load_before, load_after, peak, left)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--systems", default=",".join(SYSTEMS), help="comma-separated")
    parser.add_argument("--jobs", type=int, default=2000)
    parser.add_argument("--in-flight", default="500,2000", help="comma-separated")
    parser.add_argument("--repeat", type=int, default=1)
    parser.add_argument("--timeout", type=float, default=120.0, help="seconds per drain")
    parser.add_argument("--pgq-batch-size", type=int, default=PGQ_BATCH[0],
                        help="pgqueuer's `pgq run --batch-size` (its default: 10)")
    parser.add_argument("--job", choices=("wait", "mixed"), default="wait",
                        help="wait: 100 ms; mixed: one PostgreSQL INSERT + one Redis INCR")
    args = parser.parse_args()
    PGQ_BATCH[0] = args.pgq_batch_size
    JOB[0] = args.job
    chosen = [SYSTEMS[name] for name in args.systems.split(",")]
    results = []
    for _ in range(args.repeat):
        for in_flight in (int(x) for x in args.in_flight.split(",")):
            for system in chosen:
                if not system.python.exists():
                    print(f"skipped {system.name}: {system.python} is missing", file=sys.stderr)
                    continue
                result = run_one(system, in_flight, args.jobs, args.timeout)
                print(result.row(), flush=True)
                results.append(result)
    print(f"\n{os.cpu_count()} CPUs; command: "
          f"{' '.join(['bench/pools.py', *sys.argv[1:]])}\n")
    print(HEADER)
    for result in results:
        print(result.row())
    print()
    for system in chosen:
        print(f"- {system.name}: {system.how}")


if __name__ == "__main__":
    main()
