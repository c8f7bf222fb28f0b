"""The storage contract, run against every backend (see conftest.BACKENDS)."""

from __future__ import annotations

import json
from concurrent.futures import ThreadPoolExecutor
from datetime import timedelta

import pytest

from qmlkit.errors import DuplicateJob, InvalidTransition, JobNotFound, PayloadError, StaleClaim
from qmlkit.job import (
    AwaitingRetry,
    Deleted,
    Enqueued,
    Failed,
    Job,
    Scheduled,
    Succeeded,
    utcnow,
)
from qmlkit.recurring import RecurringJob
from qmlkit.storage.base import ServerInfo, Storage, Transition
from qmlkit.testing import make_job


def claim(storage: Storage, limit: int = 10, queues: tuple[str, ...] = (), worker: str = "w1",
          server: str = "s1") -> list[Job]:
    return storage.claim(worker_id=worker, server_name=server, queues=queues, limit=limit,
                         now=utcnow())


def succeed(job: Job, result: object = None) -> Transition:
    return Transition(job, Succeeded(succeeded_at=utcnow(), duration_ms=1.0, result=result))


# --- enqueue and read ---------------------------------------------------------------------


def test_enqueue_then_get_round_trips_every_field(storage: Storage) -> None:
    job = make_job("m.f", args=[1, "ünïcødé ✓ 中文", {"a": [None, 2.5]}], kwargs={"k": True},
                   queue="q1", priority=7, max_retries=4, timeout_s=2.5, metadata={"t": "x"})
    storage.enqueue(job)
    assert storage.get(job.id) == job


def test_get_unknown_id_returns_none(storage: Storage) -> None:
    assert storage.get("no-such-id") is None


def test_enqueue_duplicate_id_raises_and_keeps_original(storage: Storage) -> None:
    job = make_job(args=[1])
    storage.enqueue(job)
    with pytest.raises(DuplicateJob):
        storage.enqueue(make_job(id=job.id, args=[2]))
    assert storage.get(job.id).args == [1]


def test_enqueue_many_is_all_or_nothing(storage: Storage) -> None:
    good = [make_job(args=[i]) for i in range(3)]
    bad = make_job(args=[object()])
    with pytest.raises(PayloadError, match=r"args\[0\]"):
        storage.enqueue_many([*good, bad])
    assert storage.count_jobs() == {}


def test_enqueue_refuses_a_job_in_a_non_initial_state(storage: Storage) -> None:
    job = make_job(state=Succeeded(succeeded_at=utcnow(), duration_ms=1))
    with pytest.raises(InvalidTransition):
        storage.enqueue(job)
    assert storage.count_jobs() == {}


def test_enqueue_over_payload_limit_raises_and_stores_nothing(storage: Storage) -> None:
    storage.max_payload_bytes = 1000
    with pytest.raises(PayloadError, match="over the limit"):
        storage.enqueue(make_job(args=["x" * 2000]))
    with pytest.raises(PayloadError, match=r"metadata .* over the limit") as info:
        storage.enqueue(make_job(metadata={"blob": "x" * 2000}))  # metadata counts too
    assert info.value.where == "metadata"
    assert storage.count_jobs() == {}


def test_list_jobs_filters_and_pages_newest_first(storage: Storage) -> None:
    base = utcnow()
    jobs = [make_job(f"m{i % 2}", queue=f"q{i % 3}", created_at=base + timedelta(seconds=i))
            for i in range(12)]
    storage.enqueue_many(jobs)
    listed = storage.list_jobs(limit=100)
    assert [j.id for j in listed] == [j.id for j in reversed(jobs)]
    assert {j.id for j in storage.list_jobs(method="m1")} == {
        j.id for j in jobs if j.method == "m1"}
    assert {j.id for j in storage.list_jobs(queue="q0", method="m0")} == {
        j.id for j in jobs if j.queue == "q0" and j.method == "m0"}
    page1 = storage.list_jobs(limit=5)
    page2 = storage.list_jobs(limit=5, offset=5)
    assert [j.id for j in page1 + page2] == [j.id for j in listed[:10]]
    assert storage.list_jobs(state="Failed") == []


def test_list_jobs_of_one_bulk_enqueue_newest_id_first(storage: Storage) -> None:
    now = utcnow()
    jobs = [make_job(created_at=now) for _ in range(5)]  # one created_at, ids ascending
    storage.enqueue_many(jobs)
    assert [j.id for j in storage.list_jobs()] == [j.id for j in reversed(jobs)]


def test_count_jobs_by_queue_and_state(storage: Storage) -> None:
    storage.enqueue_many([make_job(queue="a") for _ in range(3)] + [make_job(queue="b")])
    claim(storage, limit=1, queues=("a",))
    assert storage.count_jobs() == {("a", "Enqueued"): 2, ("a", "Processing"): 1,
                                    ("b", "Enqueued"): 1}


# --- claim ------------------------------------------------------------------------------------


def test_claim_takes_priority_then_fifo(storage: Storage) -> None:
    base = utcnow()
    low = [make_job(priority=0, enqueued_at=base + timedelta(seconds=i)) for i in range(3)]
    high = make_job(priority=5, enqueued_at=base + timedelta(seconds=10))
    storage.enqueue_many([*low, high])
    order = [j.id for j in claim(storage, limit=1) + claim(storage, limit=3)]
    assert order == [high.id, low[0].id, low[1].id, low[2].id]


def test_a_bulk_enqueue_is_claimed_in_its_order(storage: Storage) -> None:
    # one enqueue_many shares one enqueued_at: the (time-ordered) id keeps FIFO
    now = utcnow()
    state = Enqueued(enqueued_at=now)
    jobs = [make_job(args=[i], state=state) for i in range(300)]
    storage.enqueue_many(jobs)
    order = []
    while batch := claim(storage, limit=50):
        order.extend(job.args[0] for job in batch)
    assert order == list(range(300))


def test_claim_sets_processing_and_a_fresh_fencing_token(storage: Storage) -> None:
    job = storage.enqueue(make_job())
    (claimed,) = claim(storage, worker="w9", server="srv")
    assert claimed.id == job.id
    assert claimed.attempts == 1
    assert claimed.state.name == "Processing"
    assert claimed.state.worker_id == "w9" and claimed.state.server_name == "srv"
    assert storage.get(job.id) == claimed


def test_claim_respects_queues_and_limit(storage: Storage) -> None:
    storage.enqueue_many([make_job(queue="a") for _ in range(5)] + [make_job(queue="b")])
    got = claim(storage, limit=3, queues=("a",))
    assert len(got) == 3 and {j.queue for j in got} == {"a"}
    assert claim(storage, limit=10, queues=("c",)) == []
    assert len(claim(storage, limit=10)) == 3


def test_claim_never_hands_out_a_job_twice_under_8_threads(storage: Storage) -> None:
    enqueued = {j.id for j in storage.enqueue_many([make_job(args=[i]) for i in range(2000)])}

    def drain(n: int) -> list[str]:
        mine: list[str] = []
        while batch := claim(storage, limit=7, worker=f"w{n}"):
            mine += [j.id for j in batch]
        return mine

    with ThreadPoolExecutor(8) as pool:
        claimed = [job_id for ids in pool.map(drain, range(8)) for job_id in ids]
    assert len(claimed) == len(set(claimed)) == 2000
    assert set(claimed) == enqueued
    assert storage.count_jobs() == {("default", "Processing"): 2000}


def test_claim_skips_scheduled_jobs_until_promoted(storage: Storage) -> None:
    now = utcnow()
    job = make_job(state=Scheduled(enqueue_at=now + timedelta(seconds=60), scheduled_at=now))
    storage.enqueue(job)
    assert claim(storage) == []
    assert storage.next_due_at() == job.state.enqueue_at
    assert storage.promote_due(now=now) == []
    changes = storage.promote_due(now=now + timedelta(seconds=61))
    assert [c.job.id for c in changes] == [job.id]
    assert changes[0].previous.name == "Scheduled"
    assert [j.id for j in claim(storage)] == [job.id]
    assert storage.next_due_at() is None


# --- fenced transitions -------------------------------------------------------------------------


def test_transition_with_current_token_applies(storage: Storage) -> None:
    storage.enqueue(make_job())
    (job,) = claim(storage)
    stored = storage.transition(succeed(job, {"n": [1, "ü"]}))
    assert stored.state.result == {"n": [1, "ü"]}
    assert storage.get(job.id).state.name == "Succeeded"


def test_transition_with_stale_token_is_rejected(storage: Storage) -> None:
    storage.enqueue(make_job())
    (first,) = claim(storage)
    # The claim is presumed dead and the job requeued and claimed again.
    storage.requeue_stranded(started_before=utcnow() + timedelta(seconds=1), now=utcnow())
    (second,) = claim(storage, worker="w2")
    assert second.attempts == first.attempts + 1
    with pytest.raises(StaleClaim) as info:
        storage.transition(succeed(first, "zombie"))
    assert info.value.token == first.attempts
    storage.transition(succeed(second, "real"))
    assert storage.get(first.id).state.result == "real"


def test_transition_many_reports_stale_items_and_applies_the_rest(storage: Storage) -> None:
    storage.enqueue_many([make_job() for _ in range(3)])
    a, b, c = claim(storage, limit=3)
    storage.change_state(b.id, Deleted(deleted_at=utcnow()))
    out = storage.transition_many([succeed(a), succeed(b), succeed(c)])
    assert isinstance(out[1], StaleClaim)
    assert out[0].state.name == out[2].state.name == "Succeeded"
    assert storage.get(b.id).state.name == "Deleted"


def test_report_progress_is_fenced_and_keeps_other_metadata(storage: Storage) -> None:
    storage.enqueue(make_job(metadata={"tenant": "acme"}))
    (job,) = claim(storage)
    progress = {"fraction": 0.25, "message": "row 25/100", "at": "2026-11-29T10:00:00Z"}
    assert storage.report_progress(job.id, token=job.attempts, progress=progress) is True
    stored = storage.get(job.id)
    assert stored.metadata == {"tenant": "acme", "progress": progress}
    assert stored.state.name == "Processing"
    later = {**progress, "fraction": 0.5}
    assert storage.report_progress(job.id, token=job.attempts + 1, progress=later) is False
    assert storage.get(job.id).metadata["progress"]["fraction"] == 0.25
    storage.transition(succeed(job))
    assert storage.report_progress(job.id, token=job.attempts, progress=later) is False
    assert storage.report_progress("no-such-job", token=1, progress=later) is False
    done = storage.get(job.id)
    assert done.state.name == "Succeeded" and done.metadata["progress"]["fraction"] == 0.25


def test_job_history_lists_every_state_oldest_first(storage: Storage) -> None:
    job = make_job(state=Scheduled(enqueue_at=utcnow() - timedelta(seconds=1),
                                   scheduled_at=utcnow()))
    storage.enqueue(job)
    storage.promote_due(now=utcnow())
    (first,) = claim(storage)
    retry_at = utcnow() - timedelta(seconds=1)
    storage.transition(Transition(first, AwaitingRetry(
        retry_at=retry_at, retry_count=1, last_exception="ValueError: boom")))
    storage.promote_due(now=utcnow())
    (second,) = claim(storage)
    storage.transition(succeed(second, "ok"))
    names = [state.name for state in storage.job_history(job.id)]
    assert names == ["Scheduled", "Enqueued", "Processing", "AwaitingRetry", "Enqueued",
                     "Processing", "Succeeded"]
    history = storage.job_history(job.id)
    assert history[3].last_exception == "ValueError: boom" and history[-1].result == "ok"
    assert storage.job_history("no-such-job") == []


def test_history_survives_a_row_whose_state_data_is_not_kept_by_hand(storage: Storage) -> None:
    # change_state by hand (retry from the CLI, delete from the dashboard) is history too
    storage.enqueue(make_job())
    (job,) = claim(storage)
    storage.transition(Transition(job, Failed(failed_at=utcnow(), exception_type="E",
                                              message="m")))
    storage.change_state(job.id, Enqueued(enqueued_at=utcnow(), reason="retried by hand"))
    names = [state.name for state in storage.job_history(job.id)]
    assert names == ["Enqueued", "Processing", "Failed", "Enqueued"]


def test_throughput_counts_outcomes_per_minute(storage: Storage) -> None:
    start = utcnow()
    storage.enqueue_many([make_job() for _ in range(5)])
    jobs = claim(storage, limit=5)
    outcomes = [succeed(j) for j in jobs[:3]] + [
        Transition(j, Failed(failed_at=utcnow(), exception_type="E", message="m"))
        for j in jobs[3:]]
    storage.transition_many(outcomes)
    buckets = storage.throughput(since=start - timedelta(minutes=1), until=utcnow())
    assert sum(ok for _, ok, _ in buckets) == 3
    assert sum(failed for _, _, failed in buckets) == 2
    assert all(m.second == 0 and m.microsecond == 0 and m.tzinfo is not None
               for m, _, _ in buckets)
    assert storage.throughput(since=utcnow() + timedelta(minutes=2),
                              until=utcnow() + timedelta(minutes=3)) == []


def test_transition_to_awaiting_retry_records_retry_count(storage: Storage) -> None:
    storage.enqueue(make_job())
    (job,) = claim(storage)
    retry_at = utcnow() + timedelta(seconds=30)
    state = AwaitingRetry(retry_at=retry_at, retry_count=1, last_exception="ValueError: x")
    storage.transition(Transition(job, state, retry_count=1))
    stored = storage.get(job.id)
    assert stored.retry_count == 1 and stored.state.retry_at == retry_at
    assert storage.next_due_at() == retry_at


def test_release_to_enqueued_keeps_retry_count(storage: Storage) -> None:
    storage.enqueue(make_job())
    (job,) = claim(storage)
    storage.transition(Transition(job, Enqueued(enqueued_at=utcnow(), reason="released")))
    (again,) = claim(storage)
    assert again.retry_count == 0 and again.attempts == 2


# --- management -----------------------------------------------------------------------------------


def test_change_state_checks_expected_and_the_state_machine(storage: Storage) -> None:
    job = storage.enqueue(make_job())
    with pytest.raises(InvalidTransition):
        storage.change_state(job.id, Enqueued(enqueued_at=utcnow()), expected=("Failed",))
    with pytest.raises(JobNotFound):
        storage.change_state("nope", Deleted(deleted_at=utcnow()))
    change = storage.change_state(job.id, Deleted(deleted_at=utcnow(), reason="r"))
    assert change.previous.name == "Enqueued" and change.job.state.name == "Deleted"
    with pytest.raises(InvalidTransition):
        storage.change_state(job.id, Deleted(deleted_at=utcnow()))


def test_failed_job_can_be_retried_by_hand(storage: Storage) -> None:
    storage.enqueue(make_job())
    (job,) = claim(storage)
    storage.transition(Transition(job, Failed(failed_at=utcnow(), exception_type="E", message="m"),
                                  expires_at=utcnow() + timedelta(days=1)))
    change = storage.change_state(job.id, Enqueued(enqueued_at=utcnow()),
                                  expected=("Failed", "Succeeded", "Deleted"))
    assert change.job.expires_at is None
    assert [j.id for j in claim(storage)] == [job.id]


# --- background duties ----------------------------------------------------------------------------


def test_requeue_stranded_only_touches_old_claims(storage: Storage) -> None:
    storage.enqueue_many([make_job() for _ in range(2)])
    old, new = claim(storage, limit=2)
    cutoff = utcnow() + timedelta(milliseconds=1)
    storage.requeue_stranded(started_before=cutoff - timedelta(hours=1), now=utcnow())
    assert storage.get(old.id).state.name == "Processing"
    changes = storage.requeue_stranded(started_before=cutoff, now=utcnow())
    assert {c.job.id for c in changes} == {old.id, new.id}
    assert all(c.job.state.reason == "stranded" for c in changes)


def test_delete_expired_removes_exactly_the_expired_terminal_jobs(storage: Storage) -> None:
    now = utcnow()
    storage.enqueue_many([make_job(args=[i]) for i in range(5)])
    jobs = claim(storage, limit=5)
    storage.transition_many([
        Transition(jobs[0], Succeeded(succeeded_at=now, duration_ms=1),
                   expires_at=now - timedelta(seconds=1)),
        Transition(jobs[1], Failed(failed_at=now, exception_type="E", message="m"), expires_at=now),
        Transition(jobs[2], Succeeded(succeeded_at=now, duration_ms=1),
                   expires_at=now + timedelta(hours=1)),
        Transition(jobs[3], Succeeded(succeeded_at=now, duration_ms=1)),
    ])
    assert storage.delete_expired(now=now) == 2
    assert storage.get(jobs[0].id) is None and storage.get(jobs[1].id) is None
    assert {j.id for j in storage.list_jobs()} == {j.id for j in jobs[2:]}
    assert storage.delete_expired(now=now) == 0


def test_delete_expired_is_bounded_per_call(storage: Storage) -> None:
    now = utcnow()
    storage.enqueue_many([make_job() for _ in range(7)])
    jobs = claim(storage, limit=7)
    storage.transition_many([Transition(j, Succeeded(succeeded_at=now, duration_ms=1),
                                        expires_at=now) for j in jobs])
    assert storage.delete_expired(now=now, limit=5) == 5
    assert storage.delete_expired(now=now, limit=5) == 2


# --- server registry ----------------------------------------------------------------------


def test_server_registry_heartbeat_and_dead_server_reclaim(storage: Storage) -> None:
    now = utcnow()
    for name in ("alive", "dead"):
        storage.register_server(ServerInfo(id=f"{name}#1", name=name, worker_count=2,
                                           queues=["default"], started_at=now, last_heartbeat=now))
    storage.enqueue_many([make_job() for _ in range(2)])
    (mine,) = claim(storage, limit=1, server="alive#1")
    (theirs,) = claim(storage, limit=1, server="dead#1")
    later = now + timedelta(seconds=120)
    assert storage.heartbeat("alive#1", now=later)
    changes = storage.reclaim_dead_servers(heartbeat_before=later - timedelta(seconds=60),
                                           now=later)
    assert [c.job.id for c in changes] == [theirs.id]
    assert changes[0].job.state.reason == "reclaimed"
    assert [s.id for s in storage.list_servers()] == ["alive#1"]
    assert storage.get(mine.id).state.name == "Processing"
    assert not storage.heartbeat("dead#1", now=later)
    with pytest.raises(StaleClaim):
        storage.transition(succeed(theirs))
    storage.deregister_server("alive#1")
    assert storage.list_servers() == []


def test_json_round_trip_of_stored_job_is_lossless(storage: Storage) -> None:
    storage.enqueue(make_job(args=[1.5, -0.0, 10**18, "\u2603"], kwargs={"z": {"y": []}}))
    (job,) = claim(storage)
    assert Job.model_validate_json(job.model_dump_json()) == job
    assert json.loads(job.model_dump_json())["state"]["name"] == "Processing"


def test_claim_changes_report_the_previous_enqueued_state(storage: Storage) -> None:
    job = storage.enqueue(make_job(queue="q"))
    (change,) = storage.claim_changes(worker_id="w", server_name="s", queues=(), limit=5,
                                      now=utcnow())
    assert change.previous == job.state
    assert change.job.state.name == "Processing" and change.job.attempts == 1
    assert storage.get(job.id) == change.job


# --- recurring templates ------------------------------------------------------------------


def template(**fields: object) -> RecurringJob:
    base = {"id": "nightly", "cron": "0 3 * * *", "method": "m.report", "args": [1]}
    return RecurringJob(**{**base, **fields})


def test_recurring_templates_upsert_get_list_remove(storage: Storage) -> None:
    first = template()
    storage.upsert_recurring(first)
    storage.upsert_recurring(template(id="another", cron="*/5 * * * *"))
    assert storage.get_recurring("nightly") == first
    assert [t.id for t in storage.list_recurring()] == ["another", "nightly"]
    replaced = template(args=[2])
    storage.upsert_recurring(replaced)
    assert storage.get_recurring("nightly").args == [2]
    assert storage.remove_recurring("nightly") is True
    assert storage.remove_recurring("nightly") is False
    assert storage.get_recurring("nightly") is None


def test_fire_recurring_is_a_compare_and_set_with_the_tick_job(storage: Storage) -> None:
    t = template()
    storage.upsert_recurring(t)
    tick, following = t.next_run_at, t.next_after(t.next_run_at)
    job = make_job("m.report", id=t.tick_job_id(tick))
    assert storage.fire_recurring("nightly", expected_next_run_at=tick, next_run_at=following,
                                  job=job)
    # A second server that saw the same tick loses, and stores nothing.
    assert not storage.fire_recurring("nightly", expected_next_run_at=tick,
                                      next_run_at=following, job=make_job("m.report"))
    stored = storage.get_recurring("nightly")
    assert (stored.next_run_at, stored.last_run_at) == (following, tick)
    assert [j.id for j in storage.list_jobs()] == [job.id]
    assert not storage.fire_recurring("gone", expected_next_run_at=tick, next_run_at=following,
                                      job=None)


def test_fire_recurring_without_a_job_skips_the_tick(storage: Storage) -> None:
    t = template()
    storage.upsert_recurring(t)
    following = t.next_after(t.next_run_at)
    assert storage.fire_recurring("nightly", expected_next_run_at=t.next_run_at,
                                  next_run_at=following, job=None)
    assert storage.get_recurring("nightly").next_run_at == following
    assert storage.get_recurring("nightly").last_run_at is None
    assert storage.count_jobs() == {}


def test_fire_recurring_exactly_once_under_8_threads(storage: Storage) -> None:
    t = template(cron="* * * * * *")
    storage.upsert_recurring(t)
    tick = t.next_run_at
    following = t.next_after(tick)

    def fire(n: int) -> bool:
        return storage.fire_recurring("nightly", expected_next_run_at=tick,
                                      next_run_at=following,
                                      job=make_job("m.report", id=t.tick_job_id(tick)))

    with ThreadPoolExecutor(8) as pool:
        wins = list(pool.map(fire, range(8)))
    assert wins.count(True) == 1
    assert len(storage.list_jobs()) == 1


def test_requeue_stranded_leaves_registered_servers_jobs_alone(storage: Storage) -> None:
    storage.enqueue_many([make_job() for _ in range(2)])
    (live,) = claim(storage, limit=1, server="live#1")
    (gone,) = claim(storage, limit=1, server="gone")
    changes = storage.requeue_stranded(started_before=utcnow() + timedelta(seconds=1),
                                       now=utcnow(), exclude_servers=["live#1"])
    assert [c.job.id for c in changes] == [gone.id]
    assert storage.get(live.id).state.name == "Processing"
