"""``list_jobs(state=...)`` answers only jobs in that state, even while servers move them
on (found by test_pool_faults.py: on Redis the state index and the jobs are read in two
round trips, and a job claimed and completed in between came back as Succeeded from a
list of the Processing ones)."""

from __future__ import annotations

import threading

from qmlkit.job import Succeeded, utcnow
from qmlkit.storage.base import Storage, Transition
from qmlkit.testing import make_job


def test_list_jobs_by_state_answers_only_that_state_while_jobs_move(storage: Storage) -> None:
    # Given a server claiming jobs a few at a time and completing each batch at once
    storage.enqueue_many([make_job(args=[i]) for i in range(120)])

    def work() -> None:
        while jobs := storage.claim(worker_id="w", server_name="s", queues=(), limit=3,
                                    now=utcnow()):
            storage.transition_many([
                Transition(job, Succeeded(succeeded_at=utcnow(), duration_ms=1.0))
                for job in jobs])

    worker = threading.Thread(target=work, name="mover")
    worker.start()
    # When the Processing jobs are listed again and again meanwhile
    wrong: list[str] = []
    listed = 0
    try:
        while worker.is_alive():
            page = storage.list_jobs(state="Processing", limit=50)
            listed += len(page)
            wrong += [f"{job.id}: {job.state.name}" for job in page
                      if job.state.name != "Processing"]
    finally:
        worker.join(60)
    # Then every job listed was Processing when it was read
    assert not wrong, f"{len(wrong)} of {listed} listed jobs were not Processing: {wrong[:5]}"
    assert storage.count_jobs() == {("default", "Succeeded"): 120}
