"""The thread pool's shared claim (qmlkit.processing.pools.claimgroup) and its shared
storer (qmlkit.processing.pools.storer), without a storage: the claim is a list of jobs
handed out in order, the store a list of calls."""

from __future__ import annotations

import threading
from collections.abc import Sequence
from datetime import timedelta
from types import SimpleNamespace
from typing import Any

import pytest

from qmlkit.job import Enqueued, Job, utcnow
from qmlkit.processing.claims import ClaimLedger
from qmlkit.processing.idle import IdleGate
from qmlkit.processing.pools import storer as storer_module
from qmlkit.processing.pools.claimgroup import CLAIM_MOST, ClaimGroup, Share
from qmlkit.processing.pools.storer import FLUSH_AT, OutcomeStorer
from qmlkit.storage.base import Transition
from qmlkit.testing import make_job, wait_until


class Queue:
    """Jobs to claim, in order; each call recorded as ``(stamp, limit)``. A claim can be
    held inside the call (``gate``) so that other threads ask meanwhile."""

    def __init__(self, count: int) -> None:
        self.jobs = [make_job("t", args=[n], id=f"job-{n}") for n in range(count)]
        self.calls: list[tuple[str, int]] = []
        self.gate: threading.Event | None = None
        self.inside = threading.Event()
        self.fail: Exception | None = None
        self.extra = 0  # jobs returned beyond the limit

    def claim(self, stamp: str, limit: int) -> list[Job]:
        self.calls.append((stamp, limit))
        self.inside.set()
        if self.gate is not None:
            assert self.gate.wait(10)
        if self.fail is not None:
            raise self.fail
        taken, self.jobs = self.jobs[:limit + self.extra], self.jobs[limit + self.extra:]
        return taken


def _group(queue: Queue) -> tuple[ClaimGroup, ClaimLedger]:
    ledger = ClaimLedger()
    return ClaimGroup(queue.claim, idle=IdleGate(), claims=ledger, pool_id="s:threads"), ledger


def _ask_in_thread(group: ClaimGroup, worker_id: str, limit: int,
                   results: dict[str, Share | BaseException]) -> threading.Thread:
    def ask() -> None:
        try:
            results[worker_id] = group.claim(worker_id, limit)
        except Exception as exc:  # the test reads it
            results[worker_id] = exc

    thread = threading.Thread(target=ask, daemon=True)
    thread.start()
    return thread


def _waiting(group: ClaimGroup, count: int) -> bool:
    with group._lock:
        return len(group._asks) == count


def _while_a_claim_runs(queue: Queue, group: ClaimGroup, first_limit: int,
                        asks: list[tuple[str, int]]) -> dict[str, Share | BaseException]:
    """Hold w0's claim (of ``first_limit``) inside the storage call, let ``asks``
    (worker id, limit) queue up behind it one by one, then let it finish; return every
    thread's result."""
    queue.gate = threading.Event()
    results: dict[str, Share | BaseException] = {}
    threads = [_ask_in_thread(group, "w0", first_limit, results)]
    assert queue.inside.wait(10)
    for n, (worker_id, limit) in enumerate(asks, start=1):
        threads.append(_ask_in_thread(group, worker_id, limit, results))
        wait_until(lambda n=n: _waiting(group, n), timeout=10)
    queue.gate.set()
    for thread in threads:
        thread.join(10)
    return results


def test_a_thread_alone_claims_at_once_with_its_own_limit() -> None:
    queue = Queue(10)
    group, ledger = _group(queue)
    share = group.claim("s:worker:0", 4)
    assert queue.calls == [("s:threads", 4)]  # every claim carries the pool's id
    assert [j.id for j in share.jobs] == [f"job-{n}" for n in range(4)] and share.full
    assert ledger.held() == share.jobs  # held for it before it runs them
    rest = group.claim("s:worker:0", 50)
    assert len(rest.jobs) == 6 and not rest.full  # the queue ran out: not full


def test_threads_asking_during_a_claim_share_the_next_one_in_order() -> None:
    # Given a claim in flight for worker 0, when three more threads ask while it runs
    queue = Queue(20)
    group, ledger = _group(queue)
    results = _while_a_claim_runs(queue, group, 2, [("w1", 3), ("w2", 1), ("w3", 5)])
    # Then one more storage claim serves all three, stamped with the pool's id
    assert queue.calls == [("s:threads", 2), ("s:threads", 9)]
    shares = {w: r for w, r in results.items() if isinstance(r, Share)}
    assert len(shares) == 4
    assert [j.args[0] for j in shares["w1"].jobs] == [2, 3, 4]
    assert [j.args[0] for j in shares["w2"].jobs] == [5]
    assert [j.args[0] for j in shares["w3"].jobs] == [6, 7, 8, 9, 10]
    assert all(s.full for s in shares.values())
    # and each share is held in the ledger under its own thread's id
    for worker_id, share in shares.items():
        released = ledger.release_waiting({worker_id})
        assert [j.id for j in released] == [j.id for j in share.jobs]


def test_when_the_queue_runs_short_the_first_askers_get_the_jobs() -> None:
    queue = Queue(3)
    group, _ = _group(queue)
    results = _while_a_claim_runs(queue, group, 1, [("w1", 2), ("w2", 2)])
    w1, w2 = results["w1"], results["w2"]
    assert isinstance(w1, Share) and isinstance(w2, Share)
    assert len(w1.jobs) == 2 and w2.jobs == [] and not w1.full and not w2.full


def test_a_failed_claim_is_raised_in_every_thread_it_served_and_the_next_works() -> None:
    queue = Queue(5)
    group, ledger = _group(queue)
    queue.fail = ConnectionError("storage down")
    results = _while_a_claim_runs(queue, group, 1, [("w1", 1), ("w2", 1)])
    assert set(results) == {"w0", "w1", "w2"}
    assert all(isinstance(r, ConnectionError) for r in results.values())
    assert ledger.held() == []  # nothing was claimed, nothing is held
    queue.fail = None
    assert len(group.claim("w0", 5).jobs) == 5


def test_asks_past_the_most_one_claim_takes_wait_for_the_next() -> None:
    queue = Queue(CLAIM_MOST + 10)
    group, _ = _group(queue)
    results = _while_a_claim_runs(queue, group, 1, [("w1", CLAIM_MOST), ("w2", 5)])
    assert [limit for _, limit in queue.calls] == [1, CLAIM_MOST, 5]
    sizes = {w: len(r.jobs) for w, r in results.items() if isinstance(r, Share)}
    assert sizes == {"w0": 1, "w1": CLAIM_MOST, "w2": 5}


def test_jobs_beyond_what_was_asked_reach_a_thread_none_is_dropped() -> None:
    # Given a storage that returns 15 more than asked (as Redis replaying a lost claim)
    queue = Queue(40)
    queue.extra = 15
    group, ledger = _group(queue)
    results = _while_a_claim_runs(queue, group, 2, [("w1", 3), ("w2", 1)])
    # Then every job returned is in a thread's share and held for that thread
    shares = {w: r for w, r in results.items() if isinstance(r, Share)}
    assert [len(shares[w].jobs) for w in ("w0", "w1", "w2")] == [17, 18, 1]
    assert len({j.id for j in ledger.held()}) == 36


# --- the shared storer ---------------------------------------------------------------------


class Runtime:
    """What the storer uses of a server: its config's window and store_outcomes."""

    def __init__(self, window_s: float, *, fail_first: bool = False) -> None:
        self.config = SimpleNamespace(prefetch_window=timedelta(seconds=window_s))
        self.stored: list[list[Transition]] = []
        self.fail_first = fail_first

    def store_outcomes(self, outcomes: Sequence[Transition]) -> None:
        if self.fail_first:
            self.fail_first = False
            raise RuntimeError("a bug in a storage")
        self.stored.append(list(outcomes))


def _outcome(n: int) -> Transition:
    job = make_job("t", args=[n], id=f"job-{n}")
    return Transition(job, Enqueued(enqueued_at=utcnow(), queue=job.queue))


def _storer(runtime: Any) -> OutcomeStorer:
    storer = OutcomeStorer(runtime, name="test-storer")
    storer.start()
    return storer


def test_the_storer_stores_together_what_gathers_within_a_window() -> None:
    runtime = Runtime(window_s=0.5)
    storer = _storer(runtime)
    for n in range(5):
        storer.add(_outcome(n))
    wait_until(lambda: runtime.stored, timeout=10)
    assert [len(batch) for batch in runtime.stored] == [5]
    storer.close()
    storer.thread.join(10)
    assert not storer.thread.is_alive()


def test_flush_stores_at_once_and_flush_at_outcomes_do_not_wait(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setattr(storer_module, "MAX_WAIT_S", 3600.0)  # no window end in this test
    runtime = Runtime(window_s=3600)
    storer = _storer(runtime)
    storer.add(_outcome(0))
    storer.flush()
    wait_until(lambda: len(runtime.stored) == 1, timeout=10)
    for n in range(FLUSH_AT):
        storer.add(_outcome(n))
    wait_until(lambda: sum(map(len, runtime.stored)) == 1 + FLUSH_AT, timeout=10)
    storer.close()
    storer.thread.join(10)


def test_close_stores_the_rest_then_ends_and_a_failure_does_not_end_it() -> None:
    runtime = Runtime(window_s=3600, fail_first=True)
    storer = _storer(runtime)
    storer.add(_outcome(0))
    storer.flush()  # this store raises: logged, the storer goes on
    wait_until(lambda: not runtime.fail_first and storer.pending() == 0, timeout=10)
    storer.add(_outcome(1))
    storer.add(_outcome(2))
    storer.close()
    storer.thread.join(10)
    assert not storer.thread.is_alive()
    assert [[t.job.args[0] for t in batch] for batch in runtime.stored] == [[1, 2]]


@pytest.mark.parametrize("window_s", [0.0, 0.05])
def test_an_outcome_waits_no_longer_than_the_window(window_s: float) -> None:
    runtime = Runtime(window_s=window_s)
    storer = _storer(runtime)
    storer.add(_outcome(0))
    wait_until(lambda: runtime.stored, timeout=10)  # no flush, no close: the window ends
    storer.close()
    storer.thread.join(10)
