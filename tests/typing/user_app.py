"""A user's module that must pass ``mypy --strict`` (tests/unit/test_typing.py)."""

from __future__ import annotations

import asyncio
from datetime import timedelta

from qmlkit import App, AsyncJobFunction, JobFailed, JobFunction, JobHandle

app = App("typed", storage="memory://")


@app.job
def add(a: int, b: int) -> int:
    return a + b


@app.job(queue="mail", max_retries=2)
def send(to: str, *, subject: str = "") -> dict[str, str]:
    return {"to": to, "subject": subject}


@app.job
async def fetch(url: str) -> bytes:
    await asyncio.sleep(0)
    return url.encode()


@app.job(name="typed.slow")
async def slow(n: int) -> list[int]:
    return list(range(n))


def use() -> int:
    handle: JobHandle[int] = add.enqueue(1, 2)
    total: int = handle.result(timeout=10) + 1
    sent = send.enqueue("a@example.com", subject="hi")
    subject: str = sent.result()["subject"]
    later = add.schedule(1, 2, delay=timedelta(seconds=5))
    many: list[JobHandle[int]] = add.enqueue_many([(1, 2), (3, 4)])
    job_id: str = handle  # a handle is a str
    rebuilt: JobHandle[int] = app.job_handle(job_id)
    direct: int = add(2, 3)
    state: str = later.state
    fetched: bytes = fetch.enqueue("https://example.com").result()
    function: JobFunction[[int, int], int] = add
    coroutine_function: AsyncJobFunction[[str], bytes] = fetch
    try:
        rebuilt.result(timeout=1)
    except JobFailed as exc:
        print(exc.exception_type, exc.message, exc.stack_trace)
    del function, coroutine_function
    return total + direct + len(subject) + len(many) + len(state) + len(fetched)


async def use_async() -> list[int]:
    handle = await slow.enqueue_async(3)
    numbers: list[int] = await handle.result_async(timeout=5)
    added = await add.enqueue_async(1, 1)
    other: int = await added.result_async()
    direct: list[int] = await slow(2)  # calling an async job returns its coroutine
    scheduled: JobHandle[int] = await add.schedule_async(1, 2, delay=1)
    by_name: JobHandle[object] = await app.enqueue_async("typed.slow", args=[1])
    del scheduled, by_name
    return [*numbers, other, *direct]
