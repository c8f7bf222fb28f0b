"""saq for bench/pools.py: ``saq saq_app.settings --workers 1`` (``concurrency`` from
``BENCH_CONCURRENCY``)."""

from __future__ import annotations

import asyncio
import os
import sys

import stamp
from saq import Queue

queue = Queue.from_url(os.environ.get("BENCH_REDIS", "redis://127.0.0.1:6379/0"),
                       name=os.environ.get("BENCH_PREFIX", "bench-pools:") + "saq")


async def wait(ctx: dict) -> None:
    await stamp.wait_and_stamp_async()


settings = {"queue": queue, "functions": [wait],
            "concurrency": int(os.environ.get("BENCH_CONCURRENCY", "10"))}


async def enqueue(n: int) -> None:
    await queue.connect()
    for _ in range(n):
        await queue.enqueue("wait")
    await queue.disconnect()


if __name__ == "__main__":
    asyncio.run(enqueue(int(sys.argv[1])))
