"""`JobContext.cancelled`: an event whose truth is whether it is set, so the natural
``while not context.cancelled:`` loop of a cooperative job stops when it should."""

from __future__ import annotations

import threading

from qmlkit.processing.context import CancelEvent, JobContext
from qmlkit.testing import make_job, wait_until


def context() -> JobContext:
    return JobContext(job=make_job(), worker_id="w", server_name="s",
                      stopping=threading.Event())


def test_cancelled_is_false_until_set_then_true() -> None:
    ctx = context()
    assert isinstance(ctx.cancelled, CancelEvent) and isinstance(ctx.cancelled, threading.Event)
    assert not ctx.cancelled and not ctx.is_cancelled()
    ctx.cancelled.set()
    assert ctx.cancelled and ctx.cancelled.is_set() and ctx.is_cancelled()


def test_a_cooperative_loop_on_cancelled_runs_until_another_thread_sets_it() -> None:
    ctx, turns = context(), []

    def job() -> None:
        while not ctx.cancelled:
            turns.append(1)
            ctx.cancelled.wait(0.01)

    runner = threading.Thread(target=job)
    runner.start()
    wait_until(lambda: len(turns) >= 3 or not runner.is_alive(), timeout=30)
    assert runner.is_alive(), "the loop ended before cancellation (a truthy event)"
    ctx.cancelled.set()
    runner.join(timeout=10)
    assert not runner.is_alive() and len(turns) >= 3
