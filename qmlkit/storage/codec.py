"""The storage codec: the Python half of the contract that every backend shares.

Each backend keeps its own encoding of a job (SQL columns, a Redis hash, Python objects
in memory) and its own atomic fencing checks; what they all do the same way lives here:

* `decode_job` turns stored fields into a `Job`, or, for a record that will not decode
  (bad JSON, a wrong type, a state field that disagrees with the state data), into its
  *quarantine stand-in*: a Failed job with a ``qmlkit.errors.PayloadError`` reason
  (`quarantine_stand_in`), while the stored raw data is kept for inspection;
* `claimed_job` is the claim's fast path: the new Processing state is known, so the old
  state is not decoded and the job is built without validation;
* `decode_history` reads a job's history lines (one JSON state per line, oldest first);
* `state_columns`, `due_at` and `outcome_at` say which time indexes each state: the
  enqueue time (claim order), the due time (promotion), the start time and server
  (stranded and dead-server requeues), the outcome time (throughput counters);
* `group_new_jobs` checks and encodes jobs to enqueue, in runs that share every field
  but id, arguments and metadata (a bulk enqueue's), so a backend encodes the shared
  fields once per run.

Stored formats are defined by the backends; nothing here changes them.
"""

from __future__ import annotations

import json
import logging
import re
from collections.abc import Callable, Mapping, Sequence
from datetime import datetime, timezone
from typing import Any

from pydantic import TypeAdapter, ValidationError

from qmlkit.job import (
    AwaitingRetry,
    Enqueued,
    Failed,
    Job,
    JobState,
    Processing,
    Scheduled,
    Succeeded,
    check_transition,
    trusted,
)
from qmlkit.payload import encode_metadata, encode_payload

__all__ = [
    "DECODE_ERRORS",
    "JOB_STATE",
    "MAX_REASON_CHARS",
    "QUARANTINE_EXCEPTION",
    "check_utf8",
    "claimed_job",
    "decode_history",
    "decode_job",
    "decode_state",
    "due_at",
    "group_new_jobs",
    "held_stand_in",
    "load_json",
    "outcome_at",
    "quarantine_stand_in",
    "state_columns",
    "undecodable_reason",
]

#: Validates any stored state document (a `JobState` union, discriminated by ``name``).
JOB_STATE: TypeAdapter[JobState] = TypeAdapter(JobState)

#: What decoding a stored record may raise; each means "quarantine this record".
DECODE_ERRORS: tuple[type[Exception], ...] = (ValueError, TypeError, KeyError, ValidationError)

#: Longest quarantine reason kept, in characters.
MAX_REASON_CHARS = 2000

#: The exception type named by a quarantined job's Failed state.
QUARANTINE_EXCEPTION = "qmlkit.errors.PayloadError"


def check_utf8(fields: Mapping[str, Any]) -> None:
    """Refuse stored text that was not valid UTF-8.

    A client that decodes with ``surrogateescape`` (so one bad row cannot fail a whole
    reply) hands such bytes over as lone surrogates; this finds them.

    Args:
        fields: Field name -> stored value; only ``str`` values are checked.

    Raises:
        ValueError: Naming the first field holding invalid UTF-8 (the message holds no
            undecodable character, so it can be stored as the quarantine reason).
    """
    try:  # one encode for the whole record: a claim checks every job it takes
        "".join([v for v in fields.values() if isinstance(v, str)]).encode("utf-8")
        return
    except UnicodeEncodeError:
        pass  # find the field to name
    for name, value in fields.items():
        if isinstance(value, str):
            try:
                value.encode("utf-8")
            except UnicodeEncodeError:
                raise ValueError(f"field {name!r} holds invalid UTF-8 bytes") from None


#: A JSON escape of a UTF-16 surrogate (``\\ud800`` to ``\\udfff``), either case.
_SURROGATE_ESCAPE = re.compile(r"\\u[dD][89a-fA-F]")


def load_json(raw: str | bytes, field: str) -> Any:
    """Decode one stored JSON document (the arguments, the metadata).

    Follows `json.loads`, but refuses a document whose strings hold a lone surrogate
    written as an escape (``"\\ud800"``): valid UTF-8 text that no encoder takes back,
    so such a job could never be shown, listed as JSON or re-stored. Valid escaped pairs
    (``"\\ud83d\\ude00"``) decode to one character and pass. Only a document with a
    surrogate escape pays for the check.

    Args:
        raw: The stored JSON text.
        field: The stored field's name, for the error.

    Returns:
        The decoded value.

    Raises:
        ValueError: Not JSON (`json.JSONDecodeError`), or a lone surrogate, naming
            ``field``; the caller quarantines the record.
    """
    value = json.loads(raw)
    text = raw.decode("utf-8", "surrogateescape") if isinstance(raw, bytes) else raw
    if _SURROGATE_ESCAPE.search(text):
        try:
            json.dumps(value, ensure_ascii=False).encode("utf-8")
        except UnicodeEncodeError:
            raise ValueError(f"field {field!r} holds an escaped lone surrogate") from None
    return value


def decode_state(raw: str | bytes) -> JobState:
    """Decode one stored state document (JSON).

    Raises:
        pydantic.ValidationError: Not JSON, or not a known state.
    """
    return JOB_STATE.validate_json(raw)


def undecodable_reason(exc: BaseException, subject: str = "row") -> str:
    """The reason stored with a quarantined record.

    Args:
        exc: What decoding raised.
        subject: What the backend stores a job as (``"row"``, ``"job"``).

    Returns:
        ``"stored <subject> cannot be decoded: <Type>: <message>"``, at most
        `MAX_REASON_CHARS` characters.
    """
    return f"stored {subject} cannot be decoded: {type(exc).__name__}: {exc}"[:MAX_REASON_CHARS]


def quarantine_stand_in(
    *, job_id: str, method: Any, queue: Any, created_at: datetime | None, reason: str,
    now: datetime | None = None,
) -> Job:
    """The Failed job shown (and stored, at claim) in place of one that will not decode.

    Args:
        job_id: The stored id.
        method: The stored method name, or ``None``/empty (shown as ``"?"``).
        queue: The stored queue name, or ``None``/empty (shown as ``"?"``).
        created_at: The stored creation time if it decodes (aware UTC), else ``None``
            for now.
        reason: From `undecodable_reason`.
        now: The failure time (aware UTC); default the current time.

    Returns:
        A job in ``Failed(exception_type="qmlkit.errors.PayloadError", message=reason)``.
    """
    failed_at = now or datetime.now(timezone.utc)
    # Built without validation: a stored id or name that today's limits refuse (over 64
    # characters, a NUL; accepted by older versions) must still read.
    state = trusted(Failed, {"failed_at": failed_at, "exception_type": QUARANTINE_EXCEPTION,
                             "message": reason})
    return trusted(Job, {
        "id": _text(job_id), "method": _text(method) or "?", "queue": _text(queue) or "?",
        "args": [], "kwargs": {}, "metadata": {},
        "created_at": created_at or datetime.now(timezone.utc), "state": state,
    })


def _text(value: Any) -> str:
    """A stored text field as ``str``; bytes that are not UTF-8 are shown escaped."""
    if value is None:
        return ""
    if isinstance(value, bytes):
        return value.decode("utf-8", "backslashreplace")
    return str(value)


def decode_job(
    build: Callable[[], Job],
    stand_in: Callable[[str], Job],
    *,
    stored_state: str,
    disagreement: str,
    subject: str = "row",
) -> tuple[Job, str | None]:
    """Decode one stored job, or build its quarantine stand-in.

    Args:
        build: Builds the job from the stored fields (validating); may raise any of
            `DECODE_ERRORS`.
        stand_in: Builds the stand-in from a reason (usually `quarantine_stand_in`).
        stored_state: The state name stored beside the state data (a column or field).
        disagreement: The message when ``stored_state`` is not the decoded state's name,
            e.g. ``"state column 'Enqueued' disagrees with state data"``.
        subject: For the reason, see `undecodable_reason`.

    Returns:
        ``(job, None)``, or ``(stand_in, reason)`` for a record that will not decode.
    """
    try:
        job = build()
        if job.state.name != stored_state:
            raise ValueError(disagreement)
    except DECODE_ERRORS as exc:
        reason = undecodable_reason(exc, subject)
        return stand_in(reason), reason
    return job, None


def held_stand_in(stand_in: Job, attempts: int, processing: Processing) -> Job:
    """A stand-in as if claimed (``processing``, attempt ``attempts``): the fenced
    transition that stores its Failed state starts from this."""
    return stand_in.model_copy(update={"attempts": attempts, "state": processing})


def claimed_job(row: Mapping[str, Any], attempts: int, processing: Processing) -> Job:
    """Build a just-claimed job from its stored fields, decoding only the JSON ones.

    The claim's hot path: the new state is known, so the stored state is not decoded and
    the job is built without validation (`qmlkit.job.trusted`). Shared by every storage.

    Args:
        row: ``id``, ``method``, ``queue``, ``priority``, ``retry_count``,
            ``max_retries``, ``timeout_s`` (typed values), ``payload`` (the JSON text of
            ``{"args": [...], "kwargs": {...}}``), ``job_metadata`` (JSON text, or an
            already decoded dict), ``created_at``/``expires_at`` (aware datetimes).
        attempts: The attempt number (fencing token) of this claim.
        processing: The Processing state the claim stored.

    Raises:
        ValueError, TypeError, KeyError: A JSON field does not decode, or holds the wrong
            type; the caller quarantines the record with the reason.
    """
    payload = load_json(row["payload"], "payload")
    metadata = row["job_metadata"]
    if isinstance(metadata, (str, bytes)):
        metadata = load_json(metadata, "metadata")
    if not (isinstance(payload["args"], list) and isinstance(payload["kwargs"], dict)
            and isinstance(metadata, dict)):
        raise TypeError("args, kwargs or metadata of the wrong JSON type")
    return trusted(Job, {
        "id": row["id"], "method": row["method"], "args": payload["args"],
        "kwargs": payload["kwargs"], "queue": row["queue"], "priority": row["priority"],
        "attempts": attempts, "retry_count": row["retry_count"],
        "max_retries": row["max_retries"], "timeout_s": row["timeout_s"],
        "metadata": metadata, "created_at": row["created_at"],
        "expires_at": row["expires_at"], "state": processing,
    })


def decode_history(
    lines: str | None, current: str, *, job_id: str, logger: logging.Logger,
) -> list[JobState]:
    """A job's states, oldest first, from its history lines and its current state.

    Args:
        lines: Earlier states, one JSON document per line (``None``: none).
        current: The current state's JSON document.
        job_id: For the log message.
        logger: Where an entry that will not decode is reported (WARNING); it is skipped.

    Returns:
        Every entry that decodes, the current state last.
    """
    states: list[JobState] = []
    for raw in [*(lines or "").splitlines(), current]:
        try:
            states.append(JOB_STATE.validate_json(raw))
        except ValidationError:
            logger.warning("job %s: a history entry cannot be decoded; skipped", job_id)
    return states


def due_at(state: JobState) -> datetime | None:
    """When a Scheduled or AwaitingRetry job becomes due (the promotion index), else ``None``."""
    if isinstance(state, Scheduled):
        return state.enqueue_at
    if isinstance(state, AwaitingRetry):
        return state.retry_at
    return None


def outcome_at(state: JobState) -> datetime | None:
    """When a Succeeded or Failed job finished (the throughput counters), else ``None``."""
    if isinstance(state, Succeeded):
        return state.succeeded_at
    if isinstance(state, Failed):
        return state.failed_at
    return None


def state_columns(state: JobState) -> dict[str, Any]:
    """The indexed fields of a state, as the SQL backends store them.

    Returns:
        ``state`` (name), ``state_data`` (JSON), and the time indexes: ``enqueued_at``
        (Enqueued: claim order), ``due_at`` (Scheduled, AwaitingRetry: promotion),
        ``started_at`` and ``server_name`` (Processing: stranded and dead-server
        requeues); the others ``None``. Datetimes are aware UTC.
    """
    values: dict[str, Any] = {
        "state": state.name, "state_data": state.model_dump_json(),
        "enqueued_at": None, "due_at": None, "started_at": None, "server_name": None,
    }
    if isinstance(state, Enqueued):
        values["enqueued_at"] = state.enqueued_at
    elif isinstance(state, Processing):
        values["started_at"] = state.started_at
        values["server_name"] = state.server_name
    else:
        values["due_at"] = due_at(state)
    return values


#: One run of `group_new_jobs`: its first job (for the shared fields), and its jobs' id,
#: arguments JSON and metadata JSON, three strings per job in one flat list.
NewJobRun = tuple[Job, list[str]]


def group_new_jobs(jobs: Sequence[Job], max_bytes: int) -> list[NewJobRun]:
    """Check and encode jobs to enqueue, in runs of consecutive jobs that share every field
    but ``id``, ``args``, ``kwargs`` and ``metadata``.

    The jobs of one ``JobFunction.enqueue_many`` share one state object, timestamps and
    options, so they make one run; the storage encodes the shared fields (state JSON,
    times) once per run instead of once per job. Fields compare equal when they are the
    same objects, or equal values.

    Args:
        jobs: New jobs, in the order to store them.
        max_bytes: The storage's payload limit, in bytes (see `encode_payload`).

    Returns:
        The runs in order: ``(first job, [id, payload JSON, metadata JSON, id, ...])``,
        the flat list covering every job of the run, the first included (flat: a
        tuple per job would cost the garbage collector more in a large bulk).

    Raises:
        PayloadError: A job's arguments or metadata are not JSON or over ``max_bytes``.
        InvalidTransition: A job is neither Enqueued nor Scheduled.
    """
    if len(jobs) == 1:  # a single enqueue: no runs to find
        job = jobs[0]
        check_transition(job.id, None, job.state.name)
        return [(job, [job.id, encode_payload(job.args, job.kwargs, max_bytes),
                       encode_metadata(job.metadata, max_bytes) if job.metadata else "{}"])]
    runs: list[NewJobRun] = []
    members: list[str] = []
    shared: tuple[Any, ...] | None = None
    for job in jobs:
        key = (job.method, job.queue, job.priority, job.max_retries, job.timeout_s,
               job.created_at, job.attempts, job.retry_count, job.expires_at, job.state)
        if key != shared:
            check_transition(job.id, None, job.state.name)
            shared, members = key, []
            runs.append((job, members))
        members += (job.id, encode_payload(job.args, job.kwargs, max_bytes),
                    encode_metadata(job.metadata, max_bytes) if job.metadata else "{}")
    return runs

