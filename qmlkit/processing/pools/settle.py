"""What the process pool's supervisor stores for a child that ended without stopping.

The storage is the truth: every job still Processing under the child's server name is
either an attempt the child reported running (it ends as `JobTimeout` if it overran,
`WorkerLost` if the child died under it, or is released when the supervisor killed the
child for another attempt's overrun or during a stop), or a claim the child had not
started, or an attempt that finished without its outcome being stored (both released to
their queue at once, no retry used). Every write is a fenced transition: a stale one (the
child stored it, or a peer reclaimed it) is rejected and ignored, so nothing is done
twice. The child's registry row is removed afterwards.
"""

from __future__ import annotations

import logging
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from qmlkit.errors import JobTimeout, WorkerLost
from qmlkit.job import Enqueued, Job, utcnow
from qmlkit.processing import outcome
from qmlkit.processing.config import ServerConfig
from qmlkit.storage.base import StateChange, Storage, Transition

__all__ = ["Ending", "processing_jobs_of", "settle"]

log = logging.getLogger("qmlkit.processing.pools")

#: Jobs read per page when looking for a dead child's Processing jobs.
PAGE = 1000


@dataclass
class Ending:
    """How one child ended, as the supervisor saw it.

    Attributes:
        server_name: The child's ``server_name`` (its jobs are stamped
            ``<server_name>#<uuid>``).
        exitcode: ``Process.exitcode``: ``-N`` for signal ``N``.
        running: ``(job id, fencing token) -> timeout_s`` of attempts reported begun and
            not ended.
        overran: The attempts the child was killed for (hard timeout).
        release_running: Release running attempts instead of failing them (the
            supervisor killed the child itself: another attempt's overrun, or a stop).
    """

    server_name: str
    exitcode: int | None
    running: dict[tuple[str, int], float | None] = field(default_factory=dict)
    overran: set[tuple[str, int]] = field(default_factory=set)
    release_running: bool = False


def processing_jobs_of(storage: Storage, server_name: str) -> list[Job]:
    """Every Processing job claimed by a server named ``server_name`` (``name`` or
    ``name#uuid``), read in pages of `PAGE`."""
    found: list[Job] = []
    offset = 0
    while True:
        page = storage.list_jobs(state="Processing", limit=PAGE, offset=offset)
        for job in page:
            stamped = getattr(job.state, "server_name", "")
            if stamped.partition("#")[0] == server_name:
                found.append(job)
        if len(page) < PAGE:
            return found
        offset += PAGE


def _outcome_for(job: Job, ending: Ending, registry: Mapping[str, Any],
                 config: ServerConfig) -> tuple[Transition, str]:
    key = (job.id, job.attempts)
    runnable = registry.get(job.method)
    policy = getattr(runnable, "retry", None) or config.retry
    if key in ending.overran:
        timeout = ending.running.get(key) or 0.0
        error = JobTimeout(timeout, killed_exitcode=ending.exitcode)
        return outcome.failed(job, error, policy, ttl=config.failed_ttl), "timeout"
    if key in ending.running and not ending.release_running:
        return outcome.failed(job, WorkerLost(ending.exitcode), policy,
                              ttl=config.failed_ttl), "lost"
    why = ("running when its process was stopped" if key in ending.running
           else "claimed but not started (or not stored) when its process ended")
    state = Enqueued(enqueued_at=utcnow(), queue=job.queue,
                     reason=f"released: {why} (exit code {ending.exitcode})")
    return Transition(job, state), "released"


def settle(storage: Storage, ending: Ending, *, registry: Mapping[str, Any],
           config: ServerConfig, store: Any) -> dict[str, int]:
    """Store the outcome of everything a child left in Processing; remove its row.

    Args:
        storage: The supervisor's own opened storage.
        ending: How the child ended.
        registry: The app's job names -> runnables (their retry policies).
        config: The pool's configuration (retry policy and TTLs).
        store: ``store(transitions) -> list[StateChange] | None``: stores fenced
            transitions (retrying while the storage is down).

    Returns:
        Counts by kind: ``{"timeout": n, "lost": n, "released": n}``, of transitions
        the storage accepted.
    """
    jobs = processing_jobs_of(storage, ending.server_name)
    planned = [_outcome_for(job, ending, registry, config) for job in jobs]
    counts = {"timeout": 0, "lost": 0, "released": 0}
    for start in range(0, len(planned), PAGE):
        chunk = planned[start:start + PAGE]
        changes = store([item for item, _ in chunk]) or []
        stored = {change.job.id for change in changes}
        for item, kind in chunk:
            if item.job.id in stored:
                counts[kind] += 1
    _deregister(storage, ending.server_name)
    return counts


def _deregister(storage: Storage, server_name: str) -> None:
    for info in storage.list_servers():
        if info.name == server_name or info.id.partition("#")[0] == server_name:
            storage.deregister_server(info.id)


def accepted(changes: Sequence[StateChange] | None, items: Iterable[Transition]) -> int:
    """How many of ``items`` are among the committed ``changes``."""
    ids = {change.job.id for change in changes or ()}
    return sum(1 for item in items if item.job.id in ids)
