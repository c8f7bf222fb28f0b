"""Helpers for tests of qmlkit itself, of applications and of plugins."""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any, TypeVar

from qmlkit.job import Enqueued, Job, utcnow

T = TypeVar("T")


def wait_until(
    predicate: Callable[[], T], timeout: float = 10.0, interval: float = 0.01, message: str = ""
) -> T:
    """Poll ``predicate`` until it returns something truthy; return that.

    Args:
        predicate: Called repeatedly.
        timeout: Seconds before giving up.
        interval: Seconds between calls.
        message: Added to the error.

    Returns:
        The first truthy value.

    Raises:
        TimeoutError: ``timeout`` passed first; the message includes the last value.
    """
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if value:
            return value
        if time.monotonic() >= deadline:
            raise TimeoutError(f"condition not met within {timeout} s: {message} (last: {value!r})")
        time.sleep(interval)


def wait_for_count(
    count: Callable[[], int], target: int, *, stall: float = 30.0, interval: float = 0.1,
    message: str = "",
) -> int:
    """Wait until ``count()`` reaches ``target``, for as long as it keeps moving.

    For drains whose length depends on the machine (a loaded machine works through
    2,000 jobs more slowly, but it works through them): the deadline is on a *stall*,
    not on the whole drain, so the test waits on progress rather than on a guessed time.

    Args:
        count: How many are done so far (e.g. jobs Succeeded); polled.
        target: The count to reach.
        stall: Seconds the count may stay unchanged before giving up.
        interval: Seconds between polls.
        message: Added to the error.

    Returns:
        The count reached (``>= target``).

    Raises:
        TimeoutError: ``count()`` stayed below ``target`` and unchanged for ``stall`` s;
            the message includes the last count.
    """
    last = count()
    moved = time.monotonic()
    while last < target:
        time.sleep(interval)
        now_count = count()
        if now_count != last:
            last, moved = now_count, time.monotonic()
        elif time.monotonic() - moved >= stall:
            raise TimeoutError(f"count stuck at {last} of {target} for {stall} s: {message}")
    return last


def make_job(method: str = "tests.noop", **fields: Any) -> Job:
    """Build an Enqueued job with sensible defaults; ``fields`` override them."""
    now = utcnow()
    queue = fields.get("queue", "default")
    fields.setdefault("state", Enqueued(enqueued_at=fields.pop("enqueued_at", now), queue=queue))
    return Job(method=method, **fields)


def require_service(name: str, host: str, port: int) -> None:
    """Skip the calling test unless ``host:port`` accepts a TCP connection.

    Under ``CI=true`` an unreachable service fails the test instead of skipping it, so a
    CI run never passes by skipping what it was meant to check.

    Args:
        name: The service's name, for the message (e.g. ``"Redis"``).
        host: Host to connect to (loopback in qmlkit's own tests).
        port: TCP port.

    Raises:
        pytest.skip.Exception / pytest.fail.Exception: Through ``pytest.skip`` or
            ``pytest.fail`` when the service is down.
    """
    try:
        with socket.create_connection((host, port), timeout=1.0):
            return
    except OSError as exc:
        skip_or_fail(f"{name} is not reachable on {host}:{port}: {exc}",
                     "a missing service fails the run")


def skip_or_fail(message: str, under_ci: str = "a missing prerequisite fails the run") -> None:
    """Skip the calling test with ``message``, or fail it under ``CI=true``.

    Locally a test whose service, binary or plugin is missing skips; in CI the same
    test fails, so a CI run never passes by skipping what it was meant to check.

    Args:
        message: What is missing and how to get it.
        under_ci: Appended in parentheses to the failure under ``CI=true``.

    Raises:
        pytest.skip.Exception / pytest.fail.Exception: Always, through ``pytest.skip``
            or ``pytest.fail``.
    """
    import pytest

    if os.environ.get("CI", "").lower() == "true":
        pytest.fail(f"{message} (CI=true: {under_ci})")
    pytest.skip(message)


def free_port() -> int:
    """Return a TCP port on 127.0.0.1 that was free a moment ago (for a test's own server)."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


class RedisProcess:
    """A ``redis-server`` of a test's own on a free loopback port, to stop and restart.

    Args:
        directory: Where Redis keeps its files (a temporary directory).
        appendonly: Keep an append-only file (``appendfsync always``) so data survives a
            restart, as a production Redis would; ``False`` for a broker-only Redis.
        extra_args: More ``redis-server`` arguments, e.g. ``["--requirepass", "s3cret"]``.

    Attributes:
        port: The TCP port, fixed across restarts.
        url: ``redis://127.0.0.1:<port>/0``.
    """

    def __init__(
        self, directory: Path, *, appendonly: bool = False, extra_args: Sequence[str] = ()
    ) -> None:
        self.port = free_port()
        self.url = f"redis://127.0.0.1:{self.port}/0"
        self.directory = directory
        self.appendonly = appendonly
        self.extra_args = list(extra_args)
        self.proc: subprocess.Popen[bytes] | None = None

    @staticmethod
    def available() -> bool:
        """Whether a ``redis-server`` binary is on ``PATH``."""
        return shutil.which("redis-server") is not None

    def start(self, timeout: float = 15.0) -> None:
        """Start the server and wait until it accepts connections.

        Raises:
            TimeoutError: It did not come up within ``timeout`` seconds.
        """
        args = ["redis-server", "--bind", "127.0.0.1", "--port", str(self.port), "--save", "",
                "--dir", str(self.directory)]
        if self.appendonly:
            args += ["--appendonly", "yes", "--appendfsync", "always"]
        else:
            args += ["--appendonly", "no"]
        args += self.extra_args
        self.proc = subprocess.Popen(args, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        wait_until(self.is_up, timeout=timeout, message=f"redis-server on port {self.port}")

    def is_up(self) -> bool:
        """Whether the port accepts a connection now."""
        try:
            socket.create_connection(("127.0.0.1", self.port), timeout=0.2).close()
            return True
        except OSError:
            return False

    def stop(self) -> None:
        """Stop the server (SIGTERM, as a service manager would) and wait for it to exit."""
        if self.proc is not None:
            self.proc.terminate()
            self.proc.wait(10)
            self.proc = None

    def restart(self) -> None:
        """Stop, then start again on the same port and directory."""
        self.stop()
        self.start()
