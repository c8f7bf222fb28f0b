"""Property tests (issue 17): every generated input is either stored and read back exactly
or refused with a qmlkit error and nothing stored, on every backend.

The ``app`` fixture (``tests/conftest.py``) gives each test its own storage on memory,
SQLite, Redis and PostgreSQL; the examples of one test share it, so each example counts
the stored jobs before and after.
"""

from __future__ import annotations

import math
from datetime import datetime, timedelta, timezone
from typing import Any

from hypothesis import HealthCheck, event, given, settings
from hypothesis import strategies as st

from qmlkit import App
from qmlkit.errors import QmlError
from qmlkit.job import Scheduled
from qmlkit.limits import MAX_TIMESTAMP, MIN_TIMESTAMP

#: Modest example counts keep the suite fast; the app fixture is per test, on purpose.
SETTINGS = settings(max_examples=60, deadline=None, database=None,
                    suppress_health_check=[HealthCheck.function_scoped_fixture,
                                           HealthCheck.too_slow])

_ODD = st.sampled_from(["\x00", "\ud800", "\udfff", "é", "😀", "\u2028", "\\", '"', "'", " "])
text = st.text() | st.text(_ODD | st.characters(), max_size=8)
scalars = (st.none() | st.booleans() | st.integers() | text
           | st.integers(min_value=-(10**5000), max_value=10**5000)
           | st.floats(allow_nan=True, allow_infinity=True))
keys = text | st.integers() | st.none() | st.booleans() | st.floats(allow_nan=False)


def _nest(depth: int) -> Any:
    value: Any = 0
    for _ in range(depth):
        value = [value]
    return value


json_values = st.recursive(
    scalars, lambda inner: st.lists(inner, max_size=4) | st.dictionaries(keys, inner, max_size=4),
    max_leaves=12,
)


def _depth(value: Any) -> int | None:
    """How deep ``value`` is nested as ``_nest`` builds it, or ``None`` if not that shape."""
    depth = 0
    while isinstance(value, list) and len(value) == 1:
        value, depth = value[0], depth + 1
    return depth if value == 0 and type(value) is int else None


def same(a: Any, b: Any) -> bool:
    """Exact equality: same types (bool is not int), floats bit for bit (-0.0 is not 0.0).

    Iterative, not recursive: payloads nested as deep as qmlkit accepts must not overflow
    the test's own stack (pytest and hypothesis already use hundreds of frames).
    """
    pending = [(a, b)]
    while pending:
        x, y = pending.pop()
        if type(x) is not type(y):
            return False
        if isinstance(x, float):
            if not (x == y and math.copysign(1, x) == math.copysign(1, y)):
                return False
        elif isinstance(x, list):
            if len(x) != len(y):
                return False
            pending.extend(zip(x, y, strict=True))
        elif isinstance(x, dict):
            if x.keys() != y.keys():
                return False
            pending.extend((x[k], y[k]) for k in x)
        elif x != y:
            return False
    return True


def total(app: App) -> int:
    return sum(app.storage.count_jobs().values())


def _f(*args: Any, **kwargs: Any) -> None:
    return None


def register(app: App) -> None:
    if "prop.f" not in app.registry:
        app.job(name="prop.f")(_f)


@SETTINGS
@given(args=st.lists(json_values, max_size=4),
       kwargs=st.dictionaries(text | st.integers(), json_values, max_size=3))
def test_enqueue_round_trips_exactly_or_refuses_with_nothing_stored(app, args, kwargs):
    register(app)
    before = total(app)
    try:
        job_id = app.enqueue("prop.f", args=args, kwargs=kwargs)
    except QmlError as exc:
        event(f"refused: {type(exc).__name__}")
        assert total(app) == before
        return
    event("stored")
    job = app.storage.get(job_id)
    assert job is not None and job.state_name == "Enqueued"
    assert same(job.args, args) and same(job.kwargs, kwargs)
    assert total(app) == before + 1


@settings(SETTINGS, max_examples=15)
@given(depth=st.integers(min_value=1, max_value=3000))
def test_deeply_nested_arguments_round_trip_or_refuse_with_nothing_stored(app, depth):
    # built here, not drawn: hypothesis' own printer cannot show a thousand-deep list
    register(app)
    before = total(app)
    try:
        job_id = app.registry["prop.f"].enqueue(_nest(depth))
    except QmlError as exc:
        event(f"refused: {type(exc).__name__}")
        assert total(app) == before
        return
    event("stored")
    job = app.storage.get(job_id)
    assert job is not None and job.state_name == "Enqueued"
    assert len(job.args) == 1 and _depth(job.args[0]) == depth
    assert total(app) == before + 1


offsets = st.timedeltas(min_value=timedelta(hours=-23, minutes=-59),
                        max_value=timedelta(hours=23, minutes=59)).map(timezone)
moments = st.datetimes(timezones=st.none() | st.just(timezone.utc) | offsets) | st.sampled_from([
    MIN_TIMESTAMP, MAX_TIMESTAMP, MIN_TIMESTAMP - timedelta(microseconds=1),
    MAX_TIMESTAMP + timedelta(microseconds=1), datetime.max.replace(tzinfo=timezone.utc)])
delays = (st.floats(allow_nan=True, allow_infinity=True) | st.integers()
          | st.timedeltas() | st.text(max_size=3) | st.booleans())


@SETTINGS
@given(when=st.one_of(moments.map(lambda at: {"at": at}), delays.map(lambda d: {"delay": d})))
def test_schedule_round_trips_exactly_or_refuses_with_nothing_stored(app, when):
    register(app)
    before = total(app)
    try:
        job_id = app.registry["prop.f"].schedule(**when)
    except QmlError as exc:
        event(f"refused: {type(exc).__name__}")
        assert total(app) == before
        return
    event("stored")
    job = app.storage.get(job_id)
    assert isinstance(job.state, Scheduled)
    due = job.state.enqueue_at
    assert MIN_TIMESTAMP <= due <= MAX_TIMESTAMP
    if "at" in when:
        assert due == when["at"] and due.tzinfo == timezone.utc
    # what the due index holds is exact too (SQLite floats, Redis scores)
    earliest = min(j.state.enqueue_at for j in app.storage.list_jobs(state="Scheduled",
                                                                        limit=1000))
    assert app.storage.next_due_at() == earliest
    assert total(app) == before + 1


@SETTINGS
@given(queue=st.none() | st.sampled_from(["default", "mail", "é-queue", "q:{x}"]) | text
       | st.integers(),
       priority=st.none() | st.integers(-(2**31), 2**31 - 1) | st.integers(),
       job_id=st.none() | st.uuids().map(str) | st.text(max_size=70)
       | st.text(_ODD, max_size=3),
       max_retries=st.none() | st.integers(0, 50) | st.integers(),
       timeout=st.none() | st.floats(min_value=1e-3, max_value=1e7)
       | st.floats(allow_nan=True, allow_infinity=True) | st.integers() | st.timedeltas())
def test_options_round_trip_exactly_or_refuse_with_nothing_stored(
        app, queue, priority, job_id, max_retries, timeout):
    register(app)
    options = {"queue": queue, "priority": priority, "job_id": job_id,
               "max_retries": max_retries, "timeout": timeout}
    before = total(app)
    try:
        stored_id = app.enqueue("prop.f", args=[1], **options)
    except QmlError as exc:
        event(f"refused: {type(exc).__name__}")
        assert total(app) == before
        return
    event("stored")
    job = app.storage.get(stored_id)
    assert job is not None
    assert job.queue == (queue if queue is not None else "default")
    assert job.state.queue == job.queue
    assert job.priority == (priority or 0)
    if job_id is not None:
        assert job.id == job_id
    if max_retries is not None:
        assert job.max_retries == max_retries
    if timeout is not None:
        seconds = timeout.total_seconds() if isinstance(timeout, timedelta) else float(timeout)
        assert job.timeout_s == seconds
    assert total(app) == before + 1
