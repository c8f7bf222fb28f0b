"""Invariants of the claim ledger (qmlkit.processing.claims), without a server."""

from __future__ import annotations

import threading
from concurrent.futures import ThreadPoolExecutor

from qmlkit.job import Enqueued, Job, utcnow
from qmlkit.processing.claims import RELEASE, SKIP, ClaimLedger, claim_key
from qmlkit.processing.context import JobContext
from qmlkit.storage.base import Transition
from qmlkit.testing import make_job


def _job(n: int, attempts: int = 1) -> Job:
    return make_job("t", args=[n], attempts=attempts, id=f"job-{n}")


def _ctx(job: Job, worker: str = "w0") -> JobContext:
    return JobContext(job=job, worker_id=worker, server_name="s", stopping=threading.Event())


def _outcome(job: Job) -> Transition:
    return Transition(job, Enqueued(enqueued_at=utcnow(), queue=job.queue))


def test_a_released_claim_is_never_started() -> None:
    ledger = ClaimLedger()
    jobs = [_job(1), _job(2)]
    ledger.hold(jobs, "w0")
    assert ledger.release_unstarted() == jobs
    assert ledger.start(jobs[0], "w0", stopping=False, make_context=lambda: _ctx(jobs[0])) == SKIP
    assert ledger.running() == []


def test_a_claim_is_released_at_most_once() -> None:
    ledger = ClaimLedger()
    jobs = [_job(n) for n in range(5)]
    ledger.hold(jobs, "w0")
    with ThreadPoolExecutor(4) as pool:
        results = list(pool.map(lambda _: ledger.release_unstarted(), range(8)))
    released = [job.id for batch in results for job in batch]
    assert sorted(released) == sorted(job.id for job in jobs)
    assert ledger.release_waiting({"w0"}) == []


def test_a_running_claim_is_not_released_as_unstarted() -> None:
    ledger = ClaimLedger()
    jobs = [_job(1), _job(2)]
    ledger.hold(jobs, "w0")
    ctx = ledger.start(jobs[0], "w0", stopping=False, make_context=lambda: _ctx(jobs[0]))
    assert isinstance(ctx, JobContext)
    assert ledger.running() == [jobs[0]]
    assert ledger.release_unstarted() == [jobs[1]]
    assert ledger.release_running() == [jobs[0]]
    assert ctx.cancelled.is_set()
    assert ledger.release_running() == []  # released once only


def test_stopping_marks_the_claim_released_for_the_caller() -> None:
    ledger = ClaimLedger()
    job = _job(1)
    ledger.hold([job], "w0")
    assert ledger.start(job, "w0", stopping=True, make_context=lambda: _ctx(job)) == RELEASE
    assert ledger.release_unstarted() == []  # the caller releases it, nobody else


def test_outcomes_are_taken_once() -> None:
    ledger = ClaimLedger()
    job = _job(1)
    ledger.hold([job], "w0")
    assert not ledger.has_outcomes("w0")
    ledger.add_outcome("w0", _outcome(job))
    assert ledger.has_outcomes("w0")
    assert len(ledger.take_outcomes("w0")) == 1
    assert ledger.take_outcomes("w0") == []


def test_claims_are_keyed_by_job_and_token() -> None:
    ledger = ClaimLedger()
    first, again = _job(1, attempts=1), _job(1, attempts=2)
    assert claim_key(first) != claim_key(again)
    ledger.hold([first], "w0")
    ledger.release_unstarted()
    ledger.hold([again], "w1")  # the same job, claimed again after its release
    ctx = ledger.start(again, "w1", stopping=False, make_context=lambda: _ctx(again, "w1"))
    assert isinstance(ctx, JobContext)


def test_stuck_workers_lose_the_jobs_waiting_behind_them() -> None:
    ledger = ClaimLedger()
    jobs = [_job(1), _job(2), _job(3)]
    ledger.hold(jobs, "w0")
    ledger.hold([_job(4)], "w1")
    ledger.start(jobs[0], "w0", stopping=False, make_context=lambda: _ctx(jobs[0]))
    assert ledger.stuck_workers(0.0) == {"w0"}
    assert ledger.stuck_workers(3600.0) == set()
    assert ledger.release_waiting({"w0"}) == jobs[1:]
    assert ledger.start(jobs[1], "w0", stopping=False, make_context=lambda: _ctx(jobs[1])) == SKIP


def test_a_finished_batch_leaves_nothing_behind() -> None:
    ledger = ClaimLedger()
    jobs = [_job(1), _job(2)]
    ledger.hold(jobs, "w0")
    ledger.start(jobs[0], "w0", stopping=False, make_context=lambda: _ctx(jobs[0]))
    ledger.finish(jobs[0])
    ledger.add_outcome("w0", _outcome(jobs[0]))
    ledger.release_unstarted()
    ledger.end_batch("w0", jobs)
    assert ledger.is_empty()
