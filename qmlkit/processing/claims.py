"""``ClaimLedger``: what one server holds — claimed jobs, running attempts, unstored outcomes.

A claim is keyed by ``(job id, fencing token)``: a job released to its queue may be
claimed again by another worker of the same server, and the two claims must not be
confused. A claim is *held* from `ClaimLedger.hold` until its attempt `finish`es or the
batch ends; it is *running* between `start` and `finish`; it is *released* once
``stop()``, ``abort()`` or the straggler duty has given it back to its queue (then no
worker may start it). Every operation takes the one lock, so each is atomic.

The ledger also knows, without asking the storage, whether this server's claims may
have been taken from it (a *zombie*: a server paused by SIGSTOP, a long GC or a VM
migration, or cut off from its storage, that peers presumed dead). Two things make a
claim lost (issue #17, "a zombie stops at once"):

- the server's last successful heartbeat is older than the *heartbeat trust window*
  (``dead_server_timeout`` less a margin, `trust_window`): a peer may have presumed it
  dead and reclaimed its jobs. The heartbeat duty records each success with `beat`;
  when the storage answers that the row is gone, it calls `presumed_dead`;
- the batch was claimed longer ago than the *claim trust window* (from
  ``stale_processing_after``, past which any server's stranded sweep may requeue it).

When a claim is lost, `start` answers `LOST` instead of starting it, every running
attempt's ``context.cancelled`` is set (cooperative jobs stop), and every batch whose
claim *began* (the clock reading the pool passes to `hold`) before that moment is lost
too, even one the worker only holds after the server was trusted again (a process
stopped between its claim's commit and `hold`). Fencing makes the rest safe: the
caller gives its unstarted claims back with a fenced release, which the storage rejects
for a job already reclaimed, so a reclaimed job is never touched by the zombie.

How any pool (threads, asyncio, processes) uses it, per batch::

    if not ledger.trusted():                 # before claiming: wait for a heartbeat
        ledger.wait_trusted(timeout_s)
    began = ledger.clock()                   # before the claim's storage call
    jobs = storage.claim(...)
    ledger.hold(jobs, worker_id, claimed_at=began)
    for job in jobs:
        ctx = ledger.start(job, worker_id, stopping=..., make_context=...)
        if ctx == LOST:                      # no storage round trip was needed to know
            release(ledger.release_waiting({worker_id}))   # fenced; then stop the batch
            break
        ...
    ledger.end_batch(worker_id, jobs)

Invariants (tests/unit/test_claims.py):

- a released claim is never started, and a claim is released at most once;
- a running claim is held, and is running on exactly one worker;
- outcomes are taken at most once: `take_outcomes` empties what it returns;
- when a batch ends (`end_batch`) nothing of it is left in the ledger;
- a claim is never started once lost: not after its server's heartbeat trust window
  has passed, not after `presumed_dead`, not past its claim trust window.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable, Iterable
from typing import TYPE_CHECKING, Literal

from qmlkit.job import Job
from qmlkit.processing.context import JobContext
from qmlkit.storage.base import Transition

if TYPE_CHECKING:
    from qmlkit.processing.config import ServerConfig

__all__ = ["LOST", "RELEASE", "SKIP", "ClaimLedger", "claim_key", "trust_window"]

#: `ClaimLedger.start`: the claim was given back already; go on to the next job.
SKIP: Literal["skip"] = "skip"
#: `ClaimLedger.start`: the server is stopping; the claim is now marked released and the
#: caller must store its release to Enqueued.
RELEASE: Literal["release"] = "release"
#: `ClaimLedger.start`: the claim may have been reclaimed (the server may have been
#: presumed dead, or the batch is older than its claim trust window): it was not
#: started. The caller releases its unstarted claims (`ClaimLedger.release_waiting`,
#: fenced) and ends the batch.
LOST: Literal["lost"] = "lost"


def trust_window(timeout_s: float, margin_s: float) -> float:
    """How long, in seconds, evidence of being alive is trusted: ``timeout_s`` less a
    margin of ``margin_s`` (half of ``timeout_s`` at most).

    The margin covers clock skew between servers (peers compare this server's heartbeat,
    stamped with its wall clock, with their own) and the time from the check to the
    job's start. With the defaults, a heartbeat is trusted for 30 - 5 = 25 s.

    Args:
        timeout_s: When peers may take this server's claims: ``dead_server_timeout`` or
            ``stale_processing_after``, in seconds.
        margin_s: ``heartbeat_interval`` or ``stale_sweep_interval``, in seconds.
    """
    return timeout_s - min(margin_s, timeout_s / 2)


def claim_key(job: Job) -> tuple[str, int]:
    """A claim's identity in a server: the job id and its fencing token (attempts)."""
    return job.id, job.attempts


class ClaimLedger:
    """The claims of one server's workers, under one lock. See the module docstring.

    Args:
        heartbeat_trust_s: How long a successful heartbeat keeps claims trusted, in
            seconds (`trust_window` of ``dead_server_timeout``); ``None`` when the server
            does not heartbeat (then only ``claim_trust_s`` applies).
        claim_trust_s: How long after its claim a batch may still start jobs, in seconds
            (`trust_window` of ``stale_processing_after``); ``None``: for ever.
        clock: Monotonic seconds (`time.monotonic`; tests pass a fake). Its readings are
            what `beat` takes.
    """

    def __init__(self, *, heartbeat_trust_s: float | None = None,
                 claim_trust_s: float | None = None,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self._lock = threading.Lock()
        self._trusted = threading.Condition(self._lock)  # notified by `beat`
        self.heartbeat_trust_s = heartbeat_trust_s
        self.claim_trust_s = claim_trust_s
        self.clock = clock
        self._last_beat: float | None = None  # clock reading when the last good beat began
        self._suspect = False  # lost since the last good beat (cancelled once per episode)
        self._lost_at: float | None = None  # clock reading when claims were last lost
        self._batch: dict[str, float] = {}  # worker id -> clock reading before its claim
        self._held: dict[tuple[str, int], Job] = {}
        self._owner: dict[tuple[str, int], str] = {}  # held claim -> the worker holding it
        self._running: dict[str, tuple[Job, JobContext]] = {}  # job id -> running attempt
        self._released: set[tuple[str, int]] = set()
        self._running_since: dict[str, float] = {}  # worker id -> its job's start, monotonic
        self._outcomes: dict[str, list[Transition]] = {}  # worker id -> outcomes not stored

    @classmethod
    def for_config(cls, config: ServerConfig) -> ClaimLedger:
        """A ledger with the trust windows of ``config`` (`trust_window`): the heartbeat's
        from ``dead_server_timeout`` and ``heartbeat_interval`` (heartbeats on only), the
        claim's from ``stale_processing_after`` and ``stale_sweep_interval``."""
        heartbeat = (trust_window(config.dead_server_timeout.total_seconds(),
                                  config.heartbeat_interval.total_seconds())
                     if config.enable_heartbeat else None)
        claim = trust_window(config.stale_processing_after.total_seconds(),
                             config.stale_sweep_interval.total_seconds())
        return cls(heartbeat_trust_s=heartbeat, claim_trust_s=claim)

    # --- is this server still the owner of its claims? (no storage round trip) -----------

    def beat(self, began: float) -> None:
        """Record a successful heartbeat (or registration) that began at ``began``.

        Args:
            began: A `clock` reading taken before the storage call: the storage then
                held a heartbeat no older than this.
        """
        with self._lock:
            if self._last_beat is None or began > self._last_beat:
                self._last_beat = began
            if self._trusted_locked():
                self._suspect = False
                self._trusted.notify_all()

    def presumed_dead(self) -> list[Job]:
        """The storage answered that this server's registry row is gone (a peer presumed it
        dead and reclaimed its jobs, or it was pruned): lose every claim held now.

        Every running attempt's ``context.cancelled`` is set, and every batch claimed
        before now answers `LOST` at its next `start`. The caller then registers again and `beat`s.

        Returns:
            The jobs of the attempts cancelled (a copy), for the log.
        """
        with self._lock:
            return self._lose_locked()

    def trusted(self) -> bool:
        """Whether the last successful heartbeat is recent enough that no peer can have
        presumed this server dead. No storage round trip.

        Always true without heartbeats, and before the first `beat`: a server that has
        not registered (an unstarted one, as inline mode's) stamps its claims with its
        plain name, which heartbeat reclaim never takes; only the claim trust window
        applies to them.
        """
        with self._lock:
            return self._trusted_locked()

    def wait_trusted(self, timeout_s: float) -> bool:
        """Wait up to ``timeout_s`` seconds for `trusted` (a `beat`); return it."""
        with self._lock:
            return self._trusted.wait_for(self._trusted_locked, timeout_s)

    def check(self) -> bool:
        """Lose every claim if `trusted` no longer holds (see `presumed_dead`).

        Called by the heartbeat duty before each heartbeat, so running attempts are
        cancelled even when no worker is about to start a job.

        Returns:
            Whether claims were lost by this call (once per episode of distrust).
        """
        with self._lock:
            if self._trusted_locked() or self._suspect:
                return False
            self._lose_locked()
            return True

    def heartbeat_age(self) -> float | None:
        """Seconds since the last successful heartbeat began; ``None`` before the first."""
        with self._lock:
            return None if self._last_beat is None else self.clock() - self._last_beat

    def _trusted_locked(self) -> bool:
        if self.heartbeat_trust_s is None or self._last_beat is None:
            return True  # not registered (yet): its claims carry no registered id
        return self.clock() - self._last_beat < self.heartbeat_trust_s

    def _lose_locked(self) -> list[Job]:
        self._lost_at = self.clock()
        self._suspect = True
        for _, context in self._running.values():
            context.cancelled.set()
        return [job for job, _ in self._running.values()]

    def _batch_lost_locked(self, worker_id: str) -> bool:
        now = self.clock()  # one reading for both windows
        if (self.heartbeat_trust_s is not None and self._last_beat is not None
                and now - self._last_beat >= self.heartbeat_trust_s):  # not trusted
            if not self._suspect:
                self._lose_locked()
            return True
        began = self._batch.get(worker_id)
        if began is None:
            return False
        return (self._lost_at is not None and began <= self._lost_at) or (
            self.claim_trust_s is not None and now - began >= self.claim_trust_s)

    # --- a worker's batch ------------------------------------------------------------------

    def hold(self, jobs: Iterable[Job], worker_id: str, *,
             claimed_at: float | None = None) -> None:
        """Record a batch just claimed by ``worker_id``, and open its outcome box.

        Args:
            jobs: The claimed jobs, in claim order.
            worker_id: The worker that claimed them.
            claimed_at: A `clock` reading taken before the claim's storage call; the
                batch's claims are lost if claims were lost after it, or once it is
                older than the claim trust window. ``None``: now (only for a batch
                claimed without a storage call, e.g. in tests).
        """
        with self._lock:
            for job in jobs:
                self._held[claim_key(job)] = job
                self._owner[claim_key(job)] = worker_id
            self._outcomes[worker_id] = []
            self._batch[worker_id] = self.clock() if claimed_at is None else claimed_at

    def start(
        self, job: Job, worker_id: str, *, stopping: bool,
        make_context: Callable[[], JobContext],
    ) -> JobContext | Literal["skip", "release", "lost"]:
        """Decide, atomically, whether ``worker_id`` may start its held ``job`` now.

        Args:
            job: A held claim of ``worker_id``.
            worker_id: The worker about to run it.
            stopping: Whether the server is stopping (then nothing new starts).
            make_context: Builds the attempt's context (called under the lock).

        Returns:
            The context to run the attempt with (it is now running); `SKIP` if the claim
            was released already (it is forgotten); `RELEASE` if ``stopping`` (it is
            marked released, and the caller stores its release); `LOST` if the claim may
            have been reclaimed (see the module docstring: nothing is marked; the caller
            releases with ``release_waiting({worker_id})`` and ends the batch).
        """
        key = (job.id, job.attempts)  # claim_key, inline: once per attempt
        with self._lock:
            if key in self._released:
                self._released.discard(key)
                self._held.pop(key, None)
                self._owner.pop(key, None)
                return SKIP
            if stopping:
                self._released.add(key)
                return RELEASE
            if self._batch_lost_locked(worker_id):
                return LOST
            context = make_context()
            self._running[job.id] = (job, context)
            self._running_since[worker_id] = time.monotonic()
            return context

    def finish(self, job: Job, outcome: tuple[str, Transition] | None = None) -> None:
        """Forget a finished attempt: it is neither running nor held any more.

        Args:
            job: The attempt's job.
            outcome: ``(worker id, transition)`` to keep in that worker's box as
                `add_outcome` does, under the same lock (one acquisition per attempt on
                the hot path); ``None``: no outcome (the attempt raised inside qmlkit).
        """
        key = (job.id, job.attempts)
        with self._lock:
            self._running.pop(job.id, None)
            self._held.pop(key, None)
            self._owner.pop(key, None)
            if outcome is not None:
                box = self._outcomes.get(outcome[0])
                if box is not None:
                    box.append(outcome[1])

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
            self._batch.pop(worker_id, None)
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

    def release_running(self) -> tuple[list[Job], list[Job]]:
        """Cancel every running attempt; mark released those not released yet, and return
        them in two lists: ``(within their timeout, past it)``. The caller releases the
        first to their queues and fails the second with ``JobTimeout`` (an attempt past
        its timeout has had its time: released, a ``def`` job that never returns would
        come back at every stop, its retries never used)."""
        with self._lock:
            running = [(job, context) for job, context in self._running.values()
                       if claim_key(job) not in self._released]
            for _, context in self._running.values():
                context.cancelled.set()
            self._released.update(claim_key(job) for job, _ in running)
        return ([job for job, context in running if not context.timed_out],
                [job for job, context in running if context.timed_out])

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

    def any_running(self) -> bool:
        """Whether any attempt runs now (cheaper than ``bool(running())``)."""
        with self._lock:
            return bool(self._running)

    def is_empty(self) -> bool:
        """Whether nothing is held, running, released or boxed."""
        with self._lock:
            return not (self._held or self._owner or self._running or self._released
                        or self._running_since or self._outcomes or self._batch)
