"""The storage contract: what every qmlkit backend must do, and how atomically.

This module holds only the contract. Each method's docstring is its specification; the
contract suite in ``tests/contract/`` is its executable form, and a backend is done when
it passes that suite against the real service. Semantics follow qml-rs's ``Storage``
trait, with claims batched and every claim fenced.

Conventions for every method:

* Times are aware UTC ``datetime`` objects; durations are ``timedelta``.
* ``now`` arguments are passed in by the caller so tests can move the clock.
* A backend that cannot be reached raises `qmlkit.errors.StorageUnavailable`
  (chained to the driver's error) and has changed nothing.
* Methods are thread-safe once `Storage.open` has returned; several processes may
  share one store where the backend says so.
"""

from __future__ import annotations

import abc
from collections.abc import Mapping, Sequence
from datetime import datetime
from typing import Any

from qmlkit.errors import StaleClaim
from qmlkit.job import DEFAULT_MAX_PAYLOAD_BYTES, Job, JobState
from qmlkit.recurring import RecurringJob
from qmlkit.storage.records import (
    MAX_CLAIM,
    STATS_RETENTION,
    ServerInfo,
    StateChange,
    Transition,
    minute_of,
)

__all__ = ["MAX_CLAIM", "STATS_RETENTION", "ServerInfo", "StateChange", "Storage",
           "Transition", "minute_of"]

class Storage(abc.ABC):
    """All job state. Abstract: a backend implements every method below.

    Attributes:
        url: The URL the storage was built from (secrets masked in ``repr``).
        max_payload_bytes: Largest encoded ``args`` + ``kwargs`` accepted by ``enqueue``,
            in bytes; the same default on every backend.
    """

    url: str = ""
    max_payload_bytes: int = DEFAULT_MAX_PAYLOAD_BYTES

    # --- lifecycle ----------------------------------------------------------------

    @abc.abstractmethod
    def open(self) -> None:
        """Connect and create what is missing (tables, indexes). Idempotent.

        Raises:
            ConfigurationError: The URL or an option is unusable (names the part).
            StorageUnavailable: The backend cannot be reached.
        """

    @abc.abstractmethod
    def close(self) -> None:
        """Release connections. Idempotent; the storage may be opened again."""

    def migrate(self) -> list[str]:
        """Apply pending schema migrations now, without opening for jobs (``qmlkit migrate``).

        Backends with versioned schemas (qmlkit-postgres) override this; the default
        does nothing, for backends that create what they need in `open`.

        Returns:
            A line per migration applied, oldest first (``"<version>: <name>"``); empty
            when the schema was current or the backend has no migrations.

        Raises:
            ConfigurationError: The schema is newer than this code knows.
            StorageUnavailable: The backend cannot be reached.
        """
        return []

    def __enter__(self) -> Storage:
        """Open the storage and return it."""
        self.open()
        return self

    def __exit__(self, *exc_info: object) -> None:
        """Close the storage."""
        self.close()

    # --- enqueue and read ---------------------------------------------------------

    def enqueue(self, job: Job) -> Job:
        """Store one new job, Enqueued or Scheduled.

        Args:
            job: A job whose state is Enqueued or Scheduled.

        Returns:
            The job as stored.

        Raises:
            PayloadError: Its arguments are not JSON or are over ``max_payload_bytes``;
                nothing was stored.
            DuplicateJob: A job with the same id exists; nothing was stored.
            InvalidTransition: The job is in another state.
        """
        return self.enqueue_many([job])[0]

    @abc.abstractmethod
    def enqueue_many(self, jobs: Sequence[Job]) -> list[Job]:
        """Store several new jobs, all or none (one transaction where the backend has them).

        Args:
            jobs: Jobs in state Enqueued or Scheduled, at most a few thousand per call.

        Returns:
            The jobs as stored, in the given order.

        Raises:
            PayloadError: One job's arguments are not JSON or too large; none stored.
            DuplicateJob: One id is taken already; none stored.
            InvalidTransition: One job is in another state; none stored.
        """

    @abc.abstractmethod
    def get(self, job_id: str) -> Job | None:
        """Return the job with ``job_id``, or ``None``.

        A stored row that cannot be decoded comes back as a Failed job whose message
        names the decoding problem (it is never a raise), so listing tools keep working.
        An id no job can have (a NUL character or a lone surrogate, see
        `qmlkit.limits.storable_id`) answers ``None`` on every backend, without a raise.
        """

    @abc.abstractmethod
    def list_jobs(
        self,
        *,
        state: str | None = None,
        queue: str | None = None,
        method: str | None = None,
        limit: int = 100,
        offset: int = 0,
    ) -> list[Job]:
        """Return jobs matching every given filter, newest ``created_at`` first.

        Jobs created at the same moment (one bulk enqueue) come higher id first: ids are
        time-ordered, so that is newest first too.

        Args:
            state: A state name such as ``"Failed"``, or ``None`` for all.
            queue: A queue name, or ``None`` for all.
            method: A job name, or ``None`` for all.
            limit: At most this many (1 to 10,000).
            offset: Skip this many first (pagination).

        Returns:
            Up to ``limit`` jobs; undecodable rows appear as in `get`.
        """

    @abc.abstractmethod
    def count_jobs(self) -> dict[tuple[str, str], int]:
        """Count jobs by queue and state.

        Returns:
            ``{(queue, state_name): count}`` for every pair with at least one job.
        """

    @abc.abstractmethod
    def change_state(
        self,
        job_id: str,
        state: JobState,
        *,
        expected: Sequence[str] = (),
        expires_at: datetime | None = None,
    ) -> StateChange:
        """Move one job to ``state`` outside any claim: delete, retry, requeue.

        Atomic: the check and the write see the same row. Moving a Processing job this
        way (for instance deleting it) invalidates its worker's claim: the worker's later
        fenced transition raises ``StaleClaim``.

        Args:
            job_id: The job.
            state: The target state (Enqueued, Scheduled or Deleted in practice).
            expected: If not empty, the state names the job must be in now.
            expires_at: The job's new ``expires_at`` (``None`` clears it).

        Returns:
            The change.

        Raises:
            JobNotFound: No such job.
            InvalidTransition: The state machine forbids it, or the job is not in one of
                the ``expected`` states.
        """

    # --- claim and fenced transitions ---------------------------------------------

    @abc.abstractmethod
    def claim_changes(
        self,
        *,
        worker_id: str,
        server_name: str,
        queues: Sequence[str],
        limit: int,
        now: datetime,
    ) -> list[StateChange]:
        """Claim exactly as `claim` does, returning each job with its previous state.

        The server calls this instead of `claim` when state-change observers are
        registered, so they see every claim (Enqueued -> Processing).

        Returns:
            One change per claimed job, in claim order; ``previous`` is the job's
            Enqueued state as it was stored.
        """

    def claim(
        self,
        *,
        worker_id: str,
        server_name: str,
        queues: Sequence[str],
        limit: int,
        now: datetime,
    ) -> list[Job]:
        """Atomically move up to ``limit`` Enqueued jobs to Processing for one worker.

        A backend implements `claim_changes`; this default returns its jobs, and a
        backend may override it with a path that skips decoding previous states.

        Higher ``priority`` first, then older ``enqueued_at`` (FIFO). Concurrent callers,
        in this process or another, never get the same job. Each claimed job's
        ``attempts`` grows by one: that number is the claim's fencing token. A row that
        cannot be decoded is moved to Failed with the reason instead of being returned.

        Args:
            worker_id: The claiming worker, recorded on the Processing state.
            server_name: The worker's server, recorded likewise (used by reclaim).
            queues: The queues to take from; empty means all of them.
            limit: 1 to ``MAX_CLAIM``.
            now: The start time recorded on the Processing state.

        Returns:
            Between 0 and ``limit`` jobs in Processing, in claim order.
        """
        changes = self.claim_changes(worker_id=worker_id, server_name=server_name,
                                     queues=queues, limit=limit, now=now)
        return [change.job for change in changes]

    @abc.abstractmethod
    def transition_many(self, items: Sequence[Transition]) -> list[Job | StaleClaim]:
        """Apply fenced transitions, each only if its claim is still current.

        A transition applies when the stored job is still Processing with
        ``attempts == item.token``; otherwise nothing is written for it and its slot in
        the result holds a ``StaleClaim``. All applied ones commit together.

        Args:
            items: Transitions of distinct jobs, at most ``MAX_CLAIM``.

        Returns:
            For each item, in order: the stored job after the change, or the
            ``StaleClaim`` error that rejected it.
        """

    def transition(self, item: Transition) -> Job:
        """Apply one fenced transition; see `transition_many`.

        Returns:
            The stored job after the change.

        Raises:
            StaleClaim: The claim is no longer current; nothing was written.
        """
        (outcome,) = self.transition_many([item])
        if isinstance(outcome, StaleClaim):
            raise outcome
        return outcome

    def job_history(self, job_id: str) -> list[JobState]:
        """Return the states ``job_id`` has been in, oldest first, the current one last.

        Every stored state change is kept with its own timestamps (enqueued, claimed,
        failed, retried, …), as Hangfire's state history is; the history goes when the
        job is deleted by `delete_expired`.

        Returns:
            The states; an empty list for an unknown job.

        Raises:
            StorageUnavailable: The backend cannot be reached.
        """
        raise NotImplementedError(f"{type(self).__name__} does not keep job history")

    def throughput(self, *, since: datetime, until: datetime) -> list[tuple[datetime, int, int]]:
        """Count jobs that reached Succeeded and Failed, per UTC minute.

        Counted when a worker's outcome is stored (`transition_many`) or a state is set
        by hand (`change_state`), into per-minute counters like Hangfire's
        ``stats:succeeded:<minute>``; counters older than `STATS_RETENTION` are dropped
        by `delete_expired`.

        Args:
            since: First minute wanted (UTC; rounded down to the minute).
            until: Last moment wanted (UTC).

        Returns:
            ``(minute_start, succeeded, failed)`` for each minute that has counts, oldest
            first; minutes with none are left out.

        Raises:
            StorageUnavailable: The backend cannot be reached.
        """
        raise NotImplementedError(f"{type(self).__name__} does not count throughput")

    def report_progress(
        self, job_id: str, *, token: int, progress: Mapping[str, Any]
    ) -> bool:
        """Store a running attempt's progress under ``metadata["progress"]``, fenced.

        Written only while the job is Processing under ``token``; a report from an
        attempt that lost its claim changes nothing. Not a state change: observers are
        not told. Follows Hangfire.Console's progress bars and Celery's ``update_state``
        with ``PROGRESS`` meta.

        Args:
            job_id: The job.
            token: The fencing token (attempt number) of the reporting attempt.
            progress: ``{"fraction": float in [0, 1], "message": str | None, "at": ISO
                8601 UTC}``, as built by `qmlkit.processing.context.JobContext.report_progress`.

        Returns:
            Whether it was stored (``False``: the claim is stale or the job is gone).

        Raises:
            StorageUnavailable: The backend cannot be reached.
        """
        raise NotImplementedError(f"{type(self).__name__} does not store job progress")

    # --- background duties ----------------------------------------------------------

    @abc.abstractmethod
    def promote_due(self, *, now: datetime, limit: int = 1000) -> list[StateChange]:
        """Move Scheduled and AwaitingRetry jobs that are due (at or before ``now``) to Enqueued.

        Atomic per job: with several schedulers, each due job is promoted once. The new
        Enqueued state's ``enqueued_at`` is ``now``.

        Args:
            now: The current time.
            limit: At most this many per call (the caller loops while it gets ``limit``).

        Returns:
            The changes made.
        """

    @abc.abstractmethod
    def next_due_at(self) -> datetime | None:
        """Return the earliest ``enqueue_at``/``retry_at`` of a waiting job, or ``None``."""

    @abc.abstractmethod
    def requeue_stranded(
        self,
        *,
        started_before: datetime,
        now: datetime,
        exclude_servers: Sequence[str] = (),
    ) -> list[StateChange]:
        """Requeue Processing jobs whose claim started before ``started_before`` (qml-rs).

        Used at server start for jobs a crashed process left behind. Jobs whose
        ``server_name`` is in ``exclude_servers`` (registered servers, which heartbeat
        reclaim looks after) are left alone, so a long job of a live server is never
        taken from it (field case C03). Each requeued job's old claim becomes stale;
        it keeps its place in the queue (the ``enqueued_at`` it was claimed from).

        Returns:
            The changes made (Processing -> Enqueued, reason ``"stranded"``).
        """

    @abc.abstractmethod
    def delete_expired(self, *, now: datetime, limit: int = 1000) -> int:
        """Remove up to ``limit`` jobs whose ``expires_at`` is at or before ``now``.

        Only jobs in Succeeded, Failed or Deleted are ever removed, in one short
        transaction per call; the caller loops while it gets ``limit``.

        Returns:
            How many were removed.
        """

    # --- recurring templates ---------------------------------------------------------

    @abc.abstractmethod
    def upsert_recurring(self, template: RecurringJob, *, keep_schedule: bool = False) -> None:
        """Insert or replace the template ``template.id``, atomically.

        Args:
            template: The template.
            keep_schedule: If the template exists, keep its stored ``next_run_at`` and
                ``last_run_at`` (servers may be advancing them right now) and replace
                only the definition; if it does not exist, insert ``template`` whole.
        """

    @abc.abstractmethod
    def get_recurring(self, template_id: str) -> RecurringJob | None:
        """Return the template, or ``None``."""

    @abc.abstractmethod
    def list_recurring(self) -> list[RecurringJob]:
        """Return every template, ordered by id."""

    @abc.abstractmethod
    def remove_recurring(self, template_id: str) -> bool:
        """Delete the template; return whether it existed. Jobs it made are kept."""

    @abc.abstractmethod
    def fire_recurring(
        self,
        template_id: str,
        *,
        expected_next_run_at: datetime,
        next_run_at: datetime,
        job: Job | None,
    ) -> bool:
        """Advance a template by one tick and store that tick's job, atomically.

        Compare-and-set: only when the stored ``next_run_at`` still equals
        ``expected_next_run_at`` does it set ``next_run_at`` (and ``last_run_at`` to the
        expected tick when ``job`` is given) and store ``job`` (Enqueued), in one
        transaction. With any number of servers polling, each tick is materialised by
        exactly one of them.

        Args:
            template_id: The template.
            expected_next_run_at: The tick the caller saw as due.
            next_run_at: The template's next tick.
            job: The job for the tick, or ``None`` to skip the tick (misfire policy).

        Returns:
            ``True`` if this call advanced the template (and stored the job); ``False``
            if another caller did first, or the template is gone.

        Raises:
            PayloadError, DuplicateJob: As ``enqueue``; nothing was changed.
        """

    # --- server registry (heartbeats) -----------------------------------------------

    @abc.abstractmethod
    def register_server(self, info: ServerInfo) -> None:
        """Insert or replace the registry row ``info.id``."""

    @abc.abstractmethod
    def heartbeat(self, server_id: str, *, now: datetime) -> bool:
        """Set the server's ``last_heartbeat`` to ``now``.

        Returns:
            ``False`` if no such row exists (it was reclaimed as dead): the caller should
            register again.
        """

    @abc.abstractmethod
    def deregister_server(self, server_id: str) -> None:
        """Remove the registry row ``server_id``; no error if it is gone."""

    @abc.abstractmethod
    def list_servers(self) -> list[ServerInfo]:
        """Return every registered server, oldest first."""

    @abc.abstractmethod
    def reclaim_dead_servers(
        self, *, heartbeat_before: datetime, now: datetime
    ) -> list[StateChange]:
        """Requeue the Processing jobs of servers whose heartbeat is older than the bound.

        Removes those servers' rows and moves every Processing job whose
        ``server_name`` is one of them back to Enqueued (reason ``"reclaimed"``),
        atomically per job; their old claims become stale.

        Orphans too: a job stamped ``"name#uuid"`` (a registered id) with no row
        (pruned, half-finished stop, never written) and claimed before the bound,
        whichever came first, pruning or a pass; plain stamps are `requeue_stranded`'s.
        A reclaimed job keeps its place: the ``enqueued_at`` it was claimed from.

        Returns:
            The changes made.
        """

    def __repr__(self) -> str:
        """Name the class and the URL with any password masked."""
        from qmlkit.config import mask_url

        return f"{type(self).__name__}({mask_url(self.url)!r})"
