"""Connect to the storage at start, retrying while it is unreachable.

A worker may start before its storage (containers starting in any order): instead of
failing at once, ``Server.start()`` opens the storage through `open_storage`, which
retries `StorageUnavailable` with the project's capped backoff, logging each attempt,
until it connects or ``ServerConfig.connect_timeout`` passes (Celery's
``broker_connection_retry_on_startup``). Any other error (a bad URL, an unknown scheme,
a configuration error) is raised at once.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable
from datetime import timedelta

from qmlkit.backoff import Backoff
from qmlkit.errors import StorageUnavailable

__all__ = ["open_storage"]

log = logging.getLogger("qmlkit.server")

#: First and largest wait between connection attempts, in seconds.
INITIAL_S, CAP_S = 0.5, 5.0


def open_storage(connect: Callable[[], object], *, timeout: timedelta, what: str,
                 clock: Callable[[], float] = time.monotonic,
                 sleep: Callable[[float], object] = time.sleep,
                 cancelled: threading.Event | None = None) -> None:
    """Call ``connect`` until it returns, retrying only while the storage is unreachable.

    Args:
        connect: Opens the storage (e.g. ``storage.open``); raises `StorageUnavailable`
            while the service cannot be reached.
        timeout: How long to keep trying; ``timedelta(0)`` means one attempt only.
        what: The storage, as logs and the final error name it (e.g. its ``repr``).
        clock: Monotonic seconds (tests may pass their own).
        sleep: Waits a number of seconds (tests may pass their own).
        cancelled: Once set, the retries stop (a worker told to stop while its storage
            is unreachable): waits are made on it instead of with ``sleep``.

    Raises:
        StorageUnavailable: Still unreachable when ``timeout`` passed, or when
            ``cancelled`` was set; the message names ``what``, the attempts and the last
            error, chained.
        Exception: Whatever else ``connect`` raises, at once (configuration errors).
    """
    deadline = clock() + timeout.total_seconds()
    backoff = Backoff(INITIAL_S, CAP_S)
    attempt = 0
    while True:
        attempt += 1
        try:
            connect()
        except StorageUnavailable as exc:
            remaining = deadline - clock()
            if remaining <= 0:
                raise StorageUnavailable(
                    f"storage {what} still unreachable after {attempt} attempt(s) in "
                    f"{timeout.total_seconds():g} s (connect_timeout): {exc}") from exc
            if cancelled is not None and cancelled.is_set():
                raise StorageUnavailable(
                    f"storage {what} unreachable; stopped before it could be reached, "
                    f"after {attempt} attempt(s): {exc}") from exc
            wait = min(backoff.jittered(backoff.next()), remaining)
            log.warning("storage %s unreachable (attempt %d): %s; retrying in %.1f s "
                        "(%.0f s left of connect_timeout)", what, attempt, exc, wait,
                        remaining)
            if cancelled is None:
                sleep(wait)
            else:
                cancelled.wait(wait)
        else:
            if attempt > 1:
                log.info("storage %s connected after %d attempt(s)", what, attempt)
            return
