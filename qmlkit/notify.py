"""The after-commit fan-out: observers, local servers and the wake-up publisher.

After a commit that changed jobs, an app tells the ``qmlkit_job_state_changed``
observers, wakes the servers of this process that subscribed (a ``Server`` subscribes
on ``start()`` and unsubscribes on ``stop()``), and publishes a wake-up naming the queues
for every other process (`qmlkit.wakeup`).
"""

from __future__ import annotations

import logging
import os
import threading
import weakref
from collections.abc import Callable, Iterable, Sequence
from typing import TYPE_CHECKING, Protocol

from qmlkit.plugins import has_observers, notify_state_changed
from qmlkit.storage.base import StateChange
from qmlkit.wakeup import (
    AUTO,
    RECURRING,
    SCHEDULED,
    WakeupPublisher,
    connection_for,
    resolve_wakeup,
)

if TYPE_CHECKING:
    import pluggy

    from qmlkit.job import Job

__all__ = ["LocalServer", "Notifier"]

log = logging.getLogger("qmlkit.wakeup")


class LocalServer(Protocol):
    """A server of this process that wants to hear about new jobs at once."""

    def wake(self, queue: str | None = None) -> None:
        """Wake an idle worker for ``queue``."""

    def nudge_scheduler(self) -> None:
        """Make the scheduler look for due jobs now."""

    def nudge_recurring(self) -> None:
        """Make the recurring poller look at the templates now."""


class Notifier:
    """One app's after-commit fan-out. Thread-safe.

    Args:
        plugin_manager: Returns the app's plugin manager (built on first use).
        wakeup_url: A kombu URL to publish wake-ups on, ``None``, or `qmlkit.wakeup.AUTO`
            for the storage's own channel (`qmlkit.wakeup.resolve_wakeup`).
        wakeup_exchange: The fanout exchange's name (for `AUTO`, before the storage's
            scope is added).
        storage: Returns the app's storage; asked once, for `AUTO` only.

    Raises:
        ConfigurationError: An explicit ``wakeup_url`` is unusable (named, masked).

    Attributes:
        url_setting: ``wakeup_url`` as given (`AUTO`, ``None`` or a URL).
        exchange_setting: ``wakeup_exchange`` as given.
    """

    def __init__(self, plugin_manager: Callable[[], pluggy.PluginManager], *,
                 wakeup_url: str | None, wakeup_exchange: str,
                 storage: Callable[[], object] = lambda: None) -> None:
        self._pm = plugin_manager
        if wakeup_url and wakeup_url != AUTO:
            connection_for(wakeup_url)  # a bad URL fails here, naming it
        self.url_setting = wakeup_url
        self.exchange_setting = wakeup_exchange
        self._storage = storage
        self._resolved: tuple[str | None, str] | None = (
            None if wakeup_url == AUTO else (wakeup_url, wakeup_exchange))
        self._lock = threading.Lock()
        self.publisher: WakeupPublisher | None = None  #: this process's, once made
        self._publisher_pid = 0  # the process that made it (see `wakeup_publisher`)
        self._servers: weakref.WeakSet[LocalServer] = weakref.WeakSet()
        self._unusable = False  # a publisher could not be made (logged once)
        self._settled: list[Callable[[Sequence[str]], None]] = []  # result waiters

    def _resolve(self) -> tuple[str | None, str]:
        resolved = self._resolved
        if resolved is None:
            store = self._storage()  # outside the lock: opening it may take a while
            with self._lock:
                if self._resolved is None:
                    self._resolved = resolve_wakeup(self.url_setting, self.exchange_setting,
                                                    store)
                resolved = self._resolved
        return resolved

    @property
    def wakeup_url(self) -> str | None:
        """The URL wake-ups are published on, or ``None`` (for `AUTO`, the storage's
        channel: asking opens the storage, once)."""
        return (self._resolved or self._resolve())[0]

    @property
    def wakeup_exchange(self) -> str:
        """The exchange wake-ups are published on (for `AUTO`, with the storage's scope)."""
        return (self._resolved or self._resolve())[1]

    def subscribe(self, server: LocalServer) -> None:
        """Wake ``server`` after each commit from now on (held weakly)."""
        self._servers.add(server)

    def unsubscribe(self, server: LocalServer) -> None:
        """Stop waking ``server``; no error if it was not subscribed."""
        self._servers.discard(server)

    def watch_settled(self, callback: Callable[[Sequence[str]], None]) -> None:
        """Call ``callback(job_ids)`` after commits that may have finished those jobs
        (an app's `qmlkit.waiting.ResultWaiter` listens here). Held strongly; it must
        be cheap and must not raise."""
        with self._lock:
            self._settled = [*self._settled, callback]

    def settled(self, job_ids: Sequence[str]) -> None:
        """Jobs ``job_ids`` may have reached a final state (a local server stored their
        outcomes, or the app deleted them): tell the result waiters. No-op without one."""
        for callback in self._settled:
            callback(job_ids)

    def wakeup_publisher(self) -> WakeupPublisher:
        """This process's publisher. A process forked after the first wake-up (gunicorn
        ``--preload``, multiprocessing) inherits the parent's publisher without its
        thread or its connection, so it gets one of its own."""
        url, exchange = self._resolved or self._resolve()
        with self._lock:
            if self.publisher is not None and self._publisher_pid != os.getpid():
                self.publisher = None  # the parent's: its socket is not ours to close
            if self.publisher is None:
                assert url is not None
                self.publisher = WakeupPublisher(url, exchange)
                self._publisher_pid = os.getpid()
            return self.publisher

    def observe(self, changes: Sequence[StateChange]) -> None:
        """Tell the observers and the result waiters about committed ``changes``."""
        notify_state_changed(self._pm(), changes)
        if self._settled:
            self.settled([change.job.id for change in changes])

    def announce(self, stored: list[Job]) -> None:
        """New jobs were committed: tell the observers (if any), then wake."""
        if has_observers(self._pm()):
            notify_state_changed(self._pm(), [StateChange(j, None) for j in stored])
        self.jobs_changed(stored)

    def jobs_changed(self, jobs: Iterable[Job]) -> None:
        """Committed jobs are Enqueued (wake their queues) or waiting (nudge schedulers)."""
        if not self.wakeup_url and not self._servers:
            return
        queues: set[str] = set()
        scheduled = False
        for job in jobs:
            if job.state.name == "Enqueued":
                queues.add(job.queue)
            else:
                scheduled = True
        if self.wakeup_url and (queues or scheduled):
            self._publish(queues | ({SCHEDULED} if scheduled else set()))
        for server in list(self._servers):
            for queue in queues:
                server.wake(queue)
            if scheduled:
                server.nudge_scheduler()

    def recurring_changed(self) -> None:
        """A template was registered: local pollers and, over the broker, every other look."""
        for server in list(self._servers):
            server.nudge_recurring()
        if self.wakeup_url:
            self._publish([RECURRING])

    def _publish(self, names: Iterable[str]) -> None:
        """Hand ``names`` to the publisher; a publisher that cannot be made (its folder
        gone unwritable, say) is logged once and never fails the commit it follows."""
        try:
            publisher = self.wakeup_publisher()
        except Exception as exc:  # wake-ups are hints: servers poll
            if not self._unusable:
                self._unusable = True
                log.warning("wake-ups not sent: %s; servers find the jobs at their next poll",
                            exc)
            return
        publisher.publish(names)

    def close(self) -> None:
        """Close the publisher (a new one is made on next use)."""
        with self._lock:
            if self.publisher is not None:
                self.publisher.close()
                self.publisher = None
