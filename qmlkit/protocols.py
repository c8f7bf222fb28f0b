"""Ground-floor protocols: the shapes hook arguments have, without importing what has them.

`qmlkit.hookspecs` types its hooks with these, so it imports nothing above the ground
floor (``job.py``, ``errors.py``, ``storage/base.py``, this module). The concrete
classes (``qmlkit.processing.server.Server``, the middleware of
``qmlkit.processing.middleware``) satisfy them structurally.
"""

from __future__ import annotations

from collections.abc import Callable
from datetime import timedelta
from typing import TYPE_CHECKING, Any, Protocol

if TYPE_CHECKING:
    from qmlkit.job import Job
    from qmlkit.storage.base import Storage

__all__ = ["EnqueueMiddleware", "Middleware", "ServerHandle"]


class Middleware(Protocol):
    """Execution middleware: ``middleware(job, context, call_next) -> result``.

    ``context`` is the attempt's ``qmlkit.processing.context.JobContext``.
    """

    def __call__(self, job: Job, context: Any, call_next: Callable[[], Any]) -> Any:
        """Run around one attempt; return the result (usually ``call_next()``'s)."""


class EnqueueMiddleware(Protocol):
    """Client-side middleware: ``middleware(jobs, call_next) -> stored ids``."""

    def __call__(self, jobs: list[Job], call_next: Callable[[list[Job]], list[str]]) -> list[str]:
        """Wrap one enqueue of ``jobs``; return the stored ids (usually ``call_next``'s)."""


class ServerHandle(Protocol):
    """A job server as lifecycle hooks see it (``qmlkit.processing.server.Server`` is one).

    Attributes:
        server_id: ``name#uuid`` while registered (heartbeats on), else ``None``.
        config: Its ``ServerConfig``.
        storage: Its storage.
    """

    server_id: str | None
    config: Any
    storage: Storage

    @property
    def is_running(self) -> bool:
        """Whether ``start()`` has run and ``stop()`` has not."""

    def wake(self, queue: str | None = None) -> None:
        """Wake an idle worker for ``queue`` (``None``: every idle worker)."""

    def stop(self, timeout: timedelta | float | None = None) -> None:
        """Stop gracefully."""
