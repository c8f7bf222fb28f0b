"""`qmlkit.processing.outcome.store_outcomes` when one outcome cannot be stored: the
others are stored, that one becomes Failed; a storage that is down is retried."""

from __future__ import annotations

import threading
from collections.abc import Iterator, Sequence
from typing import Any

import pytest

from qmlkit import App
from qmlkit.errors import StorageUnavailable
from qmlkit.job import utcnow
from qmlkit.processing.outcome import store_outcomes, succeeded
from qmlkit.storage.base import Storage, Transition


class Refusing:
    """The app's storage, whose ``transition_many`` raises ``error`` while the batch
    holds a Succeeded outcome of a job in ``refuse`` (a state it cannot encode, say),
    and `StorageUnavailable` while ``down`` calls remain."""

    def __init__(self, storage: Storage, refuse: set[str], error: Exception) -> None:
        self.storage, self.refuse, self.error = storage, refuse, error
        self.down = 0
        self.calls: list[int] = []

    def transition_many(self, items: Sequence[Transition]) -> Any:
        self.calls.append(len(items))
        if self.down:
            self.down -= 1
            raise StorageUnavailable("connection refused")
        if any(item.job.id in self.refuse and item.state.name == "Succeeded" for item in items):
            raise self.error
        return self.storage.transition_many(items)


@pytest.fixture
def app() -> Iterator[App]:
    application = App("outcomes", storage="memory://", autoload=False)

    @application.job(name="outcomes.noop")
    def noop() -> None:
        return None

    noop.enqueue_many([() for _ in range(5)])
    yield application
    application.close()


def _outcomes(app: App) -> list[Transition]:
    jobs = app.storage.claim(worker_id="w", server_name="s", queues=["default"], limit=5,
                             now=utcnow())
    assert len(jobs) == 5
    return [succeeded(job, None, 1.0, ttl=None) for job in jobs]


def test_one_unstorable_outcome_fails_its_job_and_the_others_are_stored(app: App) -> None:
    items = _outcomes(app)
    bad = items[2].job.id
    storage = Refusing(app.storage, {bad}, TypeError("cannot encode this state"))
    changes = store_outcomes(storage, items, aborting=threading.Event(),  # type: ignore[arg-type]
                             observed=True)
    assert changes is not None and len(changes) == 5
    states = {item.job.id: app.storage.get(item.job.id).state for item in items}
    assert [s.name for i, s in states.items() if i != bad] == ["Succeeded"] * 4
    assert states[bad].name == "Failed"
    assert states[bad].exception_type == "qmlkit.errors.PayloadError"
    assert "TypeError: cannot encode this state" in states[bad].message
    assert storage.calls == [5, 1, 1, 1, 1, 1, 1]  # the batch, each alone, the Failed one


def test_a_storage_that_is_down_is_retried_not_split(app: App) -> None:
    items = _outcomes(app)
    storage = Refusing(app.storage, set(), TypeError("unused"))
    storage.down = 2
    changes = store_outcomes(storage, items, aborting=threading.Event(),  # type: ignore[arg-type]
                             observed=True)
    assert changes is not None and len(changes) == 5
    assert storage.calls == [5, 5, 5]
    assert {app.storage.get(i.job.id).state.name for i in items} == {"Succeeded"}
