"""Authentication, CSRF and same-origin checks of the dashboard (field case C15).

* **Who may look.** With a token configured, a request is let in when it carries
  ``Authorization: Bearer <token>``, HTTP basic auth whose password is the token, or the
  session cookie that ``POST /login`` sets (an HMAC of the token, ``HttpOnly``,
  ``SameSite=Strict``). Without a token (only allowed on loopback), everyone on this
  machine may look, and the ``Host`` header must name a loopback host, which defeats DNS
  rebinding.
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
from collections.abc import Mapping
from urllib.parse import urlsplit

from qmlkit.dashboard.config import is_loopback

#: Name of the session cookie.
SESSION_COOKIE = "qmlkit_dashboard"
#: Header carrying the CSRF token on API mutations.
CSRF_HEADER = "x-csrf-token"
#: Form field carrying the CSRF token.
CSRF_FIELD = "csrf_token"


class Auth:
    """Checks requests against the configured token.

    Args:
        token: The access token, or ``None`` for no authentication (loopback only).
        secret: Key of the HMACs (random per process by default, so restarting the
            dashboard logs everyone out).
    """

    def __init__(self, token: str | None, *, secret: bytes | None = None) -> None:
        self.token = token
        self._secret = secret or secrets.token_bytes(32)

    @property
    def required(self) -> bool:
        """Whether requests must authenticate."""
        return self.token is not None

    def _mac(self, text: str) -> str:
        return hmac.new(self._secret, text.encode(), hashlib.sha256).hexdigest()

    def session_value(self) -> str:
        """Return the session cookie's value for a person who gave the right token."""
        return self._mac(f"session|{self.token}")

    def token_matches(self, given: str) -> bool:
        """Return whether ``given`` is the configured token (constant-time)."""
        return self.token is not None and hmac.compare_digest(given.encode(), self.token.encode())

    def method(self, headers: Mapping[str, str], cookies: Mapping[str, str]) -> str | None:
        """Return how the request authenticated, or ``None`` if it did not.

        Returns:
            ``"none"`` (no token configured), ``"bearer"``, ``"basic"``, ``"cookie"``, or
            ``None``: refuse it with 401.
        """
        if self.token is None:
            return "none"
        header = headers.get("authorization", "")
        scheme, _, value = header.partition(" ")
        if scheme.lower() == "bearer" and self.token_matches(value.strip()):
            return "bearer"
        if scheme.lower() == "basic":
            try:
                decoded = base64.b64decode(value.strip(), validate=True).decode("utf-8")
            except (binascii.Error, UnicodeDecodeError):
                decoded = ""
            if self.token_matches(decoded.partition(":")[2]):
                return "basic"
        cookie = cookies.get(SESSION_COOKIE)
        if cookie and hmac.compare_digest(cookie.encode(), self.session_value().encode()):
            return "cookie"
        return None

    def csrf_token(self, cookies: Mapping[str, str]) -> str:
        """Return the CSRF token for the request's session (what pages embed)."""
        return self._mac(f"csrf|{cookies.get(SESSION_COOKIE, '')}")

    def csrf_ok(self, given: str | None, cookies: Mapping[str, str]) -> bool:
        """Return whether ``given`` is the right CSRF token for this session."""
        return bool(given) and hmac.compare_digest(
            str(given).encode(), self.csrf_token(cookies).encode())


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
