"""Authentication, CSRF and same-origin checks of the dashboard (field case C15).

* **Who may look.** With a token configured, a request is let in when it carries
  ``Authorization: Bearer <token>``, HTTP basic auth whose password is the token, or the
  session cookie that ``POST /login`` sets (``HttpOnly``, ``SameSite=Strict``). A
  session is a random id (``secrets.token_urlsafe``) kept on the server: it expires
  after ``session_ttl_s`` seconds, and logging out revokes it. Wrong tokens are
  rate-limited per client and overall (`qmlkit.dashboard.ratelimit`). Without a token
  (only allowed on loopback), everyone on this machine may look, and the ``Host`` header
  must name a loopback host, which defeats DNS rebinding.
* **Who may act.** Every action is a POST. Unless it is authenticated with a Bearer
  header (which a browser never adds by itself), it must carry the CSRF token, in the
  ``X-CSRF-Token`` header or a ``csrf_token`` form field, and its ``Origin`` (when
  sent) must be this dashboard's. The CSRF token is an HMAC of a per-process secret and
  the session, embedded in each page's ``<meta name="csrf-token">``.
* **WebSockets** pass the same authentication, and their ``Origin`` must be this
  dashboard's (cross-site WebSocket hijacking).
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import hmac
import secrets
import threading
import time
from collections import OrderedDict
from collections.abc import Callable, Mapping
from urllib.parse import urlsplit

from qmlkit.dashboard.config import DEFAULT_SESSION_TTL_S, is_loopback
from qmlkit.dashboard.ratelimit import LoginLimiter

#: Name of the session cookie.
SESSION_COOKIE = "qmlkit_dashboard"
#: Header carrying the CSRF token on API mutations.
CSRF_HEADER = "x-csrf-token"
#: Form field carrying the CSRF token.
CSRF_FIELD = "csrf_token"
#: Sessions kept at most; logging in beyond this forgets the oldest.
MAX_SESSIONS = 10_000


class LockedOut(Exception):  # a condition, as StaleClaim is
    """A client made too many wrong token guesses: its token is not even looked at.

    Attributes:
        retry_after_s: Seconds until it may try again (> 0).
    """

    def __init__(self, retry_after_s: float) -> None:
        self.retry_after_s = retry_after_s
        super().__init__(f"too many wrong tokens from this address: try again in "
                         f"{max(1, round(retry_after_s))} s")


class Auth:
    """Checks requests against the configured token, and keeps the login sessions.

    Thread-safe.

    Args:
        token: The access token, or ``None`` for no authentication (loopback only).
        secret: Key of the CSRF tokens' HMAC (random per process by default).
        session_ttl_s: Seconds a session lives after its login (``DashboardConfig``).
        limiter: The failed-login limits; default a fresh `LoginLimiter`.
        clock: Monotonic seconds (tests may pass their own).
    """

    def __init__(self, token: str | None, *, secret: bytes | None = None,
                 session_ttl_s: float = DEFAULT_SESSION_TTL_S,
                 limiter: LoginLimiter | None = None,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self.token = token
        self.session_ttl_s = session_ttl_s
        self.limiter = limiter or LoginLimiter(clock=clock)
        self.clock = clock
        self._secret = secret or secrets.token_bytes(32)
        self._sessions: OrderedDict[str, float] = OrderedDict()  # id -> expiry (clock)
        self._lock = threading.Lock()

    @property
    def required(self) -> bool:
        """Whether requests must authenticate."""
        return self.token is not None

    def _mac(self, text: str) -> str:
        return hmac.new(self._secret, text.encode(), hashlib.sha256).hexdigest()

    def token_matches(self, given: str) -> bool:
        """Return whether ``given`` is the configured token (constant-time; no limits)."""
        return self.token is not None and hmac.compare_digest(given.encode(), self.token.encode())

    def check_token(self, given: str, client: str) -> bool:
        """Check a token ``client`` presented, under the failed-login limits.

        Args:
            given: The token presented.
            client: The client's address (the limits are per address).

        Returns:
            Whether it is the configured token; a wrong one counts as a failure.

        Raises:
            LockedOut: ``client`` is locked out; ``given`` was not looked at.
        """
        wait = self.limiter.retry_after(client)
        if wait is not None:
            raise LockedOut(wait)
        if self.token_matches(given):
            self.limiter.succeeded(client)
            return True
        self.limiter.failed(client)
        return False

    # --- sessions --------------------------------------------------------------------------

    def new_session(self) -> str:
        """Start a session for a person who gave the right token; return its cookie value.

        Returns:
            A random id (``secrets.token_urlsafe(32)``), valid for ``session_ttl_s``.
        """
        session = secrets.token_urlsafe(32)
        with self._lock:
            self._sessions[session] = self.clock() + self.session_ttl_s
            while len(self._sessions) > MAX_SESSIONS:
                self._sessions.popitem(last=False)
        return session

    def session_ok(self, session: str) -> bool:
        """Return whether ``session`` is a live session (an expired one is forgotten)."""
        with self._lock:
            expires = self._sessions.get(session)
            if expires is None:
                return False
            if expires <= self.clock():
                del self._sessions[session]
                return False
            return True

    def revoke(self, session: str | None) -> None:
        """End ``session`` (logout); an unknown or ``None`` one is ignored."""
        if session:
            with self._lock:
                self._sessions.pop(session, None)

    # --- requests --------------------------------------------------------------------------

    def method(self, headers: Mapping[str, str], cookies: Mapping[str, str],
               client: str = "unknown") -> str | None:
        """Return how the request authenticated, or ``None`` if it did not.

        A token in an ``Authorization`` header is checked under the failed-login limits
        of ``client`` (`check_token`); a session cookie is not (it is random).

        Returns:
            ``"none"`` (no token configured), ``"bearer"``, ``"basic"``, ``"cookie"``, or
            ``None``: refuse it with 401.

        Raises:
            LockedOut: The request carries a token header and ``client`` is locked out.
        """
        if self.token is None:
            return "none"
        scheme, given = _header_token(headers.get("authorization", ""))
        if given is not None and self.check_token(given, client):
            return scheme
        cookie = cookies.get(SESSION_COOKIE)
        if cookie and self.session_ok(cookie):
            return "cookie"
        return None

    def csrf_token(self, cookies: Mapping[str, str]) -> str:
        """Return the CSRF token for the request's session (what pages embed)."""
        return self._mac(f"csrf|{cookies.get(SESSION_COOKIE, '')}")

    def csrf_ok(self, given: str | None, cookies: Mapping[str, str]) -> bool:
        """Return whether ``given`` is the right CSRF token for this session."""
        return bool(given) and hmac.compare_digest(
            str(given).encode(), self.csrf_token(cookies).encode())


def _header_token(header: str) -> tuple[str, str | None]:
    """``("bearer" | "basic", token)`` from an ``Authorization`` header, else ``("", None)``."""
    scheme, _, value = header.partition(" ")
    if scheme.lower() == "bearer":
        return "bearer", value.strip()
    if scheme.lower() == "basic":
        try:
            decoded = base64.b64decode(value.strip(), validate=True).decode("utf-8")
        except (binascii.Error, UnicodeDecodeError):
            decoded = ""
        return "basic", decoded.partition(":")[2]
    return "", None


def host_allowed(host_header: str | None, *, auth_required: bool) -> bool:
    """Return whether the ``Host`` header is acceptable.

    Without a token the dashboard serves loopback only, so a request naming another host
    (a DNS-rebinding page) is refused; with a token every host is allowed.
    """
    if auth_required:
        return True
    if not host_header:
        return False
    host = urlsplit(f"//{host_header}").hostname or ""
    return is_loopback(host)


def same_origin(origin: str | None, host_header: str | None) -> bool:
    """Return whether an ``Origin`` header names the host the request was sent to.

    A missing ``Origin`` passes (non-browser clients send none; browsers send one on
    every cross-origin POST and WebSocket). ``"null"`` fails.
    """
    if origin is None:
        return True
    if not host_header:
        return False
    parts = urlsplit(origin)
    return parts.scheme in ("http", "https") and parts.netloc.lower() == host_header.lower()
