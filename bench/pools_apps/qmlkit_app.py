"""qmlkit for bench/pools.py: ``qmlkit worker qmlkit_app:app --pool P -c N``."""

from __future__ import annotations

import os
import sys

import stamp

from qmlkit import App

app = App("bench-pools", storage=os.environ.get("BENCH_QMLKIT_STORAGE", "memory://"))


@app.job(name="bench.wait_async")
async def wait_async() -> None:
    await stamp.wait_and_stamp_async()


@app.job(name="bench.wait_sync")
def wait_sync() -> None:
    stamp.wait_and_stamp_sync()


def enqueue(n: int, form: str) -> None:
    job = wait_async if form == "async" else wait_sync
    for start in range(0, n, 1000):
        job.enqueue_many([[] for _ in range(min(1000, n - start))])
    app.close()


if __name__ == "__main__":
    enqueue(int(sys.argv[1]), sys.argv[2])
