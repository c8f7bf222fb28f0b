"""Dramatiq for bench/pools.py: ``dramatiq dramatiq_app --processes 1 --threads N`` (Redis
broker, a ``def`` actor: Dramatiq's worker threads)."""

from __future__ import annotations

import os
import sys

import dramatiq
import stamp
from dramatiq.brokers.redis import RedisBroker

broker = RedisBroker(url=os.environ.get("BENCH_REDIS", "redis://127.0.0.1:6379/0"),
                     namespace=os.environ.get("BENCH_PREFIX", "bench-pools:") + "dramatiq")
dramatiq.set_broker(broker)


@dramatiq.actor(queue_name="bench", max_retries=0)
def wait() -> None:
    stamp.wait_and_stamp_sync()


if __name__ == "__main__":
    for _ in range(int(sys.argv[1])):
        wait.send()
