"""``drain(app)``: run every runnable job with a real in-process server, then stop it.

The model is Dramatiq's ``Worker.join()`` after ``broker.join(queue)``: the call
returns once nothing is left to run, retries included, so a test checks outcomes, not
timings. A real `qmlkit.processing.server.Server` runs the jobs (claims, worker
threads, the scheduler promoting due retries), unlike inline mode
(`qmlkit.client.App.inline`), which runs each job in the caller at enqueue time.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from datetime import timedelta
from typing import Any

from qmlkit.hookspecs import hookimpl
from qmlkit.job import Job

__all__ = ["ACTIVE_STATES", "DrainResult", "drain"]

#: States that keep a drain waiting: runnable, running, or a retry still to come.
ACTIVE_STATES = ("Enqueued", "Processing", "AwaitingRetry")

#: States a job ends a drain in, when it ran during it.
FINAL_STATES = ("Succeeded", "Failed", "Deleted")


@dataclass
class DrainResult:
    """What a drain ran: the final stored record of each job that ended during it.

    Attributes:
        jobs: One `Job` per job that reached Succeeded, Failed or Deleted during the
            drain, in the order they ended, as read back from storage after the stop.
    """

    jobs: list[Job] = field(default_factory=list)

    @property
    def succeeded(self) -> list[Job]:
        """The jobs that ended Succeeded."""
        return [job for job in self.jobs if job.state.name == "Succeeded"]

    @property
    def failed(self) -> list[Job]:
        """The jobs that ended Failed (their retries spent)."""
        return [job for job in self.jobs if job.state.name == "Failed"]

    def results(self, method: str | None = None) -> list[Any]:
        """The stored results of the Succeeded jobs (of job name ``method``, if given)."""
        return [job.state.result for job in self.succeeded   # type: ignore[union-attr]
                if method is None or job.method == method]

    def __iter__(self) -> Iterator[Job]:
        """Iterate over `jobs`."""
        return iter(self.jobs)

    def __len__(self) -> int:
        """How many jobs ended during the drain."""
        return len(self.jobs)


class _Ended:
    """Observer plugin: the ids of jobs that reach a final state, in order."""

    def __init__(self) -> None:
        self.ids: dict[str, None] = {}
        self.lock = threading.Lock()

    @hookimpl
    def qmlkit_job_state_changed(self, job: Job, previous: Any, current: Any) -> None:
        if current.name in FINAL_STATES:
            with self.lock:
                self.ids.pop(job.id, None)
                self.ids[job.id] = None


def _active(app: Any, states: Sequence[str]) -> int:
    return sum(n for (_, state), n in app.storage.count_jobs().items() if state in states)


def drain(app: Any, *, timeout: float = 30.0, include_scheduled: bool = False,
          queues: Sequence[str] = (), **server_fields: Any) -> DrainResult:
    """Run ``app``'s jobs with a real server until no job is Enqueued, Processing or
    AwaitingRetry, then stop the server and return what ended.

    Jobs enqueued by jobs are run too, and AwaitingRetry jobs are waited for: their
    backoff passes in real time (give the job names a short `RetryPolicy` in tests), as
    Dramatiq's ``join()`` waits for its delay queue. Scheduled jobs are not waited for
    unless ``include_scheduled`` (a far-future schedule would hold the drain until its
    time). The server serves every queue by default (``queues=()``), heartbeats off,
    polling every 20 ms.

    Args:
        app: A ``qmlkit.App``; its storage is used as it is (``memory://``, SQLite...).
        timeout: Seconds to wait for the queues to empty.
        include_scheduled: Wait for Scheduled jobs too.
        queues: Queues to serve; empty serves them all.
        **server_fields: ``ServerConfig`` fields for the server (``worker_count``...).

    Returns:
        A `DrainResult` with the final record of every job that ended during the drain.

    Raises:
        TimeoutError: Jobs were still active after ``timeout`` seconds (the message gives
            their count); the server is stopped first.
        ConfigurationError: A bad server field.
    """
    states = (*ACTIVE_STATES, "Scheduled") if include_scheduled else ACTIVE_STATES
    ended = _Ended()
    pm = app.plugin_manager
    pm.register(ended)
    try:
        fields: dict[str, Any] = {
            "worker_count": 2, "queues": tuple(queues), "enable_heartbeat": False,
            "polling_interval": timedelta(milliseconds=20),
            "scheduler_poll_interval": timedelta(milliseconds=20), "enable_recurring": False,
            **server_fields}
        server = app.server(**fields)
        server.start()
        try:
            _wait_idle(app, states, timeout)
        finally:
            server.stop()
    finally:
        pm.unregister(ended)
    with ended.lock:
        ids = list(ended.ids)
    return DrainResult([job for job in map(app.storage.get, ids) if job is not None])


def _wait_idle(app: Any, states: Sequence[str], timeout: float) -> None:
    """Poll every 20 ms until no job is in ``states``.

    One look at zero is enough: a job enqueued by a job is committed before that job's
    outcome, and a retry goes AwaitingRetry -> Enqueued -> Processing, so work still to
    do is always visible in one of ``states``.
    """
    deadline = time.monotonic() + timeout
    while True:
        active = _active(app, states)
        if active == 0:
            return
        if time.monotonic() >= deadline:
            raise TimeoutError(f"drain: {active} job(s) still {'/'.join(states)} after "
                               f"{timeout} s")
        time.sleep(0.02)
