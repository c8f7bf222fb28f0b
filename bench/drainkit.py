"""What the drain benchmarks share: waiting on a worker's Redis stamps, and stopping it.

The benchmarks start a worker with its system's own CLI and count its jobs in Redis
(``<key>:done``, ``<key>:first``, ``<key>:last``: each job's start, as the shared
harness's job stamps it). Imported as ``drainkit`` by the scripts of this folder (run as
``python bench/X.py``, so the folder is on ``sys.path``).
"""

from __future__ import annotations

import signal
import subprocess
import time

import redis


def wait_for_done(client: redis.Redis, key: str, jobs: int, proc: subprocess.Popen[bytes],
                  what: str, *, timeout_s: float = 600.0, poll_s: float = 0.05) -> None:
    """Wait until ``<key>:done`` reaches ``jobs``.

    Args:
        client: The Redis the jobs stamp.
        key: The stamps' key prefix.
        jobs: How many jobs to wait for.
        proc: The worker; its exit before then is a failure.
        what: Names the drain in the error.
        timeout_s: Longest wait, seconds.
        poll_s: Seconds between two reads of the count.

    Raises:
        RuntimeError: The worker exited, or ``timeout_s`` passed first.
    """
    deadline = time.monotonic() + timeout_s
    while int(client.get(f"{key}:done") or 0) < jobs:
        if time.monotonic() > deadline or proc.poll() is not None:
            raise RuntimeError(f"{what}: the drain did not finish")
        time.sleep(poll_s)


def rate(client: redis.Redis, key: str) -> float:
    """Jobs per second between the first and the last stamped start: (done - 1) / span."""
    first = float(client.get(f"{key}:first"))
    last = float(client.get(f"{key}:last"))
    return (int(client.get(f"{key}:done") or 0) - 1) / (last - first)


def stop_worker(proc: subprocess.Popen[bytes], wait_s: float = 60.0) -> None:
    """SIGTERM the worker (it drains), and kill it if it has not exited in ``wait_s``
    seconds: it is only a benchmark."""
    proc.send_signal(signal.SIGTERM)
    try:
        proc.wait(wait_s)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()
