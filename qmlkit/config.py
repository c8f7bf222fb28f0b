"""Small helpers shared by configuration code: URL masking, scheme parsing, the log format."""

from __future__ import annotations

import os
import re
import sys
from typing import TextIO
from urllib.parse import urlsplit

#: The log line format of the ``qmlkit`` command; a process-pool child puts its slot
#: (``child-N``) before the logger's name, and is otherwise the same.
LOG_FORMAT = "%(asctime)s %(levelname)s {where}%(name)s: %(message)s"


def log_stream() -> TextIO:
    """The stream the ``qmlkit`` command (and each process-pool child) logs to: standard
    error, through a line-buffered stream of its own on a copy of its descriptor, so a
    job that closes ``sys.stderr`` (or descriptor 2) does not silence the worker, nor
    make logging's error handler raise into every later attempt.

    Returns:
        That stream, or ``sys.stderr`` itself where it has no descriptor (e.g. under
        click's test runner).
    """
    stderr = sys.stderr
    try:
        fd = os.dup(stderr.fileno())
    except (AttributeError, OSError, ValueError):  # (io.UnsupportedOperation is both)
        return stderr
    return open(fd, "w", buffering=1, encoding=getattr(stderr, "encoding", None) or "utf-8",
                errors="backslashreplace")


def url_scheme(url: str) -> str:
    """Return the scheme of ``url`` in lower case, e.g. ``"sqlite"`` for ``sqlite:///x.db``.

    Raises:
        ConfigurationError: ``url`` has no ``scheme://`` part (a scheme without its
            ``//``, as ``sqlite:/x.db``, is named as such).
    """
    from qmlkit.errors import ConfigurationError

    scheme, sep, _ = url.partition("://")
    bare = re.match(r"([A-Za-z][A-Za-z0-9+.-]*):(?!//)", url)
    if not sep and bare:  # "sqlite:/x.db", "redis:host": a scheme without its "//"
        raise ConfigurationError(
            f"storage URL {url!r} lacks '//' after its scheme {bare[1]!r}: write "
            f"'{bare[1]}://…', e.g. 'sqlite:///qmlkit.db' (relative path) or "
            f"'sqlite:////var/lib/qmlkit.db' (absolute path)")
    if not sep or not scheme:
        raise ConfigurationError(
            f"storage URL {url!r} has no scheme; expected e.g. 'sqlite:///qmlkit.db' or 'memory://'"
        )
    return scheme.lower()


def mask_url(url: str) -> str:
    """Return ``url`` with any password replaced by ``***``, for logs and ``repr``.

    Masks the ``user:password@`` part and query parameters that carry secrets
    (``password``, ``passwd``, ``pwd``, ``token``, ``secret``, as redis-py and
    libpq accept); a URL that cannot be parsed has everything before its ``@`` masked.
    """
    try:
        parts = urlsplit(url)
        password = parts.password
    except ValueError:
        return re.sub(r"://[^/?#]*@", "://***@", url)
    if password is not None:
        netloc = parts.netloc.replace(f":{password}@", ":***@", 1)
        parts = parts._replace(netloc=netloc)
    if parts.query:
        query = re.sub(r"(?i)(^|&)(password|passwd|pwd|token|secret)=[^&]*", r"\1\2=***",
                       parts.query)
        parts = parts._replace(query=query)
    if password is None and not parts.query:
        return url
    # Rebuilt by hand: urlunsplit turns "unix:///path" into "unix:/path".
    return (f"{parts.scheme}://{parts.netloc}{parts.path}"
            + (f"?{parts.query}" if parts.query else "")
            + (f"#{parts.fragment}" if parts.fragment else ""))
