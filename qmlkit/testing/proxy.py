"""A TCP proxy of a test's own, to make a connection half-open on command.

A broker that goes silent without closing its connections (a NAT that forgot the flow,
a failed-over host, a partition) cannot be made by stopping the broker: a stopped
process's kernel resets its sockets. `TcpProxy` sits between a client and a real
service on loopback and, on `TcpProxy.pause`, stops forwarding in both directions while
keeping every socket open: the client's writes are accepted and go nowhere, and nothing
comes back.
"""

from __future__ import annotations

import contextlib
import select
import socket
import threading
from collections.abc import Callable

__all__ = ["TcpProxy"]


class TcpProxy:
    """Forwards connections made to ``127.0.0.1:port`` to ``target_host:target_port``.

    Each accepted connection gets its own upstream connection and one thread per
    direction; all threads are daemons and wake every ``tick_s`` seconds, so `close`
    returns within about that time.

    Args:
        target_host: The real service's host (loopback in tests).
        target_port: The real service's TCP port.
        tick_s: How often, in seconds, the threads look at the pause and close flags.

    Attributes:
        port: The proxy's own TCP port on 127.0.0.1 (bound in the constructor).
        accepted: How many client connections were accepted so far.
    """

    def __init__(self, target_host: str, target_port: int, *, tick_s: float = 0.05) -> None:
        self.target = (target_host, target_port)
        self.tick_s = tick_s
        self._listener = socket.create_server(("127.0.0.1", 0))
        self._listener.settimeout(tick_s)
        self.port = int(self._listener.getsockname()[1])
        self.accepted = 0
        self._forwarding = threading.Event()
        self._forwarding.set()
        self._closed = threading.Event()
        self._lock = threading.Lock()
        self._sockets: list[socket.socket] = []
        self._threads: list[threading.Thread] = []
        self._start(self._accept, "accept")

    def __enter__(self) -> TcpProxy:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def pause(self) -> None:
        """Stop forwarding, both ways, on every connection (new ones too); close nothing."""
        self._forwarding.clear()

    def resume(self) -> None:
        """Forward again, starting with whatever the sockets buffered meanwhile."""
        self._forwarding.set()

    def drop_connections(self) -> None:
        """Close every current connection, discarding what it buffered (a failed-over
        host: the old connections are gone); the proxy accepts new ones."""
        with self._lock:
            sockets, self._sockets = self._sockets, []
        for sock in sockets:  # shut down, not closed: their pumps close them (see _pump)
            with contextlib.suppress(OSError):
                sock.shutdown(socket.SHUT_RDWR)

    @property
    def paused(self) -> bool:
        """Whether forwarding is stopped."""
        return not self._forwarding.is_set()

    def close(self, timeout: float = 2.0) -> None:
        """Close the listening socket and every connection; join the threads.

        Args:
            timeout: Longest wait for each thread, in seconds.
        """
        self._closed.set()
        self._forwarding.set()
        with self._lock:
            sockets, self._sockets = self._sockets, []
            threads = list(self._threads)
        with contextlib.suppress(OSError):
            self._listener.close()
        for sock in sockets:
            with contextlib.suppress(OSError):
                sock.shutdown(socket.SHUT_RDWR)
        for thread in threads:
            if thread is not threading.current_thread():
                thread.join(timeout)

    def _start(self, target: Callable[..., object], name: str, *args: object) -> None:
        thread = threading.Thread(target=target, args=args, name=f"tcp-proxy-{name}",
                                  daemon=True)
        with self._lock:
            self._threads.append(thread)
        thread.start()

    def _accept(self) -> None:
        while not self._closed.is_set():
            try:
                client, _ = self._listener.accept()
            except TimeoutError:
                continue
            except OSError:
                return  # closed
            try:
                upstream = socket.create_connection(self.target, timeout=2.0)
            except OSError:
                client.close()
                continue
            self.accepted += 1
            with self._lock:
                if self._closed.is_set():
                    client.close()
                    upstream.close()
                    return
                self._sockets += [client, upstream]
            pumps = [2]  # of this pair, still running; under self._lock
            self._start(self._pump, "up", client, upstream, pumps)
            self._start(self._pump, "down", upstream, client, pumps)

    def _pump(self, source: socket.socket, sink: socket.socket, pumps: list[int]) -> None:
        """Forward ``source`` to ``sink`` until either ends. Sockets are shut down (which
        wakes the other pump) but closed only by the pair's last pump: closing a socket
        another thread is about to read frees its number for the next accepted
        connection, whose bytes that thread would then steal."""
        try:
            while not self._closed.is_set():
                if not self._forwarding.wait(self.tick_s):
                    continue  # paused: leave the bytes in the kernel's buffers
                readable, _, _ = select.select([source], [], [], self.tick_s)
                if not readable or not self._forwarding.is_set():
                    continue
                data = source.recv(65536)
                if not data:
                    break
                sink.sendall(data)
        except (OSError, ValueError):
            pass  # one side closed or reset: end the pair
        for sock in (source, sink):
            with contextlib.suppress(OSError):
                sock.shutdown(socket.SHUT_RDWR)
        with self._lock:
            pumps[0] -= 1
            last = pumps[0] == 0
        if last:
            source.close()
            sink.close()
