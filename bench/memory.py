"""Worker memory (issue #16): VmHWM and VmRSS of real ``qmlkit worker`` processes, and the
import-only floor of the libraries a worker needs.

For each configuration, ``qmlkit worker memory_app:app --storage URL`` (this checkout's
own console script, the thread pool with its default 5 threads unless the row says
otherwise) is started on an empty storage of its own: a new SQLite file, a fresh Redis
key prefix (emptied afterwards), a fresh PostgreSQL schema (dropped afterwards). Once the
worker has registered (its heartbeat row is in storage) and settled for a second, its
**idle VmRSS** is read; then ``--jobs`` no-op jobs are enqueued from this process, 1,000
per call, and when the storage counts them all Succeeded the worker's ``VmHWM`` (the
kernel's peak RSS), ``VmRSS``, ``RssAnon`` (private memory) and ``RssFile``
(file-backed pages: shared libraries, mostly) are read from ``/proc/PID/status``. The
worker is then stopped with SIGTERM. Figures in MiB. Then (``--growth ROUNDS``) one worker
per storage is given ``--jobs`` jobs ROUNDS times over, its VmRSS read after each round:
how memory grows with the jobs run.

The **floor** rows are ``python -c "import ..."`` in a fresh interpreter: what the
libraries cost before qmlkit adds anything. A worker cannot be lighter than the floor of
what its storage needs.

Bytecode: compiling a module costs far more memory than loading its ``.pyc`` (a worker
that compiles everything peaks about 20 MiB higher), and this machine sets
``PYTHONDONTWRITEBYTECODE=1``, so an editable checkout's own modules would be compiled at
every start. By default every process here therefore runs with a ``.pyc`` cache of this
run's own (``PYTHONPYCACHEPREFIX`` in a temporary folder, bytecode writing on), filled by
one unmeasured warm-up of each worker configuration (``--warmup-jobs`` jobs) and of each
floor: the figures are those of an installed package whose bytecode is compiled.
``--cold`` keeps the environment's settings instead.

    .venv/bin/python bench/memory.py                        # sqlite, redis, postgres
    .venv/bin/python bench/memory.py --backends sqlite,redis --jobs 10000 --repeat 3
    PYTHONPATH=/other/checkout:... .venv/bin/python bench/memory.py   # another checkout

Services: Redis on 127.0.0.1:6379, PostgreSQL on 127.0.0.1:5432 (database ``test``); a
backend whose service does not answer is skipped with a note.
"""

from __future__ import annotations

import argparse
import os
import re
import shlex
import socket
import subprocess
import sys
import tempfile
import time
import uuid
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

# bench/ is on sys.path (this script's folder): share enqueue_ab's clean-ups
from drainkit import stop_worker
from enqueue_ab import PG_URL, drop_schema, empty_redis

BENCH = Path(__file__).resolve().parent
REDIS = "redis://127.0.0.1:6379/0"
POSTGRES = PG_URL
PYDANTIC_MODEL = ("from pydantic import BaseModel\n"
                  "class M(BaseModel):\n    x: int\nM(x=1)\n")

#: (label, code): the import-only floors, each in a fresh interpreter.
FLOORS: tuple[tuple[str, str], ...] = (
    ("bare interpreter", "pass"),
    ("import pydantic", "import pydantic"),
    ("pydantic + one model built", PYDANTIC_MODEL),
    ("import sqlalchemy", "import sqlalchemy"),
    ("import kombu", "import kombu"),
    ("kombu: Connection, Exchange, Queue", "import kombu.connection, kombu.entity"),
    ("kombu + its Redis transport", "import kombu.connection, kombu.entity, "
                                    "kombu.transport.redis"),
    ("import redis (redis-py)", "import redis"),
    ("import psycopg", "import psycopg"),
    ("import greenlet", "import greenlet"),
    ("import click", "import click"),
    ("SQLite worker's libraries: sqlalchemy + its sqlite dialect + sqlite3 + pydantic "
     "model + pluggy + click", "import sqlalchemy, sqlalchemy.dialects.sqlite, sqlite3, "
     "pluggy, click\n" + PYDANTIC_MODEL),
    ("Redis worker's libraries: redis-py + pydantic model + pluggy + click",
     "import redis, pluggy, click\n" + PYDANTIC_MODEL),
    ("PostgreSQL worker's libraries: sqlalchemy + psycopg + pydantic model + pluggy + click",
     "import sqlalchemy, sqlalchemy.dialects.postgresql.psycopg, psycopg, pluggy, click\n"
     + PYDANTIC_MODEL),
    ("SQLite worker's libraries + kombu's filesystem transport (wake-ups)",
     "import sqlalchemy, sqlalchemy.dialects.sqlite, sqlite3, pluggy, click, kombu.connection, "
     "kombu.entity, kombu.transport.filesystem\n" + PYDANTIC_MODEL),
    ("Redis worker's libraries + kombu's Redis transport (wake-ups)",
     "import redis, pluggy, click, kombu.connection, kombu.entity, kombu.transport.redis\n"
     + PYDANTIC_MODEL),
    ("import qmlkit", "import qmlkit"),
    ("qmlkit worker's modules, SQLite", "import qmlkit.cli, qmlkit.cli.worker, "
                                        "qmlkit.storage.sql"),
    ("qmlkit worker's modules, Redis", "import qmlkit.cli, qmlkit.cli.worker, "
                                       "qmlkit_redis.storage"),
)

STATUS_FIELDS = ("VmHWM", "VmRSS", "RssAnon", "RssFile")

#: The environment of every measured process (`main` sets the bytecode cache in it).
CHILD_ENV: dict[str, str] = dict(os.environ)


def status(pid: int) -> dict[str, float]:
    """``STATUS_FIELDS`` of ``/proc/PID/status``, in MiB."""
    text = Path(f"/proc/{pid}/status").read_text()
    found = dict(re.findall(r"^(\w+):\s+(\d+) kB", text, re.M))
    return {name: int(found[name]) / 1024 for name in STATUS_FIELDS}


def floor(code: str) -> float:
    """VmHWM in MiB of a fresh interpreter that ran ``code``."""
    probe = (code + "\nimport re\nprint(re.search(r'VmHWM:\\s+(\\d+)', "
             "open('/proc/self/status').read())[1])")
    out = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True,
                         cwd=tempfile.gettempdir(), env=CHILD_ENV, check=False)
    if out.returncode:
        return float("nan")
    return int(out.stdout.split()[-1]) / 1024


def answers(host: str, port: int) -> bool:
    try:
        with socket.create_connection((host, port), timeout=1):
            return True
    except OSError:
        return False


@dataclass
class Config:
    """One worker to measure."""

    backend: str  # sqlite, redis, postgres
    pool: str = "threads"
    wakeups: bool = False

    @property
    def label(self) -> str:
        wake = {"sqlite": "filesystem://", "redis": "redis://",
                "postgres": "redis://"}[self.backend] if self.wakeups else "none"
        return f"| {self.backend} | {self.pool} | {wake} "


@dataclass
class Run:
    """Where one measurement's storage lives, and how to clean it up."""

    url: str
    wakeup: str | None
    exchange: str
    cleanups: list[Callable[[], None]] = field(default_factory=list)


@contextmanager
def storage_for(config: Config, scratch: Path) -> Iterator[Run]:
    """A storage (and wake-up URL) of this measurement's own, removed afterwards."""
    token = uuid.uuid4().hex[:8]
    exchange = f"bench-memory.{token}"
    if config.backend == "sqlite":
        run = Run(f"sqlite:///{scratch / f'{token}.db'}", None, exchange)
        wakeup = f"filesystem://{scratch / f'wk-{token}'}"
    elif config.backend == "redis":
        prefix = f"bench-memory:{token}:"
        run = Run(f"{REDIS}?prefix={prefix}", None, exchange)
        run.cleanups.append(lambda: empty_redis(prefix))
        wakeup = REDIS
    else:
        schema = f"bench_memory_{token}"
        run = Run(f"{POSTGRES}?schema={schema}", None, exchange)
        run.cleanups.append(lambda: drop_schema(schema))
        wakeup = REDIS
    if config.wakeups:
        run.wakeup = wakeup
    try:
        yield run
    finally:
        for cleanup in run.cleanups:
            cleanup()


def wait(condition: Callable[[], bool], timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            raise TimeoutError(f"{what}: not within {timeout:.0f} s")
        time.sleep(0.05)


def worker_command(config: Config, run: Run) -> list[str]:
    script = Path(sys.executable).parent / "qmlkit"
    command = [str(script)] if script.exists() else [sys.executable, "-m", "qmlkit.cli"]
    command += ["worker", "memory_app:app", "--storage", run.url, "--pool", config.pool]
    if run.wakeup:
        command += ["--wakeup", run.wakeup, "--wakeup-exchange", run.exchange]
    return command


@dataclass
class Figures:
    """What one worker measured: idle VmRSS, then `status` after each round of jobs."""

    idle: float
    rounds: list[dict[str, float]]
    seconds: float  # the first round's drain
    load: str  # the 1-minute load average before → after


def measure(config: Config, jobs: int, scratch: Path, rounds: int = 1) -> Figures:
    """Run one worker through ``rounds`` × ``jobs`` jobs, reading its memory after each."""
    from qmlkit import App

    with storage_for(config, scratch) as run:
        client = App("bench-memory-client", storage=run.url, wakeup_url=run.wakeup,
                     wakeup_exchange=run.exchange)
        method = "bench.noop_async" if config.pool == "asyncio" else "bench.noop"
        client.storage.count_jobs()  # created, migrated, before the worker opens it
        load_before = os.getloadavg()[0]
        log = scratch / "worker.log"
        with log.open("w") as err:
            proc = subprocess.Popen(worker_command(config, run), cwd=BENCH, env=CHILD_ENV,
                                    stderr=err, stdout=subprocess.DEVNULL)
        try:
            wait(lambda: bool(client.storage.list_servers()) or proc.poll() is not None, 60,
                 "the worker registering")
            if proc.poll() is not None:
                raise RuntimeError(f"the worker exited: {log.read_text()[-2000:]}")
            time.sleep(1.0)  # its duties' first rounds
            idle = status(proc.pid)["VmRSS"]
            after: list[dict[str, float]] = []
            seconds = 0.0
            for done in range(jobs, jobs * rounds + 1, jobs):
                began = time.monotonic()
                for start in range(0, jobs, 1000):
                    client.enqueue_jobs([client.make_job(method)
                                         for _ in range(min(1000, jobs - start))])
                wait(lambda n=done: succeeded(client) >= n, 600, f"{done:,} jobs succeeding")
                seconds = seconds or time.monotonic() - began
                after.append(status(proc.pid))
        finally:
            stop_worker(proc, 30)
            client.close()
    return Figures(idle, after, seconds, f"{load_before:.2f} → {os.getloadavg()[0]:.2f}")


def succeeded(client: Any) -> int:
    """Jobs in Succeeded in the client's storage."""
    return sum(n for (_, state), n in client.storage.count_jobs().items() if state == "Succeeded")


def row(config: Config, figures: Figures) -> str:
    """The table row of one worker's first round."""
    after = figures.rounds[0]
    return (f"{config.label}| {figures.idle:.1f} | {after['VmHWM']:.1f} | {after['VmRSS']:.1f} "
            f"| {after['RssAnon']:.1f} | {after['RssFile']:.1f} | {figures.seconds:.1f} "
            f"| {figures.load} |")


def growth(backends: list[str], jobs: int, rounds: int, scratch: Path) -> None:
    """Print each backend's VmRSS idle and after each of ``rounds`` rounds of ``jobs``."""
    heads = " | ".join(f"{jobs * (i + 1):,}" for i in range(rounds))
    print(f"\ngrowth: one worker per storage, {rounds} rounds of {jobs:,} jobs (VmRSS MiB)\n")
    print(f"| storage | idle | {heads} |\n|---|---|{'---|' * rounds}")
    for backend in backends:
        figures = measure(Config(backend), jobs, scratch, rounds)
        cells = " | ".join(f"{r['VmRSS']:.1f}" for r in figures.rounds)
        print(f"| {backend} | {figures.idle:.1f} | {cells} |", flush=True)


def configs(backends: list[str], wakeups: bool, asyncio: bool) -> list[Config]:
    rows = [Config(b) for b in backends]
    if wakeups:
        rows += [Config(b, wakeups=True) for b in backends if b != "postgres"]
    if asyncio:
        rows += [Config(b, pool="asyncio") for b in backends if b != "postgres"]
    return rows


def available(backend: str) -> bool:
    if backend == "redis":
        return answers("127.0.0.1", 6379)
    if backend == "postgres":
        return answers("127.0.0.1", 5432)
    return True


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--backends", default="sqlite,redis,postgres",
                        help="comma-separated: sqlite, redis, postgres")
    parser.add_argument("--jobs", type=int, default=10_000)
    parser.add_argument("--repeat", type=int, default=1)
    parser.add_argument("--no-wakeups", action="store_true",
                        help="skip the rows with wake-ups (kombu) on")
    parser.add_argument("--no-asyncio", action="store_true",
                        help="skip the rows of the asyncio pool")
    parser.add_argument("--cold", action="store_true",
                        help="no bytecode cache of this run's own, no warm-up")
    parser.add_argument("--warmup-jobs", type=int, default=200)
    parser.add_argument("--growth", type=int, default=5, metavar="ROUNDS",
                        help="then one worker per storage through ROUNDS rounds of --jobs "
                             "jobs, VmRSS after each (1: none)")
    args = parser.parse_args()
    backends = [b for b in args.backends.split(",") if b]
    for b in backends:
        if not available(b):
            print(f"note: {b} does not answer on loopback; skipped")
    backends = [b for b in backends if available(b)]
    import qmlkit

    print(f"command: {shlex.join([Path(sys.executable).name, *sys.argv])}")
    print(f"qmlkit: {Path(qmlkit.__file__).parent}; bytecode: "
          f"{'as the environment has it' if args.cold else 'cached, after a warm-up'}")
    rows = configs(backends, not args.no_wakeups, not args.no_asyncio)
    with tempfile.TemporaryDirectory(prefix="bench-memory-") as tmp:
        if not args.cold:
            CHILD_ENV.pop("PYTHONDONTWRITEBYTECODE", None)
            CHILD_ENV["PYTHONPYCACHEPREFIX"] = str(Path(tmp) / "pycache")
            for config in rows:  # compiles what each worker imports; not measured
                measure(config, args.warmup_jobs, Path(tmp))
            for _, code in FLOORS:
                floor(code)
        print(f"uptime: {uptime()}")
        print(f"\nworkers after {args.jobs:,} no-op jobs (MiB)\n")
        print("| storage | pool | wake-ups | idle VmRSS | VmHWM | VmRSS | RssAnon | RssFile "
              "| drain s | load avg |\n|---|---|---|---|---|---|---|---|---|---|")
        for _ in range(args.repeat):
            for config in rows:
                print(row(config, measure(config, args.jobs, Path(tmp))), flush=True)
        if args.growth > 1:
            growth(backends, args.jobs, args.growth, Path(tmp))
        print("\nimport-only floors, each in a fresh interpreter (VmHWM MiB)\n")
        print("| imports | VmHWM | over the bare interpreter |\n|---|---|---|")
        bare = floor("pass")
        for label, code in FLOORS:
            value = floor(code)
            print(f"| {label} | {value:.1f} | {value - bare:+.1f} |", flush=True)
    print(f"\nuptime: {uptime()}")


def uptime() -> str:
    return subprocess.run(["uptime"], capture_output=True, text=True).stdout.strip()

if __name__ == "__main__":
    main()
