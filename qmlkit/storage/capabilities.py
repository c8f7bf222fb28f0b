"""Storage capabilities beyond the contract: transactional enqueue, and the optional
methods of `qmlkit.storage.base.Storage` a backend may leave out."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any, Protocol, runtime_checkable

from qmlkit.job import Job
from qmlkit.storage.base import Storage

__all__ = ["OPTIONAL_METHODS", "BatchRead", "TransactionalStorage", "get_many", "is_transactional",
           "job_states", "supports"]


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


def is_transactional(storage: object) -> bool:
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
