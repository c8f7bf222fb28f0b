"""Enqueue one by one and in bulk, two checkouts side by side, alternately.

Runs ``bench/run.py``'s ``bench_enqueue`` (the same calls: ``fn.enqueue(i)`` in a loop,
then ``fn.enqueue_many`` of 1,000 per call) in a fresh subprocess per measurement, with
``PYTHONPATH`` pointing at one checkout's ``qmlkit`` (and its qmlkit-redis), on a new
SQLite file and on Redis under a fresh key prefix (emptied afterwards). Prints wall
rates (jobs/s) and CPU per job (``time.process_time``, µs), with the load average,
for each round; checkouts alternate within a round. ``--backends`` adds ``postgres``
(PostgreSQL on 127.0.0.1:5432, database ``test``, a fresh schema per measurement,
dropped afterwards; the checkout's qmlkit-postgres on ``PYTHONPATH``).

    python bench/enqueue_ab.py --before /work/main --after . [--rounds 3]
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import uuid
from pathlib import Path

CHILD = r"""
import gc, json, sys, tempfile, time
from pathlib import Path
sys.path.insert(0, str(Path(sys.argv[1]) / "bench"))
from run import make_app
url, n_single, n_bulk = sys.argv[2], int(sys.argv[3]), int(sys.argv[4])
if url == "sqlite":
    url = f"sqlite:///{tempfile.mkdtemp()}/ab.db"
app = make_app(url)
noop = app.registry["noop"]
noop.enqueue(-1)  # open the storage and connections first
gc.collect()
t, c = time.perf_counter(), time.process_time()
for i in range(n_single):
    noop.enqueue(i)
single = (time.perf_counter() - t, time.process_time() - c)
t, c = time.perf_counter(), time.process_time()
for k in range(0, n_bulk, 1000):
    noop.enqueue_many([(i,) for i in range(k, min(k + 1000, n_bulk))])
bulk = (time.perf_counter() - t, time.process_time() - c)
app.close()
print(json.dumps({"single": n_single / single[0], "single_cpu_us": single[1] / n_single * 1e6,
                  "bulk": n_bulk / bulk[0], "bulk_cpu_us": bulk[1] / n_bulk * 1e6}))
"""


def measure(tree: Path, url: str, n_single: int, n_bulk: int) -> dict[str, float]:
    env = dict(os.environ, PYTHONPATH=f"{tree}:{tree / 'plugins/qmlkit-redis/src'}:"
                                     f"{tree / 'plugins/qmlkit-postgres/src'}")
    out = subprocess.run([sys.executable, "-c", CHILD, str(tree), url, str(n_single),
                          str(n_bulk)], env=env, capture_output=True, text=True, check=True)
    return json.loads(out.stdout.strip().splitlines()[-1])


def empty_redis(prefix: str) -> None:
    import redis

    client = redis.Redis(host="127.0.0.1", port=6379)
    keys = list(client.scan_iter(match=f"{prefix}*", count=1000))
    for start in range(0, len(keys), 500):
        client.delete(*keys[start:start + 500])
    client.close()


PG_URL = "postgresql://root@127.0.0.1:5432/test"


def drop_schema(name: str) -> None:
    import psycopg

    with psycopg.connect(PG_URL,
                         autocommit=True) as conn:
        conn.execute(f'DROP SCHEMA IF EXISTS "{name}" CASCADE')


def url_for(backend: str, token: str) -> str:
    """The storage URL of one measurement: its own SQLite file, key prefix or schema."""
    if backend == "sqlite":
        return "sqlite"
    if backend == "redis":
        return f"redis://127.0.0.1:6379/0?prefix=qmlkit-bench-ab:{token}:"
    return f"{PG_URL}?schema=bench_ab_{token}"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--before", type=Path, required=True)
    parser.add_argument("--after", type=Path, required=True)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--single", type=int, default=2000)
    parser.add_argument("--bulk", type=int, default=20000)
    parser.add_argument("--backends", default="sqlite,redis",
                        help="comma-separated: sqlite, redis, postgres")
    args = parser.parse_args()
    backends = args.backends.split(",")
    results: dict[tuple[str, str], list[dict[str, float]]] = {}
    for r in range(args.rounds):
        order = [("before", args.before), ("after", args.after)]
        if r % 2:
            order.reverse()
        for side, tree in order:
            for backend in backends:
                token = uuid.uuid4().hex[:8]
                url = url_for(backend, token)
                load = os.getloadavg()[0]
                try:
                    fig = measure(tree.resolve(), url, args.single, args.bulk)
                finally:
                    if backend == "redis":
                        empty_redis(f"qmlkit-bench-ab:{token}:")
                    elif backend == "postgres":
                        drop_schema(f"bench_ab_{token}")
                results.setdefault((side, backend), []).append(fig)
                print(f"round {r + 1} {side:6} {backend:6} load {load:4.2f}  "
                      f"single {fig['single']:8,.0f}/s ({fig['single_cpu_us']:6.1f} µs CPU)  "
                      f"bulk {fig['bulk']:8,.0f}/s ({fig['bulk_cpu_us']:5.1f} µs CPU)",
                      flush=True)
    print("\nmedians")
    for backend in backends:
        for key in ("single", "single_cpu_us", "bulk", "bulk_cpu_us"):
            b = statistics.median(f[key] for f in results[("before", backend)])
            a = statistics.median(f[key] for f in results[("after", backend)])
            print(f"{backend:6} {key:14} before {b:10,.1f}  after {a:10,.1f}  "
                  f"after/before {a / b:5.2f}")


if __name__ == "__main__":
    main()
