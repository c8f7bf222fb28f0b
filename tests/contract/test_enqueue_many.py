"""Bulk enqueue on every backend: order, each job's own values, ids taken within a bulk or
before it (all or none), and JobFunction.enqueue_many's handles. Backends encode a bulk in
runs of jobs sharing their options (`qmlkit.storage.codec.group_new_jobs`): these cases
mix runs and cross the backends' chunk sizes."""

from __future__ import annotations

from datetime import timedelta

import pytest

from qmlkit import App
from qmlkit.errors import DuplicateJob, PayloadError
from qmlkit.job import Enqueued, Job, Scheduled, utcnow
from qmlkit.storage.base import Storage
from qmlkit.testing import make_job


def claim_all(storage: Storage, queues: tuple[str, ...] = ()) -> list[Job]:
    claimed: list[Job] = []
    while batch := storage.claim(worker_id="w", server_name="s", queues=queues, limit=100,
                                 now=utcnow()):
        claimed += batch
    return claimed


def test_a_mixed_bulk_stores_each_jobs_own_values(storage: Storage) -> None:
    now = utcnow()
    shared = Enqueued(enqueued_at=now)
    later = Scheduled(enqueue_at=now + timedelta(hours=1), scheduled_at=now, reason="at")
    # Runs of shared options broken up and resumed: a a b a (Scheduled) a, and metadata,
    # arguments and priority that differ inside a run.
    jobs = [
        make_job(args=[0], state=shared, created_at=now),
        make_job(args=[1], kwargs={"k": [1, {"x": None}]}, state=shared, created_at=now,
                 metadata={"trace": "t1"}),
        make_job("other.f", args=[2], queue="b", priority=3, timeout_s=1.5, max_retries=0,
                 state=Enqueued(enqueued_at=now, queue="b"), created_at=now),
        make_job(args=[3], state=shared, created_at=now),
        make_job(args=[4], state=later, created_at=now,
                 expires_at=now + timedelta(days=1)),
        make_job(args=[5], state=shared, created_at=now, priority=-2),
    ]
    assert storage.enqueue_many(jobs) == jobs
    for job in jobs:
        assert storage.get(job.id) == job
    assert storage.count_jobs() == {("default", "Enqueued"): 4, ("b", "Enqueued"): 1,
                                    ("default", "Scheduled"): 1}
    # FIFO within a priority (the ids of one bulk are ascending), priorities first.
    assert [j.args[0] for j in claim_all(storage, ("default",))] == [0, 1, 3, 5]
    assert [j.args[0] for j in claim_all(storage)] == [2]


@pytest.mark.parametrize("n", [2, 2600])
def test_an_id_twice_in_one_bulk_stores_none_of_it(storage: Storage, n: int) -> None:
    jobs = [make_job(args=[i]) for i in range(n)]
    again = make_job(id=jobs[0].id, args=["again"])
    with pytest.raises(DuplicateJob) as info:
        storage.enqueue_many([*jobs, again])
    assert info.value.job_id == jobs[0].id
    assert storage.count_jobs() == {}
    assert storage.get(jobs[0].id) is None
    assert storage.list_jobs() == []


@pytest.mark.parametrize("n", [3, 2600])
def test_a_bulk_with_a_taken_id_stores_none_of_it_and_keeps_the_original(
        storage: Storage, n: int) -> None:
    original = storage.enqueue(make_job(args=["original"]))
    jobs = [make_job(args=[i]) for i in range(n)]
    jobs[n * 3 // 4] = make_job(id=original.id, args=["imposter"])
    with pytest.raises(DuplicateJob) as info:
        storage.enqueue_many(jobs)
    assert info.value.job_id == original.id
    assert storage.count_jobs() == {("default", "Enqueued"): 1}
    assert storage.get(original.id) == original
    assert storage.get(jobs[0].id) is None


def test_a_large_bulk_is_stored_and_claimed_in_its_order(storage: Storage) -> None:
    # More jobs than one statement or one batch of id checks holds on any backend.
    jobs = storage.enqueue_many([make_job(args=[i], state=Enqueued(enqueued_at=utcnow()))
                                 if i % 1000 == 0 else make_job(args=[i])
                                 for i in range(2600)])
    assert sum(storage.count_jobs().values()) == 2600
    assert {j.id for j in storage.list_jobs(limit=3000)} == {j.id for j in jobs}
    claimed = claim_all(storage)
    assert sorted(j.args[0] for j in claimed) == list(range(2600))


def test_job_function_enqueue_many_keeps_the_calls_order(app: App) -> None:
    @app.job(name="bulk.f", queue="bulkq", priority=2)
    def f(*args: object, **kwargs: object) -> None:
        return None

    calls = [(i,) if i % 3 else ([i], {"k": i}) for i in range(1200)]
    handles = f.enqueue_many(calls)
    assert len(handles) == len(set(handles)) == 1200
    assert list(handles) == sorted(handles)  # time-ordered ids, in the calls' order
    stored = app.storage.get_many(handles)
    for i, handle in enumerate(handles):
        job = stored[handle]
        assert (job.args, job.kwargs) == (([i], {"k": i}) if i % 3 == 0 else ([i], {}))
        assert (job.queue, job.priority, job.state.name) == ("bulkq", 2, "Enqueued")
    order = [j.id for j in claim_all(app.storage, ("bulkq",))]
    assert order == list(handles)
    assert f.enqueue_many([]) == []


def test_job_function_enqueue_many_refuses_a_bad_call_and_stores_none(app: App) -> None:
    @app.job(name="bulk.g")
    def g(x: object) -> None:
        return None

    with pytest.raises(PayloadError, match=r"args\[0\]"):
        g.enqueue_many([(1,), (2,), ({1, 2},), (4,)])
    assert app.storage.count_jobs() == {}
