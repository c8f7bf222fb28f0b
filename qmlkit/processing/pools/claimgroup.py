"""``ClaimGroup``: worker threads that want jobs at the same moment share one claim.

Each worker thread of the thread pool still claims its own batch, sized by its own
`qmlkit.processing.pools.threads.BatchSize`, and waits at the idle gate itself when
nothing came. But only one storage claim of a pool is in flight at a time: a thread that
asks while another's claim is running waits for it, and the next claim serves every
thread that asked meanwhile, in the order they asked (a *leader* claims for its
*followers*, then each takes its share). So under load the number of claims (each a
transaction, and a connection from the storage's pool) grows with the jobs claimed, not
with the threads: 40 threads each claiming one slow job at a time had made 40 claims
where one would do, and drained slower than 10 threads (issue #16 item 6).

Nothing waits on a timer: a thread alone claims at once, as before. A share is held in
the server's `ClaimLedger` under its thread's worker id by the leader (`ClaimLedger.hold`,
with the leader's clock reading from before the claim), so stop, the straggler duty and
the zombie checks see it before its thread wakes. Every claim is made, and stamped on
its jobs' Processing state, with the pool's id (``<server name>:threads``), not a
thread's: a storage that replays a claim whose reply was lost (qmlkit-redis keys it by
server and worker id) replays it on the pool's next claim, whoever leads it, and any
job a claim returns beyond what was asked goes to the first share. One claim at a time
also keeps two claims from sharing that key at once (two at a time were tried, and
were no faster: docs/benchmarks.md). Group commit in databases and Dramatiq's one
consumer thread per queue feeding its worker threads are the same idea.
"""

from __future__ import annotations

import threading
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from qmlkit.job import Job
    from qmlkit.processing.claims import ClaimLedger
    from qmlkit.processing.idle import IdleGate

__all__ = ["CLAIM_MOST", "ClaimGroup", "Share"]

#: Most jobs one storage claim of a group asks for (``ServerConfig.fetch_batch_size``'s
#: own maximum); threads past it wait for the next claim.
CLAIM_MOST = 1000


@dataclass(frozen=True)
class Share:
    """What one thread got from a claim.

    Attributes:
        jobs: Its jobs, in claim order (held for it in the ledger already); may be
            empty, and may exceed the thread's limit when a storage replays a lost claim.
        seen: The idle gate's sequence number read before the claim (`IdleGate.wait`).
        began: The ledger's clock read before the claim (``claimed_at`` of `hold`).
        full: Whether the claim returned every job it asked for (more may be waiting).
    """

    jobs: list[Job]
    seen: int
    began: float
    full: bool


class _Ask:
    """One thread's request: answered with a `Share` or the claim's exception."""

    __slots__ = ("error", "limit", "share", "taken", "wake", "worker_id")

    def __init__(self, worker_id: str, limit: int, lock: threading.Lock) -> None:
        self.worker_id = worker_id
        self.limit = limit
        self.share: Share | None = None
        self.error: BaseException | None = None
        self.taken = False  # a leader's claim is serving it
        self.wake = threading.Condition(lock)  # only this thread waits on it


class ClaimGroup:
    """One claim in flight at a time for a pool's threads (see the module's text).

    Args:
        claim: ``claim(worker_id, limit) -> jobs``: one storage claim (with observers
            told, `claim_jobs`); raises what the storage raises.
        idle: The server's idle gate (its sequence number is read before each claim).
        claims: The server's claim ledger (shares are held in it).
        pool_id: The worker id every claim is made with (stamped on its jobs).
    """

    def __init__(self, claim: Callable[[str, int], list[Job]], *, idle: IdleGate,
                 claims: ClaimLedger, pool_id: str) -> None:
        self._claim = claim
        self._idle = idle
        self._claims = claims
        self.pool_id = pool_id
        self._lock = threading.Lock()
        self._asks: list[_Ask] = []  # waiting for the next claim, in order; under _lock
        self._claiming = False  # a claim is in flight; under _lock

    def claim(self, worker_id: str, limit: int) -> Share:
        """Claim up to ``limit`` jobs for ``worker_id``, with every thread asking now.

        Args:
            worker_id: The asking worker thread (its share is held under this id).
            limit: Most jobs it wants, 1 to `CLAIM_MOST`.

        Returns:
            Its share (possibly empty: the queues had no more).

        Raises:
            Exception: What the storage claim raised (every thread of that claim gets
                it; nothing was claimed); callers retry with backoff.
        """
        ask = _Ask(worker_id, max(1, min(limit, CLAIM_MOST)), self._lock)
        with self._lock:
            self._asks.append(ask)
        while True:
            with self._lock:
                while (ask.share is None and ask.error is None
                       and (ask.taken or self._claiming)):
                    ask.wake.wait()
                if ask.error is not None:
                    raise ask.error
                if ask.share is not None:
                    return ask.share
                self._claiming = True  # this thread leads the next claim
                group = self._take_group()
            try:
                self._lead(group)
            finally:
                with self._lock:
                    self._claiming = False
                    for served in group:  # wake only the threads it concerns:
                        if served.share is None and served.error is None:  # _lead broke
                            served.error = RuntimeError("the claim serving this thread "
                                                        "ended without an answer")
                        served.wake.notify()
                    if self._asks:  # and the oldest one waiting, to lead the next claim
                        self._asks[0].wake.notify()

    def _take_group(self) -> list[_Ask]:
        """The asks the next claim serves, oldest first, `CLAIM_MOST` jobs at most."""
        total, count = 0, 0
        for ask in self._asks:
            if count and total + ask.limit > CLAIM_MOST:
                break
            total += ask.limit
            count += 1
        group, self._asks = self._asks[:count], self._asks[count:]
        for ask in group:
            ask.taken = True
        return group

    def _lead(self, group: list[_Ask]) -> None:
        """Make one storage claim for ``group`` and give each its share."""
        total = sum(ask.limit for ask in group)
        seen = self._idle.seen()
        began = self._claims.clock()  # the claim's lease starts before it
        try:
            jobs = self._claim(self.pool_id, total)
        except BaseException as exc:  # handed to every thread of the claim
            for ask in group:
                ask.error = exc
            if not isinstance(exc, Exception):
                raise
            return
        full, taken = len(jobs) >= total, 0
        shares: list[list[Job]] = []
        for ask in group:
            shares.append(jobs[taken:taken + ask.limit])
            taken += len(shares[-1])
        # A storage may return more than asked: Redis replays a claim whose reply was
        # lost, with that claim's own limit. Every job claimed must reach a thread.
        shares[0].extend(jobs[taken:])
        for ask, share in zip(group, shares, strict=True):
            if share:
                self._claims.hold(share, ask.worker_id, claimed_at=began)
            ask.share = Share(share, seen, began, full)
