"""The SQL storage's acknowledgement compiles its claim check for a few shapes only.

Its check names every id of the batch in an ``IN`` list, one bind each. Compiled per
batch size, a worker whose storer stores batches of every size from 1 to a few hundred
compiled a statement for each (several ms of SQLAlchemy each, and one cached entry
each); the list is now padded to a power of two by repeating the last id.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

from qmlkit import App
from qmlkit.job import utcnow
from qmlkit.processing.outcome import succeeded
from qmlkit.storage.base import StaleClaim


@pytest.fixture
def app(tmp_path: Path) -> Iterator[App]:
    application = App("ack-shapes", storage=f"sqlite:///{tmp_path / 'q.db'}", autoload=False)

    @application.job(name="shapes.noop")
    def noop() -> None:
        return None

    noop.enqueue_many([() for _ in range(200)])
    yield application
    application.close()


def _check_shapes(app: App) -> list[int]:
    cache = app.storage.executor._sql_cache  # type: ignore[attr-defined]
    return sorted(key[1] for key in cache if key[0] == "ack-check")


def test_batches_of_every_size_share_a_few_compiled_checks_and_store_every_outcome(
        app: App) -> None:
    jobs = app.storage.claim(worker_id="w", server_name="s", queues=["default"], limit=200,
                             now=utcnow())
    assert len(jobs) == 200
    start = 0
    for size in range(1, 20):  # 1 + 2 + ... + 19 = 190 jobs, 19 batch sizes
        batch = jobs[start:start + size]
        start += size
        stored = app.storage.transition_many([succeeded(j, None, 1.0, ttl=None) for j in batch])
        assert [s.state.name for s in stored] == ["Succeeded"] * size  # type: ignore[union-attr]
    assert _check_shapes(app) == [1, 2, 4, 8, 16, 32]
    assert app.storage.count_jobs()[("default", "Succeeded")] == 190


def test_a_stale_claim_in_a_padded_batch_is_reported_stale_and_the_rest_stored(
        app: App) -> None:
    jobs = app.storage.claim(worker_id="w", server_name="s", queues=["default"], limit=5,
                             now=utcnow())
    # The first job's outcome is stored once: a second outcome for the same claim is stale.
    app.storage.transition_many([succeeded(jobs[0], None, 1.0, ttl=None)])
    # Five items pad to eight binds, the last id repeated; the stale one is still found.
    out = app.storage.transition_many([succeeded(j, None, 1.0, ttl=None) for j in jobs])
    assert isinstance(out[0], StaleClaim)
    assert [o.state.name for o in out[1:]] == ["Succeeded"] * 4  # type: ignore[union-attr]
    assert _check_shapes(app) == [1, 8]
