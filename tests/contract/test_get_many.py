"""``get_many`` (`qmlkit.storage.capabilities.BatchRead`) on every backend: what ``get``
answers for each id, in one read."""

from __future__ import annotations

from qmlkit.storage.base import Storage
from qmlkit.storage.capabilities import BatchRead, get_many
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
