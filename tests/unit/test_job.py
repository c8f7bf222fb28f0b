"""The job model: states, transitions, time zones, JSON round trips, payload checks."""

from __future__ import annotations

from datetime import datetime, timedelta, timezone
from zoneinfo import ZoneInfo

import pytest
from pydantic import ValidationError

from qmlkit.errors import InvalidTransition, PayloadError
from qmlkit.job import (
    STATE_NAMES,
    TRANSITIONS,
    AwaitingRetry,
    Deleted,
    Enqueued,
    Failed,
    Job,
    Processing,
    Scheduled,
    Succeeded,
    cap_text,
    encode_payload,
    new_job_id,
    utcnow,
)
from qmlkit.testing import make_job

NOW = datetime(2026, 7, 1, 12, 0, tzinfo=timezone.utc)
STATES = {
    "Enqueued": Enqueued(enqueued_at=NOW, queue="q"),
    "Scheduled": Scheduled(enqueue_at=NOW, scheduled_at=NOW, reason="r"),
    "Processing": Processing(started_at=NOW, worker_id="w", server_name="s"),
    "Succeeded": Succeeded(succeeded_at=NOW, duration_ms=1.5, result={"a": [1]}),
    "Failed": Failed(failed_at=NOW, exception_type="E", message="m", stack_trace="t",
                     retry_count=2),
    "AwaitingRetry": AwaitingRetry(retry_at=NOW, retry_count=1, last_exception="E: m"),
    "Deleted": Deleted(deleted_at=NOW, reason="r"),
}


@pytest.mark.parametrize("source", STATE_NAMES)
@pytest.mark.parametrize("target", STATE_NAMES)
def test_with_state_allows_exactly_the_transition_table(source: str, target: str) -> None:
    job = make_job(state=STATES[source]) if source in ("Enqueued", "Scheduled") else \
        make_job().model_copy(update={"state": STATES[source]})
    if target in TRANSITIONS[source]:
        assert job.with_state(STATES[target]).state == STATES[target]
    else:
        with pytest.raises(InvalidTransition, match=f"{source} job cannot become {target}"):
            job.with_state(STATES[target])


@pytest.mark.parametrize("name", STATE_NAMES)
def test_job_json_round_trip_is_lossless_in_every_state(name: str) -> None:
    job = make_job(args=[1, "ü", None], kwargs={"k": {"n": 1.25}}, metadata={"trace": "x"},
                   timeout_s=3.0, expires_at=NOW).model_copy(update={"state": STATES[name]})
    assert Job.model_validate_json(job.model_dump_json()) == job


def test_naive_datetimes_are_rejected() -> None:
    with pytest.raises(ValidationError, match="timezone"):
        Enqueued(enqueued_at=datetime(2026, 1, 1))


def test_aware_datetimes_are_stored_as_utc() -> None:
    local = datetime(2026, 7, 1, 13, 0, tzinfo=ZoneInfo("Europe/London"))
    state = Enqueued(enqueued_at=local)
    assert state.enqueued_at.utcoffset() == timedelta(0)
    assert state.enqueued_at == NOW


def test_utcnow_is_aware_utc() -> None:
    assert utcnow().utcoffset() == timedelta(0)


def test_new_job_id_is_a_time_ordered_uuid7() -> None:
    import uuid

    ids = [new_job_id() for _ in range(1000)]
    assert len(set(ids)) == 1000
    parsed = uuid.UUID(ids[0])
    assert parsed.version == 7 and parsed.variant == uuid.RFC_4122
    assert ids[0][:8] <= ids[-1][:8]


def test_encode_payload_names_the_bad_argument() -> None:
    with pytest.raises(PayloadError, match=r"args\[1\]") as info:
        encode_payload([1, {1, 2}], {})
    assert info.value.where == "args[1]"
    with pytest.raises(PayloadError, match=r"kwargs\['when'\]"):
        encode_payload([], {"when": NOW})
    with pytest.raises(PayloadError, match=r"NaN|Out of range"):
        encode_payload([float("nan")], {})


def test_encode_payload_enforces_the_byte_limit_in_utf8() -> None:
    assert encode_payload(["é" * 10], {}, max_bytes=45)
    with pytest.raises(PayloadError, match="over the limit of 45 bytes"):
        encode_payload(["é" * 11], {}, max_bytes=45)


def test_encode_payload_refuses_a_lone_surrogate_as_a_payload_error() -> None:
    # e.g. a file name decoded with surrogateescape: no database can store it as text
    with pytest.raises(PayloadError, match="lone surrogate"):
        encode_payload(["report-\udcff.csv"], {})


def test_encode_payload_refuses_arguments_nested_too_deeply_as_a_payload_error() -> None:
    deep: list = []
    for _ in range(5000):
        deep = [deep]
    with pytest.raises(PayloadError, match="nested too deeply"):
        encode_payload([deep], {})


def test_cap_text_marks_the_cut() -> None:
    text = "a" * 1000 + "b" * 1000
    capped = cap_text(text, 200)
    assert len(capped) <= 200 + 60 and "characters cut" in capped
    assert capped.startswith("a") and capped.endswith("b")
    assert cap_text("short", 200) == "short"


def test_job_rejects_unknown_fields_and_bad_values() -> None:
    with pytest.raises(ValidationError):
        Job(method="m", state=STATES["Enqueued"], bogus=1)
    with pytest.raises(ValidationError):
        Job(method="", state=STATES["Enqueued"])
    with pytest.raises(ValidationError):
        Job(method="m", state=STATES["Enqueued"], max_retries=-1)
