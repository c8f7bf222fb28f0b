"""Invariants of the claim ledger (qmlkit.processing.claims), without a server."""

from __future__ import annotations

import threading
from concurrent.futures import ThreadPoolExecutor

from qmlkit.job import Enqueued, Job, utcnow
from qmlkit.processing.claims import LOST, RELEASE, SKIP, ClaimLedger, claim_key, trust_window
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
    assert ledger.release_running() == ([jobs[0]], [])  # (within its timeout, past it)
    assert ctx.cancelled.is_set()
    assert ledger.release_running() == ([], [])  # released once only


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


class FakeClock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def _trusting(clock: FakeClock, *, heartbeat: float | None = 10.0,
              claim: float | None = 100.0) -> ClaimLedger:
    ledger = ClaimLedger(heartbeat_trust_s=heartbeat, claim_trust_s=claim, clock=clock)
    ledger.beat(clock())
    return ledger


def test_trust_window_keeps_a_margin_of_at_most_half_the_timeout() -> None:
    assert trust_window(30.0, 5.0) == 25.0
    assert trust_window(2.0, 5.0) == 1.0


def test_a_claim_held_past_the_heartbeat_trust_window_is_lost_not_started() -> None:
    clock = FakeClock()
    ledger = _trusting(clock)
    jobs = [_job(1), _job(2), _job(3)]
    ledger.hold(jobs, "w0")
    first = ledger.start(jobs[0], "w0", stopping=False, make_context=lambda: _ctx(jobs[0]))
    assert isinstance(first, JobContext)
    clock.now += 10.0  # e.g. SIGSTOP: no heartbeat for the whole trust window
    assert not ledger.trusted()
    assert ledger.start(jobs[1], "w0", stopping=False, make_context=lambda: _ctx(jobs[1])) == LOST
    assert first.cancelled.is_set()  # the running attempt is told it may have lost its claim
    assert ledger.running() == [jobs[0]]
    # The caller releases (fenced) what it did not start, once.
    assert ledger.release_waiting({"w0"}) == jobs[1:]
    assert ledger.release_waiting({"w0"}) == []


def test_a_batch_held_before_presumed_dead_stays_lost_after_registering_again() -> None:
    clock = FakeClock()
    ledger = _trusting(clock)
    old = [_job(1), _job(2)]
    ledger.hold(old, "w0")
    other = _job(3)
    ledger.hold([other], "w1")
    ctx = ledger.start(other, "w1", stopping=False, make_context=lambda: _ctx(other, "w1"))
    assert isinstance(ctx, JobContext)
    assert ledger.presumed_dead() == [other]  # the storage said the row was gone
    assert ctx.cancelled.is_set()
    ledger.beat(clock())  # registered again: trusted again...
    assert ledger.trusted()
    # ...but nothing claimed before the loss starts, even with a fresh heartbeat.
    assert ledger.start(old[0], "w0", stopping=False, make_context=lambda: _ctx(old[0])) == LOST
    ledger.end_batch("w0", old)
    clock.now += 0.1
    fresh = [_job(4)]
    ledger.hold(fresh, "w0")  # a batch claimed afterwards starts as usual
    assert isinstance(ledger.start(fresh[0], "w0", stopping=False,
                                   make_context=lambda: _ctx(fresh[0])), JobContext)


def test_a_heartbeat_begun_before_the_pause_does_not_restore_trust() -> None:
    clock = FakeClock()
    ledger = _trusting(clock)
    began = clock()
    clock.now += 11.0  # the pause hit during the heartbeat call
    ledger.beat(began)
    assert not ledger.trusted()
    assert ledger.check() is True  # lost once...
    assert ledger.check() is False  # ...per episode
    clock.now += 1.0
    ledger.beat(clock())
    assert ledger.trusted() and ledger.check() is False


def test_a_batch_older_than_the_claim_trust_window_is_lost_alone() -> None:
    clock = FakeClock()
    ledger = _trusting(clock, heartbeat=None, claim=5.0)  # heartbeats off: claim age only
    old, young = [_job(1), _job(2)], [_job(3)]
    ledger.hold(old, "w0")
    clock.now += 4.0
    ledger.hold(young, "w1")
    clock.now += 1.0  # the stranded sweep of any server may now requeue the old batch
    assert ledger.trusted()
    assert ledger.start(old[0], "w0", stopping=False, make_context=lambda: _ctx(old[0])) == LOST
    assert isinstance(ledger.start(young[0], "w1", stopping=False,
                                   make_context=lambda: _ctx(young[0], "w1")), JobContext)


def test_waiting_for_trust_returns_when_a_heartbeat_lands() -> None:
    clock = FakeClock()
    ledger = ClaimLedger(heartbeat_trust_s=10.0, clock=clock)
    assert ledger.trusted()  # never registered: its claims carry no registered id
    ledger.beat(clock())
    clock.now += 10.0
    assert not ledger.trusted()
    assert ledger.wait_trusted(0.01) is False
    beater = threading.Timer(0.05, lambda: ledger.beat(clock()))
    beater.start()
    try:
        assert ledger.wait_trusted(10.0) is True
    finally:
        beater.cancel()


def test_without_trust_windows_claims_never_expire() -> None:
    ledger = ClaimLedger()
    assert ledger.trusted() and ledger.check() is False
    job = _job(1)
    ledger.hold([job], "w0")
    assert isinstance(ledger.start(job, "w0", stopping=False, make_context=lambda: _ctx(job)),
                      JobContext)


def test_a_claim_begun_before_the_loss_is_lost_even_if_held_after_trust_returns() -> None:
    # The process was stopped between its claim's commit and hold(): by the time the
    # worker holds the batch, the heartbeat duty has registered again.
    clock = FakeClock()
    ledger = _trusting(clock)
    began = clock()  # read before the claim's storage call
    clock.now += 12.0  # SIGSTOP
    ledger.presumed_dead()
    ledger.beat(clock())
    jobs = [_job(1), _job(2)]
    ledger.hold(jobs, "w0", claimed_at=began)
    assert ledger.trusted()
    assert ledger.start(jobs[0], "w0", stopping=False, make_context=lambda: _ctx(jobs[0])) == LOST
    assert ledger.release_waiting({"w0"}) == jobs
    ledger.end_batch("w0", jobs)
    assert ledger.is_empty()


class _Runtime:
    """The few names of `Runtime` the heartbeat duty uses."""

    def __init__(self, storage, claims: ClaimLedger) -> None:
        from qmlkit.processing.config import ServerConfig

        self.config = ServerConfig(storage_url="memory://")
        self.storage, self.claims, self.server_id = storage, claims, "me#1"
        self.notified: list[object] = []

    def server_info(self):
        from qmlkit.storage.base import ServerInfo

        now = utcnow()
        return ServerInfo(id="me#1", name="me", worker_count=1, queues=[], started_at=now,
                          last_heartbeat=now)

    def notify(self, changes) -> None:
        self.notified.extend(changes)

    def runnable(self, changes) -> None:
        pass


def test_the_heartbeat_duty_loses_the_claims_when_its_row_is_gone() -> None:
    from qmlkit.processing.duties import HeartbeatDuty
    from qmlkit.storage.memory import MemoryStorage

    clock = FakeClock()
    ledger = _trusting(clock)
    runtime = _Runtime(MemoryStorage(), ledger)  # the row "me#1" was never written: gone
    jobs = [_job(1), _job(2)]
    ledger.hold(jobs, "w0")
    ctx = ledger.start(jobs[0], "w0", stopping=False, make_context=lambda: _ctx(jobs[0]))
    assert isinstance(ctx, JobContext)
    clock.now += 1.0
    HeartbeatDuty().run_once(runtime)
    assert ctx.cancelled.is_set()
    assert [s.id for s in runtime.storage.list_servers()] == ["me#1"]  # registered again
    assert ledger.trusted()
    assert ledger.start(jobs[1], "w0", stopping=False, make_context=lambda: _ctx(jobs[1])) == LOST


def test_the_heartbeat_duty_loses_the_claims_of_a_paused_server_before_beating() -> None:
    from qmlkit.processing.duties import HeartbeatDuty
    from qmlkit.storage.memory import MemoryStorage

    clock = FakeClock()
    ledger = _trusting(clock)
    runtime = _Runtime(MemoryStorage(), ledger)
    runtime.storage.register_server(runtime.server_info())
    job = _job(1)
    ledger.hold([job], "w0")
    ctx = ledger.start(job, "w0", stopping=False, make_context=lambda: _ctx(job))
    assert isinstance(ctx, JobContext)
    clock.now += 30.0  # SIGSTOP; nobody reclaimed yet, so the heartbeat itself succeeds
    HeartbeatDuty().run_once(runtime)
    assert ctx.cancelled.is_set()  # but its attempts may have been reclaimed meanwhile
    assert ledger.trusted()
