"""Storage capabilities beyond the contract: transactional enqueue, and the optional
methods of `qmlkit.storage.base.Storage` a backend may leave out."""

from __future__ import annotations

import threading
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any, Protocol, TypeGuard, runtime_checkable

from qmlkit.job import Job
from qmlkit.storage.base import Storage

__all__ = ["OPTIONAL_METHODS", "BatchRead", "DefaultWakeup", "PushListener", "PushWakeups",
           "TransactionalStorage", "WakeupProvider", "default_wakeup", "get_many",
           "is_transactional", "job_states", "push_listener", "supports"]


@runtime_checkable
class TransactionalStorage(Protocol):
    """A storage that can enqueue inside a caller's own database transaction.

    ``App.transaction`` (`qmlkit.transactional`) needs it; qmlkit-postgres has it.
    ``isinstance(storage, TransactionalStorage)`` checks that the members exist; a
    storage may still switch the capability off with
    ``supports_transactional_enqueue = False``.

    Attributes:
        supports_transactional_enqueue: ``True`` when the capability is usable.
    """

    supports_transactional_enqueue: bool

    def enqueue_many(self, jobs: Sequence[Job], *, connection: Any = None) -> list[Job]:
        """As `Storage.enqueue_many`; with ``connection`` (a SQLAlchemy ``Connection`` or
        ``Session`` on the same database) the rows are written through it, in the caller's
        transaction, and exist only if it commits."""

    def existing_ids(self, ids: Sequence[str]) -> set[str]:
        """Return those of ``ids`` that are stored (committed) now."""


def is_transactional(storage: object) -> TypeGuard[TransactionalStorage]:
    """Whether ``storage`` declares transactional enqueue and has it switched on."""
    return isinstance(storage, TransactionalStorage) and bool(
        storage.supports_transactional_enqueue)


#: Optional methods of `Storage`: the base class raises ``NotImplementedError`` naming
#: the storage's class and what it lacks; every built-in backend and both plugins
#: implement them. Check one with `supports`.
OPTIONAL_METHODS = ("job_history", "throughput", "report_progress")


def supports(storage: Storage, method: str) -> bool:
    """Whether ``storage`` implements the optional `Storage` method ``method``.

    Raises:
        ValueError: ``method`` is not one of `OPTIONAL_METHODS`.
    """
    if method not in OPTIONAL_METHODS:
        raise ValueError(f"{method!r} is not an optional storage method; "
                         f"those are {', '.join(OPTIONAL_METHODS)}")
    return getattr(type(storage), method) is not getattr(Storage, method)


@runtime_checkable
class BatchRead(Protocol):
    """A storage that reads many jobs in one query: the memory and SQL storages,
    qmlkit-redis and qmlkit-postgres have it. Job handles' shared waiter uses it
    (`qmlkit.waiting`), so waiting on 1,000 jobs costs one query per poll."""

    def get_many(self, job_ids: Sequence[str]) -> dict[str, Job]:
        """What `Storage.get` answers for each of up to 1,000 ``job_ids``, in one read:
        ``{job_id: job}`` for the stored ones (duplicates allowed; missing and
        unstorable ids left out; undecodable rows as `Storage.get`'s stand-ins).

        Raises:
            StorageUnavailable: The backend cannot be reached.
        """

    def job_states(self, job_ids: Sequence[str]) -> dict[str, str]:
        """The state names of the stored ones among ``job_ids`` (up to 1,000), in one
        read that decodes no job: ``{job_id: "Succeeded"}``. A waiter polls with it and
        reads whole jobs only once they are final. An undecodable row answers its
        stored state name here, where `Storage.get` gives a Failed stand-in.

        Raises:
            StorageUnavailable: The backend cannot be reached.
        """


def get_many(storage: Storage, job_ids: Sequence[str]) -> dict[str, Job]:
    """Read ``job_ids`` from ``storage``: in one query through its `BatchRead`
    ``get_many``, else with one `Storage.get` per id.

    Returns:
        ``{job_id: job}`` for the ids that are stored.

    Raises:
        StorageUnavailable: The backend cannot be reached.
    """
    if isinstance(storage, BatchRead):
        return storage.get_many(job_ids)
    return {i: job for i in job_ids if (job := storage.get(i)) is not None}


def job_states(storage: Storage, job_ids: Sequence[str]) -> dict[str, str]:
    """The state names of ``job_ids`` in ``storage``: through its `BatchRead`
    ``job_states``, else read from `get_many`.

    Returns:
        ``{job_id: state_name}`` for the ids that are stored.

    Raises:
        StorageUnavailable: The backend cannot be reached.
    """
    if isinstance(storage, BatchRead):
        return storage.job_states(job_ids)
    return {i: job.state.name for i, job in get_many(storage, job_ids).items()}


@dataclass(frozen=True)
class DefaultWakeup:
    """The wake-up channel a storage offers when the app names none (`WakeupProvider`).

    Attributes:
        url: A kombu URL on the storage's own service, e.g. ``"redis://host:6379/0"``,
            ``"filesystem:///srv/shop.db-wakeup"`` or ``"pgnotify+postgresql://host/db"``.
        scope: What tells this storage's apps from others on the same service (a Redis
            key prefix, a PostgreSQL schema); appended to the wake-up exchange's name
            as ``<exchange>.<scope>``. Empty when the URL is private already (the
            folder beside one SQLite file).
    """

    url: str
    scope: str = ""


@runtime_checkable
class WakeupProvider(Protocol):
    """A storage that can carry wake-ups itself, so they are on with no configuration.

    An app or server whose ``wakeup_url`` is left at ``"auto"`` (`qmlkit.wakeup.AUTO`)
    asks its storage for this; an explicit URL wins, and ``None`` turns wake-ups off.
    SQLite offers a ``filesystem://`` folder beside its file, qmlkit-redis its own
    Redis, qmlkit-postgres ``LISTEN/NOTIFY`` on its own database. Wake-ups stay hints
    on a channel of their own: job state is still only in the storage.
    """

    def default_wakeup(self) -> DefaultWakeup | None:
        """The channel to use by default, or ``None`` for none (workers then poll).

        Must not open the storage or do I/O: it is called when an app or server is
        configured.
        """


def default_wakeup(storage: object) -> DefaultWakeup | None:
    """What ``storage`` offers as its default wake-up channel (`WakeupProvider`), or
    ``None`` if it offers none (memory storage, a third-party storage without it)."""
    if isinstance(storage, WakeupProvider):
        return storage.default_wakeup()
    return None


@runtime_checkable
class PushWakeups(Protocol):
    """A storage whose own writes can wake idle servers, beside the kombu channel.

    qmlkit-redis has it with ``push_wakeups`` on (`qmlkit_redis.push`): the script that
    makes a job runnable publishes its queue when a server may be idle on it. A server
    starts the listener at start and stops it at stop. Like kombu wake-ups these are
    hints: a server that hears nothing still finds the job at its next poll.
    """

    def open_push_listener(self, on_wakeup: Callable[[str | None], None],
                           name: str) -> PushListener | None:
        """A started listener calling ``on_wakeup(queue)`` for each wake-up (``None``:
        every queue), or ``None`` if the storage is configured without push wake-ups.
        Must not raise for an unreachable storage (it retries in its own thread)."""


class PushListener(Protocol):
    """What a server needs of a push listener: `stop`, and ``connected`` (an event set
    while wake-ups can arrive)."""

    connected: threading.Event

    def stop(self) -> None:
        """Stop listening and release the connection."""


def push_listener(storage: object, on_wakeup: Callable[[str | None], None],
                  name: str) -> PushListener | None:
    """``storage``'s started push listener (`PushWakeups`), or ``None`` if it has none."""
    if isinstance(storage, PushWakeups):
        return storage.open_push_listener(on_wakeup, name)
    return None
