"""Worker-thread stalls (issue #16 item 7): gaps between a free thread's claim and its start.

For each backend and thread count, ``--runs`` short drains: ``--jobs`` jobs are enqueued,
then ONE ``qmlkit --log-level WARNING worker stalls_app:app --threads N`` process drains
them. The job is the peers harness's (one pipelined Redis round trip, lazily created shared
client; `bench/stalls_apps/stalls_app.py`), and each attempt writes its worker id, its
claim's stamp, its start and its end. Per attempt, the *gap* is the time its thread was
free but not running it:

- the first attempt of a batch (same worker, same claim stamp): start - claim stamp (the
  stamp is read before the claim's storage call, so the gap includes the claim itself);
- a later attempt of the batch: start - the previous attempt's end on that thread.

Attempts that waited behind earlier jobs of their batch are thus not counted as stalls.
Printed per backend and thread count: drains, attempts, the gap p50/p99/max in ms, and
every gap over ``--threshold-ms`` (default 100) with its run, worker and position; also
the longest attempt (start to end) and the 1-minute load average before and after.

The job's shared Redis client is created under a lock; ``--racy-client`` creates it as the
peers harness does, without one, which reproduces the 5 s stall of issue #16 item 7 (see
`bench/stalls_apps/stalls_app.py` and `bench/redis_client_race.py`). Printed also: the
attempts that took over 1 s (the stall is inside the job).

If a drain stops advancing for ``--spy-after`` seconds before it is done, ``py-spy dump``
of the worker is printed (when py-spy is installed in this venv).

    .venv/bin/python bench/stalls.py                                   # 3 backends, 5 and 8 threads
    .venv/bin/python bench/stalls.py --backends sqlite --threads 8 --runs 20 --jobs 500
    .venv/bin/python bench/stalls.py --backends redis --threads 8 --runs 40 --jobs 300 --racy-client

Services: Redis 127.0.0.1:6379 (stamps, the job's round trip, qmlkit-redis under a prefix
of its own per run), PostgreSQL 127.0.0.1:5432 db ``test`` (a schema per run, dropped
after), SQLite in a temporary folder.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import shutil
import subprocess
import sys
import tempfile
import time
import uuid
from pathlib import Path

import redis
from drainkit import stop_worker

HERE = Path(__file__).resolve().parent
APPS = HERE / "stalls_apps"
BIN = Path(sys.executable).parent
PG = "postgresql://127.0.0.1:5432/test"


def loadavg() -> str:
    """The 1-minute load average, as ``/proc/loadavg`` prints it."""
    return Path("/proc/loadavg").read_text().split()[0]


def storage_url(backend: str, run: str, scratch: Path) -> str:
    """The storage URL of one run: its own SQLite file, Redis prefix or PostgreSQL schema."""
    if backend == "sqlite":
        return f"sqlite:///{scratch}/{run}.db"
    if backend == "redis":
        return f"redis://127.0.0.1:6379/0?prefix=stalls-{run}:"
    if backend == "postgres":
        return f"{PG}?schema=stalls_{run}"
    raise ValueError(backend)


def cleanup(backend: str, run: str, client: redis.Redis) -> None:
    """Drop what one run left: its Redis keys, its PostgreSQL schema."""
    for key in client.scan_iter(f"stalls-{run}:*", count=1000):
        client.delete(key)
    for key in client.scan_iter(f"stalls:{run}:*"):
        client.delete(key)
    if backend == "postgres":
        import psycopg
        with psycopg.connect("host=127.0.0.1 dbname=test", autocommit=True) as c:
            c.execute(f"DROP SCHEMA IF EXISTS stalls_{run} CASCADE")


def spy(pid: int) -> None:
    """Print ``py-spy dump`` of ``pid`` (every thread's stack), if py-spy is installed."""
    exe = BIN / "py-spy"
    if exe.exists():
        out = subprocess.run([str(exe), "dump", "--pid", str(pid)], capture_output=True,
                             text=True, timeout=30)
        print(out.stdout + out.stderr, flush=True)
    if os.environ.get("STALLS_FDS"):
        for task in Path(f"/proc/{pid}/task").iterdir():
            with contextlib.suppress(OSError):
                print(f"  task {task.name} {(task / 'comm').read_text().strip()}: "
                      f"syscall {(task / 'syscall').read_text().strip()[:60]}")
        fds = Path(f"/proc/{pid}/fd")
        for fd in sorted(fds.iterdir(), key=lambda p: int(p.name)):
            with contextlib.suppress(OSError):
                print(f"  fd {fd.name} -> {os.readlink(fd)}")
        print(subprocess.run(["ss", "-tnpi"], capture_output=True, text=True).stdout[-6000:])


def drain(backend: str, threads: int, jobs: int, scratch: Path, client: redis.Redis,
          spy_after_s: float, timeout_s: float,
          racy: bool = False) -> list[tuple[str, float, float, float]]:
    """One drain; returns the attempts ``(worker id, claim stamp, start, end)``, seconds.
    ``racy``: the job's shared client is created without a lock (``--racy-client``)."""
    run = uuid.uuid4().hex[:10]
    out = scratch / f"{run}.txt"
    env = dict(os.environ, STALLS_STORAGE=storage_url(backend, run, scratch),
               STALLS_OUT=str(out), STALLS_PREFIX=f"stalls:{run}:",
               STALLS_RACY_CLIENT="1" if racy else "0", PYTHONPATH=str(APPS))
    if backend == "postgres":
        import psycopg
        with psycopg.connect("host=127.0.0.1 dbname=test", autocommit=True) as c:
            c.execute(f"CREATE SCHEMA IF NOT EXISTS stalls_{run}")
    try:
        subprocess.run([sys.executable, str(APPS / "stalls_app.py"), str(jobs)], env=env,
                       check=True, cwd=APPS)
        worker = subprocess.Popen([str(BIN / "qmlkit"), "--log-level", "WARNING", "worker",
                                   "stalls_app:app", "--threads", str(threads)],
                                  env=env, cwd=APPS)
        try:
            done, moved, spied = 0, time.monotonic(), False
            deadline = time.monotonic() + timeout_s
            while done < jobs and time.monotonic() < deadline:
                time.sleep(0.02)
                now_done = int(client.get(f"stalls:{run}:done") or 0)
                if now_done != done:
                    done, moved = now_done, time.monotonic()
                elif not spied and time.monotonic() - moved > spy_after_s:
                    print(f"  run {run}: stuck at {done}/{jobs} for {spy_after_s} s; py-spy:",
                          flush=True)
                    spy(worker.pid)
                    spied = True
        finally:
            stop_worker(worker, 20)
        rows = []
        for line in out.read_text().splitlines():
            w, c, s, e = line.split()
            rows.append((w, float(c), float(s), float(e)))
        return rows
    finally:
        cleanup(backend, run, client)


def gaps(rows: list[tuple[str, float, float, float]]) -> list[tuple[float, str, int, str]]:
    """Each attempt's gap: ``(seconds, worker id, index in its batch, what it is after)``."""
    found = []
    by_worker: dict[str, list[tuple[float, float, float]]] = {}
    for w, c, s, e in rows:
        by_worker.setdefault(w, []).append((c, s, e))
    for w, attempts in by_worker.items():
        attempts.sort(key=lambda a: a[1])
        prev_claim, prev_end, index = None, 0.0, 0
        for c, s, e in attempts:
            if c != prev_claim:
                found.append((s - c, w, 0, "claim"))
                index = 0
            else:
                index += 1
                found.append((s - prev_end, w, index, "previous end"))
            prev_claim, prev_end = c, e
    return found


def pct(ordered: list[float], q: float) -> float:
    """The ``q`` quantile (0 to 1) of ``ordered`` (sorted, not empty)."""
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))]


def main() -> None:
    """Run the drains and print the figures."""
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--backends", default="sqlite,redis,postgres")
    ap.add_argument("--threads", default="5,8")
    ap.add_argument("--runs", type=int, default=5)
    ap.add_argument("--jobs", type=int, default=1000)
    ap.add_argument("--threshold-ms", type=float, default=100.0)
    ap.add_argument("--spy-after", type=float, default=3.0)
    ap.add_argument("--timeout", type=float, default=60.0)
    ap.add_argument("--racy-client", action="store_true",
                    help="create the job's shared Redis client without a lock, as the peers "
                         "harness does (reproduces the 5 s stall)")
    args = ap.parse_args()
    client = redis.Redis(host="127.0.0.1", port=6379, db=0)
    scratch = Path(tempfile.mkdtemp(prefix="qmlkit-stalls-"))
    print(f"load average (1 min) before: {loadavg()}")
    try:
        for backend in args.backends.split(","):
            for threads in (int(t) for t in args.threads.split(",")):
                all_gaps: list[float] = []
                over: list[str] = []
                longest = 0.0
                attempts = slow = 0
                for r in range(args.runs):
                    rows = drain(backend, threads, args.jobs, scratch, client,
                                 args.spy_after, args.timeout, args.racy_client)
                    attempts += len(rows)
                    longest = max([longest] + [e - s for _, _, s, e in rows])
                    slow += sum(1 for _, _, s, e in rows if e - s > 1.0)
                    for g, w, i, after in gaps(rows):
                        all_gaps.append(g)
                        if g * 1000 > args.threshold_ms:
                            over.append(f"    run {r}: {w} attempt {i} of its batch: "
                                        f"{g * 1000:.0f} ms after its {after}")
                all_gaps.sort()
                p50, p99 = (pct(all_gaps, q) * 1000 for q in (0.5, 0.99))
                print(f"{backend:8} threads={threads}: {args.runs} drains, {attempts} attempts, "
                      f"gap p50 {p50:.2f} ms, p99 {p99:.2f} ms, "
                      f"max {all_gaps[-1] * 1000:.1f} ms"
                      f"; {len(over)} over {args.threshold_ms:.0f} ms; longest attempt "
                      f"{longest * 1000:.1f} ms, {slow} attempts over 1 s"
                      f"{' (racy client)' if args.racy_client else ''}; load {loadavg()}",
                      flush=True)
                for line in over:
                    print(line, flush=True)

    finally:
        shutil.rmtree(scratch, ignore_errors=True)
    print(f"load average (1 min) after: {loadavg()}")


if __name__ == "__main__":
    main()
