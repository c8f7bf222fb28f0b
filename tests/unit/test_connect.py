"""Opening the storage at start: retries while unreachable, nothing else (issue #17)."""

from __future__ import annotations

from datetime import timedelta

import pytest

from qmlkit.errors import ConfigurationError, StorageUnavailable
from qmlkit.processing.connect import open_storage


class Clock:
    def __init__(self) -> None:
        self.now = 0.0
        self.waits: list[float] = []

    def sleep(self, seconds: float) -> None:
        self.waits.append(seconds)
        self.now += seconds


def failing(times: int, error: Exception) -> tuple[list[int], object]:
    calls: list[int] = []

    def connect() -> None:
        calls.append(1)
        if len(calls) <= times:
            raise error
    return calls, connect


def test_unreachable_storage_is_retried_with_capped_backoff_until_it_connects() -> None:
    clock = Clock()
    calls, connect = failing(6, StorageUnavailable("down"))
    open_storage(connect, timeout=timedelta(seconds=60), what="s",
                 clock=lambda: clock.now, sleep=clock.sleep)
    assert len(calls) == 7
    assert all(0 < w <= 7.5 for w in clock.waits)  # cap 5 s, jitter up to 1.5x


def test_connect_timeout_zero_fails_at_once_and_names_the_storage() -> None:
    clock = Clock()
    calls, connect = failing(99, StorageUnavailable("down"))
    with pytest.raises(StorageUnavailable, match="redis://x.*connect_timeout"):
        open_storage(connect, timeout=timedelta(0), what="redis://x",
                     clock=lambda: clock.now, sleep=clock.sleep)
    assert len(calls) == 1 and clock.waits == []


def test_gives_up_when_connect_timeout_passes() -> None:
    clock = Clock()
    calls, connect = failing(999, StorageUnavailable("down"))
    with pytest.raises(StorageUnavailable):
        open_storage(connect, timeout=timedelta(seconds=10), what="s",
                     clock=lambda: clock.now, sleep=clock.sleep)
    assert clock.now == pytest.approx(10)


def test_a_configuration_error_is_not_retried() -> None:
    clock = Clock()
    calls, connect = failing(99, ConfigurationError("bad URL"))
    with pytest.raises(ConfigurationError):
        open_storage(connect, timeout=timedelta(seconds=60), what="s",
                     clock=lambda: clock.now, sleep=clock.sleep)
    assert len(calls) == 1
