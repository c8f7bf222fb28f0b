"""Small helpers shared by configuration code: URL masking and scheme parsing."""

from __future__ import annotations

from urllib.parse import urlsplit, urlunsplit


def url_scheme(url: str) -> str:
    """Return the scheme of ``url`` in lower case, e.g. ``"sqlite"`` for ``sqlite:///x.db``.

    Raises:
        ConfigurationError: ``url`` has no ``scheme://`` part.
    """
    from qmlkit.errors import ConfigurationError

    scheme, sep, _ = url.partition("://")
    if not sep or not scheme:
        raise ConfigurationError(
            f"storage URL {url!r} has no scheme; expected e.g. 'sqlite:///qmlkit.db' or 'memory://'"
        )
    return scheme.lower()


def mask_url(url: str) -> str:
    """Return ``url`` with any password replaced by ``***``, for logs and ``repr``."""
    try:
        parts = urlsplit(url)
    except ValueError:
        return url
    if parts.password is None:
        return url
    netloc = parts.netloc.replace(f":{parts.password}@", ":***@", 1)
    return urlunsplit(parts._replace(netloc=netloc))
