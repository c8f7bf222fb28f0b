"""Fixtures for qmlkit-postgres's own tests: the shared ones from the repository's suite,
and a private PostgreSQL server for restart tests."""

from __future__ import annotations

import contextlib
import os
import shutil
import subprocess
import tempfile
from collections.abc import Iterator
from pathlib import Path

import pytest

from qmlkit.testing import free_port, skip_or_fail, wait_until
from tests.conftest import postgres_url, run_id  # noqa: F401  (fixtures, re-exported)

PG_BIN = Path("/usr/lib/postgresql")


class PostgresProcess:
    """A PostgreSQL server of a test's own (initdb in a temporary directory, run as the
    ``postgres`` user on a free loopback port), to stop and start mid-test.

    Attributes:
        port: Its TCP port, fixed across restarts.
        url: ``postgresql://postgres@127.0.0.1:<port>/postgres``.
    """

    def __init__(self) -> None:
        versions = sorted(PG_BIN.iterdir()) if PG_BIN.is_dir() else []
        self.bin = versions[-1] / "bin"
        self.dir = Path(tempfile.mkdtemp(prefix="qmlkit-pg-"))
        shutil.chown(self.dir, "postgres")
        self.port = free_port()
        self.url = f"postgresql://postgres@127.0.0.1:{self.port}/postgres"
        self._run("initdb", "-D", str(self.dir / "data"), "-A", "trust", "-U", "postgres")

    @staticmethod
    def available() -> bool:
        """initdb is installed, there is a postgres user, and we may act as it."""
        import pwd

        try:
            pwd.getpwnam("postgres")
        except KeyError:
            return False
        return PG_BIN.is_dir() and os.geteuid() == 0 and shutil.which("runuser") is not None

    def _run(self, tool: str, *args: str) -> None:
        subprocess.run(["runuser", "-u", "postgres", "--", str(self.bin / tool), *args],
                       check=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                       timeout=60)

    def start(self) -> None:
        """Start and wait until it accepts connections."""
        self._run("pg_ctl", "-D", str(self.dir / "data"), "-l", str(self.dir / "log"), "-w",
                  "-o", f"-p {self.port} -k {self.dir} -c listen_addresses=127.0.0.1", "start")
        wait_until(self._accepts, timeout=30)

    def _accepts(self) -> bool:
        import socket

        try:
            socket.create_connection(("127.0.0.1", self.port), timeout=0.2).close()
            return True
        except OSError:
            return False

    def stop(self) -> None:
        """Stop it (fast shutdown: open sessions are terminated, as in a restart)."""
        self._run("pg_ctl", "-D", str(self.dir / "data"), "-m", "fast", "-w", "stop")

    def destroy(self) -> None:
        """Stop if running and remove its files."""
        try:
            self.stop()
        except subprocess.CalledProcessError:
            pass
        shutil.rmtree(self.dir, ignore_errors=True)


@pytest.fixture
def own_postgres() -> Iterator[PostgresProcess]:
    """A private PostgreSQL server, for restarts (skips where one cannot be made; fails
    under CI=true)."""
    if not PostgresProcess.available():
        skip_or_fail("cannot start a private PostgreSQL here (initdb, root and runuser needed)")
    server = PostgresProcess()
    server.start()
    yield server
    server.destroy()


class CuttableProxy:
    """A TCP proxy on a free loopback port to PostgreSQL that can drop every connection.

    ``cut()`` shuts down the client side of every proxied connection at once and the
    server side ``server_delay`` seconds later, as a network failure would: the client
    sees its connection fail while the server may still be running (and committing) a
    statement.

    A socket is closed only by the last of its pair's two pump threads, once both have
    ended; ``cut()`` only shuts sockets down. (Closing a socket another thread is about
    to ``recv`` on frees its descriptor number; the next accepted connection gets that
    number, and the old thread's ``recv`` then steals its bytes: the retried
    connection's query never reached the server, and its client waited forever.)
    """

    def __init__(self, target_port: int = 5432, server_delay: float = 0.2) -> None:
        import socket
        import threading

        self.target_port = target_port
        self.server_delay = server_delay
        self._listener = socket.create_server(("127.0.0.1", 0))
        self.port = self._listener.getsockname()[1]
        self._pairs: list[tuple[socket.socket, socket.socket]] = []
        self._lock = threading.Lock()
        self._closed = False
        threading.Thread(target=self._accept, daemon=True).start()

    def _accept(self) -> None:
        import threading

        while not self._closed:
            try:
                client, _ = self._listener.accept()
            except OSError:
                return
            # connect to the server on a thread of its own: one slow connect (a busy
            # server's full backlog) must not hold up the next accept
            threading.Thread(target=self._connect, args=(client,), daemon=True).start()

    def _connect(self, client: object) -> None:
        import socket
        import threading

        try:
            server = socket.create_connection(("127.0.0.1", self.target_port), timeout=30)
            server.settimeout(None)
        except OSError:
            client.close()  # type: ignore[attr-defined]
            return
        with self._lock:
            self._pairs.append((client, server))  # type: ignore[arg-type]
        pumps = [2]  # pumps of this pair still running, under self._lock
        for a, b in ((client, server), (server, client)):
            threading.Thread(target=self._pump, args=(a, b, pumps), daemon=True).start()

    def _pump(self, source: object, sink: object, pumps: list[int]) -> None:
        import socket

        try:
            while data := source.recv(65536):  # type: ignore[attr-defined]
                sink.sendall(data)  # type: ignore[attr-defined]
        except OSError:
            pass
        with contextlib.suppress(OSError):  # pass the end on, so the other pump ends too
            sink.shutdown(socket.SHUT_WR)  # type: ignore[attr-defined]
        with self._lock:
            pumps[0] -= 1
            last = pumps[0] == 0
        if last:  # no thread uses either socket now: their numbers may be reused
            source.close()  # type: ignore[attr-defined]
            sink.close()  # type: ignore[attr-defined]

    def cut(self) -> int:
        """Drop every proxied connection; return how many."""
        import socket
        import threading

        with self._lock:
            pairs, self._pairs = self._pairs, []
        for client, _ in pairs:
            with contextlib.suppress(OSError):
                client.shutdown(socket.SHUT_RDWR)

        def shut_servers() -> None:
            for _, server in pairs:
                with contextlib.suppress(OSError):
                    server.shutdown(socket.SHUT_RDWR)

        threading.Timer(self.server_delay, shut_servers).start()
        return len(pairs)

    def close(self) -> None:
        """Stop accepting and drop what is open."""
        self._closed = True
        self._listener.close()
        self.cut()


@pytest.fixture
def proxy() -> Iterator[CuttableProxy]:
    """A cuttable TCP proxy to the shared PostgreSQL."""
    p = CuttableProxy()
    yield p
    p.close()
