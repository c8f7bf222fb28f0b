"""RetryPolicy: exponential backoff with additive jitter, a cap, and retry decisions."""

from __future__ import annotations

import random
from datetime import timedelta

import pytest

from qmlkit.errors import PayloadError, UnknownJobName
from qmlkit.processing.retry import RetryPolicy


def test_backoff_grows_exponentially_without_jitter() -> None:
    policy = RetryPolicy(base_delay=timedelta(seconds=2), multiplier=3, jitter=0,
                         max_delay=timedelta(seconds=100))
    assert [policy.backoff(n).total_seconds() for n in range(1, 6)] == [2, 6, 18, 54, 100]


def test_backoff_jitter_only_adds_and_stays_under_cap() -> None:
    policy = RetryPolicy(base_delay=timedelta(seconds=10), multiplier=2, jitter=0.5,
                         max_delay=timedelta(minutes=5))
    rng = random.Random(7)
    for n in range(1, 12):
        computed = min(10 * 2 ** (n - 1), 300)
        for _ in range(50):
            delay = policy.backoff(n, rng).total_seconds()
            assert computed <= delay <= computed * 1.5


def test_backoff_never_overflows_on_huge_retry_numbers() -> None:
    policy = RetryPolicy(base_delay=timedelta(seconds=1), multiplier=10, jitter=0,
                         max_delay=timedelta(hours=1))
    assert policy.backoff(10**9) == timedelta(hours=1)
    assert policy.backoff(0) == timedelta(seconds=1)


def test_should_retry_respects_limits_and_exception_lists() -> None:
    policy = RetryPolicy(max_retries=2, retry_on=("ValueError", "OSError"))
    assert policy.should_retry(ValueError(), 0)
    assert policy.should_retry(FileNotFoundError(), 1)  # a subclass of OSError
    assert not policy.should_retry(ValueError(), 2)
    assert not policy.should_retry(KeyError(), 0)
    assert policy.should_retry(KeyError(), 0, max_retries=5) is False
    assert RetryPolicy(max_retries=2).should_retry(KeyError(), 1, max_retries=5)


def test_unknown_names_and_payload_errors_never_retry_by_default() -> None:
    policy = RetryPolicy(max_retries=10)
    assert not policy.should_retry(UnknownJobName("x", []), 0)
    assert not policy.should_retry(PayloadError("bad"), 0)


def test_policy_validates_its_fields() -> None:
    with pytest.raises(ValueError, match="must not be negative"):
        RetryPolicy(base_delay=timedelta(seconds=-1))
    with pytest.raises(ValueError):
        RetryPolicy(jitter=2)
