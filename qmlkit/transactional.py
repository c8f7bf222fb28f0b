"""Transactional enqueue: jobs written through the caller's own database transaction.

The jobs exist only if the caller's transaction commits, and a rollback leaves no trace
(the pattern of Rails' GoodJob and of procrastinate). Observers and wake-ups run after
the commit, never after a rollback. The storage must be a
`qmlkit.storage.capabilities.TransactionalStorage` (qmlkit-postgres is).
"""

from __future__ import annotations

import logging
import queue
import threading
import time
import weakref
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from contextvars import ContextVar
from typing import TYPE_CHECKING, Any, cast

from qmlkit.errors import ConfigurationError
from qmlkit.storage.capabilities import is_transactional

if TYPE_CHECKING:
    from qmlkit.job import Job
    from qmlkit.notify import Notifier
    from qmlkit.storage.base import Storage
    from qmlkit.storage.capabilities import TransactionalStorage

__all__ = ["Transactional"]

log = logging.getLogger("qmlkit.app")  # the logger these lines always had

#: Jobs enqueued through a caller's Connection or Session, awaiting its commit.
_PENDING: weakref.WeakKeyDictionary[Any, list[tuple[Transactional, list[Job]]]] = (
    weakref.WeakKeyDictionary())

#: The (owner, connection) of the innermost transaction block, if any.
_TRANSACTION: ContextVar[tuple[Transactional, Any] | None] = ContextVar(
    "qmlkit_transaction", default=None)

#: How long, and how often, a Connection's jobs are looked for after its commit (s).
ANNOUNCE_WITHIN_S = 5.0
ANNOUNCE_EVERY_S = 0.002


class _AfterCommit:
    """Announces transactionally enqueued jobs once a ``Connection``'s commit is visible.

    SQLAlchemy tells a ``Connection``'s listeners about a commit just before it happens;
    this thread polls for the jobs (every 2 ms, for up to 5 s) and announces them when
    they appear. Jobs that never appear were rolled back and are dropped.
    """

    def __init__(self, owner: Transactional) -> None:
        self._owner = weakref.ref(owner)
        self._queue: queue.SimpleQueue[list[Job]] = queue.SimpleQueue()
        threading.Thread(target=self._run, name="qmlkit-after-commit", daemon=True).start()

    def put(self, jobs: list[Job]) -> None:
        self._queue.put(jobs)

    def _run(self) -> None:
        while True:
            jobs = self._queue.get()
            owner = self._owner()
            if owner is None:
                return
            deadline = time.monotonic() + ANNOUNCE_WITHIN_S
            try:
                while not owner.announce_existing(jobs) and time.monotonic() < deadline:
                    time.sleep(ANNOUNCE_EVERY_S)
            except Exception:  # an announcement is best effort; workers also poll
                log.exception("announcing committed jobs failed")
            del owner


class Transactional:
    """One app's transactional enqueue.

    Args:
        storage: Returns the app's opened storage.
        notifier: Announces jobs once their commit is visible.
    """

    def __init__(self, storage: Callable[[], Storage], notifier: Notifier) -> None:
        self._storage = storage
        self._notifier = notifier
        self._lock = threading.Lock()
        self._after_commit: _AfterCommit | None = None

    @contextmanager
    def block(self, connection: Any) -> Iterator[None]:
        """Route this owner's enqueues through ``connection`` inside the ``with`` block.

        Raises:
            ConfigurationError: On entry, when the storage is not a
                `qmlkit.storage.capabilities.TransactionalStorage` with the capability on.
        """
        store = self._storage()
        if not is_transactional(store):
            raise ConfigurationError(
                f"{store!r} cannot enqueue inside a caller's transaction; "
                "transactional enqueue needs the PostgreSQL storage (pip install qmlkit-postgres)"
            )
        token = _TRANSACTION.set((self, connection))
        try:
            yield
        finally:
            _TRANSACTION.reset(token)

    def connection(self) -> Any | None:
        """The caller's connection of the innermost block of this owner, else ``None``."""
        active = _TRANSACTION.get()
        return active[1] if active is not None and active[0] is self else None

    @staticmethod
    def insert_through(store: Storage, connection: Any) -> Callable[[Sequence[Job]], list[Job]]:
        """``store.enqueue_many`` bound to the caller's ``connection``."""
        # Only called inside `block`, which checked the capability on entry.
        transactional = cast("TransactionalStorage", store)

        def insert(batch: Sequence[Job]) -> list[Job]:
            return transactional.enqueue_many(batch, connection=connection)
        return insert

    def announce_after_commit(self, connection: Any, stored: list[Job]) -> None:
        """Run observers and wake-ups for ``stored`` once ``connection`` commits; drop them
        if it rolls back.

        Pending announcements are kept per connection or session object; one set of
        event listeners per object drains them, so a long-lived session gathers no
        listeners. A ``Session`` reports the end of its commit (``after_commit``); a
        ``Connection`` only the moment before it (``commit``), so its jobs are handed to
        a background thread that announces them as soon as the commit is visible.
        Either way only jobs that exist after the commit are announced: a savepoint
        rolled back inside the transaction takes its jobs, and their announcements, away.
        """
        # Keyed by the Connection/Session object itself: a Connection's ``info`` belongs
        # to the pooled DBAPI connection and outlives it.
        known = connection in _PENDING
        _PENDING.setdefault(connection, []).append((self, stored))
        if not known:
            _listen(connection)

    def announce_existing(self, jobs: list[Job]) -> bool:
        """Announce those of ``jobs`` that are stored; return whether any were."""
        # Jobs to announce exist only after a `block`, which checked the capability.
        store = cast("TransactionalStorage", self._storage())
        real = store.existing_ids([j.id for j in jobs])
        kept = [j for j in jobs if j.id in real]
        if kept:
            self._notifier.announce(kept)
        return bool(kept)

    def after_commit_thread(self) -> _AfterCommit:
        """The thread announcing jobs committed through a ``Connection`` (made on first use)."""
        with self._lock:
            if self._after_commit is None:
                self._after_commit = _AfterCommit(self)
            return self._after_commit


def _listen(connection: Any) -> None:
    """Drain ``connection``'s pending announcements on its commit or rollback."""
    from sqlalchemy import event
    from sqlalchemy.orm import Session

    is_session = isinstance(connection, Session)

    def take() -> list[tuple[Transactional, list[Job]]]:
        waiting = list(_PENDING.get(connection, ()))
        _PENDING[connection] = []
        return waiting

    def on_commit(*_: Any) -> None:
        for owner, jobs in take():
            if is_session:
                owner.announce_existing(jobs)
            else:
                owner.after_commit_thread().put(jobs)

    def on_rollback(*args: Any) -> None:
        if is_session and args[1].parent is not None:
            return  # a savepoint: the commit will tell which jobs survived
        take()

    if is_session:
        event.listen(connection, "after_commit", on_commit)
        event.listen(connection, "after_soft_rollback", on_rollback)
    else:
        event.listen(connection, "commit", on_commit)
        event.listen(connection, "rollback", on_rollback)
