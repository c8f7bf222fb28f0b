"""`LoopWatch`: names the job that blocks the asyncio pool's event loop.

Blocking code in an ``async def`` job (``time.sleep``, a synchronous HTTP or database
call, a long CPU loop) stops every other attempt on the loop: their timeouts pass, their
awaits do not return, and nothing says why. The pool's loop beats every
`qmlkit.processing.pools.asyncio.SWEEP_S`; a thread of the watch's own checks the beat
and, once the loop has not beaten for `BLOCKED_S`, logs one WARNING naming the task the
loop is running (the attempt's job id and name, read from another thread with
``asyncio.current_task(loop)``), and one more line when the loop runs again, with how
long it went without a beat. asyncio's debug mode reports slow callbacks the same way, after the
fact and at a cost on every callback; this costs one wake-up of a sleeping thread every
`CHECK_S`.
"""

from __future__ import annotations

import asyncio
import logging
import threading
import time
from collections.abc import Callable

__all__ = ["BLOCKED_S", "CHECK_S", "LoopWatch"]

log = logging.getLogger("qmlkit.processing.server")

#: How long the loop may go without a beat before the watch says it is blocked, seconds.
BLOCKED_S = 2.0
#: How often the watch's thread looks at the beat, seconds.
CHECK_S = 0.25


class LoopWatch:
    """Reports an event loop blocked for `BLOCKED_S` or more (see the module's text).

    Args:
        loop: The pool's event loop.
        describe: Given the task the loop runs (or ``None`` when it runs a plain
            callback), returns what to call it in the log, e.g. ``"job 0193… (fetch)"``;
            called on the watch's thread, so it must only read.
        name: The watch thread's name.
    """

    def __init__(self, loop: asyncio.AbstractEventLoop,
                 describe: Callable[[asyncio.Task[object] | None], str],
                 name: str = "qmlkit-asyncio-loopwatch") -> None:
        self._loop = loop
        self._describe = describe
        self._beat = time.monotonic()
        self._blocked_by: str | None = None  # watch thread only: a block being reported
        self._blocked_since = 0.0  # watch thread only: the last beat before that block
        self._done = threading.Event()
        self.blocks = 0  #: blocks reported so far (tests)
        self.thread = threading.Thread(target=self._run, name=name, daemon=True)

    def start(self) -> None:
        """Start the watch's thread."""
        self._beat = time.monotonic()
        self.thread.start()

    def beat(self) -> None:
        """Say the loop runs (on the loop's thread, every `SWEEP_S` at most)."""
        self._beat = time.monotonic()

    def stop(self) -> None:
        """End the watch's thread (at once; it is a daemon)."""
        self._done.set()

    def _run(self) -> None:
        while not self._done.wait(CHECK_S):
            silent = time.monotonic() - self._beat
            if silent >= BLOCKED_S and self._blocked_by is None:
                self.blocks += 1
                self._blocked_since = self._beat
                self._blocked_by = self._describe(asyncio.current_task(self._loop))
                log.warning(
                    "asyncio pool: the event loop has been blocked for %.1f s, running %s: "
                    "blocking code in an async def job (time.sleep, a synchronous client, "
                    "a long computation) stalls every attempt on the loop and lets their "
                    "timeouts pass; make it a def job, or await it in a thread "
                    "(asyncio.to_thread)", silent, self._blocked_by)
            elif silent < BLOCKED_S and self._blocked_by is not None:
                log.warning("asyncio pool: the event loop runs again after %.1f s without a "
                            "beat (blocked by %s)", self._beat - self._blocked_since,
                            self._blocked_by)
                self._blocked_by = None
