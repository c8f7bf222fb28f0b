from __future__ import annotations

import random

import pytest

from qmlkit.backoff import Backoff


def test_backoff_doubles_from_initial_up_to_cap_and_resets():
    backoff = Backoff(0.1, 0.5)
    assert [backoff.next() for _ in range(5)] == [0.1, 0.2, 0.4, 0.5, 0.5]
    backoff.reset()
    assert backoff.delay_s == 0.0
    assert backoff.next() == 0.1


def test_backoff_jitter_stays_between_half_and_one_and_a_half_times():
    backoff = Backoff(1.0, 8.0, rng=random.Random(7))
    delay = backoff.next()
    waits = [backoff.jittered(delay) for _ in range(1000)]
    assert all(0.5 <= w < 1.5 for w in waits)
    assert max(waits) - min(waits) > 0.5  # spread, not one value


@pytest.mark.parametrize(("initial", "cap", "factor"), [(0, 1, 2), (2, 1, 2), (1, 2, 0.5),
                                                         (float("nan"), 1, 2)])
def test_backoff_rejects_bad_bounds(initial, cap, factor):
    with pytest.raises(ValueError, match="Backoff needs"):
        Backoff(initial, cap, factor=factor)
