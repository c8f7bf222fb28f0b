"""Wake-ups over kombu: tiny messages that start idle workers at once.

Storage stays the only source of truth; a wake-up only says "queue Q has runnable jobs,
look now". A lost or duplicated wake-up costs latency, never a job: a worker that hears
nothing still finds the job at its next poll. This is what lets the polling interval be
long (little storage load while idle) without making jobs wait.

* `WakeupPublisher` publishes, after the commit that made jobs runnable (enqueue, bulk
  enqueue, promotion of due jobs, manual retry, reclaim), one small message naming the
  queues to a kombu **fanout** exchange. Bursts are coalesced: the first message after
  a quiet spell goes out at once, later ones at most every ``COALESCE_S`` (5 ms), each
  naming every queue gathered meanwhile; a loop of thousands of enqueues sends a few
  hundred messages a second at most.
* `WakeupListener` runs in each server: its own auto-deleted queue bound to the
  exchange, a consumer thread that wakes the idle workers of the named queues (a
  server serving other queues ignores the message), and reconnection with capped
  backoff (`qmlkit.backoff.Backoff`) when the broker goes away, logging each change.
  Meanwhile workers poll. A broker that goes silent without closing the connection (a
  proxy, a NAT, a failed-over host: a *half-open* connection) is noticed within
  ``DEAD_AFTER_S`` seconds: on Redis the listener sends a PING on its pub/sub
  connection every ``HEARTBEAT_S / 2`` seconds and gives the connection up when none is
  answered for ``DEAD_AFTER_S``; on AMQP the connection negotiates ``HEARTBEAT_S``
  heartbeats and the listener checks them twice a heartbeat. Its `WakeupListener.state`
  tells where it is.

Any kombu URL works: ``redis://``, ``amqp://`` (RabbitMQ), ``memory://`` (one
process), ``filesystem:///path/to/folder`` (processes on one machine, no server to
install; the folder is created, `qmlkit.wakeup.filesystem`), or a transport declared
under the ``kombu.transports`` entry points (qmlkit-postgres: ``pgnotify+postgresql://``,
``LISTEN/NOTIFY``).

By default (``wakeup_url="auto"``, `AUTO`) the storage's own channel is used, when it
offers one (`qmlkit.wakeup.defaults`); ``None`` turns wake-ups off.
"""

from __future__ import annotations

from qmlkit.wakeup.defaults import AUTO, open_channel, resolve_wakeup, wakeup_setting
from qmlkit.wakeup.filesystem import STALE_S, filesystem_transport, prune_filesystem
from qmlkit.wakeup.listener import ListenerState, WakeupListener
from qmlkit.wakeup.publisher import WakeupPublisher
from qmlkit.wakeup.transports import (
    COALESCE_S,
    DEAD_AFTER_S,
    DEFAULT_EXCHANGE,
    HEARTBEAT_S,
    MAX_BACKOFF_S,
    MIN_BACKOFF_S,
    POLL_S,
    RECURRING,
    SCHEDULED,
    SOCKET_TIMEOUT_S,
    connection_for,
    exchange_for,
    forget_connection,
    redis_transport,
    register_transports,
)

__all__ = [
    "AUTO", "COALESCE_S", "DEAD_AFTER_S", "DEFAULT_EXCHANGE", "HEARTBEAT_S", "MAX_BACKOFF_S",
    "MIN_BACKOFF_S", "POLL_S", "RECURRING", "SCHEDULED", "SOCKET_TIMEOUT_S", "STALE_S",
    "ListenerState", "WakeupListener", "WakeupPublisher", "connection_for", "exchange_for",
    "filesystem_transport", "forget_connection", "open_channel", "prune_filesystem",
    "redis_transport", "register_transports", "resolve_wakeup", "wakeup_setting",
]
