"""The app ``bench/memory.py`` runs: ``qmlkit worker memory_app:app --storage URL``.

It imports nothing but qmlkit, so the worker's memory is qmlkit's and its libraries'.
"""

from __future__ import annotations

import os

from qmlkit import App

app = App("bench-memory", storage=os.environ.get("BENCH_MEMORY_STORAGE", "memory://"),
          wakeup_url=os.environ.get("BENCH_MEMORY_WAKEUP") or None,
          wakeup_exchange=os.environ.get("BENCH_MEMORY_EXCHANGE", "qmlkit.wakeup"))


@app.job(name="bench.noop")
def noop() -> None:
    """Nothing: the attempt's own cost is what is measured."""


@app.job(name="bench.noop_async")
async def noop_async() -> None:
    """Nothing, on the asyncio pool."""
