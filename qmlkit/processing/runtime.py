"""``Runtime``: what a background duty may ask of the server it runs in, and nothing more.

A duty (``qmlkit.processing.duties``) receives a ``Runtime`` and never imports
``Server``; ``Server`` is one implementation. A test may hand a duty any object with
these names.
"""

from __future__ import annotations

import threading
from collections.abc import Sequence
from datetime import datetime, timedelta
from typing import TYPE_CHECKING, Protocol

if TYPE_CHECKING:
    from qmlkit.job import Job
    from qmlkit.processing.claims import ClaimLedger
    from qmlkit.processing.config import ServerConfig
    from qmlkit.recurring import RecurringJob
    from qmlkit.storage.base import ServerInfo, StateChange, Storage, Transition

__all__ = ["Runtime"]


class Runtime(Protocol):
    """The server as a duty sees it.

    Attributes:
        config: The server's configuration.
        storage: The opened storage.
        server_id: ``name#uuid`` while registered (heartbeats on), else ``None``.
        claims: The server's claim ledger.
    """

    config: ServerConfig
    storage: Storage
    server_id: str | None
    claims: ClaimLedger

    @property
    def stopping(self) -> threading.Event:
        """Set once the server begins to stop; a duty's loop ends when it is set."""

    @property
    def halted(self) -> threading.Event:
        """Set once a stopping server's attempts are all stored or released (after the
        grace period); duties with ``through_grace`` (the heartbeat) run until then."""

    def server_info(self) -> ServerInfo:
        """This server's registry entry, stamped now (heartbeats on only)."""

    def notify(self, changes: Sequence[StateChange]) -> None:
        """Tell the state-change observers about committed ``changes``."""

    def runnable(self, changes: Sequence[StateChange]) -> None:
        """After a commit that made jobs Enqueued: wake local workers and other servers."""

    def wake(self, queue: str | None = None) -> None:
        """Wake an idle worker for ``queue`` (``None``: every idle worker)."""

    def cap(self, interval: timedelta) -> float:
        """A duty's longest sleep in seconds: ``interval``, or the polling interval if
        longer while wake-ups arrive (they announce schedules and template changes)."""

    def store_outcomes(self, outcomes: Sequence[Transition]) -> None:
        """Store outcomes in one transaction (retried while storage is down), then notify."""

    def release(self, jobs: Sequence[Job], reason: str) -> int:
        """Store held ``jobs`` back to Enqueued (fenced, no retry used); return how many."""

    def tick_job(self, template: RecurringJob, tick: datetime) -> Job | None:
        """Build the job materialising ``tick`` of ``template``; ``None`` if dropped."""
