"""qmlkit-redis: a Redis storage backend for qmlkit (URL schemes ``redis``, ``rediss``, ``unix``).

Installed with ``pip install qmlkit-redis``; qmlkit finds it through the ``qmlkit.storage``
entry point, so ``App(..., storage="redis://127.0.0.1:6379/0")`` is all it takes. The
storage class is `qmlkit_redis.storage.RedisStorage`; its key layout is described in the
package README and in ``docs/backends/redis.md``.
"""

from __future__ import annotations

__all__ = ["SCHEMES", "__version__"]

__version__ = "0.1.0"

#: URL schemes this plugin answers (``unix`` is a Unix-domain socket path).
SCHEMES = ("redis", "rediss", "unix")
