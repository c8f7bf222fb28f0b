"""One capped exponential backoff with jitter, for every retry loop in qmlkit.

The worker loop's claim retries, the wake-up publisher and listener, and each storage's
reconnect loop all wait the same way: the first delay is ``initial_s``, each further
failure multiplies it by ``factor`` up to ``cap_s``, a success resets it, and every
actual wait is jittered to between half and one and a half times the delay ("equal
jitter"), so many clients that lost the same service do not come back in step (field
case C08). Job retries are a separate policy: ``qmlkit.processing.retry.RetryPolicy``.
"""

from __future__ import annotations

import random

__all__ = ["Backoff"]


class Backoff:
    """The delay state of one retry loop; not thread-safe (one per loop).

    Args:
        initial_s: The first delay, in seconds (> 0).
        cap_s: The largest delay, in seconds (>= ``initial_s``).
        factor: How much each failure multiplies the delay by (>= 1).
        rng: The source of jitter; default a fresh ``random.Random``.

    Raises:
        ValueError: A bound is out of range.
    """

    __slots__ = ("_delay", "_rng", "cap_s", "factor", "initial_s")

    def __init__(self, initial_s: float, cap_s: float, *, factor: float = 2.0,
                 rng: random.Random | None = None) -> None:
        if not initial_s > 0 or not cap_s >= initial_s or not factor >= 1:
            raise ValueError(f"Backoff needs 0 < initial_s <= cap_s and factor >= 1, got "
                             f"initial_s={initial_s!r}, cap_s={cap_s!r}, factor={factor!r}")
        self.initial_s = initial_s
        self.cap_s = cap_s
        self.factor = factor
        self._rng = rng or random.Random()  # jitter, not cryptography
        self._delay = 0.0

    @property
    def delay_s(self) -> float:
        """The current (unjittered) delay in seconds; 0.0 after a reset."""
        return self._delay

    def next(self) -> float:
        """Record one more failure and return the new unjittered delay, in seconds.

        Returns:
            ``initial_s`` after a reset, then ``factor`` times the last delay, at most
            ``cap_s``: the figure to log. Wait ``jittered(delay)``.
        """
        self._delay = min(self.cap_s, max(self._delay * self.factor, self.initial_s))
        return self._delay

    def jittered(self, delay_s: float | None = None) -> float:
        """``delay_s`` (default the current delay) times a uniform factor in [0.5, 1.5)."""
        base = self._delay if delay_s is None else delay_s
        return base * (0.5 + self._rng.random())

    def reset(self) -> None:
        """Record a success: the next failure waits ``initial_s`` again."""
        self._delay = 0.0
