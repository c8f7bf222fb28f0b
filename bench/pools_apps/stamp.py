"""The job every system runs in bench/pools.py: wait 100 ms, then stamp the drain in Redis.

One pipelined round trip at the job's end: ``SET first <start> NX``, ``SET last <end>``,
``INCR done`` under ``BENCH_KEYS`` (a prefix the driver empties before each run). The
rate is then done / (last - first): from the first start to the last end. Clients use a
blocking pool of at most 20 connections, so 2,000 jobs in flight do not open 2,000.
"""

from __future__ import annotations

import asyncio
import os
import time

WAIT_S = 0.1  #: each job's wait, seconds
URL = os.environ.get("BENCH_REDIS", "redis://127.0.0.1:6379/0")
KEYS = os.environ.get("BENCH_KEYS", "bench-pools:stamps:")
_async_clients: dict[int, object] = {}
_sync_client: list[object] = []


def _async_client():  # noqa: ANN202 - one client per event loop
    import redis.asyncio as aredis

    loop = asyncio.get_running_loop()
    client = _async_clients.get(id(loop))
    if client is None:
        pool = aredis.BlockingConnectionPool.from_url(URL, max_connections=20)
        client = _async_clients[id(loop)] = aredis.Redis(connection_pool=pool)
    return client


def _sync():  # noqa: ANN202
    import redis

    if not _sync_client:
        pool = redis.BlockingConnectionPool.from_url(URL, max_connections=20)
        _sync_client.append(redis.Redis(connection_pool=pool))
    return _sync_client[0]


async def wait_and_stamp_async() -> None:
    """``await asyncio.sleep(0.1)``, then the stamps (async client)."""
    start = time.time()
    await asyncio.sleep(WAIT_S)
    pipe = _async_client().pipeline(transaction=False)
    pipe.set(KEYS + "first", start, nx=True)
    pipe.set(KEYS + "last", time.time())
    pipe.incr(KEYS + "done")
    await pipe.execute()


def wait_and_stamp_sync() -> None:
    """``time.sleep(0.1)``, then the stamps (sync client)."""
    start = time.time()
    time.sleep(WAIT_S)
    pipe = _sync().pipeline(transaction=False)
    pipe.set(KEYS + "first", start, nx=True)
    pipe.set(KEYS + "last", time.time())
    pipe.incr(KEYS + "done")
    pipe.execute()
