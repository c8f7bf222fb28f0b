"""Helpers for tests of qmlkit itself, of applications and of plugins."""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import Any, TypeVar

from qmlkit.job import Enqueued, Job, utcnow

T = TypeVar("T")


def wait_until(
    predicate: Callable[[], T], timeout: float = 10.0, interval: float = 0.01, message: str = ""
) -> T:
    """Poll ``predicate`` until it returns something truthy; return that.

    Args:
        predicate: Called repeatedly.
        timeout: Seconds before giving up.
        interval: Seconds between calls.
        message: Added to the error.

    Returns:
        The first truthy value.

    Raises:
        TimeoutError: ``timeout`` passed first; the message includes the last value.
    """
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if value:
            return value
        if time.monotonic() >= deadline:
            raise TimeoutError(f"condition not met within {timeout} s: {message} (last: {value!r})")
        time.sleep(interval)


def make_job(method: str = "tests.noop", **fields: Any) -> Job:
    """Build an Enqueued job with sensible defaults; ``fields`` override them."""
    now = utcnow()
    queue = fields.get("queue", "default")
    fields.setdefault("state", Enqueued(enqueued_at=fields.pop("enqueued_at", now), queue=queue))
    return Job(method=method, **fields)
