"""The dashboard's settings (``qmlkit dashboard`` options and ``QMLKIT_DASHBOARD_*``)."""

from __future__ import annotations

import ipaddress

from pydantic import BaseModel, ConfigDict, Field, SecretStr

from qmlkit.errors import ConfigurationError

#: Shortest token accepted when the dashboard binds a non-loopback address, in characters.
MIN_TOKEN_LENGTH = 16
#: How long a login session lives by default, in seconds (12 hours).
DEFAULT_SESSION_TTL_S = 12 * 3600.0

#: Host names that always mean this machine.
LOOPBACK_NAMES = frozenset({"localhost", "localhost.localdomain", "ip6-localhost"})


def is_loopback(host: str) -> bool:
    """Return whether ``host`` (a name or an IPv4/IPv6 address) is a loopback address.

    ``0.0.0.0``, ``::`` and every other name or address are not: binding to them
    exposes the dashboard to the network.
    """
    host = host.strip().strip("[]").lower()
    if host in LOOPBACK_NAMES:
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


class DashboardConfig(BaseModel):
    """How the dashboard runs. Frozen; ``repr`` masks the token.

    Attributes:
        host: Address to bind; loopback unless told otherwise.
        port: TCP port.
        token: The access token (``QMLKIT_DASHBOARD_TOKEN``). When set, every request
            must present it: ``Authorization: Bearer <token>``, HTTP basic auth with the
            token as password (any user name), or the session cookie the login page
            sets. Required when ``host`` is not loopback, and then at least
            `MIN_TOKEN_LENGTH` (16) characters long.
        read_only: Hide every action and refuse them in the API (403).
        poll_interval_s: Seconds between the server-side looks at the storage that feed
            the WebSocket (0.05 to 10); state-change observers and wake-ups make a look
            happen sooner.
        dead_server_after_s: Seconds without a heartbeat after which a server shows as dead.
        page_size: Rows per page of the jobs list (1 to 500).
        throughput_minutes: Minutes the overview chart covers (1 to 1440).
        session_ttl_s: Seconds a login session (the cookie the login page sets) lives;
            default 12 hours. Logging out ends it sooner.
        wakeup_url: A kombu URL: the dashboard listens to wake-ups (enqueues, retries,
            promotions in any process) to refresh at once, and its own actions publish
            them. ``None``: the app's, else none (the poll alone).
    """

    model_config = ConfigDict(frozen=True, extra="forbid")

    host: str = "127.0.0.1"
    port: int = Field(8080, ge=0, le=65535)
    token: SecretStr | None = None
    read_only: bool = False
    poll_interval_s: float = Field(0.5, ge=0.05, le=10.0)
    dead_server_after_s: float = Field(60.0, gt=0)
    page_size: int = Field(50, ge=1, le=500)
    throughput_minutes: int = Field(60, ge=1, le=1440)
    session_ttl_s: float = Field(DEFAULT_SESSION_TTL_S, gt=0, le=366 * 86400)
    wakeup_url: str | None = None

    def check_bind(self) -> None:
        """Refuse a configuration that would expose the dashboard without auth (C15).

        Raises:
            ConfigurationError: ``host`` is not loopback and no token is set, or the
                token is shorter than `MIN_TOKEN_LENGTH` characters.
        """
        if is_loopback(self.host):
            return
        token = self.token_value
        if not token:
            raise ConfigurationError(
                f"the dashboard would listen on {self.host}, which is not loopback, with no "
                "authentication: set a token (--token or QMLKIT_DASHBOARD_TOKEN), or bind "
                "to 127.0.0.1")
        if len(token) < MIN_TOKEN_LENGTH:
            raise ConfigurationError(
                f"the dashboard would listen on {self.host}, which is not loopback, with a "
                f"token of {len(token)} characters: a token must have at least "
                f"{MIN_TOKEN_LENGTH} on a non-loopback address (e.g. python -c 'import "
                "secrets; print(secrets.token_urlsafe(24))'), or bind to 127.0.0.1")

    @property
    def token_value(self) -> str | None:
        """The token in clear, or ``None`` (an empty token counts as none)."""
        if self.token is None:
            return None
        return self.token.get_secret_value() or None
