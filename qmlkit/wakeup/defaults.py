"""Wake-ups on by default: what ``wakeup_url="auto"`` becomes for a given storage.

An app or server whose ``wakeup_url`` is left at `AUTO` asks its storage for a channel
(`qmlkit.storage.capabilities.WakeupProvider`): SQLite offers a ``filesystem://`` folder
beside its file, qmlkit-redis its own Redis, qmlkit-postgres ``LISTEN/NOTIFY`` on its own
database. The exchange is then the app's ``wakeup_exchange`` followed by the storage's
scope (``qmlkit.wakeup.<prefix>`` on Redis, ``qmlkit.wakeup.<schema>`` on PostgreSQL), so
apps sharing one Redis or one database do not wake each other. An explicit URL wins,
with the exchange as given; ``None`` turns wake-ups off. A storage that offers nothing
(memory, a third-party backend), or whose channel cannot be used here (a folder that
cannot be created, a transport not installed), leaves the servers polling, with one
warning in the second case.
"""

from __future__ import annotations

import logging
from collections.abc import Callable

from qmlkit.config import mask_url
from qmlkit.errors import ConfigurationError
from qmlkit.storage.capabilities import PushListener, default_wakeup, push_listener
from qmlkit.wakeup.listener import WakeupListener
from qmlkit.wakeup.publisher import WakeupPublisher
from qmlkit.wakeup.transports import connection_for

__all__ = ["AUTO", "OFF", "PushListener", "open_channel", "push_listener", "resolve_wakeup",
           "wakeup_setting"]

log = logging.getLogger("qmlkit.wakeup")

#: ``wakeup_url`` default: the storage's own channel, if it offers one.
AUTO = "auto"
#: Spellings of "no wake-ups" on the command line and in ``QMLKIT_WAKEUP_URL``.
OFF = ("none", "off")


def wakeup_setting(text: str) -> str | None:
    """A ``--wakeup`` / ``QMLKIT_WAKEUP_URL`` value as a ``wakeup_url`` setting.

    Returns:
        ``None`` for ``none`` or ``off`` (any case): wake-ups off; `AUTO` for
        ``auto``; anything else unchanged (a URL, checked where it is used).
    """
    word = text.strip().lower()
    if word in OFF:
        return None
    return AUTO if word == AUTO else text


def resolve_wakeup(setting: str | None, exchange: str, storage: object) -> tuple[str | None, str]:
    """The wake-up URL and exchange to use for ``setting`` with ``storage``.

    Args:
        setting: ``None`` (off), `AUTO` (the storage's own channel) or a kombu URL.
        exchange: The configured exchange name.
        storage: The storage (unopened is fine: nothing is read from it).

    Returns:
        ``(url, exchange)``: ``(None, exchange)`` when off or when the storage offers
        no usable channel; the storage's URL and ``exchange.<scope>`` for `AUTO`; the
        explicit URL and ``exchange`` otherwise.

    Raises:
        ConfigurationError: An explicit URL is unusable (see `connection_for`). A
            storage's own channel that is unusable is logged and dropped instead.
    """
    if setting is None:
        return None, exchange
    if setting != AUTO:
        connection_for(setting)  # a bad explicit URL fails here, naming it
        return setting, exchange
    offer = default_wakeup(storage)
    if offer is None:
        return None, exchange
    try:
        connection_for(offer.url)
    except ConfigurationError as exc:
        log.warning("%r offers wake-ups on %s, which cannot be used here (%s); workers poll "
                    "instead (set wakeup_url to choose a channel, or None to silence this)",
                    storage, mask_url(offer.url), exc)
        return None, exchange
    return offer.url, (f"{exchange}.{offer.scope}" if offer.scope else exchange)


def open_channel(url: str, exchange: str, on_wakeup: Callable[[str | None], None],
                 name: str) -> tuple[WakeupPublisher | None, WakeupListener | None]:
    """A server's publisher and started listener on ``url`` (checked when the server
    was configured).

    A channel that became unusable since (its folder removed and unmakeable, say) is
    logged and left out: the server then polls, and never fails to start for a hint.

    Returns:
        ``(publisher, listener)``, or ``(None, None)``.
    """
    try:
        publisher = WakeupPublisher(url, exchange)
        listener = WakeupListener(url, on_wakeup, exchange, name=name)
    except ConfigurationError as exc:
        log.warning("wake-ups off for this server (%s); its workers poll", exc)
        return None, None
    listener.start()
    return publisher, listener
