"""``RetryPolicy``: exponential backoff with jitter and a cap (as Hangfire and qml-rs retry).

The delay before retry *n* (1 for the first retry) is ``base_delay * multiplier**(n-1)``,
capped at ``max_delay``, then spread by ``jitter``: drawn uniformly from
``[d, d * (1 + jitter)]``. Jitter only ever *adds*, so a retry never comes sooner than the
policy's computed delay, and never later than ``max_delay * (1 + jitter)``; many jobs
that fail together are spread over a window instead of retrying in lock-step (field case
C08). Exponents are capped before they are computed, so no count overflows.
"""

from __future__ import annotations

import math
import random
from datetime import timedelta

from pydantic import BaseModel, ConfigDict, Field, field_validator

from qmlkit.errors import MiddlewareError, PayloadError, Retry, UnknownJobName


def qualname(exc_type: type[BaseException]) -> str:
    """The name an exception type is stored and matched by: ``"ValueError"`` for a
    built-in, else ``"module.QualName"`` (e.g. ``"qmlkit.errors.PayloadError"``)."""
    module = exc_type.__module__
    return exc_type.__qualname__ if module == "builtins" else f"{module}.{exc_type.__qualname__}"


_qualname = qualname  # the name this helper had before it was public


class RetryPolicy(BaseModel):
    """When and how soon a failed attempt is tried again.

    Attributes:
        max_retries: Retries after the first attempt; 0 means fail at once.
        base_delay: Delay before the first retry.
        multiplier: Growth factor per retry (``>= 1``).
        max_delay: Cap on the computed delay (before jitter).
        jitter: Fraction added at random, ``0`` to ``1``: ``0.5`` spreads a 10 s delay
            over 10 to 15 s.
        retry_on: Exception type names (``"ValueError"``, ``"mymod.MyError"``) that retry;
            empty means every exception except those in ``never_retry``.
        never_retry: Exception type names that never retry. By default: unknown job
            names, unstorable payloads and results, and broken middleware.
    """

    model_config = ConfigDict(frozen=True, extra="forbid")

    max_retries: int = Field(default=3, ge=0, le=1_000)
    base_delay: timedelta = timedelta(seconds=1)
    multiplier: float = Field(default=2.0, ge=1.0, le=100.0)
    max_delay: timedelta = timedelta(hours=1)
    jitter: float = Field(default=0.25, ge=0.0, le=1.0)
    retry_on: tuple[str, ...] = ()
    never_retry: tuple[str, ...] = (
        _qualname(UnknownJobName), _qualname(PayloadError), _qualname(MiddlewareError),
    )

    @field_validator("base_delay", "max_delay")
    @classmethod
    def _non_negative(cls, value: timedelta) -> timedelta:
        if value < timedelta(0):
            raise ValueError("must not be negative")
        return value

    def backoff(self, retry_number: int, rng: random.Random | None = None) -> timedelta:
        """Return the delay before retry ``retry_number`` (1 for the first).

        Args:
            retry_number: 1-based; values below 1 are treated as 1, huge ones are safe.
            rng: Random source (tests pass a seeded one).

        Returns:
            A delay in ``[d, d * (1 + jitter)]`` where ``d`` is the capped exponential.
        """
        base = self.base_delay.total_seconds()
        cap = self.max_delay.total_seconds()
        n = max(1, retry_number) - 1
        if base <= 0:
            delay = 0.0
        elif self.multiplier == 1.0:
            delay = min(base, cap)
        else:
            # Largest exponent that stays under the cap; beyond it the cap applies.
            limit = math.log(max(cap, base) / base, self.multiplier) if cap > base else 0.0
            delay = cap if n > limit else min(cap, base * self.multiplier**n)
        spread = (rng or random).uniform(0.0, self.jitter) if self.jitter else 0.0
        return timedelta(seconds=delay * (1.0 + spread))

    def should_retry(self, exc: BaseException, retry_count: int,
                     max_retries: int | None = None) -> bool:
        """Decide whether an attempt that raised ``exc`` gets another try.

        Args:
            exc: The exception the attempt raised (a ``JobTimeout`` for a timeout).
            retry_count: Retries already made before this attempt.
            max_retries: The job's own limit, overriding ``self.max_retries``.

        Returns:
            ``True`` to schedule a retry, ``False`` to fail the job.
        """
        limit = self.max_retries if max_retries is None else max_retries
        if retry_count >= limit:
            return False
        if isinstance(exc, Retry):  # the job asked for it: only the limit applies
            return True
        names = {_qualname(t) for t in type(exc).__mro__} | {t.__name__ for t in type(exc).__mro__}
        if names & set(self.never_retry):
            return False
        return not self.retry_on or bool(names & set(self.retry_on))

