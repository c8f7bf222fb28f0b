"""Run synchronous code on an event loop that may wait for a coroutine in the middle.

A sync middleware wraps an ``async def`` job in the asyncio pool: its ``call_next()``
must return the job's result, but the job is a coroutine that only the event loop can
run. `run_sync` runs the middleware in a greenlet on the loop's thread; when its
``call_next()`` calls `wait_for`, the greenlet switches back to the task, which awaits
the coroutine and switches in again with the result (or the exception). No thread is
held while the job waits. This is SQLAlchemy's ``greenlet_spawn``/``await_only``
technique, written on `greenlet` directly.
"""

from __future__ import annotations

import contextvars
import sys
from collections.abc import Awaitable, Callable
from typing import Any, TypeVar, cast

import greenlet

__all__ = ["run_sync", "wait_for"]

T = TypeVar("T")


class _Bridged(greenlet.greenlet):
    """A greenlet started by `run_sync`: the only kind `wait_for` may be called from."""


async def run_sync(fn: Callable[..., T], *args: Any) -> T:
    """Run ``fn(*args)`` on this thread; let it `wait_for` awaitables on this loop.

    Args:
        fn: Synchronous code (e.g. a middleware); it runs on the event loop's thread,
            so it must not block for long.
        args: Its arguments.

    Returns:
        What ``fn`` returned.

    Raises:
        BaseException: Whatever ``fn`` raised, unchanged.
    """
    child = _Bridged(fn, greenlet.getcurrent())
    child.gr_context = contextvars.copy_context()  # the task's context vars, e.g. the job's
    result = child.switch(*args)
    while not child.dead:  # it switched out to have ``result`` awaited
        try:
            value = await result
        except BaseException:  # handed to the greenlet, which decides
            result = child.throw(*sys.exc_info())
        else:
            result = child.switch(value)
    return cast(T, result)  # what ``fn`` returned, when the greenlet ended


def wait_for(awaitable: Awaitable[T]) -> T:
    """Wait, from code run by `run_sync`, for ``awaitable`` to be awaited on the loop.

    Returns:
        Its result.

    Raises:
        RuntimeError: Not called from code run by `run_sync`.
        BaseException: Whatever awaiting it raised.
    """
    current = greenlet.getcurrent()
    if not isinstance(current, _Bridged):
        raise RuntimeError("wait_for() called outside code run by run_sync()")
    parent = current.parent
    assert parent is not None  # run_sync made the task's greenlet its parent
    return cast(T, parent.switch(awaitable))  # run_sync switches in with its result
