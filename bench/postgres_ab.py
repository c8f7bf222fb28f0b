"""PostgreSQL enqueue and drain, two checkouts side by side, alternately (issue #13).

Runs ``bench/run.py``'s ``bench_enqueue`` (2,000 one by one, then ``--jobs`` in bulk of
1,000 per call) and ``bench_drain`` (``--jobs`` no-op jobs, 1 and 8 worker threads, in
process) of each checkout with that checkout's own ``.venv/bin/python`` and working
directory (so its own ``qmlkit`` and ``qmlkit_postgres`` are imported), one fresh
subprocess and one fresh schema of database ``test`` on 127.0.0.1:5432 per measurement
(dropped afterwards). The order of the two checkouts alternates round by round. Prints,
per figure, the medians, after / before, and every run, then the 1-minute load average
seen after each round. The drain's CPU figure is the process's ``time.process_time()``
per job (enqueue included, so compare, do not read it as the drain's alone).

    .venv/bin/python bench/postgres_ab.py --before ../qmlkit-bc4ce2b --after . [--rounds 6]
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import uuid
from pathlib import Path

BASE = "postgresql+psycopg://127.0.0.1:5432/test"

CHILD = r"""
import json, sys, time
sys.path.insert(0, "bench")
from run import bench_drain, bench_enqueue
what, url, n = sys.argv[1], sys.argv[2], int(sys.argv[3])
cpu = time.process_time()
if what == "enqueue":
    single, bulk = bench_enqueue(url, 2000, n)
    print(json.dumps({"enqueue one by one": single, "enqueue bulk": bulk}))
else:
    threads = int(what.removeprefix("drain"))
    rate = bench_drain(url, n, threads)
    print(json.dumps({f"drain, {threads} thread(s)": rate,
                      f"drain, {threads} thread(s), CPU us/job":
                          (time.process_time() - cpu) / n * 1e6}))
"""


def measure(tree: Path, what: str, jobs: int) -> dict[str, float]:
    """One measurement in a fresh subprocess of ``tree``'s venv, on a schema of its own."""
    schema = f"bench_ab_{uuid.uuid4().hex[:8]}"
    try:
        out = subprocess.run(
            [str(tree / ".venv/bin/python"), "-c", CHILD, what, f"{BASE}?schema={schema}",
             str(jobs)], cwd=tree, capture_output=True, text=True, check=True)
        return json.loads(out.stdout.strip().splitlines()[-1])
    finally:
        subprocess.run(["psql", "-h", "127.0.0.1", "-d", "test", "-qc",
                        f'DROP SCHEMA IF EXISTS "{schema}" CASCADE'], capture_output=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--before", type=Path, required=True)
    parser.add_argument("--after", type=Path, required=True)
    parser.add_argument("--rounds", type=int, default=6)
    parser.add_argument("--jobs", type=int, default=10_000)
    parser.add_argument("--figures", default="enqueue,drain1,drain8",
                        help="comma-separated: enqueue, drain1, drain8")
    args = parser.parse_args()
    trees = [args.before.resolve(), args.after.resolve()]
    runs: dict[Path, dict[str, list[float]]] = {tree: {} for tree in trees}
    loads = []
    for round_no in range(args.rounds):
        for what in args.figures.split(","):
            for tree in trees if round_no % 2 == 0 else trees[::-1]:
                for key, value in measure(tree, what, args.jobs).items():
                    runs[tree].setdefault(key, []).append(value)
        loads.append(os.getloadavg()[0])
    before, after = (runs[tree] for tree in trees)
    print(f"{'figure':<38}{'before':>10}{'after':>10}{'ratio':>8}   runs before | after")
    for key in before:
        b, a = statistics.median(before[key]), statistics.median(after[key])
        print(f"{key:<38}{b:>10,.1f}{a:>10,.1f}{a / b:>7.2f}x   "
              f"{' '.join(f'{x:,.0f}' for x in before[key])} | "
              f"{' '.join(f'{x:,.0f}' for x in after[key])}")
    print(f"\nload average (1 min) after each round: {', '.join(f'{x:.2f}' for x in loads)}")


if __name__ == "__main__":
    main()
