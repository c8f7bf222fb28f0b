"""The `Pool` protocol a server composes, and `PoolParts`, what a pool is built from."""

from __future__ import annotations

import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Protocol

if TYPE_CHECKING:
    from qmlkit.processing.idle import IdleGate
    from qmlkit.processing.processor import JobProcessor
    from qmlkit.processing.runtime import Runtime
    from qmlkit.processing.watchdog import Watchdog

__all__ = ["Pool", "PoolParts", "any_alive", "join_all"]


@dataclass(frozen=True)
class PoolParts:
    """Everything a pool needs from its server, and nothing more.

    Attributes:
        runtime: The server as a duty sees it (storage, config, claims, stopping,
            notify, store_outcomes, release).
        processor: Runs one attempt and returns its outcome.
        idle: The server's idle gate (wake-ups reach the pool's claimers through it).
        watchdog: Marks attempts past their timeout (``timed_out``, ``cancelled``).
        server_name: Stamped on claims: the server id when registered, else its name.
        observed: Whether state-change observers listen (claims are then reported).
        wakeups_live: Whether wake-ups arrive now (idle claimers then share one poll).
    """

    runtime: Runtime
    processor: JobProcessor
    idle: IdleGate
    watchdog: Watchdog
    server_name: str
    observed: bool
    wakeups_live: Callable[[], bool]


class Pool(Protocol):
    """What a server asks of its pool. Claims and attempts are recorded in the server's
    ``ClaimLedger``, so the server itself releases unstarted and running claims; the
    pool only runs and stops its own threads.

    Attributes:
        name: ``"threads"`` or ``"asyncio"`` (``ServerConfig.pool``).
        size: Slots: the most attempts it runs at once (``ServerConfig.worker_count``).
    """

    name: str
    size: int

    def start(self) -> None:
        """Start claiming and running; returns at once."""

    def busy(self) -> int:
        """Slots running an attempt now, 0 to ``size``."""

    def alive(self) -> bool:
        """Whether any of the pool's threads still runs (it has attempts to finish)."""

    def join(self, timeout_s: float) -> None:
        """Wait up to ``timeout_s`` seconds for the pool's threads to end.

        They end once the server's ``stopping`` event is set and every started attempt
        has ended and its outcome is stored.
        """

    def abort(self) -> None:
        """Stop waiting for running attempts: cancel what can be cancelled (asyncio
        tasks). The server has already released them; their outcomes are stale."""


def any_alive(threads: Sequence[threading.Thread]) -> bool:
    """Whether any of ``threads`` still runs (`Pool.alive` of a pool of threads)."""
    return any(t.is_alive() for t in threads)


def join_all(threads: Sequence[threading.Thread], timeout_s: float) -> None:
    """Wait up to ``timeout_s`` seconds in all (not each) for ``threads`` to end
    (`Pool.join` of a pool of threads); returns early once all have ended."""
    deadline = time.monotonic() + timeout_s
    for thread in threads:
        thread.join(max(0.0, deadline - time.monotonic()))
