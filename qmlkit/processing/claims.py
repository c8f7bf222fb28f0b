"""``ClaimLedger``: what one server holds — claimed jobs, running attempts, unstored outcomes.

A claim is keyed by ``(job id, fencing token)``: a job released to its queue may be
claimed again by another worker of the same server, and the two claims must not be
confused. A claim is *held* from `ClaimLedger.hold` until its attempt `finish`es or the
batch ends; it is *running* between `start` and `finish`; it is *released* once
``stop()``, ``abort()`` or the straggler duty has given it back to its queue (then no
worker may start it). Every operation takes the one lock, so each is atomic.

Invariants (tests/unit/test_claims.py):

- a released claim is never started, and a claim is released at most once;
- a running claim is held, and is running on exactly one worker;
- outcomes are taken at most once: `take_outcomes` empties what it returns;
- when a batch ends (`end_batch`) nothing of it is left in the ledger.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable, Iterable
from typing import Literal

from qmlkit.job import Job
from qmlkit.processing.context import JobContext
from qmlkit.storage.base import Transition

__all__ = ["RELEASE", "SKIP", "ClaimLedger", "claim_key"]

#: `ClaimLedger.start`: the claim was given back already; go on to the next job.
SKIP: Literal["skip"] = "skip"
#: `ClaimLedger.start`: the server is stopping; the claim is now marked released and the
#: caller must store its release to Enqueued.
RELEASE: Literal["release"] = "release"


def claim_key(job: Job) -> tuple[str, int]:
    """A claim's identity in a server: the job id and its fencing token (attempts)."""
    return job.id, job.attempts


class ClaimLedger:
    """The claims of one server's workers, under one lock."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._held: dict[tuple[str, int], Job] = {}
        self._owner: dict[tuple[str, int], str] = {}  # held claim -> the worker holding it
        self._running: dict[str, tuple[Job, JobContext]] = {}  # job id -> running attempt
        self._released: set[tuple[str, int]] = set()
        self._running_since: dict[str, float] = {}  # worker id -> its job's start, monotonic
        self._outcomes: dict[str, list[Transition]] = {}  # worker id -> outcomes not stored

    # --- a worker's batch ------------------------------------------------------------------

    def hold(self, jobs: Iterable[Job], worker_id: str) -> None:
        """Record a batch just claimed by ``worker_id``, and open its outcome box."""
        with self._lock:
            for job in jobs:
                self._held[claim_key(job)] = job
                self._owner[claim_key(job)] = worker_id
            self._outcomes[worker_id] = []

    def start(self, job: Job, worker_id: str, *, stopping: bool,
              make_context: Callable[[], JobContext]) -> JobContext | Literal["skip", "release"]:
        """Decide, atomically, whether ``worker_id`` may start its held ``job`` now.

        Args:
            job: A held claim of ``worker_id``.
            worker_id: The worker about to run it.
            stopping: Whether the server is stopping (then nothing new starts).
            make_context: Builds the attempt's context (called under the lock).

        Returns:
            The context to run the attempt with (it is now running); `SKIP` if the claim
            was released already (it is forgotten); `RELEASE` if ``stopping`` (it is
            marked released, and the caller stores its release).
        """
        key = claim_key(job)
        with self._lock:
            if key in self._released:
                self._released.discard(key)
                self._held.pop(key, None)
                self._owner.pop(key, None)
                return SKIP
            if stopping:
                self._released.add(key)
                return RELEASE
            context = make_context()
            self._running[job.id] = (job, context)
            self._running_since[worker_id] = time.monotonic()
            return context

    def finish(self, job: Job) -> None:
        """Forget a finished attempt: it is neither running nor held any more."""
        with self._lock:
            self._running.pop(job.id, None)
            self._held.pop(claim_key(job), None)
            self._owner.pop(claim_key(job), None)

    def add_outcome(self, worker_id: str, outcome: Transition) -> None:
        """Keep ``outcome`` in ``worker_id``'s box until it is taken."""
        with self._lock:
            box = self._outcomes.get(worker_id)
            if box is not None:
                box.append(outcome)

    def has_outcomes(self, worker_id: str) -> bool:
        """Whether ``worker_id``'s box holds outcomes not yet taken."""
        with self._lock:
            return bool(self._outcomes.get(worker_id))

    def take_outcomes(self, worker_id: str) -> list[Transition]:
        """Take the outcomes ``worker_id`` has gathered so far, leaving its box empty."""
        with self._lock:
            box = self._outcomes.get(worker_id)
            if not box:
                return []
            taken = box[:]
            box.clear()
            return taken

    def end_batch(self, worker_id: str, jobs: Iterable[Job]) -> None:
        """Forget everything of a batch: its box, its running mark, its claims."""
        with self._lock:
            self._outcomes.pop(worker_id, None)
            self._running_since.pop(worker_id, None)
            for job in jobs:
                key = claim_key(job)
                self._held.pop(key, None)
                self._owner.pop(key, None)
                self._released.discard(key)

    # --- giving claims back ----------------------------------------------------------------

    def release_unstarted(self) -> list[Job]:
        """Mark released, and return, every held claim no worker has started."""
        with self._lock:
            idle = [job for key, job in self._held.items()
                    if key[0] not in self._running and key not in self._released]
            self._released.update(claim_key(job) for job in idle)
            return idle

    def release_running(self) -> list[Job]:
        """Cancel every running attempt; mark released, and return, those not released yet."""
        with self._lock:
            running = [job for job, _ in self._running.values()
                       if claim_key(job) not in self._released]
            for _, context in self._running.values():
                context.cancelled.set()
            self._released.update(claim_key(job) for job in running)
            return running

    def stuck_workers(self, threshold_s: float) -> set[str]:
        """Workers whose current attempt has run longer than ``threshold_s`` seconds."""
        now = time.monotonic()
        with self._lock:
            return {w for w, since in self._running_since.items() if now - since > threshold_s}

    def release_waiting(self, workers: set[str]) -> list[Job]:
        """Mark released, and return, the unstarted claims held by ``workers``."""
        with self._lock:
            waiting = [job for key, job in self._held.items()
                       if self._owner.get(key) in workers and key[0] not in self._running
                       and key not in self._released]
            self._released.update(claim_key(job) for job in waiting)
            return waiting

    # --- inspection ------------------------------------------------------------------------

    def held(self) -> list[Job]:
        """Every held claim now (a copy)."""
        with self._lock:
            return list(self._held.values())

    def running(self) -> list[Job]:
        """Every running attempt's job now (a copy)."""
        with self._lock:
            return [job for job, _ in self._running.values()]

    def is_empty(self) -> bool:
        """Whether nothing is held, running, released or boxed."""
        with self._lock:
            return not (self._held or self._owner or self._running or self._released
                        or self._running_since or self._outcomes)
