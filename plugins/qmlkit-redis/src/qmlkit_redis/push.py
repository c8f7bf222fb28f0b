"""Push wake-ups: an idle server hears of a job from the script that stored it.

With ``push_wakeups`` on (``redis://…?push_wakeups=1``, or the storage option), a claim
that comes back short, so that a server may be about to wait, marks each of its queues
idle (the key ``<prefix>idle:<queue>``, or ``<prefix>idle:*`` for a server of every
queue). Every script that makes a job runnable on a queue (an enqueue, a bulk enqueue,
a recurring tick, the promotion of a due job, a retry, a requeue) deletes that key and,
if it was there, ``PUBLISH``es the queue's name on the channel ``<prefix>wakeup``, in the
same atomic script. Each server with the option on runs a `PushListener` subscribed to
that channel, which wakes its idle workers of the queue. Hangfire.Redis.StackExchange
wakes its fetchers over a pub/sub channel too, with a ``PUBLISH`` in every enqueue's
transaction; here only an enqueue onto a queue marked idle publishes.

Why it is faster than the kombu channel (`qmlkit.wakeup`): the wake-up leaves Redis with
the enqueue's own reply, with no publisher thread, no second round trip and no kombu
envelope to decode, so an idle worker starts a job about one claim's round trip after
the enqueue returns. Why it costs little: only the first job after a short claim
publishes; a busy server's enqueues pay one ``DEL`` of a missing key inside the script.
Clients need no option (the scripts always check the key); the servers that listen set
it. A lost message (the listener reconnecting) costs latency, never a job: the workers
still poll, and a listener that (re)subscribes wakes every idle worker once.

What it leaves to the kombu channel: nudges of the scheduler and the recurring poller
(a job scheduled a few seconds ahead is found at the scheduler's next check, not at
once). Both channels may run together; ``wakeup_url=None`` with ``push_wakeups`` on is
the leanest setting.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable
from typing import Any

from qmlkit.backoff import Backoff
from qmlkit.errors import ConfigurationError
from qmlkit.wakeup.transports import DEAD_AFTER_S, HEARTBEAT_S, MAX_BACKOFF_S, MIN_BACKOFF_S, POLL_S

__all__ = ["PushListener", "url_flag"]

log = logging.getLogger("qmlkit_redis.push")

_TRUE = ("1", "true", "yes", "on")
_FALSE = ("0", "false", "no", "off", "")


def url_flag(value: str, name: str, url: str) -> bool:
    """A boolean URL query option (``1``/``true``/``yes``/``on`` or ``0``/``false``/
    ``no``/``off``, any case).

    Raises:
        ConfigurationError: Any other value, naming the option.
    """
    word = value.strip().lower()
    if word in _TRUE or word in _FALSE:
        return word in _TRUE
    from qmlkit.config import mask_url

    raise ConfigurationError(f"Redis URL {mask_url(url)!r}: {name}={value!r} is not a "
                             f"boolean (give {name}=1 or {name}=0)")


class PushListener:
    """A thread subscribed to one prefix's push channel (see the module docstring).

    Each message's queue name goes to ``on_wakeup``; each (re)subscription calls
    ``on_wakeup(None)`` (wake every idle worker: a message may have been missed while
    unsubscribed). The connection is checked with a ``PING`` every ``HEARTBEAT_S / 2``
    seconds and given up when Redis answers nothing for ``DEAD_AFTER_S`` (a half-open
    connection); a lost or refused connection is retried with capped backoff
    (`qmlkit.backoff.Backoff`, ``MIN_BACKOFF_S`` to ``MAX_BACKOFF_S``), one warning per
    outage. It never raises into the server.

    Args:
        client: Returns the storage's redis-py client (called at each connection, so a
            reopened storage is followed).
        channel: The channel's full name (``<prefix>wakeup``).
        on_wakeup: ``Server.wake``.
        name: The server's name, for the thread's name and the log.

    Attributes:
        connected: Set while subscribed (the server polls less then).
    """

    def __init__(self, client: Callable[[], Any], channel: str,
                 on_wakeup: Callable[[str | None], None], name: str) -> None:
        self._client = client
        self._channel = channel
        self._on_wakeup = on_wakeup
        self._name = name
        self.connected = threading.Event()
        self._stopping = threading.Event()
        self.heard = 0  #: wake-up messages received (for tests and benchmarks)
        self._thread = threading.Thread(target=self._run, name=f"qmlkit-push-{name}",
                                        daemon=True)

    def start(self) -> None:
        """Start the listening thread; returns at once."""
        self._thread.start()

    def stop(self) -> None:
        """Stop listening and release the connection (waits 2 s at most for the thread)."""
        self._stopping.set()
        self._thread.join(2.0)

    def _run(self) -> None:
        backoff = Backoff(MIN_BACKOFF_S, MAX_BACKOFF_S)
        while not self._stopping.is_set():
            pubsub = None
            try:
                pubsub = self._client().pubsub()
                pubsub.subscribe(self._channel)
                self._listen(pubsub, backoff)
            except Exception as exc:  # Redis is optional here: workers poll meanwhile
                self.connected.clear()
                first = not backoff.delay_s
                delay = backoff.next()
                log.log(logging.WARNING if first else logging.DEBUG,
                        "push wake-ups for %s lost (%s: %s); subscribing again in %.1f s, "
                        "workers poll meanwhile", self._name, type(exc).__name__, exc, delay)
                self._stopping.wait(backoff.jittered(delay))
            finally:
                self.connected.clear()
                if pubsub is not None:
                    try:
                        pubsub.close()
                    except Exception as exc:  # best effort: the socket is gone either way
                        log.debug("could not close a push wake-up connection: %s", exc)

    def _listen(self, pubsub: Any, backoff: Backoff) -> None:
        """Read messages until stopped; raise when the connection fails or goes silent."""
        heard = pinged = time.monotonic()
        while not self._stopping.is_set():
            message = pubsub.get_message(timeout=POLL_S)
            now = time.monotonic()
            if message is not None:
                heard = now
                kind = message.get("type")
                if kind == "subscribe":
                    if backoff.delay_s:
                        log.info("push wake-ups for %s subscribed again", self._name)
                    backoff.reset()
                    self.connected.set()
                    self._on_wakeup(None)
                elif kind == "message":
                    data = message.get("data")
                    self.heard += 1
                    self._on_wakeup(data.decode() if isinstance(data, bytes) else str(data))
            if now - pinged >= HEARTBEAT_S / 2:
                pubsub.ping()
                pinged = now
            if now - heard > DEAD_AFTER_S:
                raise ConnectionError(f"Redis answered nothing for {DEAD_AFTER_S:.0f} s")
