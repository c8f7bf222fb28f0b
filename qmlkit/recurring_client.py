"""The recurring-template half of the client API (``App`` inherits it).

Templates live in the storage; servers materialise their ticks
(`qmlkit.processing.duties.recurring`). ``App`` supplies ``registry``, ``storage``,
``make_job``, ``enqueue_jobs``, the enqueue chain and the after-commit notifier.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from datetime import datetime
from typing import TYPE_CHECKING, Any

from qmlkit.errors import ConfigurationError, JobNotFound, MiddlewareError, QmlError
from qmlkit.job import Job, encode_payload
from qmlkit.processing.middleware import EnqueueMiddleware, compose_enqueue, describe
from qmlkit.recurring import RecurringJob

if TYPE_CHECKING:
    from qmlkit.notify import Notifier
    from qmlkit.registry import JobFunction, Registry
    from qmlkit.storage.base import Storage

__all__ = ["RecurringClient"]


def _template(template_id: str, cron: str, method: str, *, args: Sequence[Any],
              kwargs: Mapping[str, Any] | None, **fields: Any) -> RecurringJob:
    """Build a template, its payload checked; errors become qmlkit's own."""
    encode_payload(list(args), dict(kwargs or {}))
    try:
        return RecurringJob(id=template_id, cron=cron, method=method, args=list(args),
                            kwargs=dict(kwargs or {}), **fields)
    except ValueError as exc:
        if isinstance(exc.__cause__, QmlError):
            raise exc.__cause__ from None
        raise ConfigurationError(f"recurring job {template_id!r}: {exc}") from exc


class RecurringClient:
    """Register, list, remove and trigger recurring templates; build a tick's job."""

    registry: Registry
    _notifier: Notifier

    if TYPE_CHECKING:
        @property
        def storage(self) -> Storage: ...
        def make_job(self, method: str, *, args: Sequence[Any] = (),
                     kwargs: Mapping[str, Any] | None = None, queue: str | None = None,
                     priority: int | None = None, metadata: Mapping[str, Any] | None = None,
                     job_id: str | None = None) -> Job: ...
        def enqueue_jobs(self, jobs: Sequence[Job], *,
                         storage: Storage | None = None) -> list[str]: ...
        def _enqueue_chain(self) -> list[EnqueueMiddleware]: ...

    # --- recurring jobs ------------------------------------------------------------------

    def schedule_recurring(
        self,
        template_id: str,
        cron: str,
        method: str | JobFunction[Any, Any],
        *,
        args: Sequence[Any] = (),
        kwargs: Mapping[str, Any] | None = None,
        queue: str | None = None,
        priority: int | None = None,
        timezone: str = "UTC",
        enabled: bool = True,
        misfire: str = "fire_once",
        storage: Storage | None = None,
    ) -> RecurringJob:
        """Register (or replace) a recurring job template (qml-rs ``schedule_recurring``).

        Re-registering a template with the same cron and time zone keeps its schedule
        (so every server may register its templates at start); a changed cron or zone
        starts a new schedule from now.

        Args:
            template_id: Unique id of the template.
            cron: 5 fields (minute-first) or 6 fields (seconds-first); see
                `qmlkit.recurring`.
            method: A job name or a registered job function.
            args: Arguments of every materialised job (JSON).
            kwargs: Keyword arguments of every materialised job (JSON).
            queue: Queue; default the job's registered queue.
            priority: Priority; default the job's registered priority.
            timezone: IANA zone the cron is read in.
            enabled: Whether ticks are materialised.
            misfire: ``"fire_once"`` or ``"skip"``.
            storage: The storage to use (default the app's).

        Returns:
            The stored template, ``next_run_at`` set.

        Raises:
            InvalidCron: The expression is refused (the field is named).
            ConfigurationError: An unknown time zone or another bad option.
            PayloadError: ``args``/``kwargs`` are not JSON.
        """
        name = method if isinstance(method, str) else method.name
        opts = self.registry.options_for(name)
        store = storage or self.storage
        template = _template(template_id, cron, name, args=args, kwargs=kwargs,
                             queue=queue or opts.queue,
                             priority=opts.priority if priority is None else priority,
                             timezone=timezone, enabled=enabled, misfire=misfire)
        existing = store.get_recurring(template_id)
        keep = (existing is not None and existing.cron == template.cron
                and existing.timezone == template.timezone)
        # Keeping the schedule happens in storage, atomically: servers may be advancing
        # next_run_at right now, and a stale copy written back would repeat a tick.
        store.upsert_recurring(template, keep_schedule=keep)
        if keep:
            template = store.get_recurring(template_id) or template
        self._notifier.recurring_changed()
        return template

    def remove_recurring(self, template_id: str, *, storage: Storage | None = None) -> bool:
        """Remove a template; return whether it existed. Jobs already made are kept."""
        return (storage or self.storage).remove_recurring(template_id)

    def list_recurring(self, *, storage: Storage | None = None) -> list[RecurringJob]:
        """Return every recurring template, ordered by id."""
        return (storage or self.storage).list_recurring()

    def trigger_recurring(self, template_id: str, *, storage: Storage | None = None) -> str:
        """Enqueue one job from a template now, leaving its schedule as it is.

        Returns:
            The new job's id.

        Raises:
            JobNotFound: No template with that id (the error names the id).
        """
        store = storage or self.storage
        template = store.get_recurring(template_id)
        if template is None:
            raise JobNotFound(template_id)
        job = self.make_job(template.method, args=template.args, kwargs=template.kwargs,
                            queue=template.queue, priority=template.priority,
                            metadata={"recurring_id": template.id, "triggered": True})
        ids = self.enqueue_jobs([job], storage=store)
        if not ids:
            raise MiddlewareError(", ".join(describe(m) for m in self._enqueue_chain()),
                                  "stored nothing for this trigger")
        return ids[0]

    def tick_job(self, template: RecurringJob, tick: datetime) -> Job | None:
        """Build the job that materialises ``tick`` of ``template`` (id derived from both).

        The enqueue middleware sees it as it sees every enqueue (it may stamp metadata);
        its ``call_next`` returns the id at once, and the server stores the job with the
        template's atomic advance. ``None`` if a middleware dropped it: the tick is
        skipped.
        """
        job = self.make_job(template.method, args=template.args, kwargs=template.kwargs,
                            queue=template.queue, priority=template.priority,
                            metadata={"recurring_id": template.id, "tick": tick.isoformat()},
                            job_id=template.tick_job_id(tick))
        chain = self._enqueue_chain()
        if not chain:
            return job
        final: list[Job] = []

        def capture(jobs: list[Job]) -> list[str]:
            final[:] = jobs
            return [j.id for j in jobs]

        compose_enqueue(chain, [job], capture)
        return final[0] if final else None
