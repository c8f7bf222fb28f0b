"""The job-management half of the client API (``App`` inherits it): retry, requeue and
delete one stored job, with observers and local servers told after the commit."""

from __future__ import annotations

from datetime import timedelta
from typing import TYPE_CHECKING

from qmlkit.job import Deleted, Enqueued, Job, utcnow

if TYPE_CHECKING:
    from qmlkit.notify import Notifier
    from qmlkit.storage.base import Storage

__all__ = ["JobManagement"]


class JobManagement:
    """Move one stored job by hand (the dashboard's and CLI's retry, requeue, delete)."""

    _notifier: Notifier

    if TYPE_CHECKING:
        @property
        def storage(self) -> Storage: ...

    def retry(self, job_id: str) -> Job:
        """Put a Failed, Succeeded or Deleted job back in its queue now.

        Returns:
            The job, Enqueued.

        Raises:
            JobNotFound: No such job.
            InvalidTransition: It is Enqueued, Scheduled, Processing or AwaitingRetry.
        """
        return self._enqueue_again(job_id, "retried by hand", ("Failed", "Succeeded", "Deleted"))

    def requeue(self, job_id: str) -> Job:
        """Run a waiting job now: move a Scheduled or AwaitingRetry job to Enqueued.

        Hangfire's dashboard calls this "Requeue"; the job keeps its retry count, and the
        scheduler no longer waits for its due time.

        Returns:
            The job, Enqueued in its queue.

        Raises:
            JobNotFound: No such job.
            InvalidTransition: It is not Scheduled or AwaitingRetry.
        """
        return self._enqueue_again(job_id, "requeued by hand", ("Scheduled", "AwaitingRetry"))

    def _enqueue_again(self, job_id: str, reason: str, expected: tuple[str, ...]) -> Job:
        job = self.storage.get(job_id)
        change = self.storage.change_state(
            job_id, Enqueued(enqueued_at=utcnow(),
                             queue=job.queue if job is not None else "default", reason=reason),
            expected=expected,
        )
        self._notifier.observe([change])
        self._notifier.jobs_changed([change.job])
        return change.job

    def delete(self, job_id: str, *, reason: str | None = None,
               ttl: timedelta | None = timedelta(hours=24)) -> Job:
        """Move a job to Deleted (kept for ``ttl``, then removed by cleanup).

        A Processing job's worker loses its claim: its outcome will be discarded.

        Raises:
            JobNotFound: No such job.
            InvalidTransition: It is Deleted already.
        """
        now = utcnow()
        change = self.storage.change_state(
            job_id, Deleted(deleted_at=now, reason=reason),
            expires_at=now + ttl if ttl is not None else None,
        )
        self._notifier.observe([change])
        return change.job
