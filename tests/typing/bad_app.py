"""A user's module ``mypy --strict`` must reject, line by line (tests/unit/test_typing.py).

Each wrong line ends with ``# E: <error code>``; the test checks that mypy reports
exactly those lines with those codes.
"""

from __future__ import annotations

from qmlkit import App

app = App("typed", storage="memory://")


@app.job
def add(a: int, b: int) -> int:
    return a + b


@app.job(queue="q")
async def fetch(url: str) -> bytes:
    return url.encode()


def wrong() -> None:
    add.enqueue("a", 2)  # E: arg-type
    add.enqueue(1)  # E: call-arg
    add.enqueue(1, 2, c=3)  # E: call-arg
    text: str = add.enqueue(1, 2).result()  # E: assignment
    add.enqueue(1, 2).result().upper()  # E: attr-defined
    data: str = fetch.enqueue("u").result()  # E: assignment
    fetch.enqueue(b"u")  # E: arg-type
    del text, data


async def wrong_async() -> None:
    handle = await add.enqueue_async(1, "2")  # E: arg-type
    value: bytes = await add.enqueue(1, 2).result_async()  # E: assignment
    del handle, value
