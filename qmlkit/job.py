"""The job model: `Job` and its states, as in qml-rs (and Hangfire before it).

A job is an immutable pydantic model; every change makes a new one with
`Job.with_state`, which enforces the state machine below. All times are aware UTC
``datetime`` objects: a naive datetime is rejected, an aware one in another zone is
converted to UTC (field case C07). ``Job.model_dump_json()`` and
``Job.model_validate_json()`` round-trip a job losslessly.

State machine (a new job is born Enqueued or Scheduled; ``TRANSITIONS`` is the table)::

    new           -> Enqueued | Scheduled
    Enqueued      -> Processing (claimed) | Scheduled | Deleted
    Scheduled     -> Enqueued (due) | Deleted
    Processing    -> Succeeded | Failed | AwaitingRetry | Enqueued (released, reclaimed) | Deleted
    AwaitingRetry -> Enqueued (due) | Deleted
    Succeeded, Failed -> Enqueued (retried by hand) | Deleted
    Deleted       -> Enqueued (requeued)
"""

from __future__ import annotations

import random
import threading
import time
from datetime import datetime, timezone
from typing import Annotated, Any, ClassVar, Literal, TypeVar

from pydantic import AfterValidator, AwareDatetime, BaseModel, ConfigDict, Field

import qmlkit.limits as limits
from qmlkit.errors import InvalidTransition
from qmlkit.payload import DEFAULT_MAX_PAYLOAD_BYTES as DEFAULT_MAX_PAYLOAD_BYTES
from qmlkit.payload import encode_json as encode_json  # re-exported: they lived here first
from qmlkit.payload import encode_metadata as encode_metadata
from qmlkit.payload import encode_payload as encode_payload

#: Longest stored exception message or stack trace, in characters; longer text is cut
#: and marked, so one noisy failure cannot fill the store (field case C17).
MAX_ERROR_TEXT = 64 * 1024


def new_job_id() -> str:
    """Return a new job id: a UUID version 7 string (RFC 9562), ordered by creation time.

    Time-ordered ids keep B-tree inserts sequential, which makes bulk enqueue into SQL
    storage several times faster than random (version 4) ids. Within one process ids
    are strictly increasing (RFC 9562 section 6.2, method 1: the 12-bit ``rand_a`` field is
    a counter started at a random value each millisecond), so the id breaks ties in FIFO
    order between jobs enqueued in the same batch.
    """
    ms, seq = _reserve(1)
    # 48 bits of Unix milliseconds, version 7, the 12-bit counter, variant 0b10, 62 random
    # bits. Ids are unique, not secret, so the fast non-cryptographic generator serves
    # (the random module reseeds itself in forked children).
    value = (ms & 0xFFFFFFFFFFFF) << 80 | 0x7 << 76 | seq << 64 | 0b10 << 62
    value |= random.getrandbits(62)
    h = f"{value:032x}"
    return f"{h[:8]}-{h[8:12]}-{h[12:16]}-{h[16:20]}-{h[20:]}"


def new_job_ids(n: int) -> list[str]:
    """Return ``n`` new job ids as `new_job_id` makes them, in increasing order.

    One clock read and one lock for all of them, and the millisecond's part of the text
    made once per millisecond: about a third of ``n`` calls of ``new_job_id`` (bulk
    enqueue).

    Args:
        n: How many (0 or more).

    Returns:
        ``n`` UUID version 7 strings, each greater than the one before and than any id
        this process made earlier.
    """
    if n <= 0:
        return []
    ms, seq = _reserve(n)
    bits = random.getrandbits
    ids = []
    head = ""
    for _ in range(n):
        if seq > 0xFFF:  # past the 12-bit counter: the next millisecond (as _reserve did)
            ms, seq, head = ms + 1, 0, ""
        if not head:
            h = f"{ms & 0xFFFFFFFFFFFF:012x}"
            head = f"{h[:8]}-{h[8:]}-7"
        tail = f"{0x8000000000000000 | bits(62):016x}"  # variant 0b10, 62 random bits
        ids.append(f"{head}{seq:03x}-{tail[:4]}-{tail[4:]}")
        seq += 1
    return ids


def _reserve(n: int) -> tuple[int, int]:
    """Take ``n`` consecutive (millisecond, counter) slots; return the first one.

    The counter starts at a random value below 2,048 each new millisecond and runs to
    4,095; past it the ids borrow the next millisecond (RFC 9562 section 6.2)."""
    global _last_ms, _seq
    now_ms = time.time_ns() // 1_000_000
    with _id_lock:
        if now_ms > _last_ms:
            _last_ms, _seq = now_ms, random.getrandbits(11) - 1  # room for 2,048+ more
        ms, seq = _last_ms, _seq + 1
        if seq > 0xFFF:
            ms, seq = ms + 1, 0
        end = seq + n - 1
        _last_ms, _seq = ms + end // 4096, end % 4096
    return ms, seq


_id_lock = threading.Lock()
_last_ms = 0
_seq = 0


def utcnow() -> datetime:
    """Return the current time as an aware UTC ``datetime``."""
    return datetime.now(timezone.utc)


def _to_utc(value: datetime) -> datetime:
    return value.astimezone(timezone.utc)


def _storable_utc(value: datetime) -> datetime:
    value = value.astimezone(timezone.utc)
    problem = limits.timestamp_problem(value)
    if problem is not None:
        raise ValueError(problem)
    return value


def _name_check(max_length: int) -> AfterValidator:
    def check(value: str) -> str:
        problem = limits.name_problem(value, max_length)
        if problem is not None:
            raise ValueError(problem)
        return value
    return AfterValidator(check)


#: An aware datetime, normalised to UTC, within `qmlkit.limits.MIN_TIMESTAMP` ..
#: `qmlkit.limits.MAX_TIMESTAMP` (the range every backend stores exactly). Naive
#: datetimes and times outside the range fail validation.
UtcDateTime = Annotated[AwareDatetime, AfterValidator(_storable_utc)]

#: An aware datetime, normalised to UTC, with no range check: for the times a server
#: computes from configuration or job code (``Job.expires_at`` from a TTL,
#: ``AwaitingRetry.retry_at`` from ``Retry(delay=...)``), which must never fail to build.
AnyUtcDateTime = Annotated[AwareDatetime, AfterValidator(_to_utc)]

#: A job id: 1 to `qmlkit.limits.MAX_ID_LENGTH` characters, no NUL, no lone surrogate.
JobId = Annotated[str, _name_check(limits.MAX_ID_LENGTH)]

#: A job or queue name: 1 to `qmlkit.limits.MAX_NAME_LENGTH` characters, no NUL, no lone
#: surrogate.
Name = Annotated[str, _name_check(limits.MAX_NAME_LENGTH)]


def cap_text(text: str, limit: int = MAX_ERROR_TEXT) -> str:
    """Cut ``text`` to at most ``limit`` characters, marking the cut.

    Args:
        text: Any string, e.g. an exception message or a formatted traceback.
        limit: Maximum length in characters.

    Returns:
        ``text`` itself when short enough, else its head and tail with a marker between.
    """
    if len(text) <= limit:
        return text
    keep = limit // 2 - 40
    return f"{text[:keep]}\n… [{len(text) - 2 * keep} characters cut] …\n{text[-keep:]}"


class _State(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid")
    terminal: ClassVar[bool] = False


class Enqueued(_State):
    """Waiting in ``queue`` for a worker to claim it.

    Attributes:
        enqueued_at: When it became runnable (UTC); FIFO order within a priority. A job
            requeued from Processing (reclaimed, stranded) keeps the one it was claimed
            from, so it keeps its place in the queue.
        queue: The queue it waits in.
        reason: Why it was (re)enqueued, e.g. ``"released on shutdown"``, or ``None``.
    """

    name: Literal["Enqueued"] = "Enqueued"
    enqueued_at: UtcDateTime
    queue: str = "default"  # the checked name is Job.queue (storage templates use markers)
    reason: str | None = None


class Scheduled(_State):
    """Not runnable before ``enqueue_at``; the scheduler promotes it to Enqueued then.

    No worker owns a Scheduled job, so a far-future job is never held under a lease
    (field case C02).

    Attributes:
        enqueue_at: When it becomes runnable (UTC).
        scheduled_at: When it was scheduled (UTC).
        reason: Free text, e.g. ``"delay 10 s"``.
    """

    name: Literal["Scheduled"] = "Scheduled"
    enqueue_at: UtcDateTime
    scheduled_at: UtcDateTime
    reason: str | None = None


class Processing(_State):
    """Claimed by a worker, which holds the claim's fencing token (``Job.attempts``).

    Attributes:
        started_at: When the claim was made (UTC).
        worker_id: The claiming worker, e.g. ``"host:worker:3"``.
        server_name: The server's name (``name#uuid`` when heartbeats are on).
    """

    name: Literal["Processing"] = "Processing"
    started_at: UtcDateTime
    worker_id: str
    server_name: str


class Succeeded(_State):
    """Finished; ``result`` is the job function's JSON return value.

    Attributes:
        succeeded_at: When it finished (UTC).
        duration_ms: Wall time of the successful attempt, in milliseconds.
        result: The JSON-serialisable return value, or ``None``.
    """

    terminal: ClassVar[bool] = True
    name: Literal["Succeeded"] = "Succeeded"
    succeeded_at: UtcDateTime
    duration_ms: float
    result: Any = None


class Failed(_State):
    """Failed for good: retries used up, not retryable, or unrunnable.

    Attributes:
        failed_at: When (UTC).
        exception_type: Qualified name of the exception, e.g. ``"ValueError"``.
        message: ``str(exception)``, capped at ``MAX_ERROR_TEXT`` characters.
        stack_trace: The formatted traceback, capped likewise, or ``None``.
        retry_count: Retries made before this failure.
        note: Extra information, e.g. that the exception itself could not be printed.
    """

    terminal: ClassVar[bool] = True
    name: Literal["Failed"] = "Failed"
    failed_at: UtcDateTime
    exception_type: str
    message: str
    stack_trace: str | None = None
    retry_count: int = 0
    note: str | None = None


class AwaitingRetry(_State):
    """Failed an attempt; runnable again at ``retry_at`` (the scheduler promotes it).

    Attributes:
        retry_at: When the next attempt may start (UTC).
        retry_count: Retries scheduled so far, this one included (1 for the first).
        last_exception: ``"Type: message"`` of the failed attempt.
        stack_trace: Its formatted traceback, or ``None``.
    """

    name: Literal["AwaitingRetry"] = "AwaitingRetry"
    retry_at: AnyUtcDateTime  # made by a server from a job's Retry(delay=...)
    retry_count: int
    last_exception: str
    stack_trace: str | None = None


class Deleted(_State):
    """Removed by a person or a program; kept until its TTL expires.

    Attributes:
        deleted_at: When (UTC).
        reason: Why, or ``None``.
    """

    terminal: ClassVar[bool] = True
    name: Literal["Deleted"] = "Deleted"
    deleted_at: UtcDateTime
    reason: str | None = None


#: Any one job state; the ``name`` field tells them apart in JSON.
JobState = Annotated[
    Enqueued | Scheduled | Processing | Succeeded | Failed | AwaitingRetry | Deleted,
    Field(discriminator="name"),
]

#: Every state name, in lifecycle order.
STATE_NAMES: tuple[str, ...] = (
    "Enqueued", "Scheduled", "Processing", "Succeeded", "Failed", "AwaitingRetry", "Deleted",
)

#: Allowed transitions: source state name (``None`` = a new job) -> target names.
TRANSITIONS: dict[str | None, frozenset[str]] = {
    None: frozenset({"Enqueued", "Scheduled"}),
    "Enqueued": frozenset({"Processing", "Scheduled", "Deleted"}),
    "Scheduled": frozenset({"Enqueued", "Deleted"}),
    "Processing": frozenset({"Succeeded", "Failed", "AwaitingRetry", "Enqueued", "Deleted"}),
    "AwaitingRetry": frozenset({"Enqueued", "Deleted"}),
    "Succeeded": frozenset({"Enqueued", "Deleted"}),
    "Failed": frozenset({"Enqueued", "Deleted"}),
    "Deleted": frozenset({"Enqueued"}),
}


def check_transition(job_id: str, source: str | None, target: str) -> None:
    """Raise unless ``source -> target`` is an allowed transition.

    Args:
        job_id: For the error message.
        source: The current state's name, or ``None`` for a new job.
        target: The requested state's name.

    Raises:
        InvalidTransition: The state machine does not allow it.
    """
    if target not in TRANSITIONS.get(source, frozenset()):
        raise InvalidTransition(job_id, source, target)


class Job(BaseModel):
    """One unit of work: which function to call, with what, and where it stands.

    Attributes:
        id: UUID string (version 7, time-ordered, unless the caller chose one).
        method: The registered job name, e.g. ``"examples.words.count"``.
        args: Positional arguments, a JSON list.
        kwargs: Keyword arguments, a JSON object.
        queue: The queue it runs in.
        priority: Higher runs first; equal priorities run oldest first.
        attempts: How many times it has been claimed; the current claim's fencing token.
        retry_count: How many failed attempts have been retried so far.
        max_retries: Retries allowed after the first attempt fails.
        timeout_s: Per-attempt limit in seconds, or ``None`` for the server's default.
        metadata: Free JSON object for middleware and callers (tenant, trace id, …).
        created_at: When the job was made (UTC).
        expires_at: When cleanup may delete it (UTC), set on terminal states.
        state: The current state.
    """

    model_config = ConfigDict(frozen=True, extra="forbid")

    id: JobId = Field(default_factory=new_job_id)
    method: Name
    args: list[Any] = Field(default_factory=list)
    kwargs: dict[str, Any] = Field(default_factory=dict)
    queue: Name = "default"
    priority: int = Field(default=0, ge=-(2**31), le=limits.MAX_INT32)
    attempts: int = Field(default=0, ge=0, le=limits.MAX_INT32)
    retry_count: int = Field(default=0, ge=0, le=limits.MAX_INT32)
    max_retries: int = Field(default=3, ge=0, le=limits.MAX_INT32)
    timeout_s: float | None = Field(default=None, gt=0, le=limits.MAX_SECONDS,
                                    allow_inf_nan=False)
    metadata: dict[str, Any] = Field(default_factory=dict)
    created_at: UtcDateTime = Field(default_factory=utcnow)
    expires_at: AnyUtcDateTime | None = None
    state: JobState

    @property
    def state_name(self) -> str:
        """The current state's name, e.g. ``"Enqueued"``."""
        return self.state.name

    def with_state(self, state: JobState, **changes: Any) -> Job:
        """Return a copy in ``state``, with other fields changed as given.

        Args:
            state: The new state.
            **changes: Other fields to set, e.g. ``expires_at=...``.

        Returns:
            The new job; ``self`` is unchanged.

        Raises:
            InvalidTransition: The state machine does not allow this change.
        """
        check_transition(self.id, self.state.name, state.name)
        return self._replace(state=state, **changes)

    def _replace(self, **changes: Any) -> Job:
        """Copy with fields replaced, unvalidated: for internal changes of known types.

        On a worker's hot path (two copies per attempt) this is several times cheaper
        than ``model_copy``.
        """
        copy = _new(Job)
        _set(copy, "__dict__", {**self.__dict__, **changes})
        fields_set = self.__pydantic_fields_set__
        if not fields_set.issuperset(changes):
            fields_set = fields_set | changes.keys()
        _set(copy, "__pydantic_fields_set__", fields_set)  # never mutated in place
        _set(copy, "__pydantic_extra__", None)
        _set(copy, "__pydantic_private__", None)
        return copy


_M = TypeVar("_M", bound=BaseModel)
_new = object.__new__
_set = object.__setattr__
#: Per model class: the plain defaults, and the number of fields.
_DEFAULTS: dict[type[BaseModel], tuple[dict[str, Any], int]] = {}


def trusted(cls: type[_M], values: dict[str, Any], fields_set: set[str] | None = None) -> _M:
    """Build a model from values already known to be valid, skipping validation.

    For qmlkit's own hot paths only (a claimed job, an attempt's outcome state, a new
    job of validated options), where every value was produced by qmlkit with the right
    type. Fields missing from ``values`` take their plain (non-factory) defaults. What
    ``model_construct`` does, several times cheaper.

    Args:
        cls: A pydantic model class of this module.
        values: Field values; ``name`` may be left out for states. A dict of its own
            (with every field, it becomes the model's ``__dict__`` as it is).
        fields_set: The names to record as explicitly set (default: ``values``' keys).

    Returns:
        The model instance.
    """
    known = _DEFAULTS.get(cls)
    if known is None:
        known = _DEFAULTS[cls] = ({
            name: f.default for name, f in cls.model_fields.items()
            if f.default_factory is None and not f.is_required()
        }, len(cls.model_fields))
    defaults, size = known
    obj = _new(cls)
    _set(obj, "__dict__", {**defaults, **values} if defaults and len(values) < size
         else values)
    _set(obj, "__pydantic_fields_set__", set(values) if fields_set is None else fields_set)
    _set(obj, "__pydantic_extra__", None)
    _set(obj, "__pydantic_private__", None)
    return obj
