"""Rate limits on failed logins: per client with backoff, and for the whole dashboard.

A wrong token (on the login form, or as a Bearer or basic-auth header) counts as one
failure of the client that sent it (its IP address, as the ASGI server saw it). The
first `FREE_FAILURES` failures cost nothing; each later one locks that client out for a
delay that doubles from `LOCKOUT_INITIAL_S` up to `LOCKOUT_CAP_S` (`qmlkit.backoff.Backoff`),
during which its token checks are refused with 429 before the token is looked at. A
right token resets the client.

Across all clients, more than `GLOBAL_FAILURES` failures within `GLOBAL_WINDOW_S` seconds
(a guesser with many addresses) lock out every client that failed within that window,
until the window has passed; a client that has not failed, the real operator's, is
still let in with the right token, so an attack never becomes a denial of service for
it. Sessions (the cookie the login page sets) are random and are never limited.
"""

from __future__ import annotations

import threading
import time
from collections import OrderedDict, deque
from collections.abc import Callable

from qmlkit.backoff import Backoff

__all__ = ["FREE_FAILURES", "GLOBAL_FAILURES", "GLOBAL_WINDOW_S", "LOCKOUT_CAP_S",
           "LOCKOUT_INITIAL_S", "MAX_CLIENTS", "LoginLimiter"]

#: Failures a client may make before it is locked out.
FREE_FAILURES = 5
#: The first lockout, in seconds; each further failure doubles it.
LOCKOUT_INITIAL_S = 1.0
#: The longest lockout, in seconds.
LOCKOUT_CAP_S = 300.0
#: Failures of all clients within `GLOBAL_WINDOW_S` beyond which failed clients wait.
GLOBAL_FAILURES = 100
#: The window of the global limit, in seconds.
GLOBAL_WINDOW_S = 60.0
#: Clients remembered at most (the oldest are forgotten first).
MAX_CLIENTS = 10_000


class _Client:
    __slots__ = ("backoff", "failures", "last_failure", "locked_until")

    def __init__(self) -> None:
        self.failures = 0
        self.locked_until = 0.0
        self.last_failure = 0.0
        self.backoff = Backoff(LOCKOUT_INITIAL_S, LOCKOUT_CAP_S)


class LoginLimiter:
    """Counts failed token checks per client and overall; thread-safe.

    Args:
        free_failures: Failures a client may make before its first lockout.
        global_failures: Failures of all clients per ``global_window_s`` seconds beyond
            which every client that failed within the window waits for its end.
        global_window_s: The global window, in seconds.
        clock: Monotonic seconds (tests may pass their own).
    """

    def __init__(self, *, free_failures: int = FREE_FAILURES,
                 global_failures: int = GLOBAL_FAILURES,
                 global_window_s: float = GLOBAL_WINDOW_S,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self.free_failures = free_failures
        self.global_failures = global_failures
        self.global_window_s = global_window_s
        self.clock = clock
        self._clients: OrderedDict[str, _Client] = OrderedDict()
        self._recent: deque[float] = deque()
        self._lock = threading.Lock()

    def retry_after(self, client: str) -> float | None:
        """Return how long ``client`` must wait before its token is checked, or ``None``.

        Args:
            client: The client's address.

        Returns:
            Seconds (> 0) while the client is locked out, by its own failures or by the
            global limit; ``None`` when its token may be checked now.
        """
        now = self.clock()
        with self._lock:
            self._expire(now)
            entry = self._clients.get(client)
            if entry is None:
                return None
            if entry.locked_until > now:
                return entry.locked_until - now
            if (len(self._recent) > self.global_failures
                    and now - entry.last_failure < self.global_window_s):
                return entry.last_failure + self.global_window_s - now
            return None

    def failed(self, client: str) -> None:
        """Record a wrong token from ``client`` (may start or lengthen its lockout)."""
        now = self.clock()
        with self._lock:
            self._expire(now)
            self._recent.append(now)
            entry = self._clients.pop(client, None) or _Client()
            self._clients[client] = entry  # the most recent last
            entry.failures += 1
            entry.last_failure = now
            if entry.failures > self.free_failures:
                entry.locked_until = now + entry.backoff.next()
            while len(self._clients) > MAX_CLIENTS:
                self._clients.popitem(last=False)

    def succeeded(self, client: str) -> None:
        """Record a right token from ``client``: it starts afresh."""
        with self._lock:
            self._clients.pop(client, None)

    def _expire(self, now: float) -> None:
        """Forget failures older than the window, and clients idle longer than the cap."""
        while self._recent and now - self._recent[0] >= self.global_window_s:
            self._recent.popleft()
        horizon = max(self.global_window_s, LOCKOUT_CAP_S)
        while self._clients:
            oldest = next(iter(self._clients.values()))
            if now - oldest.last_failure < horizon or oldest.locked_until > now:
                break
            self._clients.popitem(last=False)
