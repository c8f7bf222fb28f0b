"""I/O-bound drain through qmlkit's pools and peers (issue #14): jobs that wait 100 ms.

For each system and each number in flight: ``--jobs`` jobs are enqueued, then ONE
worker process is started with the system's own CLI (``qmlkit worker qmlkit_app:app
--pool asyncio -c 500``, ``taskiq worker``, ``saq``, ``dramatiq``) and drains them.
Every system runs the same job (`bench/pools_apps/stamp.py`): wait 100 ms (``await
asyncio.sleep`` or ``time.sleep``, the system's natural form) and count it in the
worker process's memory, which a thread of that process writes to Redis every 20 ms.
Reported:

- ``jobs/s``: done / (last end - first start), so the worker's start-up is left out;
- ``% of ceiling``: of ``in_flight / 0.1 s``, the rate with every slot always busy;
- ``VmHWM MiB``: peak RSS of the worker process and its children, summed, from the
  kernel's ``/proc/PID/status``;
- ``CPU ms/job``: the CPU time (``time.process_time()``: utime + stime of every thread)
  of each worker process that ran jobs, from its first job's start to its last job's
  end, summed, per job: the drain's cost without the start-up's imports;
- the 1-minute load average (``/proc/loadavg``) before and after each run.

Storage: Redis on 127.0.0.1:6379 for every system (qmlkit through qmlkit-redis).
qmlkit runs from this checkout's ``.venv``; the peers from ``.venv-bench`` (``python3 -m
venv .venv-bench && .venv-bench/bin/pip install taskiq taskiq-redis saq
'dramatiq[redis]'``); a peer whose venv is missing is skipped.

    .venv/bin/python bench/pools.py                                  # all, 500 and 2,000
    .venv/bin/python bench/pools.py --systems qmlkit-asyncio,qmlkit-threads --in-flight 10,100
"""

from __future__ import annotations

import argparse
import os
import signal
import subprocess
import sys
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import redis

HERE = Path(__file__).resolve().parent
APPS = HERE / "pools_apps"
ROOT = HERE.parent
QMLKIT_PY = ROOT / ".venv" / "bin" / "python"
PEERS_BIN = ROOT / ".venv-bench" / "bin"
REDIS_URL = "redis://127.0.0.1:6379/0"
WAIT_S = 0.1


@dataclass(frozen=True)
class System:
    """How to enqueue for, and start the worker of, one system at ``c`` in flight."""

    name: str
    python: Path
    enqueue: Callable[[int], list[str]]  # argv after the python, for n jobs
    worker: Callable[[int], list[str]]  # argv, for c in flight
    how: str  # what "in flight" means for it


def _qmlkit(pool: str, form: str) -> System:
    return System(
        f"qmlkit-{pool}", QMLKIT_PY,
        lambda n: [str(APPS / "qmlkit_app.py"), str(n), form],
        lambda c: [str(QMLKIT_PY), "-m", "qmlkit.cli", "--log-level", "WARNING", "worker",
                   "qmlkit_app:app", "--pool", pool, "-c", str(c), "--shutdown-timeout", "30"],
        f"`qmlkit worker --pool {pool} -c N`, `{form} def` job, qmlkit-redis storage")


SYSTEMS = {
    "qmlkit-asyncio": _qmlkit("asyncio", "async"),
    "qmlkit-threads": _qmlkit("threads", "sync"),
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

    def row(self) -> str:
        ceiling = self.in_flight / WAIT_S
        lost = "" if self.done == self.jobs else f" ({self.jobs - self.done} missing)"
        return (f"| {self.system} | {self.in_flight:,} | {self.jobs:,}{lost} | {self.rate:,.0f} "
                f"| {100 * self.rate / ceiling:.0f} % | {self.hwm_mib:.0f} "
                f"| {self.cpu_ms_per_job:.2f} | {self.load_before} → {self.load_after} |")


HEADER = ("| system | in flight | jobs | jobs/s | % of ceiling | worker VmHWM MiB "
          "| worker CPU ms/job | load avg before → after |\n|---|---|---|---|---|---|---|---|")


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


def stamps(client: redis.Redis, keys: str) -> tuple[float, float, int, float]:
    """(first start, last end, jobs done, CPU seconds between), over every worker
    process's hash."""
    rows = [client.hgetall(key) for key in client.scan_iter(match=f"{keys}proc:*")]
    if not rows:
        return 0.0, 0.0, 0, 0.0
    return (min(float(r[b"first"]) for r in rows), max(float(r[b"last"]) for r in rows),
            sum(int(r[b"done"]) for r in rows),
            sum(float(r[b"cpu_last"]) - float(r[b"cpu_first"]) for r in rows))


def run_one(system: System, in_flight: int, jobs: int, timeout_s: float) -> Result:
    """Enqueue every job, then start the worker and wait for the drain."""
    client = redis.Redis.from_url(REDIS_URL)
    run = uuid.uuid4().hex[:8]
    prefix, keys = f"bench-pools:{run}:", f"bench-pools:{run}:stamps:"
    env = {**os.environ, "PYTHONPATH": str(APPS), "BENCH_REDIS": REDIS_URL,
           "BENCH_KEYS": keys, "BENCH_PREFIX": prefix, "BENCH_CONCURRENCY": str(in_flight),
           "BENCH_QMLKIT_STORAGE": f"{REDIS_URL}?prefix={prefix}q:"}
    subprocess.run([str(system.python), *system.enqueue(jobs)], env=env, cwd=APPS, check=True)
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
        err.close()
    first, last, done, cpu = stamps(client, keys)
    empty(client, prefix)
    client.close()
    rate = done / (last - first) if last > first else 0.0
    return Result(system.name, in_flight, jobs, done, rate, hwm, 1000 * cpu / max(done, 1),
                  load_before, load_after)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--systems", default=",".join(SYSTEMS), help="comma-separated")
    parser.add_argument("--jobs", type=int, default=2000)
    parser.add_argument("--in-flight", default="500,2000", help="comma-separated")
    parser.add_argument("--repeat", type=int, default=1)
    parser.add_argument("--timeout", type=float, default=120.0, help="seconds per drain")
    args = parser.parse_args()
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
