"""Opt-in plugin: servers announce every state change to dashboards in other processes.

Wake-ups tell a dashboard about enqueues, retries and promotions, but not about
outcomes (Succeeded, Failed, AwaitingRetry), which other processes' dashboards otherwise
learn from their poll (every 0.5 s by default). With this plugin registered in the
workers' app, each server with a wake-up URL also publishes, after every committed
state change, a tiny message naming the job's queue on a second fanout exchange,
``<wakeup_exchange>.events``. Dashboards listening on the same broker (``--wakeup``)
refresh at once. Servers do not listen on that exchange, so workers are never woken by
it; the publisher coalesces bursts exactly as wake-ups are (`qmlkit.wakeup`).

Enable it where the workers' app is defined::

    import qmlkit.dashboard.events

    app = App("shop", storage=..., wakeup_url="redis://localhost:6379/0",
              plugins=[qmlkit.dashboard.events])

It needs none of the dashboard's libraries. A server publishes from the moment it has
started (``qmlkit_server_started``) until it begins to stop; changes outside that window
reach dashboards by their poll. Being an observer, it makes servers report
claims too (``claim_changes``), which costs a little per claim; leave it out when no
dashboard runs in another process.
"""

from __future__ import annotations

import threading
from typing import TYPE_CHECKING

from qmlkit.hookspecs import hookimpl
from qmlkit.wakeup import WakeupPublisher

if TYPE_CHECKING:
    from qmlkit.job import Job
    from qmlkit.processing.server import Server

_lock = threading.Lock()
#: One publisher per running server that has a wake-up URL, by ``id(server)``.
_publishers: dict[int, WakeupPublisher] = {}


def events_exchange(wakeup_exchange: str) -> str:
    """Return the name of the events exchange that goes with a wake-up exchange."""
    return f"{wakeup_exchange}.events"


@hookimpl
def qmlkit_server_started(server: Server) -> None:
    """Open a publisher on the server's wake-up broker (nothing without a wake-up URL)."""
    url = server.config.wakeup_url
    if not url:
        return
    publisher = WakeupPublisher(url, events_exchange(server.config.wakeup_exchange))
    with _lock:
        _publishers[id(server)] = publisher


@hookimpl
def qmlkit_server_stopping(server: Server) -> None:
    """Close the server's publisher (sending what is pending, 1 s at most)."""
    with _lock:
        publisher = _publishers.pop(id(server), None)
    if publisher is not None:
        publisher.close()


@hookimpl
def qmlkit_job_state_changed(job: Job) -> None:
    """Announce the change: the job's queue, on every publisher of this process.

    Returns at once: publishing is asynchronous and coalesced, and never raises.
    """
    with _lock:
        publishers = list(_publishers.values())
    for publisher in publishers:
        publisher.publish((job.queue,))
