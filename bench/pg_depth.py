"""PostgreSQL drain rate against queue depth, on a table analyzed while empty (issue #16, item 3).

For each depth D (``--depths``, default 1,000, 10,000, 100,000 and 1,000,000): a fresh
schema in database ``test`` on 127.0.0.1:5432; the jobs table is created by qmlkit's
migrations, ``ANALYZE``d while empty, and its autovacuum switched off, so the planner's
statistics stay those of an empty table (what a burst into a fresh table meets until
autovacuum runs); then D jobs are enqueued with ``enqueue_many`` (chunks of 10,000), and
one ``qmlkit worker`` process (``--threads N``, the thread pool) is started with the CLI.
Every job stamps its start in Redis (``INCR``, ``SET first NX``, ``SET last`` in one
pipelined round trip, as the shared harness's job), and the rate is over the first
``--measure`` jobs (default 1,000 for the smallest depth, else 10,000): (n - 1) / (last
start - first start). The worker is then stopped and the schema dropped.

    .venv/bin/python bench/pg_depth.py [--depths 1000,10000,100000,1000000] [--threads 5]

Not a test: it prints one line per depth (jobs/s, ratio to the first depth, load
average) and the claim's plan on the filled table (``EXPLAIN`` of the claim statement).
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

import psycopg
import redis
from drainkit import rate, stop_worker, wait_for_done

PG = "host=127.0.0.1 port=5432 dbname=test"
PG_URL = "postgresql+psycopg://127.0.0.1:5432/test"
REDIS = "redis://127.0.0.1:6379/0"
PYTHON = Path(sys.executable)

APP = '''
import redis
from qmlkit import App
_r = redis.Redis.from_url("{redis}")
app = App("pgdepth", storage="{url}", wakeup_url=None)
@app.job(name="depth.stamp")
def stamp():
    import time
    now = time.time()
    p = _r.pipeline(transaction=False)
    p.set("{key}:first", now, nx=True)
    p.set("{key}:last", now)
    p.incr("{key}:done")
    p.execute()
'''


def one_depth(depth: int, measure: int, threads: int) -> tuple[float, str]:
    """Drain ``measure`` of ``depth`` queued jobs; returns (jobs/s, the claim's plan)."""
    schema = f"bench_depth_{uuid.uuid4().hex[:8]}"
    key = f"pgdepth:{schema}"
    url = f"{PG_URL}?schema={schema}"
    client = redis.Redis.from_url(REDIS)
    with psycopg.connect(PG, autocommit=True) as conn:
        conn.execute(f'CREATE SCHEMA "{schema}"')
    try:
        with tempfile.TemporaryDirectory() as tmp:
            folder = Path(tmp)
            module = f"depthapp_{schema[-8:]}"
            (folder / f"{module}.py").write_text(APP.format(redis=REDIS, url=url, key=key))
            env = {**os.environ, "PYTHONPATH": str(folder)}
            fill = (f"import {module} as m\nm.app.storage\n"  # migrate: the table exists
                    "import psycopg\n"
                    f"with psycopg.connect({PG!r}, autocommit=True) as c:\n"
                    f"    c.execute('ANALYZE \"{schema}\".qmlkit_jobs')\n"
                    f"    c.execute('ALTER TABLE \"{schema}\".qmlkit_jobs SET "
                    "(autovacuum_enabled = false)')\n"
                    f"for k in range(0, {depth}, 10000):\n"
                    f"    m.stamp.enqueue_many([[] for _ in range(min(10000, {depth} - k))])\n"
                    "m.app.close()\n")
            subprocess.run([str(PYTHON), "-c", fill], cwd=folder, env=env, check=True)
            plan = claim_plan(schema)
            proc = subprocess.Popen(
                [str(PYTHON), "-m", "qmlkit.cli", "--log-level", "WARNING", "worker",
                 f"{module}:app", "--threads", str(threads), "--wakeup", "none"],
                cwd=folder, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
            try:
                wait_for_done(client, key, measure, proc, f"depth {depth}")
                jobs_per_s = rate(client, key)
            finally:
                stop_worker(proc)
        return jobs_per_s, plan
    finally:
        for k in client.scan_iter(match=f"{key}*"):
            client.delete(k)
        with psycopg.connect(PG, autocommit=True) as conn:
            conn.execute("SET lock_timeout = '30s'")
            conn.execute(f'DROP SCHEMA IF EXISTS "{schema}" CASCADE')


def claim_plan(schema: str) -> str:
    """The top lines of ``EXPLAIN`` of the oldest-first pick the claim makes, as planned
    with the table's statistics (taken while it was empty)."""
    sql = (f'EXPLAIN SELECT id FROM "{schema}".qmlkit_jobs WHERE state = \'Enqueued\' '
           "AND queue = 'default' ORDER BY priority DESC, enqueued_at, id "
           "LIMIT 50 FOR UPDATE SKIP LOCKED")
    try:
        with psycopg.connect(PG, autocommit=True) as conn:
            conn.execute("SET enable_sort = off")  # as the claim's connections run
            conn.execute("SET enable_incremental_sort = off")
            rows = conn.execute(sql).fetchall()
        return " / ".join(r[0].strip() for r in rows[:3])
    except psycopg.Error as exc:  # the bench's own guess at the statement may not fit
        return f"(no plan: {exc.__class__.__name__}: {str(exc).splitlines()[0]})"


def main() -> None:
    """Parse the flags and print one line per depth."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--depths", default="1000,10000,100000,1000000")
    parser.add_argument("--threads", type=int, default=5)
    parser.add_argument("--measure", type=int, default=10_000)
    args = parser.parse_args()
    depths = [int(d) for d in args.depths.split(",")]
    print(f"PostgreSQL drain against depth, {time.strftime('%Y-%m-%d %H:%M:%S')} UTC, "
          f"qmlkit worker --threads {args.threads}, table analyzed while empty")
    base = None
    for depth in depths:
        measure = min(args.measure, depth)
        load = os.getloadavg()[0]
        rate, plan = one_depth(depth, measure, args.threads)
        base = base or rate
        print(f"  {depth:>9,} queued: {rate:8,.0f} jobs/s over the first {measure:,}  "
              f"{rate / base:5.2f}x  load(1m) {load:.2f}\n      plan: {plan}", flush=True)


if __name__ == "__main__":
    main()
