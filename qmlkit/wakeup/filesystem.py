"""The ``filesystem://`` wake-up transport: kombu's filesystem transport, made safe and
quick for several processes sharing one folder (the embedded SQLite default).

kombu keeps a binding table per exchange in ``control/<exchange>.exchange`` and writes
each fanout message once per bound queue into ``data/``. Changes here, each because
kombu 5.7's own behaviour breaks one of qmlkit's guarantees:

* a message file is written under a name listeners skip (``….msg.tmp``) and renamed into
  place (kombu writes it under its final name, so a listener could read it half-written);
* a binding is added under the table's lock even when the table does not exist yet
  (kombu's check-then-create can lose one of two listeners starting together);
* a listener takes a message by renaming it into ``taken/`` beside ``data/`` and deletes
  it once read (kombu moves it to the temporary directory, a copy across filesystems);
* on Linux a listener waits on inotify for files moved into ``data/`` instead of listing
  the folder every 2 ms, so an idle listener costs no CPU and hears a message at once
  (elsewhere, and if inotify is unavailable, it lists every ``POLL_INTERVAL_S``).

Nothing deletes a crashed listener's queue, so `prune_filesystem` removes messages
older than ``STALE_S`` and the bindings of the queues they were for; listeners run it
when they start and every ``UPKEEP_S`` while they consume (`upkeep`), and put their own
binding back if it was pruned (a listener frozen for over a minute).
"""

from __future__ import annotations

import ctypes
import functools
import json
import logging
import os
import select
import time
import uuid
import weakref
from collections.abc import Callable
from pathlib import Path
from queue import Empty
from typing import Any
from urllib.parse import unquote, urlsplit

from qmlkit.errors import ConfigurationError

__all__ = ["POLL_INTERVAL_S", "STALE_S", "UPKEEP_S", "FolderWatch", "drain_watching",
           "filesystem_options", "filesystem_transport", "keep_binding", "make_folders",
           "prune_filesystem", "put_message", "take_message", "update_table", "upkeep",
           "watch_folder"]

log = logging.getLogger("qmlkit.wakeup")

#: Wake-up files older than this, in seconds, are useless (a poll has found their jobs).
STALE_S = 60.0
#: Between two prunes of a consuming listener, in seconds.
UPKEEP_S = 30.0
#: How often a listener lists the folder where inotify is unavailable, in seconds.
POLL_INTERVAL_S = 0.002

_IN_CLOSE_WRITE = 0x08
_IN_MOVED_TO = 0x80


@functools.cache
def _libc() -> Any:
    """The C library if it has inotify (Linux), else ``None``."""
    try:
        libc = ctypes.CDLL(None, use_errno=True)
    except OSError:
        return None
    return libc if hasattr(libc, "inotify_init1") else None


class FolderWatch:
    """Linux inotify on one folder: `wait` returns once a file was moved into it, or
    closed after writing (kombu's own publishers), or after the timeout.

    Raises:
        OSError: inotify is unavailable (not Linux, or out of watches); the caller then
            lists the folder on a timer instead.
    """

    def __init__(self, folder: str) -> None:
        libc = _libc()
        if libc is None:
            raise OSError("inotify is not available here")
        fd = libc.inotify_init1(os.O_NONBLOCK | os.O_CLOEXEC)
        if fd < 0:
            raise OSError(ctypes.get_errno(), "inotify_init1 failed")
        if libc.inotify_add_watch(fd, os.fsencode(folder), _IN_MOVED_TO | _IN_CLOSE_WRITE) < 0:
            err = ctypes.get_errno()
            os.close(fd)
            raise OSError(err, f"cannot watch {folder}")
        self.fd = fd
        self._poll = select.poll()
        self._poll.register(fd, select.POLLIN)
        self._close = weakref.finalize(self, os.close, fd)

    def wait(self, timeout_s: float) -> None:
        """Wait up to ``timeout_s`` seconds for a change, then consume the events."""
        if self._poll.poll(max(0.0, timeout_s) * 1000.0):
            try:
                while os.read(self.fd, 65536):
                    pass
            except BlockingIOError:
                pass

    def close(self) -> None:
        """Close the inotify descriptor (idempotent)."""
        self._close()


def update_table(table: Path, change: Callable[[list[list[str]]], list[list[str]]]) -> None:
    """Rewrite an exchange's binding table under its lock (as kombu locks it).

    Args:
        table: ``control/<exchange>.exchange``, created if missing.
        change: Old rows (``[routing_key, pattern, queue]`` lists) -> new rows; the
            file is rewritten only if they differ.

    Raises:
        OSError: The file cannot be opened or written.
    """
    import fcntl  # POSIX only, as kombu's filesystem transport is outside Windows

    fd = os.open(table, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        raw = b""
        while chunk := os.read(fd, 65536):
            raw += chunk
        try:
            rows = [list(r) for r in json.loads(raw or b"[]") if isinstance(r, list)]
        except ValueError:
            rows = []  # a table torn by a crash: the listeners put themselves back
        new = change(rows)
        if new != rows or not raw:
            text = json.dumps(new).encode()
            os.lseek(fd, 0, os.SEEK_SET)
            os.write(fd, text)
            os.ftruncate(fd, len(text))
    finally:
        os.close(fd)  # releases the lock


def keep_binding(control: Path, exchange: str, queue: str) -> None:
    """Put ``queue``'s fanout binding back into ``exchange``'s table if it is missing."""
    update_table(control / f"{exchange}.exchange",
                 lambda rows: rows if any(r[-1:] == [queue] for r in rows)
                 else [["", "", queue], *rows])


def prune_filesystem(data: Path, control: Path) -> int:
    """Remove what crashed listeners left in a filesystem wake-up folder.

    Messages (and half-written or half-taken files) older than ``STALE_S`` are deleted,
    and the bindings of the queues that had such stale messages (no one consumes them)
    are dropped, under each table's lock.

    Returns:
        How many stale files were removed.
    """
    cutoff = time.time() - STALE_S
    dead: set[str] = set()
    removed = 0
    taken = data.parent / "taken"
    for path in [*data.glob("*.msg"), *data.glob("*.msg.tmp"), *taken.glob("*.msg")]:
        try:
            if path.stat().st_mtime < cutoff:
                if path.suffix == ".msg" and path.parent == data:
                    dead.add(path.name.partition(".")[2].removesuffix(".msg"))
                path.unlink()
                removed += 1
        except OSError:
            continue  # consumed meanwhile
    if dead:
        for table in control.glob("*.exchange"):
            try:
                update_table(table, lambda rows: [r for r in rows
                                                  if not (r and r[-1] in dead)])
            except OSError:
                continue
    if removed:
        log.info("removed %d stale wake-up file(s) from %s", removed, data)
    return removed


def upkeep(options: dict[str, Any], exchange: str, queue: str) -> None:
    """A listener's periodic care of its folder: prune, then keep its own binding.

    Args:
        options: The connection's transport options (`filesystem_options`).
        exchange: The listener's exchange name.
        queue: The listener's queue name.
    """
    try:
        prune_filesystem(Path(options["data_folder_in"]), Path(options["control_folder"]))
        keep_binding(Path(options["control_folder"]), exchange, queue)
    except OSError as exc:  # a hint channel: never worth a crash
        log.warning("could not tidy the wake-up folder %s: %s", options["data_folder_in"], exc)


def put_message(data: str, queue: str, payload: bytes) -> None:
    """Write one message of ``queue`` into ``data``: under a name listeners skip, then
    renamed into place (atomic on POSIX), named so that listing sorts oldest first.

    Raises:
        OSError: The file cannot be written.
    """
    final = os.path.join(data, f"{round(time.monotonic() * 1000)}_{uuid.uuid4()}.{queue}.msg")
    with open(final + ".tmp", "wb") as f:
        f.write(payload)
    os.replace(final + ".tmp", final)


def take_message(data: str, taken: str, queue: str) -> bytes | None:
    """Take the oldest message file of ``queue`` from ``data``: rename it into ``taken``
    (the rename is the claim, so one consumer gets each message), read it, delete it.

    Returns:
        The file's bytes, or ``None`` if ``queue`` has no message.

    Raises:
        OSError: A taken file cannot be read.
    """
    wanted = f"{queue}.msg"
    for name in sorted(os.listdir(data)):
        if name.partition(".")[2] != wanted:
            continue
        path = os.path.join(taken, name)
        try:
            os.rename(os.path.join(data, name), path)
        except OSError:
            continue  # taken by another consumer of the queue, or pruned
        with open(path, "rb") as f:
            payload = f.read()
        os.unlink(path)
        return payload
    return None


def watch_folder(folder: str) -> FolderWatch | None:
    """A `FolderWatch` on ``folder``, or ``None`` where inotify is unavailable (logged at
    debug level: the folder is then listed on a timer)."""
    try:
        return FolderWatch(folder)
    except OSError as exc:
        log.debug("wake-up folder %s is listed on a timer (%s)", folder, exc)
        return None


def drain_watching(transport: Any, watch: FolderWatch, timeout: float | None) -> None:
    """kombu's ``drain_events`` for a folder watched by inotify: deliver one message, or
    wait for the folder to change instead of sleeping between listings.

    Raises:
        TimeoutError: Nothing arrived within ``timeout`` seconds.
    """
    deadline = None if timeout is None else time.monotonic() + timeout
    while True:
        try:
            transport.cycle.get(transport._deliver, timeout=timeout)
            return
        except Empty:
            pass
        remaining = 1.0 if deadline is None else deadline - time.monotonic()
        if remaining <= 0:
            raise TimeoutError()
        watch.wait(min(remaining, 1.0))  # listed again at least every second


@functools.cache
def filesystem_transport() -> type:
    """kombu's filesystem transport with the changes in this module's docstring."""
    from kombu.exceptions import ChannelError
    from kombu.transport import filesystem as kombu_fs
    from kombu.utils.encoding import str_to_bytes
    from kombu.utils.json import dumps, loads

    class Channel(kombu_fs.Channel):
        # As kombu's filesystem Channel, which already renames its base's ``message``
        # (kombu passes both positionally): no signature can match both.
        def _put(self, queue: str, payload: Any, **kwargs: Any) -> None:  # type: ignore[override]
            try:
                put_message(self.data_folder_out, queue, str_to_bytes(dumps(payload)))
            except OSError as exc:
                raise ChannelError(f"Cannot add a message of {queue!r}: {exc}") from exc

        def _get(self, queue: str, timeout: float | None = None) -> Any:
            try:
                payload = take_message(self.data_folder_in, self.processed_folder, queue)
            except OSError as exc:
                raise ChannelError(f"Cannot read a message of {queue!r}: {exc}") from exc
            if payload is None:
                raise Empty()
            return loads(payload)

        def _queue_bind(self, exchange: str, routing_key: str, pattern: str,
                        queue: str) -> None:
            row = [routing_key or "", pattern or "", queue or ""]
            try:
                update_table(self._exchange_file(exchange),  # type: ignore[no-untyped-call]
                             lambda rows: rows if row in rows else [row, *rows])
            except OSError as exc:
                raise ChannelError(f"Cannot bind {queue!r} to {exchange!r}") from exc

    class Transport(kombu_fs.Transport):
        _watch: FolderWatch | None = None
        _watch_failed = False

        def drain_events(self, connection: Any, timeout: Any = None, **kwargs: Any) -> None:
            if self._watch is None and not self._watch_failed:  # before the first listing
                self._watch = watch_folder(self.client.transport_options  # type: ignore[union-attr]
                                           .get("data_folder_in", "data_in"))
                self._watch_failed = self._watch is None
            if self._watch is None:
                super().drain_events(connection, timeout=timeout)  # type: ignore[no-untyped-call]
            else:
                drain_watching(self, self._watch, timeout)

        def establish_connection(self) -> Any:
            make_folders(self.client.transport_options)  # type: ignore[union-attr]
            return super().establish_connection()  # type: ignore[no-untyped-call]

        def close_connection(self, connection: Any) -> None:
            if self._watch is not None:
                self._watch.close()
                self._watch = None
            super().close_connection(connection)  # type: ignore[no-untyped-call]

    Transport.Channel = Channel
    return Transport


def make_folders(options: dict[str, Any]) -> None:
    """Create the folders of ``options`` (`filesystem_options`) that are missing: on
    every (re)connection, so a folder removed under a running server comes back.

    Raises:
        OSError: A folder cannot be created (the connection attempt fails, to be tried
            again with backoff; servers poll meanwhile).
    """
    for key in ("data_folder_in", "data_folder_out", "processed_folder", "control_folder"):
        if key in options:
            os.makedirs(options[key], exist_ok=True)


def filesystem_options(url: str, shown: str) -> dict[str, Any]:
    """kombu transport options for a ``filesystem://`` URL, creating its folders.

    The path is percent-decoded (``%20`` is a space). Messages are written to and read
    from ``<folder>/data``, taken into ``<folder>/taken``, and bindings kept in
    ``<folder>/control``.

    Raises:
        ConfigurationError: The folder is not an absolute path, or cannot be created.
    """
    parts = urlsplit(url)
    if parts.netloc or parts.path == "/":
        raise ConfigurationError(
            f"wake-up URL {shown}: give the folder as an absolute path after three "
            "slashes, e.g. 'filesystem:///var/run/myapp/wakeups' (or 'filesystem://' "
            "for ./qmlkit-wakeup)")
    folder = Path(unquote(parts.path) or "qmlkit-wakeup").expanduser()
    data = str(folder / "data")
    options = {"data_folder_in": data, "data_folder_out": data,
               "processed_folder": str(folder / "taken"),
               "control_folder": str(folder / "control"), "polling_interval": POLL_INTERVAL_S}
    try:
        make_folders(options)
    except OSError as exc:
        raise ConfigurationError(f"wake-up URL {shown}: cannot use folder {folder}: "
                                 f"{exc}") from exc
    return options
