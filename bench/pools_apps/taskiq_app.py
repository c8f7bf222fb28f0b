"""taskiq for bench/pools.py: ``taskiq worker taskiq_app:broker --workers 1 --max-async-tasks N``
(taskiq-redis ``ListQueueBroker``; no result backend)."""

from __future__ import annotations

import asyncio
import os
import sys

import stamp
from taskiq_redis import ListQueueBroker

broker = ListQueueBroker(os.environ.get("BENCH_REDIS", "redis://127.0.0.1:6379/0"),
                         queue_name=os.environ.get("BENCH_PREFIX", "bench-pools:") + "taskiq")


@broker.task(task_name="bench.wait")
async def wait() -> None:
    await stamp.wait_and_stamp_async()


async def enqueue(n: int) -> None:
    await broker.startup()
    for _ in range(n):
        await wait.kiq()
    await broker.shutdown()


if __name__ == "__main__":
    asyncio.run(enqueue(int(sys.argv[1])))
