"""qmlkit hooks of the Redis storage plugin. Importing this module stays cheap.

The heavy imports (redis-py, the storage class) happen only when a Redis URL is resolved.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import TYPE_CHECKING, Any

from qmlkit import hookimpl
from qmlkit.config import url_scheme
from qmlkit_redis import SCHEMES

if TYPE_CHECKING:
    from qmlkit.storage.base import Storage


@hookimpl
def qmlkit_storage_schemes() -> Sequence[str]:
    """Return the schemes this plugin answers: ``redis``, ``rediss`` and ``unix``."""
    return SCHEMES


@hookimpl
def qmlkit_storage(url: str, options: Mapping[str, Any]) -> Storage | None:
    """Build an unopened `RedisStorage` for a ``redis://``, ``rediss://`` or ``unix://`` URL.

    Args:
        url: E.g. ``"redis://:secret@127.0.0.1:6379/0?prefix=myapp:"``; the ``prefix``
            query parameter is qmlkit's and is removed before the URL reaches redis-py.
        options: Storage options (see `RedisStorage`), e.g. ``{"prefix": "myapp:"}``.

    Returns:
        The storage, or ``None`` for any other scheme.

    Raises:
        ConfigurationError: An unknown option (named) or an unusable URL.
    """
    if url_scheme(url) not in SCHEMES:
        return None
    from qmlkit_redis.storage import RedisStorage

    return RedisStorage.from_url(url, options)
