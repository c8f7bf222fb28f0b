"""`WakeupPublisher`: coalesced wake-up messages after a commit (see `qmlkit.wakeup`)."""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Iterable
from typing import Any

from qmlkit.backoff import Backoff
from qmlkit.config import mask_url
from qmlkit.wakeup.transports import (
    COALESCE_S,
    DEFAULT_EXCHANGE,
    HEARTBEAT_S,
    MAX_BACKOFF_S,
    MIN_BACKOFF_S,
    connection_for,
    exchange_for,
    forget_connection,
)

log = logging.getLogger("qmlkit.wakeup")

class WakeupPublisher:
    """Publishes coalesced wake-up messages; never raises into the caller.

    A send that fails (broker down, or a half-open connection: a Redis send times out
    after ``SOCKET_TIMEOUT_S``, an AMQP connection fails its heartbeats within
    ``DEAD_AFTER_S``) drops the connection, logs a warning and is tried again, with the
    queues gathered meanwhile, after a capped backoff (`qmlkit.backoff.Backoff`). A
    wake-up lost on the way costs latency, never a job: servers poll.

    Args:
        url: A kombu URL.
        exchange: The fanout exchange's name.

    Raises:
        ConfigurationError: The URL is unusable (see `connection_for`).
    """

    def __init__(self, url: str, exchange: str = DEFAULT_EXCHANGE) -> None:
        self.url = url
        self._conn = connection_for(url)
        self._exchange = exchange_for(exchange)
        self._pending: set[str] = set()
        self._cond = threading.Condition()
        self._closed = False
        self._producer: Any = None
        self.sent = 0  #: messages published so far (for tests and benchmarks)
        self._thread = threading.Thread(target=self._run, name="qmlkit-wakeup-pub", daemon=True)
        self._thread.start()

    def publish(self, queues: Iterable[str]) -> None:
        """Ask for a wake-up of ``queues``; returns at once (the send is asynchronous)."""
        queues = list(queues)
        pending = self._pending
        if all(queue in pending for queue in queues):
            # Already due to go out, in a message sent after this caller's commit: the
            # common case in a burst, kept free of the lock and the thread switch.
            return
        with self._cond:
            before = len(self._pending)
            self._pending.update(queues)
            if len(self._pending) != before:
                self._cond.notify()

    def _run(self) -> None:
        backoff = Backoff(MIN_BACKOFF_S, MAX_BACKOFF_S)
        last = 0.0
        while True:
            with self._cond:
                while not self._pending and not self._closed:
                    # An open AMQP connection heartbeats while idle, so a dead one is
                    # found (and dropped) before the next wake-up has to go through it.
                    keepalive = self._producer is not None and bool(self._conn.heartbeat)
                    if not self._cond.wait(HEARTBEAT_S / 4 if keepalive else None):
                        self._keepalive()
                if self._closed and not self._pending:
                    return
                pause = last + COALESCE_S - time.monotonic()
                while pause > 0 and not self._closed:  # gather the rest of a burst
                    self._cond.wait(pause)  # a new queue's notify ends it early
                    pause = last + COALESCE_S - time.monotonic()
                queues, self._pending = sorted(self._pending), set()
            last = time.monotonic()
            try:
                self._send(queues)
                if backoff.delay_s:
                    log.info("wake-ups reach %s again", mask_url(self.url))
                backoff.reset()
            except Exception as exc:  # the broker is optional: log, retry later
                self._drop_connection()
                first = not backoff.delay_s
                delay = backoff.next()
                with self._cond:
                    if not self._closed:  # tried again with what comes meanwhile
                        self._pending.update(queues)
                # one warning per outage; the retries of the same outage at debug level
                log.log(logging.WARNING if first else logging.DEBUG,
                        "wake-up for %s not sent (%s: %s); trying again in %.1f s, workers "
                        "poll meanwhile", queues, type(exc).__name__, exc, delay)
                with self._cond:
                    if not self._closed:
                        self._cond.wait(backoff.jittered(delay))

    def _keepalive(self) -> None:
        """Send and check AMQP heartbeats on the idle connection; drop it if dead."""
        try:
            self._conn.heartbeat_check(rate=2)
        except Exception as exc:  # a dead connection: the next send opens a new one
            log.warning("wake-up publisher lost its broker (%s: %s); reconnecting at the "
                        "next wake-up", type(exc).__name__, exc)
            self._drop_connection()

    def _drop_connection(self) -> None:
        """Forget the connection without talking to the broker (it may be half-open)."""
        self._producer = None
        old = self._conn
        self._conn = old.clone()
        forget_connection(old)

    def _send(self, queues: list[str]) -> None:
        if self._producer is None:
            self._conn.ensure_connection(max_retries=1)
            producer = self._conn.Producer(serializer="json")
            # Once per connection, as kombu's own cache of declarations would (the
            # exchange is not auto-delete, and a new connection declares it again):
            # declaring at each send costs a lookup as long as the publish on Redis.
            producer.maybe_declare(self._exchange)
            self._producer = producer
        self._producer.publish({"queues": queues}, exchange=self._exchange, retry=False)
        self.sent += 1

    def close(self) -> None:
        """Send what is pending (best effort, 1 s at most), then release the connection.

        A wake-up still on its way after that second (a slow or unreachable broker) is
        given up with a warning; servers find its jobs at their next poll.
        """
        with self._cond:
            self._closed = True
            self._cond.notify()
        self._thread.join(1.0)
        if self._thread.is_alive():
            log.warning("closing before a wake-up reached %s (broker slow or unreachable); "
                        "servers will find the jobs at their next poll", mask_url(self.url))
        self._conn.release()


#: A listener's states: before its first connection, consuming wake-ups, between a lost
#: (or refused) connection and the next, and after `WakeupListener.stop`.
