"""Why the storable range ends in 2199: a double of Unix seconds (SQLite's time columns,
Redis' scores) gives back every microsecond of it exactly."""

from __future__ import annotations

from datetime import datetime, timezone

from hypothesis import given, settings
from hypothesis import strategies as st

from qmlkit.limits import MAX_TIMESTAMP, MIN_TIMESTAMP

in_range = st.datetimes(min_value=MIN_TIMESTAMP.replace(tzinfo=None),
                        max_value=MAX_TIMESTAMP.replace(tzinfo=None),
                        timezones=st.just(timezone.utc))


@settings(max_examples=500, deadline=None, database=None)
@given(at=in_range | st.sampled_from([MIN_TIMESTAMP, MAX_TIMESTAMP]))
def test_every_storable_time_survives_a_float_of_unix_seconds(at):
    assert datetime.fromtimestamp(at.timestamp(), timezone.utc) == at


def test_past_2242_a_float_of_unix_seconds_loses_microseconds():
    # the reason for the bound: one microsecond is lost after 2**33 s
    lost = [datetime(2300, 1, 1, 0, 0, 0, us, tzinfo=timezone.utc) for us in range(100)]
    assert any(datetime.fromtimestamp(t.timestamp(), timezone.utc) != t for t in lost)
