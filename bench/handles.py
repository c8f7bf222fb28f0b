"""What job handles cost: making them in bulk enqueue, and waiting on 1,000 at once.

* CPU per job of ``fn.enqueue_many`` of 1,000 jobs (``time.process_time``), and the
  time to make 1,000 handles (`qmlkit.handle.handles`), medians of ``--repeat`` runs:
  the handles' share of a bulk enqueue.
* Storage reads while 1,000 handles of Scheduled jobs are awaited at once for
  ``--wait`` seconds (``result_async``, all timing out): ``job_states`` and
  ``get_many`` calls, ids read, and the most reads of one job.

    python bench/handles.py [--repeat 15] [--wait 1.0]
"""

from __future__ import annotations

import argparse
import asyncio
import gc
import statistics
import tempfile
import time
from collections import Counter
from typing import Any

from qmlkit import App
from qmlkit.handle import handles


def handle_share(url: str, repeat: int) -> tuple[float, float]:
    app = App("bench", storage=url, autoload=False)
    fn = app.job(name="noop")(lambda i: None)
    fn.enqueue(0)
    per_job, per_handle = [], []
    for _ in range(repeat):
        calls = [(i,) for i in range(1000)]
        gc.collect()
        start = time.process_time()
        fn.enqueue_many(calls)
        per_job.append((time.process_time() - start) / 1000 * 1e6)
        ids = [f"{i:036d}" for i in range(1000)]
        start = time.perf_counter()
        for _ in range(20):
            handles(ids, app)
        per_handle.append((time.perf_counter() - start) / 20_000 * 1e6)
    app.close()
    return statistics.median(per_job), statistics.median(per_handle)


def waiting_reads(url: str, wait_s: float) -> Counter[str]:
    app = App("bench", storage=url, autoload=False)
    fn = app.job(name="later")(lambda i: i)
    later = [fn.schedule(i, delay=3600) for i in range(1000)]
    store: Any = app.storage
    calls: Counter[str] = Counter()

    def counted(name: str, read: Any) -> Any:
        def call(ids: list[str]) -> Any:
            calls[f"{name} calls"] += 1
            calls["ids read"] += len(ids)
            for job_id in ids:
                calls[job_id] += 1
            return read(ids)
        return call

    store.get_many = counted("get_many", store.get_many)
    store.job_states = counted("job_states", store.job_states)

    async def main() -> None:
        await asyncio.gather(*(h.result_async(timeout=wait_s) for h in later),
                             return_exceptions=True)

    asyncio.run(main())
    app.close()
    most = max(calls[h] for h in later)
    return Counter({"job_states calls": calls["job_states calls"],
                    "get_many calls": calls["get_many calls"], "ids read": calls["ids read"],
                    "most reads of one job": most})


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeat", type=int, default=15)
    parser.add_argument("--wait", type=float, default=1.0)
    args = parser.parse_args()
    for name in ("memory", "sqlite"):
        url = "memory://" if name == "memory" else f"sqlite:///{tempfile.mkdtemp()}/h.db"
        job_us, handle_us = handle_share(url, args.repeat)
        print(f"{name:7} bulk enqueue {job_us:6.2f} µs CPU/job; a handle {handle_us:5.3f} µs "
              f"({handle_us / job_us * 100:.1f} %)")
        url = "memory://" if name == "memory" else f"sqlite:///{tempfile.mkdtemp()}/w.db"
        print(f"{name:7} 1,000 handles awaited {args.wait:g} s: "
              f"{dict(waiting_reads(url, args.wait))}")


if __name__ == "__main__":
    main()
