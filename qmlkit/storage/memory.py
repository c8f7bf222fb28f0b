"""``MemoryStorage``: every job in this process's memory (URL ``memory://``).

For tests, examples and single-process use. Nothing survives the process. Thread-safe:
one lock guards all state, and each queue keeps a heap ordered by (priority, FIFO) so a
claim costs O(log n) per job. Arguments are stored as their JSON encoding decoded again,
so a job reads back exactly as it would from any other backend.
"""

from __future__ import annotations

import heapq
import itertools
import json
import threading
from collections import Counter
from collections.abc import Mapping, Sequence
from datetime import datetime
from typing import Any, ClassVar

from qmlkit.errors import (
    DuplicateJob,
    InvalidTransition,
    JobNotFound,
    StaleClaim,
)
from qmlkit.job import (
    Enqueued,
    Job,
    JobState,
    Processing,
    check_transition,
    encode_metadata,
    encode_payload,
)
from qmlkit.recurring import RecurringJob
from qmlkit.storage.base import (
    MAX_CLAIM,
    STATS_RETENTION,
    ServerInfo,
    StateChange,
    Storage,
    Transition,
    minute_of,
)
from qmlkit.storage.codec import due_at
from qmlkit.storage.options import StorageOptions

#: Names of the states ``delete_expired`` may remove.
_EXPIRABLE = frozenset({"Succeeded", "Failed", "Deleted"})


class MemoryOptions(StorageOptions):
    """Options of `MemoryStorage`."""

    backend: ClassVar[str] = "memory storage"
    #: Largest encoded arguments accepted, in bytes (default: the storage's).
    max_payload_bytes: int | None = None


class MemoryStorage(Storage):
    """In-process storage (``memory://``). See the module docstring.

    Args:
        url: ``"memory://"`` (anything after the scheme is ignored).
        max_payload_bytes: Largest encoded arguments accepted, in bytes.
    """

    def __init__(self, url: str = "memory://", *, max_payload_bytes: int | None = None) -> None:
        self.url = url
        if max_payload_bytes is not None:
            self.max_payload_bytes = max_payload_bytes
        self._lock = threading.Lock()
        self._jobs: dict[str, Job] = {}
        self._heaps: dict[str, list[tuple[int, float, int, str]]] = {}
        self._seq = itertools.count()
        self._servers: dict[str, ServerInfo] = {}
        self._recurring: dict[str, RecurringJob] = {}
        self._waiting: dict[str, datetime] = {}  # Scheduled/AwaitingRetry job id -> due time
        self._history: dict[str, list[JobState]] = {}  # job id -> earlier states, oldest first
        self._stats: Counter[tuple[datetime, str]] = Counter()  # (minute, state) -> count

    @classmethod
    def from_url(cls, url: str, options: Mapping[str, Any]) -> MemoryStorage:
        """Build from ``memory://`` and options (``max_payload_bytes`` only).

        Raises:
            ConfigurationError: An unknown option, named.
        """
        return cls(url, **MemoryOptions.parse(options).given())

    def open(self) -> None:
        """Nothing to connect to."""

    def close(self) -> None:
        """Nothing to release; the jobs stay until the object is dropped."""

    # --- helpers (lock held) -------------------------------------------------------

    def _push(self, job: Job) -> None:
        state = job.state
        assert isinstance(state, Enqueued)
        heap = self._heaps.setdefault(job.queue, [])
        key = (-job.priority, state.enqueued_at.timestamp(), next(self._seq), job.id)
        heapq.heappush(heap, key)

    def _store(self, job: Job) -> None:
        old = self._jobs.get(job.id)
        if old is not None and old.state is not job.state:
            self._history.setdefault(job.id, []).append(old.state)
        self._jobs[job.id] = job
        state = job.state
        if isinstance(state, Enqueued):
            self._push(job)
        due = due_at(state)  # the promotion index: Scheduled and AwaitingRetry only
        if due is not None:
            self._waiting[job.id] = due
        else:
            self._waiting.pop(job.id, None)

    # --- enqueue and read ----------------------------------------------------------

    def enqueue_many(self, jobs: Sequence[Job]) -> list[Job]:
        """See `Storage.enqueue_many`."""
        stored = []
        for job in jobs:
            check_transition(job.id, None, job.state.name)
            payload = json.loads(encode_payload(job.args, job.kwargs, self.max_payload_bytes))
            encode_metadata(job.metadata, self.max_payload_bytes)
            stored.append(job._replace(**payload))  # JSON-normalised, as other backends
        with self._lock:
            ids = [job.id for job in stored]
            taken = [i for i in ids if i in self._jobs]
            if taken or len(set(ids)) != len(ids):
                raise DuplicateJob(taken[0] if taken else ids[0])
            for job in stored:
                self._store(job)
        return stored

    def get(self, job_id: str) -> Job | None:
        """See `Storage.get`."""
        return self._jobs.get(job_id)

    def get_many(self, job_ids: Sequence[str]) -> dict[str, Job]:
        """See `Storage.get_many`."""
        jobs = self._jobs
        return {i: job for i in job_ids if (job := jobs.get(i)) is not None}

    def job_states(self, job_ids: Sequence[str]) -> dict[str, str]:
        """See `qmlkit.storage.capabilities.BatchRead.job_states`."""
        jobs = self._jobs
        return {i: job.state.name for i in job_ids if (job := jobs.get(i)) is not None}

    def list_jobs(
        self,
        *,
        state: str | None = None,
        queue: str | None = None,
        method: str | None = None,
        limit: int = 100,
        offset: int = 0,
    ) -> list[Job]:
        """See `Storage.list_jobs`."""
        with self._lock:
            found = [
                j
                for j in self._jobs.values()
                if (state is None or j.state.name == state)
                and (queue is None or j.queue == queue)
                and (method is None or j.method == method)
            ]
        found.sort(key=lambda j: (j.created_at, j.id), reverse=True)
        return found[offset : offset + limit]

    def count_jobs(self) -> dict[tuple[str, str], int]:
        """See `Storage.count_jobs`."""
        counts: dict[tuple[str, str], int] = {}
        with self._lock:
            for job in self._jobs.values():
                key = (job.queue, job.state.name)
                counts[key] = counts.get(key, 0) + 1
        return counts

    def change_state(
        self,
        job_id: str,
        state: JobState,
        *,
        expected: Sequence[str] = (),
        expires_at: datetime | None = None,
    ) -> StateChange:
        """See `Storage.change_state`."""
        with self._lock:
            job = self._jobs.get(job_id)
            if job is None:
                raise JobNotFound(job_id)
            if expected and job.state.name not in expected:
                raise InvalidTransition(job_id, job.state.name, state.name)
            changed = job.with_state(state, expires_at=expires_at)
            self._store(changed)
            self._count(state)
        return StateChange(changed, job.state)

    # --- claim and fenced transitions ------------------------------------------------

    def claim_changes(
        self,
        *,
        worker_id: str,
        server_name: str,
        queues: Sequence[str],
        limit: int,
        now: datetime,
    ) -> list[StateChange]:
        """See `Storage.claim_changes`."""
        limit = max(1, min(limit, MAX_CLAIM))
        processing = Processing(started_at=now, worker_id=worker_id, server_name=server_name)
        claimed: list[StateChange] = []
        with self._lock:
            names = list(queues) if queues else list(self._heaps)
            heaps = [self._heaps[q] for q in names if self._heaps.get(q)]
            while heaps and len(claimed) < limit:
                best = min(heaps, key=lambda h: h[0])
                _, _, _, job_id = heapq.heappop(best)
                if not best:
                    heaps.remove(best)
                job = self._jobs.get(job_id)
                if job is None or job.state.name != "Enqueued":
                    continue  # a stale heap entry: the job moved on since it was pushed
                taken = job.with_state(processing, attempts=job.attempts + 1)
                self._history.setdefault(job_id, []).append(job.state)
                self._jobs[job_id] = taken
                claimed.append(StateChange(taken, job.state))
        return claimed

    def transition_many(self, items: Sequence[Transition]) -> list[Job | StaleClaim]:
        """See `Storage.transition_many`."""
        out: list[Job | StaleClaim] = []
        with self._lock:
            for item in items:
                current = self._jobs.get(item.job.id)
                if (
                    current is None
                    or current.state.name != "Processing"
                    or current.attempts != item.token
                ):
                    out.append(StaleClaim(item.job.id, item.token))
                    continue
                job = item.applied()
                progress = current.metadata.get("progress")
                if progress is not None and job.metadata.get("progress") is not progress:
                    # Reported while running: kept, as the SQL backends keep the column.
                    job = job._replace(metadata={**job.metadata, "progress": progress})
                self._store(job)
                self._count(job.state)
                out.append(job)
        return out

    def report_progress(self, job_id: str, *, token: int, progress: Mapping[str, Any]) -> bool:
        """See `Storage.report_progress`."""
        with self._lock:
            current = self._jobs.get(job_id)
            if (current is None or current.state.name != "Processing"
                    or current.attempts != token):
                return False
            self._jobs[job_id] = current._replace(
                metadata={**current.metadata, "progress": dict(progress)})
            return True

    # --- background duties -----------------------------------------------------------

    def promote_due(self, *, now: datetime, limit: int = 1000) -> list[StateChange]:
        """See `Storage.promote_due`."""
        changes = []
        with self._lock:
            due = [job_id for job_id, at in self._waiting.items() if at <= now][:limit]
            for job_id in due:
                job = self._jobs[job_id]
                promoted = job.with_state(Enqueued(enqueued_at=now, queue=job.queue))
                self._store(promoted)
                changes.append(StateChange(promoted, job.state))
        return changes

    def next_due_at(self) -> datetime | None:
        """See `Storage.next_due_at`."""
        with self._lock:
            return min(self._waiting.values(), default=None)

    def _requeue_where(self, now: datetime, reason: str, pred: Any) -> list[StateChange]:
        changes = []
        for job in list(self._jobs.values()):
            if isinstance(job.state, Processing) and pred(job.state):
                requeued = job.with_state(Enqueued(enqueued_at=now, queue=job.queue, reason=reason))
                self._store(requeued)
                changes.append(StateChange(requeued, job.state))
        return changes

    def requeue_stranded(
        self,
        *,
        started_before: datetime,
        now: datetime,
        exclude_servers: Sequence[str] = (),
    ) -> list[StateChange]:
        """See `Storage.requeue_stranded`."""
        excluded = set(exclude_servers)
        with self._lock:
            return self._requeue_where(
                now, "stranded",
                lambda s: s.started_at < started_before and s.server_name not in excluded)

    def delete_expired(self, *, now: datetime, limit: int = 1000) -> int:
        """See `Storage.delete_expired`."""
        with self._lock:
            doomed = [
                j.id
                for j in self._jobs.values()
                if j.expires_at is not None and j.expires_at <= now and j.state.name in _EXPIRABLE
            ][:limit]
            for job_id in doomed:
                del self._jobs[job_id]
                self._history.pop(job_id, None)
            horizon = minute_of(now - STATS_RETENTION)
            for key in [k for k in self._stats if k[0] < horizon]:
                del self._stats[key]
        return len(doomed)

    def job_history(self, job_id: str) -> list[JobState]:
        """See `Storage.job_history`."""
        with self._lock:
            job = self._jobs.get(job_id)
            if job is None:
                return []
            return [*self._history.get(job_id, ()), job.state]

    def throughput(self, *, since: datetime, until: datetime) -> list[tuple[datetime, int, int]]:
        """See `Storage.throughput`."""
        start = minute_of(since)
        with self._lock:
            minutes = sorted({m for m, _ in self._stats if start <= m <= until})
            return [(m, self._stats[(m, "Succeeded")], self._stats[(m, "Failed")])
                    for m in minutes]

    def _count(self, state: JobState) -> None:
        if state.name in ("Succeeded", "Failed"):
            at = state.succeeded_at if state.name == "Succeeded" else state.failed_at
            self._stats[(minute_of(at), state.name)] += 1

    # --- recurring templates -------------------------------------------------------------

    def upsert_recurring(self, template: RecurringJob, *, keep_schedule: bool = False) -> None:
        """See `Storage.upsert_recurring`."""
        with self._lock:
            existing = self._recurring.get(template.id)
            if keep_schedule and existing is not None:
                template = template.model_copy(update={"next_run_at": existing.next_run_at,
                                                       "last_run_at": existing.last_run_at})
            self._recurring[template.id] = template

    def get_recurring(self, template_id: str) -> RecurringJob | None:
        """See `Storage.get_recurring`."""
        return self._recurring.get(template_id)

    def list_recurring(self) -> list[RecurringJob]:
        """See `Storage.list_recurring`."""
        with self._lock:
            return sorted(self._recurring.values(), key=lambda t: t.id)

    def remove_recurring(self, template_id: str) -> bool:
        """See `Storage.remove_recurring`."""
        with self._lock:
            return self._recurring.pop(template_id, None) is not None

    def fire_recurring(
        self,
        template_id: str,
        *,
        expected_next_run_at: datetime,
        next_run_at: datetime,
        job: Job | None,
    ) -> bool:
        """See `Storage.fire_recurring`."""
        stored = None
        if job is not None:
            check_transition(job.id, None, job.state.name)
            payload = json.loads(encode_payload(job.args, job.kwargs, self.max_payload_bytes))
            stored = job._replace(**payload)
        with self._lock:
            template = self._recurring.get(template_id)
            if template is None or template.next_run_at != expected_next_run_at:
                return False
            if stored is not None and stored.id in self._jobs:
                raise DuplicateJob(stored.id)
            changes: dict[str, Any] = {"next_run_at": next_run_at}
            if stored is not None:
                changes["last_run_at"] = expected_next_run_at
                self._store(stored)
            self._recurring[template_id] = template.model_copy(update=changes)
        return True

    # --- server registry ---------------------------------------------------------------

    def register_server(self, info: ServerInfo) -> None:
        """See `Storage.register_server`."""
        with self._lock:
            self._servers[info.id] = info

    def heartbeat(self, server_id: str, *, now: datetime) -> bool:
        """See `Storage.heartbeat`."""
        with self._lock:
            info = self._servers.get(server_id)
            if info is None:
                return False
            self._servers[server_id] = info.model_copy(update={"last_heartbeat": now})
            return True

    def deregister_server(self, server_id: str) -> None:
        """See `Storage.deregister_server`."""
        with self._lock:
            self._servers.pop(server_id, None)

    def list_servers(self) -> list[ServerInfo]:
        """See `Storage.list_servers`."""
        with self._lock:
            return sorted(self._servers.values(), key=lambda s: s.started_at)

    def reclaim_dead_servers(
        self, *, heartbeat_before: datetime, now: datetime
    ) -> list[StateChange]:
        """See `Storage.reclaim_dead_servers`."""
        with self._lock:
            dead = {s.id for s in self._servers.values() if s.last_heartbeat < heartbeat_before}
            for server_id in dead:
                del self._servers[server_id]
            live = set(self._servers)
            return self._requeue_where(now, "reclaimed", lambda s: s.server_name in dead or (
                "#" in s.server_name and s.server_name not in live
                and s.started_at < heartbeat_before))
