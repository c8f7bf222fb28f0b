"""Cron parsing, time zones across DST, and the misfire policy (field cases C05, C06)."""

from __future__ import annotations

from datetime import datetime, timedelta, timezone
from zoneinfo import ZoneInfo

import pytest

from qmlkit import App
from qmlkit.errors import ConfigurationError, InvalidCron
from qmlkit.recurring import RecurringJob, parse_cron

UTC = timezone.utc
BASE = datetime(2026, 6, 1, 12, 0, 0, tzinfo=UTC)


def rj(cron: str, tz: str = "UTC", **fields: object) -> RecurringJob:
    return RecurringJob(id="t", cron=cron, method="m", timezone=tz, **fields)


def test_six_fields_are_read_seconds_first() -> None:
    # C06: */30 in the first of six fields means every 30 seconds, not every second
    assert rj("*/30 * * * * *").upcoming(3, BASE) == [
        BASE + timedelta(seconds=30), BASE + timedelta(seconds=60), BASE + timedelta(seconds=90)]
    assert rj("0 */5 * * * *").upcoming(3, BASE) == [
        BASE + timedelta(minutes=5), BASE + timedelta(minutes=10), BASE + timedelta(minutes=15)]


def test_five_fields_keep_minute_resolution() -> None:
    assert rj("*/30 * * * *").upcoming(2, BASE) == [BASE + timedelta(minutes=30),
                                                   BASE + timedelta(minutes=60)]
    assert parse_cron("0 3 * * 1-5") == "0 3 * * 1-5"


@pytest.mark.parametrize(("expression", "field"), [
    ("0 25 * * *", "hour"), ("61 * * * *", "minute"), ("0 0 32 * *", "day-of-month"),
    ("0 0 * 13 *", "month"), ("0 0 * * 9", "day-of-week"), ("75 * * * * *", "second"),
])
def test_out_of_range_field_is_refused_naming_it(expression: str, field: str) -> None:
    with pytest.raises(InvalidCron, match=f"the {field} field"):
        rj(expression)


@pytest.mark.parametrize("expression", ["* * * *", "0 0 0 * * * 2027", "", "every day"])
def test_other_field_counts_are_refused(expression: str) -> None:
    with pytest.raises(InvalidCron):
        parse_cron(expression)


def test_unknown_time_zone_is_refused_naming_it() -> None:
    with pytest.raises(ConfigurationError, match="Mars/Olympus"):
        rj("0 0 * * *", "Mars/Olympus")


def test_daily_midnight_has_no_gap_across_spring_forward() -> None:
    # C05: just before midnight on the US spring-forward day, the next three midnights
    la = ZoneInfo("America/Los_Angeles")
    before = datetime(2026, 3, 7, 23, 59, 50, tzinfo=la)
    ticks = [t.astimezone(la) for t in rj("0 0 * * *", "America/Los_Angeles").upcoming(3, before)]
    assert [(t.month, t.day, t.hour, t.minute) for t in ticks] == [
        (3, 8, 0, 0), (3, 9, 0, 0), (3, 10, 0, 0)]


def test_time_inside_the_spring_gap_fires_once_at_the_end_of_the_gap() -> None:
    ny = ZoneInfo("America/New_York")  # 2026-03-08: 02:00 EST jumps to 03:00 EDT
    template = rj("30 2 * * *", "America/New_York")
    ticks = template.upcoming(3, datetime(2026, 3, 7, 12, 0, tzinfo=ny))
    local = [t.astimezone(ny) for t in ticks]
    assert [(t.day, t.hour, t.minute) for t in local] == [(8, 3, 0), (9, 2, 30), (10, 2, 30)]
    assert ticks[0] == datetime(2026, 3, 8, 7, 0, tzinfo=UTC)  # 03:00 EDT, once that day


def test_time_inside_the_fall_overlap_fires_once_at_its_first_occurrence() -> None:
    ny = ZoneInfo("America/New_York")  # 2026-11-01: 01:00-02:00 happens twice
    template = rj("30 1 * * *", "America/New_York")
    ticks = template.upcoming(3, datetime(2026, 10, 31, 12, 0, tzinfo=ny))
    assert ticks[0] == datetime(2026, 11, 1, 5, 30, tzinfo=UTC)  # 01:30 EDT, the first one
    assert ticks[1] == datetime(2026, 11, 2, 6, 30, tzinfo=UTC)  # next day, EST
    # From inside the repeated hour's second pass, the next tick is the next day's.
    second_pass = datetime(2026, 11, 1, 6, 40, tzinfo=UTC)  # 01:40 EST
    assert template.next_after(second_pass) == datetime(2026, 11, 2, 6, 30, tzinfo=UTC)


def test_sub_hourly_job_fires_each_wall_time_once_across_the_overlap() -> None:
    ny = ZoneInfo("America/New_York")
    template = rj("*/30 * * * *", "America/New_York")
    start = datetime(2026, 11, 1, 0, 10, tzinfo=ny)
    walls = [t.astimezone(ny).strftime("%H:%M") for t in template.upcoming(6, start)]
    assert walls == ["00:30", "01:00", "01:30", "02:00", "02:30", "03:00"]


def test_misfire_fire_once_fires_one_job_for_many_missed_ticks() -> None:
    template = rj("* * * * *", next_run_at=BASE - timedelta(minutes=10))
    tick, following = template.plan(BASE)
    assert tick == BASE - timedelta(minutes=10)
    # The ticks late beyond the 60 s grace are merged into this one; the two still
    # within it (BASE - 1 min, BASE) fire on their own (issue #17).
    assert following == BASE - timedelta(minutes=1)


def test_misfire_skip_fires_nothing_for_a_late_tick_but_fires_on_time_ones() -> None:
    late = rj("* * * * *", misfire="skip", next_run_at=BASE - timedelta(minutes=10))
    assert late.plan(BASE) == (None, BASE - timedelta(minutes=1))
    on_time = rj("* * * * *", misfire="skip", next_run_at=BASE - timedelta(seconds=2))
    # BASE itself is due and on time: it fires on the next poll, not merged (issue #17)
    assert on_time.plan(BASE) == (BASE - timedelta(seconds=2), BASE)


def test_ticks_within_the_grace_fire_when_the_clock_runs_ahead() -> None:
    # Given a 10-second template due at BASE, first polled by a server 30 s ahead
    template = rj("*/10 * * * * *", next_run_at=BASE, misfire_grace=timedelta(seconds=60))
    now = BASE + timedelta(seconds=30)
    # When the server polls until nothing is due
    fired = []
    while template.next_run_at <= now:
        tick, following = template.plan(now)
        fired.append(tick)
        template = template.model_copy(update={"next_run_at": following})
    # Then every tick within the grace fired, none was merged into another
    assert fired == [BASE + timedelta(seconds=s) for s in (0, 10, 20, 30)]
    assert template.next_run_at == BASE + timedelta(seconds=40)


@pytest.mark.parametrize("misfire", ["fire_once", "skip"])
def test_only_ticks_late_beyond_the_grace_are_merged_or_skipped(misfire: str) -> None:
    # Given a per-minute template last due 3 min ago, with a 90 s grace
    template = rj("* * * * *", misfire=misfire, next_run_at=BASE - timedelta(minutes=3),
                  misfire_grace=timedelta(seconds=90))
    # When it is planned at BASE
    tick, following = template.plan(BASE)
    # Then the late tick fires once (or not at all) and the schedule resumes at the
    # first tick within the grace (BASE - 1 min), not after now
    assert tick == (BASE - timedelta(minutes=3) if misfire == "fire_once" else None)
    assert following == BASE - timedelta(minutes=1)


def test_tick_job_ids_are_the_same_on_every_server() -> None:
    a, b = rj("* * * * *"), rj("* * * * *")
    assert a.tick_job_id(BASE) == b.tick_job_id(BASE) != a.tick_job_id(BASE + timedelta(minutes=1))


def test_reregistering_the_same_schedule_keeps_it(tmp_path) -> None:
    app = App("r", storage=f"sqlite:///{tmp_path / 'q.db'}", autoload=False)
    first = app.schedule_recurring("daily", "0 3 * * *", "m")
    app.storage.fire_recurring("daily", expected_next_run_at=first.next_run_at,
                               next_run_at=first.next_after(first.next_run_at), job=None)
    again = app.schedule_recurring("daily", "0 3 * * *", "m", args=[1])
    assert again.next_run_at == first.next_after(first.next_run_at) and again.args == [1]
    changed = app.schedule_recurring("daily", "0 4 * * *", "m")
    assert changed.next_run_at.hour == 4
    assert [t.id for t in app.list_recurring()] == ["daily"]
    with pytest.raises(InvalidCron, match="hour"):
        app.schedule_recurring("bad", "0 24 * * *", "m")
    assert app.remove_recurring("daily") and app.list_recurring() == []
    app.close()


def test_a_cron_that_matches_no_date_is_refused() -> None:
    with pytest.raises(InvalidCron, match="matches no date"):
        rj("0 0 31 2 *")


def test_priority_out_of_range_is_refused_at_registration() -> None:
    with pytest.raises(ValueError, match="priority"):
        rj("* * * * *", priority=2**40)
