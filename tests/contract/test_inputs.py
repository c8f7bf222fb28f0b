"""Hostile inputs (issue 17): a clear qmlkit error at call time, nothing stored, the same
answer on every backend. Each case here was a raw or backend-specific failure before."""

from __future__ import annotations

from datetime import datetime, timedelta, timezone

import pytest

from qmlkit import App
from qmlkit.errors import ConfigurationError, PayloadError
from qmlkit.job import Enqueued, Job, Scheduled, utcnow
from qmlkit.limits import MAX_TIMESTAMP, MIN_TIMESTAMP


def total(app: App) -> int:
    return sum(app.storage.count_jobs().values())


@pytest.fixture
def fn(app: App):
    @app.job(name="hostile.f")
    def f(*args, **kwargs):
        return None

    return f


def refused(app: App, error: type[Exception], match: str, call) -> None:
    before = total(app)
    with pytest.raises(error, match=match):
        call()
    assert total(app) == before


# --- timestamps ----------------------------------------------------------------------------


def test_schedule_at_datetime_max_is_refused_naming_the_range(app, fn):
    at = datetime.max.replace(tzinfo=timezone.utc)
    refused(app, ConfigurationError, r"at=9999-12-31.*outside the range.*1970-01-01.*2199",
            lambda: fn.schedule(at=at))
    # and the storage still reads: nothing unreadable was written
    assert app.storage.next_due_at() is None
    assert app.storage.list_jobs() == []


@pytest.mark.parametrize("at", [
    datetime(1969, 12, 31, 23, 59, 59, 999999, tzinfo=timezone.utc),
    datetime(2200, 1, 1, tzinfo=timezone.utc),
    datetime(1, 1, 1, tzinfo=timezone.utc),
    datetime.max.replace(tzinfo=timezone(timedelta(hours=-5))),
    datetime.min.replace(tzinfo=timezone(timedelta(hours=5))),
])
def test_schedule_at_outside_the_range_is_refused(app, fn, at):
    refused(app, ConfigurationError, r"at=", lambda: fn.schedule(at=at))


@pytest.mark.parametrize("at", [MIN_TIMESTAMP, MAX_TIMESTAMP,
                                datetime(2199, 6, 1, 12, 0, 0, 123457, tzinfo=timezone.utc)])
def test_the_edges_of_the_range_round_trip_to_the_microsecond(app, fn, at):
    job = app.storage.get(fn.schedule(at=at))
    assert job.state.enqueue_at == at
    assert app.storage.next_due_at() == at


@pytest.mark.parametrize("at", ["2030-01-01T00:00:00Z", 1_900_000_000, datetime(2030, 1, 1).date()])
def test_schedule_at_that_is_not_a_datetime_is_refused(app, fn, at):
    refused(app, ConfigurationError, r"at= must be an aware datetime", lambda: fn.schedule(at=at))


@pytest.mark.parametrize(("delay", "match"), [
    (float("nan"), "NaN"),
    (float("inf"), "too long"),
    (-float("inf"), "must not be negative"),
    (1e16, "too long"),
    (10**400, "too long"),
    (timedelta(days=3e7), "too long"),
    (timedelta(days=-1), "must not be negative"),
    ("", "must be a number of seconds or a timedelta, got ''"),
    ("60", "must be a number of seconds or a timedelta"),
    (True, "must be a number of seconds or a timedelta"),
    (-5, "must not be negative"),
])
def test_schedule_with_a_bad_delay_is_a_configuration_error(app, fn, delay, match):
    refused(app, ConfigurationError, match, lambda: fn.schedule(delay=delay))
    refused(app, ConfigurationError, match, lambda: app.enqueue("hostile.f", delay=delay))


def test_a_delay_ending_past_the_range_is_refused(app, fn):
    delay = MAX_TIMESTAMP - utcnow() + timedelta(days=1)
    refused(app, ConfigurationError, r"delay=.*ends at .*outside the range",
            lambda: fn.schedule(delay=delay))


# --- options -------------------------------------------------------------------------------


@pytest.mark.parametrize(("options", "match"), [
    ({"queue": 5}, r"queue: Input should be a valid string \(got 5\)"),
    ({"queue": ""}, r"queue: must not be empty"),
    ({"queue": "a\x00b"}, r"queue: contains a NUL character"),
    ({"queue": "\ud800"}, r"queue: is not valid Unicode"),
    ({"queue": "q" * 256}, r"queue: is 256 characters long"),
    ({"job_id": ""}, r"job_id: must not be empty"),
    ({"job_id": "\ud800"}, r"job_id: is not valid Unicode \(a lone surrogate"),
    ({"job_id": "a\x00b"}, r"job_id: contains a NUL character"),
    ({"job_id": "x" * 65}, r"job_id: is 65 characters long"),
    ({"job_id": 7}, r"job_id: Input should be a valid string"),
    ({"priority": 2**31}, r"priority: Input should be less than or equal to 2147483647"),
    ({"max_retries": 2**31}, r"max_retries: Input should be less than or equal"),
    ({"max_retries": -1}, r"max_retries: Input should be greater than or equal to 0"),
    ({"timeout": float("nan")}, r"timeout must be a number of seconds, got NaN"),
    ({"timeout": float("inf")}, r"timeout of inf is too long"),
    ({"timeout": 0}, r"timeout must be positive"),
    ({"timeout": ""}, r"timeout must be a number of seconds or a timedelta"),
])
def test_a_bad_option_is_a_configuration_error_naming_the_field(app, fn, options, match):
    refused(app, ConfigurationError, match, lambda: app.enqueue("hostile.f", **options))


def test_an_empty_job_name_is_refused_at_enqueue(app):
    refused(app, ConfigurationError, r"method: must not be empty", lambda: app.enqueue(""))


@pytest.mark.parametrize("method", ["a\x00b", "\udfff", "m" * 256])
def test_a_bad_job_name_is_refused_at_enqueue_and_at_registration(app, method):
    refused(app, ConfigurationError, r"method: ", lambda: app.enqueue(method))
    with pytest.raises(ConfigurationError, match="job name"):
        app.job(name=method)(lambda: None)


@pytest.mark.parametrize(("options", "match"), [
    ({"queue": ""}, "queue must not be empty"),
    ({"queue": "a\x00b"}, "queue contains a NUL"),
    ({"queue": 5}, "queue must be a string, not int"),
    ({"priority": 2**31}, "priority must be from"),
    ({"max_retries": 2**31}, "max_retries must be from 0"),
    ({"timeout": float("inf")}, "timeout of inf is too long"),
])
def test_bad_registered_defaults_are_refused_at_registration(app, options, match):
    with pytest.raises(ConfigurationError, match=match):
        app.job(name="hostile.g", **options)(lambda: None)


# --- identifiers on read -----------------------------------------------------------------------


@pytest.mark.parametrize("job_id", ["\ud800", "a\x00b", "x\udc80y"])
def test_get_of_an_id_no_job_can_have_is_none_on_every_backend(app, job_id):
    assert app.storage.get(job_id) is None


# --- arguments -----------------------------------------------------------------------------


@pytest.mark.parametrize(("args", "kwargs", "where"), [
    (({1: "a", "1": "b"},), {}, "args[0]"),
    (({None: 1, True: 2},), {}, "args[0]"),
    (([{"ok": {2.5: "x"}}],), {}, "args[0][0]['ok']"),
    ((), {"user": {"tags": [{1.5: 1}]}}, "kwargs['user']['tags'][0]"),
])
def test_a_non_string_key_is_refused_naming_its_path(app, fn, args, kwargs, where):
    before = total(app)
    with pytest.raises(PayloadError, match="JSON object keys must be strings") as caught:
        fn.enqueue(*args, **kwargs)
    assert caught.value.where == where
    assert total(app) == before


@pytest.mark.parametrize("options", [{}, {"queue": "other"}])
def test_a_non_string_keyword_key_is_a_payload_error_on_every_path(app, fn, options):
    refused(app, PayloadError, "kwargs has the key 1 of type int",
            lambda: app.enqueue("hostile.f", kwargs={1: "a"}, **options))


def test_enqueue_many_refuses_a_non_string_key_in_any_call_and_stores_none(app, fn):
    refused(app, PayloadError, "JSON object keys must be strings",
            lambda: fn.enqueue_many([(1,), ({"a": {1: 2}},)]))


def test_non_string_keys_in_metadata_and_lone_surrogates_are_refused(app, fn):
    refused(app, PayloadError, "metadata has the key 1",
            lambda: app.enqueue("hostile.f", metadata={1: "x"}))
    refused(app, PayloadError, r"metadata\['a'\] has the key 1",
            lambda: app.enqueue("hostile.f", metadata={"a": {1: "x"}}))
    refused(app, PayloadError, "metadata holds a string that is not valid Unicode",
            lambda: app.enqueue("hostile.f", metadata={"k": "\ud800"}))
    refused(app, PayloadError, "not valid Unicode", lambda: fn.enqueue("\ud800"))


# --- the storage directly ----------------------------------------------------------------------


@pytest.mark.parametrize("fields", [
    {"id": "\ud800"}, {"id": ""}, {"id": "x" * 65}, {"queue": "a\x00b"}, {"method": ""},
    {"max_retries": 2**31}, {"timeout_s": float("inf")},
    {"created_at": datetime(9999, 1, 1, tzinfo=timezone.utc)},
])
def test_a_job_built_by_hand_with_a_bad_field_cannot_be_built(fields):
    # Job(...) is how Storage.enqueue's callers build jobs: a bad one never reaches it
    with pytest.raises(ValueError, match=next(iter(fields))):
        Job(**{"method": "m", "state": Enqueued(enqueued_at=utcnow()), **fields})


def test_a_state_outside_the_range_cannot_be_built():
    with pytest.raises(ValueError, match="outside the range every backend can store"):
        Scheduled(enqueue_at=datetime(9999, 1, 1, tzinfo=timezone.utc), scheduled_at=utcnow())


def test_storage_enqueue_refuses_a_non_string_key(app):
    before = total(app)
    job = Job(method="m", args=[{1: "a"}], state=Enqueued(enqueued_at=utcnow()))
    with pytest.raises(PayloadError, match=r"args\[0\] has the key 1"):
        app.storage.enqueue(job)
    assert total(app) == before
