"""Recurring jobs: cron templates that the server materialises as ordinary jobs.

Cron expressions are parsed by croniter; qmlkit only validates them and fixes the field
order:

* 5 fields — ``minute hour day-of-month month day-of-week`` (standard cron, minute
  resolution).
* 6 fields — ``second minute hour day-of-month month day-of-week``: seconds **first**,
  as qml-rs (and Quartz) read them. croniter reads a sixth field as seconds *last*, so
  the seconds field is moved before croniter sees it (field case C06).

Anything else (7 fields with a year, an out-of-range value) is refused when the template
is registered, with an ``InvalidCron`` naming the bad field.

Time zones (IANA names through ``zoneinfo``) follow wall-clock rules (field case C05):

* Ticks are computed on the local wall clock, then converted to UTC.
* A wall time that does not exist (inside a spring-forward gap) fires once, at the first
  instant after the gap: a daily 02:30 job fires at 03:00 on that day.
* A wall time that happens twice (inside a fall-back overlap) fires once, at its first
  occurrence; the repeated hour's second pass fires nothing.

Misfire policy (what happens to ticks missed while no server ran), per template:

* ``"fire_once"`` (default): the missed ticks fire one job between them, at once, then
  the schedule resumes at the first tick that is not missed.
* ``"skip"``: missed ticks fire nothing; the schedule resumes at the first tick that is
  not missed.

A tick counts as missed when it is more than ``misfire_grace`` old. The grace applies
before merging: every tick whose lateness is within ``misfire_grace`` fires a job of its
own (one per poll), so a server whose clock runs a little ahead loses no tick.
"""

from __future__ import annotations

import uuid
from datetime import datetime, timedelta, timezone
from typing import Any, Literal
from zoneinfo import ZoneInfo, ZoneInfoNotFoundError

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

from qmlkit.errors import ConfigurationError, InvalidCron
from qmlkit.job import UtcDateTime

#: Names of the fields of a 6-field expression, in qmlkit's (seconds-first) order.
FIELDS_6 = ("second", "minute", "hour", "day-of-month", "month", "day-of-week")
#: Names of the fields of a 5-field expression.
FIELDS_5 = FIELDS_6[1:]

#: The smallest step of a datetime: a tick exactly ``misfire_grace`` late is on time.
_RESOLUTION = timedelta(microseconds=1)

#: Namespace for the ids of materialised ticks: uuid5(namespace, "template-id@tick").
TICK_NAMESPACE = uuid.UUID("5b0c6f3e-7d5a-4c1e-9d0a-6a1f2e3b4c5d")


def parse_cron(expression: str) -> str:
    """Validate a 5- or 6-field cron expression; return it in croniter's field order.

    Args:
        expression: Fields separated by spaces; 6 fields means seconds first.

    Returns:
        The expression croniter should read (a 6-field one with seconds moved last).

    Raises:
        InvalidCron: Not 5 or 6 fields, or a field croniter refuses; the message names
            the field (e.g. ``"hour"``).
    """
    from croniter import croniter  # loads with the first template, not with qmlkit

    fields = expression.split()
    if len(fields) not in (5, 6):
        raise InvalidCron(expression, f"expected 5 fields (minute-first) or 6 fields "
                                      f"(seconds first), got {len(fields)}")
    names = FIELDS_6 if len(fields) == 6 else FIELDS_5
    ordered = [*fields[1:], fields[0]] if len(fields) == 6 else fields
    if croniter.is_valid(" ".join(ordered)):
        return " ".join(ordered)
    for name, value in zip(names, fields, strict=True):  # find the field to blame
        probe = ["*"] * len(fields)
        probe[names.index(name)] = value
        probe = [*probe[1:], probe[0]] if len(fields) == 6 else probe
        if not croniter.is_valid(" ".join(probe)):
            raise InvalidCron(expression, f"the {name} field {value!r} is not valid")
    raise InvalidCron(expression, "the fields are valid alone but not together")


def zone(name: str) -> ZoneInfo:
    """Return the IANA time zone ``name``.

    Raises:
        ConfigurationError: No such zone.
    """
    try:
        return ZoneInfo(name)
    except (ZoneInfoNotFoundError, ValueError) as exc:
        raise ConfigurationError(f"unknown time zone {name!r} (an IANA name such as "
                                 "'Europe/London' or 'UTC' is expected)") from exc


def _wall_to_utc(wall: datetime, tz: ZoneInfo) -> datetime:
    """Convert a naive local wall time to UTC: first occurrence; a gap's end for a gap."""
    first = wall.replace(tzinfo=tz, fold=0).astimezone(timezone.utc)
    if first.astimezone(tz).replace(tzinfo=None) == wall:
        return first  # exists (an overlap's first occurrence is fold=0)
    # Inside a gap: the gap ends between the two readings of the wall time; find the
    # first instant whose wall time is past ``wall`` (to the microsecond is plenty).
    low = wall.replace(tzinfo=tz, fold=1).astimezone(timezone.utc)
    high = first
    low, high = min(low, high), max(low, high)
    while high - low > timedelta(microseconds=1):
        middle = low + (high - low) / 2
        if middle.astimezone(tz).replace(tzinfo=None) > wall:
            high = middle
        else:
            low = middle
    return high.replace(microsecond=0) if high.microsecond > 999_000 else high


class RecurringJob(BaseModel):
    """A cron template that materialises one job per tick.

    Attributes:
        id: Unique id; registering the same id again replaces the template.
        cron: 5-field (minute-first) or 6-field (seconds-first) expression.
        method: The job name to enqueue.
        args: Positional arguments of every materialised job (JSON list).
        kwargs: Keyword arguments (JSON object).
        queue: Queue of the materialised jobs.
        priority: Their priority.
        timezone: IANA zone the cron is read in (default UTC).
        enabled: Disabled templates keep their schedule but materialise nothing.
        misfire: ``"fire_once"`` or ``"skip"``; see the module docstring.
        misfire_grace: How late a tick may be and still count as on time.
        next_run_at: The next tick (UTC); set when registered, advanced atomically by
            the server that materialises each tick.
        last_run_at: The tick materialised last (UTC), or ``None``.
    """

    model_config = ConfigDict(frozen=True, extra="forbid")

    id: str = Field(min_length=1, max_length=255)
    cron: str
    method: str = Field(min_length=1)
    args: list[Any] = Field(default_factory=list)
    kwargs: dict[str, Any] = Field(default_factory=dict)
    queue: str = Field(default="default", min_length=1)
    priority: int = Field(default=0, ge=-(2**31), le=2**31 - 1)
    timezone: str = "UTC"
    enabled: bool = True
    misfire: Literal["fire_once", "skip"] = "fire_once"
    misfire_grace: timedelta = timedelta(seconds=60)
    next_run_at: UtcDateTime | None = None
    last_run_at: UtcDateTime | None = None

    @field_validator("cron")
    @classmethod
    def _valid_cron(cls, value: str) -> str:
        parse_cron(value)
        return " ".join(value.split())

    @field_validator("timezone")
    @classmethod
    def _valid_zone(cls, value: str) -> str:
        zone(value)
        return value

    @model_validator(mode="after")
    def _first_run(self) -> RecurringJob:
        if self.next_run_at is None:
            from croniter import CroniterBadDateError

            try:
                first = self.next_after(datetime.now(timezone.utc))
            except CroniterBadDateError as exc:
                raise InvalidCron(self.cron, "it matches no date (e.g. 31 February)") from exc
            object.__setattr__(self, "next_run_at", first)
        return self

    def next_after(self, after: datetime) -> datetime:
        """Return the first tick strictly after ``after``.

        Args:
            after: An aware datetime.

        Returns:
            The tick, aware UTC (see the module docstring for DST gaps and overlaps).
        """
        from croniter import croniter

        tz = zone(self.timezone)
        wall = after.astimezone(tz).replace(tzinfo=None)
        it = croniter(parse_cron(self.cron), wall)
        while True:
            candidate = _wall_to_utc(it.get_next(datetime), tz)
            if candidate > after:
                return candidate

    def upcoming(self, count: int, after: datetime | None = None) -> list[datetime]:
        """Return the next ``count`` ticks after ``after`` (default: now), aware UTC."""
        ticks: list[datetime] = []
        moment = after or datetime.now(timezone.utc)
        for _ in range(count):
            moment = self.next_after(moment)
            ticks.append(moment)
        return ticks

    def plan(self, now: datetime) -> tuple[datetime | None, datetime]:
        """Decide what a due template does now, by its misfire policy.

        Args:
            now: The current time; the template must be due (``next_run_at <= now``).

        Returns:
            ``(tick, next_run_at)``: the tick to materialise (``None`` when the policy
            skips a missed tick) and the template's next ``next_run_at``: the first
            later tick whose lateness at ``now`` is within ``misfire_grace``, so it may
            be ``<= now`` (then it fires on the next poll, on its own).
        """
        assert self.next_run_at is not None
        tick = self.next_run_at
        late = now - tick > self.misfire_grace
        following = self.next_after(tick)
        if now - following > self.misfire_grace:
            # Ticks late beyond the grace were missed: merge (or skip) them and resume
            # at the first tick still within the grace, which fires on its own. The
            # grace applies before merging, so a server whose clock runs ahead loses
            # no tick that is only slightly late (issue #17).
            following = self.next_after(now - self.misfire_grace - _RESOLUTION)
        if late and self.misfire == "skip":
            return None, following
        return tick, following

    def tick_job_id(self, tick: datetime) -> str:
        """The id of the job materialised for ``tick``: the same on every server."""
        return str(uuid.uuid5(TICK_NAMESPACE, f"{self.id}@{tick.isoformat()}"))
