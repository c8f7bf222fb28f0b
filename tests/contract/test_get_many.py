"""``get_many`` and ``job_states`` (`qmlkit.storage.capabilities.BatchRead`) on every
backend: what ``get`` answers for each id, in one read."""

from __future__ import annotations

from datetime import timedelta

from qmlkit.job import Deleted, Scheduled, utcnow
from qmlkit.storage.base import Storage
from qmlkit.storage.capabilities import BatchRead, get_many, job_states
from qmlkit.testing import make_job


def test_every_backend_reads_many_jobs_in_one_call(storage: Storage) -> None:
    assert isinstance(storage, BatchRead)


def test_get_many_answers_what_get_answers_for_each_stored_id(storage: Storage) -> None:
    # Given three stored jobs
    jobs = storage.enqueue_many([make_job(args=[i]) for i in range(3)])
    ids = [j.id for j in jobs]
    # When they are read together with unknown, duplicate and unstorable ids
    found = get_many(storage, [*ids, ids[0], "no-such-id", "bad\x00id", ""])
    # Then each stored job comes back once, as get has it, and nothing else
    assert found == {i: storage.get(i) for i in ids}


def test_get_many_of_no_ids_is_empty(storage: Storage) -> None:
    assert get_many(storage, []) == {}


def test_job_states_names_the_state_of_each_stored_id(storage: Storage) -> None:
    # Given an Enqueued, a Scheduled and a Deleted job
    now = utcnow()
    enqueued = storage.enqueue(make_job())
    scheduled = storage.enqueue(make_job(state=Scheduled(enqueue_at=now + timedelta(hours=1),
                                                         scheduled_at=now)))
    deleted = storage.enqueue(make_job())
    storage.change_state(deleted.id, Deleted(deleted_at=now))
    # When their states are read with duplicate, unknown and unstorable ids
    ids = [enqueued.id, scheduled.id, deleted.id, deleted.id, "no-such-id", "a\x00b"]
    # Then each stored job's state name comes back, and nothing else
    assert job_states(storage, ids) == {enqueued.id: "Enqueued", scheduled.id: "Scheduled",
                                        deleted.id: "Deleted"}
    assert job_states(storage, []) == {}
